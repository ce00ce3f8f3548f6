"""A TCP proxy the fault tests control, for network faults between a connector and a service.

    proxy = TcpProxy(upstream_port)      # listens on 127.0.0.1:proxy.port, forwards to upstream
    proxy.cut()                          # close every connection (RST) and refuse new ones
    proxy.restore()                      # accept and forward again, at full speed, no delay
    proxy.delay(0.2)                     # every byte arrives 0.2 s later (each direction)
    proxy.throttle(20_000)               # at most 20 kB/s per direction, all connections together
    proxy.cut_after(1_000_000)           # cut once 1 MB more has passed (middle of a stream)
    proxy.hang()                         # a black hole: connections stay open, nothing moves
    proxy.close()

It runs an asyncio loop in a daemon thread; the methods are called from any thread. A cut aborts
both sockets of each connection (the peers see a reset at once, as when a NAT box or a firewall
drops the state); new connections are accepted and reset while cut, so clients see the refusal
without waiting for a connect timeout.
"""

import asyncio
import contextlib
import socket
import threading
import time
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")
CHUNK = 65536


class _Bucket:
    """A token bucket shared by every connection of one direction (bytes per second)."""

    def __init__(self) -> None:
        self.rate: float | None = None
        self.tokens = 0.0
        self.updated = time.monotonic()

    def set(self, rate: float | None) -> None:
        self.rate = rate
        self.tokens = 0.0 if rate is None else min(rate / 10, float(CHUNK))
        self.updated = time.monotonic()

    async def take(self, n: int) -> None:
        while self.rate is not None:
            now = time.monotonic()
            self.tokens = min(self.tokens + (now - self.updated) * self.rate, max(self.rate / 10, float(n)))
            self.updated = now
            if self.tokens >= n:
                self.tokens -= n
                return
            await asyncio.sleep(min(0.2, (n - self.tokens) / self.rate))


class _Link:
    """One proxied connection: client <-> upstream."""

    def __init__(
        self,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self.client = client
        self.upstream = upstream
        self.tasks: list[asyncio.Task[None]] = []

    def abort(self) -> None:
        for _, writer in (self.client, self.upstream):
            _reset(writer)
        for task in self.tasks:
            task.cancel()


def _reset(writer: asyncio.StreamWriter) -> None:
    """Close with an RST (SO_LINGER 0), as a cut network path reports to whoever still sends."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")
    writer.transport.abort()


class TcpProxy:
    def __init__(self, upstream_port: int, upstream_host: str = "127.0.0.1", name: str = "") -> None:
        self.upstream_host = upstream_host
        self.upstream_port = upstream_port
        self.name = name or f"proxy->{upstream_port}"
        self._loop = asyncio.new_event_loop()
        self._links: set[_Link] = set()
        self._cut = False
        self._hang = False
        self._delay = 0.0
        self._buckets = {"up": _Bucket(), "down": _Bucket()}
        self._cut_budget: int | None = None
        self.cut_fired = threading.Event()  # set when a cut_after() budget ran out
        self.bytes_forwarded = 0
        self.connections = 0
        self.resets = 0
        self._listener = socket.create_server(("127.0.0.1", 0), backlog=128)
        self.port: int = self._listener.getsockname()[1]
        self._server: asyncio.AbstractServer | None = None
        self._thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        self._ready = threading.Event()
        self._thread.start()
        self._ready.wait(10)
        self._closed = False

    # --- control (any thread) -------------------------------------------------------------------

    def cut(self) -> None:
        """Close every connection (both sides get a reset) and refuse new ones until restore()."""
        self._call(self._do_cut)

    def restore(self) -> None:
        """Back to normal: accept and forward, no delay, no throttle, no pending cut_after."""
        self._call(self._do_restore)

    def delay(self, seconds: float) -> None:
        """Hold every chunk `seconds` before passing it on (both directions; 0: none)."""
        self._call(lambda: setattr(self, "_delay", max(0.0, seconds)))

    def throttle(self, bytes_per_second: float | None) -> None:
        """At most `bytes_per_second` in each direction, over all connections (None: unlimited)."""

        def apply() -> None:
            for bucket in self._buckets.values():
                bucket.set(bytes_per_second)

        self._call(apply)

    def cut_after(self, n_bytes: int) -> None:
        """Cut (as cut()) once `n_bytes` more have been forwarded, either direction; `cut_fired`
        is set when it happens."""

        def arm() -> None:
            self.cut_fired.clear()
            self._cut_budget = n_bytes

        self._call(arm)

    def hang(self) -> None:
        """A black hole: connections stay open but no byte moves (new ones hang too), as when a
        network path silently drops packets; the peers only notice through their own timeouts."""
        self._call(lambda: setattr(self, "_hang", True))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        with contextlib.suppress(RuntimeError):
            self._call(self._do_close)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        with contextlib.suppress(RuntimeError):
            self._loop.close()

    def __enter__(self) -> "TcpProxy":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    @property
    def active(self) -> int:
        return len(self._links)

    def _call(self, func: Callable[[], T]) -> T:
        async def run() -> T:
            return func()

        return self._submit(run())

    def _submit(self, coro: Coroutine[Any, Any, T]) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(10)

    # --- the loop -----------------------------------------------------------------------------

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)

        async def start() -> None:
            self._server = await asyncio.start_server(self._accept, sock=self._listener)

        self._loop.run_until_complete(start())
        self._ready.set()
        self._loop.run_forever()
        # cancel what is left so the loop closes cleanly
        pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
        for task in pending:
            task.cancel()
        if pending:
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))

    def _do_cut(self) -> None:
        self._cut = True
        self._cut_budget = None
        for link in list(self._links):
            link.abort()
            self.resets += 1
        self._links.clear()

    def _do_restore(self) -> None:
        self._cut = False
        self._hang = False
        self._delay = 0.0
        self._cut_budget = None
        for bucket in self._buckets.values():
            bucket.set(None)

    def _do_close(self) -> None:
        self._do_cut()
        if self._server is not None:
            self._server.close()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._cut:
            _reset(writer)
            self.resets += 1
            return
        try:
            upstream = await asyncio.wait_for(
                asyncio.open_connection(self.upstream_host, self.upstream_port), timeout=10
            )
        except (OSError, TimeoutError):
            _reset(writer)  # the service is down: the client sees what it would see without us
            return
        if self._cut:  # cut while connecting
            _reset(writer)
            _reset(upstream[1])
            return
        self.connections += 1
        link = _Link((reader, writer), upstream)
        self._links.add(link)
        link.tasks = [
            asyncio.ensure_future(self._pump(link, reader, upstream[1], "up")),
            asyncio.ensure_future(self._pump(link, upstream[0], writer, "down")),
        ]

    async def _pump(
        self, link: _Link, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, direction: str
    ) -> None:
        """Copy one direction: read, wait out hang/throttle, hold for the delay, write. A clean end
        of stream is passed on as a half-close; an error on either socket resets both."""
        queue: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue(maxsize=64)
        sender = asyncio.ensure_future(self._send(queue, writer))
        bucket = self._buckets[direction]
        clean = False
        try:
            while True:
                while self._hang and not self._cut:
                    await asyncio.sleep(0.05)
                data = await reader.read(CHUNK)
                if not data:
                    break
                while self._hang and not self._cut:
                    await asyncio.sleep(0.05)
                await bucket.take(len(data))
                if self._cut_budget is not None:
                    if len(data) >= self._cut_budget:
                        # pass on the part within the budget, then cut in the middle of the stream
                        await queue.put((time.monotonic() + self._delay, data[: self._cut_budget]))
                        await asyncio.sleep(0.05)
                        self.cut_fired.set()
                        self._do_cut()
                        return
                    self._cut_budget -= len(data)
                if sender.done():  # the other side is gone
                    break
                await queue.put((time.monotonic() + self._delay, data))
            await queue.put((0.0, b""))  # end of stream: half-close once what is queued is sent
            clean = await sender
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:
            clean = True  # aborted by a cut: the cut already reset both sockets
        finally:
            sender.cancel()
            if not clean:
                link.abort()
                self._links.discard(link)
            elif all(t.done() or t is asyncio.current_task() for t in link.tasks):
                self._links.discard(link)
                for _, w in (link.client, link.upstream):
                    w.close()

    async def _send(self, queue: "asyncio.Queue[tuple[float, bytes]]", writer: asyncio.StreamWriter) -> bool:
        """Write what the pump queued, each chunk at its due time; True after a clean end of stream."""
        try:
            while True:
                due, data = await queue.get()
                if not data:
                    if writer.can_write_eof():
                        writer.write_eof()
                    return True
                wait = due - time.monotonic()
                if wait > 0:
                    await asyncio.sleep(wait)
                while self._hang and not self._cut:
                    await asyncio.sleep(0.05)
                writer.write(data)
                self.bytes_forwarded += len(data)
                await writer.drain()
        except (ConnectionError, OSError):
            return False
