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
from ctzoo.cohort.report import report_data
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
