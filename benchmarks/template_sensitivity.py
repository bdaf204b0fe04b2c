"""Does the shipped template segmenter read its template? Its test Dice with the proper template and with wrong ones.

The shipped ``template-seg-abdomen`` weights and template bank, on the test patient of
``configs/template_seg_abdomen.yaml`` (the embedded DICOM sample, never trained on), prepared with the bundle's own
preprocessing. Scored (Dice per class, MONAI, on the network's slice grid as ``ctzoo eval`` scores):

* ``nearest``: each slice with its nearest bank template, as ``ctzoo infer`` runs it;
* ``classes_rotated``: the same templates with their class masks moved one class along (liver's mask shows the
  spleen, ..., vertebrae's the liver): the template check every evaluation now makes
  (:func:`ctzoo.training.seg_evaluation.wrong_template_bank`);
* ``always_template_<k>``: one fixed template for every slice (the first and the last of the bank);
* ``template_image_blank``: the nearest template with its image set to 0 (masks kept);
* ``template_masks_empty``: the nearest template with every class mask empty.

Also the share of pixels whose label changes between ``nearest`` and ``classes_rotated``, and the whole evaluation
(:func:`ctzoo.training.seg_evaluation.evaluate_conditions`: Dice, HD95 and the template check, clean and under the
robustness conditions) of the model and of the template copy (the nearest template's masks as the answer).

    OMP_NUM_THREADS=2 python benchmarks/template_sensitivity.py [--config configs/template_seg_abdomen.yaml]
        [--threads 2] [--out benchmarks/results/template_sensitivity.json]

Needs the TotalSegmentator samples (``ctzoo data fetch-samples``); about 2 minutes on a 2-core CPU.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import time
from pathlib import Path

import torch

from ctzoo.datasets.seg_preprocessing import labels_to_slices, resample_slices, window_slices
from ctzoo.inference.segment_volume import segment_slices
from ctzoo.models import create_model
from ctzoo.models.bundle import load_bundle
from ctzoo.models.template_bank import TemplateBank
from ctzoo.training.seg_evaluation import (
    evaluate_conditions,
    segmentation_metrics,
    template_check_line,
    wrong_template_bank,
)
from ctzoo.training.template_seg_task import _write_json, load_seg_config, load_seg_data

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MODEL = "template-seg-abdomen"


def template_variants(bank: TemplateBank) -> dict[str, TemplateBank]:
    """The banks each slice picks its template from: the shipped one and the wrong ones of the module docstring."""
    last = len(bank) - 1

    def only(index: int) -> TemplateBank:  # one template: every slice's nearest
        return TemplateBank(bank.images[index:index + 1], bank.masks[index:index + 1],
                            bank.embeddings[index:index + 1], bank.class_names, bank.sources[index:index + 1])

    return {"nearest": bank, "classes_rotated": wrong_template_bank(bank), "always_template_0": only(0),
            f"always_template_{last}": only(last),
            "template_image_blank": dataclasses.replace(bank, images=torch.zeros_like(bank.images)),
            "template_masks_empty": dataclasses.replace(bank, masks=torch.zeros_like(bank.masks))}


def dice_of(predicted: torch.Tensor, truth: torch.Tensor, names: list[str], spacing) -> dict[str, float]:
    values, _ = segmentation_metrics(predicted, truth, names, spacing, hd95=False)
    dice = {c: values[f"dice_{c}"] for c in names}
    return {**dice, "mean": sum(dice.values()) / len(dice)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", type=Path, default=ROOT / "configs" / "template_seg_abdomen.yaml")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "template_sensitivity.json")
    args = parser.parse_args()
    provenance = Provenance(args.config)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    bundle = load_bundle(MODEL)
    model = create_model(MODEL, pretrained=True).eval()
    bank, prep, names = bundle.template_bank, bundle.preprocessing, bundle.class_names
    test = load_seg_data(load_seg_config(args.config).data).cases["test"]
    if len(test) != 1:
        raise SystemExit(f"expected one test patient, got {[c.name for c in test]}")
    case = test[0]
    hu, geometry = resample_slices(case.image, prep)
    slices, truth = window_slices(hu, prep), labels_to_slices(case.labels, case.image, geometry)
    predictions = {name: segment_slices(model, variant, slices, progress=False)
                   for name, variant in template_variants(bank).items()}
    variants = {name: dice_of(p, truth, names, geometry.spacing_zyx) for name, p in predictions.items()}
    changed = float((predictions["nearest"] != predictions["classes_rotated"]).float().mean())
    templates = (bank.images, bank.masks, bank.sources)
    evaluation = {name: evaluate_conditions(model, test, prep, templates, "cpu", names, copy_template=copy)
                  for name, copy in (("template_seg", False), ("template copy", True))}
    for results in evaluation.values():
        for metrics in results.values():
            metrics.pop("cases")
    clean = evaluation["template_seg"]["clean"]
    document = {
        "benchmark": "template_sensitivity",
        "command": " ".join(["python benchmarks/template_sensitivity.py", *sys.argv[1:]]),
        "model": {"name": bundle.name, "version": bundle.version, "config": bundle.card.training.config_file,
                  "parameters": sum(p.numel() for p in model.parameters()), "templates": len(bank)},
        "test_case": case.name, "class_names": names, "preprocessing": prep.model_dump(mode="json"),
        "template_check": {"dice_mean": clean["dice_mean"],
                           "dice_mean_wrong_template": clean["dice_mean_wrong_template"],
                           "dice_drop_wrong_template": clean["dice_drop_wrong_template"],
                           "verdict": template_check_line(clean),
                           "pixels_changed_by_rotated_classes": changed},
        "variants_dice": variants,
        "evaluation": evaluation,
        "wall_s": round(time.perf_counter() - start, 1),
        "provenance": provenance.record(device="cpu"),
    }
    _write_json(document, args.out)
    width = max(map(len, variants))
    for name, dice in variants.items():
        print(f"{name:{width}s}  " + "  ".join(f"{c} {dice[c]:.3f}" for c in names) + f"  mean {dice['mean']:.3f}")
    print(f"pixels whose label changes with the classes rotated: {changed:.2%}")
    print(template_check_line(clean))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
