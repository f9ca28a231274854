"""The whole kvfabric exception tree.

Foreign errors (RocksDB, boto3/botocore, sockets) are translated into these types once, at the edge of the
backend or transport that raised them, and re-raised with ``from exc`` so the cause stays visible.

    KVFabricError
    ├── InvalidBlockError          bad input to the store: wrong shape/dtype, oversized, unknown model
    │   ├── UnknownModelError
    │   ├── BlockTooLargeError
    │   └── QuotaExceededError     the block would take its namespace over its byte quota
    ├── RecordError                a stored/received record cannot be trusted
    │   ├── TruncatedRecordError
    │   ├── MalformedRecordError   bad magic, version, codec, dtype, header checksum
    │   └── ChecksumMismatchError  payload bytes do not match the header's checksum
    ├── StoreError                 a tier failed (I/O, full, unavailable)
    │   ├── TierFullError
    │   │   └── DiskFullError      the filesystem under the tier is out of space (not the tier's own capacity)
    │   └── TierUnavailableError
    ├── ProtocolError              the wire protocol was violated
    │   ├── FrameTooLargeError
    │   └── EventFormatError       a KV event batch (ours or an engine's) cannot be parsed
    ├── AuthError                  missing/invalid credentials, or a scope the token lacks
    ├── ClientError                a client-side failure (timeouts, connection loss)
    │   └── RemoteError            the server answered with an error
    └── ConfigError                invalid configuration
"""

from __future__ import annotations


class KVFabricError(Exception):
    """Base class of every error kvfabric raises on purpose."""


class InvalidBlockError(KVFabricError, ValueError):
    """A block offered to the store does not fit its model spec or the store's limits; nothing was stored."""


class UnknownModelError(InvalidBlockError):
    """The block's model fingerprint is not registered with the store."""

    def __init__(self, fingerprint_hex: str) -> None:
        super().__init__(f"unknown model fingerprint {fingerprint_hex}: register its ModelSpec first")
        self.fingerprint_hex = fingerprint_hex


class BlockTooLargeError(InvalidBlockError):
    """The block's payload exceeds the configured limit."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(f"block payload of {size} bytes exceeds the limit of {limit} bytes")
        self.size = size
        self.limit = limit


class QuotaExceededError(InvalidBlockError):
    """Storing the block would take its namespace over its byte quota and nothing evictable is left to make room.

    A limit the caller runs into, like ``BlockTooLargeError``, not a failing tier: nothing was stored or evicted,
    and retrying changes nothing until the namespace frees space (deletes, TTL expiry, unpins).
    """

    def __init__(self, namespace: str, needed: int, quota: int, evictable: int) -> None:
        super().__init__(
            f"namespace {namespace!r} needs {needed} bytes over its quota of {quota} bytes and only {evictable} "
            "bytes of its blocks can be evicted (the rest are pinned or being stored)"
        )
        self.namespace = namespace
        self.needed = needed
        self.quota = quota
        self.evictable = evictable


class LimitExceededError(KVFabricError):
    """A request over a configured count limit (models per tenant, models in a store); nothing was changed."""


class RecordError(KVFabricError):
    """A block record (on disk, in an object, on the wire) cannot be trusted; it must never be served."""


class TruncatedRecordError(RecordError):
    """The record ends before its header or payload does."""


class MalformedRecordError(RecordError):
    """The record's header is invalid: bad magic, unknown version/codec/dtype, or a header checksum mismatch."""


class ChecksumMismatchError(RecordError):
    """The payload bytes do not match the checksum in the header."""


class StoreError(KVFabricError):
    """A tier failed to carry out an operation."""


class TierFullError(StoreError):
    """The tier has no room for the block (capacity reached and nothing evictable, or the disk is full)."""


class DiskFullError(TierFullError):
    """The filesystem under a tier ran out of space (ENOSPC, a quota, a file-size limit): unlike a tier at its own
    capacity, evicting the tier's blocks is not the answer. Reads and deletes go on; writes resume by themselves
    once space is freed."""


class TierUnavailableError(StoreError):
    """The tier's backend cannot be reached (e.g. the object store is down)."""


class ProtocolError(KVFabricError):
    """The peer violated the wire protocol."""


class FrameTooLargeError(ProtocolError):
    """A frame exceeds the negotiated size limit; ``what`` names the limited quantity."""

    def __init__(self, size: int, limit: int, *, what: str = "frame") -> None:
        detail = f"frame of {size} bytes" if what == "frame" else f"{what} {size}"
        super().__init__(f"{detail} exceeds the limit of {limit}" + (" bytes" if what == "frame" else ""))
        self.size = size
        self.limit = limit
        self.what = what


class EventFormatError(ProtocolError, ValueError):
    """A serialised KV event batch is malformed or of an unknown version; nothing of it was applied."""


class AuthError(KVFabricError):
    """Missing or invalid credentials, or a token without the scope an operation needs."""


class ScopeError(AuthError):
    """A valid token without the scope (or namespace) an operation needs."""


class ClientError(KVFabricError):
    """A client-side failure: connection lost, timeout, retries exhausted."""


class RemoteError(ClientError):
    """The server answered a request with an error."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message


class ConfigError(KVFabricError, ValueError):
    """The configuration is invalid; the message names the key."""
