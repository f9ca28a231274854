"""Reading leased blocks out of the server's RAM arena: by copying from the shared-memory mapping (same host) or
by NIXL one-sided reads. The caller releases the leases afterwards, whatever happened."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from kvfabric.client.buffers import Destination
from kvfabric.errors import ClientError
from kvfabric.transport import frames as fr
from kvfabric.transport.nixl import NixlClientEndpoint, ReadOp
from kvfabric.transport.shm import ArenaMap


@dataclass(slots=True)
class LeasedRead:
    lease_ids: list[int]
    elsewhere: list[int]  # indexes of blocks that exist but must be fetched over TCP
    metas: list[fr.WireMeta | None]


class LeasedReader:
    """Either ``arena`` (shared memory) or ``nixl`` + ``base_addr`` (the server arena's address) is set."""

    def __init__(
        self, arena: ArenaMap | None = None, nixl: NixlClientEndpoint | None = None, base_addr: int = 0
    ) -> None:
        self.arena = arena
        self.nixl = nixl
        self.base_addr = base_addr

    @property
    def kind(self) -> str:
        return "nixl" if self.nixl is not None else "shm"

    def read(self, entries: Sequence[fr.LeaseEntry], dests: Sequence[Destination | None]) -> LeasedRead:
        out = LeasedRead([], [], [None] * len(entries))
        ops: list[ReadOp] = []
        copies: list[tuple[Destination, fr.Lease]] = []
        for i, entry in enumerate(entries):
            if entry is None:
                continue
            out.metas[i] = entry.meta
            if isinstance(entry, fr.Elsewhere):
                out.elsewhere.append(i)
                continue
            out.lease_ids.append(entry.lease_id)
            dest = dests[i]
            n = entry.meta.nbytes
            if dest is None or len(dest.view) < n:
                raise ClientError(f"destination {i} is smaller than the block's {n} bytes")
            if self.nixl is not None:
                ops.append(ReadOp(dest.address, self.base_addr + entry.offset, n))
            else:
                copies.append((dest, entry))
        if self.nixl is not None:
            self.nixl.read(ops)
        else:
            assert self.arena is not None
            for dest, lease in copies:
                dest.view[: lease.meta.nbytes] = self.arena.view(lease.offset, lease.meta.nbytes)
        for i, entry in enumerate(entries):
            if isinstance(entry, fr.Lease):
                dest = dests[i]
                assert dest is not None
                dest.finish()
        return out

    def close(self) -> None:
        if self.nixl is not None:
            self.nixl.close()
        if self.arena is not None:
            self.arena.close()
