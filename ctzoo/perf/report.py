"""``ctzoo perf report``: one self-contained HTML page from a provenance store.

Three pure steps: :func:`read_report_data` (the store -> a JSON-friendly dict), :func:`build_figures` (that dict ->
plotly figures as JSON) and :func:`render_report_html` (-> the page). The page holds plotly.js inline and every
number as JSON, so it opens offline, from a mail attachment or an air-gapped PACS workstation.

* **Header**: events seen, stored and the reduction (seen / stored) per process and overall (``totals`` table).
* **Timeline**: one row per process, a point per anomaly at its start time (UTC); hovering names the stage,
  seconds and key.
* **Distributions**: per key, the fine log2 histogram of its detector statistics (``key_states``), merged over
  processes exactly (:meth:`~ctzoo.perf.detectors.KeyState.merge`; a parameter server's global statistics are
  taken once, :func:`merged_state`), with the key's anomalies as red markers.
  Anomalies are not learned (``learn_anomalies=False``), so they are not in the histogram: the markers show where
  they fall against what was normal.
* **Provenance**: clicking an anomaly (timeline or distribution) shows its key, seconds, score and threshold,
  context, and its window of neighbouring events, in a panel beside the plots.

plotly is imported inside :func:`build_figures` and :func:`render_report_html` only, so ``import ctzoo.perf`` stays
light for the processes that time their work.
"""

from __future__ import annotations

import html
import json
import sqlite3
import time
from datetime import datetime, timezone
from functools import reduce
from pathlib import Path
from typing import Any

from ctzoo.perf.detectors import KeyState
from ctzoo.perf.events import KEY_FIELDS
from ctzoo.perf.provenance import ProvenanceStore, read_problem
from ctzoo.perf.stats import FINE_BINS_PER_OCTAVE

#: The most anomalies a page shows by default (the newest); each brings its window of ~20 events.
DEFAULT_LIMIT = 5000


def key_label(row: dict) -> str:
    """``model version · stage · device · bucket`` of an event or key row."""
    return f"{row['model']} {row['version']} · {row['stage']} · {row['device']} · {row['bucket']}"


class _WrittenWhileRead(Exception):
    """A store read without locks (no writer had it open) failed, and a writer has opened it since."""


def read_report_data(store_path: str | Path, since: float | None = None, limit: int | None = DEFAULT_LIMIT) -> dict:
    """Everything the page shows, from the store at ``store_path`` (opened read-only; ValueError if it is not a
    ctzoo perf store, or is damaged). ``since`` (Unix time) and ``limit`` (the newest N) select the anomalies
    shown; the totals and the distributions always cover the whole store."""
    try:
        return _read_report_data(store_path, since, limit)
    except _WrittenWhileRead:  # read again, now with locks: the writer's -wal exists
        return _read_report_data(store_path, since, limit)


def _read_report_data(store_path: str | Path, since: float | None, limit: int | None) -> dict:
    store = ProvenanceStore(store_path, read_only=True)
    try:
        totals = store.rows("SELECT process, seen, stored, updated FROM totals ORDER BY process")
        where, parameters = "kind = 'anomaly'", []
        if since is not None:
            where, parameters = where + " AND started >= ?", [float(since)]
        newest = f"SELECT * FROM events WHERE {where} ORDER BY started DESC, id DESC"
        if limit is not None:
            newest, parameters = newest + " LIMIT ?", [*parameters, int(limit)]
        anomalies = sorted(store.rows(newest, tuple(parameters)), key=lambda row: (row["started"], row["id"]))
        shown = {row["id"] for row in anomalies}
        windows = store.windows(anomalies)
        fields = ", ".join(KEY_FIELDS)
        anomalies_per_key = {tuple(row[f] for f in KEY_FIELDS): row["n"] for row in store.rows(
            f"SELECT {fields}, COUNT(*) AS n FROM events WHERE kind = 'anomaly' GROUP BY {fields}")}
        state_rows = store.key_states()
        profiles = store.profiles(sorted(shown))
    except sqlite3.DatabaseError as error:  # a damaged page: opening the store reads only its first
        if store.immutable and Path(f"{store_path}-wal").exists():
            raise _WrittenWhileRead from error
        raise ValueError(read_problem(Path(store_path), error)) from None
    finally:
        store.close()
    for anomaly in anomalies:
        anomaly["key"] = key_label(anomaly)
        anomaly["window"] = windows.get(anomaly["id"], [])
        anomaly["profile"] = profiles.get(anomaly["id"])
        for event in anomaly["window"]:
            event["key"] = key_label(event)
    return {"store": str(store_path), "generated": time.time(), "totals": _totals(totals),
            "anomalies": anomalies, "anomalies_total": sum(anomalies_per_key.values()),
            "keys": _keys(state_rows, anomalies_per_key, anomalies)}


def _totals(rows: list[dict]) -> dict:
    def with_reduction(row: dict) -> dict:
        return {**row, "reduction": row["seen"] / row["stored"] if row["stored"] else None}
    overall = {"process": "all processes", "seen": sum(r["seen"] for r in rows),
               "stored": sum(r["stored"] for r in rows), "updated": max((r["updated"] for r in rows), default=None)}
    return {"processes": [with_reduction(row) for row in rows], "overall": with_reduction(overall)}


def merged_state(rows: list[dict]) -> KeyState:
    """One key's state over processes: each process's own events, merged exactly."""
    return reduce(KeyState.merge, (KeyState.from_dict(row["state"]) for row in rows))


def _keys(state_rows: list[dict], anomalies_per_key: dict[tuple, int], anomalies: list[dict]) -> list[dict]:
    """One entry per key: its states merged over processes, summary statistics and its anomalies' ids."""
    rows: dict[tuple, list[dict]] = {}
    for row in state_rows:
        rows.setdefault(tuple(row[f] for f in KEY_FIELDS), []).append(row)
    shown: dict[tuple, list[int]] = {}
    for anomaly in anomalies:
        shown.setdefault(tuple(anomaly[f] for f in KEY_FIELDS), []).append(anomaly["id"])
    found = []
    for key in set(rows) | set(anomalies_per_key):
        entry: dict[str, Any] = dict(zip(KEY_FIELDS, key))
        merged = merged_state(rows[key]) if key in rows else KeyState()  # no state: a store older than the table
        moments, known = merged.moments, merged.moments.count > 0
        entry.update(label=key_label(entry), processes=[row["process"] for row in rows.get(key, [])],
                     histogram=merged.histogram.to_dict(), count=moments.count,
                     mean=moments.mean if known else None, std=moments.std if known else None,
                     min=moments.min if known else None, max=moments.max if known else None,
                     anomalies=anomalies_per_key.get(key, 0), anomaly_ids=shown.get(key, []))
        found.append(entry)
    # the keys with the most anomalies first: that is where an operator looks
    return sorted(found, key=lambda e: (-e["anomalies"], e["label"]))


def _utc(seconds: float) -> str:
    return datetime.fromtimestamp(seconds, timezone.utc).strftime("%Y-%m-%d %H:%M:%S.%f")[:-3]


def seconds_text(seconds: float) -> str:
    """How the hover texts write a duration (four significant digits, as the panel's ``secondsText``)."""
    return f"{seconds:.4g} s"


def build_figures(data: dict) -> dict:
    """The timeline and one distribution per key as plotly figure JSON (``{"timeline", "distributions"}``)."""
    import plotly.graph_objects as go

    by_process: dict[str, list[dict]] = {}
    for anomaly in data["anomalies"]:
        by_process.setdefault(anomaly["process"], []).append(anomaly)
    processes = sorted({row["process"] for row in data["totals"]["processes"]} | set(by_process))
    timeline = go.Figure()
    for process in processes:
        rows = by_process.get(process, [])
        timeline.add_trace(go.Scatter(
            x=[_utc(a["started"]) for a in rows], y=[process] * len(rows), mode="markers", name=process,
            marker={"size": 11, "line": {"width": 1, "color": "white"}},
            customdata=[[a["id"], a["stage"], seconds_text(a["seconds"]), a["key"]] for a in rows],
            hovertemplate="stage %{customdata[1]}<br>%{customdata[2]}<br>%{customdata[3]}<extra>%{y}</extra>"))
    timeline.update_layout(height=140 + 44 * len(processes), margin={"l": 10, "r": 10, "t": 10, "b": 40},
                           hovermode="closest", showlegend=False, xaxis={"title": "start time (UTC)"},
                           yaxis={"categoryorder": "array", "categoryarray": processes, "automargin": True,
                                  "range": [-0.6, len(processes) - 0.4]})  # rows clear of the axes
    distributions = []
    for index, key in enumerate(data["keys"]):
        figure = go.Figure()
        counts = {int(bin_): count for bin_, count in key["histogram"].items()}
        peak = max(counts.values(), default=1)
        if counts:
            low, high = min(counts) - 1, max(counts) + 1  # an empty bin each side closes the outline
            bins = range(low, high + 2)
            figure.add_trace(go.Scatter(
                x=[2.0 ** (b / FINE_BINS_PER_OCTAVE) for b in bins], y=[counts.get(b, 0) for b in bins],
                mode="lines", line={"shape": "hv", "width": 1, "color": "#4a6fa5"}, fill="tozeroy",
                name=f"events ({key['count']})", hovertemplate="from %{x:.4g} s: %{y} events<extra></extra>"))
        ids = set(key["anomaly_ids"])
        anomalies = [a for a in data["anomalies"] if a["id"] in ids]
        figure.add_trace(go.Scatter(
            x=[a["seconds"] for a in anomalies], y=[peak * 1.1] * len(anomalies), mode="markers",
            name=f"anomalies ({len(anomalies)})", marker={"color": "#d62728", "symbol": "triangle-down", "size": 12},
            customdata=[[a["id"], a["stage"], seconds_text(a["seconds"]), a["key"]] for a in anomalies],
            hovertemplate="anomaly %{customdata[2]}<br>%{customdata[3]}<extra></extra>"))
        figure.update_layout(height=230, margin={"l": 10, "r": 10, "t": 10, "b": 40}, hovermode="closest",
                             legend={"orientation": "h", "y": 1.12, "x": 0}, yaxis={"title": "events per bin"},
                             xaxis={"type": "log", "title": f"seconds (bins of 1/{FINE_BINS_PER_OCTAVE} octave)"})
        distributions.append({"div": f"distribution-{index}", "figure": json.loads(figure.to_json())})
    return {"timeline": json.loads(timeline.to_json()), "distributions": distributions}


def json_for_script(value: Any) -> str:
    """JSON safe inside a <script> element: no ``</script>``, ``<!--`` or entity can end or change it."""
    text = json.dumps(_finite(value), allow_nan=False, separators=(",", ":"))
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")


def _finite(value: Any) -> Any:
    """``value`` with NaN and infinities (which JSON cannot hold; a context may) as strings."""
    if isinstance(value, float) and (value != value or value in (float("inf"), float("-inf"))):
        return str(value)
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


def _number(value: float | None, digits: int = 4) -> str:
    return "—" if value is None else f"{value:.{digits}g}"


def _header_html(data: dict) -> str:
    totals = data["totals"]

    def row(entry: dict, cell: str = "td") -> str:
        reduction = "—" if entry["reduction"] is None else f"{entry['reduction']:.2f}×"
        updated = "—" if entry["updated"] is None else _utc(entry["updated"])
        cells = (entry["process"], f"{entry['seen']:,}", f"{entry['stored']:,}", reduction, updated)
        return "<tr>" + "".join(f"<{cell}>{html.escape(str(c))}</{cell}>" for c in cells) + "</tr>"

    shown, total = len(data["anomalies"]), data["anomalies_total"]
    anomalies = f"{total:,} anomalies" + ("" if shown == total else f" ({shown:,} shown: --since/--limit)")
    return (f"<header><h1>ctzoo perf report</h1><p id='summary'>{html.escape(data['store'])} · {anomalies} · "
            f"{len(data['keys'])} keys · generated {_utc(data['generated'])} UTC</p>"
            "<table id='totals'><thead><tr><th>process</th><th>events seen</th><th>events stored</th>"
            "<th>reduction (seen/stored)</th><th>totals updated (UTC)</th></tr></thead><tbody>"
            + "".join(row(entry) for entry in totals["processes"]) + "</tbody><tfoot>"
            + row(totals["overall"], "th") + "</tfoot></table></header>")


def _distributions_html(data: dict, figures: dict) -> str:
    parts = []
    for key, figure in zip(data["keys"], figures["distributions"]):
        if key["count"]:
            stats = (f"n={key['count']:,} · mean {_number(key['mean'])} s · std {_number(key['std'])} s · "
                     f"min {_number(key['min'])} s · max {_number(key['max'])} s · anomalies {key['anomalies']:,}"
                     f" · processes {len(key['processes'])}")
        else:  # a store older than key_states, or a key whose processes never flushed their statistics
            stats = f"no statistics stored for this key · anomalies {key['anomalies']:,}"
        parts.append(f"<div class='key' data-key='{html.escape(key['label'], quote=True)}'>"
                     f"<h3>{html.escape(key['label'])}</h3><p class='key-stats'>{html.escape(stats)}</p>"
                     f"<div class='plot' id='{figure['div']}'></div></div>")
    return "".join(parts)


STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:0 16px;color:#222}
h1{font-size:22px;margin:12px 0 4px}h2{font-size:17px;margin:18px 0 6px}h3{font-size:14px;margin:12px 0 0}
table{border-collapse:collapse}td,th{border-bottom:1px solid #ddd;padding:2px 8px;text-align:left}
#totals td:nth-child(n+2),#totals th:nth-child(n+2){text-align:right}
.layout{display:grid;grid-template-columns:minmax(0,1fr) 460px;gap:18px}
aside{position:sticky;top:0;align-self:start;max-height:100vh;overflow:auto}
#provenance{border:1px solid #ccc;border-radius:4px;padding:8px;background:#fafafa;font-size:13px}
#provenance dt{font-weight:600}#provenance dd{margin:0 0 4px 12px;word-break:break-all}
#provenance tr.is-anomaly{background:#fdd;font-weight:600}
#provenance table.window td{white-space:nowrap;padding:2px 4px}
#provenance table.window td:last-child{white-space:normal;word-break:break-word;font-size:11px}
.key-stats{margin:0;color:#555;font-size:12px}
"""

SCRIPT = """
const DATA = JSON.parse(document.getElementById('report-data').textContent);
const ANOMALIES = new Map(DATA.anomalies.map(a => [a.id, a]));
const CONFIG = {displaylogo: false, responsive: true};
function secondsText(s) { return s ? Number(s.toPrecision(4)) + ' s' : '0 s'; }
function utc(t) { return new Date(t * 1000).toISOString().replace('T', ' ').replace('Z', ''); }
function contextText(c) {
  return Object.entries(c).map(([k, v]) => k + '=' + (typeof v === 'string' ? v : JSON.stringify(v))).join(' ');
}
// the store keeps an infinite score as 1e300 (provenance._finite)
function scoreText(v) { return v >= 1e300 ? '∞' : Number(v.toPrecision(4)).toString(); }
function element(tag, text, className) {
  const node = document.createElement(tag);  // textContent only: context values are never parsed as HTML
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}
function row(cells, header) {
  const tr = element('tr');
  cells.forEach(c => tr.appendChild(element(header ? 'th' : 'td', String(c))));
  return tr;
}
function showAnomaly(id) {
  const a = ANOMALIES.get(id), panel = document.getElementById('provenance');
  if (!a) return;
  panel.replaceChildren(element('h3', 'Anomaly #' + a.id + ': ' + a.stage));
  const fields = element('dl');
  [['stage', a.stage, 'field-stage'], ['seconds', secondsText(a.seconds), 'field-seconds'], ['key', a.key, 'field-key'],
   ['process', a.process], ['started (UTC)', utc(a.started)],
   ['score / threshold', scoreText(a.score) + ' / ' + scoreText(a.threshold) + ' (' + a.algorithm + ')', 'field-score']
  ].forEach(([name, value, cls]) => {
    fields.appendChild(element('dt', name)); fields.appendChild(element('dd', value, cls));
  });
  panel.appendChild(fields);
  if (a.profile) showProfile(panel, a.profile);  // before the context: where the time went, when it was profiled
  panel.appendChild(element('h4', 'Context'));
  const context = element('table', undefined, 'context');
  Object.entries(a.context).forEach(([k, v]) => context.appendChild(row([k, JSON.stringify(v)])));
  panel.appendChild(context);
  panel.appendChild(element('h4', 'Window: ' + a.window.length + ' neighbouring events of ' + a.process));
  const table = element('table', undefined, 'window');
  table.appendChild(row(['Δt', 'stage', 'bucket', 'seconds', 'score', 'context'], true));
  [...a.window, a].sort((x, y) => x.started - y.started || x.id - y.id).forEach(e => {
    const dt = e.started - a.started;
    const tr = row([(dt >= 0 ? '+' : '') + dt.toFixed(3) + ' s', e.stage, e.bucket, secondsText(e.seconds),
                    e.judged ? scoreText(e.score) : 'warm-up', contextText(e.context)]);
    tr.className = e.id === a.id ? 'is-anomaly' : 'window-event';
    table.appendChild(tr);
  });
  panel.appendChild(table);
}
function showProfile(panel, p) {
  panel.appendChild(element('h4', 'Deep profile #' + p.id + ' (' + p.tool + '): rerun ' + secondsText(p.rerun_s) +
                            ', anomaly ' + secondsText(p.anomaly_s), 'profile-title'));
  panel.appendChild(element('p', p.reproduces ?
    'The slowness reproduces: the input or the model, not the moment.' :
    'The rerun was fast: the anomaly came from the moment (contention, a stall), not the input.', 'profile-verdict'));
  const table = element('table', undefined, 'profile');
  table.appendChild(row(['operator', 'seconds', 'calls'], true));
  p.ops.forEach(o => table.appendChild(row([o.op, secondsText(o.seconds), o.calls])));
  panel.appendChild(table);
}
function onClick(event) {
  const point = event.points.find(p => Array.isArray(p.customdata));
  if (point) showAnomaly(point.customdata[0]);
}
const plots = [['timeline', DATA.figures.timeline], ...DATA.figures.distributions.map(d => [d.div, d.figure])];
Promise.all(plots.map(([div, fig]) => Plotly.newPlot(div, fig.data, fig.layout, CONFIG).then(gd => {
  gd.on('plotly_click', onClick);
}))).then(() => { document.body.dataset.ready = 'true'; });
"""


def render_report_html(data: dict) -> str:
    """The whole page: plotly.js inline once, the data as JSON, the header and panels."""
    from plotly.offline import get_plotlyjs

    plotly_js = get_plotlyjs()
    if "</script" in plotly_js.lower():  # would end the inline element early; never so far
        raise RuntimeError("this plotly.js cannot be inlined: it contains '</script'")
    figures = build_figures(data)
    page_data = {"anomalies": data["anomalies"], "figures": figures}
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>ctzoo perf report</title>"
            f"<style>{STYLE}</style><script>{plotly_js}</script></head><body>{_header_html(data)}"
            "<div class='layout'><main><h2>Anomaly timeline (one row per process)</h2><div id='timeline'></div>"
            "<h2>Latency distribution per key</h2><div id='distributions'>"
            f"{_distributions_html(data, figures)}</div></main><aside><h2>Provenance</h2><div id='provenance'>"
            "Click an anomaly (a point of the timeline or a red marker) to see its key, context, deep profile and "
            "the events around it.</div></aside></div>"
            f"<script type='application/json' id='report-data'>{json_for_script(page_data)}</script>"
            f"<script>{SCRIPT}</script></body></html>")
