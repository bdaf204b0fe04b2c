"""Does training with the template's classes shuffled (``augment.permute_classes``) make the segmenter read it?

Without it every training item has the classes in the same order and the image alone predicts every label: the
shipped model ignores its template (``benchmarks/template_sensitivity.py``). With it, a share of the items get
their template's class masks shuffled and their labels renumbered to match (``RandPermuteClassesd``), so the
network must read from the template which organ is which.

The tests' CPU learning recipe (``tests/test_template_seg_training.py`` ``learning_config``: channels 8..64, the
default sigmoid gate, 3 mm, 128 px, batch 8, lr 3e-3, 4 repeats, seed 0, default augmentation) trained on the
TotalSegmentator sample's training patient for each share and epoch count, without the UNet baseline; the best-val
checkpoint tested on the other patient (clean only) with the template check of every evaluation (the class masks of
each nearest template rotated between classes): ``dice_mean``, ``dice_mean_wrong_template``,
``dice_drop_wrong_template``. One seed, one test patient.

    OMP_NUM_THREADS=1 python benchmarks/permute_classes.py [--shares 0 0.5 1] [--epochs 12 30] [--threads 1]
        [--work runs/permute] [--out benchmarks/results/permute_classes.json]

Resumable: a run whose ``comparison.json`` exists (and whose ``last.pt`` holds this config) is read, not redone.
Needs the TotalSegmentator samples (``ctzoo data fetch-samples``); 6-20 minutes a run on a shared 2-core CPU.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

from ctzoo.datasets.segmentation_slices import SegAugmentConfig
from ctzoo.training.engine import OptimConfig
from ctzoo.training.seg_evaluation import CONDITIONS
from ctzoo.training.template_seg_task import (
    SegDataConfig,
    TemplateSegModelConfig,
    TemplateSegTrainConfig,
    _write_json,
    train_with_baseline,
)

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def recipe(share: float, epochs: int) -> TemplateSegTrainConfig:
    """The tests' learning recipe with ``permute_classes`` ``share``, ``epochs`` long, no UNet baseline."""
    return TemplateSegTrainConfig(
        data=SegDataConfig(spacing_mm=3.0, size=(128, 128)),
        model=TemplateSegModelConfig(channels=(8, 16, 32, 64)),
        optim=OptimConfig(epochs=epochs, batch_size=8, lr=3e-3, num_workers=0),
        augment=SegAugmentConfig(permute_classes=share), repeats=4, baseline_unet=False)


def trained(cfg: TemplateSegTrainConfig, folder: Path) -> dict:
    """The run of ``cfg`` in ``folder``: its comparison.json where it holds this config's finished run, else trained."""
    last, comparison = folder / "template_seg" / "last.pt", folder / "comparison.json"
    if comparison.exists() and last.exists():
        recorded = torch.load(last, map_location="cpu", weights_only=False).get("task_config")
        if recorded == json.loads(cfg.model_dump_json()):
            return json.loads(comparison.read_text())
    return train_with_baseline(cfg, folder, device="cpu", progress=False, conditions={"clean": CONDITIONS["clean"]})


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shares", type=float, nargs="+", default=[0.0, 0.5, 1.0])
    parser.add_argument("--epochs", type=int, nargs="+", default=[12, 30])
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", type=Path, default=Path("runs/permute"))
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "permute_classes.json")
    args = parser.parse_args()
    provenance = Provenance()  # the recipe is in code: the JSON's recipe holds it
    torch.set_num_threads(args.threads)
    runs = []
    for epochs in args.epochs:
        for share in args.shares:
            comparison = trained(recipe(share, epochs), args.work / f"small_p{share}_e{epochs}")
            row = next(r for r in comparison["rows"] if r["model"] == "template_seg" and r["condition"] == "clean")
            training = comparison["training"]["template_seg"]
            runs.append({"permute_classes": share, "epochs": epochs, "test_cases": comparison["test_cases"],
                         "train_wall_s": training["wall_s"], "parameters": training["parameters"],
                         **{k: v for k, v in row.items() if k.startswith(("dice", "hd95"))}})
            print(f"permute_classes {share:g}, {epochs} epochs: mean Dice {row['dice_mean']:.3f}, with the wrong "
                  f"template {row['dice_mean_wrong_template']:.3f} (drop {row['dice_drop_wrong_template']:+.3f}), "
                  f"trained in {training['wall_s']:.0f} s", flush=True)
    document = {
        "benchmark": "permute_classes",
        "command": " ".join(["python benchmarks/permute_classes.py", *sys.argv[1:]]),
        "recipe": json.loads(recipe(0.0, 1).model_dump_json(exclude={"augment": {"permute_classes"},
                                                                      "optim": {"epochs"}})),
        "runs": runs, "provenance": provenance.record(device="cpu"),
    }
    _write_json(document, args.out)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
