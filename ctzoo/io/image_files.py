"""NIfTI (nibabel), NRRD/MHA (SimpleITK) and the one entry point that reads any CT input.

Files are written atomically: to a temporary name in the target folder, then
renamed, so an interrupted write never leaves a half-written volume behind.
"""

from __future__ import annotations

import errno
import itertools
import os
from pathlib import Path

import nibabel as nib
import numpy as np
import SimpleITK as sitk
from nibabel.filebasedimages import ImageFileError
from nibabel.openers import ImageOpener
from nibabel.spatialimages import HeaderDataError

from ctzoo.io.atomic import atomic_path
from ctzoo.io.dicom_scan import (
    DAMAGED_STREAM_ERRORS,
    DicomError,
    SeriesRules,
    error_reason,
    read_header,
    zip_declared_size,
)
from ctzoo.io.dicom_series import read_dicom_series
from ctzoo.io.itk_threads import first_use_alone
from ctzoo.io.limits import DEFAULT_LIMITS, ResourceLimits, UnsafeInput, check_self_contained
from ctzoo.io.metaimage import check_metaimage_data
from ctzoo.io.orientation import geometry_from_affine, orientation_code, ras_to_lps_affine
from ctzoo.io.spacing import ImplausibleSpacing, check_spacing, slice_axis
from ctzoo.io.volume import Volume

NIFTI_SUFFIXES = (".nii", ".nii.gz")
ITK_READ_SUFFIXES = (".nrrd", ".nhdr", ".mha", ".mhd")
#: Single-file ITK formats only: a two-file .mhd/.nhdr cannot be renamed into place atomically.
ITK_WRITE_SUFFIXES = (".nrrd", ".mha")
#: What nibabel raises on a file that is not NIfTI, a damaged header, or a gzip stream or voxel block cut short.
NIFTI_READ_ERRORS = (*DAMAGED_STREAM_ERRORS, ImageFileError, HeaderDataError)


def file_suffix(path: Path) -> str:
    name = path.name.lower()
    return ".nii.gz" if name.endswith(".nii.gz") else path.suffix.lower()


def _cast(array: np.ndarray, dtype, where: str | Path = "") -> np.ndarray:
    """``array`` as ``dtype`` (``None``: as it is). To an integer type values are rounded to the nearest integer,
    and values the type cannot hold are refused, naming ``where``: ``astype`` alone truncates 2.7 to 2 and wraps
    40000 HU to -25536 in int16 (64 in uint8), silently."""
    if dtype is None:
        return array
    dtype = np.dtype(dtype)
    if dtype.kind not in "iu" or array.dtype == dtype or array.dtype.kind == "b":
        return array.astype(dtype, copy=False)
    rounds = array.dtype.kind == "f"
    if array.size:
        low, high, limits = array.min(), array.max(), np.iinfo(dtype)  # NaN, if any, is the min and the max
        if rounds and not (np.isfinite(low) and np.isfinite(high)):
            raise ValueError(f"{where}: NaN or infinite voxel values cannot be stored as {dtype}; store float32")
        if rounds:
            low, high = np.rint(low), np.rint(high)
        if low < limits.min or high > limits.max:
            raise ValueError(f"{where}: voxel values {low:g}..{high:g} do not fit {dtype} "
                             f"({limits.min}..{limits.max}); store a wider type (float32)")
    if not rounds:
        return array.astype(dtype)
    cast = np.empty(array.shape, dtype)
    np.rint(array, out=cast, casting="unsafe")  # rounded straight into the new type: no float copy in between
    return cast


def _open_nifti(path: str | Path, limits: ResourceLimits):
    """The NIfTI image (header read, no voxel yet) and its voxel count, checked against ``limits``, its voxel
    spacing checked by :func:`~ctzoo.io.spacing.check_spacing`."""
    try:
        image = nib.load(str(path))
    except FileNotFoundError:  # an OSError, but not a damaged file: the callers say so as it is
        raise
    except NIFTI_READ_ERRORS as exc:
        raise _unreadable_nifti(path, exc) from exc
    header = image.header
    voxels = limits.check_voxels(header.get_data_shape(), Path(path).name)
    limits.check_decoded(voxels * header.get_data_dtype().itemsize, Path(path).stat().st_size, Path(path).name)
    _check_nifti_spacing(image, path)
    return image, voxels


class NoOrientation(ValueError):
    """A NIfTI whose header says nothing of where its voxels lie in the patient (qform_code = sform_code = 0)."""


def _check_nifti_spacing(image, path: str | Path) -> None:
    """Refuse a NIfTI whose voxel size or orientation is unknown, or whose voxel size is not a CT's. Without an sform
    the affine is built from ``pixdim``, which nibabel silently sets to 1 where the file has 0: that file's own pixdim
    is checked here. Without a qform or an sform nibabel invents an orientation (ITK another, flipped A/P): the
    file is refused rather than read in either."""
    if int(image.header["sform_code"]) == 0:
        with ImageOpener(str(path)) as stream:
            stored = type(image.header).from_fileobj(stream, check=False)["pixdim"][1:4]
        if not (np.all(np.isfinite(stored)) and np.all(stored != 0)):
            raise ImplausibleSpacing(f"{path}: the header gives no voxel size (pixdim {stored.tolist()} and no "
                                     "sform): refusing to guess the spacing")
        if int(image.header["qform_code"]) == 0:
            raise NoOrientation(f"{path}: the header gives no orientation (qform_code and sform_code are 0): refusing "
                                "to guess where the voxels lie; write the file with an affine (e.g. nibabel's "
                                "set_sform(affine, code=1), or convert it from DICOM again)")
    try:
        spacing, _, direction = geometry_from_affine(ras_to_lps_affine(image.affine))
    except (ValueError, np.linalg.LinAlgError) as exc:
        raise ImplausibleSpacing(f"{path}: the header's affine gives no voxel size: {error_reason(exc)}") from exc
    check_spacing(spacing, direction, str(path))


def read_nifti(path: str | Path, dtype=np.float32, limits: ResourceLimits = DEFAULT_LIMITS) -> Volume:
    """Read a 3-D NIfTI file (RAS affine) into a Volume (LPS); ``dtype=None`` keeps the stored type (labels).

    The header's dimensions are checked against ``limits`` before any voxel is read."""
    image, _ = _open_nifti(path, limits)
    try:
        data = np.asanyarray(image.dataobj)
    except NIFTI_READ_ERRORS as exc:
        raise _unreadable_nifti(path, exc) from exc
    if data.ndim == 4 and data.shape[3] == 1:
        data = data[..., 0]
    if data.ndim != 3:
        raise ValueError(f"{path}: a 3-D volume is needed, the file holds shape {data.shape}")
    spacing, origin, direction = geometry_from_affine(ras_to_lps_affine(image.affine))
    volume = Volume(_cast(np.ascontiguousarray(data.transpose(2, 1, 0)), dtype, path), spacing, origin, direction,
                    source_path=str(path))
    volume.warnings.extend(_shear_warnings(volume, SHEARED_NIFTI_NO_QFORM if int(image.header["qform_code"]) == 0
                                           else "") + _qform_sform_warnings(image.header))
    return volume


def _shear_warnings(volume: Volume, also: str = "") -> list[str]:
    """The warning a sheared grid (gantry tilt kept in the affine or direction matrix) gets, or none; ``also``: what
    else the file's reader must know of it."""
    if not volume.is_sheared:
        return []
    return [f"the affine is sheared (non-orthogonal axes, e.g. a gantry tilt); geometry kept as stored; slices are "
            f"{volume.slice_step_mm:.4g} mm apart perpendicular to them ({volume.spacing[2]:.4g} mm along the k axis) "
            f"and voxel volumes are |det| of the affine" + (f"; {also}" if also else "")]


#: How far apart (mm) the qform and the sform may put a voxel before the file is warned about.
QFORM_SFORM_TOLERANCE_MM = 0.1


def _qform_sform_warnings(header) -> list[str]:
    """The warning a NIfTI gets whose qform and sform (both set) put its voxels in different places, or none:
    ctzoo uses the sform, as nibabel does; ITK-based tools may use the qform (always, where the sform is sheared),
    so the same file reads mirrored, or shifted, there. Compared at the grid's corners: a qform cannot hold a
    shear, and one made from a sheared affine keeps the axes' directions but not where the far slices lie."""
    if int(header["qform_code"]) == 0 or int(header["sform_code"]) == 0:
        return []
    qform, sform = (orientation_code(geometry_from_affine(ras_to_lps_affine(affine))[2])
                    for affine in (header.get_qform(), header.get_sform()))
    if qform != sform:
        return [f"the qform ({qform}) and the sform ({sform}) orient the axes differently; the sform is used (as "
                "nibabel does); ITK-based tools (SimpleITK, 3D Slicer) may use the qform and show the volume mirrored"]
    shape = [*header.get_data_shape()[:3], 1, 1][:3]
    corners = np.array([[*corner, 1.0] for corner in itertools.product(*[(0, n - 1) for n in shape])])
    apart = float(np.linalg.norm((corners @ (header.get_qform() - header.get_sform()).T)[:, :3], axis=1).max())
    if apart <= QFORM_SFORM_TOLERANCE_MM:
        return []
    return [f"the qform and the sform put voxels up to {apart:.3g} mm apart (a qform cannot hold a shear, e.g. a "
            "gantry tilt); the sform is used (as nibabel does); ITK-based tools (SimpleITK, 3D Slicer) may use the "
            "qform and place the volume elsewhere"]


def _unreadable_nifti(path: str | Path, exc: BaseException) -> ValueError:
    return ValueError(f"{path}: not a readable NIfTI file (damaged or truncated?): {error_reason(exc)}")


def volume_from_sitk(image: sitk.Image, dtype=np.float32, source_path: str = "") -> Volume:
    """Wrap a 3-D scalar SimpleITK image (already LPS) as a Volume."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{source_path or 'image'}: a 3-D scalar volume is needed, got a "
                         f"{image.GetDimension()}-D image with {image.GetNumberOfComponentsPerPixel()} components")
    return Volume(_cast(sitk.GetArrayFromImage(image), dtype, source_path or "image"), image.GetSpacing(),
                  image.GetOrigin(), np.asarray(image.GetDirection()).reshape(3, 3), source_path=source_path)


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """The Volume as a SimpleITK image with the same LPS geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(volume.direction.ravel()))
    return image


def _itk_reason(exc: RuntimeError) -> str:
    """The line of an ITK exception that says what went wrong: its last, unless that is the ``Reason:`` ITK adds
    from the C library's last error, which after a failed read is stale ("No such file or directory" for a file
    that is there but cut short)."""
    lines = [line.strip() for line in str(exc).strip().splitlines() if line.strip()]
    if len(lines) > 1 and lines[-1].startswith("Reason:"):
        lines.pop()
    return lines[-1].removeprefix("ITK ERROR: ") if lines else "no reason given"


def itk_pixel_dtype(pixel_id: int) -> np.dtype:
    """The numpy type of one component of SimpleITK's pixel type ``pixel_id``."""
    return sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).dtype


def _itk_itemsize(pixel_id: int) -> int:
    return itk_pixel_dtype(pixel_id).itemsize


def _open_itk(path: str | Path, limits: ResourceLimits) -> tuple[sitk.ImageFileReader, int]:
    """A SimpleITK reader with the header read (no voxel yet) and its voxel count, checked against ``limits``;
    with ``limits.self_contained_only`` a header naming a separate data file is refused before SimpleITK sees it."""
    try:
        check_self_contained(path)
        received: int | None = Path(path).stat().st_size
    except UnsafeInput:
        if limits.self_contained_only:
            raise
        received = None  # a local .mhd/.nhdr: the voxels are in a file the user chose
    reader = sitk.ImageFileReader()
    reader.SetFileName(str(path))
    try:
        first_use_alone(f"itk:{Path(path).suffix.lower()}", reader.ReadImageInformation)
    except RuntimeError as exc:
        raise ValueError(f"{path}: SimpleITK cannot read it: {_itk_reason(exc)}") from exc
    voxels = limits.check_voxels((*reader.GetSize(), reader.GetNumberOfComponents()), Path(path).name)
    limits.check_decoded(voxels * _itk_itemsize(reader.GetPixelID()), received, Path(path).name)
    if reader.GetDimension() == 3:  # other dimensions are refused when the image is read
        check_spacing(reader.GetSpacing(), np.reshape(reader.GetDirection(), (3, 3)), str(path))
    return reader, voxels


def read_itk_image(path: str | Path, dtype=np.float32, limits: ResourceLimits = DEFAULT_LIMITS) -> Volume:
    """Read NRRD/MHA/MHD through SimpleITK (which converts any NRRD space to LPS); sizes checked as
    :func:`_open_itk` says before any voxel is read."""
    reader, voxels = _open_itk(path, limits)
    if Path(path).suffix.lower() in (".mha", ".mhd"):
        check_metaimage_data(path, voxels * _itk_itemsize(reader.GetPixelID()))
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ValueError(f"{path}: damaged or truncated: SimpleITK cannot read its voxels: {_itk_reason(exc)}") from exc
    volume = volume_from_sitk(image, dtype, str(path))
    volume.warnings.extend(_shear_warnings(volume))
    return volume


def declared_size(path: str | Path, limits: ResourceLimits = DEFAULT_LIMITS) -> tuple[int, int]:
    """``(voxels, slices)`` the NIfTI, NRRD/MHA file or DICOM zip at ``path`` declares, from its headers alone
    (nothing is decoded or extracted), checked against ``limits`` as the readers check it: what a service reserves
    memory for before reading. Slices are counted along the axis nearest the patient's S axis, as the models take
    them. A zip counts every DICOM image (and frame) it holds, whichever series would be chosen."""
    suffix = file_suffix(Path(path))
    if suffix in NIFTI_SUFFIXES:
        image, voxels = _open_nifti(path, limits)
        shape = image.header.get_data_shape()[:3]
        return voxels, int(shape[slice_axis(geometry_from_affine(image.affine)[2])]) if len(shape) == 3 else 1
    if suffix in ITK_READ_SUFFIXES:
        reader, voxels = _open_itk(path, limits)
        size = reader.GetSize()
        return voxels, int(size[slice_axis(np.reshape(reader.GetDirection(), (3, 3)))]) if len(size) == 3 else 1
    if suffix == ".zip":
        return zip_declared_size(path, limits)
    raise ValueError(f"{Path(path).name}: sizes are declared only by NIfTI, NRRD, MHA and zipped DICOM files")


def declared_voxels(path: str | Path, limits: ResourceLimits = DEFAULT_LIMITS) -> int:
    """How many voxels the file at ``path`` declares: :func:`declared_size`'s first number."""
    return declared_size(path, limits)[0]


#: What a NIfTI of a sheared volume lacks, said by :func:`written_file_warnings` and by the reader of such a file.
SHEARED_NIFTI_NO_QFORM = ("it has no qform (a qform holds a rotation, not a shear), so ITK-based tools (SimpleITK, "
                          "3D Slicer) refuse it; NRRD or MHA keeps the sheared geometry for every reader")


def write_volume(volume: Volume, path: str | Path, dtype=None) -> Path:
    """Write ``volume`` as NIfTI (.nii/.nii.gz, RAS affine, qform and sform set: a sheared one the sform only)
    or NRRD/MHA (LPS).

    ``dtype`` casts the voxels (e.g. ``np.int16`` for HU, ``np.uint8`` for labels), rounding to an integer type
    and refusing values it cannot hold (``ValueError``); default keeps them. A sheared volume (gantry tilt kept in
    the geometry) gets no qform, which would misplace it (:func:`written_file_warnings`). A target that cannot be
    written is an ``OSError`` naming ``path``.
    """
    path = Path(path)
    suffix = file_suffix(path)
    if suffix not in NIFTI_SUFFIXES + ITK_WRITE_SUFFIXES:
        raise ValueError(f"{path}: cannot write {suffix or 'files without a suffix'}; "
                         f"use one of {', '.join(NIFTI_SUFFIXES + ITK_WRITE_SUFFIXES)}")
    array = _cast(volume.array, dtype, path)
    with atomic_path(path) as temporary:
        if suffix in NIFTI_SUFFIXES:
            affine = volume.affine_ras
            image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
            # nibabel's set_qform turns a sheared affine into the nearest rotation, silently; ITK then reads that
            # qform (it takes no non-orthonormal sform) and puts voxels tens of mm from where they are
            image.set_qform(None if volume.is_sheared else affine, code=0 if volume.is_sheared else 1)
            image.set_sform(affine, code=1)
            image.header.set_xyzt_units("mm")
            nib.save(image, str(temporary))
        else:
            _write_itk(volume_to_sitk(volume.with_array(array)), temporary, path)
    return path


def written_file_warnings(volume: Volume, path: str | Path) -> list[str]:
    """What the file :func:`write_volume` writes for ``volume`` at ``path`` cannot keep, for the user to hear."""
    if file_suffix(Path(path)) in NIFTI_SUFFIXES and volume.is_sheared:
        return [f"the volume is sheared (e.g. a gantry tilt): the NIfTI keeps its geometry in the sform only; "
                f"{SHEARED_NIFTI_NO_QFORM}"]
    return []


#: The system's reasons for a failed write, as ITK's messages quote them (it raises RuntimeError, not OSError).
_REASONS = {os.strerror(code): code for code in (errno.EACCES, errno.EPERM, errno.EROFS, errno.ENOSPC,
                                                 errno.EDQUOT, errno.EFBIG, errno.ENOENT, errno.ENOTDIR)}


def _write_itk(image: sitk.Image, temporary: Path, target: Path) -> None:
    """``sitk.WriteImage`` with ITK's RuntimeError as the ``OSError`` (errno and reason from ITK's message) that
    :func:`~ctzoo.io.atomic.atomic_path` renames to the target, so callers catching OSError see a failed write."""
    try:
        sitk.WriteImage(image, str(temporary), useCompression=True)
    except RuntimeError as exc:
        message = str(exc)
        code = next((code for reason, code in _REASONS.items() if reason in message), errno.EIO)
        reason = os.strerror(code) if code != errno.EIO else f"SimpleITK cannot write it: {_itk_reason(exc)}"
        raise OSError(code, reason.replace(str(temporary), str(target)), str(temporary)) from exc


def read_volume(path: str | Path, series: str | None = None, rules: SeriesRules | None = None,
                dtype=np.float32, progress: bool = True, limits: ResourceLimits = DEFAULT_LIMITS,
                decoder: str | None = None, recursive: bool = True) -> Volume:
    """Read any CT input ctzoo accepts into a Volume.

    * a folder or ``.zip`` of DICOM files: the series chosen by ``series``/``rules``
      (see :func:`ctzoo.io.dicom_series.read_dicom_series`);
    * one DICOM file: the series it belongs to, from its folder;
    * ``.nii``/``.nii.gz`` (nibabel) and ``.nrrd``/``.nhdr``/``.mha``/``.mhd`` (SimpleITK).

    Sizes declared by headers (and a zip's inflated size) are checked against ``limits`` before allocating
    (:mod:`ctzoo.io.limits`); a refusal is :class:`~ctzoo.io.limits.LimitExceeded`. ``decoder`` decodes DICOM's
    JPEG 2000 (``None``/``gdcm``, or ``nvimgcodec:DEVICE``: :mod:`ctzoo.io.nvimgcodec_decode`). ``recursive=False``
    reads a folder's own files only, not its subfolders'.
    """
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file or folder")
    suffix = file_suffix(path)
    if path.is_dir() or suffix == ".zip":
        volume = read_dicom_series(path, series=series, rules=rules, progress=progress, limits=limits,
                                   decoder=decoder, recursive=recursive)
        volume.array = _cast(volume.array, dtype, path)
        return volume
    if suffix in NIFTI_SUFFIXES:
        return read_nifti(path, dtype, limits)
    if suffix in ITK_READ_SUFFIXES:
        return read_itk_image(path, dtype, limits)
    header = read_header(str(path))
    if header is None:
        raise ValueError(f"{path}: not a format ctzoo reads (DICOM folder/zip, NIfTI, NRRD, MHA/MHD)")
    if header.corrupt_reason or header.not_image_reason:
        raise DicomError(f"{path}: {header.corrupt_reason or header.not_image_reason}")
    volume = read_dicom_series(path.parent, series=series or header.series_key, rules=rules, progress=progress,
                               limits=limits, decoder=decoder)
    volume.array = _cast(volume.array, dtype, path)
    return volume
