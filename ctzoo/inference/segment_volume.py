"""A 2D segmenter on CT slices, and its results written on the input's own grid.

:func:`segment_slices` is what the PyTorch backend and the training evaluation run;
:func:`ctzoo.inference.tasks.segmenter_task` puts it into the stages every path runs (``ctzoo infer``, the
service's ``/studies``, the PACS bridge; :func:`ctzoo.inference.tasks.run_task` for one volume in memory). The
volume is cut into slices exactly as in training (:func:`ctzoo.datasets.segmentation.volume_to_slices`:
reoriented to LPS axial, resampled in-plane, padded/cropped, windowed), segmented in batches, and the
per-slice argmax is mapped back onto the voxel grid of the input *as stored*
(:func:`~ctzoo.datasets.segmentation.slices_to_volume_labels`), so the label map can be written beside the
input (NIfTI with its affine, or a DICOM SEG referencing its slices) without any resampling by the caller.

Template models (:class:`~ctzoo.models.template_seg.TemplateSegNet`) need a labelled template per slice: each
slice gets the bank template nearest in embedding space (:meth:`TemplateBank.nearest`; see
:mod:`ctzoo.models.template_bank` for why templates are retrieved, not registered). Any other module is a plain
segmenter ``(B, 1, H, W) -> (B, C + 1, H, W)`` (e.g. the MONAI UNet baseline) and takes no bank.

Summary schema (``segmentation.json``; :func:`seg_summary`)::

    {"model": str, "model_version": str, "weights": {"sha256": {file: str}, "checked": bool},
     "input": {...geometry..., "warnings": [str]}, "slice_grid": str, "voxel_volume_ml": float,
     "classes": {name: {"label": c, "voxels": int, "volume_ml": float, "slices": [k, ...],
                        "slices_z_mm": [z, ...]}}}

``slices`` are indices ``k`` of ``volume.array[k]`` (the input's own slice order) that hold the class;
``slices_z_mm`` the same slices' patient LPS z in mm (superior positive, :meth:`Volume.slice_position`). That holds
where the input stores axial slices (``"slice_grid": "input"``); a sagittal or coronal input's slices are no axial
planes (``"slice_grid": "axial"``), so ``slices`` then index the LPS-axial reoriented volume the model ran on
(:func:`ctzoo.io.reorient_lps`) and ``slices_z_mm`` are those axial planes' z. ``voxel_volume_ml`` is
:attr:`Volume.voxel_volume_mm3` (``|det|`` of the affine: right on a sheared, gantry-tilted grid too).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ctzoo.inference.recist_volume import describe_input, slice_grid
from ctzoo.io import Volume, reorient_lps
from ctzoo.models.template_bank import TemplateBank
from ctzoo.models.template_seg import TemplateEncoding, TemplateSegNet


def _check_bank(model: torch.nn.Module, bank: TemplateBank | None, slice_size: tuple[int, ...]) -> None:
    """ValueError unless a template model has a bank that fits it and the slices, and a plain model has none."""
    if not isinstance(model, TemplateSegNet):
        if bank is not None:
            raise ValueError(f"{type(model).__name__} is not a TemplateSegNet and takes no template bank")
        return
    if bank is None:
        raise ValueError("a TemplateSegNet needs a TemplateBank to pick a template for each slice")
    if bank.num_classes != model.num_classes:
        raise ValueError(f"the bank has {bank.num_classes} classes {bank.class_names}, the model segments "
                         f"{model.num_classes}")
    if tuple(bank.images.shape[2:]) != tuple(slice_size):
        raise ValueError(f"bank templates are {tuple(bank.images.shape[2:])} pixels but the preprocessing gives "
                         f"{tuple(slice_size)}: the bank was built with another SegPreprocessing")


def _nearest_encoding(model: TemplateSegNet, bank: TemplateBank, images: torch.Tensor) -> TemplateEncoding:
    """Encode the nearest template of each image ``(B, 1, H, W)``; -> prototypes ``(B, C, F_k)`` per level.

    Neighbouring slices mostly share a template, so each distinct one is encoded once and gathered per image.
    """
    index = bank.nearest(model, images).cpu()
    unique, inverse = torch.unique(index, return_inverse=True)
    encoding = model.encode_template(bank.templates(unique).to(images.device))
    inverse = inverse.to(images.device)
    return TemplateEncoding(tuple(p[inverse] for p in encoding.prototypes), encoding.present[inverse])


def segment_slices(model: torch.nn.Module, bank: TemplateBank | None, slices: torch.Tensor, batch_size: int = 16,
                   device: str | torch.device = "cpu", progress: bool = True) -> torch.Tensor:
    """Class index per pixel for preprocessed ``slices`` ``(Z, 1, H, W)`` -> ``(Z, H, W)`` uint8 on the CPU."""
    _check_bank(model, bank, tuple(slices.shape[2:]))
    model = model.to(device).eval()
    predicted = torch.empty((slices.shape[0], *slices.shape[2:]), dtype=torch.uint8)
    for start in tqdm(range(0, slices.shape[0], batch_size), desc="segmenting", unit="batch",
                      disable=None if progress else True, leave=False):
        images = slices[start:start + batch_size].to(device)
        with torch.inference_mode():
            if isinstance(model, TemplateSegNet):
                logits = model(images, template_encoding=_nearest_encoding(model, bank, images))
            else:
                logits = model(images)
        predicted[start:start + images.shape[0]] = logits.argmax(dim=1).to(torch.uint8).cpu()
    return predicted


def seg_summary(labels: np.ndarray, volume: Volume, class_names: Sequence[str], model_name: str = "",
                model_version: str = "", weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """The ``segmentation.json`` document (see the module docstring) for ``labels`` ``(Z, Y, X)`` on ``volume``;
    ``weights``: the digests of the weights that ran (:func:`ctzoo.inference.tasks.weights_record`).

    Every class is listed, absent ones with zero voxels, so consumers need not special-case a missed organ.
    """
    labels = np.asarray(labels)
    if labels.shape != volume.array.shape:
        raise ValueError(f"labels have shape {labels.shape}, the volume {volume.array.shape}")
    if labels.size and (labels.min() < 0 or labels.max() > len(class_names)):
        raise ValueError(f"label values must lie in 0..{len(class_names)} ({len(class_names)} class names), "
                         f"found {labels.min()}..{labels.max()}")
    voxel_ml = volume.voxel_volume_mm3 / 1000.0  # mm^3 -> mL
    named_labels, named_volume = axial_labels(labels, volume)  # on the slices the results name
    per_slice = np.zeros((named_labels.shape[0], len(class_names) + 1), dtype=np.int64)  # voxels per (slice, class)
    for k, plane in enumerate(named_labels):
        per_slice[k] = np.bincount(plane.ravel().astype(np.int64), minlength=per_slice.shape[1])
    counts = per_slice.sum(axis=0)
    z_mm = [named_volume.slice_position(k)["z_mm"] for k in range(named_labels.shape[0])]
    classes = {}
    for value, name in enumerate(class_names, start=1):
        slices = np.flatnonzero(per_slice[:, value]).tolist()
        classes[name] = {"label": value, "voxels": int(counts[value]),
                         "volume_ml": round(float(counts[value]) * voxel_ml, 3),
                         "slices": slices, "slices_z_mm": [z_mm[k] for k in slices]}
    return {"model": model_name, "model_version": model_version, **({"weights": weights} if weights else {}),
            "input": describe_input(volume), "slice_grid": slice_grid(volume), "voxel_volume_ml": round(voxel_ml, 9),
            "classes": classes}


def axial_labels(labels: np.ndarray, volume: Volume) -> tuple[np.ndarray, Volume]:
    """``labels`` on ``volume`` and ``volume`` as their slices are named (:func:`slice_grid`): as stored for an
    axial input, reoriented to LPS axial (axes permuted and flipped, nothing resampled) for a sagittal or coronal
    one."""
    if volume.stores_axial_slices:
        return labels, volume
    axial = reorient_lps(volume)
    return reorient_lps(volume.with_array(labels.astype(np.float32))).array.astype(labels.dtype), axial


def write_segmentation(volume: Volume, labels: np.ndarray, class_names: Sequence[str], folder: Path,
                       model_name: str, model_version: str, overlay: bool = True,
                       runtime: dict[str, Any] | None = None, weights: dict[str, Any] | None = None,
                       ) -> tuple[list[Path], dict[str, Any]]:
    """What ``ctzoo infer`` writes for a segmenter into ``folder`` but its DICOM SEG (which
    :func:`ctzoo.inference.tasks.segmenter_task` writes, a failure there costing the case none of these):
    ``labels.nii.gz`` (uint8 on the input grid), ``segmentation.json`` (:func:`seg_summary`) and
    ``labels_overlay.png`` (the axial slice with the most foreground). Every file is written under a temporary name and
    renamed. Returns the paths written and the ``segmentation.json`` document."""
    import json

    from ctzoo.io import write_volume
    from ctzoo.io.atomic import atomic_path

    folder.mkdir(parents=True, exist_ok=True)
    written = [write_volume(volume.with_array(labels), folder / "labels.nii.gz", dtype=np.uint8)]
    with atomic_path(folder / "segmentation.json") as partial:
        document = seg_summary(labels, volume, class_names, model_name, model_version, weights)
        partial.write_text(json.dumps(document if runtime is None else {**document, "runtime": runtime}, indent=2))
    written.append(folder / "segmentation.json")
    if overlay:
        from ctzoo.inference.overlay import plot_seg_overlay

        drawn, grid = axial_labels(labels, volume)  # the axial slices a sagittal or coronal input was segmented on
        k = int(np.argmax((drawn > 0).sum(axis=(1, 2))))
        image = np.clip((grid.array[k] + 200.0) / 600.0, 0, 1)
        written.append(plot_seg_overlay(image, np.zeros_like(drawn[k]), {f"{model_name} {model_version}": drawn[k]},
                                        class_names, folder / "labels_overlay.png", title=grid.slice_label(k)))
    return written, document
