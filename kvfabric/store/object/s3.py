"""The boto3 edge: the one module that talks to S3 and the only one that sees botocore's exceptions.

Transient failures (connection refused/reset, timeouts, 5xx, throttling) are retried by botocore's ``standard``
retry mode (exponential backoff with full jitter, ``max_attempts`` tries); what still fails leaves this module as
``TierUnavailableError``. Anything else (access denied, no such bucket, no credentials) is a ``StoreError`` that
names the bucket and key. A missing object is not an error here: reads return ``None``.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import boto3
import boto3.s3.transfer
import botocore.config
import botocore.exceptions as bx

from kvfabric.errors import ConfigError, StoreError, TierUnavailableError
from kvfabric.store.object.config import ObjectTierConfig

_TRANSIENT_CODES = frozenset({
    "RequestTimeout", "RequestTimeoutException", "SlowDown", "ServiceUnavailable", "InternalError", "Throttling",
    "ThrottlingException", "RequestLimitExceeded", "BandwidthLimitExceeded", "TooManyRequestsException",
    "PriorRequestNotComplete", "OperationAborted",
})  # fmt: skip
_NOT_FOUND_CODES = frozenset({"NoSuchKey", "404", "NotFound"})
_UNREACHABLE = (
    bx.EndpointConnectionError, bx.ConnectTimeoutError, bx.ReadTimeoutError, bx.ConnectionClosedError,
    bx.ResponseStreamingError, bx.IncompleteReadError, bx.HTTPClientError,
)  # fmt: skip
_DELETE_BATCH = 1000  # DeleteObjects' limit


class _NotFound(Exception):
    """Raised inside this module only, turned into a ``None`` result."""


class ObjectStore:
    """A bucket seen through boto3. Thread-safe (boto3 clients are); creating one does no network I/O."""

    def __init__(self, config: ObjectTierConfig, *, session: boto3.session.Session | None = None) -> None:
        self.bucket = config.bucket
        self.endpoint = config.endpoint_url or "AWS S3"
        self._extra = {"StorageClass": config.storage_class} if config.storage_class else {}
        try:
            if session is None:
                session = boto3.session.Session(
                    aws_access_key_id=config.access_key_id, aws_secret_access_key=config.secret_access_key,
                    profile_name=config.profile, region_name=config.region,
                )  # fmt: skip
            self._client = session.client(
                "s3",
                endpoint_url=config.endpoint_url,
                region_name=config.region,
                config=botocore.config.Config(
                    retries={"mode": "standard", "max_attempts": config.max_attempts},
                    connect_timeout=config.connect_timeout_s,
                    read_timeout=config.read_timeout_s,
                    max_pool_connections=max(10, 2 * config.max_concurrency),
                    s3={"addressing_style": config.addressing_style},
                ),
            )
        except bx.ProfileNotFound as exc:
            raise ConfigError(f"object.profile {config.profile!r} is not in the AWS config files") from exc
        except bx.BotoCoreError as exc:
            raise ConfigError(f"cannot build an S3 client for {self.endpoint}: {exc}") from exc
        self._transfer = boto3.s3.transfer.TransferConfig(
            multipart_threshold=max(config.segment_bytes, 8 << 20), max_concurrency=config.max_concurrency
        )

    @contextmanager
    def _edge(self, op: str, key: str = "") -> Iterator[None]:
        where = f"s3://{self.bucket}/{key}"
        try:
            yield
        except bx.ClientError as exc:
            err = exc.response.get("Error", {})
            code = str(err.get("Code", ""))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)
            if code in _NOT_FOUND_CODES:
                raise _NotFound(where) from exc
            if code in _TRANSIENT_CODES or status >= 500:
                raise TierUnavailableError(
                    f"object store {self.endpoint}: {op} {where} still failing after retries: {code} {status}"
                ) from exc
            raise StoreError(
                f"object store {self.endpoint}: {op} {where} failed: {code} {err.get('Message', '')}"
            ) from exc
        except _UNREACHABLE as exc:
            raise TierUnavailableError(f"object store {self.endpoint} unreachable during {op} {where}: {exc}") from exc
        except (bx.NoCredentialsError, bx.PartialCredentialsError) as exc:
            raise StoreError(
                f"no usable S3 credentials for {op} {where}: boto3's chain (AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, "
                f"AWS_PROFILE, config files, instance role) found none: {exc}"
            ) from exc
        except bx.BotoCoreError as exc:
            raise StoreError(f"object store {self.endpoint}: {op} {where} failed: {exc}") from exc
        except OSError as exc:  # a socket error surfacing while a body streams
            raise TierUnavailableError(f"object store {self.endpoint}: {op} {where} broke off: {exc}") from exc

    # --- bucket --------------------------------------------------------------------------------------------------
    def ensure_bucket(self, create: bool) -> None:
        """Check the bucket exists (creating it when ``create``); ``StoreError`` naming it otherwise."""
        try:
            with self._edge("HeadBucket"):
                self._client.head_bucket(Bucket=self.bucket)
            return
        except _NotFound:
            if not create:
                raise StoreError(f"bucket {self.bucket!r} does not exist at {self.endpoint}") from None
        with self._edge("CreateBucket"):
            self._client.create_bucket(Bucket=self.bucket)

    # --- writes --------------------------------------------------------------------------------------------------
    def put(self, key: str, data: bytes | bytearray | memoryview) -> None:
        with self._edge("PutObject", key):
            self._client.put_object(Bucket=self.bucket, Key=key, Body=bytes(data) if isinstance(data, memoryview)
                                    else data, **self._extra)  # fmt: skip

    def upload_file(self, path: Path, key: str) -> None:
        """Upload a local file as-is (multipart above the segment size)."""
        with self._edge("UploadFile", key):
            self._client.upload_file(str(path), self.bucket, key, ExtraArgs=self._extra or None, Config=self._transfer)

    def delete(self, keys: Sequence[str]) -> None:
        for i in range(0, len(keys), _DELETE_BATCH):
            batch = keys[i : i + _DELETE_BATCH]
            with self._edge("DeleteObjects", batch[0]):
                out = self._client.delete_objects(
                    Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in batch], "Quiet": True}
                )
            errors = [e for e in out.get("Errors", []) if e.get("Code") not in _NOT_FOUND_CODES]
            if errors:
                raise StoreError(f"object store {self.endpoint}: deleting {len(errors)} objects failed: {errors[:3]}")

    # --- reads ---------------------------------------------------------------------------------------------------
    def get(self, key: str) -> bytes | None:
        """The whole object, or ``None`` when it does not exist."""
        try:
            with self._edge("GetObject", key):
                return self._client.get_object(Bucket=self.bucket, Key=key)["Body"].read()  # type: ignore[no-any-return]
        except _NotFound:
            return None

    def get_range(self, key: str, start: int, length: int) -> bytes | None:
        """``length`` bytes from ``start`` by one ranged GET; shorter when the object is; ``None`` when missing."""
        try:
            with self._edge("GetObject(range)", key):
                try:
                    resp = self._client.get_object(Bucket=self.bucket, Key=key, Range=_range(start, length))
                except bx.ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                        return b""  # the object ends before the range starts
                    raise
                return resp["Body"].read()  # type: ignore[no-any-return]
        except _NotFound:
            return None

    def read_range_into(self, key: str, start: int, parts: Sequence[memoryview]) -> int | None:
        """Fill ``parts`` in order from one ranged GET of their total length, straight from the socket.

        Returns the bytes read (less than the total when the object is shorter), or ``None`` when it is missing.
        """
        total = sum(len(p) for p in parts)
        try:
            with self._edge("GetObject(range)", key):
                try:
                    body = self._client.get_object(Bucket=self.bucket, Key=key, Range=_range(start, total))["Body"]
                except bx.ClientError as exc:
                    if exc.response.get("Error", {}).get("Code") == "InvalidRange":
                        return 0
                    raise
                readinto = getattr(body, "readinto", None) or _copying_readinto(body)
                done = 0
                try:
                    for part in parts:
                        filled = 0
                        while filled < len(part):
                            n = readinto(part[filled:])
                            if not n:
                                return done + filled
                            filled += n
                        done += filled
                finally:
                    body.close()
                return done
        except _NotFound:
            return None

    def list_keys(self, prefix: str) -> list[str]:
        """Every key under ``prefix``, in S3's (lexicographic) order."""
        keys: list[str] = []
        with self._edge("ListObjectsV2", prefix):
            for page in self._client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys.extend(obj["Key"] for obj in page.get("Contents", []))
        return keys


def _copying_readinto(body: Any) -> Callable[[memoryview], int]:
    """``readinto`` for botocore before 1.38.x's ``StreamingBody.readinto``: one copy per read."""

    def readinto(out: memoryview) -> int:
        data = body.read(len(out))
        out[: len(data)] = data
        return len(data)

    return readinto


def _range(start: int, length: int) -> str:
    return f"bytes={start}-{start + length - 1}"
