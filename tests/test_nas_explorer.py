"""``ctzoo nas view``: a search run's candidates.json -> the CLI -> the page, read and clicked in headless chromium.

The run is synthetic but shaped like the search's: 24 candidates of a 3-level template segmenter over 2 iterations
(the second locks the sigmoid gate and drops kernel 5 at level 0), Dice and latency that follow the choices (wider,
more units and larger kernels cost time and buy Dice) plus noise, vectors one-hot over the choices.
"""

from __future__ import annotations

import importlib
import itertools
import json
import re
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.io.projection import embedding
from ctzoo.nas.explorer import (
    ABSENT,
    flatten,
    iteration_history,
    marginal_effects,
    pareto_front,
    read_candidates,
)

ROOT = Path(__file__).resolve().parents[1]
CHOICES = {"width": (0.5, 1.0), "units": (1, 2), "kernel": (3, 5), "fusion": (False, True)}


def architecture(rng: np.random.Generator, iteration: int) -> dict:
    levels = [{name: values[int(rng.integers(len(values)))] for name, values in CHOICES.items()} for _ in range(3)]
    if iteration == 1:
        levels[0]["kernel"] = 3  # dropped: kernel 5 at level 0
    return {"gate": "sigmoid" if iteration == 1 or rng.random() < 0.5 else "softmax", "levels": levels}


def vector(arch: dict) -> list[float]:
    """One-hot over every choice: a block mask of the supernet."""
    bits = [float(arch["gate"] == "sigmoid")]
    for level in arch["levels"]:
        bits += [float(level[name] == value) for name, values in CHOICES.items() for value in values]
    return bits


REFERENCE = "it0-c04"  # scored as the config's own model (search --reference)


def make_run(folder: Path, seed: int = 3) -> dict:
    rng, candidates, iterations = np.random.default_rng(seed), [], []
    for iteration, (drop, lock) in enumerate((([], []), (["levels.0.kernel=5"], ["gate=sigmoid"]))):
        ids = []
        for index in range(12):
            arch = architecture(rng, iteration)
            cost = sum(level["width"] * level["units"] * level["kernel"] ** 2 / 9 * (2 ** -depth)
                       for depth, level in enumerate(arch["levels"]))
            fusion = sum(level["fusion"] for level in arch["levels"])
            dice = 0.70 + 0.05 * np.log1p(cost) + 0.01 * fusion + 0.01 * iteration + rng.normal(0, 0.008)
            latency = 6.0 + 4.0 * cost + 0.8 * fusion + rng.normal(0, 0.2)
            params = int(120_000 * cost + 5_000 * fusion)
            candidate_id = f"it{iteration}-c{index:02d}"
            description = " ".join(f"L{d}:w{lv['width']}u{lv['units']}k{lv['kernel']}{'+f' if lv['fusion'] else ''}"
                                   for d, lv in enumerate(arch["levels"])) + f" {arch['gate']}"
            candidates.append({"id": candidate_id, "iteration": iteration, "architecture": arch,
                               "description": description, "vector": vector(arch), "dice": round(float(dice), 5),
                               "latency_ms": round(float(latency), 3), "params": params, "flops": params * 4096,
                               **({"reference": True} if candidate_id == REFERENCE else {})})
            ids.append(candidate_id)
        iterations.append({"iteration": iteration, "constraints": {"drop": drop, "lock": lock}, "steps": 400,
                           "candidates": ids})
    document = {"schema": 1, "space": {"levels": 3, "choices": {k: list(v) for k, v in CHOICES.items()},
                                       "gate": ["sigmoid", "softmax"]},
                "iterations": iterations, "candidates": candidates}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "candidates.json").write_text(json.dumps(document), encoding="utf-8")
    return document


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("nas-run")
    document = make_run(folder)
    result = CliRunner().invoke(main, ["nas", "view", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"{folder / 'explorer.html'}: 24 candidates over 2 iterations")
    return {"folder": folder, "document": document, "html": folder / "explorer.html"}


def point(identifier: str, dice: float, latency: float) -> dict:
    return {"id": identifier, "dice": dice, "latency_ms": latency}


def brute_force_front(candidates: list[dict]) -> set[str]:
    def dominates(b, a):
        return (b["dice"] >= a["dice"] and b["latency_ms"] <= a["latency_ms"]
                and (b["dice"] > a["dice"] or b["latency_ms"] < a["latency_ms"]))
    return {a["id"] for a in candidates if not any(dominates(b, a) for b in candidates)}


def test_pareto_front_keeps_the_undominated_fastest_first_ties_included():
    points = [point("A", 0.80, 10), point("B", 0.85, 20), point("C", 0.85, 20),  # C ties B exactly: both stay
              point("D", 0.85, 25),  # as good as B, slower: dominated
              point("E", 0.80, 10),  # ties A
              point("F", 0.70, 10),  # as fast as A, worse: dominated
              point("G", 0.90, 30), point("H", 0.60, 5), point("I", 0.59, 6)]
    assert pareto_front(points) == ["H", "A", "E", "B", "C", "G"]
    assert pareto_front([]) == [] and pareto_front([point("x", 0.5, 1)]) == ["x"]
    rng = np.random.default_rng(0)  # coarse values: many ties in Dice, in latency and in both
    for _ in range(50):
        many = [point(str(i), float(rng.integers(5)) / 10, float(rng.integers(5))) for i in range(30)]
        front = pareto_front(many)
        assert set(front) == brute_force_front(many) and len(front) == len(set(front))
        on = {c["id"]: c for c in many}
        assert [on[i]["latency_ms"] for i in front] == sorted(on[i]["latency_ms"] for i in front)


def test_marginal_effects_are_the_means_with_and_without_each_value():
    candidates = [
        {"dice": 0.8, "latency_ms": 10.0, "architecture": {"gate": "sigmoid", "levels": [{"kernel": 3}]}},
        {"dice": 0.6, "latency_ms": 30.0, "architecture": {"gate": "sigmoid", "levels": [{"kernel": 5}]}},
        {"dice": 0.7, "latency_ms": 20.0,
         "architecture": {"gate": "softmax", "levels": [{"kernel": 3}, {"kernel": 7}]}},
        {"dice": 0.9, "latency_ms": 40.0,
         "architecture": {"gate": "sigmoid", "levels": [{"kernel": 5}, {"kernel": 3}]}},
    ]
    effects = {(e["decision"], e["value"]): e for e in marginal_effects(candidates)}
    assert list(effects) == [("gate", "sigmoid"), ("gate", "softmax"), ("levels.0.kernel", "3"),
                             ("levels.0.kernel", "5"), ("levels.1.kernel", "3"), ("levels.1.kernel", "7"),
                             ("levels.1.kernel", ABSENT)]
    sigmoid = effects[("gate", "sigmoid")]
    assert sigmoid["count"] == 3 and sigmoid["dice"] == pytest.approx(2.3 / 3)
    assert sigmoid["latency_ms"] == pytest.approx(80 / 3) and sigmoid["dice_effect"] == pytest.approx(2.3 / 3 - 0.7)
    assert sigmoid["latency_effect"] == pytest.approx(80 / 3 - 20)
    absent = effects[("levels.1.kernel", ABSENT)]
    assert absent["count"] == 2 and absent["dice"] == pytest.approx(0.7) and absent["latency_ms"] == 20
    fixed = marginal_effects([{"dice": 0.5, "latency_ms": 1.0, "architecture": {"gate": "sigmoid"}}] * 2)
    assert fixed == [{"decision": "gate", "value": "sigmoid", "count": 2, "dice": 0.5, "latency_ms": 1.0,
                      "dice_effect": None, "latency_effect": None}]  # a locked decision: nothing to compare
    deep = {"levels": [{"kernel": k} for k in range(12)], "fusion": True, "width": 0.5, "empty": []}
    keys = [key for key, _ in flatten(deep)]
    assert keys[:3] == ["levels.0.kernel", "levels.1.kernel", "levels.2.kernel"] and ("empty", []) in flatten(deep)
    natural = [e["decision"] for e in marginal_effects([{"dice": 1, "latency_ms": 1, "architecture": deep}])]
    assert natural.index("levels.2.kernel") < natural.index("levels.10.kernel")
    assert [e["value"] for e in marginal_effects([{"dice": 1, "latency_ms": 1, "architecture": {"w": w}}
                                                  for w in (10, 2, 0.5)])] == ["0.5", "2", "10"]


def test_embedding_is_pca_with_fixed_signs():
    rng = np.random.default_rng(1)
    vectors = (rng.random((24, 25)) < 0.4).astype(float)
    first = embedding(vectors)
    assert first.points.shape == (24, 2) and np.array_equal(first.points, embedding(vectors.tolist()).points)
    centred = vectors - vectors.mean(axis=0)
    _, s, vt = np.linalg.svd(centred)
    for axis in range(2):  # the scores on each principal axis, the sign that makes its largest loading positive
        loading = vt[axis] * np.sign(vt[axis][np.abs(vt[axis]).argmax()])
        np.testing.assert_allclose(first.points[:, axis], centred @ loading, atol=1e-9)
    assert first.explained == pytest.approx(tuple(s[:2] ** 2 / (s ** 2).sum()))
    flipped = embedding(-vectors)  # the same cloud mirrored: the same picture, not a mirrored one
    np.testing.assert_allclose(np.abs(flipped.points), np.abs(first.points), atol=1e-9)
    line = embedding([[0, 0, 0], [1, 2, 2], [2, 4, 4]])  # one dimension of spread: PC2 stays 0
    np.testing.assert_allclose(line.points, [[-3, 0], [0, 0], [3, 0]], atol=1e-9)
    assert line.explained == pytest.approx((1.0, 0.0))
    assert np.array_equal(embedding([[1, 2, 3]]).points, [[0.0, 0.0]]) and embedding([]).points.shape == (0, 2)
    with pytest.raises(ValueError):
        embedding([[1, 2], [3]])


def test_iteration_history_and_reading(run):
    data = read_candidates(run["folder"])
    assert read_candidates(run["folder"] / "candidates.json")["candidates"] == data["candidates"]
    history = iteration_history(data)
    assert [h["count"] for h in history] == [12, 12] and [h["drop"] for h in history] == [[], ["levels.0.kernel=5"]]
    assert history[1]["lock"] == ["gate=sigmoid"] and history[0]["steps"] == 400
    for h in history:
        own = [c for c in data["candidates"] if c["iteration"] == h["iteration"]]
        assert h["best_dice"] == max(c["dice"] for c in own) and h["front"] == len(brute_force_front(own))
    assert history[1]["front_so_far"] == len(pareto_front(data["candidates"]))


def test_the_page_is_self_contained(run):
    page = run["html"].read_text(encoding="utf-8")
    external = re.findall(r"<(?:script|img|link|iframe|source)\b[^>]*\b(?:src|href)\s*=\s*['\"]?(?:https?:)?//",
                          page, re.IGNORECASE)
    assert external == [] and page.count("<script") == 3  # plotly.js once, the data, the page's own script
    assert "</script" not in page.split("id='explorer-data'>")[1].split("</script>")[0]


def write(folder: Path, document) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    text = document if isinstance(document, str) else json.dumps(document)
    (folder / "candidates.json").write_text(text, encoding="utf-8")
    return folder


def broken(document: dict, change) -> dict:
    copy = json.loads(json.dumps(document))
    change(copy)
    return copy


def test_malformed_input_is_a_clear_error(run, tmp_path):
    good = run["document"]
    cases = {
        "missing": (tmp_path / "nothing", "does not exist"),
        "not-json": (write(tmp_path / "not-json", '{"schema": 1, "candidates": ['), "is not valid JSON"),
        "schema": (write(tmp_path / "schema", {**good, "schema": 2}), "schema 1 (its schema: 2)"),
        "array": (write(tmp_path / "array", [1, 2]), "schema 1 (its schema: None)"),
        "empty": (write(tmp_path / "empty", {**good, "candidates": []}), "holds no candidates"),
        "no-dice": (write(tmp_path / "no-dice", broken(good, lambda d: d["candidates"][3].pop("dice"))),
                    "candidate 3 ('it0-c03') lacks dice"),
        "null-dice": (write(tmp_path / "null-dice", broken(good, lambda d: d["candidates"][0].update(dice=None))),
                      "candidate 0 ('it0-c00'): dice is null: it was scored on cases holding none of the search's "
                      "classes"),
        "text-dice": (write(tmp_path / "text-dice", broken(good, lambda d: d["candidates"][0].update(dice="0.8"))),
                      "dice is str '0.8', not int or float"),
        "bool-params": (write(tmp_path / "bool-params", broken(good, lambda d: d["candidates"][1].update(params=True))),
                        "params is bool True, not int"),
        "nan": (write(tmp_path / "nan", broken(good, lambda d: d["candidates"][2].update(latency_ms=float("nan")))),
                "must be finite numbers"),
        "ragged": (write(tmp_path / "ragged", broken(good, lambda d: d["candidates"][5]["vector"].pop())),
                   "vectors differ in length"),
        "twice": (write(tmp_path / "twice", broken(good, lambda d: d["candidates"][1].update(id="it0-c00"))),
                  "candidate ids repeat: it0-c00"),
        "no-lock": (write(tmp_path / "no-lock", broken(good, lambda d: d["iterations"][1]["constraints"].pop("lock"))),
                    "the constraints of iteration entry 1 lacks lock"),
        "iteration-twice": (write(tmp_path / "iteration-twice", broken(good, lambda d: d["iterations"][1].update(
            iteration=0))), "two iteration entries have the same number"),
        "reference": (write(tmp_path / "reference", broken(good, lambda d: d["candidates"][4].update(reference="yes"))),
                      "candidate 4 ('it0-c04'): reference must be true or false"),
        "unlisted": (write(tmp_path / "unlisted", broken(good, lambda d: d["iterations"][0]["candidates"].pop())),
                     "candidate 'it0-c11' is of iteration 0, but that iteration's entry does not list it"),
    }
    for name, (folder, message) in cases.items():
        result = CliRunner().invoke(main, ["nas", "view", str(folder)])
        assert result.exit_code == 1 and message in result.output, (name, result.output)
        assert isinstance(result.exception, SystemExit) and "Traceback" not in result.output, name
        assert not (folder / "explorer.html").exists()


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which("chromium") and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))  # appended: the benchmarks never shadow another module
    pages, explorer = (importlib.import_module(name) for name in ("perf_report_screenshot", "nas_explorer_screenshot"))
    return SimpleNamespace(headless_chromium=pages.headless_chromium, wait_until_drawn=pages.wait_until_drawn,
                           click_candidate=explorer.click_candidate, main=explorer.main)


def points_per_trace(driver, plot: str) -> dict[str, list]:
    """``{trace name: [customdata[0] of each drawn SVG point]}`` of a plot."""
    return driver.execute_script("""
        const found = {};
        for (const trace of document.querySelectorAll(arguments[0] + ' .scatterlayer .trace')) {
          const t = trace.__data__[0].trace;
          found[t.name] = [...trace.querySelectorAll('path.point')].map(
            p => t.customdata ? t.customdata[p.__data__.i][0] : null);
        }
        return found;""", plot)


def test_the_page_in_headless_chromium_shows_the_run_and_the_architecture_of_a_clicked_candidate(
        run, browser, tmp_path):
    from selenium.webdriver.common.by import By

    candidates = run["document"]["candidates"]
    front = pareto_front(candidates)
    driver = browser.headless_chromium(tmp_path / "chromium-profile")
    try:
        driver.get(run["html"].resolve().as_uri())
        browser.wait_until_drawn(driver)
        summary = driver.find_element(By.ID, "summary").text
        assert f"24 candidates · 2 iterations · 13 decisions · {len(front)} on the Pareto front" in summary
        assert str(run["folder"]) in summary
        best = max(candidates, key=lambda c: c["dice"])
        assert f"best Dice: {best['id']} Dice {best['dice']:.4f}" in driver.find_element(By.ID, "best").text
        # the scatter: one point per candidate in the iteration traces, the front trace with exactly the front
        scatter = points_per_trace(driver, "#scatter")
        by_iteration = {name: ids for name, ids in scatter.items() if name.startswith("iteration ")}
        assert sorted(by_iteration) == ["iteration 0 (12)", "iteration 1 (12)"]
        assert sorted(itertools.chain(*by_iteration.values())) == sorted(c["id"] for c in candidates)
        assert scatter[f"Pareto front ({len(front)})"] == front and len(front) >= 3
        assert scatter["reference: the config's own model"] == [REFERENCE]  # marked, and in its iteration's trace
        assert f"reference (the config's model): {REFERENCE}" in driver.find_element(By.ID, "best").text
        assert driver.find_elements(By.CSS_SELECTOR, "#scatter .scatterlayer .js-line")  # the step line
        assert scatter.get("selected", []) == []  # nothing selected yet
        # the embedding: every candidate once, coloured by Dice; the marginal effects: a row per decision value
        assert sorted(points_per_trace(driver, "#embedding")["candidates"]) == sorted(c["id"] for c in candidates)
        effects = marginal_effects(candidates)
        assert len(driver.find_elements(By.CSS_SELECTOR, "#marginals .scatterlayer path.point")) == 2 * len(effects)
        ticks = driver.execute_script("return [...document.querySelectorAll('#marginals .yaxislayer-above text')]"
                                      ".map(t => t.textContent)")
        assert "gate = sigmoid · n=" + str(sum(c["architecture"]["gate"] == "sigmoid" for c in candidates)) in ticks
        history = driver.execute_script("return [...document.querySelectorAll('#history tbody tr')]"
                                        ".map(r => [...r.cells].map(c => c.textContent))")
        assert [row[2] for row in history] == ["12", "12"] and history[1][6:] == ["levels.0.kernel=5", "gate=sigmoid"]
        # a real click on the point of the fastest candidate of the front with a softmax gate (iteration 0)
        target = next(c for c in candidates if c["id"] in front and c["architecture"]["gate"] == "softmax")
        assert driver.find_elements(By.CSS_SELECTOR, "#candidate .candidate-id") == []  # empty before the click
        browser.click_candidate(driver, target["id"])  # ActionChains: pointer to its SVG marker, then click
        panel = driver.find_element(By.ID, "candidate")
        assert panel.find_element(By.CSS_SELECTOR, ".candidate-id").text == f"Candidate {target['id']}"
        assert panel.find_element(By.CSS_SELECTOR, ".description").text == target["description"]
        rows = dict(driver.execute_script("return [...document.querySelectorAll('#candidate table.architecture tr')]"
                                          ".map(r => [...r.cells].map(c => c.textContent))"))
        assert rows == {key: json.dumps(value) if not isinstance(value, str) else value
                        for key, value in flatten(target["architecture"])}
        kernel = target["architecture"]["levels"][1]["kernel"]
        assert rows["gate"] == "softmax" and rows["levels.1.kernel"] == str(kernel) and str(kernel) in panel.text
        assert "Pareto front yes" in panel.text.replace("\n", " ")
        # the same candidate is marked in the other plots and the history
        selected = driver.execute_script("return ['scatter', 'embedding'].map(d => { const g = "
                                         "document.getElementById(d); const t = g.data[g.data.length - 1]; "
                                         "return [t.x[0], t.y[0]]; })")
        assert selected[0] == pytest.approx([target["latency_ms"], target["dice"]])
        index = [c["id"] for c in candidates].index(target["id"])
        np.testing.assert_allclose(selected[1], embedding([c["vector"] for c in candidates]).points[index])
        colours = driver.execute_script("return document.getElementById('marginals').data[0].marker.color")
        marked = {(e["decision"], e["value"]) for e, colour in zip(effects, colours) if colour == "#d62728"}
        assert marked == {(key, rows[key]) for key in rows}
        assert driver.find_element(By.CSS_SELECTOR, "#history tr.is-selected").get_attribute("data-iteration") == "0"
        # a click in the embedding selects too: the candidate furthest along PC1 (no other point lies on it)
        furthest = candidates[int(np.argmax(embedding([c["vector"] for c in candidates]).points[:, 0]))]
        assert furthest["id"] != target["id"]
        browser.click_candidate(driver, furthest["id"], plot="#embedding")
        assert panel.find_element(By.CSS_SELECTOR, ".candidate-id").text == f"Candidate {furthest['id']}"
        # nothing came over the network: no http(s) resource was even asked for
        resources = driver.execute_script("return performance.getEntriesByType('resource').map(e => e.name)")
        assert [name for name in resources if not name.startswith(("file:", "data:", "blob:"))] == []
    finally:
        driver.quit()


def test_the_screenshot_helper_writes_a_png(run, browser, tmp_path):
    out = tmp_path / "explorer.png"
    assert browser.main([str(run["html"]), str(out), "--width", "1200", "--height", "900"]) == 0
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
