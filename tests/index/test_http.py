from __future__ import annotations

from fastapi import FastAPI
from fastapi.testclient import TestClient

from kvfabric.events import BlockStored
from kvfabric.ids import Namespace, TierId
from kvfabric.index.http import create_index_router
from kvfabric.index.router import Calibration, TierSpeed
from kvfabric.index.service import IndexService
from kvfabric.spec import ModelSpec

SPEC = ModelSpec(model="m", num_layers=2, kv_heads=2, head_dim=16, block_size=4)
NS = Namespace("default")
TOKENS = list(range(1000, 1040))  # 10 blocks


def client() -> tuple[TestClient, IndexService]:
    cal = Calibration(prefill_tokens_per_s=1000.0, kv_bytes_per_token=128, tiers=(TierSpeed(TierId("ram"), 1e9),))
    svc = IndexService(cal, models=[SPEC])
    app = FastAPI()
    app.include_router(create_index_router(svc))
    return TestClient(app), svc


def test_route_by_tokens_or_hashes_goes_where_the_prefix_is() -> None:
    c, svc = client()
    fp = SPEC.fingerprint()
    chain = svc.chain_for(NS, fp, TOKENS)
    svc.ingest([BlockStored("e2", TierId("gpu"), NS, fp, tuple(chain[:7]))])
    for name in ("e1", "e2", "e3"):
        assert c.put(f"/v1/engines/{name}/load", json={"pending_prefill_tokens": 0}).status_code == 200
    r = c.post("/v1/route", json={"model": fp.hex(), "tokens": TOKENS})
    assert r.status_code == 200, r.text
    assert r.json()["engine"] == "e2" and r.json()["local_blocks"] == 7 and r.json()["prefill_tokens"] == 12
    r = c.post("/v1/route", json={"model": fp.hex(), "hashes": [h.hex() for h in chain], "num_tokens": 40})
    assert r.json()["engine"] == "e2"
    # loads given with the request override the reported ones
    r = c.post("/v1/route", json={"model": fp.hex(), "tokens": TOKENS, "policy": "least-loaded",
                                  "engines": [{"engine": "e2", "pending_prefill_tokens": 50},
                                              {"engine": "e5", "pending_prefill_tokens": 0}]})  # fmt: skip
    assert r.json()["engine"] == "e5" and r.json()["policy"] == "least-loaded"


def test_match_stats_and_engine_removal() -> None:
    c, svc = client()
    fp = SPEC.fingerprint()
    chain = svc.chain_for(NS, fp, TOKENS)
    svc.ingest([BlockStored("e1", TierId("gpu"), NS, fp, tuple(chain[:3])),
                BlockStored("node", TierId("ram"), NS, fp, tuple(chain))])  # fmt: skip
    c.put("/v1/engines/e1/load", json={})
    m = c.post("/v1/index/match", json={"model": fp.hex(), "tokens": TOKENS}).json()
    assert m == {"blocks": 10, "matches": [{"source": "node", "blocks": 10, "media": {"ram": 10}},
                                           {"source": "e1", "blocks": 3, "media": {"gpu": 3}}]}  # fmt: skip
    stats = c.get("/v1/index/stats").json()
    assert stats["blocks"] == 10 and {"source": "e1", "medium": "gpu", "blocks": 3} in stats["locations"]
    assert c.delete("/v1/engines/e1").json() == {"engine": "e1", "blocks_dropped": 3}
    assert c.delete("/v1/engines/e1").status_code == 404
    m = c.post("/v1/index/match", json={"model": fp.hex(), "tokens": TOKENS}).json()
    assert [x["source"] for x in m["matches"]] == ["node"]


def test_bad_requests_get_clear_errors_and_change_nothing() -> None:
    c, svc = client()
    fp = SPEC.fingerprint().hex()
    assert c.post("/v1/route", json={"model": fp, "tokens": TOKENS}).status_code == 409  # no engines yet
    c.put("/v1/engines/e1/load", json={})
    cases = [
        ({"model": fp}, 422, "exactly one"),
        ({"model": fp, "tokens": TOKENS, "hashes": []}, 422, "exactly one"),
        ({"model": "00" * 32, "tokens": TOKENS}, 404, "unknown model"),
        ({"model": "xyz", "tokens": TOKENS}, 422, ""),
        ({"model": fp, "tokens": [-1]}, 422, ""),
        ({"model": fp, "tokens": TOKENS, "policy": "random"}, 422, "unknown routing policy"),
        ({"model": fp, "hashes": ["ab"]}, 422, ""),
    ]
    for body, status, text in cases:
        r = c.post("/v1/route", json=body)
        assert r.status_code == status, (body, r.text)
        assert text in r.text
    assert c.put("/v1/engines/e1/load", json={"pending_prefill_tokens": -5}).status_code == 422
    assert svc.stats()["blocks"] == 0 and [e.engine for e in svc.engines()] == ["e1"]
