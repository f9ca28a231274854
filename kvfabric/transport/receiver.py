"""Incremental frame reader for ``asyncio.BufferedProtocol``: the zero-copy receive path.

Headers and bodies land in one small reusable control buffer. Once a frame's body is parsed, its owner names the
destinations of the payload (memoryviews into the caller's tensors or the server's block buffers) and the event
loop reads the rest of the payload straight into them via ``get_buffer``; only the bytes that arrived together with
the header in one read are copied, once.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from kvfabric.transport.frames import HEADER_BYTES, Frame, Limits, parse_body, parse_header, payload_len

CONTROL_BUFFER_BYTES: Final = 256 << 10
DISCARD_BUFFER_BYTES: Final = 1 << 20

OnFrame = Callable[[Frame], Sequence[memoryview] | None]
"""Called when a frame's body is parsed; returns where its payload goes (in order), or ``None`` to discard it."""
OnSegment = Callable[[Frame, int], None]
"""Called after payload segment ``i`` of a frame is complete."""
OnPayloadDone = Callable[[Frame], None]
"""Called once every payload byte of a frame has arrived (right after ``OnFrame`` when it has none)."""


class FrameReceiver:
    """Parses frames out of a byte stream; raises ProtocolError from :meth:`buffer_updated` on bad input."""

    def __init__(
        self, limits: Limits, on_frame: OnFrame, on_payload_done: OnPayloadDone, on_segment: OnSegment | None = None
    ) -> None:
        self.limits = limits
        self._on_frame = on_frame
        self._on_payload_done = on_payload_done
        self._on_segment = on_segment
        self._buf = bytearray(CONTROL_BUFFER_BYTES)
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._frame: Frame | None = None  # the frame whose payload is being received
        self._segments: Sequence[memoryview] = ()
        self._seg_index = 0
        self._seg_pos = 0
        self._discard_left = 0
        self._discard: memoryview | None = None

    @property
    def receiving_payload(self) -> bool:
        return self._frame is not None

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._frame is not None and self._start == self._end:
            if self._discard_left:
                if self._discard is None:
                    self._discard = memoryview(bytearray(DISCARD_BUFFER_BYTES))
                return self._discard[: min(self._discard_left, DISCARD_BUFFER_BYTES)]
            return self._segments[self._seg_index][self._seg_pos :]
        if self._start == self._end:
            self._start = self._end = 0
        elif self._end == len(self._buf):
            self._compact()
        return self._view[self._end :]

    def buffer_updated(self, nbytes: int) -> None:
        if self._frame is not None and self._start == self._end:
            if self._discard_left:
                self._discard_left -= nbytes
            else:
                self._advance(nbytes)
            if self._payload_complete():
                self._finish_payload()
            else:
                return
        else:
            self._end += nbytes
        self._process()

    # --- internals -----------------------------------------------------------------------------------------------
    def _compact(self) -> None:
        n = self._end - self._start
        self._view[:n] = self._view[self._start : self._end]
        self._start, self._end = 0, n

    def _ensure_capacity(self, needed: int) -> None:
        if needed > len(self._buf):
            new = bytearray(needed)
            n = self._end - self._start
            new[:n] = self._view[self._start : self._end]
            self._view.release()
            self._buf, self._view = new, memoryview(new)
            self._start, self._end = 0, n
        elif self._start + needed > len(self._buf):
            self._compact()

    def _advance(self, nbytes: int) -> None:
        """``nbytes`` landed in the current segment(s)."""
        while nbytes:
            seg = self._segments[self._seg_index]
            take = min(nbytes, len(seg) - self._seg_pos)
            self._seg_pos += take
            nbytes -= take
            if self._seg_pos == len(seg):
                self._segment_done()
                self._skip_empty_segments()

    def _segment_done(self) -> None:
        assert self._frame is not None
        if self._on_segment is not None:
            self._on_segment(self._frame, self._seg_index)
        self._seg_index += 1
        self._seg_pos = 0

    def _skip_empty_segments(self) -> None:
        while self._seg_index < len(self._segments) and len(self._segments[self._seg_index]) == 0:
            self._segment_done()

    def _payload_complete(self) -> bool:
        return self._discard_left == 0 and self._seg_index >= len(self._segments)

    def _finish_payload(self) -> None:
        frame, self._frame = self._frame, None
        self._segments = ()
        assert frame is not None
        self._on_payload_done(frame)

    def _process(self) -> None:
        while True:
            if self._frame is None:
                avail = self._end - self._start
                if avail < HEADER_BYTES:
                    if self._start + HEADER_BYTES > len(self._buf):
                        self._compact()
                    return
                header = parse_header(self._view[self._start : self._start + HEADER_BYTES], self.limits)
                total = HEADER_BYTES + header.body_len
                if avail < total:
                    self._ensure_capacity(total)
                    return
                body = self._view[self._start + HEADER_BYTES : self._start + total]
                frame = parse_body(header, body, self.limits)
                self._start += total
                nbytes = payload_len(frame)
                segments = self._on_frame(frame)
                if nbytes == 0:
                    self._on_payload_done(frame)
                    continue
                self._frame = frame
                self._seg_index = self._seg_pos = 0
                if segments is None:
                    self._segments, self._discard_left = (), nbytes
                else:
                    if sum(len(s) for s in segments) != nbytes:
                        raise ValueError(f"payload destinations do not add up to {nbytes} bytes")
                    self._segments, self._discard_left = segments, 0
                    self._skip_empty_segments()
            # payload bytes that arrived with the header: copy them out of the control buffer
            while self._start < self._end and not self._payload_complete():
                avail = self._end - self._start
                if self._discard_left:
                    take = min(avail, self._discard_left)
                    self._discard_left -= take
                else:
                    seg = self._segments[self._seg_index]
                    take = min(avail, len(seg) - self._seg_pos)
                    seg[self._seg_pos : self._seg_pos + take] = self._view[self._start : self._start + take]
                    self._advance(take)
                self._start += take
            if not self._payload_complete():
                return
            self._finish_payload()
