"""A small real filesystem for out-of-space tests: an ext4 image loop-mounted under the test's tmp dir.

Needs root (mount) and a loop device; the context manager skips the test with the reason when either is missing.
"""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60, check=False)


@contextmanager
def small_filesystem(base: Path, size_mib: int = 64) -> Iterator[Path]:
    """Mount a fresh ``size_mib`` MiB ext4 (no blocks kept for root, so free space means the same to everyone) and
    yield its mount point; unmounted (lazily, if still busy) afterwards."""
    if os.geteuid() != 0:
        pytest.skip("loop-mounting a small filesystem needs root")
    image, mnt = base / "small-fs.img", base / "small-fs"
    mnt.mkdir()
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    made = _run("mkfs.ext4", "-q", "-F", "-m", "0", str(image))
    if made.returncode != 0:
        pytest.skip(f"mkfs.ext4 failed: {made.stderr.strip() or made.returncode}")
    mounted = _run("mount", "-o", "loop", str(image), str(mnt))
    if mounted.returncode != 0:
        pytest.skip(f"cannot loop-mount a filesystem here: {mounted.stderr.strip() or mounted.returncode}")
    try:
        yield mnt
    finally:
        if _run("umount", str(mnt)).returncode != 0:
            _run("umount", "-l", str(mnt))
        image.unlink(missing_ok=True)


def fill(path: Path) -> int:
    """Write ``path`` until the filesystem is full (ENOSPC); bytes written. Remove the file to give them back."""
    written = 0
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for chunk in (1 << 20, 4096):  # megabytes, then top off the last blocks
            buf = b"\xa5" * chunk
            while True:
                try:
                    written += os.write(fd, buf)
                except OSError:
                    break
        try:
            os.fsync(fd)
        except OSError:
            pass
    finally:
        os.close(fd)
    return written
