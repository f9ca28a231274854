"""Where one record lies in a segment: the row both the disk tier (sealed segments) and the object tier
(manifests) speak, declared once."""

from __future__ import annotations

from dataclasses import dataclass

from kvfabric.ids import BlockKey
from kvfabric.record import BlockMeta, RecordHeader


@dataclass(frozen=True, slots=True)
class SegmentEntry:
    """One record inside a segment file or object: the bytes ``[offset, offset + record_len)``.

    What the disk tier lists for a sealed segment and what an object manifest row holds, so a disk tier's entries
    can be passed to ``ObjectTier.upload_segment_file`` as they are (``stored_ns=0`` there means "now").
    """

    key: BlockKey
    offset: int
    record_len: int
    """Header plus stored payload; the zero padding after it is not included."""
    header_len: int
    """The stored payload is ``[offset + header_len, offset + record_len)``."""
    checksum: int
    """XXH3-64 of the stored payload (also in the record header)."""
    meta: BlockMeta
    stored_ns: int = 0
    """When the put happened: orders puts against tombstones at rebuild."""

    def __post_init__(self) -> None:
        if self.key != self.meta.key:
            raise ValueError(f"segment entry key {self.key} differs from its meta's key {self.meta.key}")
        if self.offset < 0 or not 0 < self.header_len <= self.record_len:
            raise ValueError(f"segment entry for {self.key}: bad offset/lengths {self.offset}/{self.header_len}/"
                             f"{self.record_len}")  # fmt: skip

    @property
    def payload_len(self) -> int:
        """Stored (possibly compressed) payload bytes."""
        return self.record_len - self.header_len

    @classmethod
    def from_header(cls, header: RecordHeader, offset: int, stored_ns: int = 0) -> SegmentEntry:
        m = header.meta
        return cls(m.key, offset, header.record_len, header.header_len, header.payload_checksum, m, stored_ns)
