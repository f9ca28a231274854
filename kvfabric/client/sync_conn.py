"""One blocking connection: frames out with ``sendmsg`` (header and payload views, no concatenation), replies in
with ``recv_into`` straight into the destination buffers. One request at a time; the pool provides concurrency.

A plain TCP connection is a blocking socket whose timeout is the kernel's (``SO_RCVTIMEO``/``SO_SNDTIMEO``), not
Python's: a Python socket timeout polls before every ``recv_into``, and that extra call and wake-up per chunk cost
8-23% of the bandwidth of a 16 MiB reply on loopback. One ``recv`` reads a reply's header, body and the first payload bytes;
the rest of the payload is received straight into its destination in as few calls as the kernel allows.
"""

from __future__ import annotations

import select
import socket
import struct
from collections.abc import Sequence
from typing import Final, TypeVar, cast

from kvfabric.client.plans import OnSegment, Plan, Request, Sink, advance, hello
from kvfabric.client.session import CLIENT_LIMITS, ClientOptions, Endpoint, SessionInfo
from kvfabric.errors import ClientError, KVFabricError, ProtocolError
from kvfabric.transport import frames as fr

IOV_MAX: Final = 512
CONTROL_BYTES: Final = 64 << 10
"""Reused buffer for reply headers and bodies (grown for a larger body)."""
FIRST_READ_BYTES: Final = 4096
"""The first read of a reply: header, a typical body, and a few payload bytes that are then copied once."""
R = TypeVar("R")


class SyncConnection:
    def __init__(self, endpoint: Endpoint, options: ClientOptions) -> None:
        self.endpoint = endpoint
        self.options = options
        self.broken = False
        self._next_id = 1
        try:
            raw = socket.create_connection((endpoint.host, endpoint.port), timeout=options.timeout)
        except OSError as exc:
            raise ClientError(f"cannot connect to {endpoint}: {exc}") from exc
        raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._tls = options.ssl is not None or endpoint.tls
        self._buf = bytearray(CONTROL_BYTES)
        self._view = memoryview(self._buf)
        self._start = self._end = 0  # received bytes not consumed yet: self._buf[start:end]
        if not self._tls:
            timeval = struct.pack("@ll", int(options.timeout), int(options.timeout % 1 * 1e6))
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, timeval)
            raw.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, timeval)
            raw.settimeout(None)
        else:
            import ssl

            ctx = options.ssl or ssl.create_default_context()
            try:
                raw = ctx.wrap_socket(raw, server_hostname=endpoint.host)
            except (OSError, ssl.SSLError) as exc:
                raw.close()
                raise ClientError(f"TLS handshake with {endpoint} failed: {exc}") from exc
        self.sock = raw
        try:
            self.session: SessionInfo = self.run(hello(options))
        except BaseException:
            self.close()
            raise

    def next_id(self) -> int:
        rid = self._next_id
        self._next_id += 1
        return rid

    def run(self, plan: Plan[R]) -> R:
        """Run ``plan`` to its end on this connection, one request at a time."""
        try:
            request, result = advance(plan, None)
            while request is not None:
                request, result = advance(plan, self.exchange(request))
        finally:
            plan.close()  # a plan left mid-way by a failed request ends here, not whenever it is collected
        return cast(R, result)

    def exchange(self, req: Request) -> fr.Frame | None:
        """Send ``req`` and return its reply (``None`` for a oneway frame)."""
        head = req.encode(self.next_id())
        if req.oneway:
            self.send_oneway(head)
            return None
        return self.request(head, req.payload, req.sink, req.on_segment, req.what)

    def request(
        self, head: bytes, payload: Sequence[memoryview] = (), sink: Sink | None = None,
        on_segment: OnSegment | None = None, what: str = "request",
    ) -> fr.Frame:  # fmt: skip
        """Send one frame (+payload) and return the reply; its payload goes where ``sink`` says."""
        if self.broken:
            raise ClientError(f"connection to {self.endpoint} is broken")
        rid = fr.HEADER.unpack_from(head)[4]
        try:
            self._send([head, *payload])
            reply = self._receive(sink, on_segment)
            if reply.request_id not in (rid, 0):
                raise ProtocolError(f"{what}: reply to request {reply.request_id}, expected {rid}")
            return reply
        except (TimeoutError, BlockingIOError) as exc:  # BlockingIOError: SO_RCVTIMEO / SO_SNDTIMEO expired
            self.broken = True
            raise ClientError(f"{what} to {self.endpoint} timed out after {self.options.timeout}s") from exc
        except OSError as exc:
            self.broken = True
            raise ClientError(f"{what} to {self.endpoint} failed: {exc}") from exc
        except KVFabricError:
            self.broken = True
            raise

    def send_oneway(self, head: bytes) -> None:
        try:
            self._send([head])
        except OSError as exc:
            self.broken = True
            raise ClientError(f"send to {self.endpoint} failed: {exc}") from exc

    def _send(self, bufs: list[bytes | memoryview]) -> None:
        if self._tls:  # SSL sockets have no sendmsg; each buffer is encrypted from where it lies anyway
            for b in bufs:
                self.sock.sendall(b)
            return
        views = [memoryview(b) for b in bufs]
        while views:
            sent = self.sock.sendmsg(views[:IOV_MAX])
            while sent and views:
                if sent >= len(views[0]):
                    sent -= len(views[0])
                    views.pop(0)
                else:
                    views[0] = views[0][sent:]
                    sent = 0
            while views and not len(views[0]):
                views.pop(0)

    def _recv_exact(self, view: memoryview) -> None:
        """Fill ``view``: first from bytes already received, then straight from the socket."""
        n = len(view)
        pos = min(n, self._end - self._start)
        if pos:
            view[:pos] = self._view[self._start : self._start + pos]
            self._start += pos
        recv_into = self.sock.recv_into
        while pos < n:
            got = recv_into(view[pos:])
            if not got:
                raise ClientError(f"{self.endpoint} closed the connection")
            pos += got

    def _fill(self, n: int, window: int) -> memoryview:
        """At least ``n`` unconsumed bytes in the control buffer (reading up to ``window`` more per call)."""
        if self._start == self._end:
            self._start = self._end = 0
        if self._start + n > len(self._buf):
            have = self._view[self._start : self._end]
            if n > len(self._buf):
                self._buf = bytearray(n)
                self._view.release()
                self._view = memoryview(self._buf)
            self._view[: len(have)] = have
            self._start, self._end = 0, len(have)
        while self._end - self._start < n:
            got = self.sock.recv_into(self._view[self._end : min(len(self._buf), self._end + max(window, n))])
            if not got:
                raise ClientError(f"{self.endpoint} closed the connection")
            self._end += got
        return self._view[self._start : self._start + n]

    def _receive(self, sink: Sink | None, on_segment: OnSegment | None) -> fr.Frame:
        header = fr.parse_header(self._fill(fr.HEADER_BYTES, FIRST_READ_BYTES), CLIENT_LIMITS)
        self._start += fr.HEADER_BYTES
        frame = fr.parse_body(header, self._fill(header.body_len, header.body_len), CLIENT_LIMITS)
        self._start += header.body_len
        if header.payload_len:
            segments = sink(frame) if sink is not None else None
            if segments is None:
                self._discard(header.payload_len)
            else:
                for i, seg in enumerate(segments):
                    self._recv_exact(seg)
                    if on_segment is not None:
                        on_segment(frame, i)
        if isinstance(frame, fr.Error) and frame.request_id == 0:
            self.broken = True  # the server closes the connection after a connection-level error
        return frame

    def stale(self) -> bool:
        """Whether the server has closed this idle connection (its idle timeout) or sent something unasked (a
        deadline's ERROR): an idle connection has nothing to read, so anything readable means it is done."""
        if self.broken or self._start != self._end:
            return True
        if self._tls and self.sock.pending():  # type: ignore[attr-defined]
            return True
        try:
            readable, _, _ = select.select([self.sock], [], [], 0)
        except (OSError, ValueError):
            return True
        return bool(readable)

    def _discard(self, n: int) -> None:
        scratch = memoryview(bytearray(min(n, 1 << 20)))
        while n:
            take = min(n, len(scratch))
            self._recv_exact(scratch[:take])
            n -= take

    def close(self) -> None:
        self.broken = True
        try:
            self.sock.close()
        except OSError:
            pass
