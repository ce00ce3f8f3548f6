"""python -m bench.kafka_transactions: what publishing with Kafka transactions would cost cdc-source,
measured against the idempotent producer it uses, on the same broker in the same run.

Each variant produces the same messages (change-event sized, keyed, over 3 partitions) while a
`read_committed` consumer reads them, twice: as fast as the producer takes them (throughput:
messages per second until the consumer has seen the last one), then paced at `--rate` messages per
second (latency: from produce() to the consumer seeing the message, what a sink could see at
best). The transactional variants commit every `--commit-ms` milliseconds, as a source would to
bound how long a change stays invisible.

    python -m bench.kafka_transactions --bootstrap-servers 127.0.0.1:9092 --messages 200000
"""

import argparse
import threading
import time
import uuid
from dataclasses import dataclass
from typing import Any

from confluent_kafka import Consumer, Producer
from confluent_kafka.admin import AdminClient

from pg_kafka_cdc.common.kafka import ensure_topics
from source_connector.connector import PRODUCER_TUNING

PAYLOAD = b"x" * 600  # about a change event of the writer's tables
PARTITIONS = 3


@dataclass
class Result:
    messages: int
    seconds: float
    latency_ms: list[float]

    def percentile(self, q: float) -> float:
        lat = sorted(self.latency_ms)
        return lat[max(0, int(len(lat) * q) - 1)] if lat else float("nan")


def producer_config(bootstrap: str, transactional: bool) -> dict[str, Any]:
    config: dict[str, Any] = {
        "bootstrap.servers": bootstrap,
        **PRODUCER_TUNING,
        "queue.buffering.max.messages": 500_000,
        "partitioner": "murmur2_random",
        "log_level": 3,
    }
    if transactional:
        config["transactional.id"] = f"bench-{uuid.uuid4().hex}"
    return config


def consume(bootstrap: str, topic: str, expected: int, sent: dict[int, float], seen: list[float]) -> None:
    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"bench-{uuid.uuid4().hex}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
            "isolation.level": "read_committed",
            "log_level": 3,
        }
    )
    consumer.subscribe([topic])
    count = 0
    try:
        while count < expected:
            for m in consumer.consume(1000, 0.005):  # returns at once: the wait is not the latency
                if m.error() is not None:
                    continue
                now = time.monotonic()
                n = int(m.key() or b"0")
                seen.append((now - sent[n]) * 1000)
                count += 1
    finally:
        consumer.close()


def run_variant(bootstrap: str, messages: int, commit_ms: float | None, rate: float | None = None) -> Result:
    topic = f"bench-tx-{uuid.uuid4().hex[:8]}"
    admin = AdminClient({"bootstrap.servers": bootstrap})
    ensure_topics(admin, [topic], PARTITIONS, 1, {}, quiet=True)
    producer = Producer(producer_config(bootstrap, commit_ms is not None))
    sent: dict[int, float] = {}
    seen: list[float] = []
    reader = threading.Thread(target=consume, args=(bootstrap, topic, messages, sent, seen))
    reader.start()
    time.sleep(2.0)  # the consumer joined
    started = time.monotonic()
    if commit_ms is not None:
        producer.init_transactions()
        producer.begin_transaction()
    next_commit = started + (commit_ms or 0) / 1000
    for n in range(messages):
        if rate is not None:
            time.sleep(max(0.0, started + n / rate - time.monotonic()))
            producer.poll(0)
        sent[n] = time.monotonic()
        while True:
            try:
                producer.produce(topic, PAYLOAD, str(n).encode())
                break
            except BufferError:
                producer.poll(0.01)
        if commit_ms is not None and sent[n] >= next_commit:
            producer.commit_transaction()
            producer.begin_transaction()
            next_commit = time.monotonic() + commit_ms / 1000
    if commit_ms is not None:
        producer.commit_transaction()
    producer.flush(60)
    reader.join(timeout=300)
    seconds = time.monotonic() - started
    admin.delete_topics([topic])
    return Result(messages, seconds, seen)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--bootstrap-servers", default="127.0.0.1:9092")
    parser.add_argument("--messages", type=int, default=200_000)
    parser.add_argument("--commit-ms", type=float, nargs="*", default=[10.0, 100.0, 1000.0])
    parser.add_argument("--rate", type=float, default=1000.0, help="messages/s of the latency phase")
    parser.add_argument("--paced", type=int, default=10_000, help="messages of the latency phase")
    args = parser.parse_args()
    print(f"| variant | throughput | latency p50 at {args.rate:g}/s | p99 |")
    print("| --- | --- | --- | --- |")
    for commit_ms in [None, *args.commit_ms]:
        fast = run_variant(args.bootstrap_servers, args.messages, commit_ms)
        paced = run_variant(args.bootstrap_servers, args.paced, commit_ms, args.rate)
        name = "idempotent (cdc-source)" if commit_ms is None else f"transactions, commit every {commit_ms:g} ms"
        print(
            f"| {name} | {fast.messages / fast.seconds:,.0f} msg/s | {paced.percentile(0.5):.1f} ms "
            f"| {paced.percentile(0.99):.1f} ms |",
            flush=True,
        )


if __name__ == "__main__":
    main()
