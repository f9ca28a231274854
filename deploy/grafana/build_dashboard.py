"""Builds ``kvfabric-dashboard.json`` (Grafana) from the panel list below; edit here, then run
``python deploy/grafana/build_dashboard.py`` from the repository root. A test checks the JSON is up to date and that
every metric a panel queries exists on ``/metrics``."""

import json
from pathlib import Path

OUT = Path(__file__).with_name("kvfabric-dashboard.json")
DS = {"type": "prometheus", "uid": "${datasource}"}
SEL = 'instance=~"$instance"'
panels = []
pid = [0]


def panel(title, kind, targets, unit, x, y, w=12, h=8, extra=None, desc=""):
    pid[0] += 1
    p = {
        "id": pid[0],
        "type": kind,
        "title": title,
        "description": desc,
        "datasource": DS,
        "gridPos": {"x": x, "y": y, "w": w, "h": h},
        "targets": [
            {"datasource": DS, "expr": e, "legendFormat": l, "refId": chr(65 + i)} for i, (e, l) in enumerate(targets)
        ],
        "fieldConfig": {"defaults": {"unit": unit}, "overrides": []},
        "options": {},
    }
    if kind == "timeseries":
        p["fieldConfig"]["defaults"]["custom"] = {"lineWidth": 2, "fillOpacity": 10}
        p["options"] = {
            "legend": {"displayMode": "table", "placement": "right", "calcs": ["lastNotNull"]},
            "tooltip": {"mode": "multi"},
        }
    if extra:
        for k, v in extra.items():
            p[k] = v
    panels.append(p)


def row(title, y):
    pid[0] += 1
    panels.append(
        {
            "id": pid[0],
            "type": "row",
            "title": title,
            "collapsed": False,
            "gridPos": {"x": 0, "y": y, "w": 24, "h": 1},
            "panels": [],
        }
    )


S = "{" + SEL + "}"
row("Tiers", 0)
panel(
    "Tier occupancy",
    "bargauge",
    [(f"kvfabric_tier_stored_bytes{S} / kvfabric_tier_capacity_bytes{S}", "{{instance}} {{tier}}")],
    "percentunit",
    0,
    1,
    8,
    8,
    {
        "options": {
            "orientation": "horizontal",
            "displayMode": "gradient",
            "reduceOptions": {"calcs": ["lastNotNull"]},
        },
        "fieldConfig": {
            "defaults": {
                "unit": "percentunit",
                "min": 0,
                "max": 1,
                "thresholds": {
                    "mode": "absolute",
                    "steps": [
                        {"color": "green", "value": None},
                        {"color": "orange", "value": 0.85},
                        {"color": "red", "value": 0.95},
                    ],
                },
            },
            "overrides": [],
        },
    },
    "Stored bytes / capacity per tier",
)
panel(
    "Stored bytes per tier",
    "timeseries",
    [(f"sum by (tier) (kvfabric_tier_stored_bytes{S})", "{{tier}}")],
    "bytes",
    8,
    1,
    8,
    8,
)
panel("Blocks per tier", "timeseries", [(f"sum by (tier) (kvfabric_tier_blocks{S})", "{{tier}}")], "short", 16, 1, 8, 8)

row("Hits and throughput", 9)
hits = f"sum by (tier) (rate(kvfabric_tier_hits_total{S}[$__rate_interval]))"
misses = f"sum by (tier) (rate(kvfabric_tier_misses_total{S}[$__rate_interval]))"
panel(
    "Hit rate per tier",
    "timeseries",
    [(f"{hits} / ({hits} + {misses})", "{{tier}}")],
    "percentunit",
    0,
    10,
    12,
    8,
    desc="hits / (hits + misses) of each tier",
)
panel(
    "Read / write throughput",
    "timeseries",
    [
        (f"sum by (tier) (rate(kvfabric_tier_read_bytes_total{S}[$__rate_interval]))", "read {{tier}}"),
        (f"sum by (tier) (rate(kvfabric_tier_written_bytes_total{S}[$__rate_interval]))", "write {{tier}}"),
    ],
    "Bps",
    12,
    10,
    12,
    8,
)

row("Latency", 18)
for i, (op, metric) in enumerate((("Get", "kvfabric_get_seconds"), ("Put", "kvfabric_put_seconds"))):
    panel(
        f"{op} latency p50 / p99 by tier",
        "timeseries",
        [
            (
                f"histogram_quantile(0.5, sum by (le, tier) (rate({metric}_bucket{S}[$__rate_interval])))",
                "p50 {{tier}}",
            ),
            (
                f"histogram_quantile(0.99, sum by (le, tier) (rate({metric}_bucket{S}[$__rate_interval])))",
                "p99 {{tier}}",
            ),
        ],
        "s",
        12 * i,
        19,
        12,
        8,
    )

row("Tenants", 27)
bar = {"options": {"orientation": "horizontal", "displayMode": "basic", "reduceOptions": {"calcs": ["lastNotNull"]}}}
panel(
    "Top namespaces by bytes",
    "bargauge",
    [(f"topk(10, sum by (namespace) (kvfabric_namespace_stored_bytes{S}))", "{{namespace}}")],
    "bytes",
    0,
    28,
    12,
    8,
    bar,
)
panel(
    "Top models by bytes",
    "bargauge",
    [(f"topk(10, sum by (model, fingerprint) (kvfabric_model_stored_bytes{S}))", "{{model}} {{fingerprint}}")],
    "bytes",
    12,
    28,
    12,
    8,
    bar,
)

row("Health", 36)
panel(
    "Upload backlog",
    "timeseries",
    [(f"kvfabric_upload_backlog_bytes{S}", "{{instance}}")],
    "bytes",
    0,
    37,
    8,
    8,
    desc="bytes accepted by the object tier, not uploaded yet",
)
panel(
    "Evictions and corrupt blocks",
    "timeseries",
    [
        (f"sum by (tier) (rate(kvfabric_tier_evictions_total{S}[$__rate_interval]))", "evictions {{tier}}"),
        (f"sum by (tier) (rate(kvfabric_tier_corrupt_blocks_total{S}[$__rate_interval]))", "corrupt {{tier}}"),
    ],
    "ops",
    8,
    37,
    8,
    8,
)
S5 = "{" + SEL + ', status=~"5.."}'
panel(
    "Errors and admin API failures",
    "timeseries",
    [
        (f"sum by (kind) (rate(kvfabric_errors_total{S}[$__rate_interval]))", "{{kind}}"),
        (f"sum by (status) (rate(kvfabric_admin_requests_total{S5}[$__rate_interval]))", "admin {{status}}"),
    ],
    "ops",
    16,
    37,
    8,
    8,
)

row("Store", 45)
panel(
    "Write-back queue",
    "timeseries",
    [(f"sum by (tier) (kvfabric_writeback_pending_blocks{S})", "{{tier}}")],
    "short",
    0,
    46,
    8,
    8,
    desc="blocks waiting to be copied to a write-back tier",
)
panel(
    "Promotions, demotions, quota and TTL",
    "timeseries",
    [
        (f"sum(rate(kvfabric_store_promotions_total{S}[$__rate_interval]))", "promotions"),
        (f"sum(rate(kvfabric_store_demotions_total{S}[$__rate_interval]))", "demotions"),
        (f"sum(rate(kvfabric_store_quota_evictions_total{S}[$__rate_interval]))", "quota evictions"),
        (f"sum(rate(kvfabric_store_expired_blocks_total{S}[$__rate_interval]))", "expired"),
    ],
    "ops",
    8,
    46,
    8,
    8,
)
panel(
    "Write-back failures",
    "timeseries",
    [
        (f"sum(rate(kvfabric_store_flush_errors_total{S}[$__rate_interval]))", "flush errors"),
        (f"sum(rate(kvfabric_store_writeback_dropped_total{S}[$__rate_interval]))", "dropped copies"),
        (f"sum(rate(kvfabric_store_unavailable_total{S}[$__rate_interval]))", "tier unavailable"),
    ],
    "ops",
    16,
    46,
    8,
    8,
)

dash = {
    "title": "kvfabric",
    "uid": "kvfabric-overview",
    "tags": ["kvfabric"],
    "schemaVersion": 39,
    "version": 1,
    "editable": True,
    "graphTooltip": 1,
    "refresh": "30s",
    "time": {"from": "now-1h", "to": "now"},
    "timezone": "browser",
    "templating": {
        "list": [
            {
                "name": "datasource",
                "type": "datasource",
                "query": "prometheus",
                "label": "Prometheus",
                "current": {},
                "hide": 0,
            },
            {
                "name": "instance",
                "type": "query",
                "datasource": DS,
                "label": "node",
                "query": {"query": "label_values(kvfabric_start_time_seconds, instance)", "refId": "instance"},
                "definition": "label_values(kvfabric_start_time_seconds, instance)",
                "includeAll": True,
                "multi": True,
                "allValue": ".*",
                "current": {},
                "refresh": 2,
                "hide": 0,
            },
        ]
    },
    "annotations": {"list": []},
    "panels": panels,
}


def render() -> str:
    return json.dumps(dash, indent=2) + "\n"


if __name__ == "__main__":
    OUT.write_text(render())
    print(f"wrote {OUT} ({len(panels)} panels)")
