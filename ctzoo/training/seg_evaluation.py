"""Evaluating 2-D organ segmenters on whole volumes: Dice and HD95 per class, robustness, overlays, tables.

A volume is segmented slice by slice exactly as at inference
(:func:`ctzoo.inference.segment_volume.segment_slices`: a template model gets, per slice, the training template
nearest in its embedding space), the slices are stacked to 3-D, and MONAI's ``DiceMetric`` and
``HausdorffDistanceMetric(percentile=95)`` score each class on the network's slice grid (LPS axial, resampled
in-plane) with its true voxel spacing in mm (z, row, column).

Absent classes: a class absent from the truth is not scorable (Dice and HD95 nan); a class present in the truth
but never predicted has Dice 0 and HD95 nan (no surface to measure); every such case is listed under ``notes``.
Means over classes skip nan, so the mean HD95 covers the classes found: ``hd95_missed`` counts the (case, class)
pairs it leaves out, and belongs beside it wherever it is shown (a model that misses an organ must not look
closer than one that finds it in the wrong place).

Template check (:func:`wrong_template_bank`): a template segmenter is scored a second time with the class masks of
every template moved one class along (the first class's mask shows the second class, ..., the last the first),
so that each template names every organ wrongly. ``dice_mean_wrong_template`` is its mean Dice and
``dice_drop_wrong_template`` what that costs. A model that reads which organ is which from its template loses most
of its Dice; a drop under :data:`TEMPLATE_EFFECT_MIN_DROP` means the template has no measurable effect on it (it
segments from the image alone, as a plain UNet would).
"""

from __future__ import annotations

import dataclasses
import math
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from monai.metrics import DiceMetric, HausdorffDistanceMetric
from monai.networks.utils import one_hot

from ctzoo.datasets.seg_preprocessing import SegPreprocessing, labels_to_slices, resample_slices, window_slices
from ctzoo.datasets.segmentation import SegCase
from ctzoo.inference.overlay import plot_seg_overlay
from ctzoo.inference.segment_volume import segment_slices
from ctzoo.io import volume_from_sitk, volume_to_sitk
from ctzoo.models.template_bank import TemplateBank
from ctzoo.models.template_seg import TemplateSegNet

#: A perturbation of HU slices (Z, H, W) after resampling, before windowing.
HuTransform = Callable[[torch.Tensor], torch.Tensor]


def segmentation_metrics(predicted: torch.Tensor, truth: torch.Tensor, class_names: Sequence[str],
                         spacing_zyx: Sequence[float], hd95: bool = True) -> tuple[dict[str, float], list[str]]:
    """Per-class Dice and HD95 (mm) of label volumes ``(Z, H, W)`` -> (``{"dice_<c>", "hd95_<c>"}``, notes)."""
    count = len(class_names)
    pred = one_hot(predicted.long()[None, None], count + 1, dim=1)
    true = one_hot(truth.long()[None, None], count + 1, dim=1)
    in_pred = pred[0, 1:].flatten(1).any(dim=1).tolist()
    in_true = true[0, 1:].flatten(1).any(dim=1).tolist()
    dice = DiceMetric(include_background=False, reduction="none", ignore_empty=True)(pred, true)[0]
    distances = [math.nan] * count
    if hd95 and any(p and t for p, t in zip(in_pred, in_true)):
        with warnings.catch_warnings():  # MONAI warns about the empty classes we discard below
            warnings.simplefilter("ignore")
            metric = HausdorffDistanceMetric(include_background=False, percentile=95, reduction="none")
            distances = metric(pred, true, spacing=[float(s) for s in spacing_zyx])[0].tolist()
    values, notes = {}, []
    for c, name in enumerate(class_names):
        values[f"dice_{name}"] = float(dice[c]) if in_true[c] else math.nan
        values[f"hd95_{name}"] = float(distances[c]) if in_true[c] and in_pred[c] and hd95 else math.nan
        if not in_true[c]:
            notes.append(f"{name}: absent from the truth (Dice and HD95 nan)")
        elif not in_pred[c]:
            notes.append(f"{name}: never predicted (Dice 0, HD95 nan)")
    return values, notes


def missed_classes(values: Mapping[str, float], class_names: Sequence[str]) -> list[str]:
    """The classes of :func:`segmentation_metrics` ``values`` in the truth but never predicted (Dice 0, HD95 nan)."""
    return [c for c in class_names if values[f"dice_{c}"] == 0 and math.isnan(values[f"hd95_{c}"])]


def _nanmean(values: Sequence[float]) -> float:
    finite = [v for v in values if not math.isnan(v)]
    return float(np.mean(finite)) if finite else math.nan


def build_bank(model: torch.nn.Module, templates: tuple[torch.Tensor, torch.Tensor, Sequence[str]] | None,
               class_names: Sequence[str]) -> TemplateBank | None:
    """A :class:`TemplateBank` of ``templates`` (images, masks, sources) embedded by ``model``; None for a plain
    segmenter (which takes no template)."""
    if not isinstance(model, TemplateSegNet) or templates is None:
        return None
    images, masks, sources = templates
    return TemplateBank.build(model, images, masks, class_names, sources)


def copy_nearest_template(model: TemplateSegNet, bank: TemplateBank, slices: torch.Tensor,
                          batch_size: int = 16) -> torch.Tensor:
    """The trivial baseline: each slice ``(Z, 1, H, W)`` gets the labels of its nearest template ``(Z, H, W)``."""
    labels = []
    classes = torch.arange(1, bank.num_classes + 1).reshape(1, -1, 1, 1)
    for start in range(0, len(slices), batch_size):
        index = bank.nearest(model, slices[start:start + batch_size].to(next(model.parameters()).device)).cpu()
        labels.append((bank.masks[index] * classes).amax(dim=1).to(torch.uint8))  # masks are exclusive
    return torch.cat(labels)


#: The least mean-Dice drop under a wrong template (:func:`wrong_template_bank`) that says a model reads its template.
TEMPLATE_EFFECT_MIN_DROP = 0.05


def wrong_template_bank(bank: TemplateBank) -> TemplateBank | None:
    """``bank`` with each template's class masks moved one class along (class ``c`` shows class ``c + 1``'s mask, the
    last class the first's): every template names every organ wrongly. Its images, and so each slice's nearest
    template, stay as they were. None for a bank of one class (nothing to swap)."""
    if bank.num_classes < 2:
        return None
    return dataclasses.replace(bank, masks=bank.masks.roll(shifts=-1, dims=1))


def template_check_line(metrics: Mapping[str, Any]) -> str | None:
    """One line saying whether the template matters to the model that :func:`evaluate_segmenter` scored into
    ``metrics``; None where it made no template check (a plain segmenter, the template copy)."""
    wrong = metrics.get("dice_mean_wrong_template")
    if wrong is None or math.isnan(wrong):
        return None
    drop = metrics["dice_drop_wrong_template"]
    verdict = ("the model reads its template" if drop >= TEMPLATE_EFFECT_MIN_DROP else
               "the template has no measurable effect on this model")
    return (f"template check: mean Dice {metrics['dice_mean']:.3f} with the nearest template, {wrong:.3f} with its "
            f"class masks rotated between classes (drop {drop:+.3f}): {verdict}")


def _scored_slices(model: torch.nn.Module, bank: TemplateBank | None, slices: torch.Tensor, truth: torch.Tensor,
                   class_names: Sequence[str], spacing_zyx: Sequence[float], batch_size: int, device,
                   hd95: bool, copy_template: bool = False) -> tuple[dict[str, float], list[str]]:
    """:func:`segmentation_metrics` of ``model``'s labels for ``slices`` (or of the nearest templates' masks)."""
    if copy_template:
        predicted = copy_nearest_template(model, bank, slices, batch_size)
    else:
        predicted = segment_slices(model, bank, slices, batch_size, device, progress=False)
    return segmentation_metrics(predicted, truth, class_names, spacing_zyx, hd95)


def _class_mean(per_case: Mapping[str, Mapping[str, float]], class_names: Sequence[str], prefix: str) -> float:
    """Mean over classes of each class's mean over cases (nan skipped) of ``<prefix>_<class>``."""
    return _nanmean([_nanmean([v[f"{prefix}_{c}"] for v in per_case.values()]) for c in class_names])


def evaluate_segmenter(model: torch.nn.Module, cases: Sequence[SegCase], prep: SegPreprocessing,
                       templates: tuple[torch.Tensor, torch.Tensor, Sequence[str]] | None,
                       device: str | torch.device = "cpu", class_names: Sequence[str] | None = None,
                       hu_transform: HuTransform | None = None, copy_template: bool = False, hd95: bool = True,
                       batch_size: int = 16, template_check: bool = True) -> dict[str, Any]:
    """Segment every slice of every case and score it (see the module docstring).

    ``templates``: (images ``(T, 1, H, W)``, masks ``(T, C, H, W)``, sources) from the training cases, needed by a
    :class:`TemplateSegNet` (ignored by a plain segmenter). ``copy_template``: score the nearest template's masks
    instead of the model's output (the no-network baseline). ``hu_transform`` perturbs the HU slices before
    windowing. Returns ``{"dice_<c>", "hd95_<c>", "dice_mean", "hd95_mean"}`` (per class: mean over cases,
    nan skipped) and ``"hd95_missed"`` (classes in a case's truth that the model never predicted), plus ``"cases"``
    (the same per case) and ``"notes"``. ``template_check`` (a template segmenter of two or more classes, not the
    copy): also ``"dice_mean_wrong_template"`` and ``"dice_drop_wrong_template"`` (the module docstring; per case
    too), at the cost of segmenting every slice twice.
    """
    num_classes = model.num_classes if isinstance(model, TemplateSegNet) else model.out_channels - 1
    class_names = list(class_names or [f"class_{c}" for c in range(1, num_classes + 1)])
    model = model.to(device).eval()
    bank = build_bank(model, templates, class_names)
    wrong = wrong_template_bank(bank) if template_check and bank is not None and not copy_template else None
    per_case, wrong_per_case, notes = {}, {}, []
    for case in cases:
        hu, geometry = resample_slices(case.image, prep)
        slices = window_slices(hu_transform(hu) if hu_transform else hu, prep)
        truth = labels_to_slices(case.labels, case.image, geometry)
        values, case_notes = _scored_slices(model, bank, slices, truth, class_names, geometry.spacing_zyx,
                                            batch_size, device, hd95, copy_template)
        per_case[case.name] = {**values, "dice_mean": _nanmean([values[f"dice_{c}"] for c in class_names]),
                               "hd95_mean": _nanmean([values[f"hd95_{c}"] for c in class_names]),
                               "hd95_missed": len(missed_classes(values, class_names))}
        if wrong is not None:
            wrong_per_case[case.name], _ = _scored_slices(model, wrong, slices, truth, class_names,
                                                          geometry.spacing_zyx, batch_size, device, hd95=False)
            dice_wrong = _class_mean({case.name: wrong_per_case[case.name]}, class_names, "dice")
            per_case[case.name] |= {"dice_mean_wrong_template": dice_wrong,
                                    "dice_drop_wrong_template": per_case[case.name]["dice_mean"] - dice_wrong}
        notes += [f"{case.name}: {note}" for note in case_notes]
    keys = [f"{m}_{c}" for m in ("dice", "hd95") for c in class_names] + ["dice_mean", "hd95_mean"]
    summary: dict[str, Any] = {key: _nanmean([v[key] for v in per_case.values()]) for key in keys}
    summary["dice_mean"] = _class_mean(per_case, class_names, "dice")
    summary["hd95_mean"] = _class_mean(per_case, class_names, "hd95")
    summary["hd95_missed"] = sum(v["hd95_missed"] for v in per_case.values())
    if wrong is not None:
        summary["dice_mean_wrong_template"] = _class_mean(wrong_per_case, class_names, "dice")
        summary["dice_drop_wrong_template"] = summary["dice_mean"] - summary["dice_mean_wrong_template"]
    return {**summary, "cases": per_case, "notes": notes}


# ------------------------------------------------------------------------------------------------ robustness


def resample_case_slices(case: SegCase, slice_mm: float) -> SegCase:
    """``case`` resampled along its slice axis to ``slice_mm`` (image linear, labels nearest), starting at the same
    first slice and covering no more than the original extent."""
    volume = case.image
    depth = int(math.floor((volume.array.shape[0] - 1) * volume.spacing[2] / slice_mm + 1e-6)) + 1
    size, spacing = (*volume.size[:2], depth), (*volume.spacing[:2], slice_mm)
    direction = tuple(float(v) for v in np.ravel(volume.direction))

    def resample(image: sitk.Image, interpolator: int, pixel: int, fill: float) -> sitk.Image:
        return sitk.Resample(image, size, sitk.Transform(), interpolator, volume.origin, spacing, direction,
                             fill, pixel)

    image = resample(volume_to_sitk(volume), sitk.sitkLinear, sitk.sitkFloat32, -1024.0)
    labels = resample(volume_to_sitk(volume.with_array(case.labels.astype(np.uint8))), sitk.sitkNearestNeighbor,
                      sitk.sitkUInt8, 0)
    return SegCase(f"{case.name}@{slice_mm:g}mm", volume_from_sitk(image), sitk.GetArrayFromImage(labels))


def _shift(hu_offset: float) -> HuTransform:
    return lambda hu: hu + hu_offset


def _noise(sd_hu: float, seed: int = 0) -> HuTransform:
    def add(hu: torch.Tensor) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)  # the same noise for every model
        return hu + sd_hu * torch.randn(hu.shape, generator=generator, dtype=hu.dtype)

    return add


@dataclass(frozen=True)
class Condition:
    """A test condition: how the case is changed (volume level) and how its HU slices are perturbed."""

    description: str
    case: Callable[[SegCase], SegCase] | None = None
    hu: HuTransform | None = None


#: Robustness conditions (exact definitions; noise and shift act on the HU slices after in-plane resampling,
#: before windowing, so the network input carries exactly that HU noise/shift, padding air included).
CONDITIONS: dict[str, Condition] = {
    "clean": Condition("the test volume as stored"),
    "shift_+100HU": Condition("+100 HU added to every voxel (calibration offset / contrast phase)", hu=_shift(100.0)),
    "noise_30HU": Condition("Gaussian noise, sd 30 HU, at the network's 2-D grid (seed 0, same for all models)",
                            hu=_noise(30.0)),
    "slices_5mm": Condition("test volume resampled to 5 mm slices (image linear, labels nearest); metrics on "
                            "the 5 mm grid", case=lambda c: resample_case_slices(c, 5.0)),
}


def evaluate_conditions(model: torch.nn.Module, cases: Sequence[SegCase], prep: SegPreprocessing,
                        templates, device, class_names: Sequence[str], copy_template: bool = False,
                        conditions: Mapping[str, Condition] = CONDITIONS) -> dict[str, dict[str, Any]]:
    """:func:`evaluate_segmenter` under each of ``conditions`` -> ``{condition: metrics}``; the template check
    under ``clean`` only (it doubles the time, and the question it answers does not depend on the condition)."""
    results = {}
    for name, condition in conditions.items():
        changed = [condition.case(c) for c in cases] if condition.case else list(cases)
        results[name] = evaluate_segmenter(model, changed, prep, templates, device, class_names,
                                           hu_transform=condition.hu, copy_template=copy_template,
                                           template_check=name == "clean")
    return results


# -------------------------------------------------------------------------------------------- pictures, tables


def middle_slice_overlay(models: Mapping[str, tuple[torch.nn.Module, bool]], case: SegCase, prep: SegPreprocessing,
                         templates, class_names: Sequence[str], device, path: str | Path) -> Path:
    """:func:`plot_seg_overlay` of the middle slice of ``case`` for ``{name: (model, copy_template)}``."""
    hu, geometry = resample_slices(case.image, prep)
    slices, k = window_slices(hu, prep), hu.shape[0] // 2
    truth = labels_to_slices(case.labels, case.image, geometry)[k]
    predictions = {}
    for name, (model, copy_template) in models.items():
        model = model.to(device).eval()
        bank = build_bank(model, templates, class_names)
        middle = slices[k:k + 1]
        predicted = (copy_nearest_template(model, bank, middle) if copy_template
                     else segment_slices(model, bank, middle, device=device, progress=False))
        predictions[name] = predicted[0].numpy()
    return plot_seg_overlay(slices[k, 0].numpy(), truth.numpy(), predictions, class_names, path,
                            f"{case.name}, slice {k} of {len(slices)} (LPS axial)")


def hd95_with_misses(mean_mm: float | None, missed: int) -> str:
    """A mean HD95 as shown: with the classes it could not measure (never predicted), when there are any."""
    shown = "nan" if mean_mm is None or math.isnan(mean_mm) else f"{mean_mm:.1f}"
    return f"{shown} ({missed} missed)" if missed else shown


def comparison_markdown(rows: Sequence[Mapping[str, Any]], class_names: Sequence[str],
                        conditions: Mapping[str, Condition] = CONDITIONS) -> str:
    """Markdown table: one row per (model, condition) with per-class Dice, mean Dice, mean HD95 and parameters."""

    def number(value: Any, digits: int) -> str:
        return "nan" if value is None or (isinstance(value, float) and math.isnan(value)) else f"{value:.{digits}f}"

    header = ["model", "condition", *[f"Dice {c}" for c in class_names], "mean Dice", "mean HD95 mm", "parameters"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in rows:
        cells = [row["model"], row["condition"], *[number(row[f"dice_{c}"], 3) for c in class_names],
                 number(row["dice_mean"], 3), hd95_with_misses(row["hd95_mean"], row.get("hd95_missed", 0)),
                 f"{row['parameters']:,}"]
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    checks = [f"* {row['model']}, {row['condition']}: {line}" for row in rows
              if (line := template_check_line(row)) is not None]
    lines += ["", "Conditions:", *[f"* `{name}`: {c.description}" for name, c in conditions.items()]]
    lines += ["", "Template check (the nearest template's class masks rotated between classes):", *checks] \
        if checks else []
    return "\n".join(lines) + "\n"
