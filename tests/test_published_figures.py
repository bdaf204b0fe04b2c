"""Published figures are the committed benchmark JSONs' (benchmarks/results/): the README's placement table, the
zoo cards' metrics, and no GPU figure presented as measured without a JSON behind it."""

from __future__ import annotations

import json
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
WEIGHTS = ROOT / "ctzoo" / "models" / "weights"
PLACE_ROWS = {"recistnet-mini": "recistnet-mini", "RECIST-Net ResNet-34": "recistnet-resnet34",
              "template-seg-abdomen": "template-seg-abdomen",
              "3-D template segmenter, LEMON x2": "template-seg-3d x2 (LEMON)"}


def _json(name: str) -> dict:
    return json.loads((RESULTS / name).read_text())


def test_readme_placement_table_is_place_json():
    rows = {row["model"]: row for row in _json("place.json")["rows"]}
    readme = (ROOT / "README.md").read_text()
    for label, model in PLACE_ROWS.items():
        found = re.search(rf"^\| {re.escape(label)} \((\d+)\) \| ([\d /]+) % of (\d+) MiB \| ([\d.]+) ms \| "
                          r"([\d.]+) / ([\d.]+) \|$", readme, flags=re.M)
        assert found, f"README placement row {label!r} missing or reshaped"
        row = rows[model]
        caps = [round(100 * row["smallest_cap_fraction"][m]) for m in ("expert split", "m-topo", "m-etf", "m-sct")]
        plans = row["plans"]
        assert int(found.group(1)) == row["nodes"]
        assert [int(c) for c in found.group(2).split(" / ")] == caps, label
        assert int(found.group(3)) == round(row["one_device"]["peak_bytes"] / 2**20), label
        assert found.group(4) == f"{1000 * plans['m-sct']['placement_s']:.1f}", label
        assert (found.group(5), found.group(6)) == (f"{plans['m-etf']['vs_expert']:.3f}",
                                                   f"{plans['m-sct']['vs_expert']:.3f}"), label


def test_zoo_cards_metrics_are_the_benchmarks():
    detector = json.loads((WEIGHTS / "recistnet-mini" / "card.json").read_text())
    shipped = next(m for m in _json("shipped_detectors.json")["models"] if m["model"] == "recistnet-mini")
    for fp in ("0.5", "1", "2", "4", "8", "16"):
        assert detector["metrics"][f"sensitivity_at_{fp}_fp"]["value"] == round(
            shipped["test"]["both"]["sensitivities"][fp], 4)
    point, measured = detector["operating_point"], shipped["operating_point"]
    assert (point["score_threshold"], point["sensitivity"]) == (measured["score_threshold"], measured["sensitivity"])
    lesion_free = shipped["lesion_free"][str(measured["score_threshold"])]["findings_per_slice"]
    assert point["lesion_free_findings_per_slice"] == lesion_free
    assert "GPU gave the same" not in json.dumps(detector)  # no GPU measurement is committed
    segmenter = json.loads((WEIGHTS / "template-seg-abdomen" / "card.json").read_text())
    bundle = _json("nas.json")["shipped_bundle"]
    assert segmenter["metrics"]["dice_mean"]["value"] == round(bundle["dice"], 4)
    for organ, dice in bundle["dice_per_class"].items():
        assert abs(segmenter["metrics"][f"dice_{organ}"]["value"] - dice) < 5e-5, organ
    assert any("chosen after seeing test Dice" in item for item in segmenter["limitations"])


def test_every_segmenter_card_figure_is_measured_from_the_shipped_weights():
    """Each figure of template-seg-abdomen's card is in benchmarks/results/shipped_segmenter.json, measured from the
    weights whose digests its bundle.json records; a figure with no JSON behind it (the trained UNet baseline) is not
    on the card."""
    segmenter = json.loads((WEIGHTS / "template-seg-abdomen" / "card.json").read_text())
    measured = _json("shipped_segmenter.json")
    assert measured["weights"] == json.loads((WEIGHTS / "template-seg-abdomen" / "bundle.json").read_text())["sha256"]
    mine, copy = measured["template_seg"], measured["template_copy"]
    expected = {**{f"dice_{c}": round(mine[f"dice_{c}"], 4) for c in ("liver", "spleen", "stomach", "aorta",
                                                                      "vertebrae")},
                "dice_mean": round(mine["dice_mean"], 4), "hd95_mean_mm": round(mine["hd95_mean"], 2),
                "dice_mean_template_copy_baseline": round(copy["dice_mean"], 4),
                # the template check: benchmarks/template_sensitivity.py, on the same weights and test patient
                "dice_drop_wrong_template": round(_json("template_sensitivity.json")["template_check"]
                                                  ["dice_drop_wrong_template"], 4)}
    assert {k: m["value"] for k, m in segmenter["metrics"].items()} == expected
    assert all(m["split"] == f"test: real CT, {', '.join(mine['test_cases'])}" for m in segmenter["metrics"].values())


#: Figures of recistnet-mini 0.3.0's GPU training run as recorded when it was published (its GPU's torch, wall time,
#: a dropped candidate's and its own val at epoch 50): no log or JSON of that run is in the repository.
UNVERIFIED_GPU_RUN = ("0:08:13", "492.79", "torch 2.11.0+cu130", "width 48", "0.825", "0.874", "87.4 %")
GPU_MODEL = re.compile(r"\b(?:A100|H100|H200|V100)\b")


def _published_texts() -> dict[str, str]:
    """The README, every doc and every zoo card (card.json and MODEL_CARD.md)."""
    paths = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted(WEIGHTS.glob("*/card.json")), *sorted(WEIGHTS.glob("*/MODEL_CARD.md"))]
    return {str(path.relative_to(ROOT)): path.read_text() for path in paths}


def test_no_gpu_figure_without_its_json():
    """No GPU was lent to this project: no doc or card carries GPU measurements whose JSON is missing. A GPU model
    is named only where the paragraph says the machine was lent or that the figures are not in the repository; the
    figures of the shipped detector's recorded GPU run are nowhere; a card whose run is unverified gives no wall
    time."""
    texts = _published_texts()
    assert len(texts) > 10 and any(path.endswith("MODEL_CARD.md") for path in texts)
    for path, text in texts.items():
        assert "JSON not in the repository" not in text, path
        for figure in UNVERIFIED_GPU_RUN:
            assert figure not in text, (path, figure)
        for paragraph in (" ".join(p.split()) for p in re.split(r"\n\s*\n", text)):
            if GPU_MODEL.search(paragraph):
                assert re.search(r"\blent\b|not in the repository", paragraph), (path, paragraph[:200])
    for card_path in WEIGHTS.glob("*/card.json"):
        training = json.loads(card_path.read_text())["training"]
        if "unverified" in training["device"] + training["notes"]:
            assert training["wall_time_s"] is None, card_path
            rendered = (card_path.parent / "MODEL_CARD.md").read_text()
            assert "| Wall time | not given (see the notes) |" in rendered, card_path


def _shipped_detectors_benchmark():
    import importlib.util
    import sys

    if str(ROOT / "benchmarks") not in sys.path:
        sys.path.append(str(ROOT / "benchmarks"))  # appended, as the benchmarks do
    spec = importlib.util.spec_from_file_location("shipped_detectors_benchmark",
                                                  ROOT / "benchmarks" / "shipped_detectors.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_detector_threshold_is_told_with_the_lesion_free_setting_it_was_chosen_with():
    """The card's threshold came from val scored with one lesion-free slice per series: the benchmark reruns it so
    by default, the card and the README say so where they tell how it was chosen, and ctzoo eval's help no longer
    says published figures used 0."""
    from click.testing import CliRunner

    from ctzoo.cli import main

    setting = _shipped_detectors_benchmark().parse_args([]).lesion_free_per_series
    assert setting == 1
    flag = f"--lesion-free-per-series {setting}"
    card = json.loads((WEIGHTS / "recistnet-mini" / "card.json").read_text())
    assert card["operating_point"]["note"].startswith(f"Chosen after training with `ctzoo eval --split val {flag}`")
    readme = (ROOT / "README.md").read_text()
    assert f"`ctzoo eval --decode all {flag}`" in readme
    point = re.search(r"the operating point\s+0\.339 \(([^)]*)\)", readme)
    assert point and flag in point.group(1), "README: the operating point's choice without its lesion-free setting"
    recistnet = " ".join((ROOT / "docs" / "recistnet.md").read_text().split())
    assert f"--split val|test {flag}`" in recistnet
    helped = CliRunner().invoke(main, ["eval", "--help"], terminal_width=400)
    text = " ".join(helped.output.split())
    assert "which published figures use." not in text
    assert "recistnet-mini's committed figures and its card's threshold were scored with 1" in text


def _percent(value: float) -> str:
    return f"{100 * value:.1f}"


def test_readme_unseen_anatomy_figures_are_both_loso_runs_labelled():
    """The README's leave-one-scan-out column gives the blob-miniature run (loso.json) and the shaped-lesion run
    with hard negatives (loso_shaped_lesions.json) side by side, each labelled, never the first as the second."""
    readme = (ROOT / "README.md").read_text()
    runs = {"blob": _json("loso.json"), "shaped": _json("loso_shaped_lesions.json")}
    header = next(line for line in readme.splitlines() if line.startswith("| decoder (`--decode`)"))
    assert "blob lesions (`loso.json`) / shaped lesions + hard negatives (`loso_shaped_lesions.json`)" in header
    for mode, label in (("grouping", "`grouping`"), ("centre", "`centre`"), ("both", "`both` (default)")):
        cell = _row(readme, label)[-1]
        assert cell == " / ".join(_percent(runs[r]["mean"][mode]["4"]) for r in ("blob", "shaped")) + " %", mode
    line = next(line for line in readme.splitlines() if "**Unseen anatomy**" in line)
    for kind, scans in (("blob", ("example_ct", "sample_ct", "aorta_example_ct")),
                        ("shaped", ("example_ct", "sample_ct", "aorta_example_ct"))):
        folds = {f["held_out_scan"]: f for f in runs[kind]["folds"]}
        held = ", ".join(_percent(folds[s]["sensitivity"]["both"]["4"]) for s in scans[:2])
        held += f" and {_percent(folds[scans[2]]['sensitivity']['both']['4'])} %"
        assert held in line, (kind, held)
        val = ", ".join(f"{100 * folds[s]['val_sensitivity_4fp']:.0f}" for s in scans)
        assert f"(val {val} %)" in line, (kind, val)
    assert "shaped lesions with hard negatives" in line and "blob lesions without hard negatives" in line


def test_recistnet_froc_table_is_shipped_detectors_json():
    """docs/recistnet.md's FROC table of the shipped detector: each cell is shipped_detectors.json's; what no
    committed JSON holds (val beyond 4 FPs, axis errors) is not given."""
    text = (ROOT / "docs" / "recistnet.md").read_text()
    model = next(m for m in _json("shipped_detectors.json")["models"] if m["model"] == "recistnet-mini")
    val = {f"{p['fp_per_image']:g}": p["sensitivity"] for p in model["val_operating_points"]}
    val["4"] = model["val_sensitivity_4fp"]
    first_four = [val[fp] for fp in ("0.5", "1", "2", "4")]
    assert _row(text, "val (143 lesions)") == [*(_percent(v) for v in first_four), "–", "–",
                                               _percent(sum(first_four) / 4)]
    test = model["test"]["both"]
    assert _row(text, "test (119 lesions)") == [*(_percent(test["sensitivities"][fp])
                                                  for fp in ("0.5", "1", "2", "4", "8", "16")),
                                                _percent(test["mean_0p5_to_4"])]
    assert "axis error of hits, long / short" not in text


def test_bf16_class_agreement_is_precision_json():
    row = next(r for r in _json("precision.json")["rows"] if r["task"] == "segmentation")
    agreement = f"{100 * row['sample_ct_check']['class_agreement']:.2f} %"
    assert f"map the same (measured {agreement})" in (ROOT / "docs" / "batch-inference.md").read_text()


def test_expansion_table_wall_times_are_expand_json():
    """docs/scaling.md's expansion table: the wall seconds benchmarks/expand.py printed from its JSON."""
    text = (ROOT / "docs" / "scaling.md").read_text()
    measured = _json("expand.json")
    scratch = next(r for r in measured["rows"] if r["run"] == "scratch")
    assert _row(text, "large from scratch (baseline)")[-1] == f"{scratch['wall_s']:.1f}"
    small = measured["curves"]["small"][-1]
    assert _row(text, "the small model itself (16-32-64-128 halved)")[-1] == f"{small['wall_s']:.1f}"


def _has_load_average(value) -> bool:
    if isinstance(value, dict):
        return any("load_average" in key or _has_load_average(v) for key, v in value.items())
    return isinstance(value, list) and any(_has_load_average(v) for v in value)


def test_benchmarks_md_says_which_committed_runs_record_no_load_and_none_their_commit():
    """docs/benchmarks.md's header lists the committed JSONs without a load average, and only those, and claims no
    idle machine it cannot show."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    header = text[:text.index("\n## ")]
    assert "nothing else running" not in header
    listed = re.search(r"with none, so the load their timings ran under is unknown: (.*?)\.\n", header, re.S)
    assert listed, "benchmarks.md: the list of runs without a load average is missing"
    names = {name.rstrip("*") for name in re.findall(r"`([\w*]+)`", listed.group(1))}
    without = {path.stem for path in RESULTS.glob("*.json") if not _has_load_average(json.loads(path.read_text()))}
    assert {stem for stem in without if not any(stem.startswith(n) for n in names)} == set()
    assert all(any(stem.startswith(name) for stem in without) for name in names), names
    if not any("provenance" in json.loads(path.read_text()) for path in RESULTS.glob("*.json")):
        assert "No committed JSON records the commit it ran at." in " ".join(header.split())


def test_no_compression_reduction_without_its_json():
    """No run of benchmarks/compress.py is committed: no doc or docstring calls a compression reduction measured
    (the CSER '41x fewer bytes' was reported without a JSON, and left out the per-epoch consensus traffic)."""
    if list(RESULTS.glob("compress*.json")):
        return  # a committed run may be quoted (its figures then belong in a test like the ones above)
    claim = re.compile(r"\d+(?:\.\d+)?x fewer bytes|\|\s*\**\d+(?:\.\d+)?x\**\s*\||Measured on the template|"
                       r"compress_h200|compress_run\d")
    texts = {"docs/scaling.md": _section(ROOT / "docs" / "scaling.md", "## Gradient compression"),
             "docs/benchmarks.md": _section(ROOT / "docs" / "benchmarks.md", "## Expansion and compression"),
             **{path: (ROOT / path).read_text() for path in ("ctzoo/scaling/compress.py", "benchmarks/compress.py")}}
    for path, text in texts.items():
        found = claim.search(text)
        assert found is None, (path, found and found.group())
    assert "fewer bytes" not in (ROOT / "README.md").read_text()


def _section(path: Path, heading: str) -> str:
    """From ``heading`` to the next heading of its level."""
    text = path.read_text()
    start = text.index(heading)
    end = text.find("\n## ", start + len(heading))
    return text[start:] if end < 0 else text[start:end]


def _row(text: str, label: str) -> list[str]:
    """The cells after ``label`` of the markdown table row that starts with it."""
    found = re.search(rf"^\| {re.escape(label)} \|(.*)\|$", text, flags=re.M)
    assert found, f"row {label!r} missing or reshaped"
    return [cell.strip().strip("*") for cell in found.group(1).split("|")]


def test_template_segmenter_figures_are_template_sensitivity_json():
    """docs/template-segmenter.md: the shipped model's template check and its test table rows are the JSON's; the
    figures no committed JSON backs say so."""
    text = (ROOT / "docs" / "template-segmenter.md").read_text()
    measured = _json("template_sensitivity.json")
    names = measured["class_names"]
    rows = {"nearest": "nearest (as `ctzoo infer` runs it)",
            "classes_rotated": "nearest, class masks rotated between classes",
            "template_image_blank": "nearest, template image blank",
            "template_masks_empty": "nearest, every class mask empty"}
    for variant, label in rows.items():
        dice = measured["variants_dice"][variant]
        assert _row(text, label) == [f"{dice[c]:.3f}" for c in [*names, "mean"]], label
    check = measured["template_check"]
    assert check["dice_drop_wrong_template"] < 0.05 and "no measurable effect" in check["verdict"]
    assert "**The template has no measurable effect on the shipped model.**" in text
    assert f"{100 * check['pixels_changed_by_rotated_classes']:.2f} % of the pixels change label" in text
    for model, label in (("template_seg", "template segmenter (`template-seg-abdomen` 0.1.0)"),
                         ("template copy", "template copy (no network)")):
        runs = measured["evaluation"][model]
        clean = runs["clean"]
        expected = [f"{clean[f'dice_{c}']:.3f}" for c in names] + [f"{clean['dice_mean']:.3f}",
                                                                  f"{clean['hd95_mean']:.1f}"]
        expected += [f"{runs[name]['dice_mean']:.3f}" for name in ("shift_+100HU", "noise_30HU", "slices_5mm")]
        assert _row(text, label)[1:] == expected, label
    for unbacked in ("The ablation's Dice and HD95 come from an earlier run whose JSON was not kept",
                     "The UNet row and the UNet's\n62 s come from the training run of the zoo model",
                     "from earlier runs whose JSON was\nnot kept, not reproduced"):
        assert unbacked in text


def test_permute_classes_table_is_its_json():
    text = (ROOT / "docs" / "template-segmenter.md").read_text()
    runs = {(r["permute_classes"], r["epochs"]): r for r in _json("permute_classes.json")["runs"]}
    for share, label in ((0.0, "0 (as shipped)"), (0.5, "0.5"), (1.0, "1")):
        cells = [f"{r['dice_mean']:.3f} / {r['dice_mean_wrong_template']:.3f} "
                 f"(drop {r['dice_drop_wrong_template']:+.3f})" for r in (runs[share, 12], runs[share, 30])]
        assert _row(text, label) == cells, label


def test_the_shipped_segmenter_card_says_its_template_has_no_effect():
    """The zoo segmenter's card carries the template check of template_sensitivity.json, first among its
    limitations: a reader would otherwise take the bank for what drives the result."""
    card = json.loads((WEIGHTS / "template-seg-abdomen" / "card.json").read_text())
    check = _json("template_sensitivity.json")["template_check"]
    assert card["metrics"]["dice_drop_wrong_template"]["value"] == round(check["dice_drop_wrong_template"], 4)
    first = card["limitations"][0]
    assert first.startswith("The template has no measurable effect on this model")
    assert f"{check['dice_mean_wrong_template']:.3f} against {check['dice_mean']:.3f}" in first
