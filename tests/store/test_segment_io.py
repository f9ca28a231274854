"""Segment I/O helpers resume short transfers: the record lands (and reads back) whole, byte for byte."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from kvfabric.store.disk import segment
from kvfabric.store.disk.segment import align_up, read_into, write_record


def _short(real, limit: int):  # type: ignore[no-untyped-def]
    """A pwritev/preadv that moves at most ``limit`` bytes per call, as a signal or a full pipe would."""

    def call(fd: int, bufs, offset: int) -> int:  # type: ignore[no-untyped-def]
        views, left = [], limit
        for b in bufs:
            v = memoryview(b).cast("B")
            if left <= 0:
                break
            views.append(v[:left])
            left -= len(views[-1])
        return real(fd, views, offset)

    return call


@pytest.mark.parametrize("limit", [1, 100, 4096, 5000])
def test_short_writes_and_reads_are_resumed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, limit: int) -> None:
    header = bytes(range(200))
    payload = np.random.default_rng(limit).integers(0, 256, 10_000, dtype=np.uint8)
    span = align_up(len(header) + payload.nbytes)
    fd = os.open(tmp_path / "seg", os.O_RDWR | os.O_CREAT)
    try:
        monkeypatch.setattr(segment.os, "pwritev", _short(os.pwritev, limit))
        monkeypatch.setattr(segment.os, "preadv", _short(os.preadv, limit))
        write_record(fd, 4096, header, memoryview(payload), span)
        assert os.fstat(fd).st_size == 4096 + span
        head, body = bytearray(len(header)), np.empty_like(payload)
        assert read_into(fd, 4096, [head, body])
        assert bytes(head) == header and np.array_equal(body, payload)
        assert not read_into(fd, 4096 + span - 10, [bytearray(20)])  # the file ends first
    finally:
        os.close(fd)
