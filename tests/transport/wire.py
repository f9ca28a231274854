"""A raw-socket peer for tests that must send what no client would: frames over limits, partial frames, silence."""

from __future__ import annotations

import socket

from kvfabric.transport import frames as fr

CLIENT_LIMITS = fr.Limits(max_body_bytes=64 << 20, max_batch=1 << 20, max_block_bytes=1 << 40,
                          max_payload_bytes=1 << 44)  # fmt: skip


def recv_exact(sock: socket.socket, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = sock.recv(min(n - len(out), 1 << 20))
        if not chunk:
            raise EOFError(f"connection closed after {len(out)} of {n} bytes")
        out += chunk
    return bytes(out)


def read_frame(sock: socket.socket) -> fr.Frame:
    """One frame; its payload is read and dropped."""
    header = fr.parse_header(recv_exact(sock, fr.HEADER_BYTES), CLIENT_LIMITS)
    frame = fr.parse_body(header, recv_exact(sock, header.body_len), CLIENT_LIMITS)
    left = header.payload_len
    while left:
        left -= len(recv_exact(sock, min(left, 1 << 20)))
    return frame


def closed_by_peer(sock: socket.socket) -> bool:
    """Whether the server closes the connection within the socket's timeout (frames it sent first are dropped)."""
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        return True
    except TimeoutError:
        return False
    return True


def connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def hello(sock: socket.socket, token: str | None = None) -> fr.HelloOk:
    sock.sendall(fr.encode_hello(1, token, {}, []))
    reply = read_frame(sock)
    assert isinstance(reply, fr.HelloOk), reply
    return reply
