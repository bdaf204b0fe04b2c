"""``ctzoo cohort report COHORT``: the cohort as one self-contained HTML page with HealthPrism's three levels.

* **Summary**: the cohort's counts; each grouping column's distribution (``unknown`` included); the correlations of
  the lesions' numeric context; the AUC of the gated model against each single modality; the image weight (gate)
  per test lesion; Integrated Gradients per context feature and for the top image features.
* **Group**: per subgroup (sex, age band, slice thickness, lesion type, and the series-level scanner columns'
  counts) the detector's sensitivity at 4 false positives per key slice and the gated model's AUC, with 95 %
  intervals and counts; refused under the minimum count. Clusters of similar lesions (k-means), drawn by PCA.
* **Individual**: one or two lesions side by side: their context, their key slice with the annotated box (green)
  and the detector's findings above its operating point (orange) drawn on it, their gate value, predicted type and
  per-feature Integrated Gradients; and the cohort's CT series with their context and image columns.

The page names no input: unreadable ones are a count by error type (``cohort.json`` keeps their hashed names). Every
string from the data that plotly draws is HTML-escaped (:func:`label`: plotly renders tags in its labels). A fit of
other lesions than ``lesions.csv``'s (a cohort built again), or without a test AUC, is not drawn, and the page says
why. A banner above the views says when the lesions are a miniature's, synthetic (``cohort.json``'s ``synthetic``).

:func:`report_data` gathers everything (pure, testable); :func:`render_report_html` writes the page: plotly.js
inline once, the data as JSON (:func:`~ctzoo.perf.report.json_for_script`), so it opens offline.
"""

from __future__ import annotations

import base64
import html
import json
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.cohort.fit import CONTEXT_SETS, context_matrix, filled, fit_mismatch, read_fit, unmeasured_fit
from ctzoo.cohort.groups import LESION_GROUPS, MIN_COUNT, auc_by_group, clusters, detection_by_group, threshold_at_fps
from ctzoo.cohort.table import DOCUMENT_FILE, FINDINGS_FILE, KEY_SLICES_FILE, THUMBNAILS_DIR, read_lesions
from ctzoo.io.atomic import atomic_path
from ctzoo.perf.report import STYLE as REPORT_STYLE
from ctzoo.perf.report import json_for_script

REPORT_FILE = "report.html"
#: Lesions offered in the Individual view (their key slices are embedded): the test lesions first; as many CT
#: series (their top finding's slice embedded) in the table's order. The series table lists them all.
MAX_INDIVIDUALS = 60
TOP_IMAGE_FEATURES = 10


def read_cohort(cohort: Path) -> dict[str, Any]:
    """``cohort.json``, validated enough to draw: ValueError with the path for a missing or foreign file."""
    path = cohort / DOCUMENT_FILE
    if not path.is_file():
        raise ValueError(f"{cohort} is not a cohort folder: it has no {DOCUMENT_FILE} (run ctzoo cohort build)")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    if not isinstance(document, dict) or document.get("schema") != 1 or not isinstance(document.get("rows"), list):
        raise ValueError(f"{path} is not a cohort table of schema 1")
    return document


def label(text: Any) -> str:
    """A string from the data as plotly may draw it: plotly renders ``<a href>``, ``<b>`` and the like in labels,
    titles and hover text, so a header's text is escaped to show as written, never as markup (``<``, ``>`` and
    ``&``: plotly shows ``&quot;`` as it stands, and a quote cannot open a tag)."""
    return html.escape(str(text), quote=False)


def failed_summary(failed: list[dict[str, str]]) -> dict[str, Any]:
    """What the page says of the unreadable inputs: how many and of which error types, never their names or paths
    (a ``cohort.json`` from before the names were hashed still holds them in ``input`` and ``reason``)."""
    types = Counter(entry.get("error") or str(entry.get("reason", "")).split(":", 1)[0] or "error"
                    for entry in failed)
    return {"count": len(failed), "errors": dict(types.most_common())}


def thumbnail_uri(cohort: Path, key_slice: str) -> str | None:
    path = cohort / THUMBNAILS_DIR / f"{key_slice}.png"
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode() if path.is_file() else None


def correlations(lesions: list[dict[str, Any]]) -> dict[str, Any]:
    """Pearson correlations of the lesions' numeric context (columns without spread left out)."""
    names = list(CONTEXT_SETS["csv"])
    matrix = context_matrix(lesions)
    keep = [k for k in range(len(names)) if np.nanstd(matrix[:, k]) > 0] if len(lesions) > 1 else []
    if len(keep) < 2:
        return {"names": [], "r": []}
    complete = matrix[:, keep][~np.isnan(matrix[:, keep]).any(axis=1)]
    return {"names": [names[k] for k in keep], "r": np.corrcoef(complete, rowvar=False).round(3).tolist()}


def individuals(cohort: Path, lesions: list[dict[str, Any]], key_slices: dict[str, Any],
                fit: tuple[dict, list[dict]] | None, limit: int) -> list[dict[str, Any]]:
    """The lesions offered in the Individual view: the test lesions (by the fit) first, then the others, at most
    ``limit``; each with its context, key slice picture, boxes, and (when fitted) its gate, prediction and IG."""
    predicted = {p["lesion"]: p for p in fit[1]} if fit else {}
    slices = {ks["key_slice"]: ks for ks in key_slices["key_slices"]}
    order = sorted(lesions, key=lambda lesion: (predicted.get(lesion["lesion"], {}).get("split") != "test",
                                                lesion["lesion"] not in predicted, lesion["lesion"]))
    chosen = []
    for lesion in order[:limit]:
        key_slice = slices.get(lesion["key_slice"], {})
        index = key_slice.get("lesions", []).index(lesion["lesion"]) if key_slice else -1
        prediction = predicted.get(lesion["lesion"])
        keep = [k for k, score in enumerate(key_slice.get("scores", [])) if score >= key_slices["score_threshold"]]
        chosen.append({
            "id": lesion["lesion"], "title": f"lesion {lesion['lesion']}", "frame": key_slices.get("frame", 512),
            "context": {"csv_split": lesion["split"]} | {k: lesion[k] for k in (
                "lesion_type", "age_years", "sex", "spacing_x_mm", "spacing_z_mm", "window_low_hu",
                "window_high_hu", "location_x", "location_y", "location_z", "long_mm", "short_mm")},
            "picture": thumbnail_uri(cohort, lesion["key_slice"]),
            "truth_box": key_slice["truth_boxes"][index] if index >= 0 else None,
            "others": [box for k, box in enumerate(key_slice.get("truth_boxes", [])) if k != index and box],
            "findings": [{"box": key_slice["boxes"][k], "score": key_slice["scores"][k]} for k in keep],
            "prediction": None if prediction is None else {
                "split": prediction["split"], "label": prediction["label"], "predicted": prediction["predicted"],
                "image_weight": float(prediction["image_weight"]),
                "probabilities": {c: float(prediction[f"p_{c}"]) for c in fit[0]["classes"]},
                "ig_context": {c: float(prediction[f"ig_{c}"]) for c in fit[0]["context_features"]},
                "ig_image": float(prediction["ig_image"])}})
    return chosen


#: What a CT series' card shows of its row (its image columns follow).
SERIES_CONTEXT = ("source", "age_years", "sex", "manufacturer", "model", "kvp", "tube_current_ma", "kernel",
                  "slice_thickness_mm", "spacing_x_mm", "spacing_z_mm", "slices", "contrast", "body_part")


def series_individuals(cohort: Path, rows: list[dict[str, Any]], limit: int = MAX_INDIVIDUALS) -> list[dict[str, Any]]:
    """The cohort's first ``limit`` CT series (not DeepLesion's) for the Individual view: context, image columns,
    and the detector's findings drawn on the slice of the highest-scoring one (``findings.json``,
    ``thumbnails/<series>.png``). Each embeds its picture, so the page grows with them: hence the limit."""
    path = cohort / FINDINGS_FILE
    found = json.loads(path.read_text(encoding="utf-8"))["series"] if path.is_file() else {}
    items = []
    for row in [row for row in rows if row["source"] != "deeplesion"][:limit]:
        level = found.get(row["series"], {})
        image = {k: v for k, v in row.items() if k.endswith("_ml") or k.startswith("finding")}
        items.append({"id": f"series-{row['series']}", "title": f"series {row['series']} ({row['source']})",
                      "context": {k: row[k] for k in SERIES_CONTEXT} | image, "frame": level.get("frame") or 512,
                      "picture": thumbnail_uri(cohort, row["series"]) if level.get("picture") else None,
                      "truth_box": None, "others": [],
                      "findings": level.get("on_picture", []), "prediction": None})
    return items


def report_data(cohort: str | Path, min_count: int = MIN_COUNT, limit: int = MAX_INDIVIDUALS,
                k: int = 4) -> dict[str, Any]:
    """Everything the page draws, computed from the cohort folder (module docstring)."""
    cohort = Path(cohort)
    document = read_cohort(cohort)
    data: dict[str, Any] = {"cohort": str(cohort), "series": len(document["rows"]),
                            "failed": failed_summary(document["failed"]), "fit_problem": None,
                            "ct_series": sum(row["source"] != "deeplesion" for row in document["rows"]),
                            "models": document.get("models", []), "groups": document["groups"],
                            "synthetic": document.get("synthetic"),
                            "rows": document["rows"], "min_count": min_count, "lesions": 0, "fit": None,
                            "detection": [], "auc": [], "clusters": None, "individuals": [], "correlations": None}
    data["series_items"] = series_individuals(cohort, document["rows"], limit)
    if not (cohort / KEY_SLICES_FILE).is_file():
        return data
    lesions, features = read_lesions(cohort)
    key_slices = json.loads((cohort / KEY_SLICES_FILE).read_text(encoding="utf-8"))
    fit, data["fit_problem"] = checked_fit(cohort, lesions)
    threshold = threshold_at_fps(key_slices["key_slices"])  # one operating point for every group
    data |= {"lesions": len(lesions), "typed": sum(lesion["type_code"] >= 1 for lesion in lesions),
             "key_slices": len(key_slices["key_slices"]), "lesion_model": key_slices["model"],
             "correlations": correlations(lesions),
             "detection": [detection_by_group(lesions, key_slices["key_slices"], column, min_count=min_count,
                                              threshold=threshold) for column in LESION_GROUPS]}
    data["clusters"] = clusters(lesions, features, filled(context_matrix(lesions)), k=k)
    type_of = {lesion["lesion"]: lesion["lesion_type"] for lesion in lesions}
    data["clusters"]["types"] = [type_of[h] for h in data["clusters"]["lesions"]]
    if fit is not None:
        document_fit, predictions = fit
        data["fit"] = {key: document_fit[key] for key in ("context_set", "classes", "counts", "split_rule",
                                                          "results", "mean_image_weight", "importance", "seeds",
                                                          "dropped", "context_features")}
        data["fit"]["split_seed"] = document_fit.get("split_seed")  # None in a fit from before the seed was kept
        data["fit"]["weights"] = [float(p["image_weight"]) for p in predictions if p["split"] == "test"]
        data["auc"] = [auc_by_group(lesions, predictions, document_fit["classes"], column, min_count=min_count)
                       for column in LESION_GROUPS if column != "lesion_type"]
    data["individuals"] = individuals(cohort, lesions, key_slices, fit, limit)
    return data


def checked_fit(cohort: Path, lesions: list[dict[str, Any]]) -> tuple[tuple[dict, list[dict]] | None, str | None]:
    """``(fit, None)`` for the cohort's fit (None when not fitted), or ``(None, why)`` when ``fit/`` cannot be read,
    was fitted on other lesions than ``lesions`` (:func:`~ctzoo.cohort.fit.fit_mismatch`) or holds no test AUC
    (:func:`~ctzoo.cohort.fit.unmeasured_fit`: never drawn as "nan ± nan")."""
    try:
        fit = read_fit(cohort)
    except ValueError as error:
        return None, str(error)
    problem = None if fit is None else fit_mismatch(lesions, fit) or unmeasured_fit(fit[0])
    return (None, problem) if problem else (fit, None)


def _bars(go, names, values, title, colour="#4c78a8"):
    return go.Bar(x=list(values), y=[label(name) for name in names], orientation="h", marker_color=colour,
                  name=title)


def build_figures(data: dict[str, Any]) -> dict[str, Any]:
    """The Summary and Group plots as plotly figure JSON (only those the data supports)."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    figures: dict[str, Any] = {}
    columns = [c for c, counts in data["groups"].items() if counts]
    if columns:  # none when no series could be read: the page says so instead
        grid = make_subplots(rows=(len(columns) + 2) // 3, cols=3, subplot_titles=[label(c) for c in columns],
                             horizontal_spacing=0.12)
        for index, column in enumerate(columns):
            counts = data["groups"][column]
            grid.add_trace(go.Bar(x=list(counts.values()), y=[label(v) for v in counts], orientation="h",
                                  showlegend=False,
                                  marker_color=["#bbb" if v == "unknown" else "#4c78a8" for v in counts]),
                           row=index // 3 + 1, col=index % 3 + 1)
        grid.update_layout(height=220 * ((len(columns) + 2) // 3), margin={"t": 30, "l": 90, "r": 10, "b": 20})
        figures["distributions"] = grid.to_plotly_json()
    if data["correlations"] and data["correlations"]["names"]:
        names = [label(name) for name in data["correlations"]["names"]]
        figures["correlations"] = go.Figure(go.Heatmap(z=data["correlations"]["r"], x=names, y=names, zmin=-1,
                                                       zmax=1, colorscale="RdBu")).update_layout(
            height=420, margin={"t": 10}).to_plotly_json()
    fit = data["fit"]
    if fit:
        results = fit["results"]
        figures["auc"] = go.Figure(go.Bar(
            x=[results[m]["test_auc_mean"] for m in ("both", "image", "context")], y=["gated", "image only",
                                                                                    "context only"],
            orientation="h", error_x={"type": "data", "array": [results[m]["test_auc_sd"] for m in
                                                                ("both", "image", "context")]},
            text=[f"{results[m]['test_auc_mean']:.3f}" for m in ("both", "image", "context")])).update_layout(
            height=220, xaxis={"range": [0, 1], "title": "test mean AUC (mean ± sd over seeds)"},
            margin={"t": 10}).to_plotly_json()
        figures["gates"] = go.Figure(go.Histogram(x=fit["weights"], xbins={"start": 0, "end": 1, "size": 0.05},
                                                  marker_color="#72b7b2")).update_layout(
            height=260, xaxis={"range": [0, 1], "title": "image weight z (0: all context, 1: all image)"},
            yaxis={"title": "test lesions"}, margin={"t": 10}).to_plotly_json()
        context = fit["importance"]["context"]
        image = sorted(fit["importance"]["image"].items(), key=lambda item: -item[1])[:TOP_IMAGE_FEATURES]
        both = make_subplots(rows=1, cols=2, subplot_titles=["context features", f"top {len(image)} image features"])
        both.add_trace(_bars(go, list(context), context.values(), "context", "#f58518"), row=1, col=1)
        both.add_trace(_bars(go, [n for n, _ in image], [v for _, v in image], "image"), row=1, col=2)
        both.update_layout(height=340, showlegend=False, margin={"t": 30, "l": 110})
        figures["importance"] = both.to_plotly_json()
    if data["clusters"] and data["clusters"]["points"]:
        points, labels = np.array(data["clusters"]["points"]), data["clusters"]["labels"]
        traces = [go.Scatter(x=points[np.array(labels) == c, 0].tolist(), y=points[np.array(labels) == c, 1].tolist(),
                             mode="markers", name=f"cluster {c}",
                             text=[label(t) for t, c_of in zip(data["clusters"]["types"], labels) if c_of == c])
                  for c in range(data["clusters"]["k"])]
        figures["clusters"] = go.Figure(traces).update_layout(
            height=360, margin={"t": 10}, xaxis={"title": "PC 1"}, yaxis={"title": "PC 2"}).to_plotly_json()
    return figures


STYLE = REPORT_STYLE + """
nav button{font-size:15px;padding:6px 14px;margin-right:4px;border:1px solid #888;background:#eee;cursor:pointer}
nav button.active{background:#4c78a8;color:#fff}section.view{display:none}section.view.active{display:block}
.note{color:#555;font-size:12px}td.num{text-align:right}tr.refused td{color:#999}
.pair{display:grid;grid-template-columns:1fr 1fr;gap:18px}.card{border:1px solid #ccc;border-radius:4px;padding:8px}
.card svg{width:256px;height:256px;background:#000}.ig{display:flex;align-items:center;gap:4px;font-size:12px}
.ig span.bar{display:inline-block;height:9px;background:#f58518}
.banner{background:#fff3cd;border:1px solid #d4a017;border-radius:4px;padding:6px 10px}
"""

SCRIPT = r"""
const DATA = JSON.parse(document.getElementById('cohort-data').textContent);
const drawn = {};
function draw(id) {  // plots are drawn when their view is first shown: a hidden plot has no size
  const figure = DATA.figures[id], element = document.getElementById(id);
  if (!figure || !element) return Promise.resolve();
  if (drawn[id]) return Plotly.Plots.resize(element);
  drawn[id] = true;
  return Plotly.newPlot(element, figure.data, figure.layout, {displaylogo: false, responsive: true});
}
function show(view) {
  document.body.dataset.ready = 'false';
  for (const b of document.querySelectorAll('nav button')) b.classList.toggle('active', b.dataset.view === view);
  for (const s of document.querySelectorAll('section.view')) s.classList.toggle('active', s.id === view);
  return Promise.all([...document.querySelectorAll('#' + view + ' .plot')].map(e => draw(e.id)))
    .then(() => { document.body.dataset.ready = 'true'; });
}
const fmt = (v, d = 3) => (v === null || v === undefined || v === '') ? 'unknown'
  : (typeof v === 'number' ? (Number.isInteger(v) ? String(v) : v.toFixed(d)) : String(v));
function esc(text) { const d = document.createElement('div'); d.textContent = text; return d.innerHTML; }
function box(b, colour, dash, frame) {
  const s = 256 / frame;
  return `<rect x="${b[0] * s}" y="${b[1] * s}" width="${(b[2] - b[0]) * s}" height="${(b[3] - b[1]) * s}"
    fill="none" stroke="${colour}" stroke-width="1.5" ${dash ? 'stroke-dasharray="3 2"' : ''}/>`;
}
function card(item) {
  if (!item) return '<p class="note">Choose a lesion.</p>';
  let svg = '<p class="note">no key slice picture</p>';
  if (item.picture) {
    svg = `<svg viewBox="0 0 256 256" class="overlay"><image href="${item.picture}" width="256" height="256"/>`
      + (item.truth_box ? box(item.truth_box, '#2ca02c', false, item.frame) : '')
      + item.others.map(b => box(b, '#2ca02c', true, item.frame)).join('')
      + item.findings.map(f => box(f.box, '#ff7f0e', false, item.frame)).join('') + '</svg>';
  }
  const rows = Object.entries(item.context).map(([k, v]) => `<tr><td>${esc(k)}</td><td>${esc(fmt(v))}</td></tr>`);
  let model = '<p class="note">' + (item.id.startsWith('series-') ? 'a CT series: no gated model (no reference '
    + 'standard to fit); its image columns are in the table below the picture' : 'not in the fitted model (untyped, '
    + 'or no fit yet)') + '</p>';
  const p = item.prediction;
  if (p) {
    const ig = Object.entries(p.ig_context).concat([['image (sum)', p.ig_image]]);
    const top = Math.max(...ig.map(([, v]) => v), 1e-9);
    model = `<p class="gate">image weight <b>${p.image_weight.toFixed(3)}</b> · context weight
      ${(1 - p.image_weight).toFixed(3)} · true <b>${esc(p.label)}</b> · predicted <b>${esc(p.predicted)}</b>
      (p ${p.probabilities[p.predicted].toFixed(3)}) · ${esc(p.split)}</p>`
      + ig.map(([k, v]) => `<div class="ig"><span style="width:120px">${esc(k)}</span>
        <span class="bar" style="width:${Math.round(160 * v / top)}px"></span>${v.toFixed(3)}</div>`).join('');
  }
  return `<h3>${esc(item.title)}</h3>${svg}<p class="note">green: annotated (dashed: the slice's other
    lesions); orange: the detector's findings at or above its operating point</p>
    ${model}<table class="context">${rows.join('')}</table>`;
}
function pick(side) {
  const id = document.getElementById('pick-' + side).value;
  document.getElementById('card-' + side).innerHTML = card(DATA.individuals.concat(DATA.series_items)
    .find(i => i.id === id));
}
for (const b of document.querySelectorAll('nav button')) b.addEventListener('click', () => show(b.dataset.view));
for (const side of ['a', 'b']) document.getElementById('pick-' + side).addEventListener('change', () => pick(side));
pick('a'); pick('b');
show('summary');
"""


def _interval(ci) -> str:
    return "–" if ci is None or any(v != v for v in ci) else f"[{ci[0]:.3f}, {ci[1]:.3f}]"


def _group_tables(data: dict[str, Any]) -> str:
    """The subgroup tables: detection and AUC per lesion column, counts per series column."""
    parts = []
    for entry in data["detection"]:
        rows = []
        for value, g in entry["groups"].items():
            if "refused" in g:
                rows.append(f"<tr class='refused'><td>{html.escape(value)}</td><td class='num'>{g['lesions']}</td>"
                            f"<td colspan='3'>{html.escape(g['refused'])}: not shown</td></tr>")
            else:
                rows.append(f"<tr><td>{html.escape(value)}</td><td class='num'>{g['lesions']}</td><td class='num'>"
                            f"{g['sensitivity']:.3f}</td><td>{_interval(g['ci'])}</td><td class='num'>"
                            f"{g['fps_per_slice']:.2f}</td></tr>")
        parts.append(f"<h3>Detection by {entry['column']}</h3><table class='detection' data-column='{entry['column']}'>"
                     "<thead><tr><th>group</th><th>lesions</th><th>sensitivity at 4 FPs</th><th>95 % CI (Wilson)"
                     "</th><th>FPs per key slice</th></tr></thead><tbody>" + "".join(rows) + "</tbody></table>")
    for entry in data["auc"]:
        rows = []
        for value, g in entry["groups"].items():
            cells = (f"<td colspan='2'>{html.escape(g['refused'])}: not shown</td>" if "refused" in g else
                     f"<td class='num'>{g['auc']:.3f}</td><td>{_interval(g['ci'])}</td>")
            rows.append(f"<tr{' class=refused' if 'refused' in g else ''}><td>{html.escape(value)}</td>"
                        f"<td class='num'>{g['test_lesions']}</td>{cells}<td class='num'>{g['image_weight']:.3f}"
                        "</td></tr>")
        parts.append(f"<h3>Gated model by {entry['column']} (test lesions)</h3><table class='auc' data-column="
                     f"'{entry['column']}'><thead><tr><th>group</th><th>test lesions</th><th>mean AUC</th><th>95 % "
                     "CI (bootstrap)</th><th>image weight</th></tr></thead><tbody>" + "".join(rows)
                     + "</tbody></table>")
    series = "".join(f"<tr><td>{html.escape(column)}</td><td>" + ", ".join(
        f"{html.escape(value)}: {count}" for value, count in counts.items()) + "</td></tr>"
                     for column, counts in data["groups"].items())
    parts.append("<h3>Series per group (every series of the table)</h3><p class='note'>Scanner, kernel, contrast and "
                 "body part come from DICOM headers only; the CT series here have no reference standard, so these "
                 "groups have counts and no metric.</p><table id='series-groups'>" + series + "</table>")
    return "".join(parts)


def render_report_html(data: dict[str, Any]) -> str:
    """The whole page for :func:`report_data`'s ``data``."""
    from plotly.offline import get_plotlyjs

    plotly_js = get_plotlyjs()
    if "</script" in plotly_js.lower():
        raise RuntimeError("this plotly.js cannot be inlined: it contains '</script'")
    page = dict(data, figures=build_figures(data))
    page.pop("rows")
    fit = data["fit"]
    auc_text = (f"The stored fit is not shown: {data['fit_problem']}" if data["fit_problem"] else
                "No gated model yet: run ctzoo cohort fit." if not fit else
                " · ".join(f"{name} {fit['results'][m]['test_auc_mean']:.3f} ± {fit['results'][m]['test_auc_sd']:.3f}"
                           for name, m in (("gated", "both"), ("image only", "image"), ("context only", "context")))
                + f" (test mean AUC over {len(fit['seeds'])} seeds; context: {fit['context_set']}; split: "
                  f"{fit['split_rule']}{_split_seed(fit)}; mean image weight on test "
                  f"{fit['mean_image_weight']['test']:.3f})")
    summary = (f"{data['series']} series · {data['lesions']} lesions"
               + (f" ({data.get('typed', 0)} typed) on {data.get('key_slices', 0)} key slices" if data["lesions"]
                  else "") + f" · {_failed_text(data['failed'])}"
               + f" · models: {', '.join(data['models']) or 'none'}")
    options = "".join(f"<option value='{i['id']}'>{i['id']} · {html.escape(str(i['context']['lesion_type']))}"
                      f" · {(i['prediction'] or {}).get('split', 'not fitted')}</option>" for i in data["individuals"])
    options += "".join(f"<option value='{i['id']}'>{html.escape(i['title'])} · {i['context'].get('findings')} "
                       "findings</option>" for i in data["series_items"])
    series_rows = "".join("<tr>" + "".join(f"<td>{html.escape(str(row.get(c, '')))}</td>" for c in (
        "series", "source", "age_band", "sex", "manufacturer", "model", "kernel", "thickness_band", "findings",
        "finding_long_mm", "liver_ml")) + "</tr>" for row in data["rows"] if row["source"] != "deeplesion")
    body = f"""<h1>Cohort: {html.escape(Path(data['cohort']).name)}</h1>{_synthetic_banner(data)}
<p id="overview">{html.escape(summary)}</p>
<nav><button data-view="summary">Summary</button><button data-view="group">Group</button>
<button data-view="individual">Individual</button></nav>
<section class="view" id="summary"><h2>Summary</h2><p id="auc-text">{html.escape(auc_text)}</p>
<div class="plot" id="auc"></div><h3>Image weight per test lesion</h3><div class="plot" id="gates"></div>
<h3>Feature importance (Integrated Gradients, mean |attribution| on test lesions)</h3><div class="plot"
id="importance"></div><h3>Context distributions (series; unknown in grey)</h3><div class="plot"
id="distributions">{_distributions_note(data)}</div><h3>Correlations of the lesions' context</h3>
<div class="plot" id="correlations"></div></section>
<section class="view" id="group"><h2>Groups</h2><p class="note">Sensitivity at the threshold giving 4 false
positives per key slice over the whole cohort ({_threshold(data)}); groups under {data['min_count']} lesions (test
lesions for AUC) are refused.</p>{_group_tables(data)}<h3>Clusters of similar lesions (k-means on image + context
features; PCA)</h3><div class="plot" id="clusters"></div>{_cluster_table(data)}</section>
<section class="view" id="individual"><h2>Individuals</h2><p><select id="pick-a">{options}</select>
<select id="pick-b"><option value="">(none)</option>{options}</select></p>
<div class="pair"><div class="card" id="card-a"></div><div class="card" id="card-b"></div></div>
<h3>CT series of the cohort</h3>{_series_note(data)}<table id="series-table"><thead><tr><th>series</th>
<th>source</th><th>age</th><th>sex</th><th>manufacturer</th><th>model</th><th>kernel</th><th>thickness</th>
<th>findings</th><th>largest mm</th><th>liver ml</th></tr></thead><tbody>{series_rows}</tbody></table></section>"""
    title = "ctzoo cohort report" + (" (synthetic lesions)" if data["synthetic"] else "")
    return (f"<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>{title}</title>"
            f"<style>{STYLE}</style><script>{plotly_js}</script></head><body>{body}"
            f"<script type='application/json' id='cohort-data'>{json_for_script(page)}</script>"
            f"<script>{SCRIPT}</script></body></html>")


def _synthetic_banner(data: dict[str, Any]) -> str:
    """Above the views, so every view shows it: the lesions of a miniature are synthetic (``cohort.json``'s
    ``synthetic``, set by the build), and no figure on the page is a figure on patients."""
    made = data["synthetic"]
    if not made:
        return ""
    origin = f"{made.get('generator', 'a generator')}, seed {made.get('seed')}, {made.get('cases')} cases"
    return ("<p id='synthetic' class='banner'><b>Synthetic lesions.</b> This cohort's DeepLesion data is a miniature ("
            f"{html.escape(str(origin))}): real CT anatomy, every lesion synthetic. Its figures show what the pipeline "
            "measures, not how the models do on patients.</p>")


def _split_seed(fit: dict[str, Any]) -> str:
    return "" if fit["split_rule"] == "csv" or fit["split_seed"] is None else f", split seed {fit['split_seed']}"


def _failed_text(failed: dict[str, Any]) -> str:
    errors = ", ".join(f"{name} {count}" for name, count in failed["errors"].items())
    return f"{failed['count']} inputs not read" + (f" ({errors})" if errors else "")


def _distributions_note(data: dict[str, Any]) -> str:
    if data["series"]:
        return ""
    return f"<p class='note' id='no-series'>No series could be read ({data['failed']['count']} failed).</p>"


def _series_note(data: dict[str, Any]) -> str:
    left_out = data["ct_series"] - len(data["series_items"])
    if left_out <= 0:
        return ""
    return (f"<p class='note' id='series-left-out'>The first {len(data['series_items'])} of {data['ct_series']} CT "
            f"series are offered above with their pictures ({left_out} left out: --individuals); the table lists "
            "them all.</p>")


def _threshold(data: dict[str, Any]) -> str:
    if not data["detection"]:
        return "no lesions"
    return f"score ≥ {data['detection'][0]['threshold']:.4f}"


def _cluster_table(data: dict[str, Any]) -> str:
    if not data["clusters"] or not data["clusters"]["clusters"]:
        return ""
    rows = "".join(f"<tr><td>{c['cluster']}</td><td class='num'>{c['size']}</td><td>"
                   + html.escape(", ".join(f"{t} {n}" for t, n in c["types"].items()))
                   + f"</td><td class='num'>{c['found']:.2f}</td><td class='num'>{c['long_mm']:.1f}</td></tr>"
                   for c in data["clusters"]["clusters"])
    return ("<table id='clusters-table'><thead><tr><th>cluster</th><th>lesions</th><th>types</th><th>found at the "
            "operating point</th><th>median long axis mm</th></tr></thead><tbody>" + rows + "</tbody></table>")


def write_report(cohort: str | Path, out: str | Path | None = None,
                 say: Callable[[str], None] = lambda message: None, **options: Any) -> Path:
    """Write the page (default ``COHORT/report.html``) atomically; return its path. ``say`` is told why a stored
    fit is not drawn."""
    cohort = Path(cohort)
    target = Path(out) if out is not None else cohort / REPORT_FILE
    data = report_data(cohort, **options)
    if data["fit_problem"]:
        say(f"the stored fit is not shown: {data['fit_problem']}")
    text = render_report_html(data)
    with atomic_path(target) as partial:
        partial.write_text(text, encoding="utf-8")
    return target
