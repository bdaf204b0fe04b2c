"""What the shipped template-seg-abdomen weights score on their test patient, and the template-copy baseline: the
figures of its model card, measured from the weights themselves (about a minute on 2 cores).

The test patient is the embedded DICOM sample (``sample_ct_dicom``, contrast-enhanced), the templates the training
slices of TotalSegmentator's ``example_ct_sm`` (``ctzoo data fetch-samples``), prepared as
``configs/template_seg_abdomen.yaml`` says, as ``ctzoo train`` tested them before publishing:

* ``template_seg``: Dice and HD95 (mm) per class and their means, on the 3 mm slice grid;
* ``template_copy``: the no-network baseline, each slice given the masks of the template the shipped weights pick.

The same-budget UNet the card once compared with needs a training run (``ctzoo train``), not measured here.

    python benchmarks/shipped_segmenter.py [--out benchmarks/results/shipped_segmenter.json]
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from ctzoo.models import load_bundle
from ctzoo.training.seg_evaluation import evaluate_segmenter
from ctzoo.training.template_seg_task import TemplateSegTask, load_seg_config, load_seg_data

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NAME = "template-seg-abdomen"


def scores(copy_template: bool, config: Path) -> dict:
    """The shipped weights (or, ``copy_template``, the masks of the templates they pick) on the test patient."""
    cfg = load_seg_config(config)
    data = load_seg_data(cfg.data)
    model = load_bundle(NAME).network()
    result = evaluate_segmenter(model, data.cases["test"], cfg.data.preprocessing, TemplateSegTask(cfg, data).templates,
                                torch.device("cpu"), data.class_names, copy_template=copy_template)
    return {"test_cases": [c.name for c in data.cases["test"]],
            **{k: v for k, v in result.items() if k not in ("cases", "notes")}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "template_seg_abdomen.yaml")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "shipped_segmenter.json")
    args = parser.parse_args()
    provenance = Provenance(args.config)
    start, bundle = time.perf_counter(), load_bundle(NAME)
    command = " ".join(["python benchmarks/shipped_segmenter.py", *sys.argv[1:]])
    result = {"benchmark": "shipped_segmenter", "command": command, "model": NAME, "version": bundle.version,
              "weights": bundle.file_digests(), "template_seg": scores(False, args.config),
              "template_copy": scores(True, args.config)}
    result["wall_s"] = round(time.perf_counter() - start, 1)
    result["provenance"] = provenance.record()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    for kind in ("template_seg", "template_copy"):
        print(f"{kind}: Dice {result[kind]['dice_mean']:.4f}, HD95 {result[kind]['hd95_mean']:.2f} mm")


if __name__ == "__main__":
    main()
