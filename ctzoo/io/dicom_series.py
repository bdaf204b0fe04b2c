"""Read one DICOM series into a :class:`~ctzoo.io.volume.Volume` in HU.

How, and why:

* **Order** comes from ``ImagePositionPatient`` projected on the slice normal
  (row cosine x column cosine), never from file names or InstanceNumber.
* **Slice spacing** is the median step between those positions;
  SliceThickness says how thick a slice is, not how far apart slices are.
* **Pixels** are decoded one file at a time and rescaled with that file's own
  RescaleSlope/Intercept in float32. (Reading a series in one ITK call takes
  the pixel type from the first file and truncates slices whose slope differs.)
  Compressed transfer syntaxes (JPEG 2000, JPEG lossless, JPEG-LS, RLE) go
  through SimpleITK/GDCM, which decodes them fastest and most broadly, in a
  thread pool (GDCM releases the GIL), once the size their own stream declares
  is Rows x Columns (:mod:`ctzoo.io.dicom_codestream`: decoders allocate what
  the stream says). Uncompressed slices need no codec:
  pydicom hands over their bytes, about 4x faster than a GDCM call per file
  (``benchmarks/dicom_read.py``). Given an nvImageCodec decoder (on a GPU,
  :mod:`ctzoo.io.nvimgcodec_decode`), JPEG 2000 slices are decoded in
  batches by it instead, to the same HU; whatever it does not take goes to GDCM.
* **MONOCHROME1** only says how to *display* the values; HU is still
  slope x stored + intercept. GDCM inverts MONOCHROME1 pixels, which would
  corrupt HU, so those slices are decoded by pydicom (+ pylibjpeg) and
  rescaled with its modality LUT instead.
* Missing slices and uneven spacing are warned about (:class:`DicomWarning`)
  and recorded in ``Volume.warnings``; nothing is interpolated. The grid
  uses the median step, and ``DicomSource.image_positions`` keeps each slice's
  true position.
* Warnings name slices as a radiologist does (InstanceNumber, z, index in the
  volume: :func:`~ctzoo.io.volume.slice_label`), never by file or folder:
  those names often carry the patient's name or record number, and warnings
  are logged and returned to service clients. Errors, which stop the read,
  name the file that caused them.
"""

from __future__ import annotations

import filecmp
import logging
import os
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pydicom
import SimpleITK as sitk
from tqdm.auto import tqdm

from ctzoo.io.dicom_codestream import frame_size_problem
from ctzoo.io.dicom_scan import (
    DicomError,
    DicomWarning,
    SeriesInfo,
    SeriesRules,
    SliceHeader,
    check_same_orientation,
    choose_series,
    dicom_folder,
    scan_folder,
)
from ctzoo.io.dicom_uids import derived_keywords, fill_empty_uids, instance_uid, repair_notes
from ctzoo.io.itk_threads import first_use_alone
from ctzoo.io.limits import DEFAULT_LIMITS, ResourceLimits
from ctzoo.io.nvimgcodec_decode import J2K_SYNTAXES, NvImageCodecDecoder, decoder_for
from ctzoo.io.pydicom_log import pydicom_messages_once
from ctzoo.io.spacing import check_spacing
from ctzoo.io.volume import DicomSource, Volume, slice_label

log = logging.getLogger(__name__)

#: Relative deviation of a slice step from the median step that counts as uneven spacing.
SPACING_TOLERANCE = 0.01
#: A step at least this many median steps long means slices are missing in between.
MISSING_SLICE_RATIO = 1.5
#: In-plane drift (mm) between consecutive positions beyond which the series is tilted/sheared.
TILT_TOLERANCE_MM = 0.05


def _warn(messages: list[str], text: str) -> None:
    messages.append(text)
    warnings.warn(text, DicomWarning, stacklevel=3)


def sort_slices(slices: list[SliceHeader]) -> tuple[list[SliceHeader], np.ndarray]:
    """Sort slices along their common normal; return them and their positions along it (mm)."""
    normal = slices[0].normal
    along = np.array([float(s.position @ normal) for s in slices])
    order = np.argsort(along, kind="stable")
    return [slices[i] for i in order], along[order]


def slice_name(header: SliceHeader, index: int) -> str:
    """How a warning names a slice: ``InstanceNumber 12, z -804.5 mm (index 11)`` (:func:`slice_label`, ``z`` of
    its centre as :meth:`Volume.slice_position` gives it), ``index`` its place in the volume; never its file."""
    ds = header.dataset
    row_mm, column_mm = (float(v) for v in ds.PixelSpacing)
    centre = (header.position + (int(ds.Columns) - 1) / 2 * column_mm * header.orientation[:3]
              + (int(ds.Rows) - 1) / 2 * row_mm * header.orientation[3:])
    return slice_label(index, round(float(centre[2]), 2) + 0.0, _instance_number(ds))


def _drop_duplicates(slices: list[SliceHeader], along: np.ndarray, messages: list[str]):
    """Drop duplicate files (one instance stored twice at one position) with one note; refuse two different slices
    there."""
    keep, dropped = [0], []
    for k in range(1, len(slices)):
        if abs(along[k] - along[keep[-1]]) > 1e-3:
            keep.append(k)
            continue
        kept, other = slices[keep[-1]], slices[k]
        if not _same_instance(kept, other):
            raise DicomError(f"{other.display_name} and {kept.display_name} are different slices at the same position "
                             f"({along[k]:.3f} mm along the normal): several acquisitions in one series?")
        dropped.append(len(keep) - 1)  # the kept slice's index in the volume
    if dropped:
        places = sorted(set(dropped))
        _warn(messages, f"{len(dropped)} duplicate file(s) ignored (the same instance stored again at a slice's "
                        f"position): at {slice_name(slices[keep[places[0]]], places[0])}"
                        + (f", and {len(places) - 1} more slice(s)" if len(places) > 1 else ""))
    return [slices[k] for k in keep], along[keep]


def _same_instance(a: SliceHeader, b: SliceHeader) -> bool:
    """Whether two files at one position hold the same instance: the same SOP Instance UID (from the file meta where
    anonymisation blanked the dataset's), or, where neither names one, the same bytes."""
    uid_a, uid_b = instance_uid(a.dataset), instance_uid(b.dataset)
    if uid_a or uid_b:
        return uid_a == uid_b
    return filecmp.cmp(a.path, b.path, shallow=False)


def slice_spacing(slices: list[SliceHeader], along: np.ndarray, messages: list[str]) -> float:
    """The grid's slice spacing: the median step between positions, with warnings for gaps and unevenness."""
    if len(slices) < 2:
        thickness = slices[0].dataset.get("SliceThickness")
        spacing = float(thickness) if thickness not in (None, "") and float(thickness) > 0 else 1.0
        _warn(messages, f"a single slice; slice spacing taken as {spacing} mm (SliceThickness or 1 mm)")
        return spacing
    steps = np.diff(along)
    median = float(np.median(steps))
    for k, step in enumerate(steps):
        if step >= MISSING_SLICE_RATIO * median:
            missing = int(round(step / median)) - 1
            _warn(messages, f"about {missing} missing slice(s) between {slice_name(slices[k], k)} and "
                            f"{slice_name(slices[k + 1], k + 1)} ({step:.3f} mm apart, usual step {median:.3f} mm); "
                            "not interpolated")
    regular = steps[steps < MISSING_SLICE_RATIO * median]
    if regular.size and np.max(np.abs(regular - median)) > max(SPACING_TOLERANCE * median, 1e-3):
        _warn(messages, f"uneven slice spacing: steps from {regular.min():.4f} to {regular.max():.4f} mm; "
                        f"the volume grid uses the median {median:.4f} mm")
    drift = np.diff(np.array([s.position for s in slices]), axis=0) - np.outer(steps, slices[0].normal)
    if np.max(np.linalg.norm(drift, axis=1)) > TILT_TOLERANCE_MM:
        angle = np.degrees(np.arctan2(np.linalg.norm(drift[0]), steps[0]))
        _warn(messages, f"slice positions drift off the slice normal (gantry tilt about {angle:.1f} deg); "
                        "the volume is placed as if untilted")
    return median


def _check_same_grid(slices: list[SliceHeader]) -> None:
    ref = slices[0].dataset
    for header in slices[1:]:
        ds = header.dataset
        for keyword in ("Rows", "Columns"):
            if int(ds.get(keyword)) != int(ref.get(keyword)):
                raise DicomError(f"{header.display_name}: {keyword} {ds.get(keyword)} differs from "
                                 f"{slices[0].display_name} ({ref.get(keyword)})")
        if not np.allclose([float(v) for v in ds.PixelSpacing], [float(v) for v in ref.PixelSpacing], atol=1e-4):
            raise DicomError(f"{header.display_name}: PixelSpacing {list(ds.PixelSpacing)} differs from "
                             f"{slices[0].display_name} ({list(ref.PixelSpacing)})")


def decode_slice_hu(header: SliceHeader) -> np.ndarray:
    """One slice's pixels in HU as float32 (rows, columns); :class:`DicomError` naming the file on failure."""
    rows, columns = int(header.dataset.Rows), int(header.dataset.Columns)
    transfer_syntax = _transfer_syntax(header)
    monochrome1 = str(header.dataset.get("PhotometricInterpretation", "")).upper() == "MONOCHROME1"
    try:
        full = pydicom.dcmread(header.path)
        if "PixelData" not in full:  # cut short: GDCM would allocate about 1 GB before failing on such a file
            raise DicomError("the pixel data is missing or truncated")
        size_problem = frame_size_problem(full)  # a decoder allocates what the stream declares, not Rows x Columns
        if size_problem:
            raise DicomError(size_problem)
        if monochrome1 or not transfer_syntax.is_compressed:
            pixels = pydicom.pixels.apply_modality_lut(full.pixel_array, full).astype(np.float32)
        else:
            image = first_use_alone("gdcm", lambda: sitk.ReadImage(header.path, sitk.sitkFloat32))
            pixels = sitk.GetArrayFromImage(image)
    except Exception as exc:
        raise DicomError(f"{header.display_name}: cannot decode pixel data "
                         f"(transfer syntax {transfer_syntax.name or transfer_syntax or '?'}): "
                         f"{str(exc).strip().splitlines()[-1] if str(exc).strip() else type(exc).__name__}") from exc
    pixels = np.asarray(pixels, dtype=np.float32)
    if pixels.size != rows * columns:
        raise DicomError(f"{header.display_name}: decoded {pixels.shape} pixels, header says {rows}x{columns}")
    return pixels.reshape(rows, columns)


def _source(series: SeriesInfo, slices: list[SliceHeader], messages: list[str]) -> DicomSource:
    datasets, repairs = fill_empty_uids([s.dataset for s in slices], series.key, in_place=True)
    notes = repair_notes(repairs)
    if notes:  # one warning, not one per UID: anonymised series lack several at once
        _warn(messages, f"{'; '.join(notes)} (the same on every read)")
    first = datasets[0]
    age_sex = {k: str(first.get(k, "") or "") for k in ("PatientAge", "PatientSex")}
    number = first.get("SeriesNumber")
    return DicomSource(
        study_instance_uid=str(first.StudyInstanceUID),
        series_instance_uid=str(first.SeriesInstanceUID),
        sop_class_uid=str(first.get("SOPClassUID", "")),
        sop_instance_uids=[str(ds.SOPInstanceUID) for ds in datasets],
        frame_of_reference_uid=str(first.FrameOfReferenceUID),
        image_positions=[tuple(float(v) for v in ds.ImagePositionPatient) for ds in datasets],
        files=[s.display_name for s in slices],
        modality=str(first.get("Modality", "") or ""),
        body_part_examined=str(first.get("BodyPartExamined", "") or ""),
        patient_sex=age_sex["PatientSex"],
        patient_age=age_sex["PatientAge"],
        series_description=str(first.get("SeriesDescription", "") or ""),
        series_number=int(number) if number not in (None, "") else None,
        manufacturer=str(first.get("Manufacturer", "") or ""),
        transfer_syntax_uid=str(first.file_meta.get("TransferSyntaxUID", "")),
        photometric_interpretation=str(first.get("PhotometricInterpretation", "")),
        uids_repaired=bool(notes),
        derived_uids=derived_keywords(repairs),
        headers=datasets,
        instance_numbers=[_instance_number(ds) for ds in datasets],
    )


def _instance_number(ds) -> int | None:
    """The slice's InstanceNumber (IS) as an int; None when absent, empty or not a number."""
    value = ds.get("InstanceNumber")
    try:
        return int(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None


def _decode_planes(slices: list[SliceHeader], pool: ThreadPoolExecutor, decoder: NvImageCodecDecoder | None,
                   progress: bool) -> list[np.ndarray]:
    """Every slice's HU plane: JPEG 2000 slices through ``decoder`` in batches where one is given, the rest (and
    what it does not take) one file per task in ``pool``."""
    planes: list[np.ndarray | None] = [None] * len(slices)
    with tqdm(total=len(slices), desc="decoding slices", unit="slice", disable=None if progress else True,
              leave=False) as bar:
        if decoder is not None:
            batched = [k for k, s in enumerate(slices) if _transfer_syntax(s) in J2K_SYNTAXES]
            stored = decoder.stored_values([slices[k].path for k in batched], pool)
            for k, values in zip(batched, stored):
                if values is not None:  # the same modality LUT as the uncompressed path
                    planes[k] = pydicom.pixels.apply_modality_lut(values, slices[k].dataset).astype(np.float32)
                    bar.update()
        rest = [k for k, plane in enumerate(planes) if plane is None]
        for k, plane in zip(rest, pool.map(decode_slice_hu, [slices[k] for k in rest])):
            planes[k] = plane
            bar.update()
    return planes


def _transfer_syntax(header: SliceHeader) -> pydicom.uid.UID:
    return pydicom.uid.UID(str(header.dataset.file_meta.get("TransferSyntaxUID", "")))


def _warn_about_set_apart(series: SeriesInfo, messages: list[str]) -> None:
    """Say what beside the series' slices is not read: localizers sharing its UID, files that may be lost slices
    (counted, not named: warnings never name files)."""
    if series.localizers:
        _warn(messages, f"{len(series.localizers)} localizer/scout image(s) (ImageType LOCALIZER) share the series' "
                        "SeriesInstanceUID; left out of the volume")
    if series.stray_files:
        _warn(messages, f"{len(series.stray_files)} file(s) beside the series' slices are not DICOM but empty, too "
                        "short for DICOM or named as DICOM (an interrupted copy?): if they were slices, the volume "
                        "lacks them, and a lost first or last slice leaves no gap to warn about")


def volume_from_series(series: SeriesInfo, display_root: str = "", workers: int | None = None,
                       progress: bool = True, limits: ResourceLimits = DEFAULT_LIMITS,
                       decoder: str | None = None) -> Volume:
    """Decode a scanned series into a Volume (see the module docstring for every rule applied).

    Rows x Columns x slices, from the headers, is checked against ``limits`` before any pixel is decoded.
    ``decoder``: ``None``/``gdcm``, or an nvImageCodec spec for JPEG 2000 (:mod:`ctzoo.io.nvimgcodec_decode`)."""
    if series.non_images:
        bad = series.non_images[0]
        raise DicomError(f"{bad.display_name}: {bad.not_image_reason} (in the series being read)")
    messages: list[str] = []
    _warn_about_set_apart(series, messages)
    check_same_orientation(series.slices)
    _check_same_grid(series.slices)
    slices, along = sort_slices(series.slices)
    slices, along = _drop_duplicates(slices, along, messages)
    first = slices[0].dataset
    limits.check_voxels((len(slices), int(first.Rows), int(first.Columns)), f"{display_root or 'the'} series")
    z_spacing = slice_spacing(slices, along, messages)
    row_cosine, column_cosine = slices[0].orientation[:3], slices[0].orientation[3:]
    direction = np.column_stack([row_cosine, column_cosine, slices[0].normal])
    # PixelSpacing is (row spacing, column spacing) = (y, x): the order DICOM gives it in.
    row_mm, column_mm = (float(v) for v in slices[0].dataset.PixelSpacing)
    check_spacing((column_mm, row_mm, z_spacing), direction, display_root or "the series")
    workers = workers or min(8, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as pool:
        planes = _decode_planes(slices, pool, decoder_for(decoder), progress)
    return Volume(
        array=np.stack(planes),
        spacing=(column_mm, row_mm, z_spacing),
        origin=tuple(slices[0].position),
        direction=direction,
        dicom=_source(series, slices, messages),
        warnings=messages,
    )


def read_dicom_series(path: str | Path, series: str | None = None, rules: SeriesRules | None = None,
                      workers: int | None = None, progress: bool = True,
                      limits: ResourceLimits = DEFAULT_LIMITS, decoder: str | None = None,
                      recursive: bool = True) -> Volume:
    """Read the CT volume in a DICOM folder or zip.

    ``series`` picks one by SeriesInstanceUID or by its index as ``ctzoo info`` lists it; otherwise
    ``rules`` choose (default: CT, axial, not a localizer, most slices). ``decoder``: see
    :func:`volume_from_series`. ``recursive=False``: only the files directly in the folder (its subfolders are
    cases of their own in ``ctzoo infer``).
    """
    with pydicom_messages_once(), dicom_folder(path, limits) as (folder, display_root):
        scan = scan_folder(folder, display_root, progress=progress, recursive=recursive)
        if display_root is None:
            scan.root = str(path)
        chosen = choose_series(scan, rules, series)
        volume = volume_from_series(chosen, scan.root, workers=workers, progress=progress, limits=limits,
                                    decoder=decoder)
    volume.source_path = str(path)
    return volume
