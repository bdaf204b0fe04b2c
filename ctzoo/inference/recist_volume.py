"""Run the 2.5D RECIST detector over every slice of a CT volume and merge one lesion's slices.

This is the function ``ctzoo infer``, the service and the PACS bridge call. Per slice it builds the
same input as training (neighbours ``slice_interval_mm`` apart, linearly interpolated; in-plane
resampling and window from :func:`ctzoo.datasets.deeplesion.dataset.resample_and_window`), on the
volume reoriented to LPS axial — the orientation DeepLesion's slices are displayed and trained in.
Results are mapped back to the voxel indices of the input *as stored* and to patient LPS mm.

Output schema (``detections.json``; stable, see the README)::

    {"model": str, "model_version": str, "input": {...geometry...},
     "lesions": [{"score": float, "slice": k, "slices": [k0, k1],
                  "points_voxel": [[i, j, k] x 5], "points_mm": [[x, y, z] x 5],
                  "long_axis_mm": float, "short_axis_mm": float, "box_voxel": [i0, j0, i1, j1]}]}

Points are long-axis end 1, long-axis end 2, short-axis end 1, short-axis end 2, centre.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import SimpleITK as sitk
import torch
from tqdm.auto import tqdm

from ctzoo.datasets.deeplesion.context import context_planes, neighbour_offsets
from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing, resample_and_window
from ctzoo.io import Volume, volume_from_sitk, volume_to_sitk

#: Detections of one lesion on neighbouring slices merge when their centres are this close in-plane,
#: as a fraction of the larger long axis (and at least MIN_MERGE_MM).
MERGE_FRACTION = 0.5
MIN_MERGE_MM = 5.0


@dataclass
class SliceDetection:
    """One detection on one slice of the LPS-reoriented volume."""

    score: float
    k: int
    points_ijk: np.ndarray  # (5, 3) continuous voxel indices in the reoriented volume
    points_mm: np.ndarray  # (5, 3) LPS mm
    long_mm: float
    short_mm: float
    slices: list[int] = field(default_factory=list)


def reorient_lps(volume: Volume) -> Volume:
    """The volume resampled losslessly (axes permuted/flipped only) so index axes point L, P, S."""
    if volume.orientation == "LPS":
        return volume
    reoriented = volume_from_sitk(sitk.DICOMOrient(volume_to_sitk(volume), "LPS"))
    if reoriented.orientation != "LPS":
        raise ValueError(f"cannot bring orientation {volume.orientation} to LPS axial by permuting axes")
    return reoriented


def _pad_to_multiple(image: torch.Tensor, multiple: int) -> torch.Tensor:
    height, width = image.shape[-2:]
    return torch.nn.functional.pad(image, (0, -width % multiple, 0, -height % multiple))


def detect_slices(model: torch.nn.Module, volume: Volume, prep: SlicePreprocessing, batch_size: int = 8,
                  score_threshold: float = 0.3, max_lesions: int = 20, device: str | torch.device = "cpu",
                  progress: bool = True) -> list[SliceDetection]:
    """Detections on every slice of ``volume`` (already LPS axial), scores >= ``score_threshold``."""
    hu = volume.array
    offsets = neighbour_offsets(prep.num_slices, prep.slice_interval_mm, volume.spacing[2])
    spacing_xy = volume.spacing[:2]
    found: list[SliceDetection] = []
    model = model.to(device).eval()
    for start in tqdm(range(0, hu.shape[0], batch_size), desc="detecting", unit="batch",
                      disable=None if progress else True, leave=False):
        ks = list(range(start, min(start + batch_size, hu.shape[0])))
        images, scale = [], None
        for k in ks:
            planes = context_planes(lambda z: hu[z], k, offsets, 0, hu.shape[0] - 1)
            image, scale = resample_and_window(planes, spacing_xy, prep)
            images.append(_pad_to_multiple(image, 32))
        with torch.no_grad():
            results = model.detect(torch.stack(images).to(device), max_lesions=max_lesions)
        for k, result in zip(ks, results):
            keep = result["scores"] >= score_threshold
            for score, points in zip(result["scores"][keep].cpu().numpy(), result["points"][keep].cpu().numpy()):
                original = (points.astype(np.float64) + 0.5) / scale - 0.5  # back to the slice's own pixels
                ijk = np.column_stack([original, np.full(5, float(k))])
                mm = volume.index_to_lps(ijk)
                found.append(SliceDetection(float(score), k, ijk, mm, float(np.linalg.norm(mm[1] - mm[0])),
                                            float(np.linalg.norm(mm[3] - mm[2])), [k]))
    return found


def merge_across_slices(detections: list[SliceDetection], slice_spacing_mm: float) -> list[SliceDetection]:
    """One lesion per group of detections on adjacent slices whose centres nearly coincide in-plane.

    Greedy by score: the strongest detection represents its lesion (its slice is the reported key slice);
    weaker ones within reach on a neighbouring slice of the group join it.
    """
    lesions: list[SliceDetection] = []
    for detection in sorted(detections, key=lambda d: -d.score):
        for lesion in lesions:
            reach = max(MIN_MERGE_MM, MERGE_FRACTION * max(lesion.long_mm, detection.long_mm))
            in_plane = np.linalg.norm(lesion.points_mm[4, :2] - detection.points_mm[4, :2])
            adjacent = min(abs(detection.k - s) for s in lesion.slices) <= 1
            along = abs(detection.points_mm[4, 2] - lesion.points_mm[4, 2])
            if adjacent and in_plane <= reach and along <= lesion.long_mm / 2 + slice_spacing_mm:
                lesion.slices.append(detection.k)
                break
        else:
            lesions.append(SliceDetection(detection.score, detection.k, detection.points_ijk, detection.points_mm,
                                          detection.long_mm, detection.short_mm, [detection.k]))
    return lesions


def detect_volume(model: torch.nn.Module, volume: Volume, prep: SlicePreprocessing, model_name: str = "",
                  model_version: str = "", **options: Any) -> dict[str, Any]:
    """Detect lesions in ``volume`` and return the ``detections.json`` document (see the module docstring).

    ``options`` go to :func:`detect_slices` (batch_size, score_threshold, max_lesions, device, progress).
    """
    axial = reorient_lps(volume)
    lesions = merge_across_slices(detect_slices(model, axial, prep, **options), axial.spacing[2])
    to_input = np.linalg.inv(volume.affine_lps)
    documents = []
    for lesion in lesions:
        voxel = lesion.points_mm @ to_input[:3, :3].T + to_input[:3, 3]
        # each slice of the lesion, through its centre, in the input's own slice numbering
        centres = np.array([[*lesion.points_ijk[4, :2], s] for s in lesion.slices], dtype=float)
        input_k = (axial.index_to_lps(centres) @ to_input[:3, :3].T + to_input[:3, 3])[:, 2]
        documents.append({
            "score": round(lesion.score, 5),
            "slice": int(round(voxel[4, 2])),
            "slices": sorted({int(round(k)) for k in input_k}),
            "points_voxel": np.round(voxel, 3).tolist(),
            "points_mm": np.round(lesion.points_mm, 3).tolist(),
            "long_axis_mm": round(lesion.long_mm, 2),
            "short_axis_mm": round(lesion.short_mm, 2),
            "box_voxel": np.round([*voxel[:4, :2].min(axis=0), *voxel[:4, :2].max(axis=0)], 3).tolist(),
        })
    return {"model": model_name, "model_version": model_version, "input": volume_geometry(volume), "lesions": documents}


def volume_geometry(volume: Volume) -> dict[str, Any]:
    info = {"size_ijk": list(volume.size), "spacing_mm": list(volume.spacing), "origin_lps_mm": list(volume.origin),
            "direction_lps": volume.direction.round(6).tolist(), "orientation": volume.orientation}
    if volume.dicom is not None:
        info.update(study_instance_uid=volume.dicom.study_instance_uid,
                    series_instance_uid=volume.dicom.series_instance_uid,
                    frame_of_reference_uid=volume.dicom.frame_of_reference_uid)
    return info
