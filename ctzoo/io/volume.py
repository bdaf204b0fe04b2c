"""The :class:`Volume` type: one CT volume in Hounsfield units with its geometry and DICOM identity."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from ctzoo.io.orientation import (
    affine_from_geometry,
    lps_to_ras_affine,
    orientation_code,
)
from ctzoo.io.spacing import slice_axis


@dataclass
class DicomSource:
    """What a volume read from DICOM must remember to be referenced by DICOM SEG and SR later.

    Per-slice lists are in the volume's slice order (``Volume.array[k]`` came
    from ``sop_instance_uids[k]`` / ``files[k]``; ``instance_numbers[k]`` is that
    file's InstanceNumber, None where it has none). ``headers`` keeps each
    slice's pydicom dataset without pixel data (patient module included), as
    highdicom wants them for ``source_images``; never log them.
    """

    study_instance_uid: str
    series_instance_uid: str
    sop_class_uid: str
    sop_instance_uids: list[str]
    frame_of_reference_uid: str
    image_positions: list[tuple[float, float, float]]
    files: list[str] = field(default_factory=list)
    modality: str = ""
    body_part_examined: str = ""
    patient_sex: str = ""
    patient_age: str = ""
    series_description: str = ""
    series_number: int | None = None
    manufacturer: str = ""
    transfer_syntax_uid: str = ""
    photometric_interpretation: str = ""
    uids_repaired: bool = False
    #: The UIDs (keywords, e.g. ``SeriesInstanceUID``) empty in the files, for which ctzoo derived new ones;
    #: ``uids_repaired`` also counts UIDs taken from the file meta, which are the files' own.
    derived_uids: tuple[str, ...] = ()
    headers: list[Any] = field(default_factory=list, repr=False)
    instance_numbers: list[int | None] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """JSON-friendly identity without patient identifiers (age and sex only) and without headers."""
        return {
            "study_instance_uid": self.study_instance_uid,
            "series_instance_uid": self.series_instance_uid,
            "sop_class_uid": self.sop_class_uid,
            "frame_of_reference_uid": self.frame_of_reference_uid,
            "modality": self.modality,
            "body_part_examined": self.body_part_examined,
            "patient_sex": self.patient_sex,
            "patient_age": self.patient_age,
            "series_description": self.series_description,
            "series_number": self.series_number,
            "manufacturer": self.manufacturer,
            "transfer_syntax_uid": self.transfer_syntax_uid,
            "photometric_interpretation": self.photometric_interpretation,
            "uids_repaired": self.uids_repaired,
            "derived_uids": list(self.derived_uids),
            "slices": len(self.sop_instance_uids),
        }


@dataclass
class Volume:
    """A CT volume: voxels in HU plus where they sit in the patient.

    Conventions (the same as SimpleITK, so ITK users need nothing new):

    * ``array`` has shape **(Z, Y, X)** = (slices, rows, columns), float32 HU.
      ``array[k, j, i]`` is the voxel at ITK index ``(i, j, k)``.
    * ``spacing``, ``origin`` and the columns of ``direction`` are given in
      index order **(i, j, k)** = (x, y, z): spacing ``(col mm, row mm, slice mm)``.
    * Physical space is **LPS** millimetres (DICOM/ITK). ``direction[:, a]`` is
      the unit vector of index axis ``a``. Use :attr:`affine_ras` for
      nibabel/MONAI; the conversion lives only in :mod:`ctzoo.io.orientation`.
    """

    array: np.ndarray
    spacing: tuple[float, float, float]
    origin: tuple[float, float, float] = (0.0, 0.0, 0.0)
    direction: np.ndarray = field(default_factory=lambda: np.eye(3))
    dicom: DicomSource | None = None
    warnings: list[str] = field(default_factory=list)
    source_path: str = ""

    def __post_init__(self) -> None:
        self.array = np.asarray(self.array)
        if self.array.ndim != 3:
            raise ValueError(f"Volume.array must be 3-D (Z, Y, X), got shape {self.array.shape}")
        self.spacing = tuple(float(s) for s in self.spacing)
        self.origin = tuple(float(o) for o in self.origin)
        self.direction = np.asarray(self.direction, dtype=float).reshape(3, 3)
        if len(self.spacing) != 3 or min(self.spacing) <= 0:
            raise ValueError(f"Volume.spacing must be three positive numbers, got {self.spacing}")
        if self.dicom is not None and len(self.dicom.sop_instance_uids) != self.array.shape[0]:
            raise ValueError(
                f"DICOM source lists {len(self.dicom.sop_instance_uids)} slices, array has {self.array.shape[0]}"
            )

    @property
    def size(self) -> tuple[int, int, int]:
        """Voxel counts in index order (i, j, k) = (columns, rows, slices)."""
        z, y, x = self.array.shape
        return (x, y, z)

    @property
    def affine_lps(self) -> np.ndarray:
        """4x4 map from index (i, j, k, 1) to LPS mm."""
        return affine_from_geometry(self.spacing, self.origin, self.direction)

    @property
    def affine_ras(self) -> np.ndarray:
        """4x4 map from index (i, j, k, 1) to RAS mm: what nibabel and MONAI call the affine."""
        return lps_to_ras_affine(self.affine_lps)

    @property
    def orientation(self) -> str:
        """Where the index axes point, e.g. ``'LPS'`` for standard axial CT (see :func:`orientation_code`)."""
        return orientation_code(self.direction)

    @property
    def stores_axial_slices(self) -> bool:
        """Whether ``array[k]`` are axial slices: the k axis is the index axis nearest the patient's S axis (LPS, but
        also a flipped or tilted axial series). A sagittal or coronal volume's slices are not; the models see it
        reoriented (:func:`ctzoo.io.reorient_lps`) and results name the slices of that axial grid."""
        return slice_axis(self.direction) == 2

    @property
    def voxel_volume_mm3(self) -> float:
        """One voxel's volume, ``|det|`` of the affine's linear part: the product of the spacings, except on a
        sheared grid (gantry tilt kept in the affine), where that product overstates it by 1/cos(tilt)."""
        return float(abs(np.linalg.det(self.affine_lps[:3, :3])))

    @property
    def slice_step_mm(self) -> float:
        """Distance between neighbouring slices ``array[k]``, ``array[k + 1]`` measured perpendicular to them:
        ``spacing[2]`` unless the grid is sheared, where ``spacing[2]`` is the (longer) step along the tilted k axis.
        What a tilted DICOM series' spacing is (the step between its ImagePositionPatient along the normal)."""
        i_axis, j_axis, k_axis = self.affine_lps[:3, :3].T
        normal = np.cross(i_axis, j_axis)
        return float(abs(k_axis @ normal) / np.linalg.norm(normal))

    @property
    def is_sheared(self) -> bool:
        """Whether the index axes are not perpendicular (a gantry tilt kept in the affine)."""
        return not np.allclose(self.direction.T @ self.direction, np.eye(3), atol=1e-4)

    def index_to_lps(self, ijk: np.ndarray) -> np.ndarray:
        """Map continuous indices of shape (..., 3) in (i, j, k) order to LPS mm."""
        ijk = np.asarray(ijk, dtype=float)
        affine = self.affine_lps
        return ijk @ affine[:3, :3].T + affine[:3, 3]

    def index_to_lps_per_slice(self, ijk: np.ndarray) -> np.ndarray:
        """Map continuous indices (..., 3) in (i, j, k) order to LPS mm where the slices really are.

        For DICOM input the slice part comes from the slices' own ImagePositionPatient (linearly between two
        slices for a fractional ``k``), the in-plane part from the grid: the grid (:meth:`index_to_lps`) steps
        by the median slice spacing, so beside a missing slice it is off by the gap. Without DICOM positions
        (NIfTI, NRRD, MHA) the grid is the truth and this is :meth:`index_to_lps`."""
        ijk = np.asarray(ijk, dtype=float)
        dicom = self.dicom
        count = len(dicom.sop_instance_uids) if dicom is not None else 0
        if count < 2 or len(dicom.image_positions) != count:
            return self.index_to_lps(ijk)
        positions = np.asarray(dicom.image_positions, dtype=float)
        k = ijk[..., 2]
        below = np.clip(np.floor(k).astype(int), 0, count - 2)  # beyond either end: the end step, extended
        fraction = (k - below)[..., None]
        slice_origin = positions[below] + fraction * (positions[below + 1] - positions[below])
        return slice_origin + (ijk[..., :2] * np.asarray(self.spacing[:2])) @ self.direction[:, :2].T

    def slice_position(self, k: int) -> dict[str, Any]:
        """Where slice ``k`` (``array[k]``, 0-based as stored) lies, named as a radiologist names it.

        ``{"index": k, "z_mm": float, "instance_number": int | None, "label": str}``: ``z_mm`` is the patient
        LPS z (superior positive) of the slice's centre voxel, rounded to 0.01 mm; for DICOM input it is taken
        from the slice's own ImagePositionPatient (the grid uses the median step, so with missing slices the two
        differ). ``instance_number`` is the slice's DICOM InstanceNumber (None without DICOM or without the
        attribute). The label is :func:`slice_label`'s, e.g. ``InstanceNumber 12, z -804.5 mm (index 11)``.
        Only geometry is used, never the voxels.
        """
        k = int(k)
        dicom = self.dicom
        count = len(dicom.sop_instance_uids) if dicom is not None else self.array.shape[0]
        if k < 0 or (count and k >= count):
            raise IndexError(f"slice {k} is outside the volume's slices 0..{count - 1}")
        columns, rows = self.size[:2]
        centre = np.array([max(columns - 1, 0) / 2.0, max(rows - 1, 0) / 2.0, float(k)])
        position = self.index_to_lps_per_slice(centre)
        number = None
        if dicom is not None and len(dicom.instance_numbers) == count:
            number = dicom.instance_numbers[k]
        z_mm = round(float(position[2]), 2) + 0.0  # + 0.0: no "-0.0"
        return {"index": k, "z_mm": z_mm, "instance_number": number, "label": slice_label(k, z_mm, number)}

    def slice_label(self, k: int) -> str:
        """``InstanceNumber 12, z -804.5 mm (index 11)`` (DICOM) or ``z -804.5 mm (index 11)``: see
        :meth:`slice_position`."""
        return self.slice_position(k)["label"]

    def with_array(self, array: np.ndarray) -> Volume:
        """Same geometry and source, new voxels (e.g. a label map on this grid); shapes must match."""
        if np.shape(array) != self.array.shape:
            raise ValueError(f"array shape {np.shape(array)} does not match volume shape {self.array.shape}")
        return replace(self, array=np.asarray(array), warnings=list(self.warnings))

    def describe(self, stored_dtype: str | None = None) -> dict[str, Any]:
        """A JSON-friendly summary: size, spacing, orientation and HU range. No patient identifiers.

        ``dtype`` is ``stored_dtype``, the voxel type of the file the volume was read from, where the caller knows
        it (:func:`ctzoo.io.describe.describe_path` does); ``array_dtype`` is the type of :attr:`array` in memory
        (float32 as read for HU)."""
        finite = self.array[np.isfinite(self.array)]
        info: dict[str, Any] = {
            "size_ijk": list(self.size),
            "array_shape_zyx": list(self.array.shape),
            "spacing_mm": [round(s, 6) for s in self.spacing],
            "origin_lps_mm": [round(o, 4) for o in self.origin],
            "direction_lps": np.round(self.direction, 6).tolist(),
            "orientation": self.orientation,
            "extent_mm": [round(s * n, 3) for s, n in zip(self.spacing, self.size)],
            "slice_step_mm": round(self.slice_step_mm, 6),
            "dtype": stored_dtype or str(self.array.dtype),
            "array_dtype": str(self.array.dtype),
            "value_range": [float(finite.min()), float(finite.max())] if finite.size else None,
            "non_finite_voxels": int(self.array.size - finite.size),
            "warnings": list(self.warnings),
        }
        if self.dicom is not None:
            info["dicom"] = self.dicom.summary()
        return info


def slice_label(index: int, z_mm: float, instance_number: int | None = None) -> str:
    """How overlays and logs name a slice: ``InstanceNumber 12, z -804.5 mm (index 11)``, or without an
    InstanceNumber ``z -804.5 mm (index 11)``. ``index`` is the 0-based ``Volume.array`` index, ``z_mm`` the
    patient LPS z (superior positive) of the slice centre."""
    where = f"z {z_mm:.1f} mm (index {int(index)})"
    return where if instance_number is None else f"InstanceNumber {instance_number}, {where}"
