"""What every shipped detector does on real CT with no known lesion, how well its scores are calibrated, and how
much each decoder contributes — for the zoo's own weights.

For each zoo detector (task ``detection``):

* findings per slice on the real CT scans ctzoo can reach (TotalSegmentator's ``example_ct`` and
  ``aorta_example_ct``, the embedded DICOM sample), run as ``ctzoo infer`` runs them, at the zoo's former fixed
  score threshold (0.3) and at the operating point chosen on the miniature's val split for
  ``--fp-per-image`` (0.25) false positives per image, the threshold the model's card states. These scans hold
  no known lesion, so every finding counts as a false positive. They are also the scans the miniature's lesions
  were drawn into, so the model has seen this anatomy (with synthetic lesions) in training;
* calibration on val: reliability diagram and ECE;
* FROC on the miniature's test split with the three decoders (``grouping``, ``centre``, ``both``). This split
  shares anatomy with training: see ``benchmarks/loso.py`` for anatomy the model never saw.

    python benchmarks/shipped_detectors.py [--data data/deeplesion-mini] [--out benchmarks/results/shipped_detectors.json]

``--data`` is the miniature the detectors were trained on (``ctzoo data make-deeplesion-mini data/deeplesion-mini
--cases 240 --seed 0``); its val split chooses the thresholds.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
from pathlib import Path

import torch

from ctzoo.datasets.samples import REAL_CT_SCANS, real_ct_scan
from ctzoo.models.registry import list_models, model_entry
from ctzoo.training.calibration import OPERATING_FP_RATES
from ctzoo.training.evaluate import evaluate_recistnet, findings_on_lesion_free_ct

ROOT = Path(__file__).resolve().parents[1]
ZOO_THRESHOLD = 0.3  # every detector's threshold before cards stated an operating point


def detector(name: str, config: Path, data: Path, work: Path, fp_per_image: float) -> dict:
    evaluate_recistnet(config, work / "val", "val", model_name=name, data_root=data)
    val = json.loads((work / "val" / "froc.json").read_text())
    evaluate_recistnet(config, work / "test", "test", model_name=name, data_root=data,
                       decodes=("both", "grouping", "centre"))
    test = json.loads((work / "test" / "froc.json").read_text())
    operating = next(p for p in val["operating_points"] if p["fp_per_image"] == fp_per_image)
    val_threshold = operating["score_threshold"]
    scans = {scan: real_ct_scan(scan) for scan in REAL_CT_SCANS}
    lesion_free = {f"{t:g}": findings_on_lesion_free_ct(name, scans, t) for t in (ZOO_THRESHOLD, val_threshold)}
    return {"model": name, "val_sensitivity_4fp": val["sensitivities"][3], "val_calibration": val["calibration"],
            "val_operating_points": val["operating_points"], "operating_point": operating,
            "test_seen_anatomy": {mode: {"sensitivities": dict(zip([f"{f:g}" for f in r["fps_per_image"]],
                                                                   r["sensitivities"])),
                                         "mean_0p5_to_4": r["mean_sensitivity_0p5_to_4"]}
                                  for mode, r in test["decodes"].items()},
            "lesion_free": lesion_free}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", type=Path, default=ROOT / "data" / "deeplesion-mini")
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "recistnet_mini_cpu.yaml")
    parser.add_argument("--fp-per-image", type=float, default=0.25, choices=OPERATING_FP_RATES,
                        help="the false-positive rate on val that picks the operating point")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shipped_detectors.json")
    args = parser.parse_args()
    names = [name for name in list_models() if model_entry(name).task == "detection"]
    with tempfile.TemporaryDirectory() as work:
        models = [detector(name, args.config, args.data, Path(work) / name, args.fp_per_image) for name in names]
    result = {"benchmark": "shipped_detectors", "command": "python benchmarks/shipped_detectors.py "
              + " ".join(sys.argv[1:]), "zoo_threshold": ZOO_THRESHOLD,
              "machine": {"platform": platform.platform(), "cpus": torch.get_num_threads(), "torch": torch.__version__},
              "models": models}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for m in models:
        print(f"{m['model']}: val ECE {m['val_calibration']['ece']:.3f}, val sensitivity at 4 FPs "
              f"{m['val_sensitivity_4fp']:.3f}")
        for t, r in m["lesion_free"].items():
            print(f"  threshold {t}: {r['findings']} findings on {r['slices']} lesion-free slices "
                  f"({r['findings_per_slice']:.3f} per slice): " + ", ".join(
                      f"{s['scan']} {s['findings']}/{s['slices']}" for s in r["scans"]))
        for mode, r in m["test_seen_anatomy"].items():
            print(f"  test (seen anatomy), decode {mode}: sensitivity at 4 FPs {r['sensitivities']['4']:.3f}")


if __name__ == "__main__":
    main()
