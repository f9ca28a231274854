"""Segment manifests and tombstone lists: the Parquet objects that make a bucket self-describing.

A manifest lists every record in one segment object (where it is, how long, its checksum, what it is); uploading
it is the commit point of the segment. A tombstone list names keys deleted at a given time. Rebuilding the index is
reading all of both and letting the latest stamp per key win (``docs/object-format.md``).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass

import pyarrow as pa
import pyarrow.parquet as pq

from kvfabric.errors import MalformedRecordError
from kvfabric.ids import HASH_BYTES, BlockKey, PrefixHash
from kvfabric.record import BlockMeta
from kvfabric.spec import DType
from kvfabric.store.entry import SegmentEntry

MANIFEST_FORMAT = b"kvfabric.manifest/1"
TOMBSTONE_FORMAT = b"kvfabric.tombstones/1"
_FORMAT_KEY = b"kvfabric.format"

MANIFEST_SCHEMA = pa.schema(
    [
        ("key", pa.binary()),  # BlockKey.to_bytes(): the canonical key; the next three repeat it for query tools
        ("namespace", pa.string()),
        ("model", pa.binary(HASH_BYTES)),
        ("prefix", pa.binary(HASH_BYTES)),
        ("parent", pa.binary(HASH_BYTES)),
        ("offset", pa.uint64()),  # of the record inside the segment object
        ("record_len", pa.uint64()),  # header + stored payload
        ("header_len", pa.uint64()),  # the stored payload starts this far into the record
        ("checksum", pa.uint64()),  # XXH3-64 of the stored payload, as in the record header
        ("dtype", pa.string()),
        ("shape", pa.list_(pa.uint32())),
        ("token_count", pa.uint32()),
        ("created_ms", pa.int64()),  # the block's own creation time (from its record)
        ("stored_ns", pa.int64()),  # when the put happened: orders puts against tombstones at rebuild
    ]
)
TOMBSTONE_SCHEMA = pa.schema([("key", pa.binary()), ("deleted_ns", pa.int64())])


def _to_parquet(table: pa.Table) -> bytes:
    sink = io.BytesIO()
    pq.write_table(table, sink, compression="zstd", write_page_checksum=True)
    return sink.getvalue()


def _from_parquet(data: bytes, fmt: bytes, schema: pa.Schema, what: str) -> pa.Table:
    try:
        table = pq.read_table(io.BytesIO(data), page_checksum_verification=True)
    except (pa.ArrowException, OSError) as exc:
        raise MalformedRecordError(f"{what} is not readable Parquet: {exc}") from exc
    found = (table.schema.metadata or {}).get(_FORMAT_KEY)
    if found != fmt:
        raise MalformedRecordError(f"{what} has format {found!r}, expected {fmt!r}")
    if not table.schema.remove_metadata().equals(schema):
        raise MalformedRecordError(f"{what} has schema {table.schema.remove_metadata()}, expected {schema}")
    return table


def encode_manifest(entries: Sequence[SegmentEntry], *, segment_id: str, segment_bytes: int) -> bytes:
    """Parquet bytes listing ``entries`` of segment ``segment_id`` (an object of ``segment_bytes`` bytes)."""
    metas = [e.meta for e in entries]
    columns = {
        "key": [m.key.to_bytes() for m in metas],
        "namespace": [m.key.namespace for m in metas],
        "model": [m.key.model for m in metas],
        "prefix": [m.key.prefix for m in metas],
        "parent": [m.parent for m in metas],
        "offset": [e.offset for e in entries],
        "record_len": [e.record_len for e in entries],
        "header_len": [e.header_len for e in entries],
        "checksum": [e.checksum for e in entries],
        "dtype": [m.dtype.name.lower() for m in metas],
        "shape": [list(m.shape) for m in metas],
        "token_count": [m.token_count for m in metas],
        "created_ms": [m.created_ms for m in metas],
        "stored_ns": [e.stored_ns for e in entries],
    }
    metadata = {
        _FORMAT_KEY: MANIFEST_FORMAT,
        b"kvfabric.segment_id": segment_id.encode(),
        b"kvfabric.segment_bytes": str(segment_bytes).encode(),
    }
    return _to_parquet(pa.table(columns, schema=MANIFEST_SCHEMA.with_metadata(metadata)))


@dataclass(frozen=True, slots=True)
class Manifest:
    segment_id: str
    segment_bytes: int
    entries: list[SegmentEntry]


def decode_manifest(data: bytes, what: str = "manifest") -> Manifest:
    """Inverse of :func:`encode_manifest`; ``MalformedRecordError`` (naming ``what``) on anything inconsistent."""
    table = _from_parquet(data, MANIFEST_FORMAT, MANIFEST_SCHEMA, what)
    meta = table.schema.metadata or {}
    try:
        segment_id = meta[b"kvfabric.segment_id"].decode()
        segment_bytes = int(meta[b"kvfabric.segment_bytes"])
    except (KeyError, ValueError, UnicodeDecodeError) as exc:
        raise MalformedRecordError(f"{what} lacks its segment id/size: {exc}") from exc
    cols = table.to_pydict()
    entries: list[SegmentEntry] = []
    for i in range(table.num_rows):
        try:
            key = BlockKey.from_bytes(cols["key"][i])
            if (key.namespace, key.model, key.prefix) != (cols["namespace"][i], cols["model"][i], cols["prefix"][i]):
                raise ValueError("key columns disagree")
            meta_i = BlockMeta(
                key, DType[cols["dtype"][i].upper()], tuple(cols["shape"][i]), cols["token_count"][i],
                PrefixHash(cols["parent"][i]), cols["created_ms"][i],
            )  # fmt: skip
            entry = SegmentEntry(
                key, cols["offset"][i], cols["record_len"][i], cols["header_len"][i], cols["checksum"][i], meta_i,
                cols["stored_ns"][i],
            )  # fmt: skip
        except (KeyError, ValueError, TypeError) as exc:
            raise MalformedRecordError(f"{what} row {i}: {exc!r}") from exc
        if entry.offset + entry.record_len > segment_bytes:
            raise MalformedRecordError(f"{what} row {i}: record [{entry.offset}, +{entry.record_len}) outside segment")
        entries.append(entry)
    return Manifest(segment_id, segment_bytes, entries)


def encode_tombstones(deleted: Sequence[tuple[BlockKey, int]]) -> bytes:
    """Parquet bytes naming each deleted key with the time (ns) of its delete."""
    table = pa.table(
        {"key": [k.to_bytes() for k, _ in deleted], "deleted_ns": [ns for _, ns in deleted]},
        schema=TOMBSTONE_SCHEMA.with_metadata({_FORMAT_KEY: TOMBSTONE_FORMAT}),
    )
    return _to_parquet(table)


def decode_tombstones(data: bytes, what: str = "tombstone list") -> list[tuple[BlockKey, int]]:
    table = _from_parquet(data, TOMBSTONE_FORMAT, TOMBSTONE_SCHEMA, what)
    cols = table.to_pydict()
    try:
        return [(BlockKey.from_bytes(k), ns) for k, ns in zip(cols["key"], cols["deleted_ns"], strict=True)]
    except ValueError as exc:
        raise MalformedRecordError(f"{what}: {exc}") from exc
