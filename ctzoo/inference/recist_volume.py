"""The RECIST detector's volume stages: every slice's 2.5D input, head decoding, one lesion's slices merged.

:func:`ctzoo.inference.tasks.detector_task` assembles these into the stages every path runs (``ctzoo infer``, the
service's ``/studies``, the PACS bridge; :func:`ctzoo.inference.tasks.run_task` for one volume in memory). Per
slice it builds the same input as training (neighbours ``slice_interval_mm`` apart, linearly interpolated, the
superior one first; in-plane resampling and window from
:func:`ctzoo.datasets.deeplesion.dataset.resample_and_window`), on the volume reoriented to LPS axial — the
orientation DeepLesion's slices are displayed and trained in.
Results are mapped back to the voxel indices of the input *as stored* and to patient LPS mm.

Output schema (``detections.json``; stable, see docs/recistnet.md)::

    {"model": str, "model_version": str, "weights": {"sha256": {file: str}, "checked": bool},
     "input": {...geometry..., "warnings": [str]}, "slice_grid": str,
     "lesions": [{"score": float, "slice": k, "slice_z_mm": float, "instance_number": int | None,
                  "slices": [k0, k1], "points_voxel": [[i, j, k] x 5], "points_mm": [[x, y, z] x 5],
                  "long_axis_mm": float, "short_axis_mm": float, "box_voxel": [i0, j0, i1, j1]}]}

Points are long-axis end 1, long-axis end 2, short-axis end 1, short-axis end 2, centre; for DICOM ``points_mm``
are placed from the key slice's own ImagePositionPatient (:meth:`~ctzoo.io.volume.Volume.index_to_lps_per_slice`:
the grid's median step is off beside a missing slice). ``slice`` is the key slice's 0-based index into the input as
stored; ``slice_z_mm`` is that slice's patient LPS z (superior positive, its centre voxel; for DICOM from its own
ImagePositionPatient) and ``instance_number`` its DICOM InstanceNumber (present for DICOM input only; null when the
file has none): how a radiologist finds the slice in a viewer (:meth:`ctzoo.io.volume.Volume.slice_position`).
``box_voxel`` is the long and short axes' bounding box in that slice's (i, j). That holds where the input stores axial
slices (``"slice_grid": "input"``: LPS, flipped, tilted). A sagittal or coronal input's slices are no axial planes
(``"slice_grid": "axial"``): ``slice``, ``slices`` and ``box_voxel`` then refer to the LPS-axial reoriented volume
the model ran on (:func:`ctzoo.io.reorient_lps`), ``slice_z_mm`` is that axial plane's z and no ``instance_number``
is given; ``points_voxel`` and ``points_mm`` stay the input's voxels and patient mm either way.
``input.warnings`` are the reader's (``Volume.warnings``: missing slices, uneven spacing, repaired UIDs...).
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from ctzoo.datasets.deeplesion.context import context_planes, neighbour_offsets
from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing, resample_planes, window_planes
from ctzoo.io import Volume
from ctzoo.models.recist_grouping import group_keypoints

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


def pad_to(image: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """Zero-pad ``image`` (..., h, w) at the bottom and right to (height, width); zero is air in every window."""
    h, w = image.shape[-2:]
    check_fits(h, w, height, width)
    return torch.nn.functional.pad(image, (0, width - w, 0, height - h))


def check_fits(rows: int, columns: int, height: int, width: int) -> None:
    """ValueError unless a slice of ``rows`` x ``columns`` pixels fits a ``height`` x ``width`` canvas."""
    if rows > height or columns > width:
        raise ValueError(f"slice of {rows} x {columns} pixels does not fit the {height} x {width} canvas")


def canvas_size(prep: SlicePreprocessing, multiple: int = 32) -> int:
    """Side of the square canvas every slice is padded to: ``max_size`` rounded up to ``multiple``. One shape for
    all slices of all volumes lets the pipeline batch slices of different volumes together."""
    return -(-prep.max_size // multiple) * multiple


#: Planes resampled per call: one call over a block of planes costs much less per plane than one per plane
#: (MONAI's Resize and its anti-aliasing convolution have a fixed cost per call), with identical results.
PLANE_BLOCK = 8


def slice_inputs(axial: Volume, prep: SlicePreprocessing, canvas: int | None = None, multiple: int = 32,
                 device: str | None = None) -> Iterator[tuple[torch.Tensor, np.ndarray]]:
    """Network inputs for every slice of ``axial`` (LPS axial), in slice order: ``(image, scale)`` with image
    ``(in_channels, H, W)`` float32 padded to ``canvas`` x ``canvas`` (or to a multiple of ``multiple``), its
    context channels superior neighbour first, as the DeepLesion loader orders them (:mod:`~ctzoo.datasets.
    deeplesion.context`).

    The same input as :func:`resample_and_window` on the slice's context planes, but each stored plane is
    resampled once, not once per slice that uses it as context (3x less work with 3 context slices), in blocks of
    :data:`PLANE_BLOCK` planes: resampling is linear, so mixing resampled neighbours equals resampling the mixed
    plane (to float rounding, ~1e-6 HU). Windows are written straight into the zeroed canvas. ``device``: where
    the work runs and the images are (the volume goes there once: preprocessing on the GPU); None: the CPU, with
    each plane kept as a NumPy array.
    """
    hu = axial.array if device is None else torch.from_numpy(np.ascontiguousarray(axial.array)).to(device)
    # LPS: the slice index increases towards the head; the channels run superior to inferior, as in training
    offsets = neighbour_offsets(prep.num_slices, prep.slice_interval_mm, axial.slice_step_mm, "head")
    reach = int(np.ceil(max(abs(o) for o in offsets))) + 1
    resampled: dict[int, np.ndarray] = {}
    scale = None

    def plane(z: int) -> np.ndarray:
        nonlocal scale
        if z not in resampled:
            block, scale = resample_planes(hu[z:z + PLANE_BLOCK], axial.spacing[:2], prep)
            resampled.update((z + i, image if device is not None else image.numpy())
                             for i, image in enumerate(block))
        return resampled[z]

    for k in range(hu.shape[0]):
        planes = torch.as_tensor(context_planes(plane, k, offsets, 0, hu.shape[0] - 1))
        rows, columns = planes.shape[-2:]
        height, width = (canvas, canvas) if canvas else (-(-s // multiple) * multiple for s in (rows, columns))
        check_fits(rows, columns, height, width)
        image = torch.zeros((prep.in_channels, height, width), dtype=torch.float32,  # zero is air in every window
                            device=planes.device)
        window_planes(planes, prep, out=image[:, :rows, :columns])
        yield image, scale
        for z in [z for z in resampled if z < k - reach]:  # planes no later slice needs
            del resampled[z]


def decode_heads(heads: dict[str, torch.Tensor | np.ndarray], down_ratio: int, max_lesions: int = 20,
                 score_threshold: float = 0.3, decode: str = "both") -> list[tuple[np.ndarray, np.ndarray]]:
    """Raw RECIST-Net outputs for a batch -> per slice ``(scores (M,), points (M, 5, 2))`` in network-input
    pixels, scores >= ``score_threshold``. The grouping is :func:`ctzoo.models.recist_grouping.group_keypoints`, as in
    :meth:`RecistNet.detect`; backends (PyTorch, ONNX Runtime) only compute ``heads``."""
    tensor = {key: torch.as_tensor(np.asarray(value) if not isinstance(value, torch.Tensor) else value).float()
              for key, value in heads.items()}
    grouped = group_keypoints(tensor["heatmaps"], tensor["offsets"], down_ratio, max_lesions=max_lesions,
                              displacements=tensor["displacements"], decode=decode)
    results = []
    for scores, points, valid in zip(grouped["scores"], grouped["points"], grouped["valid"]):
        keep = valid & (scores >= score_threshold)
        results.append((scores[keep].cpu().numpy(), points[keep].cpu().numpy()))
    return results


def slice_detections(axial: Volume, k: int, scores: np.ndarray, points: np.ndarray,
                     scale: np.ndarray) -> list[SliceDetection]:
    """Detections of slice ``k`` of ``axial`` from network-pixel ``points`` (M, 5, 2) and the slice's ``scale``."""
    found = []
    for score, lesion in zip(scores, points):
        original = (lesion.astype(np.float64) + 0.5) / scale - 0.5  # back to the slice's own pixels
        ijk = np.column_stack([original, np.full(5, float(k))])
        mm = axial.index_to_lps(ijk)
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


def detections_document(volume: Volume, axial: Volume, detections: list[SliceDetection], model_name: str,
                        model_version: str, weights: dict[str, Any] | None = None) -> dict[str, Any]:
    """Merge per-slice ``detections`` on ``axial`` (= :func:`reorient_lps` of ``volume``) into lesions and map
    them to ``volume`` as stored: the ``detections.json`` document. Slices are named in the input's own slice
    numbering where it stores axial slices (``"slice_grid": "input"``), else in ``axial``'s (``"axial"``).
    ``weights``: the digests of the weights that ran (:func:`ctzoo.inference.tasks.weights_record`)."""
    lesions = merge_across_slices(detections, axial.slice_step_mm)
    to_input = np.linalg.inv(volume.affine_lps)
    on_input = volume.stores_axial_slices
    documents = []
    for lesion in lesions:
        voxel = lesion.points_mm @ to_input[:3, :3].T + to_input[:3, 3]
        # each slice of the lesion, through its centre
        centres = np.array([[*lesion.points_ijk[4, :2], s] for s in lesion.slices], dtype=float)
        if on_input:
            numbered, key = (axial.index_to_lps(centres) @ to_input[:3, :3].T + to_input[:3, 3])[:, 2], voxel[4, 2]
            where, in_plane = volume.slice_position(int(round(key))), voxel[:4, :2]
        else:  # a sagittal or coronal input: its slices hold no axial plane; name the axial grid's
            numbered, in_plane = centres[:, 2], lesion.points_ijk[:4, :2]
            where = axial.slice_position(lesion.k)
        named = {"slice_z_mm": where["z_mm"]}
        if volume.dicom is not None and on_input:
            named["instance_number"] = where["instance_number"]
        documents.append({
            "score": round(lesion.score, 5),
            "slice": where["index"],
            **named,
            "slices": sorted({int(round(k)) for k in numbered}),
            "points_voxel": np.round(voxel, 3).tolist(),
            "points_mm": np.round(volume.index_to_lps_per_slice(voxel), 3).tolist(),
            "long_axis_mm": round(lesion.long_mm, 2),
            "short_axis_mm": round(lesion.short_mm, 2),
            "box_voxel": np.round([*in_plane.min(axis=0), *in_plane.max(axis=0)], 3).tolist(),
        })
    return {"model": model_name, "model_version": model_version, **({"weights": weights} if weights else {}),
            "input": describe_input(volume), "slice_grid": slice_grid(volume), "lesions": documents}


def slice_grid(volume: Volume) -> str:
    """Whose slices results name: ``"input"`` (``volume.array[k]``, an axial series as stored, flipped or not) or
    ``"axial"`` (the LPS-axial reorientation the models ran on, :func:`ctzoo.io.reorient_lps`, for a sagittal or
    coronal input, whose own slices are no axial planes)."""
    return "input" if volume.stores_axial_slices else "axial"


def describe_input(volume: Volume) -> dict[str, Any]:
    """The ``input`` section of ``detections.json`` and ``segmentation.json``: the grid, the DICOM identity, and
    what the reader warned about (missing slices, uneven spacing, repaired UIDs...): a result on such an input
    must say so where it is read, not only in a log."""
    info = {"size_ijk": list(volume.size), "spacing_mm": list(volume.spacing), "origin_lps_mm": list(volume.origin),
            "direction_lps": volume.direction.round(6).tolist(), "orientation": volume.orientation}
    if volume.dicom is not None:
        info.update(study_instance_uid=volume.dicom.study_instance_uid,
                    series_instance_uid=volume.dicom.series_instance_uid,
                    frame_of_reference_uid=volume.dicom.frame_of_reference_uid)
    info["warnings"] = list(volume.warnings)
    return info
