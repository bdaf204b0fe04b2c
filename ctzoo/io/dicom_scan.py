"""Find the DICOM series in a folder (or zip) and choose one by rule.

Scanning reads headers only (pydicom, ``stop_before_pixels``); pixel decoding
is left to :mod:`ctzoo.io.dicom_series`. Every problem names the file it
comes from, so a user can find the slice that broke a series.
"""

from __future__ import annotations

import hashlib
import logging
import os
import tempfile
import warnings
import zipfile
import zlib
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import pydicom
from pydantic import Field
from pydicom.errors import InvalidDicomError
from tqdm.auto import tqdm

from ctzoo.config import StrictConfig
from ctzoo.io.dicom_deflate import declares_deflate, deflated_problem
from ctzoo.io.dicom_uids import series_wide_uids
from ctzoo.io.dicom_values import slice_value_problem
from ctzoo.io.limits import DEFAULT_LIMITS, ResourceLimits

log = logging.getLogger(__name__)

#: SOP classes that are never slices of an image volume, whatever attributes they carry.
NON_VOLUME_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.66.4": "Segmentation",
    "1.2.840.10008.5.1.4.1.1.481.2": "RT Dose",
    "1.2.840.10008.5.1.4.1.1.481.3": "RT Structure Set",
    "1.2.840.10008.5.1.4.1.1.11.1": "Grayscale Softcopy Presentation State",
    "1.2.840.10008.5.1.4.1.1.104.1": "Encapsulated PDF",
}
#: The geometry an image slice must carry to be placed in a volume.
REQUIRED_SLICE_TAGS = ("Rows", "Columns", "PixelSpacing", "ImagePositionPatient", "ImageOrientationPatient")
#: Image SOP classes whose every instance carries that geometry (the Image Plane module is mandatory in them): one
#: lacking it was cut short. (Other image classes, Secondary Capture, need none.)
PLANE_GEOMETRY_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.2": "CT Image Storage",
    "1.2.840.10008.5.1.4.1.1.4": "MR Image Storage",
    "1.2.840.10008.5.1.4.1.1.128": "Positron Emission Tomography Image Storage",
}
#: The DICOM file preamble's length; the four bytes after it read "DICM" in a DICOM file.
PREAMBLE_BYTES = 128
#: Suffixes that say a file is meant to be DICOM: one that is not, beside a series' slices, may be a lost slice.
DICOM_SUFFIXES = (".dcm", ".dicom", ".ima")
#: Cosine of the largest angle between two slice normals still taken as "the same orientation".
SAME_ORIENTATION_COS = float(np.cos(np.deg2rad(0.5)))


class DicomError(ValueError):
    """A DICOM input ctzoo refuses; the message names the file and the reason."""


def error_reason(exc: BaseException) -> str:
    """An exception's message on one line (its type where it has none): the reason half of a refusal."""
    return " ".join(str(exc).split()) or type(exc).__name__


#: What reading a damaged compressed stream or a file cut short raises (gzip's BadGzipFile is an OSError).
DAMAGED_STREAM_ERRORS = (zlib.error, EOFError, OSError)
#: ... and a zip member besides: a bad CRC or header, an unknown compression method, an encrypted member.
UNREADABLE_ZIP_ERRORS = (*DAMAGED_STREAM_ERRORS, zipfile.BadZipFile, NotImplementedError, RuntimeError)


class DicomWarning(UserWarning):
    """A DICOM input ctzoo reads, but not as cleanly as it should (missing slices, uneven spacing...)."""


class SeriesRules(StrictConfig):
    """Which series counts as "the CT" when a folder holds several (``configs/series_selection.yaml``)."""

    modalities: list[str] = Field(default_factory=lambda: ["CT"], description="accepted Modality values")
    orientation: Literal["axial", "any"] = Field("axial", description="'axial': slice normal near the S axis")
    max_axial_angle_deg: float = Field(30.0, ge=0, le=90, description="largest tilt of the normal from S")
    min_slices: int = Field(1, ge=1, description="fewer image slices than this rejects a series")
    slice_thickness_mm: tuple[float, float] | None = Field(None, description="accepted SliceThickness range")
    exclude_localizers: bool = Field(True, description="refuse scouts/topograms (ImageType LOCALIZER)")


@dataclass
class SliceHeader:
    """What one DICOM file says about itself, read without its pixels."""

    path: str
    display_name: str
    dataset: pydicom.Dataset | None
    series_key: str
    not_image_reason: str = ""
    corrupt_reason: str = ""

    @property
    def orientation(self) -> np.ndarray:
        return np.asarray([float(v) for v in self.dataset.ImageOrientationPatient], dtype=float)

    @property
    def position(self) -> np.ndarray:
        return np.asarray([float(v) for v in self.dataset.ImagePositionPatient], dtype=float)

    @property
    def normal(self) -> np.ndarray:
        orientation = self.orientation
        return np.cross(orientation[:3], orientation[3:])

    @property
    def is_localizer(self) -> bool:
        return any("LOCALIZER" in str(v).upper() for v in self.dataset.get("ImageType", []))


@dataclass
class SeriesInfo:
    """One series found in a folder: its slices and why it may not be selectable."""

    key: str
    index: int
    slices: list[SliceHeader]
    non_images: list[SliceHeader] = field(default_factory=list)
    #: Localizer/scout images that share the series' UID with its slices, set apart (:func:`set_localizers_apart`).
    localizers: list[SliceHeader] = field(default_factory=list)
    #: Files beside its slices that are empty or not DICOM although named so (display names): lost slices?
    stray_files: list[str] = field(default_factory=list)

    @property
    def first(self) -> pydicom.Dataset:
        return (self.slices or self.non_images)[0].dataset

    @property
    def series_instance_uid(self) -> str:
        return str(self.first.get("SeriesInstanceUID", "") or "")

    def derived_series_uids(self) -> set[str]:
        """The SeriesInstanceUID a read derives for this series when its files have none (what ``ctzoo info``
        prints; empty when they have one). The read derives it from its first slice in slice order, which a scan
        does not know yet: every slice's candidate is included (slices of one series share what it is made of)."""
        if self.series_instance_uid:
            return set()
        return {series_wide_uids(self.key, s.dataset)["SeriesInstanceUID"] for s in self.slices}

    @property
    def modality(self) -> str:
        return str(self.first.get("Modality", "") or "")

    @property
    def description(self) -> str:
        return str(self.first.get("SeriesDescription", "") or "")

    @property
    def is_localizer(self) -> bool:
        return any(s.is_localizer for s in self.slices)

    @property
    def orientation_label(self) -> str:
        """'axial', 'coronal', 'sagittal' or 'oblique' from the slice normal; 'mixed' if slices disagree."""
        if not self.slices:
            return "none"
        normals = np.array([s.normal for s in self.slices])
        if np.any(np.abs(normals @ normals[0]) < SAME_ORIENTATION_COS):
            return "mixed"
        axis = int(np.argmax(np.abs(normals[0])))
        if np.abs(normals[0][axis]) < np.cos(np.deg2rad(30.0)):
            return "oblique"
        return ("sagittal", "coronal", "axial")[axis]

    def axial_angle_deg(self) -> float:
        """Angle between the slice normal and the patient's S axis, in degrees."""
        return float(np.degrees(np.arccos(min(1.0, abs(self.slices[0].normal[2])))))

    def rejection(self, rules: SeriesRules) -> str:
        """Why ``rules`` refuse this series, or '' if they accept it."""
        if not self.slices:
            reasons = sorted({s.not_image_reason for s in self.non_images})
            return "no image slices (" + "; ".join(reasons) + ")"
        if self.modality.upper() not in {m.upper() for m in rules.modalities}:
            return f"modality {self.modality or '(empty)'} is not one of {rules.modalities}"
        if rules.exclude_localizers and self.is_localizer:
            return "a localizer/scout (ImageType LOCALIZER)"
        label = self.orientation_label
        if label == "mixed":
            return "slices have mixed orientations"
        if rules.orientation == "axial" and self.axial_angle_deg() > rules.max_axial_angle_deg:
            return f"not axial ({label}, normal {self.axial_angle_deg():.0f} deg from S)"
        if len(self.slices) < rules.min_slices:
            return f"{len(self.slices)} slices, fewer than {rules.min_slices}"
        if rules.slice_thickness_mm is not None:
            low, high = rules.slice_thickness_mm
            thickness = self.first.get("SliceThickness")
            if thickness in (None, "") or not low <= float(thickness) <= high:
                return f"slice thickness {thickness} outside [{low}, {high}] mm"
        return ""

    def summary(self, rules: SeriesRules | None = None) -> dict:
        """A JSON-friendly line for ``ctzoo info`` (no patient identifiers)."""
        first = self.first
        info = {
            "index": self.index,
            "series_instance_uid": self.series_instance_uid,
            "modality": self.modality,
            "series_number": first.get("SeriesNumber"),
            "description": self.description,
            "slices": len(self.slices),
            "non_image_objects": len(self.non_images),
            "orientation": self.orientation_label,
            "localizer": self.is_localizer,
            "localizers_set_apart": len(self.localizers),
            "slice_thickness_mm": (float(first.SliceThickness) if first.get("SliceThickness") not in (None, "")
                                   else None),
        }
        if rules is not None:
            info["rejected_because"] = self.rejection(rules) or None
        return info


@dataclass
class ScanResult:
    """Everything a folder holds: the series, and the files that are not DICOM at all."""

    root: str
    series: list[SeriesInfo]
    not_dicom: list[str]
    corrupt: list[SliceHeader] = field(default_factory=list)


def _sop_class(ds: pydicom.Dataset) -> pydicom.uid.UID:
    meta = getattr(ds, "file_meta", None) or pydicom.Dataset()
    return pydicom.uid.UID(str(ds.get("SOPClassUID", "") or meta.get("MediaStorageSOPClassUID", "") or ""))


def _image_problem(ds: pydicom.Dataset) -> str:
    """'' if ``ds`` is a single-frame image slice with geometry, else why it is not."""
    sop_class = _sop_class(ds)
    if sop_class in NON_VOLUME_SOP_CLASSES:
        return f"a {NON_VOLUME_SOP_CLASSES[sop_class]} object, not an image slice"
    # before the geometry: a multi-frame object (Enhanced CT) keeps it in functional groups, not where slices do
    if int(ds.get("NumberOfFrames", 1) or 1) > 1:
        return f"a multi-frame object ({ds.NumberOfFrames} frames); only single-frame slices are read"
    missing = [tag for tag in REQUIRED_SLICE_TAGS if ds.get(tag) in (None, "")]
    if missing:
        return f"not an image slice ({sop_class.name or 'unknown SOP class'}): missing " + ", ".join(missing)
    return ""


def _cut_short(path: str, ds: pydicom.Dataset) -> bool:
    """Whether a file that lacks a slice's geometry was cut short rather than made without it: it names no SOP
    class at all (every DICOM object must), its SOP class requires the geometry (CT, MR, PET image), or it is an
    image of another class without pixel data."""
    sop_class = _sop_class(ds)
    return (not sop_class or sop_class in PLANE_GEOMETRY_SOP_CLASSES
            or ("Image Storage" in sop_class.name and not _has_pixel_data(path)))


def _has_pixel_data(path: str) -> bool:
    """Whether the file holds a pixel data element (its value is not read)."""
    try:
        ds = pydicom.dcmread(path, defer_size=1024)
    except Exception:  # unreadable past its header: no pixel data to speak of
        return False
    return any(keyword in ds for keyword in ("PixelData", "FloatPixelData", "DoubleFloatPixelData"))


def _has_dicom_prefix(path: str) -> bool:
    """Whether the file starts as a DICOM file does: a preamble, then "DICM"."""
    with open(path, "rb") as stream:
        return stream.read(PREAMBLE_BYTES + 4)[PREAMBLE_BYTES:] == b"DICM"


def _series_key(ds: pydicom.Dataset) -> str:
    """SeriesInstanceUID, or, where it is empty (anonymised files), a stable key from what else the series shares."""
    uid = str(ds.get("SeriesInstanceUID", "") or "")
    if uid:
        return uid
    parts = [str(ds.get(tag, "") or "") for tag in
             ("StudyInstanceUID", "FrameOfReferenceUID", "SeriesNumber", "SeriesDescription", "Modality",
              "Rows", "Columns", "SeriesDate", "SeriesTime")]
    return "no-uid:" + hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def read_header(path: str, display_name: str | None = None) -> SliceHeader | None:
    """Read one file's header without pixels; None if it is not DICOM at all.

    A damaged file comes back with ``corrupt_reason`` set: one that starts as DICOM (preamble, "DICM") but cannot
    be parsed, and one whose geometry or rescale values cannot be used (:func:`slice_value_problem`). pydicom stops
    quietly at a truncation, so an image whose SOP class requires the geometry (or one without pixel data) lacking
    it is taken as damaged, not as a non-image object.
    """
    shown = display_name or path
    try:
        with open(path, "rb") as stream:  # one open per file: this runs for every file of every series
            # a deflated file is bounded before pydicom, which would inflate it whole
            unbounded = deflated_problem(path) if declares_deflate(stream) else ""
            if unbounded:
                return SliceHeader(path, shown, None, "", corrupt_reason=unbounded)
            ds = pydicom.dcmread(stream, stop_before_pixels=True)
        problem = _image_problem(ds)
        key = _series_key(ds)
    except InvalidDicomError as exc:
        if _has_dicom_prefix(path):  # a DICOM file cut short inside its file meta, or damaged there
            return SliceHeader(path, shown, None, "", corrupt_reason=f"corrupt DICOM file ({error_reason(exc)})")
        return None
    except Exception as exc:  # pydicom raises many types on damaged files; all mean the same to a user
        return SliceHeader(path, shown, None, "", corrupt_reason=f"corrupt DICOM header ({type(exc).__name__}: {exc})")
    if problem.startswith("not an image slice") and _cut_short(path, ds):
        # the series key of a damaged file is only trusted if its SeriesInstanceUID survived
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        return SliceHeader(path, shown, ds, series_uid, corrupt_reason=f"corrupt or truncated DICOM file: {problem}")
    if not problem:
        problem = slice_value_problem(ds)  # a malformed value must fail here, naming this file
        if problem:
            return SliceHeader(path, shown, ds, key, corrupt_reason=problem)
    return SliceHeader(path, shown, ds, key, problem)


def _dicom_candidates(root: Path, recursive: bool = True) -> Iterator[Path]:
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith(".")) if recursive else []
        for name in sorted(filenames):
            if name.startswith(".") or name.upper() == "DICOMDIR":
                continue
            yield Path(dirpath) / name


def scan_folder(root: str | Path, display_root: str | None = None, progress: bool = True,
                recursive: bool = True) -> ScanResult:
    """Read every file's header under ``root`` (recursively; ``recursive=False``: the files directly in it) and
    group the DICOM ones into series.

    Series are numbered from 1 by size (most image slices first) so ``ctzoo info`` and ``--series N`` agree.
    """
    root = Path(root)
    groups: dict[str, SeriesInfo] = {}
    not_dicom: list[str] = []
    stray: dict[str, list[str]] = {}  # folder -> the display names of its files that may be lost slices
    corrupt: list[SliceHeader] = []
    files = list(_dicom_candidates(root, recursive))
    for path in tqdm(files, desc="scanning DICOM headers", unit="file", disable=None if progress else True,
                     leave=False):
        shown = os.path.join(display_root, os.path.relpath(path, root)) if display_root else str(path)
        header = read_header(str(path), shown)
        if header is None:
            not_dicom.append(shown)
            if _may_be_lost_slice(path):
                stray.setdefault(str(path.parent), []).append(shown)
            continue
        if header.corrupt_reason:
            corrupt.append(header)
            continue
        series = groups.setdefault(header.series_key, SeriesInfo(header.series_key, 0, []))
        (series.non_images if header.not_image_reason else series.slices).append(header)
    for series in groups.values():
        set_localizers_apart(series)
        folders = {str(Path(s.path).parent) for s in series.slices}
        series.stray_files = sorted(name for folder in folders for name in stray.get(folder, []))
    ordered = sorted(groups.values(), key=lambda s: (-len(s.slices), s.key))
    for number, series in enumerate(ordered, start=1):
        series.index = number
    return ScanResult(str(display_root or root), ordered, not_dicom, corrupt)


def _may_be_lost_slice(path: Path) -> bool:
    """Whether a file that is not DICOM may have been a slice: too short for a DICOM file's preamble (an empty
    file, a copy cut short), or named as DICOM files are."""
    return path.stat().st_size < PREAMBLE_BYTES + 4 or path.suffix.lower() in DICOM_SUFFIXES


def set_localizers_apart(series: SeriesInfo) -> None:
    """Move the localizer/scout images (ImageType LOCALIZER) of a series that also holds other image slices into
    ``series.localizers``: some scanners give the scout the CT's SeriesInstanceUID, and it is no slice of the
    volume. A series of localizers only is left as it is (the rules skip it; named, it is refused)."""
    localizers = [s for s in series.slices if s.is_localizer]
    if localizers and len(localizers) < len(series.slices):
        series.slices = [s for s in series.slices if not s.is_localizer]
        series.localizers += localizers


@contextmanager
def dicom_folder(path: str | Path, limits: ResourceLimits = DEFAULT_LIMITS) -> Iterator[tuple[Path, str | None]]:
    """Yield a folder holding the DICOM files of ``path`` (a folder, or a zip extracted to a temporary folder).

    The second value is the name to show for files (the zip's path), so messages name ``series.zip/IMG001``.
    A zip may hold ``limits.max_zip_members`` entries and inflate to ``limits.decoded_limit(its size)`` bytes:
    checked on its directory before extracting, and on the bytes written while extracting
    (:class:`~ctzoo.io.limits.LimitExceeded`).
    """
    path = Path(path)
    if path.is_dir():
        yield path, None
        return
    if not zipfile.is_zipfile(path):
        raise DicomError(f"{path}: neither a folder nor a zip archive of DICOM files")
    with tempfile.TemporaryDirectory(prefix="ctzoo-zip-") as tmp:
        target = Path(tmp).resolve()
        _extract_zip(path, target, limits)
        yield target, str(path)


def _zip_members(archive: zipfile.ZipFile, path: Path, limits: ResourceLimits) -> list[zipfile.ZipInfo]:
    """The files of ``archive`` (folder entries left out), once its entries' number and the files' declared sizes
    are within ``limits``: checked on its directory, before anything is extracted or read."""
    entries = archive.infolist()
    limits.check_members(len(entries), path.name)
    members = [m for m in entries if not m.is_dir()]
    limits.check_decoded(sum(m.file_size for m in members), path.stat().st_size, path.name)
    return members


def _extract_zip(path: Path, target: Path, limits: ResourceLimits) -> None:
    """Extract the zip at ``path`` into ``target`` within ``limits`` (see :func:`dicom_folder`); a damaged archive
    is a :class:`DicomError` naming it and the member, not zipfile's or zlib's traceback, and so is one with two
    members of one name (the second would silently replace the first: a slice lost)."""
    received = path.stat().st_size
    with _open_zip(path) as archive:
        members = _zip_members(archive, path, limits)
        written, allowed = 0, min(limits.decoded_limit(received), limits.max_decoded_bytes)
        extracted: set[Path] = set()
        for member in members:
            destination = (target / member.filename).resolve()
            if target not in destination.parents:
                raise DicomError(f"{path}: member {member.filename!r} would extract outside the archive folder")
            if destination in extracted:
                raise DicomError(f"{path}: the archive holds two members named {member.filename!r}")
            extracted.add(destination)
            try:
                destination.parent.mkdir(parents=True, exist_ok=True)
                with archive.open(member) as src, open(destination, "xb") as dst:
                    # counted while extracting: a crafted archive can declare small sizes and inflate far beyond them
                    while chunk := src.read(1 << 20):
                        written += len(chunk)
                        if written > allowed:
                            limits.check_decoded(written, received,
                                                 f"{path.name} (inflating beyond its declared size)")
                        dst.write(chunk)
            except (FileExistsError, NotADirectoryError, IsADirectoryError):  # the message would name the temp folder
                raise DicomError(f"{path}: cannot extract {member.filename!r}: another member of the archive has the "
                                 "same path, one a file and the other a folder") from None
            except UNREADABLE_ZIP_ERRORS as exc:
                raise DicomError(f"{path}: cannot extract {member.filename!r}: {_reason_without_path(exc)}") from exc


def _reason_without_path(exc: BaseException) -> str:
    """:func:`error_reason`, but for an error of the file system (a full disk) its reason alone: its file name is
    the temporary folder's."""
    if isinstance(exc, OSError) and exc.filename is not None:
        return exc.strerror or type(exc).__name__
    return error_reason(exc)


def _open_zip(path: Path) -> zipfile.ZipFile:
    """The archive at ``path`` opened; a damaged directory is a :class:`DicomError` naming the file."""
    try:
        return zipfile.ZipFile(path)
    except UNREADABLE_ZIP_ERRORS as exc:
        raise DicomError(f"{path}: a damaged zip archive: {error_reason(exc)}") from exc


def zip_declared_size(path: str | Path, limits: ResourceLimits = DEFAULT_LIMITS) -> tuple[int, int]:
    """``(voxels, frames)`` of the DICOM images in the zip at ``path``: Rows x Columns x frames, and frames, summed
    over them, read from each member's header inside the archive (nothing is extracted), after checking the sizes
    its directory declares; both checked against ``limits``. Members that are not DICOM count nothing."""
    path = Path(path)
    if not zipfile.is_zipfile(path):
        raise DicomError(f"{path.name}: not a zip archive")
    voxels = frames = 0
    with _open_zip(path) as archive:
        for member in _zip_members(archive, path, limits):
            try:
                with archive.open(member) as stream:
                    if declares_deflate(stream):
                        continue  # counted once extracted, where read_header bounds its inflation
                    ds = pydicom.dcmread(stream, stop_before_pixels=True)
            except (InvalidDicomError, EOFError, OSError, ValueError, zipfile.BadZipFile):
                continue  # not DICOM, or damaged: the reader reports it if it belongs to the series
            try:
                count = int(ds.get("NumberOfFrames") or 1)
                voxels += int(ds.get("Rows") or 0) * int(ds.get("Columns") or 0) * count
            except (TypeError, ValueError):
                continue
            frames += count
    limits.check_voxels((voxels,), f"the DICOM images in {path.name}")
    return voxels, frames


def choose_series(scan: ScanResult, rules: SeriesRules | None = None, series: str | None = None) -> SeriesInfo:
    """Pick the series to read: the one named by ``series`` (its UID, the UID a read derives where its files have
    none, its key or its index N), else the best one ``rules`` accept.

    "Best" is the accepted series with the most slices (ties: thinnest slices, then lowest index).
    """
    chosen = _choose(scan, rules or SeriesRules(), series)
    for damaged in scan.corrupt:
        # a damaged file of unknown series may well be a slice of the chosen one: never read around it
        if damaged.series_key in ("", chosen.key):
            raise DicomError(f"{damaged.display_name}: {damaged.corrupt_reason}")
        warnings.warn(f"{damaged.display_name}: {damaged.corrupt_reason} (another series; ignored)", DicomWarning,
                      stacklevel=2)
    return chosen


def _choose(scan: ScanResult, rules: SeriesRules, series: str | None) -> SeriesInfo:
    if not scan.series and scan.corrupt:
        raise DicomError(f"{scan.corrupt[0].display_name}: {scan.corrupt[0].corrupt_reason}")
    if not scan.series:
        raise DicomError(f"{scan.root}: no DICOM files found"
                         + (f" ({len(scan.not_dicom)} other files)" if scan.not_dicom else ""))
    if series is not None:
        wanted = str(series).lstrip("#")
        for candidate in scan.series:
            named = {candidate.series_instance_uid, candidate.key, str(candidate.index)}
            if wanted in named or wanted in candidate.derived_series_uids():
                _check_explicit_choice(candidate)
                return candidate
        known = ", ".join(f"#{s.index} {s.series_instance_uid or s.key}" for s in scan.series)
        raise DicomError(f"{scan.root}: no series {series!r}; found {known}")
    accepted = [s for s in scan.series if not s.rejection(rules)]
    if not accepted:
        reasons = "; ".join(f"#{s.index} ({len(s.slices)} slices): {s.rejection(rules)}" for s in scan.series)
        raise DicomError(f"{scan.root}: no series matches the selection rules: {reasons}")

    def thickness(s: SeriesInfo) -> float:
        value = s.first.get("SliceThickness")
        return float(value) if value not in (None, "") else float("inf")

    return min(accepted, key=lambda s: (-len(s.slices), thickness(s), s.index))


def _check_explicit_choice(series: SeriesInfo) -> None:
    """A series named by the user is read even if rules would skip it, except where it cannot be a volume."""
    if not series.slices:
        raise DicomError(f"series #{series.index} holds no image slices")
    localizer = next((s for s in series.slices if s.is_localizer), None)
    if localizer is not None:
        raise DicomError(f"{localizer.display_name}: a localizer/scout image (ImageType "
                         f"{list(localizer.dataset.ImageType)}), not part of a CT volume")


def check_same_orientation(slices: Sequence[SliceHeader]) -> None:
    """Refuse a series whose slices are not parallel, naming the first file that differs."""
    reference = slices[0].orientation
    for header in slices[1:]:
        cosines = header.orientation
        if min(float(cosines[:3] @ reference[:3]), float(cosines[3:] @ reference[3:])) < SAME_ORIENTATION_COS:
            raise DicomError(
                f"{header.display_name}: ImageOrientationPatient {header.orientation.round(4).tolist()} differs "
                f"from {slices[0].display_name} ({slices[0].orientation.round(4).tolist()}); "
                "a series with mixed orientations is not one volume"
            )
