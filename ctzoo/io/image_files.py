"""NIfTI (nibabel), NRRD/MHA (SimpleITK) and the one entry point that reads any CT input.

Files are written atomically: to a temporary name in the target folder, then
renamed, so an interrupted write never leaves a half-written volume behind.
"""

from __future__ import annotations

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


def _cast(array: np.ndarray, dtype) -> np.ndarray:
    return array if dtype is None else array.astype(dtype, copy=False)


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
    volume = Volume(_cast(np.ascontiguousarray(data.transpose(2, 1, 0)), dtype), spacing, origin, direction,
                    source_path=str(path))
    volume.warnings.extend(_shear_warnings(volume) + _qform_sform_warnings(image.header))
    return volume


def _shear_warnings(volume: Volume) -> list[str]:
    """The warning a sheared grid (gantry tilt kept in the affine or direction matrix) gets, or none."""
    if not volume.is_sheared:
        return []
    return [f"the affine is sheared (non-orthogonal axes, e.g. a gantry tilt); geometry kept as stored; slices are "
            f"{volume.slice_step_mm:.4g} mm apart perpendicular to them ({volume.spacing[2]:.4g} mm along the k axis) "
            f"and voxel volumes are |det| of the affine"]


def _qform_sform_warnings(header) -> list[str]:
    """The warning a NIfTI gets whose qform and sform (both set) point its axes different ways, or none: ctzoo
    uses the sform, as nibabel does; ITK-based tools may use the qform, so the same file reads mirrored there."""
    if int(header["qform_code"]) == 0 or int(header["sform_code"]) == 0:
        return []
    qform, sform = (orientation_code(geometry_from_affine(ras_to_lps_affine(affine))[2])
                    for affine in (header.get_qform(), header.get_sform()))
    if qform == sform:
        return []
    return [f"the qform ({qform}) and the sform ({sform}) orient the axes differently; the sform is used (as nibabel "
            "does); ITK-based tools (SimpleITK, 3D Slicer) may use the qform and show the volume mirrored"]


def _unreadable_nifti(path: str | Path, exc: BaseException) -> ValueError:
    return ValueError(f"{path}: not a readable NIfTI file (damaged or truncated?): {error_reason(exc)}")


def volume_from_sitk(image: sitk.Image, dtype=np.float32, source_path: str = "") -> Volume:
    """Wrap a 3-D scalar SimpleITK image (already LPS) as a Volume."""
    if image.GetDimension() != 3 or image.GetNumberOfComponentsPerPixel() != 1:
        raise ValueError(f"{source_path or 'image'}: a 3-D scalar volume is needed, got a "
                         f"{image.GetDimension()}-D image with {image.GetNumberOfComponentsPerPixel()} components")
    return Volume(_cast(sitk.GetArrayFromImage(image), dtype), image.GetSpacing(), image.GetOrigin(),
                  np.asarray(image.GetDirection()).reshape(3, 3), source_path=source_path)


def volume_to_sitk(volume: Volume) -> sitk.Image:
    """The Volume as a SimpleITK image with the same LPS geometry."""
    image = sitk.GetImageFromArray(np.ascontiguousarray(volume.array))
    image.SetSpacing(volume.spacing)
    image.SetOrigin(volume.origin)
    image.SetDirection(tuple(volume.direction.ravel()))
    return image


def _itk_itemsize(pixel_id: int) -> int:
    return sitk.GetArrayViewFromImage(sitk.Image([1, 1], pixel_id)).dtype.itemsize


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
        raise ValueError(f"{path}: SimpleITK cannot read it: {str(exc).strip().splitlines()[-1]}") from exc
    voxels = limits.check_voxels((*reader.GetSize(), reader.GetNumberOfComponents()), Path(path).name)
    limits.check_decoded(voxels * _itk_itemsize(reader.GetPixelID()), received, Path(path).name)
    if reader.GetDimension() == 3:  # other dimensions are refused when the image is read
        check_spacing(reader.GetSpacing(), np.reshape(reader.GetDirection(), (3, 3)), str(path))
    return reader, voxels


def read_itk_image(path: str | Path, dtype=np.float32, limits: ResourceLimits = DEFAULT_LIMITS) -> Volume:
    """Read NRRD/MHA/MHD through SimpleITK (which converts any NRRD space to LPS); sizes checked as
    :func:`_open_itk` says before any voxel is read."""
    reader, _ = _open_itk(path, limits)
    try:
        image = reader.Execute()
    except RuntimeError as exc:
        raise ValueError(f"{path}: SimpleITK cannot read it: {str(exc).strip().splitlines()[-1]}") from exc
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


def write_volume(volume: Volume, path: str | Path, dtype=None) -> Path:
    """Write ``volume`` as NIfTI (.nii/.nii.gz, RAS affine, qform and sform set) or NRRD/MHA (LPS).

    ``dtype`` casts the voxels (e.g. ``np.int16`` for HU, ``np.uint8`` for labels); default keeps them.
    """
    path = Path(path)
    suffix = file_suffix(path)
    if suffix not in NIFTI_SUFFIXES + ITK_WRITE_SUFFIXES:
        raise ValueError(f"{path}: cannot write {suffix or 'files without a suffix'}; "
                         f"use one of {', '.join(NIFTI_SUFFIXES + ITK_WRITE_SUFFIXES)}")
    array = _cast(volume.array, dtype)
    with atomic_path(path) as temporary:
        if suffix in NIFTI_SUFFIXES:
            affine = volume.affine_ras
            image = nib.Nifti1Image(np.ascontiguousarray(array.transpose(2, 1, 0)), affine)
            image.set_qform(affine, code=1)
            image.set_sform(affine, code=1)
            image.header.set_xyzt_units("mm")
            nib.save(image, str(temporary))
        else:
            sitk.WriteImage(volume_to_sitk(volume.with_array(array)), str(temporary), useCompression=True)
    return path


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
        volume.array = _cast(volume.array, dtype)
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
    volume.array = _cast(volume.array, dtype)
    return volume
