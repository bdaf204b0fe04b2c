"""``ctzoo cohort build -> fit -> report`` on the project's real CT sample and a DeepLesion miniature (16 series
built from real CT), the page read and clicked in Debian's headless chromium.

Checked against independent computations: each lesion's pooled features against the network's feature map
averaged by hand over its box, the table's rows against DL_info.csv, the page's numbers against
:func:`report_data` and ``predictions.csv``."""

from __future__ import annotations

import csv
import importlib
import json
import math
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.cohort.context import hashed
from ctzoo.cohort.groups import lesion_found
from ctzoo.cohort.report import build_figures, render_report_html, report_data
from ctzoo.datasets.deeplesion.dataset import DeepLesionConfig, deeplesion_dataset, key_slice_items
from ctzoo.datasets.deeplesion.info_csv import read_dl_info
from ctzoo.datasets.keypoint_transforms import recist_eval_transforms
from ctzoo.inference.recist_volume import decode_heads, slice_inputs
from ctzoo.io import read_volume, reorient_lps
from ctzoo.models.bundle import load_bundle

ROOT = Path(__file__).resolve().parents[1]
SALT = "report-test-salt"


@pytest.fixture(scope="module")
def cohort(deeplesion_mini16, sample_dir, tmp_path_factory):
    """The cohort folder, built, fitted (one seed) and reported through the CLI."""
    mini = deeplesion_mini16
    out = tmp_path_factory.mktemp("cohort") / "cohort"
    runner, env = CliRunner(), {"CTZOO_COHORT_SALT": SALT}
    for arguments in (["build", str(sample_dir), "--deeplesion", str(mini / "DL_info.csv"), "--out", str(out)],
                      ["fit", str(out), "--seeds", "0", "--epochs", "150"], ["report", str(out)]):
        result = runner.invoke(main, ["cohort", *arguments], env=env)
        assert result.exit_code == 0, (arguments[0], result.output)
    return {"out": out, "mini": mini, "csv": mini / "DL_info.csv"}


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="", encoding="utf-8") as handle:
        return list(csv.DictReader(handle))


def test_every_lesion_has_its_csv_context_and_its_pooled_features(cohort):
    rows = read_dl_info(cohort["csv"])
    lesions = read_csv(cohort["out"] / "lesions.csv")
    features = np.load(cohort["out"] / "lesion_features.npy")
    assert len(lesions) == len(rows) == len(features) and features.shape[1] == 64
    items = key_slice_items(rows, "all")
    by_hash = {lesion["lesion"]: lesion for lesion in lesions}
    for item in items:
        for index, row in enumerate(item["lesions"]):
            lesion = by_hash[hashed(f"{row.file_name}#{index}", SALT)]
            assert lesion["series"] == hashed(row.series_folder, SALT) and lesion["split"] == row.split
            assert int(lesion["type_code"]) == row.coarse_lesion_type
            long_mm = row.lesion_diameters_px[0] * row.spacing_mm_px[0]
            assert float(lesion["long_mm"]) == pytest.approx(long_mm, abs=1e-3)
            assert float(lesion["window_low_hu"]) == row.dicom_windows[0]
    # the first key slice's first lesion: the decoder's map, averaged by hand over the box's cells
    bundle = load_bundle("recistnet-mini")
    cfg = DeepLesionConfig(root=cohort["mini"], **bundle.preprocessing.model_dump())
    sample = deeplesion_dataset(cfg, "all", transform=recist_eval_transforms((cfg.max_size,) * 2,
                                                                             lesion_keys=("lesion_index",)))[0]
    network = bundle.network().eval()
    with torch.no_grad():
        feature_map = network.feature_map(torch.as_tensor(sample["image"])[None])[0]
    x1, y1, x2, y2 = sample["boxes"][0].tolist()
    cells = feature_map[:, int(y1 // 4):math.ceil(y2 / 4), int(x1 // 4):math.ceil(x2 / 4)]
    first = [k for k, lesion in enumerate(lesions)
             if lesion["lesion"] == hashed(f"{items[0]['file_name']}#{int(sample['lesion_index'][0])}", SALT)][0]
    np.testing.assert_allclose(features[first], cells.mean(dim=(1, 2)).numpy(), rtol=1e-4, atol=1e-5)
    # found (at the bundle's operating point) is the groups' own matching at that threshold
    key_slices = json.loads((cohort["out"] / "key_slices.json").read_text())
    found = lesion_found(key_slices["key_slices"], key_slices["score_threshold"])
    assert {lesion["lesion"]: lesion["found"] == "True" for lesion in lesions} == found
    assert len(key_slices["key_slices"]) == len(items)
    typed = {hashed(item["file_name"], SALT) for item in items
             if any(row.coarse_lesion_type >= 1 for row in item["lesions"])}
    series = {row["series"] for row in json.loads((cohort["out"] / "cohort.json").read_text())["rows"]
              if row["source"] == "dicom"}
    pictures = {path.stem for path in (cohort["out"] / "thumbnails").glob("*.png")}
    assert pictures == typed | series  # typed key slices only, and the CT series' top finding


def test_the_ct_series_findings_carry_pooled_features(cohort, sample_dir):
    """The real series' findings (as ctzoo infer reports them) each with 64 pooled features, and a picture of the
    top finding's slice with the findings on it."""
    document = json.loads((cohort["out"] / "cohort.json").read_text())
    (row,) = [row for row in document["rows"] if row["source"] == "dicom"]
    level = json.loads((cohort["out"] / "findings.json").read_text())["series"][row["series"]]
    assert len(level["findings"]) == row["findings"] >= 1
    assert max(f["score"] for f in level["findings"]) == row["finding_score"]
    for finding in level["findings"]:
        assert len(finding["features"]) == 64 and all(math.isfinite(v) for v in finding["features"])
        x1, y1, x2, y2 = finding["box"]
        assert 0 <= x1 <= x2 < level["frame"] and 0 <= y1 <= y2 < level["frame"]
    top = max(level["findings"], key=lambda f: f["score"])
    assert {"box": top["box"], "score": top["score"]} in level["on_picture"]
    assert level["picture"] and (cohort["out"] / "thumbnails" / f"{row['series']}.png").is_file()
    # the top finding's box is where the detector itself put it on that slice's input, and its features are the
    # decoder's map there, averaged by hand
    bundle = load_bundle("recistnet-mini")
    network = bundle.network().eval()
    axial = reorient_lps(read_volume(sample_dir, progress=False))
    slice_index = int(round((np.linalg.inv(axial.affine_lps) @ [*np.asarray(top["points_mm"])[4], 1.0])[2]))
    image, _ = list(slice_inputs(axial, bundle.preprocessing, level["frame"]))[slice_index]
    with torch.no_grad():
        feature_map = network.feature_map(image[None])
        heads = network.heads(feature_map)
        ((_, points),) = decode_heads(heads, network.down_ratio, score_threshold=top["score"] - 1e-4)
    boxes = np.concatenate([points[:, :4].min(axis=1), points[:, :4].max(axis=1)], axis=1)  # of the end points
    assert np.abs(boxes - np.asarray(top["box"])).max(axis=1).min() < 0.01
    x1, y1, x2, y2 = top["box"]
    cells = feature_map[0][:, int(y1 // 4):math.ceil(y2 / 4), int(x1 // 4):math.ceil(x2 / 4)]
    np.testing.assert_allclose(top["features"], cells.mean(dim=(1, 2)).numpy(), rtol=1e-4, atol=1e-4)


def test_fit_stores_gates_probabilities_and_importances(cohort):
    document = json.loads((cohort["out"] / "fit" / "fit.json").read_text())
    predictions = read_csv(cohort["out"] / "fit" / "predictions.csv")
    typed = [lesion for lesion in read_csv(cohort["out"] / "lesions.csv") if int(lesion["type_code"]) >= 1]
    assert document["split_rule"] == "by patient hash, 60/20/20"  # the miniature types val/test lesions only
    assert sum(sum(c.values()) for c in document["counts"].values()) == len(typed) == len(predictions)
    assert {p["lesion"] for p in predictions} == {lesion["lesion"] for lesion in typed}
    for part in ("train", "val", "test"):
        assert sum(document["counts"][part].values()) > 0
    for prediction in predictions:
        assert sum(float(prediction[f"p_{c}"]) for c in document["classes"]) == pytest.approx(1.0, abs=1e-3)
        assert 0.0 <= float(prediction["image_weight"]) <= 1.0
    assert set(document["results"]) == {"both", "image", "context"}
    assert set(document["importance"]["context"]) == set(document["context_features"])
    assert len(document["importance"]["image"]) == 64


@pytest.fixture(scope="module")
def browser():
    if not (shutil.which("chromium") and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))
    return importlib.import_module("cohort_screenshots"), importlib.import_module("perf_report_screenshot")


def test_the_three_views_in_headless_chromium(cohort, browser, tmp_path):
    from selenium.webdriver.common.by import By
    from selenium.webdriver.support.ui import Select

    views, pages = browser
    data = report_data(cohort["out"])
    predictions = {p["lesion"]: p for p in read_csv(cohort["out"] / "fit" / "predictions.csv")}
    driver = pages.headless_chromium(tmp_path / "profile")
    try:
        driver.get((cohort["out"] / "report.html").resolve().as_uri())
        pages.wait_until_drawn(driver)
        assert driver.execute_script("return typeof Plotly") == "object"  # inline: the page fetched nothing
        overview = driver.find_element(By.ID, "overview").text
        assert "every lesion synthetic" in driver.find_element(By.ID, "synthetic").text  # the miniature's
        assert f"17 series · {data['lesions']} lesions ({data['typed']} typed) on {data['key_slices']} key slices" \
            in overview
        # Summary: the AUC bars, gates, importances, distributions and correlations are drawn
        for plot in ("auc", "gates", "importance", "distributions", "correlations"):
            assert driver.find_elements(By.CSS_SELECTOR, f"#{plot} .main-svg"), plot
        fit = data["fit"]
        assert f"gated {fit['results']['both']['test_auc_mean']:.3f}" in driver.find_element(By.ID, "auc-text").text
        # Group: the tables hold report_data's numbers; small groups are refused, unknown is a group
        views.show_view(driver, "group")
        assert driver.find_element(By.ID, "group").is_displayed() and not driver.find_element(By.ID,
                                                                                              "summary").is_displayed()
        assert driver.find_element(By.ID, "synthetic").is_displayed()
        for entry in data["detection"]:
            table = driver.find_element(By.CSS_SELECTOR, f"table.detection[data-column='{entry['column']}']")
            rows = [r.text for r in table.find_elements(By.CSS_SELECTOR, "tbody tr")]
            assert len(rows) == len(entry["groups"])
            for text, (value, group) in zip(rows, entry["groups"].items()):
                assert text.startswith(f"{value} {group['lesions']}")
                assert ("not shown" in text) == ("refused" in group)
                if "refused" not in group:
                    assert f"{group['sensitivity']:.3f}" in text
        lesion_types = next(e for e in data["detection"] if e["column"] == "lesion_type")["groups"]
        assert "unknown" in lesion_types and any("refused" in g for g in lesion_types.values())
        assert driver.find_elements(By.CSS_SELECTOR, "#clusters .scatterlayer path.point")
        # Individual: two lesions side by side with their key slice, boxes, gate and prediction
        views.show_view(driver, "individual")
        assert driver.find_element(By.ID, "synthetic").is_displayed()
        first, second = views.pick_pair(driver, 0, 1)
        for side, lesion in (("a", first), ("b", second)):
            card = driver.find_element(By.ID, f"card-{side}")
            assert lesion in card.text
            assert card.find_elements(By.CSS_SELECTOR, "svg image") and card.find_elements(By.CSS_SELECTOR, "svg rect")
            if lesion in predictions:
                assert f"image weight {float(predictions[lesion]['image_weight']):.3f}" in card.text
                assert f"true {predictions[lesion]['label']}" in card.text
        assert data["individuals"][0]["prediction"]["split"] == "test"  # test lesions are offered first
        series = driver.find_elements(By.CSS_SELECTOR, "#series-table tbody tr")
        assert len(series) == 1 and "dicom" in series[0].text  # the real CT series, with its context
        # the real CT series as an individual: its context, its findings drawn on its top finding's slice
        (item,) = data["series_items"]
        Select(driver.find_element(By.ID, "pick-b")).select_by_value(item["id"])
        card = driver.find_element(By.ID, "card-b")
        assert item["title"] in card.text and "no gated model" in card.text
        assert len(card.find_elements(By.CSS_SELECTOR, "svg rect")) == len(item["findings"]) >= 1
    finally:
        driver.quit()


def test_bad_cohorts_are_clear_errors(cohort, tmp_path):
    runner = CliRunner()
    result = runner.invoke(main, ["cohort", "report", str(tmp_path)])
    assert result.exit_code == 1 and "is not a cohort folder" in result.output and "Traceback" not in result.output
    assert not (tmp_path / "report.html").exists()
    headers_only = tmp_path / "headers"
    built = runner.invoke(main, ["cohort", "build", "--deeplesion", str(cohort["csv"]), "--out", str(headers_only),
                                 "--context-only"], env={"CTZOO_COHORT_SALT": SALT})
    assert built.exit_code == 0, built.output
    fitted = runner.invoke(main, ["cohort", "fit", str(headers_only)])
    assert fitted.exit_code == 1 and "no lesions.csv" in fitted.output and not (headers_only / "fit").exists()
    seeds = runner.invoke(main, ["cohort", "fit", str(cohort["out"]), "--seeds", "0,x"])
    assert seeds.exit_code == 2 and "comma-separated integers" in seeds.output
    reported = runner.invoke(main, ["cohort", "report", str(headers_only)])  # a context-only page still works
    assert reported.exit_code == 0 and (headers_only / "report.html").is_file()
    assert not list(headers_only.glob(".*partial*"))


# --- small cohort folders written by hand: no model run, each check a few seconds at most

def ct_rows(count: int, **fields) -> list[dict]:
    """``count`` DICOM series rows as the build writes them (every column; ``fields`` set on each)."""
    from ctzoo.cohort.context import blank_row, with_bands

    return [with_bands(blank_row("dicom") | {"series": f"{k:016x}", "slices": 20, "findings": 1} | fields)
            for k in range(count)]


def write_cohort(folder: Path, rows: list[dict], failed: list[dict] = (), pictures: bool = False) -> Path:
    """``cohort.json`` of ``rows`` (and, with ``pictures``, each series' findings and thumbnail)."""
    from ctzoo.cohort.context import group_counts

    folder.mkdir(parents=True, exist_ok=True)
    document = {"schema": 1, "columns": [], "models": [], "modalities": {}, "rows": rows,
                "groups": group_counts(rows), "failed": list(failed), "salt": "env"}
    (folder / "cohort.json").write_text(json.dumps(document), encoding="utf-8")
    if pictures:
        (folder / "thumbnails").mkdir(exist_ok=True)
        level = {"frame": 512, "picture": True, "on_picture": [{"box": [10, 10, 40, 40], "score": 0.9}]}
        (folder / "findings.json").write_text(json.dumps({"schema": 1, "model": "recistnet-mini", "series": {
            row["series"]: level for row in rows}}), encoding="utf-8")
        for row in rows:
            (folder / "thumbnails" / f"{row['series']}.png").write_bytes(b"\x89PNG-" + row["series"].encode())
    return folder


def test_unreadable_inputs_are_counted_on_the_page_and_hashed_in_the_table(tmp_path):
    """A file named after its patient that cannot be read: cohort.json keeps its name only as a salted hash and
    its message without the name or path; the page has the count and the error type, nothing else of it; and a
    cohort of no readable series still gets its page, saying so."""
    named = tmp_path / "in" / "DOE_JOHN_MRN-4455667.nii.gz"
    named.parent.mkdir()
    named.write_bytes(b"not a gzip at all")
    out, runner = tmp_path / "cohort", CliRunner()
    built = runner.invoke(main, ["cohort", "build", str(named), "--out", str(out), "--context-only"],
                          env={"CTZOO_COHORT_SALT": SALT})
    assert built.exit_code == 0, built.output
    (failed,) = json.loads((out / "cohort.json").read_text())["failed"]
    assert failed["input"] == hashed("DOE_JOHN_MRN-4455667", SALT) and failed["error"] == "ValueError"
    assert failed["reason"].startswith("ValueError: ") and "<input>" in failed["reason"]
    reported = runner.invoke(main, ["cohort", "report", str(out)])
    assert reported.exit_code == 0 and "Traceback" not in reported.output, reported.output
    page = (out / "report.html").read_text()
    assert "No series could be read (1 failed)" in page and "1 inputs not read (ValueError 1)" in page
    for text in ("DOE", "4455667", str(named.parent)):
        assert text not in page and text not in (out / "cohort.json").read_text()
    # a cohort.json written before the names were hashed: the page still takes only the count and the types
    write_cohort(out, ct_rows(1), failed=[{"input": "DOE_JOHN_MRN-4455667", "reason": f"OSError: {named} gone"}])
    data = report_data(out)
    assert data["failed"] == {"count": 1, "errors": {"OSError": 1}}
    assert "DOE" not in render_report_html(data)


def test_the_distributions_figure_is_left_out_without_series(tmp_path):
    data = report_data(write_cohort(tmp_path / "empty", [], failed=[{"input": "0" * 16, "error": "ValueError"}]))
    assert "distributions" not in build_figures(data)


def test_header_text_reaches_the_plots_escaped(tmp_path):
    """plotly renders tags in its labels: a scanner model '<a href=...>' would be a live link on the page."""
    link = '<a href="https://evil.example/phish">Click here</a>'
    data = report_data(write_cohort(tmp_path / "c", ct_rows(2, manufacturer="<b>ACME</b> & Co", model=link)))
    figure = json.dumps(build_figures(data)["distributions"])
    assert "<a href" not in figure and "<b>" not in figure
    assert json.dumps("&lt;a href=\"https://evil.example/phish\"&gt;Click here&lt;/a&gt;")[1:-1] in figure
    assert "&lt;b&gt;ACME&lt;/b&gt; &amp; Co" in figure


def test_the_individual_view_embeds_at_most_the_limit_of_series_pictures(tmp_path):
    folder = write_cohort(tmp_path / "c", ct_rows(7), pictures=True)
    data = report_data(folder, limit=3)
    assert [item["id"] for item in data["series_items"]] == [f"series-{k:016x}" for k in range(3)]
    assert all(item["picture"] for item in data["series_items"]) and data["ct_series"] == 7
    page = render_report_html(data)
    assert page.count("data:image/png;base64,iVBORy0") == 3  # the fake PNGs (plotly.js holds the prefix too)
    assert "(4 left out: --individuals)" in page
    assert page.count("<tr><td>0000") == 7  # the series table lists every series


def write_lesion_level(folder: Path, lesions: list[str], fitted: list[str]) -> None:
    """``lesions.csv`` (typed lesions, two per key slice), features, key slices, and a ``fit/`` made on
    ``fitted``."""
    from ctzoo.cohort.fit import rows_csv
    from ctzoo.cohort.lesions import LESION_COLUMNS
    from ctzoo.cohort.table import table_csv

    rows = [{column: "" for column in LESION_COLUMNS} | {
        "lesion": name, "series": "s", "patient": f"p{k}", "key_slice": f"k{k // 2}", "split": "test",
        "split_bucket": k, "type_code": 1 + k % 2, "lesion_type": ["bone", "abdomen"][k % 2], "sex": "M",
        "age_band": "40-59", "thickness_band": "<1.5 mm", "age_years": 40 + k, "long_mm": 10 + k, "found": True,
        "features": True}
            for k, name in enumerate(lesions)]
    (folder / "lesions.csv").write_text(table_csv(rows, columns=LESION_COLUMNS), encoding="utf-8")
    np.save(folder / "lesion_features.npy", np.random.default_rng(0).normal(size=(len(lesions), 4)).astype("f4"))
    key_slices = [{"key_slice": f"k{s}", "lesions": lesions[2 * s:2 * s + 2], "boxes": [], "scores": [],
                   "truth_boxes": [[10, 10, 30, 30]] * len(lesions[2 * s:2 * s + 2])}
                  for s in range((len(lesions) + 1) // 2)]
    (folder / "key_slices.json").write_text(json.dumps({"schema": 1, "model": "m", "score_threshold": 0.5,
                                                        "frame": 512, "key_slices": key_slices}))
    (folder / "fit").mkdir(exist_ok=True)
    (folder / "fit" / "fit.json").write_text(json.dumps({"lesions": fitted, "classes": ["bone", "abdomen"]}))
    (folder / "fit" / "predictions.csv").write_text(rows_csv([
        {"lesion": name, "split": "test", "label": "bone", "predicted": "bone", "image_weight": 0.5,
         "p_bone": 0.6, "p_abdomen": 0.4} for name in fitted]))


@pytest.mark.parametrize("fitted", [["z1", "z2", "z3", "z4"], ["a0", "a1"]], ids=["other lesions", "a subset"])
def test_a_fit_of_other_lesions_is_flagged_not_drawn(tmp_path, fitted):
    """The lesions of a cohort built again against an old fit/: no KeyError, and no old AUCs drawn as if they
    were the new lesions' (a subset would have been drawn silently)."""
    folder = write_cohort(tmp_path / "c", [])
    write_lesion_level(folder, [f"a{k}" for k in range(6)], fitted)
    data = report_data(folder)
    assert data["fit"] is None and data["auc"] == [] and "run ctzoo cohort fit again" in data["fit_problem"]
    result = CliRunner().invoke(main, ["cohort", "report", str(folder)])
    assert result.exit_code == 0 and "Traceback" not in result.output, result.output
    assert "warning: the stored fit is not shown" in result.output
    assert "The stored fit is not shown: fit/ was fitted on other lesions" in (folder / "report.html").read_text()


def test_a_fit_without_a_test_auc_is_flagged_not_drawn(tmp_path):
    """A fit.json from before the test split was checked (a test AUC of NaN, stored as null or NaN): never drawn
    as 'gated nan ± nan'."""
    folder = write_cohort(tmp_path / "c", [])
    lesions = [f"a{k}" for k in range(4)]
    write_lesion_level(folder, lesions, lesions)
    results = {name: {"test_auc": [None], "test_auc_mean": None, "test_auc_sd": None}
               for name in ("both", "image", "context")}
    (folder / "fit" / "fit.json").write_text(json.dumps({"lesions": lesions, "classes": ["bone", "abdomen"],
                                                         "results": results}))
    data = report_data(folder)
    assert data["fit"] is None and "fit/fit.json holds no test AUC" in data["fit_problem"]
    page = render_report_html(data)
    text = page[page.index('<p id="auc-text">'):].split("</p>")[0]
    assert "holds no test AUC" in text and "nan" not in text


def test_the_page_of_a_miniature_says_its_lesions_are_synthetic(tmp_path):
    """cohort.json's synthetic (set by the build from the miniature's lesions.json): a banner above the views."""
    folder = write_cohort(tmp_path / "c", ct_rows(1))
    assert "id='synthetic'" not in render_report_html(report_data(folder))
    document = json.loads((folder / "cohort.json").read_text())
    document["synthetic"] = {"generator": "ctzoo data make-deeplesion-mini", "seed": 5, "cases": 16}
    (folder / "cohort.json").write_text(json.dumps(document))
    page = render_report_html(report_data(folder))
    banner = page[page.index("<p id='synthetic'"):page.index("<nav>")]  # above the views: on every one
    assert "Synthetic lesions." in banner and "(ctzoo data make-deeplesion-mini, seed 5, 16 cases)" in banner
    assert "<title>ctzoo cohort report (synthetic lesions)</title>" in page


def test_fit_mismatch_accepts_exactly_the_fitted_lesions():
    from ctzoo.cohort.fit import fit_mismatch

    lesions = [{"lesion": f"a{k}", "type_code": 1 + (k == 3) - (k == 4), "features": k != 5} for k in range(6)]
    fitted = ["a0", "a1", "a2", "a3"]  # a4 untyped, a5 outside the frame: never fitted
    predictions = [{"lesion": name} for name in fitted]
    assert fit_mismatch(lesions, ({"lesions": fitted}, predictions)) is None
    assert "other lesions" in fit_mismatch(lesions, ({"lesions": fitted[:3]}, predictions[:3]))
    assert "other lesions" in fit_mismatch(lesions, ({"lesions": fitted}, predictions[:3]))
    assert "does not list its lesions" in fit_mismatch(lesions, ({}, predictions))
