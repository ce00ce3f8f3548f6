"""A small ext4 file system in a file, loop-mounted, for the Kafka log directory of a private broker:
filled up to simulate a full disk, or switched to read-only through ext4's own error path
(errors=remount-ro and /sys/fs/ext4/<dev>/trigger_fs_error: what a failing disk does to it, open
files included). Needs root and loop devices; every mount is undone afterwards, even at exit."""

import atexit
import contextlib
import os
import subprocess
from pathlib import Path

_mounted: list["LoopDisk"] = []


def _run(*args: str, ok: tuple[int, ...] = (0,)) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(list(args), capture_output=True, text=True, timeout=120, check=False)
    if result.returncode not in ok:
        raise AssertionError(f"{' '.join(args)} failed ({result.returncode}): {result.stdout}{result.stderr}")
    return result


class LoopDisk:
    def __init__(self, image: Path, mountpoint: Path, size_mb: int = 128) -> None:
        self.image = image
        self.mountpoint = mountpoint
        self.size_mb = size_mb
        self.filler = mountpoint / "filler"

    def create(self) -> "LoopDisk":
        with self.image.open("wb") as f:
            f.truncate(self.size_mb * 1024 * 1024)
        _run("mkfs.ext4", "-q", "-F", "-m", "0", str(self.image))  # no blocks reserved for root
        self.mountpoint.mkdir(parents=True, exist_ok=True)
        self.mount()
        return self

    def mount(self) -> None:
        _run("mount", "-o", "loop,errors=remount-ro", str(self.image), str(self.mountpoint))
        _mounted.append(self)

    def unmount(self) -> None:
        if self in _mounted:
            _mounted.remove(self)
        if _run("umount", str(self.mountpoint), ok=(0, 1, 32)).returncode != 0:
            _run("umount", "-l", str(self.mountpoint), ok=(0, 1, 32))

    def device(self) -> str:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if parts[1] == str(self.mountpoint):
                return parts[0]
        raise AssertionError(f"{self.mountpoint} is not mounted")

    def free_bytes(self) -> int:
        stat = os.statvfs(self.mountpoint)
        return stat.f_bavail * stat.f_frsize

    def fill(self, leave: int) -> None:
        """Take all the space but `leave` bytes, as some other program filling the disk would."""
        _run("fallocate", "-l", str(max(0, self.free_bytes() - leave)), str(self.filler))

    def release(self) -> None:
        """The operator makes room again."""
        self.filler.unlink(missing_ok=True)

    def make_read_only(self) -> None:
        """An ext4 error: with errors=remount-ro the file system turns read-only at once."""
        name = os.path.basename(self.device())
        Path(f"/sys/fs/ext4/{name}/trigger_fs_error").write_text("fault injection test\n")

    def read_only(self) -> bool:
        for line in Path("/proc/mounts").read_text().splitlines():
            parts = line.split()
            if parts[1] == str(self.mountpoint):
                options = parts[3].split(",")
                return "ro" in options or "emergency_ro" in options
        return False

    def repair(self) -> None:
        """Unmount, fsck, mount again (the broker using it must be stopped)."""
        self.unmount()
        _run("e2fsck", "-f", "-y", str(self.image), ok=(0, 1))
        self.mount()

    def remove(self) -> None:
        self.unmount()
        with contextlib.suppress(OSError):
            self.image.unlink()


@atexit.register
def _unmount_leftovers() -> None:
    for disk in list(_mounted):
        disk.unmount()
