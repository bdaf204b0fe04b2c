"""``ctzoo nas view RUN``: a search run's candidates as one self-contained HTML page (NAS-Navigator's views).

The search writes ``RUN/candidates.json`` (:data:`SCHEMA`): the space, one entry per iteration (its constraints,
steps and candidate ids) and one per candidate (architecture, description, mask/choice ``vector``, Dice, latency,
params, FLOPs). Small pure steps turn it into the page:

* :func:`read_candidates`: the file, validated (``ValueError`` with a clear message, never a traceback);
* :func:`pareto_front`: the candidates no other beats on both Dice (higher) and latency (lower);
* :func:`embedding`: the ``vector`` s in 2-D by PCA (numpy SVD; each axis's sign fixed so that its largest
  loading is positive, so the same vectors always give the same picture);
* :func:`marginal_effects`: per decision of the ``architecture`` JSON (nested keys flattened, ``levels.2.kernel``)
  and per value it takes, the mean Dice and latency of the candidates with it, and the difference to those without
  it (the paper's "block marginal effect");
* :func:`iteration_history`: per iteration, its candidates, best Dice, front size and constraints;
* :func:`render_explorer_html`: the page. plotly.js inline once, the data as JSON (the perf report's
  :func:`~ctzoo.perf.report.json_for_script`), so it opens offline.

plotly is imported on use only (as in :mod:`ctzoo.perf.report`).
"""

from __future__ import annotations

import html
import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.io.projection import Embedding, embedding
from ctzoo.perf.report import STYLE as REPORT_STYLE
from ctzoo.perf.report import json_for_script

#: The ``schema`` of ``candidates.json`` this page reads.
SCHEMA = 1
CANDIDATES_FILE = "candidates.json"
#: The value label of a decision a candidate's architecture does not have (e.g. a level of a shallower network).
ABSENT = "(absent)"

_NUMBER = (int, float)
CANDIDATE_FIELDS = {"id": (str,), "iteration": (int,), "architecture": (dict,), "description": (str,),
                    "vector": (list,), "dice": _NUMBER, "latency_ms": _NUMBER, "params": (int,), "flops": (int,)}
ITERATION_FIELDS = {"iteration": (int,), "constraints": (dict,), "steps": (int,), "candidates": (list,)}
CONSTRAINT_FIELDS = {"drop": (list,), "lock": (list,)}


# --- reading ----------------------------------------------------------------------------------------------------

def read_candidates(run: str | Path) -> dict:
    """``RUN/candidates.json`` (or that file named directly), validated: ``{"run", "path", "space", "iterations",
    "candidates"}``. ValueError, saying what is wrong and where, for a missing file, bad JSON, another schema, a
    candidate or iteration missing a field or holding a wrong type, or ids that do not match up."""
    path = Path(run)
    path = path / CANDIDATES_FILE if path.is_dir() else path
    if not path.is_file():
        raise ValueError(f"{path} does not exist: RUN must be a NAS search run folder (holding {CANDIDATES_FILE}) "
                         "or that file")
    try:
        document = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path} is not valid JSON: {error}") from None
    schema = document.get("schema") if isinstance(document, dict) else None
    if schema != SCHEMA:
        raise ValueError(f"{path} is not a NAS candidates file of schema {SCHEMA} (its schema: {schema!r})")
    for name, kind in (("space", dict), ("iterations", list), ("candidates", list)):
        if not isinstance(document.get(name), kind):
            raise ValueError(f"{path}: '{name}' is missing or not a JSON {'object' if kind is dict else 'array'}")
    candidates, iterations = document["candidates"], document["iterations"]
    if not candidates:
        raise ValueError(f"{path} holds no candidates")
    for index, candidate in enumerate(candidates):
        where = f"candidate {index}" + (f" ({candidate['id']!r})" if isinstance(candidate, dict)
                                        and isinstance(candidate.get("id"), str) else "")
        if isinstance(candidate, dict) and "dice" in candidate and candidate["dice"] is None:
            raise ValueError(f"{path}: {where}: dice is null: it was scored on cases holding none of the search's "
                             "classes, which ranks nothing (ctzoo nas search now refuses such data); search again")
        _check_fields(path, where, candidate, CANDIDATE_FIELDS)
        if not isinstance(candidate.get("reference", False), bool):
            raise ValueError(f"{path}: {where}: reference must be true or false")
        numbers = [candidate["dice"], candidate["latency_ms"], *candidate["vector"]]
        if not all(isinstance(x, _NUMBER) and not isinstance(x, bool) and math.isfinite(x) for x in numbers):
            raise ValueError(f"{path}: {where}: dice, latency_ms and every vector entry must be finite numbers")
    for index, iteration in enumerate(iterations):
        _check_fields(path, f"iteration entry {index}", iteration, ITERATION_FIELDS)
        _check_fields(path, f"the constraints of iteration entry {index}", iteration["constraints"],
                      CONSTRAINT_FIELDS)
    _check_references(path, candidates, iterations)
    return {"run": str(path.parent), "path": str(path), "space": document["space"], "iterations": iterations,
            "candidates": candidates}


def _check_fields(path: Path, where: str, entry: Any, fields: dict[str, tuple[type, ...]]) -> None:
    if not isinstance(entry, dict):
        raise ValueError(f"{path}: {where} is not a JSON object")
    missing = [name for name in fields if name not in entry]
    if missing:
        raise ValueError(f"{path}: {where} lacks {', '.join(missing)}")
    for name, kinds in fields.items():
        value = entry[name]
        if not isinstance(value, kinds) or (isinstance(value, bool) and bool not in kinds):
            wanted = " or ".join(kind.__name__ for kind in kinds)
            raise ValueError(f"{path}: {where}: {name} is {type(value).__name__} {value!r:.40}, not {wanted}")


def _check_references(path: Path, candidates: list[dict], iterations: list[dict]) -> None:
    """Unique ids, vectors of one length, and iterations and candidates that name each other."""
    ids = [c["id"] for c in candidates]
    if len(set(ids)) < len(ids):
        repeated = sorted({i for i in ids if ids.count(i) > 1})
        raise ValueError(f"{path}: candidate ids repeat: {', '.join(repeated[:5])}")
    lengths = sorted({len(c["vector"]) for c in candidates})
    if len(lengths) > 1:
        raise ValueError(f"{path}: candidate vectors differ in length ({', '.join(map(str, lengths))})")
    listed = {entry["iteration"]: entry["candidates"] for entry in iterations}
    if len(listed) < len(iterations):
        raise ValueError(f"{path}: two iteration entries have the same number")
    for candidate in candidates:
        if candidate["id"] not in listed.get(candidate["iteration"], ()):
            raise ValueError(f"{path}: candidate {candidate['id']!r} is of iteration {candidate['iteration']}, "
                             "but that iteration's entry does not list it")
    unknown = sorted({str(i) for ids_ in listed.values() for i in ids_} - set(ids))
    if unknown:
        raise ValueError(f"{path}: the iterations list candidates that are not in 'candidates': "
                         f"{', '.join(unknown[:5])}")


# --- analysis ---------------------------------------------------------------------------------------------------

def pareto_front(candidates: list[dict]) -> list[str]:
    """The ids of the candidates no other dominates (at least as high a Dice and as low a latency, better in one),
    fastest first. Candidates with equal Dice and equal latency are all kept (neither dominates the other)."""
    front, best = [], None  # best: (dice, latency) of the last point on the front
    for candidate in sorted(candidates, key=lambda c: (c["latency_ms"], -c["dice"], c["id"])):
        point = (candidate["dice"], candidate["latency_ms"])
        if best is None or point[0] > best[0] or point == best:
            front.append(candidate["id"])
            best = point
    return front


def flatten(value: Any, prefix: str | None = None) -> list[tuple[str, Any]]:
    """An architecture's decisions as ``[(dotted key, value)]``: nested objects and arrays become dotted keys
    (``{"levels": [{"kernel": 3}]}`` -> ``[("levels.0.kernel", 3)]``); empty ones are values themselves."""
    if isinstance(value, dict) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = enumerate(value)
    else:
        return [] if prefix is None else [(prefix, value)]
    return [pair for key, item in items for pair in flatten(item, str(key) if prefix is None else f"{prefix}.{key}")]


def value_label(value: Any) -> str:
    """How the page writes a decision's value: strings as they are, anything else as JSON (``true``, ``0.5``)."""
    return value if isinstance(value, str) else json.dumps(value, separators=(",", ":"))


def _natural(text: str) -> list[tuple[int, Any]]:
    """Sort key: ``levels.10`` after ``levels.2``; numbers in their order before words, :data:`ABSENT` last."""
    if text == ABSENT:
        return [(3, "")]
    try:
        return [(0, float(text))]
    except ValueError:
        pass
    return [(0, int(part)) if part.isdigit() else (2, part) for part in text.split(".")]


def marginal_effects(candidates: list[dict]) -> list[dict]:
    """Per decision (a flattened ``architecture`` key) and value: ``{"decision", "value" (its label), "count",
    "dice", "latency_ms"}`` (the means over the candidates with that value) and ``dice_effect`` /
    ``latency_effect``: those means minus the means of the candidates without it (None where every candidate has
    it). A candidate that lacks a decision counts under the value :data:`ABSENT`."""
    flat = [dict(flatten(c["architecture"])) for c in candidates]
    dice = np.array([c["dice"] for c in candidates], dtype=float)
    latency = np.array([c["latency_ms"] for c in candidates], dtype=float)
    effects = []
    for decision in sorted({key for choices in flat for key in choices}, key=_natural):
        labels = np.array([value_label(c[decision]) if decision in c else ABSENT for c in flat], dtype=object)
        for label in sorted(set(labels), key=_natural):
            with_, without = labels == label, labels != label
            effects.append({
                "decision": decision, "value": label, "count": int(with_.sum()),
                "dice": float(dice[with_].mean()), "latency_ms": float(latency[with_].mean()),
                "dice_effect": float(dice[with_].mean() - dice[without].mean()) if without.any() else None,
                "latency_effect": float(latency[with_].mean() - latency[without].mean()) if without.any() else None})
    return effects


def iteration_history(data: dict) -> list[dict]:
    """Per iteration of the file: ``{"iteration", "steps", "drop", "lock", "count", "best_id", "best_dice",
    "front", "front_so_far"}`` (front: of its own candidates; so far: of those of it and earlier iterations)."""
    history = []
    for entry in sorted(data["iterations"], key=lambda e: e["iteration"]):
        own = [c for c in data["candidates"] if c["iteration"] == entry["iteration"]]
        so_far = [c for c in data["candidates"] if c["iteration"] <= entry["iteration"]]
        best = _best(own)
        history.append({"iteration": entry["iteration"], "steps": entry["steps"], "count": len(own),
                        "drop": [value_label(d) for d in entry["constraints"]["drop"]],
                        "lock": [value_label(lock) for lock in entry["constraints"]["lock"]],
                        "best_id": best and best["id"], "best_dice": best and best["dice"],
                        "front": len(pareto_front(own)), "front_so_far": len(pareto_front(so_far))})
    return history


def _best(candidates: list[dict]) -> dict | None:
    """The highest Dice; of equal ones the fastest."""
    return min(candidates, key=lambda c: (-c["dice"], c["latency_ms"], c["id"]), default=None)


# --- the page ---------------------------------------------------------------------------------------------------

def _si(value: float) -> str:
    for scale, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {prefix}"
    return f"{value:.3g} "


def candidate_texts(candidate: dict) -> dict:
    """How the hover labels and the panel write a candidate's numbers."""
    return {"dice": f"{candidate['dice']:.4f}", "latency": f"{candidate['latency_ms']:.4g} ms",
            "params": f"{_si(candidate['params'])}params", "flops": f"{_si(candidate['flops'])}FLOP"}


HOVER = ("<b>%{customdata[0]}</b><br>%{customdata[1]}<br>Dice %{customdata[2]} · %{customdata[3]}<br>"
         "%{customdata[4]} · %{customdata[5]}<extra></extra>")


def _hover(candidate: dict) -> list[str]:
    texts = candidate_texts(candidate)
    return [candidate["id"], html.escape(candidate["description"]), texts["dice"], texts["latency"],
            texts["params"], texts["flops"]]


def _selected_trace(go):
    """The (empty) trace the page moves to the clicked candidate."""
    return go.Scatter(x=[], y=[], mode="markers", name="selected", showlegend=False, hoverinfo="skip",
                      marker={"symbol": "star", "size": 20, "color": "#d62728", "line": {"width": 1, "color": "#000"}})


REFERENCE_TRACE = "reference: the config's own model"


def build_figures(data: dict, front: list[str], points: Embedding, effects: list[dict]) -> dict:
    """The scatter, the embedding and the marginal effects as plotly figure JSON."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    candidates, layout = data["candidates"], {"hovermode": "closest", "margin": {"l": 10, "r": 10, "t": 30, "b": 40}}
    scatter = go.Figure()
    for index, iteration in enumerate(sorted({c["iteration"] for c in candidates})):
        members = [c for c in candidates if c["iteration"] == iteration]
        scatter.add_trace(go.Scatter(
            x=[c["latency_ms"] for c in members], y=[c["dice"] for c in members], mode="markers",
            name=f"iteration {iteration} ({len(members)})", customdata=[_hover(c) for c in members],
            hovertemplate=HOVER, marker={"size": 10, "color": qualitative.Plotly[index % len(qualitative.Plotly)],
                                         "line": {"width": 1, "color": "white"}}))
    by_id = {c["id"]: c for c in candidates}
    on_front = [by_id[i] for i in front]
    scatter.add_trace(go.Scatter(
        x=[c["latency_ms"] for c in on_front], y=[c["dice"] for c in on_front], mode="lines+markers",
        name=f"Pareto front ({len(front)})", customdata=[_hover(c) for c in on_front], hovertemplate=HOVER,
        line={"shape": "hv", "color": "#333", "width": 1.5},
        marker={"symbol": "circle-open", "size": 16, "color": "#333", "line": {"width": 2}}))
    references = [c for c in candidates if c.get("reference")]
    if references:  # the model the search started from (search --reference): where it stands among the candidates
        scatter.add_trace(go.Scatter(
            x=[c["latency_ms"] for c in references], y=[c["dice"] for c in references], mode="markers",
            name=REFERENCE_TRACE, customdata=[_hover(c) for c in references], hovertemplate=HOVER,
            marker={"symbol": "diamond-open", "size": 18, "color": "#d62728", "line": {"width": 2.5}}))
    scatter.add_trace(_selected_trace(go))
    scatter.update_layout(height=460, legend={"orientation": "h", "y": 1.1, "x": 0}, **layout,
                          xaxis={"title": "latency (ms)"}, yaxis={"title": "Dice"})
    front_ids = set(front)
    embedded = go.Figure([go.Scatter(
        x=points.points[:, 0], y=points.points[:, 1], mode="markers", name="candidates", hovertemplate=HOVER,
        customdata=[_hover(c) for c in candidates],
        marker={"size": 10, "color": [c["dice"] for c in candidates], "colorscale": "Viridis", "showscale": True,
                "colorbar": {"title": {"text": "Dice"}},
                "line": {"width": [2.5 if c["id"] in front_ids else 0.5 for c in candidates],
                         "color": ["#000" if c["id"] in front_ids else "#fff" for c in candidates]}}),
        _selected_trace(go)])
    embedded.update_layout(height=420, showlegend=False, **layout,
                           xaxis={"title": f"PC1 ({points.explained[0]:.0%} of the variance)", "zeroline": False},
                           yaxis={"title": f"PC2 ({points.explained[1]:.0%} of the variance)", "zeroline": False})
    return {"scatter": json.loads(scatter.to_json()), "embedding": json.loads(embedded.to_json()),
            "marginals": json.loads(_marginals_figure(go, make_subplots, candidates, effects).to_json())}


def marginal_rows(effects: list[dict]) -> list[str]:
    """The marginal plot's row labels: ``decision = value · n=count``."""
    return [f"{e['decision']} = {e['value']} · n={e['count']}" for e in effects]


def _signed(value: float | None, digits: str) -> str:
    return "no candidate without it" if value is None else f"{value:+{digits}} vs without"


def _marginals_figure(go, make_subplots, candidates: list[dict], effects: list[dict]):
    rows = marginal_rows(effects)
    customdata = [[e["decision"], e["value"], e["count"], f"{e['dice']:.4f}", _signed(e["dice_effect"], ".4f"),
                   f"{e['latency_ms']:.4g} ms", _signed(e["latency_effect"], ".3g")] for e in effects]
    hover = ("<b>%{customdata[0]} = %{customdata[1]}</b> (%{customdata[2]} candidates)<br>mean Dice %{customdata[3]}"
             " (%{customdata[4]})<br>mean latency %{customdata[5]} (%{customdata[6]})<extra></extra>")
    figure = make_subplots(rows=1, cols=2, shared_yaxes=True, horizontal_spacing=0.03,
                           subplot_titles=("mean Dice of the candidates with the value", "mean latency (ms)"))
    colours = marginal_colours(effects)
    for column, key in ((1, "dice"), (2, "latency_ms")):
        figure.add_trace(go.Scatter(x=[e[key] for e in effects], y=rows, mode="markers", name=key,
                                    customdata=customdata, hovertemplate=hover,
                                    marker={"size": 10, "color": colours}), row=1, col=column)
        mean = float(np.mean([c[key] for c in candidates]))  # the mean over all: where no effect would sit
        figure.add_vline(x=mean, line={"dash": "dot", "color": "#888", "width": 1}, row=1, col=column)
    figure.update_yaxes(categoryorder="array", categoryarray=rows, autorange="reversed", automargin=True,
                        tickfont={"size": 11}, row=1, col=1)
    figure.update_layout(height=90 + 19 * len(rows), showlegend=False, hovermode="closest",
                         margin={"l": 10, "r": 10, "t": 40, "b": 30})
    return figure


def marginal_colours(effects: list[dict]) -> list[str]:
    """One colour per decision, alternating, so a decision's values read as a group."""
    decisions = list(dict.fromkeys(e["decision"] for e in effects))
    return [("#4a6fa5", "#e08a2c")[decisions.index(e["decision"]) % 2] for e in effects]


def _history_html(history: list[dict]) -> str:
    def cell(value: Any) -> str:
        return f"<td>{html.escape(str(value))}</td>"

    rows = "".join(
        f"<tr data-iteration='{h['iteration']}'>" + "".join(cell(v) for v in (
            h["iteration"], h["steps"], h["count"],
            "—" if h["best_id"] is None else f"{h['best_dice']:.4f} ({h['best_id']})", h["front"], h["front_so_far"],
            ", ".join(h["drop"]) or "—", ", ".join(h["lock"]) or "—")) + "</tr>" for h in history)
    return ("<table id='history'><thead><tr><th>iteration</th><th>supernet steps</th><th>candidates</th>"
            "<th>best Dice (id)</th><th>front (its candidates)</th><th>front (so far)</th><th>dropped</th>"
            "<th>locked</th></tr></thead><tbody>" + rows + "</tbody></table>")


def _candidate_button(candidate: dict) -> str:
    texts = candidate_texts(candidate)
    return (f"<button class='pick' data-id='{html.escape(candidate['id'], quote=True)}'>"
            f"{html.escape(candidate['id'])}</button> Dice {texts['dice']} · {texts['latency']}")


def _header_html(data: dict, front: list[str], effects: list[dict]) -> str:
    by_id = {c["id"]: c for c in data["candidates"]}
    best = _best(data["candidates"])
    fastest = by_id[front[0]]  # the front is sorted fastest first
    decisions = len({e["decision"] for e in effects})
    return (f"<header><h1>ctzoo NAS explorer</h1><p id='summary'>{html.escape(data['run'])} · "
            f"{len(data['candidates'])} candidates · {len(data['iterations'])} iterations · {decisions} decisions · "
            f"{len(front)} on the Pareto front</p><p id='best'>best Dice: {_candidate_button(best)}"
            f" · fastest on the front: {_candidate_button(fastest)}"
            + "".join(f" · reference (the config's model): {_candidate_button(c)}" for c in data["candidates"]
                      if c.get("reference")) + "</p>"
            "<details><summary>search space</summary><pre id='space'>"
            f"{html.escape(json.dumps(data['space'], indent=1))}</pre></details></header>")


STYLE = REPORT_STYLE + """
.layout{grid-template-columns:minmax(0,1fr) 420px}
#candidate{border:1px solid #ccc;border-radius:4px;padding:8px;background:#fafafa;font-size:13px}
#candidate dt{font-weight:600;float:left;clear:left;width:110px}#candidate dd{margin:0 0 3px 116px}
#candidate table{margin-top:6px}#history tr.is-selected,#candidate tr.on-front{background:#fde8e8}
.pick{font:inherit;cursor:pointer}#space{max-height:240px;overflow:auto;font-size:12px}
.note{color:#555;font-size:12px;margin:0 0 6px}
"""

SCRIPT = """
const DATA = JSON.parse(document.getElementById('explorer-data').textContent);
const BY_ID = new Map(DATA.candidates.map(c => [c.id, c]));
const FRONT = new Set(DATA.front);
const CONFIG = {displaylogo: false, responsive: true};
function element(tag, text, className) {
  const node = document.createElement(tag);  // textContent only: ids and descriptions are never parsed as HTML
  if (text !== undefined) node.textContent = text;
  if (className) node.className = className;
  return node;
}
function row(cells) {
  const tr = element('tr');
  cells.forEach(c => tr.appendChild(element('td', String(c))));
  return tr;
}
function highlight(div, x, y) {
  const gd = document.getElementById(div);
  Plotly.restyle(gd, {x: [x], y: [y]}, [gd.data.length - 1]);  // the last trace: the selected star
}
function select(id) {
  const c = BY_ID.get(id), panel = document.getElementById('candidate');
  if (!c) return;
  panel.replaceChildren(element('h3', 'Candidate ' + c.id, 'candidate-id'), element('p', c.description, 'description'));
  const fields = element('dl');
  [['Dice', c.texts.dice], ['latency', c.texts.latency], ['params', c.texts.params], ['FLOPs', c.texts.flops],
   ['iteration', c.iteration], ['Pareto front', FRONT.has(c.id) ? 'yes' : 'no'],
   ['rank by Dice', c.rank + ' of ' + DATA.candidates.length]
  ].forEach(([name, value]) => {
    fields.appendChild(element('dt', name));
    fields.appendChild(element('dd', String(value)));
  });
  panel.appendChild(fields);
  panel.appendChild(element('h4', 'Architecture'));
  const table = element('table', undefined, 'architecture');
  c.flat.forEach(([key, value]) => table.appendChild(row([key, value])));
  panel.appendChild(table);
  highlight('scatter', [c.latency_ms], [c.dice]);
  highlight('embedding', [c.x], [c.y]);
  const choices = new Map(c.flat);
  const chosen = m => (choices.has(m.decision) ? choices.get(m.decision) : DATA.absent) === m.value;
  Plotly.restyle('marginals', {'marker.color': [DATA.marginals.map((m, i) =>
    chosen(m) ? '#d62728' : DATA.marginal_colours[i])]});
  document.querySelectorAll('#history tbody tr').forEach(tr =>
    tr.classList.toggle('is-selected', tr.dataset.iteration === String(c.iteration)));
  document.body.dataset.selected = c.id;
}
function onClick(event) {
  const point = event.points.find(p => Array.isArray(p.customdata) && BY_ID.has(p.customdata[0]));
  if (point) select(point.customdata[0]);
}
document.querySelectorAll('button.pick').forEach(b => b.addEventListener('click', () => select(b.dataset.id)));
Promise.all(['scatter', 'embedding', 'marginals'].map(div => Plotly.newPlot(
  div, DATA.figures[div].data, DATA.figures[div].layout, CONFIG).then(gd => {
  if (div !== 'marginals') gd.on('plotly_click', onClick);
}))).then(() => { document.body.dataset.ready = 'true'; });
"""


def render_explorer_html(data: dict) -> str:
    """The whole page for :func:`read_candidates`'s ``data``: plotly.js inline once, the data as JSON, the header,
    the scatter with its Pareto front, the embedding, the marginal effects, the history and the candidate panel."""
    from plotly.offline import get_plotlyjs

    plotly_js = get_plotlyjs()
    if "</script" in plotly_js.lower():  # would end the inline element early; never so far
        raise RuntimeError("this plotly.js cannot be inlined: it contains '</script'")
    candidates = data["candidates"]
    front, effects = pareto_front(candidates), marginal_effects(candidates)
    points = embedding([c["vector"] for c in candidates])
    rank = {c["id"]: r for r, c in enumerate(sorted(candidates, key=lambda c: (-c["dice"], c["latency_ms"])), 1)}
    page_data = {
        "front": front, "marginals": effects, "marginal_colours": marginal_colours(effects), "absent": ABSENT,
        "figures": build_figures(data, front, points, effects),
        "candidates": [{"id": c["id"], "iteration": c["iteration"], "description": c["description"],
                        "dice": c["dice"], "latency_ms": c["latency_ms"], "texts": candidate_texts(c),
                        "rank": rank[c["id"]], "x": float(x), "y": float(y),
                        "flat": [[key, value_label(value)] for key, value in flatten(c["architecture"])]}
                       for c, (x, y) in zip(candidates, points.points)]}
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>ctzoo NAS explorer</title>"
            f"<style>{STYLE}</style><script>{plotly_js}</script></head><body>"
            f"{_header_html(data, front, effects)}<div class='layout'><main>"
            "<h2>Dice against latency</h2><p class='note'>One point per candidate, coloured by iteration; the "
            "line is the Pareto front (highest Dice for its latency), its points ringed. Click a point.</p>"
            "<div id='scatter'></div><h2>Embedding of the candidates' vectors</h2><p class='note'>PCA of the "
            "vectors (numpy SVD; each axis's largest loading positive), coloured by Dice; the front's points "
            "outlined in black.</p><div id='embedding'></div><h2>Marginal effect of each decision</h2>"
            "<p class='note'>Per decision of the architecture and value: the mean Dice and latency of the "
            "candidates with it (n: how many); the dotted lines are the means over all candidates; the selected "
            "candidate's choices in red.</p><div id='marginals'></div><h2>Iterations</h2>"
            f"{_history_html(iteration_history(data))}</main><aside><h2>Candidate</h2><div id='candidate'>"
            "Click a candidate (a point of the scatter or the embedding, or a button above) to see its "
            "architecture.</div></aside></div>"
            f"<script type='application/json' id='explorer-data'>{json_for_script(page_data)}</script>"
            f"<script>{SCRIPT}</script></body></html>")
