"""``ctzoo smap view MAP --site SITE``: what one party learned, as one self-contained HTML page (plotly inline, works
offline): its own points in the joint map, coloured by their coarse lesion type (from its own site file, never
sent), over the density of the other sites' points (SMAP's aggregated view); with a map every party agreed to share,
every point, coloured by site or by type. Its note says how the map was computed (on secret shares or, with
``--insecure-plaintext``, in the clear), as the map file records.

:func:`read_map` checks the party's ``.npz`` (``ctzoo smap party --out``) against the site file it was run with (the
SHA-256 of its bytes, which the map file records); :func:`render_map_html` writes the page.
"""

from __future__ import annotations

import html
from pathlib import Path
from typing import Any

import numpy as np

from ctzoo.datasets.deeplesion.info_csv import LESION_TYPES
from ctzoo.perf.report import STYLE as REPORT_STYLE
from ctzoo.perf.report import json_for_script
from ctzoo.smap.secure import SATURATED
from ctzoo.smap.site_file import load_arrays, site_digest

MAP_ARRAYS = ("index", "shared", "plaintext", "site_digest", "counts", "own", "extent", "density", "others_density")
#: What map files of an older ``ctzoo smap party`` lack: they cannot say how the map was computed, nor from which
#: site file.
NEWER_ARRAYS = ("plaintext", "site_digest")


def read_map(map_path: str | Path, site: dict[str, Any]) -> dict[str, Any]:
    """A party's map file with its site's labels; ValueError naming the file for anything that does not fit."""
    map_path = Path(map_path)
    arrays = load_arrays(map_path, "map file of ctzoo smap party")
    missing = [name for name in MAP_ARRAYS if name not in arrays]
    if missing and set(missing) <= set(NEWER_ARRAYS):
        raise ValueError(f"{map_path} was written by an older ctzoo smap party (it lacks {', '.join(missing)}): "
                         "run the party again")
    if missing:
        raise ValueError(f"{map_path} is not a map file of ctzoo smap party (missing {', '.join(missing)})")
    own = arrays["own"]
    if len(own) == 0:
        raise ValueError(f"{map_path} is a helper's map: it placed no lesions of its own, there is no page to draw")
    if str(arrays["site_digest"]) != site_digest(site["path"]) or own.shape != (len(site["labels"]), 2):
        raise ValueError(f"{map_path} was computed from another site file than {site['path']} (the SHA-256 it "
                         "records differs): give the site file this party ran with")
    # map files from before the saturation bit: their P was not checked
    return {"p_saturated": np.asarray(False), **arrays, "labels": site["labels"], "path": str(map_path)}


def site_numbers(counts: Any) -> dict[int, int]:
    """Each site's number on the page, from 1 in party order, by party index: parties without lesions (helpers) are
    not sites, so party indices would skip numbers, and "Site 0 of 3" read as one of four."""
    sites = [pid for pid, count in enumerate(counts) if int(count) > 0]
    return {pid: number for number, pid in enumerate(sites, start=1)}


def label_name(code: int) -> str:
    return LESION_TYPES.get(int(code), "unknown") if int(code) >= 1 else "unlabelled"


def build_figure(data: dict[str, Any]) -> dict[str, Any]:
    """The plotly figure: the others' density as a heatmap, the own points by type (or every point by site)."""
    import plotly.graph_objects as go

    x_low, x_high, y_low, y_high = (float(v) for v in data["extent"])
    grid = data["density"].shape[0]
    centres_x = x_low + (np.arange(grid) + 0.5) * (x_high - x_low) / grid
    centres_y = y_low + (np.arange(grid) + 0.5) * (y_high - y_low) / grid
    figure = go.Figure()
    if not bool(data["shared"]):
        figure.add_trace(go.Heatmap(x=centres_x.tolist(), y=centres_y.tolist(), z=data["others_density"].T.tolist(),
                                    colorscale=[[0, "#ffffff"], [1, "#5f5f5f"]], zmin=0, name="other sites",
                                    showscale=True, colorbar={"title": "other sites' lesions per cell"},
                                    hoverinfo="z"))
        own, labels = data["own"], data["labels"]
        for code in sorted(set(int(c) for c in labels)):
            rows = labels == code
            figure.add_trace(go.Scatter(x=own[rows, 0].tolist(), y=own[rows, 1].tolist(), mode="markers",
                                        name=f"this site: {label_name(code)} ({int(rows.sum())})",
                                        marker={"size": 9, "line": {"width": 1, "color": "#000"}}))
    else:
        points, sites = data["all_points"], data["all_sites"]
        numbers = site_numbers(data["counts"])
        for site in sorted(set(int(s) for s in sites)):
            rows = sites == site
            this = site == int(data["index"])
            figure.add_trace(go.Scatter(
                x=points[rows, 0].tolist(), y=points[rows, 1].tolist(), mode="markers",
                name=f"site {numbers[site]}{' (this site)' if this else ''} ({int(rows.sum())})",
                text=[label_name(c) for c in data["all_labels"][rows]],
                marker={"size": 9 if this else 7, "line": {"width": 1 if this else 0, "color": "#000"}}))
    pad_x, pad_y = 0.05 * (x_high - x_low), 0.05 * (y_high - y_low)  # points on the extent stay whole
    figure.update_layout(height=680, margin={"t": 40}, xaxis={"title": "t-SNE 1", "range": [x_low - pad_x,
                                                                                        x_high + pad_x]},
                         yaxis={"title": "t-SNE 2", "range": [y_low - pad_y, y_high + pad_y]},
                         legend={"orientation": "h", "x": 0, "y": 1.01, "yanchor": "bottom"})
    return figure.to_plotly_json()


SCRIPT = """
const DATA = JSON.parse(document.getElementById('map-data').textContent);
Plotly.newPlot('map', DATA.figure.data, DATA.figure.layout, {displaylogo: false, responsive: true})
  .then(() => { document.body.dataset.ready = 'true'; });
"""


def how_computed(plaintext: bool, shared: bool, saturated: bool = False) -> str:
    """The page's note on how the map was computed and what it shows, from the map file's record."""
    if plaintext:
        return ("The map was computed in the clear (--insecure-plaintext): every site opened its features and labels "
                "to every party, and each computed the same t-SNE.")
    secure = "The map was computed on secret shares (ctzoo smap party): no site saw another's features. "
    if saturated:
        secure += SATURATED[0].upper() + SATURATED[1:] + ". "
    if shared:
        return secure + "Every site then agreed to share its points (--share-points): all are shown, by site and type."
    return secure + "This site's labels come from its own site file; the other sites' points are counts per cell."


def render_map_html(data: dict[str, Any]) -> str:
    """The whole page for :func:`read_map`'s ``data``."""
    from plotly.offline import get_plotlyjs

    plotly_js = get_plotlyjs()
    if "</script" in plotly_js.lower():
        raise RuntimeError("this plotly.js cannot be inlined: it contains '</script'")
    counts = [int(c) for c in data["counts"]]
    index = int(data["index"])
    others = sum(counts) - counts[index]
    helpers = counts.count(0)  # parties without lesions (--helper) are not sites
    parties = f"Site {site_numbers(counts)[index]} of {len(counts) - helpers}" + (
        f" (and {helpers} helper{'s' * (helpers > 1)})" if helpers else "")
    summary = (f"{parties} · {counts[index]} of its lesions placed among {sum(counts)} · "
               + ("every site agreed to share its points: all are shown" if bool(data["shared"]) else
                  f"the other sites' {others} lesions are shown as density only"))
    note = how_computed(bool(data["plaintext"]), bool(data["shared"]), bool(data["p_saturated"]))
    return ("<!DOCTYPE html><html lang='en'><head><meta charset='utf-8'><title>ctzoo joint map</title>"
            f"<style>{REPORT_STYLE}</style><script>{plotly_js}</script></head><body>"
            f"<h1>Joint t-SNE map</h1><p id='summary'>{html.escape(summary)}</p><p class='note'>{html.escape(note)}"
            "</p><div id='map'></div>"
            f"<script type='application/json' id='map-data'>{json_for_script({'figure': build_figure(data)})}</script>"
            f"<script>{SCRIPT}</script></body></html>")
