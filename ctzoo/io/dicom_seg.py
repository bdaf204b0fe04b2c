"""Label maps as DICOM Segmentation objects (highdicom), and back.

:func:`write_dicom_seg` turns a label map on a DICOM volume's grid into a BINARY DICOM SEG that a PACS stores
and a viewer overlays on the source series:

* **Frames.** Label map ``(Z, Y, X)`` slice ``k`` is the source image ``volume.dicom.headers[k]`` pixel for pixel
  (the reader stacks slices as they are stored, rows by columns), so frames take their plane positions and
  ``ReferencedSOPInstanceUID`` from the source headers. Frames without any voxel of a segment are omitted
  (highdicom's ``omit_empty_frames``): organs span a fraction of the slices, and empty frames would only bloat
  the object.
* **Segments.** One per class present (renumbered 1..N in class order, as SEG requires consecutive numbers),
  labelled with the class name. Property category and type (and laterality, and a tumour's anatomic region) from
  the name, the type always from the list DICOM gives for its category (:mod:`ctzoo.io.dicom_seg_codes`:
  ``liver`` -> Anatomical Structure, Liver; ``Tumour`` -> Morphologically Abnormal Structure, Neoplasm; a name
  that matches nothing -> Tissue, Tissue, with a warning). Algorithm type AUTOMATIC with an
  AlgorithmIdentificationSequence (family: Artificial Intelligence, name and version of the model). A tracking
  ID (the class name) and a tracking UID derived from the series and class let a viewer follow one organ across
  results.
* **Equipment.** Manufacturer ctzoo; Manufacturer's Model Name and Device Serial Number (type 1 in a SEG) the
  algorithm's name, the algorithm is the device; Software Versions the algorithm's and ctzoo's versions. Series
  number: the source's plus 1000, or 9101 where that is no valid IS.
* **Identity.** Patient and study attributes come from the source (highdicom copies them), in the source's
  character set made valid (:mod:`ctzoo.io.dicom_charset`); the SEG's series
  and instance UIDs are derived from the source series UID, algorithm name and version and a digest of the
  segments (their pixels and labels; :func:`~ctzoo.io.dicom_uids.result_uids`), so rerunning one model on one
  series gives the same objects and a resend replaces rather than duplicates, while a different segmentation
  (other weights, precision or backend) is a new object, never a second content under a stored UID.

What highdicom needs from ``source_images`` (pixel data is not needed): SOP class/instance, study/series/
frame-of-reference UIDs, Rows, Columns, PixelSpacing, ImageOrientationPatient and ImagePositionPatient
(always present in headers our reader kept, since it needs them itself), plus attributes it reads from the
first image unconditionally: PatientID, PatientName, PatientBirthDate, PatientSex, AccessionNumber, StudyID,
StudyDate, StudyTime (DICOM type 2: present, possibly empty) and SliceThickness. Headers that lack them are
copied and completed (empty type-2 values; the volume's slice spacing for SliceThickness); a type-2 value that
highdicom would refuse (a PatientBirthDate '1970-01-31', a PatientSex that is no M, F or O:
:func:`~ctzoo.io.dicom_values.unwritable`) is left empty in the copy, with a warning naming the attribute (never its
value), rather than costing the whole result; the volume's own headers are never modified.
"""

from __future__ import annotations

import copy
import importlib.metadata
import warnings
from collections.abc import Sequence
from pathlib import Path

import highdicom as hd
import numpy as np
import pydicom
from pydicom.sr.codedict import codes

from ctzoo.io.atomic import atomic_path
from ctzoo.io.dicom_charset import apply_character_set
from ctzoo.io.dicom_scan import DicomWarning
from ctzoo.io.dicom_seg_codes import segment_coding
from ctzoo.io.dicom_uids import derived_uid, result_uids
from ctzoo.io.dicom_values import unwritable
from ctzoo.io.volume import Volume

#: Read unconditionally from the first source image by highdicom; DICOM type 2 (may be empty).
_TYPE2_FROM_SOURCE = ("PatientID", "PatientName", "PatientBirthDate", "PatientSex", "AccessionNumber", "StudyID",
                      "StudyDate", "StudyTime", "ReferringPhysicianName")
#: Display colours (RGB, tab10) by class value: distinct, and stable across results of one model.
_PALETTE = ((31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
            (227, 119, 194), (127, 127, 127), (188, 189, 34), (23, 190, 207))
DEFAULT_SERIES_NUMBER_OFFSET = 1000
#: The SEG's series number where the source's plus the offset is no valid IS (beyond 2**31 - 1).
FALLBACK_SERIES_NUMBER = 9101
_LARGEST_IS = 2**31 - 1


def default_series_number(source_series_number: int | None) -> int:
    """The SEG's series number: the source's plus :data:`DEFAULT_SERIES_NUMBER_OFFSET` (so it sorts after its
    source in a viewer), or :data:`FALLBACK_SERIES_NUMBER` where that is no valid IS (a signed 32-bit integer)."""
    number = DEFAULT_SERIES_NUMBER_OFFSET + (source_series_number or 0)
    return number if -_LARGEST_IS - 1 <= number <= _LARGEST_IS else FALLBACK_SERIES_NUMBER


def segment_description(number: int, class_name: str, algorithm: hd.AlgorithmIdentificationSequence,
                        tracking_uid: str, rgb: tuple[int, int, int]) -> hd.seg.SegmentDescription:
    """Segment ``number``'s description: label and tracking ID the class name, its codes from the name
    (:func:`~ctzoo.io.dicom_seg_codes.segment_coding`), made AUTOMATIC by ``algorithm``, shown in ``rgb``."""
    coding = segment_coding(class_name)
    description = hd.seg.SegmentDescription(
        segment_number=number, segment_label=class_name[:64], segmented_property_category=coding.category,
        segmented_property_type=coding.type, algorithm_type=hd.seg.SegmentAlgorithmTypeValues.AUTOMATIC,
        algorithm_identification=algorithm, tracking_id=class_name[:64], tracking_uid=tracking_uid,
        anatomic_regions=None if coding.anatomic_region is None else [coding.anatomic_region],
        display_color=hd.color.CIELabColor.from_rgb(*rgb))
    if coding.modifier is not None:  # laterality: a Segmented Property Type Modifier, inside the type's item
        description.SegmentedPropertyTypeCodeSequence[0].SegmentedPropertyTypeModifierCodeSequence = [
            hd.sr.CodedConcept.from_code(coding.modifier)]
    return description


def _check_labels(labels: np.ndarray, volume: Volume, class_names: Sequence[str]) -> np.ndarray:
    labels = np.asarray(labels)
    if labels.shape != volume.array.shape:
        raise ValueError(f"labels have shape {labels.shape}, the volume {volume.array.shape} (Z, Y, X): a SEG "
                         "needs labels on the source volume's grid as stored")
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"labels must be integers (0 = background, c = class_names[c - 1]), got {labels.dtype}")
    if labels.size and (labels.min() < 0 or labels.max() > len(class_names)):
        raise ValueError(f"label values must lie in 0..{len(class_names)} ({len(class_names)} class names), "
                         f"found {labels.min()}..{labels.max()}")
    return labels


def source_headers(volume: Volume) -> list[pydicom.Dataset]:
    """The volume's per-slice DICOM headers in slice order, completed with what highdicom reads (see the module
    docstring). When the volume kept no headers but lists its files, they are re-read (without pixels) and given
    the volume's (possibly repaired) UIDs, so the SEG references the same objects the volume names."""
    source = volume.dicom
    if source is None:
        raise ValueError("the volume was not read from DICOM (volume.dicom is None): a DICOM SEG must reference "
                         "its source images; write a NIfTI label map instead")
    headers = list(source.headers)
    if not headers and source.files and all(Path(f).is_file() for f in source.files):
        headers = [pydicom.dcmread(f, stop_before_pixels=True) for f in source.files]
        for ds, sop_instance_uid in zip(headers, source.sop_instance_uids):
            ds.StudyInstanceUID, ds.SeriesInstanceUID = source.study_instance_uid, source.series_instance_uid
            ds.FrameOfReferenceUID, ds.SOPInstanceUID = source.frame_of_reference_uid, sop_instance_uid
            ds.SOPClassUID = source.sop_class_uid or ds.get("SOPClassUID", "")
    if len(headers) != volume.array.shape[0]:
        raise ValueError(f"the volume has {volume.array.shape[0]} slices but {len(headers)} DICOM headers (and no "
                         "readable source files): a SEG needs every source slice's header")
    completed, blanked = [], set()
    for ds in headers:
        missing = [k for k in _TYPE2_FROM_SOURCE if k not in ds]
        invalid = [k for k in _TYPE2_FROM_SOURCE if k in ds and unwritable(ds, k)]
        no_thickness = ds.get("SliceThickness") in (None, "")
        if missing or invalid or no_thickness:
            ds = copy.deepcopy(ds)
            for keyword in missing + invalid:
                setattr(ds, keyword, "")
            blanked.update(invalid)
            if no_thickness:  # the thickness a label slice represents: the grid's slice spacing
                ds.SliceThickness = round(volume.spacing[2], 6)
        completed.append(ds)
    if blanked:  # the attribute only: its value may identify the patient
        warnings.warn(f"{', '.join(sorted(blanked))}: not a valid DICOM value in the source; left empty in the "
                      "result", DicomWarning, stacklevel=2)
    return completed


def write_dicom_seg(labels: np.ndarray, volume: Volume, class_names: Sequence[str], out_path: str | Path,
                    algorithm_name: str, algorithm_version: str, series_number: int | None = None) -> Path:
    """Write ``labels`` ``(Z, Y, X)`` (0 = background, ``c`` = ``class_names[c - 1]``), on the grid of ``volume``
    as stored, as a BINARY DICOM SEG referencing the volume's DICOM slices; returns ``out_path``.

    ``series_number`` defaults to the source's plus 1000 (:func:`default_series_number`). Raises ``ValueError``
    when the volume did not come from DICOM, the labels do not fit it, or no class is present (a SEG must hold at
    least one segment).
    """
    labels = _check_labels(labels, volume, class_names)
    headers = source_headers(volume)
    present = [int(v) for v in np.unique(labels) if v > 0]
    if not present:
        raise ValueError("the label map is empty: a DICOM SEG needs at least one segment (write no SEG for an "
                         "empty result)")
    source = volume.dicom
    identity = (source.series_instance_uid, algorithm_name, algorithm_version)
    algorithm = hd.AlgorithmIdentificationSequence(name=algorithm_name, family=codes.cid7162.ArtificialIntelligence,
                                                   version=algorithm_version)
    descriptions = [segment_description(number, class_names[value - 1], algorithm,
                                        derived_uid("seg-tracking", *identity, value),
                                        _PALETTE[(value - 1) % len(_PALETTE)])
                    for number, value in enumerate(present, start=1)]
    renumber = np.zeros(int(labels.max()) + 1, dtype=np.uint8)  # class value -> segment number
    renumber[present] = np.arange(1, len(present) + 1)
    pixels = renumber[labels]
    series_uid, instance_uid = result_uids("seg", *identity, np.ascontiguousarray(pixels),
                                           repr((pixels.shape, [class_names[v - 1] for v in present])).encode())
    if series_number is None:
        series_number = default_series_number(source.series_number)
    try:
        ctzoo_version = importlib.metadata.version("ctzoo")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        ctzoo_version = "unknown"
    seg = hd.seg.Segmentation(
        source_images=headers, pixel_array=pixels, segmentation_type=hd.seg.SegmentationTypeValues.BINARY,
        segment_descriptions=descriptions, series_instance_uid=series_uid,
        series_number=series_number, sop_instance_uid=instance_uid, instance_number=1,
        manufacturer="ctzoo", manufacturer_model_name=algorithm_name[:64],
        software_versions=[algorithm_version, f"ctzoo {ctzoo_version}"],
        device_serial_number=algorithm_name[:64],  # type 1 in SEG: the algorithm is the device; versions above
        content_description=f"{algorithm_name} {algorithm_version}"[:64],
        series_description=f"SEG {algorithm_name}"[:64], omit_empty_frames=True,
        specific_character_set=None)  # highdicom refuses valid source values: set below (ctzoo.io.dicom_charset)
    apply_character_set(seg, headers[0])
    out_path = Path(out_path)
    with atomic_path(out_path) as partial:
        seg.save_as(partial, enforce_file_format=True)
    return out_path


def read_dicom_seg_labels(path: str | Path, volume: Volume, class_names: Sequence[str] | None = None) -> np.ndarray:
    """A DICOM SEG back as a label map ``(Z, Y, X)`` uint8 on ``volume``'s grid.

    Each frame lands on the slice whose SOP Instance UID it references (``ReferencedSOPInstanceUID`` in its
    derivation image sequence). A voxel gets the segment's number, or, with ``class_names``, ``1 +`` the index of
    the segment's label in it (what :func:`write_dicom_seg` was given); later segments win where segments overlap.
    """
    if volume.dicom is None:
        raise ValueError("the volume was not read from DICOM: a SEG can only be placed on its source slices")
    seg = hd.seg.segread(str(path))
    if (seg.Rows, seg.Columns) != volume.array.shape[1:]:
        raise ValueError(f"{path}: frames are {seg.Rows}x{seg.Columns}, the volume's slices "
                         f"{volume.array.shape[1]}x{volume.array.shape[2]}")
    value_of = {}
    for number in seg.segment_numbers:
        label = seg.get_segment_description(number).segment_label
        if class_names is None:
            value_of[number] = number
        elif label in class_names:
            value_of[number] = list(class_names).index(label) + 1
        else:
            raise ValueError(f"{path}: segment {number} is labelled {label!r}, not one of {list(class_names)}")
    slice_of = {uid: k for k, uid in enumerate(volume.dicom.sop_instance_uids)}
    frames = seg.pixel_array.reshape(-1, seg.Rows, seg.Columns)  # one frame comes back 2-D
    labels = np.zeros(volume.array.shape, dtype=np.uint8)
    for frame, item in zip(frames, seg.PerFrameFunctionalGroupsSequence):
        uid = item.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
        if uid not in slice_of:
            raise ValueError(f"{path}: a frame references SOP instance {uid}, which is not a slice of the volume")
        number = int(item.SegmentIdentificationSequence[0].ReferencedSegmentNumber)
        labels[slice_of[uid]][frame > 0] = value_of[number]
    return labels
