"""What every shipped detector does on real CT with no known lesion, how well its scores are calibrated, and how
much each decoder contributes — for the zoo's own weights.

For each zoo detector (task ``detection``):

* findings per slice on the real CT scans ctzoo can reach (TotalSegmentator's ``example_ct`` and
  ``aorta_example_ct``, the embedded DICOM sample), run as ``ctzoo infer`` runs them, at the zoo's former fixed
  score threshold (0.3) and at the operating point chosen on the miniature's val split for
  ``--fp-per-image`` (0.25) false positives per image, the threshold the model's card states. These scans hold
  no known lesion, so every finding counts as a false positive. They are also the scans the miniature's lesions
  were drawn into: the model has seen this anatomy (with synthetic lesions) in training, except a scan its
  miniature held out (``--test-source``), which the JSON marks ``held_out``;
* calibration on val: reliability diagram and ECE;
* FROC on the miniature's test split with the three decoders (``grouping``, ``centre``, ``both``): anatomy seen in
  training, or the held-out scan's (``test_anatomy`` says which; ``benchmarks/loso.py`` rotates the held-out scan).

    python benchmarks/shipped_detectors.py [--data data/deeplesion-mini] [--also-test OTHER_MINIATURE]
                                           [--out benchmarks/results/shipped_detectors.json]

``--also-test``: FROC on the test split of another miniature too (e.g. one built by a later ctzoo, whose lesions
differ from those the detector was trained on).

``--lesion-free-only``: measure the findings on lesion-free real CT again, at the thresholds ``--out`` already
holds, and replace only them there (``lesion_free_rerun`` says when and why): for a change to the inference path,
which they alone go through, without the miniature.

``--data`` is the miniature the detectors were trained on (``ctzoo data make-deeplesion-mini data/deeplesion-mini
--cases 240 --seed 0``, plus ``--test-source NAME`` if it held a scan out); its val split chooses the thresholds.

``--lesion-free-per-series`` (default 1): lesion-free context slices scored per series on val and test besides the
key slices (``ctzoo eval --lesion-free-per-series``), every detection on them a false positive. The committed run,
and so the operating point on the cards, used 1 (evaluation added one then by default); another value chooses
other thresholds. 0 is DeepLesion's protocol. The JSON records it.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
import tempfile
from pathlib import Path

from ctzoo.datasets.samples import REAL_CT_SCANS, real_ct_scan
from ctzoo.models.registry import list_models, model_entry
from ctzoo.training.calibration import OPERATING_FP_RATES
from ctzoo.training.evaluate import evaluate_recistnet, findings_on_lesion_free_ct

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ZOO_THRESHOLD = 0.3  # every detector's threshold before cards stated an operating point


def scored(name: str, config: Path, data: Path, split: str, work: Path, lesion_free_per_series: int,
           decodes: tuple[str, ...] = ("both",)) -> dict:
    """``ctzoo eval``'s froc.json for zoo model ``name`` on ``data``'s ``split``: its key slices and
    ``lesion_free_per_series`` lesion-free context slices per series."""
    evaluate_recistnet(config, work, split, model_name=name, data_root=data, decodes=decodes,
                       lesion_free_per_series=lesion_free_per_series)
    return json.loads((work / "froc.json").read_text())


def froc_by_decoder(name: str, config: Path, data: Path, work: Path, lesion_free_per_series: int) -> dict:
    """FROC on ``data``'s test split with the three decoders."""
    test = scored(name, config, data, "test", work, lesion_free_per_series, ("both", "grouping", "centre"))
    return {mode: {"sensitivities": dict(zip([f"{f:g}" for f in r["fps_per_image"]], r["sensitivities"])),
                   "mean_0p5_to_4": r["mean_sensitivity_0p5_to_4"]} for mode, r in test["decodes"].items()}


def detector(name: str, config: Path, data: Path, work: Path, fp_per_image: float, lesion_free_per_series: int,
             also_test: Path | None = None) -> dict:
    """One zoo detector's figures: its operating point chosen on ``data``'s val split, FROC per decoder on the test
    split (and ``also_test``'s), findings on lesion-free real CT; val and test with ``lesion_free_per_series``."""
    val = scored(name, config, data, "val", work / "val", lesion_free_per_series)
    operating = next(p for p in val["operating_points"] if p["fp_per_image"] == fp_per_image)
    held = json.loads((data / "lesions.json").read_text()).get("test_source")
    val_threshold = operating["score_threshold"]
    scans = {scan: real_ct_scan(scan) for scan in REAL_CT_SCANS}
    lesion_free = {f"{t:g}": findings_on_lesion_free_ct(name, scans, t) for t in (ZOO_THRESHOLD, val_threshold)}
    return {"model": name, "val_sensitivity_4fp": val["sensitivities"][3], "val_calibration": val["calibration"],
            "val_images": val["num_images"], "val_lesion_free_images": val["num_lesion_free"],
            "val_operating_points": val["operating_points"], "operating_point": operating,
            "test_anatomy": f"unseen: every test patient comes from {held}, held out of training" if held
            else "seen: the test patients' scans are the training patients' scans",
            "test": froc_by_decoder(name, config, data, work / "test", lesion_free_per_series),
            "also_test": None if also_test is None else {
                "data": str(also_test),
                "test": froc_by_decoder(name, config, also_test, work / "also", lesion_free_per_series)},
            "lesion_free": lesion_free}


def rerun_lesion_free(out: Path, reason: str) -> dict:
    """``out`` with each detector's findings on lesion-free real CT measured again at the thresholds it holds."""
    provenance = Provenance()
    result = json.loads(out.read_text())
    scans = {scan: real_ct_scan(scan) for scan in REAL_CT_SCANS}
    for m in result["models"]:
        thresholds = (result["zoo_threshold"], m["operating_point"]["score_threshold"])
        m["lesion_free"] = {f"{t:g}": findings_on_lesion_free_ct(m["model"], scans, t) for t in thresholds}
    result["lesion_free_rerun"] = {"command": "python benchmarks/shipped_detectors.py " + shlex.join(sys.argv[1:]),
                                   "reason": reason, "provenance": provenance.record()}
    return result


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "deeplesion-mini")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "recistnet_mini_cpu.yaml")
    parser.add_argument("--fp-per-image", type=float, default=0.25, choices=OPERATING_FP_RATES,
                        help="the false-positive rate on val that picks the operating point")
    parser.add_argument("--also-test", type=Path, default=None, help="another miniature whose test split to score")
    parser.add_argument("--lesion-free-per-series", type=int, default=1, metavar="N",
                        help="lesion-free context slices scored per series on val and test (default 1, as the "
                             "committed run and the cards' thresholds; 0: DeepLesion's protocol)")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shipped_detectors.json")
    parser.add_argument("--lesion-free-only", metavar="REASON", default=None,
                        help="measure only the findings on lesion-free real CT again, into --out, saying why")
    args = parser.parse_args(argv)
    if args.lesion_free_per_series < 0:
        parser.error(f"--lesion-free-per-series must be 0 or more, not {args.lesion_free_per_series}")
    return args


def main() -> None:
    args = parse_args()
    if args.lesion_free_only is not None:
        result = rerun_lesion_free(args.out, args.lesion_free_only)
        args.out.write_text(json.dumps(result, indent=1) + "\n")
        report(result["models"])
        return
    provenance = Provenance(args.config)
    names = [name for name in list_models() if model_entry(name).task == "detection"]
    with tempfile.TemporaryDirectory() as work:
        models = [detector(name, args.config, args.data, Path(work) / name, args.fp_per_image,
                           args.lesion_free_per_series, args.also_test) for name in names]
    result = {"benchmark": "shipped_detectors", "command": "python benchmarks/shipped_detectors.py "
              + " ".join(sys.argv[1:]), "zoo_threshold": ZOO_THRESHOLD,
              "lesion_free_per_series": args.lesion_free_per_series, "models": models,
              "provenance": provenance.record()}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    report(models)


def report(models: list[dict]) -> None:
    for m in models:
        print(f"{m['model']}: val ECE {m['val_calibration']['ece']:.3f}, val sensitivity at 4 FPs "
              f"{m['val_sensitivity_4fp']:.3f}")
        for t, r in m["lesion_free"].items():
            print(f"  threshold {t}: {r['findings']} findings on {r['slices']} lesion-free slices "
                  f"({r['findings_per_slice']:.3f} per slice): " + ", ".join(
                      f"{s['scan']} {s['findings']}/{s['slices']}" for s in r["scans"]))
        for mode, r in m["test"].items():
            print(f"  test ({m['test_anatomy']}), decode {mode}: sensitivity at 4 FPs {r['sensitivities']['4']:.3f}")


if __name__ == "__main__":
    main()
