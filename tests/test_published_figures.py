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


def test_no_gpu_table_without_its_json():
    """No GPU was lent to this project: benchmarks.md carries no GPU measurements whose JSON is missing."""
    text = (ROOT / "docs" / "benchmarks.md").read_text()
    assert "JSON not in the repository" not in text and "H200" not in text


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
