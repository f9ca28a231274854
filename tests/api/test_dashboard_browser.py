"""The dashboard in a real headless Chromium against a live server holding data: the numbers on the page are the
numbers /v1/stats returns, the charts draw, and a screenshot is saved for people to look at."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path
from typing import Any

import httpx
import pytest
from kvfabric.store.tiered import TieredStore

from kvfabric.api.app import create_app
from kvfabric.config import Settings
from kvfabric.record import Block
from tests.api.conftest import TOKENS, LiveServer, bearer
from tests.blocks import make_chain

CHROMIUM = os.environ.get("KVFABRIC_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
playwright = pytest.importorskip("playwright.sync_api", reason="pip install playwright (no browser download needed)")
pytestmark = pytest.mark.skipif(CHROMIUM is None, reason="needs Chromium (Debian package 'chromium')")
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
    "--disable-sync", "--disable-dev-shm-usage",
]  # fmt: skip


def expected(stats: dict[str, Any], el: dict[str, Any]) -> Any:
    """The /v1/stats value an element with data-field (and data-tier / data-namespace / data-fingerprint) shows."""
    field = el["field"]
    if el.get("tier"):
        return next(t for t in stats["tiers"] if t["tier"] == el["tier"])[field]
    if el.get("namespace"):
        ns = next(n for n in stats["namespaces"] if n["namespace"] == el["namespace"])
        if el.get("fingerprint"):
            return next(m for m in ns["models"] if m["fingerprint"] == el["fingerprint"])[field]
        value: Any = ns
        for part in field.split("."):
            value = value[part]
        return value
    value = stats
    for part in field.split("."):
        value = value[part]
    return value


def shown_text(value: Any, fmt: str) -> str | None:
    """The text the page must show for counts and percentages (byte sizes are checked through data-value)."""
    if value is None:
        return "–"
    if fmt == "count":
        return f"{value:,}"
    if fmt == "pct":
        return f"{100 * value:.1f} %"
    return None


def load_dashboard(url: str, shot: Path) -> tuple[list[dict[str, Any]], list[str], str]:
    """Open the dashboard in headless Chromium, wait for its first render and charts, save a full-page screenshot;
    return every number element (its data attributes and text), page errors, and the final address."""
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            errors: list[str] = []
            page.on("pageerror", lambda exc: errors.append(str(exc)))
            page.goto(url)
            page.wait_for_selector("body[data-ready='1']", timeout=30_000)
            page.wait_for_selector("#chart-hit-rate path[data-series]", state="attached", timeout=30_000)
            page.wait_for_selector("#chart-throughput path[data-series]", state="attached", timeout=30_000)
            shown = page.eval_on_selector_all(
                "[data-field]",
                """els => els.map(e => ({field: e.dataset.field, tier: e.dataset.tier,
                    namespace: e.dataset.namespace, fingerprint: e.dataset.fingerprint,
                    value: e.dataset.value, format: e.dataset.format, text: e.textContent}))""",
            )
            page.screenshot(path=str(shot), full_page=True)
            return shown, errors, page.url
        finally:
            browser.close()


def test_dashboard_shows_the_numbers_of_v1_stats(
    store: TieredStore, settings: Settings, blocks: dict[str, list[Block]], tmp_path: Path
) -> None:
    # Traffic before the page loads: hits in RAM, misses, more puts, so every number is non-trivial.
    for b in blocks["a"][:4]:
        assert store.get(b.key) is not None
    for b in make_chain(3, namespace="tenant-a", seed=77):
        assert store.get(b.key) is None

    shot = tmp_path / "dashboard.png"
    with LiveServer(create_app(store, settings)) as url, httpx.Client(base_url=url, headers=bearer("admin")) as http:
        # Traffic over several sampling intervals, so the over-time charts have something to draw; then quiet.
        deadline = time.monotonic() + 60
        n = 0
        while len(http.get("/v1/stats/history").json()["points"]) < 8:
            assert time.monotonic() < deadline, "the stats sampler produced no history"
            assert store.get(blocks["a"][n % 5].key) is not None
            if n % 3 == 0:
                assert store.get(make_chain(1, namespace="tenant-b", seed=1000 + n)[0].key) is None
            n += 1
            time.sleep(0.02)
        shown, errors, final_url = load_dashboard(f"{url}/#token={TOKENS['admin']['token']}", shot)
        # The page's numbers and this answer are read back to back; nothing writes to the store meanwhile.
        stats = http.get("/v1/stats").json()

    print(f"dashboard screenshot: {shot}")
    assert not errors, errors
    assert shot.stat().st_size > 10_000
    assert "token=" not in final_url  # the page takes the token out of the address bar
    rate_fields = {"read_bytes_per_s", "write_bytes_per_s"}  # move with every sample; checked for presence only
    checked = 0
    for el in shown:
        if el["field"] in rate_fields:
            continue
        want = expected(stats, el)
        assert json.loads(el["value"]) == pytest.approx(want), el
        text = shown_text(want, el["format"])
        if text is not None:
            assert el["text"] == text, el
        checked += 1
    fields = {(el.get("tier"), el["field"]) for el in shown}
    for tier in ("ram",):
        for f in ("blocks", "bytes", "hits", "misses", "hit_rate", "occupancy", "capacity_bytes"):
            assert (tier, f) in fields
    assert {el["namespace"] for el in shown if el.get("namespace")} == {"tenant-a", "tenant-b"}
    assert sum(1 for el in shown if el.get("fingerprint")) == 3 * 2  # three (namespace, model) rows, two numbers
    assert {"store.promotions", "store.quota_evictions", "store.writeback_pending.disk"} <= {
        el["field"] for el in shown
    }
    assert checked >= 35
