"""Incremental frame reader for ``asyncio.BufferedProtocol``: the zero-copy receive path.

Headers and bodies land in one small reusable control buffer. Once a frame's body is parsed, its owner names the
destinations of the payload (memoryviews into the caller's tensors or the server's block buffers) and the event
loop reads the rest of the payload straight into them via ``get_buffer``; only the bytes that arrived together with
the header in one read are copied, once.

The control buffer grows for a large body (never past ``limits.max_body_bytes``, checked in the header first) and
shrinks back to ``control_bytes`` once it is empty, so one large frame does not pin its size for the connection's
life. A frame that is well formed but over a limit (:class:`RequestLimitError`) goes to ``on_reject`` when one is
given; its payload is skipped and the stream goes on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Final

from kvfabric.transport.frames import (
    HEADER_BYTES, Frame, Limits, RequestLimitError, parse_body, parse_header, payload_len,
)  # fmt: skip

CONTROL_BUFFER_BYTES: Final = 256 << 10
DISCARD_BUFFER_BYTES: Final = 1 << 20


class _Defer:
    """The type of :data:`DEFER`."""


DEFER: Final = _Defer()
"""What an ``OnFrame`` returns to name the payload's destinations later, with :meth:`FrameReceiver.resume`; the
receiver parses nothing more until then (its owner pauses reading meanwhile)."""
OnFrame = Callable[[Frame], Sequence[memoryview] | _Defer | None]
"""Called when a frame's body is parsed; returns where its payload goes (in order), ``None`` to discard it, or
:data:`DEFER`."""
OnSegment = Callable[[Frame, int], None]
"""Called after payload segment ``i`` of a frame is complete."""
OnPayloadDone = Callable[[Frame], None]
"""Called once every payload byte of a frame has arrived (right after ``OnFrame`` when it has none)."""
OnReject = Callable[[RequestLimitError], None]
"""Called for a well-formed frame over a request limit; its payload is then skipped."""


class FrameReceiver:
    """Parses frames out of a byte stream; raises ProtocolError from :meth:`buffer_updated` on bad input."""

    def __init__(
        self, limits: Limits, on_frame: OnFrame, on_payload_done: OnPayloadDone, on_segment: OnSegment | None = None,
        *, on_reject: OnReject | None = None, control_bytes: int = CONTROL_BUFFER_BYTES,
    ) -> None:  # fmt: skip
        self.limits = limits
        self.control_bytes = control_bytes
        self._on_frame: OnFrame | None = on_frame
        self._on_payload_done: OnPayloadDone | None = on_payload_done
        self._on_segment = on_segment
        self._on_reject = on_reject
        self._buf = bytearray(max(control_bytes, HEADER_BYTES))
        self._view = memoryview(self._buf)
        self._start = 0
        self._end = 0
        self._frame: Frame | _Skipped | None = None  # the frame whose payload is being received
        self._segments: Sequence[memoryview] = ()
        self._seg_index = 0
        self._seg_pos = 0
        self._discard_left = 0
        self._discard: memoryview | None = None
        self._deferred = False

    @property
    def receiving_payload(self) -> bool:
        return self._frame is not None

    @property
    def deferred(self) -> bool:
        """A frame waits for :meth:`resume` to name its payload's destinations."""
        return self._deferred

    def resume(self, segments: Sequence[memoryview] | None) -> None:
        """Name the destinations of the deferred frame's payload (``None``: discard it) and go on parsing."""
        if not self._deferred or self._frame is None or isinstance(self._frame, _Skipped):
            raise RuntimeError("no frame is deferred")
        self._deferred = False
        self._set_segments(payload_len(self._frame), segments)
        self._process()

    @property
    def idle(self) -> bool:
        """No partial frame is buffered or being received."""
        return self._frame is None and self._start == self._end and not self._discard_left

    @property
    def buffered_bytes(self) -> int:
        """Bytes of memory this receiver holds for itself (control and discard buffers)."""
        return len(self._buf) + (len(self._discard) if self._discard is not None else 0)

    def close(self) -> None:
        """Drop the callbacks and buffers: the owner's connection and this receiver no longer keep each other
        alive, and a late ``buffer_updated`` is ignored."""
        self._on_frame = self._on_payload_done = None
        self._on_segment = self._on_reject = None
        self._frame, self._segments, self._discard = None, (), None
        self._buf = bytearray(HEADER_BYTES)
        self._view = memoryview(self._buf)
        self._start = self._end = self._discard_left = 0
        self._deferred = False

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._deferred:  # only if bytes arrive before the owner's pause takes effect: keep them
            self._ensure_capacity(self._end - self._start + HEADER_BYTES)
            return self._view[self._end :]
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
        if self._on_frame is None:  # closed
            return
        if self._deferred:
            self._end += nbytes
            return
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
        if self._start == self._end and self._frame is None and len(self._buf) > self.control_bytes:
            self._buf = bytearray(self.control_bytes)  # give back what a large body needed
            self._view = memoryview(self._buf)
            self._start = self._end = 0

    # --- internals -----------------------------------------------------------------------------------------------
    def _set_segments(self, nbytes: int, segments: Sequence[memoryview] | None) -> None:
        self._seg_index = self._seg_pos = 0
        if segments is None:
            self._segments, self._discard_left = (), nbytes
        else:
            if sum(len(s) for s in segments) != nbytes:
                raise ValueError(f"payload destinations do not add up to {nbytes} bytes")
            self._segments, self._discard_left = segments, 0
            self._skip_empty_segments()

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
        self._discard = None  # a skipped payload's scratch buffer is not kept for the connection's life
        assert frame is not None
        if self._on_payload_done is not None and not isinstance(frame, _Skipped):
            self._on_payload_done(frame)

    def _process(self) -> None:
        while self._on_frame is not None:
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
                try:
                    frame = parse_body(header, body, self.limits)
                except RequestLimitError as exc:
                    if self._on_reject is None:
                        raise
                    self._start += total
                    self._on_reject(exc)
                    if exc.payload_len:
                        self._frame, self._segments, self._discard_left = _Skipped(), (), exc.payload_len
                        self._seg_index = self._seg_pos = 0
                    continue
                self._start += total
                nbytes = payload_len(frame)
                segments = self._on_frame(frame)
                if nbytes == 0:
                    if self._on_payload_done is not None:
                        self._on_payload_done(frame)
                    continue
                self._frame = frame
                if isinstance(segments, _Defer):
                    self._deferred = True
                    return
                self._set_segments(nbytes, segments)
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


class _Skipped:
    """Stands for a rejected frame while its payload is skipped; never reaches the owner's callbacks."""
