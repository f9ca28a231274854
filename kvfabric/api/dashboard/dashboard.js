// kvfabric ops dashboard: polls the admin API and draws plain HTML and inline SVG. No build step, no libraries.
// Every number shown carries data-field (and data-tier / data-namespace / data-fingerprint) plus data-value, the
// raw value from /v1/stats, so tests and scrapers can read exactly what is displayed.
"use strict";

(() => {
  const REFRESH_MS = 2000;
  const TOKEN_KEY = "kvfabric.token";
  const TIER_COLORS = { ram: "var(--ram)", disk: "var(--disk)", object: "var(--object)", gpu: "var(--gpu)" };
  const SVG_NS = "http://www.w3.org/2000/svg";
  const $ = (id) => document.getElementById(id);
  let token = null;

  // --- auth: token from the URL fragment (#token=...), else this tab's session, else the sign-in form ----------
  function initToken() {
    const m = location.hash.match(/token=([^&]+)/);
    if (m) {
      token = decodeURIComponent(m[1]);
      sessionStorage.setItem(TOKEN_KEY, token);
      history.replaceState(null, "", location.pathname + location.search); // keep the token out of history
    } else {
      token = sessionStorage.getItem(TOKEN_KEY);
    }
    $("login").addEventListener("submit", (ev) => {
      ev.preventDefault();
      token = $("token").value.trim() || null;
      if (token) sessionStorage.setItem(TOKEN_KEY, token);
      $("login").hidden = true;
      refresh();
    });
  }

  class HttpError extends Error {
    constructor(status, detail) { super(detail); this.status = status; }
  }

  async function getJSON(path) {
    const headers = token ? { Authorization: "Bearer " + token } : {};
    const res = await fetch(path, { headers, cache: "no-store" });
    if (!res.ok) {
      let detail = res.statusText;
      try { detail = (await res.json()).detail || detail; } catch (_) { /* not JSON */ }
      throw new HttpError(res.status, typeof detail === "string" ? detail : JSON.stringify(detail));
    }
    return res.json();
  }

  // --- formatting ---------------------------------------------------------------------------------------------
  function fmtBytes(n) {
    if (n === null || n === undefined) return "–";
    const units = ["B", "KiB", "MiB", "GiB", "TiB", "PiB"];
    let i = 0, v = n;
    while (Math.abs(v) >= 1024 && i < units.length - 1) { v /= 1024; i++; }
    return (i === 0 ? (Number.isInteger(v) ? String(v) : v.toFixed(2)) : v.toFixed(v >= 100 ? 0 : v >= 10 ? 1 : 2)) + " " + units[i];
  }
  const fmtCount = (n) => (n === null || n === undefined ? "–" : Number(n).toLocaleString("en-US"));
  const fmtPct = (r) => (r === null || r === undefined ? "–" : (100 * r).toFixed(1) + " %");
  const fmtRate = (n) => fmtBytes(n) + "/s";
  const fmtSeconds = (s) => {
    if (s === null || s === undefined) return "–";
    const d = Math.floor(s / 86400), h = Math.floor((s % 86400) / 3600), m = Math.floor((s % 3600) / 60);
    return d ? `${d}d ${h}h` : h ? `${h}h ${m}m` : m ? `${m}m ${Math.floor(s % 60)}s` : `${Math.floor(s)}s`;
  };
  const FORMAT = { bytes: fmtBytes, count: fmtCount, pct: fmtPct, rate: fmtRate, seconds: fmtSeconds };

  function el(tag, attrs = {}, text) {
    const e = document.createElement(tag);
    for (const [k, v] of Object.entries(attrs)) if (v !== undefined && v !== null) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }
  // An element showing one number: formatted text, the raw value in data-value.
  function num(tag, value, kind, attrs) {
    return el(tag, { ...attrs, "data-value": JSON.stringify(value), "data-format": kind }, FORMAT[kind](value));
  }
  function setNum(e, value, kind) {
    e.dataset.value = JSON.stringify(value);
    e.dataset.format = kind;
    e.textContent = FORMAT[kind](value);
  }

  // --- tiers, totals, tables ----------------------------------------------------------------------------------
  const TIER_ROWS = [
    ["blocks", "blocks", "count"], ["bytes", "stored", "bytes"], ["capacity_bytes", "capacity", "bytes"],
    ["hit_rate", "hit rate", "pct"], ["hits", "hits", "count"], ["misses", "misses", "count"],
    ["read_bytes_per_s", "read", "rate"], ["write_bytes_per_s", "write", "rate"],
    ["evictions", "evictions", "count"], ["corrupt", "corrupt", "count"],
  ];

  const NODE_ONLY = "node-wide: needs a token for all namespaces";

  function renderTiers(stats) {
    const box = $("tiers");
    box.replaceChildren();
    if (stats.view !== "node") { box.append(el("p", { class: "none", "data-view": stats.view }, "tiers: " + NODE_ONLY)); }
    for (const t of stats.tiers) {
      const card = el("div", { class: "card", "data-tier": t.tier });
      card.style.setProperty("--c", TIER_COLORS[t.tier] || "#888");
      card.append(el("h3", {}, t.tier));
      const bar = el("div", { class: "bar", title: "occupancy" });
      const fill = el("div");
      fill.style.width = (100 * Math.min(1, t.occupancy || 0)).toFixed(1) + "%";
      bar.append(fill);
      const occ = el("div", { class: "occ" });
      occ.append(el("span", {}, "occupancy"), num("span", t.occupancy, "pct", { "data-tier": t.tier, "data-field": "occupancy" }));
      const dl = el("dl");
      for (const [field, label, kind] of TIER_ROWS) {
        dl.append(el("dt", {}, label), num("dd", t[field], kind, { "data-tier": t.tier, "data-field": field }));
      }
      card.append(bar, occ, dl);
      box.append(card);
    }
  }

  const STORE_ROWS = [
    ["promotions", "promotions", "count"], ["demotions", "demotions", "count"],
    ["quota_evictions", "quota evictions", "count"], ["expired", "expired (TTL)", "count"],
    ["writeback_dropped", "write-back dropped", "count"], ["flush_errors", "flush errors", "count"],
    ["unavailable", "tier unavailable", "count"],
  ];

  function renderStore(stats) {
    const dl = $("store-counters");
    dl.replaceChildren();
    if (!stats.store) { dl.append(el("dd", { class: "none" }, NODE_ONLY)); return; }
    for (const [field, label, kind] of STORE_ROWS) {
      dl.append(el("dt", {}, label), num("dd", stats.store[field], kind, { "data-field": "store." + field }));
    }
    for (const [tier, n] of Object.entries(stats.store.writeback_pending)) {
      dl.append(el("dt", {}, `pending → ${tier}`),
        num("dd", n, "count", { "data-field": "store.writeback_pending." + tier }));
    }
  }

  function renderTotals(stats) {
    setNum($("total-blocks"), stats.totals.blocks, "count");
    setNum($("total-bytes"), stats.totals.bytes, "bytes");
    setNum($("total-hit-rate"), stats.totals.hit_rate, "pct");
    setNum($("upload-backlog"), stats.upload_backlog_bytes, "bytes");
    $("node-id").textContent = stats.node_id;
    $("version").textContent = stats.version;
    $("uptime").textContent = fmtSeconds(stats.uptime_s);
  }

  function renderTables(stats) {
    const nsBody = $("namespaces").tBodies[0];
    nsBody.replaceChildren();
    const namespaces = [...stats.namespaces].sort((a, b) => b.bytes - a.bytes).slice(0, 20);
    for (const ns of namespaces) {
      const a = { "data-namespace": ns.namespace };
      const tr = el("tr", a);
      tr.append(
        el("td", {}, ns.namespace),
        num("td", ns.blocks, "count", { ...a, "data-field": "blocks" }),
        num("td", ns.bytes, "bytes", { ...a, "data-field": "bytes" }),
        num("td", ns.policy.ttl_s, "seconds", { ...a, "data-field": "policy.ttl_s" }),
        num("td", ns.policy.quota_bytes, "bytes", { ...a, "data-field": "policy.quota_bytes" }),
      );
      nsBody.append(tr);
    }
    if (!namespaces.length) nsBody.append(emptyRow(5));

    const mBody = $("models").tBodies[0];
    mBody.replaceChildren();
    const models = stats.namespaces
      .flatMap((ns) => ns.models.map((m) => ({ ...m, namespace: ns.namespace })))
      .sort((a, b) => b.bytes - a.bytes)
      .slice(0, 20);
    for (const m of models) {
      const a = { "data-namespace": m.namespace, "data-fingerprint": m.fingerprint };
      const tr = el("tr", a);
      const name = el("td", { title: m.fingerprint }, m.model || m.fingerprint.slice(0, 16) + "…");
      tr.append(
        name,
        el("td", { class: "sub" }, m.namespace),
        num("td", m.blocks, "count", { ...a, "data-field": "blocks" }),
        num("td", m.bytes, "bytes", { ...a, "data-field": "bytes" }),
      );
      mBody.append(tr);
    }
    if (!models.length) mBody.append(emptyRow(4));
  }

  function emptyRow(cols) {
    const tr = el("tr");
    tr.append(el("td", { colspan: cols, class: "sub" }, "no blocks yet"));
    return tr;
  }

  function renderErrors(entries, denied) {
    const ul = $("errors");
    ul.replaceChildren();
    if (denied) { ul.append(el("li", { class: "none" }, denied)); return; }
    if (!entries.length) { ul.append(el("li", { class: "none" }, "none")); return; }
    for (const e of [...entries].reverse().slice(0, 50)) {
      const li = el("li", { "data-kind": e.kind });
      li.append(
        el("span", { class: "when" }, new Date(e.time * 1000).toLocaleTimeString()),
        el("span", { class: "kind" }, e.kind),
        document.createTextNode(e.message),
      );
      ul.append(li);
    }
  }

  // --- a tiny SVG line chart ----------------------------------------------------------------------------------
  function lineChart(svg, series, { format, yMax, xRange, empty = "collecting samples…" } = {}) {
    const W = Math.max(200, svg.clientWidth || 400), H = Math.max(100, svg.clientHeight || 180);
    const L = 64, R = 10, T = 22, B = 20;
    svg.setAttribute("viewBox", `0 0 ${W} ${H}`);
    svg.replaceChildren();
    const pts = series.flatMap((s) => s.points);
    if (pts.length < 2) {
      svg.append(svgEl("text", { x: W / 2, y: H / 2, "text-anchor": "middle", class: "empty" }, empty));
      return;
    }
    const [x0, x1] = xRange || [Math.min(...pts.map((p) => p[0])), Math.max(...pts.map((p) => p[0]))];
    const top = yMax ?? niceMax(Math.max(...pts.map((p) => p[1])));
    const sx = (x) => L + ((x - x0) / Math.max(1e-9, x1 - x0)) * (W - L - R);
    const sy = (y) => T + (1 - y / (top || 1)) * (H - T - B);
    for (let i = 0; i <= 4; i++) {
      const v = (top * i) / 4, y = sy(v);
      svg.append(svgEl("line", { x1: L, x2: W - R, y1: y, y2: y, class: "grid" }));
      svg.append(svgEl("text", { x: L - 6, y: y + 3, "text-anchor": "end" }, format(v)));
    }
    const span = x1 - x0;
    svg.append(svgEl("text", { x: L, y: H - 4 }, `-${fmtSeconds(span)}`));
    svg.append(svgEl("text", { x: W - R, y: H - 4, "text-anchor": "end" }, "now"));
    let lx = L;
    for (const s of series) {
      if (!s.points.length) continue;
      const d = s.points.map((p, i) => `${i ? "L" : "M"}${sx(p[0]).toFixed(1)},${sy(p[1]).toFixed(1)}`).join("");
      const line = { d, fill: "none", stroke: s.color, "stroke-width": 2, "data-series": s.name };
      if (s.dash) line["stroke-dasharray"] = s.dash;
      svg.append(svgEl("path", line));
      svg.append(svgEl("rect", { x: lx, y: 5, width: 10, height: 3, fill: s.color }));
      svg.append(svgEl("text", { x: lx + 14, y: 10 }, s.name));
      lx += 24 + 7 * s.name.length;
    }
  }

  function svgEl(tag, attrs, text) {
    const e = document.createElementNS(SVG_NS, tag);
    for (const [k, v] of Object.entries(attrs)) e.setAttribute(k, v);
    if (text !== undefined) e.textContent = text;
    return e;
  }

  function niceMax(v) {
    if (!(v > 0)) return 1;
    const p = Math.pow(10, Math.floor(Math.log10(v)));
    for (const m of [1, 2, 2.5, 5, 10]) if (m * p >= v) return m * p;
    return 10 * p;
  }

  function renderCharts(hist) {
    const pts = hist ? hist.points : [];
    const xRange = pts.length >= 2 ? [pts[0].time, pts[pts.length - 1].time] : undefined;
    const tiers = [...new Set(pts.flatMap((p) => p.tiers.map((t) => t.tier)))];
    const color = (t) => getComputedStyle(document.body).getPropertyValue("--" + t).trim() || "#888";
    const perTier = (f) => tiers.map((t) => ({
      name: t, color: color(t),
      points: pts.flatMap((p) => {
        const x = p.tiers.find((q) => q.tier === t);
        const v = x ? f(x) : null;
        return v === null || v === undefined ? [] : [[p.time, v]];
      }),
    }));
    lineChart($("chart-hit-rate"), [
      ...perTier((t) => t.hit_rate),
      { name: "node", color: "#111827", dash: "5 3",
        points: pts.filter((p) => p.hit_rate !== null).map((p) => [p.time, p.hit_rate]) },
    ], { format: fmtPct, yMax: 1, xRange, empty: pts.length ? "no reads in this window" : "collecting samples…" });
    lineChart($("chart-throughput"), [
      { name: "read", color: color("ram"), points: pts.map((p) => [p.time, p.read_bytes_per_s]) },
      { name: "write", color: color("disk"), points: pts.map((p) => [p.time, p.write_bytes_per_s]) },
    ], { format: fmtRate, xRange });
    lineChart($("chart-occupancy"), perTier((t) => t.bytes), { format: fmtBytes, xRange });
    lineChart($("chart-backlog"), [
      { name: "backlog", color: color("object"), points: pts.map((p) => [p.time, p.upload_backlog_bytes]) },
    ], { format: fmtBytes, xRange });
  }

  // --- the loop -----------------------------------------------------------------------------------------------
  function setStatus(text, cls) {
    const s = $("status");
    s.textContent = text;
    s.className = "status " + (cls || "");
  }

  let timer = null;
  async function refresh() {
    clearTimeout(timer);
    try {
      const [stats, hist] = await Promise.all([
        getJSON("/v1/stats"),
        getJSON("/v1/stats/history").catch((e) => { if (e.status === 403) return null; throw e; }),
      ]);
      let errors = [], denied = null;
      try { errors = await getJSON("/v1/errors"); } catch (e) {
        if (e.status !== 403) throw e;
        denied = "this token cannot see node-wide errors";
      }
      renderTiers(stats);
      renderTotals(stats);
      renderStore(stats);
      renderTables(stats);
      renderErrors(errors, denied);
      renderCharts(hist);
      document.body.dataset.statsTime = String(stats.time);
      document.body.dataset.ready = "1";
      setStatus("live · " + new Date().toLocaleTimeString(), "ok");
    } catch (e) {
      if (e.status === 401) {
        $("login").hidden = false;
        setStatus("sign in required", "err");
        return; // wait for the form
      }
      setStatus("error: " + e.message, "err");
    }
    timer = setTimeout(refresh, REFRESH_MS);
  }

  initToken();
  refresh();
})();
