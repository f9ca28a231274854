"""Publishing kvfabric's KV events over ZMQ (the same framing vLLM uses): an :class:`~kvfabric.events.EventSink`.

Events are buffered and sent as one batch per :meth:`ZmqEventPublisher.flush` (or when ``max_batch`` is reached),
``[topic, seq as 8-byte big-endian, encode_batch(events)]``. PUB/SUB drops what no subscriber is connected for;
the sequence numbers let a subscriber see that it missed batches. Cluster-wide durable delivery is NATS
JetStream's job (DESIGN.md); this is the light, local path.
"""

from __future__ import annotations

import threading
import time
from typing import Self

import zmq

from kvfabric.events import KVEvent, encode_batch


class ZmqEventPublisher:
    """Thread-safe: the store's tiers may publish from worker threads."""

    def __init__(
        self,
        endpoint: str,
        *,
        bind: bool = False,
        topic: bytes = b"kvfabric",
        max_batch: int = 1024,
        context: zmq.Context | None = None,
    ) -> None:
        if max_batch <= 0:
            raise ValueError("max_batch must be positive")
        self._ctx = context or zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.PUB)
        self._sock.setsockopt(zmq.LINGER, 0)
        try:
            if bind:
                self._sock.bind(endpoint)
            else:
                self._sock.connect(endpoint)
        except zmq.ZMQError as exc:
            self._sock.close()
            raise OSError(f"cannot {'bind' if bind else 'connect'} KV event publisher {endpoint}: {exc}") from exc
        self.endpoint = self._sock.getsockopt_string(zmq.LAST_ENDPOINT) if bind else endpoint
        self._topic = topic
        self._max_batch = max_batch
        self._buffer: list[KVEvent] = []
        self._seq = 0
        self._lock = threading.Lock()
        self._closed = False

    def publish(self, event: KVEvent) -> None:
        with self._lock:
            if self._closed:
                raise RuntimeError("KV event publisher is closed")
            self._buffer.append(event)
            if len(self._buffer) >= self._max_batch:
                self._send_locked()

    def flush(self) -> int:
        """Send what is buffered as one batch; returns the batch's sequence number, or -1 if nothing was sent."""
        with self._lock:
            return self._send_locked()

    def _send_locked(self) -> int:
        if not self._buffer:
            return -1
        seq = self._seq
        payload = encode_batch(self._buffer, seq, time.time())
        self._sock.send_multipart((self._topic, seq.to_bytes(8, "big", signed=True), payload))
        self._buffer = []
        self._seq += 1
        return seq

    def close(self) -> None:
        with self._lock:
            if not self._closed:
                self._send_locked()
                self._closed = True
                self._sock.close(linger=0)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
