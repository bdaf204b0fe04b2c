"""NIfTI and NRRD/MHA both ways, the LPS/RAS convention, atomic writes, and damaged files as clear errors."""

import os
import re
import shutil
import subprocess

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk
from dicom_factory import SeriesSpec, make_slices, write_series

from ctzoo.io import Volume, read_volume, write_volume
from ctzoo.io.orientation import (
    LPS_RAS_FLIP,
    lps_to_ras_affine,
    orientation_code,
    ras_to_lps_affine,
)


def oblique_nifti(path, dtype=np.int16):
    """A NIfTI with a rotated, flipped, anisotropic affine and known values."""
    rng = np.random.default_rng(4)
    data = rng.integers(-1024, 2000, size=(7, 6, 5)).astype(dtype)
    angle = np.deg2rad(20)
    rotation = np.array([[np.cos(angle), -np.sin(angle), 0], [np.sin(angle), np.cos(angle), 0], [0, 0, 1]])
    affine = np.eye(4)
    affine[:3, :3] = rotation @ np.diag([-0.8, 1.1, 2.5])
    affine[:3, 3] = [12.5, -30.25, 101.0]
    image = nib.Nifti1Image(data, affine)
    image.set_qform(affine, code=1)
    image.set_sform(affine, code=1)
    nib.save(image, str(path))
    return data, affine


def test_nifti_volume_nifti_roundtrip(tmp_path):
    data, affine = oblique_nifti(tmp_path / "in.nii.gz")
    volume = read_volume(tmp_path / "in.nii.gz")
    assert volume.array.shape == data.shape[::-1]  # (z, y, x)
    assert volume.array[4, 3, 2] == data[2, 3, 4]
    np.testing.assert_allclose(volume.affine_ras, affine, atol=1e-5)
    write_volume(volume, tmp_path / "out.nii.gz", dtype=np.int16)
    again = nib.load(str(tmp_path / "out.nii.gz"))
    np.testing.assert_allclose(again.affine, affine, atol=1e-4)
    np.testing.assert_allclose(again.get_qform(), affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(again.dataobj), data)
    assert again.header.get_xyzt_units()[0] == "mm"


def test_dicom_volume_nifti_keeps_geometry_and_values(tmp_path):
    orientation = (0.0, 1.0, 0.0, 0.0, 0.0, -1.0)  # sagittal with a negative cosine
    spec = SeriesSpec(make_slices(5, orientation=orientation), orientation=orientation)
    write_series(tmp_path / "dicom", spec, shuffle_seed=2)
    volume = read_volume(tmp_path / "dicom", series=spec.series_uid)
    write_volume(volume, tmp_path / "ct.nii.gz")
    nifti = nib.load(str(tmp_path / "ct.nii.gz"))
    np.testing.assert_allclose(nifti.affine, lps_to_ras_affine(volume.affine_lps), atol=1e-4)
    # every slice's first voxel lands on its DICOM position (RAS = LPS with x, y negated)
    data = np.asanyarray(nifti.dataobj)
    normal = np.cross(orientation[:3], orientation[3:])
    for k, s in enumerate(sorted(spec.slices, key=lambda s: float(np.dot(s.position, normal)))):
        ras = nifti.affine @ np.array([0, 0, k, 1.0])
        np.testing.assert_allclose(ras[:3], np.asarray(s.position) * [-1, -1, 1], atol=1e-4)
        np.testing.assert_allclose(data[:, :, k].T, s.hu, atol=1e-4)
    back = read_volume(tmp_path / "ct.nii.gz")
    np.testing.assert_allclose(back.affine_lps, volume.affine_lps, atol=1e-4)
    np.testing.assert_array_equal(back.array, volume.array)


def test_sample_dicom_to_nifti_agrees_with_simpleitk(tmp_path, sample_dir, sample_volume):
    """Our NIfTI of the real sample equals what SimpleITK's own series reader + NIfTI writer produce."""
    write_volume(sample_volume, tmp_path / "ours.nii.gz", dtype=np.int16)
    reader = sitk.ImageSeriesReader()
    reader.SetFileNames(reader.GetGDCMSeriesFileNames(str(sample_dir)))
    sitk.WriteImage(reader.Execute(), str(tmp_path / "itk.nii.gz"))
    ours, theirs = nib.load(str(tmp_path / "ours.nii.gz")), nib.load(str(tmp_path / "itk.nii.gz"))
    np.testing.assert_allclose(ours.affine, theirs.affine, atol=1e-4)
    np.testing.assert_array_equal(np.asanyarray(ours.dataobj), np.asanyarray(theirs.dataobj))
    assert nib.aff2axcodes(ours.affine) == ("L", "P", "S")


@pytest.mark.parametrize("suffix", [".nrrd", ".mha"])
def test_itk_formats_roundtrip(tmp_path, suffix):
    _, affine = oblique_nifti(tmp_path / "in.nii.gz")
    volume = read_volume(tmp_path / "in.nii.gz")
    write_volume(volume, tmp_path / f"out{suffix}")
    again = read_volume(tmp_path / f"out{suffix}")
    np.testing.assert_allclose(again.affine_ras, affine, atol=1e-5)
    np.testing.assert_array_equal(again.array, volume.array)
    image = sitk.ReadImage(str(tmp_path / f"out{suffix}"))  # what another ITK tool sees: LPS
    np.testing.assert_allclose(image.TransformIndexToPhysicalPoint((1, 2, 3)),
                               (ras_to_lps_affine(affine) @ [1, 2, 3, 1])[:3], atol=1e-4)


def test_lps_ras_conversion_is_one_flip():
    affine = np.arange(16, dtype=float).reshape(4, 4)
    affine[3] = [0, 0, 0, 1]
    assert np.array_equal(ras_to_lps_affine(lps_to_ras_affine(affine)), affine)
    assert np.array_equal(lps_to_ras_affine(np.eye(4)), LPS_RAS_FLIP)
    assert orientation_code(np.eye(3)) == "LPS"
    assert orientation_code(np.diag([-1.0, -1.0, 1.0])) == "RAS"


def test_write_is_atomic_and_rejects_unknown_suffix(tmp_path, monkeypatch):
    volume = Volume(np.zeros((2, 3, 4), np.float32), (1.0, 1.0, 1.0))
    with pytest.raises(ValueError, match="cannot write .png"):
        write_volume(volume, tmp_path / "x.png")
    target = tmp_path / "ct.nii.gz"
    write_volume(volume, target)
    before = target.read_bytes()

    def interrupted(image, filename):
        open(filename, "wb").write(b"half")
        raise KeyboardInterrupt

    monkeypatch.setattr(nib, "save", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_volume(volume.with_array(np.ones((2, 3, 4), np.float32)), target)
    assert target.read_bytes() == before  # the old file is intact
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ct.nii.gz"]  # and no partial file is left


def test_bad_inputs_have_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no such file"):
        read_volume(tmp_path / "missing.nii.gz")
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(ValueError, match="not a format ctzoo reads"):
        read_volume(tmp_path / "notes.txt")
    nib.save(nib.Nifti1Image(np.zeros((3, 3, 3, 2), np.float32), np.eye(4)), str(tmp_path / "4d.nii.gz"))
    with pytest.raises(ValueError, match="a 3-D volume is needed"):
        read_volume(tmp_path / "4d.nii.gz")
    with pytest.raises(ValueError, match="must be 3-D"):
        Volume(np.zeros((3, 3)), (1, 1, 1))


def _damaged_nifti(folder, damage):
    """A 32^3 int16 NIfTI (random values: gzip cannot shrink them much) damaged as ``damage`` names."""
    rng = np.random.default_rng(0)
    image = nib.Nifti1Image(rng.integers(-1024, 2000, size=(32, 32, 32)).astype(np.int16), np.eye(4))
    suffix = ".nii" if damage == "cut-short-uncompressed" else ".nii.gz"
    whole = folder / f"whole{suffix}"
    nib.save(image, str(whole))
    data = bytearray(whole.read_bytes())
    if damage == "not-gzip":
        data = bytearray(b"garbage")
    elif damage.startswith("cut-short"):
        data = data[: len(data) * 2 // 3]
    elif damage == "bad-deflate-block":
        data[len(data) // 2:len(data) // 2 + 16] = b"\xff" * 16
    elif damage == "bad-crc":
        data[len(data) // 2] ^= 0xFF
    damaged = folder / f"{damage}{suffix}"
    damaged.write_bytes(bytes(data))
    return damaged


#: Each damage, and what the error must say of it (from the exception it used to escape as).
NIFTI_DAMAGE = {
    "not-gzip": "is not a gzip file",  # nibabel's ImageFileError
    "cut-short": "Compressed file ended before the end-of-stream marker",  # EOFError
    "cut-short-uncompressed": r"Expected 65536 bytes, got \d+ bytes",  # OSError
    "bad-deflate-block": "Error -3 while decompressing data",  # zlib.error
    "bad-crc": "CRC check failed",  # gzip.BadGzipFile
}


@pytest.mark.parametrize("damage", list(NIFTI_DAMAGE))
def test_damaged_nifti_is_a_one_line_error_naming_the_file(tmp_path, damage):
    from ctzoo.io.image_files import declared_voxels

    damaged = _damaged_nifti(tmp_path, damage)
    expected = rf"^{re.escape(str(damaged))}: not a readable NIfTI file .*{NIFTI_DAMAGE[damage]}"
    with pytest.raises(ValueError, match=expected) as raised:
        read_volume(damaged)
    assert "\n" not in str(raised.value)
    if damage == "not-gzip":  # the header is read before anything is allocated: the same error there
        with pytest.raises(ValueError, match="not a readable NIfTI file"):
            declared_voxels(damaged)
    with pytest.raises(FileNotFoundError):  # a missing file is not called damaged
        read_volume(tmp_path / "missing.nii.gz")


def test_damaged_zip_is_a_dicom_error_naming_the_archive_and_member(tmp_path):
    """A byte flipped inside a member: zipfile's Bad CRC-32 becomes one line naming the zip and the member."""
    import zipfile

    from ctzoo.io import DicomError

    paths = write_series(tmp_path / "series", SeriesSpec(make_slices(3, rows=64, columns=64)))
    archive = tmp_path / "series.zip"
    with zipfile.ZipFile(archive, "w", compression=zipfile.ZIP_STORED) as zf:
        for path in paths:
            zf.write(path, path.name)
    data = bytearray(archive.read_bytes())
    data[len(data) // 2] ^= 0xFF  # in the pixel data of the middle one of 3 members: its CRC no longer matches
    archive.write_bytes(bytes(data))
    with pytest.raises(DicomError, match=rf"^{re.escape(str(archive))}: cannot extract 'IMG000\d.dcm': Bad CRC-32"):
        read_volume(archive, progress=False)


@pytest.mark.parametrize("file_first", [True, False], ids=["file-then-folder", "folder-then-file"])
def test_a_member_that_is_both_file_and_folder_is_a_dicom_error_naming_only_the_member(tmp_path, file_first):
    """A member ``s`` beside members ``s/NNN.dcm``: os's FileExistsError (or IsADirectoryError) used to escape,
    naming the temporary folder it was extracted into."""
    import zipfile

    from ctzoo.io import DicomError

    paths = write_series(tmp_path / "series", SeriesSpec(make_slices(2)))
    archive = tmp_path / "clash.zip"
    with zipfile.ZipFile(archive, "w") as zf:
        if file_first:
            zf.writestr("s", b"x")
        for path in paths:
            zf.write(path, f"s/{path.name}")
        if not file_first:
            zf.writestr("s", b"x")
    member = "s/IMG0000.dcm" if file_first else "s"
    with pytest.raises(DicomError, match=rf"^{re.escape(str(archive))}: cannot extract '{re.escape(member)}': "
                                         r"another member of the archive has the same path") as raised:
        read_volume(archive, progress=False)
    assert "ctzoo-zip-" not in str(raised.value)


def test_every_name_of_the_package_is_its_submodules_own():
    """``ctzoo.io``'s names, imported on first use (PEP 562; ``test_cli.py`` shows that a secure-map party never
    loads them), are the objects their submodules define; ``dir`` lists them; an unknown name is an AttributeError
    naming it."""
    import importlib

    import ctzoo.io

    for name in ctzoo.io.__all__:
        value = getattr(ctzoo.io, name)
        assert value is getattr(importlib.import_module(value.__module__), name), name
        assert value.__module__.startswith("ctzoo.io."), name
    assert set(ctzoo.io.__all__) <= set(dir(ctzoo.io))
    with pytest.raises(AttributeError, match="'ctzoo.io' has no attribute 'read_volumes'"):
        ctzoo.io.read_volumes  # noqa: B018  (the attribute access is the test)


def test_an_integer_dtype_rounds_and_refuses_values_it_cannot_hold(tmp_path):
    """``astype`` alone truncated 2.7 to 2 and wrapped 40000 HU to -25536 (int16) and 64 (uint8), silently."""
    values = np.array([-1024, -0.7, 2.7, 1839, 40000], np.float32)
    volume = Volume(np.broadcast_to(values[:, None, None], (5, 2, 2)).copy(), (1.0, 1.0, 1.0))
    for dtype, limits in (("int16", r"-32768\.\.32767"), ("uint8", r"0\.\.255")):
        target = tmp_path / f"{dtype}.nrrd"
        with pytest.raises(ValueError, match=rf"^{re.escape(str(target))}: voxel values -1024\.\.40000 do not fit "
                                             rf"{dtype} \({limits}\)"):
            write_volume(volume, target, dtype=dtype)
        assert not target.exists()
    in_range = volume.with_array(np.minimum(volume.array, 1839))
    write_volume(in_range, tmp_path / "ct.nii.gz", dtype=np.int16)
    stored = np.asanyarray(nib.load(str(tmp_path / "ct.nii.gz")).dataobj)[0, 0, :]
    np.testing.assert_array_equal(stored, [-1024, -1, 3, 1839, 1839])  # rounded, not truncated toward 0
    with pytest.raises(ValueError, match="NaN or infinite voxel values cannot be stored as int16"):
        write_volume(volume.with_array(np.full((5, 2, 2), np.nan, np.float32)), tmp_path / "nan.mha", dtype="int16")


def _tilted(tilt_degrees=20.0, size=(64, 64, 100)):
    """A volume whose k axis leans by ``tilt_degrees`` toward j, as a gantry-tilted series kept unresampled."""
    tilt = np.deg2rad(tilt_degrees)
    direction = np.array([[1.0, 0, 0], [0, 1, np.sin(tilt)], [0, 0, np.cos(tilt)]])
    array = np.random.default_rng(1).integers(-1000, 1000, size[::-1]).astype(np.float32)
    return Volume(array, (0.8, 0.8, 2.0), (-25.0, -30.0, 40.0), direction)


def test_a_sheared_volume_as_nifti_gets_no_qform_that_misplaces_it(tmp_path):
    """A qform cannot hold a shear: nibabel's set_qform made the nearest rotation of it, which ITK reads (it takes
    no sheared sform), so in SimpleITK the far corner of a 20° tilt lay 34 mm from where it is. The NIfTI now has
    the sform only (ITK refuses it, rather than misplacing it), and ctzoo reads back the exact geometry."""
    volume = _tilted()
    assert volume.is_sheared
    target = tmp_path / "tilt.nii.gz"
    write_volume(volume, target)
    header = nib.load(str(target)).header
    assert (int(header["qform_code"]), int(header["sform_code"])) == (0, 1)
    back = read_volume(target)
    np.testing.assert_allclose(back.affine_lps, volume.affine_lps, atol=1e-4)
    assert any("it has no qform" in warning for warning in back.warnings)
    with pytest.raises(RuntimeError, match="orthonormal"):
        sitk.ReadImage(str(target))
    from ctzoo.io.image_files import written_file_warnings

    assert "sform only" in written_file_warnings(volume, target)[0] and not written_file_warnings(volume, "t.nrrd")


def test_a_qform_that_puts_voxels_elsewhere_than_the_sform_is_warned_about(tmp_path):
    """Such a file (a sheared sform beside the rotation nibabel makes of it, as ctzoo used to write) orients its
    axes the same way in both, so comparing orientation letters found nothing to say; the corners are compared."""
    volume = _tilted()
    image = nib.Nifti1Image(np.zeros(volume.size, np.int16), volume.affine_ras)
    image.set_qform(volume.affine_ras, code=1)
    image.set_sform(volume.affine_ras, code=1)
    nib.save(image, str(tmp_path / "old.nii.gz"))
    warnings = read_volume(tmp_path / "old.nii.gz").warnings
    apart = [w for w in warnings if "the qform and the sform put voxels up to" in w]
    assert len(apart) == 1 and re.search(r"up to 3\d\.\d mm apart", apart[0]), warnings
    image.set_sform(image.get_qform(), code=1)  # the two agree: no warning
    nib.save(image, str(tmp_path / "agree.nii.gz"))
    assert not [w for w in read_volume(tmp_path / "agree.nii.gz").warnings if "qform" in w]


def _mha(tmp_path, compress: bool):
    """A 32 x 32 x 20 int16 MHA of random values (40,960 bytes of voxels), compressed or raw."""
    image = sitk.GetImageFromArray(np.random.default_rng(2).integers(-1024, 2000, (20, 32, 32)).astype(np.int16))
    image.SetSpacing((1.0, 1.0, 2.0))
    path = tmp_path / ("packed.mha" if compress else "raw.mha")
    sitk.WriteImage(image, str(path), useCompression=compress)
    return path


def test_an_mha_holding_fewer_slices_than_its_dimsize_is_refused(tmp_path):
    """ITK's MetaImage reader filled the missing slices of a compressed MHA with 0 HU, silently."""
    path = _mha(tmp_path, compress=True)
    assert read_volume(path).array.shape == (20, 32, 32)
    data = path.read_bytes()
    path.write_bytes(data.replace(b"DimSize = 32 32 20", b"DimSize = 32 32 40"))
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: truncated or a wrong DimSize \(32 32 40\): its "
                                         r"compressed voxel data inflates to 40,960 bytes, not the 81,920"):
        read_volume(path)


@pytest.mark.parametrize("compress", [True, False], ids=["compressed", "raw"])
def test_a_truncated_mha_says_truncated_with_its_sizes(tmp_path, compress):
    """It was "SimpleITK cannot read it: Reason: No such file or directory" (compressed) or, raw, read in part."""
    path = _mha(tmp_path, compress)
    data = path.read_bytes()
    start = data.index(b"ElementDataFile = LOCAL\n") + len(b"ElementDataFile = LOCAL\n")
    path.write_bytes(data[:start + 3000])
    what = f"of {len(data) - start:,} bytes of compressed voxel data" if compress else "of 40,960 bytes of voxel data"
    with pytest.raises(ValueError, match=rf"^{re.escape(str(path))}: truncated: 3,000 {what}$"):
        read_volume(path)


@pytest.fixture
def unwritable_folder(tmp_path):
    """A folder nothing can be written into: mode 555, or for root (whom modes do not stop) ``chattr +i``."""
    folder = tmp_path / "locked"
    folder.mkdir()
    if os.geteuid() != 0:
        folder.chmod(0o555)
        yield folder
        folder.chmod(0o755)
        return
    if shutil.which("chattr") is None or subprocess.run(["chattr", "+i", str(folder)],
                                                        capture_output=True).returncode != 0:
        pytest.skip("running as root where chattr +i cannot make a folder unwritable")
    try:
        yield folder
    finally:
        subprocess.run(["chattr", "-i", str(folder)], check=True)


@pytest.mark.parametrize("suffix", [".nrrd", ".mha", ".nii.gz"])
def test_writing_into_an_unwritable_folder_is_an_oserror_naming_the_target(unwritable_folder, suffix):
    """SimpleITK raises RuntimeError, which no OSError handler caught: a traceback naming the hidden temporary
    file. Now each format's failure is a PermissionError naming the file asked for."""
    target = unwritable_folder / f"ct{suffix}"
    with pytest.raises(PermissionError) as raised:
        write_volume(Volume(np.zeros((2, 3, 4), np.float32), (1.0, 1.0, 1.0)), target)
    assert raised.value.filename == str(target) and ".partial" not in str(raised.value)


@pytest.mark.parametrize("out", ["ct.mha", "sdir"])
def test_data_sample_and_convert_into_an_unwritable_folder_are_one_line_naming_the_target(unwritable_folder, out):
    from click.testing import CliRunner

    from ctzoo.cli import main

    target = unwritable_folder / out
    runs = [["data", "sample", str(target)]] + ([["convert", str(target.parent.parent / "in.nii.gz"), str(target)]]
                                                 if out == "ct.mha" else [])
    nib.save(nib.Nifti1Image(np.zeros((4, 4, 4), np.int16), np.eye(4)), str(target.parent.parent / "in.nii.gz"))
    for args in runs:
        result = CliRunner().invoke(main, args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
        assert re.fullmatch(rf"Error: {re.escape(str(target))}: permission denied: (Operation not permitted|"
                            r"Permission denied)\n", result.output), result.output
