"""Resource limits checked from headers before anything is allocated (ctzoo.io.limits) and the service's
in-flight budget (ctzoo.serve.budget)."""

from __future__ import annotations

import asyncio
import gzip
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from upload_builders import mha_header, nifti_header

from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.io import LimitExceeded, ResourceLimits, UnsafeInput, read_volume
from ctzoo.io.image_files import declared_voxels
from ctzoo.io.limits import check_self_contained

SMALL = ResourceLimits(max_volume_voxels=1_000_000, max_decoded_mb=16, max_inflate_ratio=10)


def test_header_sizes_are_refused_before_reading(tmp_path):
    huge = tmp_path / "huge.nii.gz"
    huge.write_bytes(gzip.compress(nifti_header((2048, 2048, 2048))))
    with pytest.raises(LimitExceeded, match="2048 x 2048 x 2048 = 8,589,934,592 voxels.*--max-volume-voxels"):
        read_volume(huge)
    image = sitk.GetImageFromArray(np.zeros((64, 128, 128), np.int16))
    sitk.WriteImage(image, str(tmp_path / "ok.nrrd"), useCompression=True)
    assert declared_voxels(tmp_path / "ok.nrrd") == 64 * 128 * 128
    with pytest.raises(LimitExceeded, match="--max-volume-voxels"):
        read_volume(tmp_path / "ok.nrrd", limits=SMALL)


def test_inflation_ratio_and_decoded_bytes(tmp_path):
    zeros = tmp_path / "zeros.nii.gz"
    zeros.write_bytes(gzip.compress(nifti_header((256, 256, 600)) + bytes(256 * 256 * 600 * 2)))
    with pytest.raises(LimitExceeded, match="more than 100 times its size.*--max-inflate-ratio"):
        read_volume(zeros)
    assert read_volume(zeros, limits=ResourceLimits(max_inflate_ratio=1e6)).array.shape == (600, 256, 256)
    with pytest.raises(LimitExceeded, match="--max-decoded-mb"):
        read_volume(zeros, limits=ResourceLimits(max_decoded_mb=32, max_inflate_ratio=1e6))


def test_zip_limits_apply_before_extracting(tmp_path):
    bomb = tmp_path / "bomb.zip"
    with zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("a.dcm", bytes(80 << 20))
    with pytest.raises(LimitExceeded, match="--max-inflate-ratio"):
        read_volume(bomb)
    series = tmp_path / "series.zip"
    with zipfile.ZipFile(series, "w") as archive:
        for file in sorted(Path(sample_ct_dicom()).iterdir()):
            archive.write(file, file.name)
    assert declared_voxels(series) == 20 * 512 * 512
    with pytest.raises(LimitExceeded, match="--max-volume-voxels"):
        declared_voxels(series, SMALL)
    with pytest.raises(LimitExceeded, match="--max-volume-voxels"):
        read_volume(series, limits=SMALL)  # the series' own check, after scanning, before decoding


def test_detached_data_headers_are_refused_for_uploads_only(tmp_path):
    for name, text in [("a.mha", mha_header("/etc/passwd", "4 4 4")),
                       ("b.nrrd", b"NRRD0004\ntype: short\ndimension: 3\nsizes: 4 4 4\ndata file: x.raw\n\n")]:
        (tmp_path / name).write_bytes(text)
        with pytest.raises(UnsafeInput, match="separate data file") as refused:
            check_self_contained(tmp_path / name)
        assert "/etc/passwd" not in str(refused.value) and "x.raw" not in str(refused.value)
        with pytest.raises(UnsafeInput):
            read_volume(tmp_path / name, limits=ResourceLimits(self_contained_only=True))
    local = tmp_path / "local.mhd"  # the user's own two-file MetaImage is fine for ctzoo infer
    sitk.WriteImage(sitk.GetImageFromArray(np.ones((3, 4, 5), np.int16)), str(local))
    assert read_volume(local).array.shape == (3, 4, 5)
    with pytest.raises(UnsafeInput):
        read_volume(local, limits=ResourceLimits(self_contained_only=True))


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc for the peak RSS")
def test_truncated_jpeg2000_slice_fails_fast_without_a_memory_spike(tmp_path):
    """GDCM allocates about 1 GB before failing on a truncated JPEG 2000 file; the reader refuses it first."""
    folder = tmp_path / "series"
    folder.mkdir()
    for k, file in enumerate(sorted(Path(sample_ct_dicom()).iterdir())):
        data = file.read_bytes()
        (folder / f"{k:03d}.dcm").write_bytes(data[: len(data) // 3] if k == 5 else data)
    # VmHWM, not ru_maxrss: Linux carries the forked parent's (pytest's) peak into ru_maxrss across exec
    code = ("import sys\nfrom pathlib import Path\nfrom ctzoo.io import read_volume\n"
            "try:\n    read_volume(sys.argv[1], progress=False)\nexcept Exception as exc:\n    print(exc)\n"
            "print(int(Path('/proc/self/status').read_text().split('VmHWM:')[1].split()[0]) // 1024)")
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code, str(folder)], capture_output=True, text=True,
                         check=True).stdout.strip().splitlines()
    assert "truncated" in out[0] and "005.dcm" in out[0]
    assert int(out[-1]) < 700, f"peak RSS {out[-1]} MB"


def test_budget_waits_then_503_with_retry_after_and_413_when_it_never_fits():
    from ctzoo.serve.budget import InflightBudget, ServeLimits
    from ctzoo.serve.v2_codec import ServeError

    budget = InflightBudget(ServeLimits(max_inflight_mb=1, queue_wait_s=0.2, max_requests_per_model=1))

    async def scenario():
        with pytest.raises(ServeError) as never:
            async with budget.reserve(2 << 20, "the study"):
                pass
        assert never.value.status == 413 and "--max-inflight-mb" in str(never.value)
        async with budget.reserve(700 << 10, "a"):
            with pytest.raises(ServeError) as busy:
                async with budget.reserve(700 << 10, "b"):
                    pass
            assert busy.value.status == 503 and busy.value.headers["Retry-After"] == "1"
        async with budget.reserve(700 << 10, "b"):  # freed: fits now
            pass
        async with budget.slot("m"):
            with pytest.raises(ServeError) as full:
                async with budget.slot("m"):
                    pass
            assert full.value.status == 503

    asyncio.run(scenario())
    assert budget.reserved == 0


def test_tensor_limits_refuse_before_building():
    from ctzoo.serve.budget import ServeLimits
    from ctzoo.serve.v2_codec import ServeError, decode_request

    limits = ServeLimits()
    body = b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [1, 9, 3776, 3776], "data": []}]}'
    with pytest.raises(ServeError, match="--max-tensor-side") as refused:
        decode_request(body, None, limits.check_tensor_shape)
    assert refused.value.status == 413
    body = b'{"inputs": [{"name": "image", "datatype": "FP32", "shape": [64, 9, 512, 512], "data": []}]}'
    with pytest.raises(ServeError, match="--max-tensor-elements"):
        decode_request(body, None, limits.check_tensor_shape)


def _empty_members_zip(path: Path, count: int) -> Path:
    with zipfile.ZipFile(path, "w") as archive:
        for k in range(count):
            archive.writestr(f"e/{k:05d}", b"")
    return path


def test_a_zip_of_many_empty_members_is_refused_from_its_directory(tmp_path):
    """Empty members declare 0 bytes, so neither --max-decoded-mb nor --max-inflate-ratio stopped 100,000 of them
    (40 s and 100,000 files); the member count is checked first, by the header count and by the reader."""
    many = _empty_members_zip(tmp_path / "many.zip", 60)
    limits = ResourceLimits(max_zip_members=50)
    with pytest.raises(LimitExceeded, match="many.zip holds 60 members, over the limit of 50 per archive "
                                            r"\(raise it with --max-zip-members\)"):
        declared_voxels(many, limits)
    with pytest.raises(LimitExceeded, match="--max-zip-members"):  # not "no DICOM files found" after extracting
        read_volume(many, limits=limits)
    with pytest.raises(ValueError, match="no DICOM files found"):  # within the limit: read (and no series)
        read_volume(_empty_members_zip(tmp_path / "few.zip", 50), limits=limits)


def test_a_zip_with_two_members_of_one_name_is_refused_not_one_slice_silently_replaced(tmp_path):
    """The second 000.dcm (slice 1's content) overwrote slice 0: a 19-slice volume and a 200."""
    import warnings

    from ctzoo.io.dicom_scan import DicomError

    files = sorted(Path(sample_ct_dicom()).iterdir())
    series = tmp_path / "series.zip"
    with zipfile.ZipFile(series, "w") as archive, warnings.catch_warnings():
        warnings.simplefilter("ignore")  # zipfile's "Duplicate name" warning
        for k, file in enumerate(files):
            archive.write(file, f"{k:03d}.dcm")
        archive.write(files[1], "000.dcm")
    with pytest.raises(DicomError, match="series.zip: the archive holds two members named '000.dcm'"):
        read_volume(series)


def test_ctzoo_infer_applies_the_limits_from_its_options(tmp_path):
    """A case over --max-volume-voxels fails in summary.csv with the option named; exit status 1."""
    import csv

    from click.testing import CliRunner

    from ctzoo.cli import main
    from ctzoo.io import write_volume
    from ctzoo.io.volume import Volume

    path = write_volume(Volume(np.zeros((4, 64, 64), np.float32), (1.0, 1.0, 2.0)), tmp_path / "small.nii.gz")
    result = CliRunner().invoke(main, ["infer", str(path), "--out", str(tmp_path / "out"), "--workers", "0",
                                       "--max-volume-voxels", "1000"])
    assert result.exit_code == 1, result.output
    [row] = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert row["status"] == "error" and "--max-volume-voxels" in row["error"]
    result = CliRunner().invoke(main, ["infer", str(_empty_members_zip(tmp_path / "many.zip", 30)), "--out",
                                       str(tmp_path / "zip-out"), "--workers", "0", "--max-zip-members", "20"])
    assert result.exit_code == 1, result.output
    [row] = list(csv.DictReader((tmp_path / "zip-out" / "summary.csv").open()))
    assert row["status"] == "error" and "holds 30 members" in row["error"] and "--max-zip-members" in row["error"]


def _nifti(path: Path, spacing: tuple[float, float, float], shape=(32, 32, 1)) -> Path:
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros(shape, np.int16), np.diag([*spacing, 1.0])), str(path))
    return path


@pytest.mark.parametrize("spacing", [(1875.0, 1875.0, 1875.0), (1e30, 1e30, 2.0), (1e-3, 1e-3, 2.0),
                                     (0.7, 0.7, 500.0)], ids=["1875mm", "1e30mm", "1um", "slices-500mm-apart"])
def test_implausible_voxel_spacings_are_refused_from_the_header(tmp_path, spacing):
    """A 1.7 KB NIfTI at 1875 mm per voxel made a segmenter resample its 32 x 32 slice to 30,000 x 30,000 (~5 GB):
    a spacing no CT has is refused from the header, before anything is allocated (declared_size is what the
    service reserves memory by), by every reader."""
    from ctzoo.io import ImplausibleSpacing
    from ctzoo.io.image_files import declared_size

    path = _nifti(tmp_path / "odd.nii.gz", spacing)
    with pytest.raises(ImplausibleSpacing, match=r"odd.nii.gz: voxel spacing .* mm is not a CT's \((in-plane|slice) "
                                                 r"spacing must lie within"):
        declared_size(path)
    with pytest.raises(ImplausibleSpacing):
        read_volume(path)
    mha = tmp_path / "odd.mha"
    image = sitk.GetImageFromArray(np.zeros((2, 8, 8), np.int16))
    image.SetSpacing(spacing)
    sitk.WriteImage(image, str(mha))
    with pytest.raises(ImplausibleSpacing, match="odd.mha: voxel spacing"):
        read_volume(mha)


def test_implausible_dicom_pixel_spacing_is_refused_before_decoding(tmp_path):
    from dicom_factory import SeriesSpec, make_slices, write_series

    from ctzoo.io import ImplausibleSpacing

    write_series(tmp_path / "wide", SeriesSpec(make_slices(3), pixel_spacing=(80.0, 80.0)))
    with pytest.raises(ImplausibleSpacing, match=r"wide: voxel spacing 80 x 80 x 2.5 mm is not a CT's"):
        read_volume(tmp_path / "wide", progress=False)
    write_series(tmp_path / "fine", SeriesSpec(make_slices(3), pixel_spacing=(0.3, 0.3)))
    assert read_volume(tmp_path / "fine", progress=False).spacing == pytest.approx((0.3, 0.3, 2.5))


def test_nifti_without_a_voxel_size_is_refused_not_measured_at_1mm(tmp_path):
    """pixdim 0 and no qform or sform: nibabel sets the voxel size to 1 mm, which the reader used to measure with;
    it is refused instead. The same file with its pixdim and a qform, and one with an sform (which gives the size),
    are read."""
    import struct

    good = _nifti(tmp_path / "good.nii", (0.7, 0.7, 2.5), shape=(8, 8, 2))
    raw = bytearray(good.read_bytes())
    struct.pack_into("<hh", raw, 252, 1, 0)  # qform_code, sform_code
    (tmp_path / "pixdim-only.nii").write_bytes(bytes(raw))  # the qform's voxel size is pixdim
    assert read_volume(tmp_path / "pixdim-only.nii").spacing == pytest.approx((0.7, 0.7, 2.5))
    struct.pack_into("<hh", raw, 252, 0, 0)
    struct.pack_into("<3f", raw, 80, 0.0, 0.0, 0.0)  # pixdim[1:4]
    (tmp_path / "no-size.nii").write_bytes(bytes(raw))
    from ctzoo.io import ImplausibleSpacing
    from ctzoo.io.image_files import declared_size

    for call in (read_volume, declared_size):
        with pytest.raises(ImplausibleSpacing, match=r"no-size.nii: the header gives no voxel size \(pixdim "
                                                     r"\[0.0, 0.0, 0.0\] and no sform\)"):
            call(tmp_path / "no-size.nii")
    struct.pack_into("<hh", raw, 252, 0, 1)  # an sform: the srow vectors give the size, pixdim does not matter
    (tmp_path / "sform.nii").write_bytes(bytes(raw))
    assert read_volume(tmp_path / "sform.nii").spacing == pytest.approx((0.7, 0.7, 2.5))


def test_declared_size_counts_slices_along_the_head_foot_axis(tmp_path):
    from ctzoo.io.image_files import declared_size

    assert declared_size(_nifti(tmp_path / "axial.nii.gz", (1.0, 1.0, 2.0), shape=(4, 5, 6))) == (120, 6)
    sagittal = tmp_path / "sagittal.nii.gz"
    import nibabel as nib

    nib.save(nib.Nifti1Image(np.zeros((4, 5, 6), np.int16), np.array([[0, 0, 1.0, 0], [0, 1.0, 0, 0],
                                                                       [1.0, 0, 0, 0], [0, 0, 0, 1]])), str(sagittal))
    assert declared_size(sagittal) == (120, 4)  # i runs head-foot
    series = tmp_path / "series.zip"
    with zipfile.ZipFile(series, "w") as archive:
        for file in sorted(Path(sample_ct_dicom()).iterdir()):
            archive.write(file, file.name)
    assert declared_size(series) == (20 * 512 * 512, 20)
