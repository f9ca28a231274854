"""The real tiered store's events feed the index: a fabric node's RAM and disk tiers become routable."""

from __future__ import annotations

from pathlib import Path

from kvfabric.events import EventLog
from kvfabric.ids import TierId
from kvfabric.index.prefix_index import PrefixIndex
from kvfabric.index.router import Calibration, EngineLoad, RouteRequest, TierSpeed, make_policy
from kvfabric.store.config import StoreConfig
from kvfabric.store.tiered import TieredStore
from tests.blocks import SPEC, make_chain


def test_store_tiers_announce_blocks_to_the_index(tmp_path: Path) -> None:
    log = EventLog()
    store = TieredStore.open(StoreConfig(data_dir=tmp_path, node_id="node-1", fsync="none"), events=log)
    try:
        store.register_model(SPEC)
        chain = make_chain(12)
        store.put_many(chain)
        store.flush()
        idx = PrefixIndex()
        idx.apply_many(log.take_events())
        key = chain[0].key
        hashes = [b.key.prefix for b in chain]
        [m] = idx.match(key.namespace, key.model, hashes)
        assert (m.source, m.blocks) == ("node-1", 12)
        assert TierId("ram") in dict(m.media)

        cal = Calibration(prefill_tokens_per_s=1000.0, kv_bytes_per_token=SPEC.bytes_per_token,
                          tiers=(TierSpeed(TierId("ram"), 10e9), TierSpeed(TierId("disk"), 2e9)))  # fmt: skip
        req = RouteRequest(key.namespace, key.model, hashes, 12 * SPEC.block_size + 3, SPEC.block_size)
        d = make_policy("kvfabric", idx, cal).route(req, [EngineLoad("engine-a", 500), EngineLoad("engine-b")])
        assert (d.engine, d.local_blocks, d.fabric_blocks) == ("engine-b", 0, 12)

        store.delete(chain[5].key)
        idx.apply_many(log.take_events())
        assert idx.match(key.namespace, key.model, hashes)[0].blocks == 5
    finally:
        store.close()
