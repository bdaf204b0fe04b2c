"""The gated image + context model against each modality alone, on a DeepLesion-format miniature (synthetic lesions
in three real CT scans), through the commands a user runs:

1. ``ctzoo data make-deeplesion-mini`` (``--cases``, seed ``--data-seed`` = 11: not the seed-0 miniature
   ``recistnet-mini`` was trained on, so every lesion here is new to the detector; the three scans are not);
2. ``ctzoo cohort build SAMPLE_CT --deeplesion DL_info.csv``: the table, RECIST-Net's pooled lesion features,
   the findings per key slice;
3. ``ctzoo cohort fit`` for each context set (``study``: age, sex, spacing; ``csv``: also the window, location and
   RECIST diameters) at ``--seeds``: gated, image only, context only; epoch chosen on validation, mean AUC on test;
4. ``ctzoo cohort report`` (the csv fit last, so the page shows it) and, with ``--screenshots PREFIX``, the three
   views in headless chromium.

    OMP_NUM_THREADS=2 python benchmarks/cohort.py [--work runs/cohort] [--cases 240] [--seeds 0 1 2 3 4]
        [--screenshots docs/images/cohort] [--out benchmarks/results/cohort.json]

Resumable: the miniature and the built cohort in ``--work`` are reused. Synthetic lesions: the figures show what
the pipeline measures, not how a model does on patients.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from ctzoo.cohort.report import report_data

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def run(arguments: list[str], env: dict[str, str]) -> float:
    """Run ``ctzoo ARGUMENTS`` (this interpreter), raise on failure; return the wall time."""
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "ctzoo", *arguments], check=True, env=env)
    return time.perf_counter() - start


def paired(document: dict) -> dict:
    """Per seed, gated minus the better single modality of that seed (same seed, same split)."""
    results = document["results"]
    differences = [both - max(image, context) for both, image, context in
                   zip(results["both"]["test_auc"], results["image"]["test_auc"], results["context"]["test_auc"])]
    return {"gated_minus_best_single": differences, "mean": statistics.fmean(differences), "min": min(differences)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "cohort")
    parser.add_argument("--cases", type=int, default=240)
    parser.add_argument("--data-seed", type=int, default=11)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    parser.add_argument("--epochs", type=int, default=300)
    parser.add_argument("--screenshots", type=Path, default=None)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "cohort.json")
    arguments = parser.parse_args()
    provenance = Provenance()
    work = arguments.work
    # the same hashes in every run's files; the split and the AUCs do not depend on the salt (split_bucket)
    env = dict(os.environ, CTZOO_COHORT_SALT=os.environ.get("CTZOO_COHORT_SALT", "ctzoo-cohort-benchmark"))
    timings = {}
    mini, cohort = work / "mini", work / "cohort"
    if not (mini / "DL_info.csv").is_file():
        timings["make_mini_s"] = run(["data", "make-deeplesion-mini", str(mini), "--cases", str(arguments.cases),
                                      "--seed", str(arguments.data_seed)], env)
    if not (cohort / "lesions.csv").is_file():
        sample = ROOT / "ctzoo" / "datasets" / "sample_ct"
        timings["build_s"] = run(["cohort", "build", str(sample), "--deeplesion", str(mini / "DL_info.csv"),
                                  "--out", str(cohort)], env)
    fits = {}
    for context in ("study", "csv"):
        timings[f"fit_{context}_s"] = run(["cohort", "fit", str(cohort), "--context", context, "--seeds",
                                           ",".join(map(str, arguments.seeds)), "--epochs", str(arguments.epochs)], env)
        document = json.loads((cohort / "fit" / "fit.json").read_text())
        fits[context] = {"context_features": document["context_features"], "results": document["results"],
                         "mean_image_weight": document["mean_image_weight"], "paired": paired(document),
                         "importance_context": document["importance"]["context"], "counts": document["counts"],
                         "classes": document["classes"], "split_rule": document["split_rule"]}
    timings["report_s"] = run(["cohort", "report", str(cohort)], env)
    report = cohort / "report.html"
    if arguments.screenshots is not None:
        from cohort_screenshots import capture_views

        capture_views(report, arguments.screenshots)
    groups = report_data(cohort)
    result = {
        "benchmark": "cohort",
        "command": "OMP_NUM_THREADS=2 python benchmarks/cohort.py " + " ".join(sys.argv[1:]),
        "data": {"miniature": f"ctzoo data make-deeplesion-mini --cases {arguments.cases} --seed "
                              f"{arguments.data_seed} (synthetic lesions in 3 real CT scans)",
                 "detector": "recistnet-mini (trained on the seed-0 miniature: these lesions are new to it, the "
                             "three scans are not)",
                 "lesions": groups["lesions"], "typed": groups["typed"], "key_slices": groups["key_slices"]},
        "seeds": arguments.seeds, "epochs": arguments.epochs, "fits": fits,
        "groups": {"detection": groups["detection"], "auc_csv_fit": groups["auc"],
                   "clusters": groups["clusters"]["clusters"]},
        "report_mb": round(report.stat().st_size / 1e6, 2), "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "provenance": provenance.record(),
    }
    arguments.out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"{'context':>8} {'gated':>14} {'image only':>14} {'context only':>14} {'gated - best':>13} {'z test':>7}")
    for context, fit in fits.items():
        r = fit["results"]
        cells = [f"{r[m]['test_auc_mean']:.3f} ± {r[m]['test_auc_sd']:.3f}" for m in ("both", "image", "context")]
        print(f"{context:>8} {cells[0]:>14} {cells[1]:>14} {cells[2]:>14} {fit['paired']['mean']:>+13.3f} "
              f"{fit['mean_image_weight']['test']:>7.3f}")
    print(arguments.out)


if __name__ == "__main__":
    main()
