"""The ctzoo command line: info, convert, help everywhere, clear errors."""

import json
import struct
import subprocess
import sys

import click
import nibabel as nib
import numpy as np
import pytest
from click.testing import CliRunner
from dicom_factory import SeriesSpec, make_slices, write_series

from ctzoo.cli import COMMANDS, command_paths, main


def run(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def test_info_on_embedded_sample():
    result = run("info")
    assert result.exit_code == 0, result.output
    assert "series #1: CT 'CT Body 3.0', 20 slices, axial, thickness 3 mm  <- chosen" in result.output
    assert "512 x 512 x 20 voxels" in result.output
    assert "spacing          0.977 x 0.977 x 2.000 mm" in result.output
    assert "orientation      LPS (i -> left, j -> posterior, k -> superior)" in result.output
    assert "values           -1024 .. 1839 HU" in result.output


def test_info_json_on_two_series_folder(tmp_path):
    write_series(tmp_path / "a", SeriesSpec(make_slices(5, seed=1), description="five"))
    write_series(tmp_path / "b", SeriesSpec(make_slices(3, seed=2), description="three"))
    result = run("info", tmp_path, "--json")
    assert result.exit_code == 0, result.output
    info = json.loads(result.output)
    assert [s["description"] for s in info["series"]] == ["five", "three"]
    assert info["chosen_series"] == 1
    assert info["volume"]["size_ijk"] == [5, 6, 5]
    assert "SECRET" not in result.output  # patient name and ID never printed
    assert json.loads(run("info", tmp_path, "--json", "--series", "2").output)["volume"]["size_ijk"] == [5, 6, 3]


def test_info_reports_unreadable_series_and_fails(tmp_path):
    write_series(tmp_path, SeriesSpec(make_slices(3), modality="MR"))
    result = run("info", tmp_path)
    assert result.exit_code == 1
    assert "[skipped: modality MR is not one of ['CT']]" in result.output
    assert "error: " in result.output and "no series matches the selection rules" in result.output


def test_convert_dicom_to_nifti(tmp_path):
    spec = SeriesSpec(make_slices(4))
    write_series(tmp_path / "dicom", spec)
    result = run("convert", tmp_path / "dicom", tmp_path / "out" / "ct.nii.gz")
    assert result.exit_code == 0, result.output
    assert "int16" in result.output
    image = nib.load(str(tmp_path / "out" / "ct.nii.gz"))
    assert image.shape == (5, 6, 4) and image.get_data_dtype() == np.int16
    np.testing.assert_array_equal(np.asanyarray(image.dataobj)[:, :, 0].T, spec.slices[0].hu)


def test_errors_are_one_clear_line(tmp_path):
    (tmp_path / "empty").mkdir()
    result = run("info", tmp_path / "empty")
    assert result.exit_code == 1 and "no DICOM files found" in result.output
    result = run("convert", tmp_path / "empty", tmp_path / "x.png")
    assert result.exit_code == 1 and "Error:" in result.output
    assert "Traceback" not in result.output


def test_a_truncated_nifti_is_an_error_line_not_aborted(tmp_path):
    """gzip's EOFError used to reach click, which prints only "Aborted!"."""
    whole, cut = tmp_path / "whole.nii.gz", tmp_path / "cut.nii.gz"
    data = np.random.default_rng(0).integers(-1024, 2000, size=(32, 32, 32)).astype(np.int16)
    nib.save(nib.Nifti1Image(data, np.eye(4)), str(whole))
    cut.write_bytes(whole.read_bytes()[:30000])
    for command in (["info", cut], ["convert", cut, tmp_path / "out.nrrd"]):
        result = run(*command)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit)
        assert result.output == (f"Error: {cut}: not a readable NIfTI file (damaged or truncated?): Compressed file "
                                 "ended before the end-of-stream marker was reached\n")


@pytest.mark.parametrize("command", [(), *command_paths(main)], ids=lambda c: " ".join(c) or "ctzoo")
def test_every_command_has_help(command):
    result = run(*command, "--help")
    assert result.exit_code == 0, result.output
    assert "Usage: " in result.output and len(result.output.splitlines()) > 4


def test_installed_entry_point_runs():
    done = subprocess.run([sys.executable, "-m", "ctzoo", "--version"], capture_output=True, text=True, check=True)
    assert done.stdout.startswith("ctzoo, version ")


def test_a_command_imports_only_what_it_uses():
    """Commands are imported on first use: a secure-map party (or ``--help``) does not wait for torch."""
    code = ("import sys; from ctzoo.cli import main; main(['smap', 'party', '--help'], standalone_mode=False); "
            "assert 'torch' not in sys.modules and 'monai' not in sys.modules, 'torch imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and "--connect-timeout" in done.stdout, done.stderr
    unknown = run("nosuch")
    assert unknown.exit_code == 2 and "No such command 'nosuch'" in unknown.output


def test_a_secure_map_party_starts_without_torch_or_the_image_readers():
    """A party (keys, site files, MPyC) needs :mod:`ctzoo.io.atomic`, not the readers behind ``ctzoo.io``'s
    names: those load on first use, so pydicom, SimpleITK and nibabel (about 1 s) stay out, as torch does."""
    heavy = ("torch", "monai", "pydicom", "SimpleITK", "nibabel")
    code = f"import sys, ctzoo.smap.party; print(sorted(m for m in {heavy!r} if m in sys.modules))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout.strip() == "[]", done.stdout + done.stderr


def test_ctzoo_help_lists_every_command_without_importing_one():
    """``ctzoo --help`` shows the summaries of :data:`COMMANDS`, which must be the commands' own."""
    code = ("import sys; from ctzoo.cli import main; main(['--help'], standalone_mode=False); "
            "assert not [m for m in sys.modules if m.startswith('ctzoo.cli.') or m in ('torch', 'monai')], 'imported'")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    listed = done.stdout.split("Commands:")[1].splitlines()
    assert [line.split()[0] for line in listed if line.strip()] == sorted(COMMANDS)
    context = click.Context(main)
    for name, (_, summary) in COMMANDS.items():
        assert main.get_command(context, name).get_short_help_str(1000) == summary, name


@pytest.mark.parametrize("command", [
    ("convert", "{sample}", "{blocker}/x.nii.gz"),
    ("data", "sample", "{blocker}/x.nii.gz"),
    ("data", "sample", "{blocker}/deeper/ct"),
    ("export", "recistnet-mini", "--out", "{blocker}/sub"),
    # an unknown model: the output folder is checked before any model is looked up or loaded
    ("infer", "{sample}", "--model", "no-such-model", "--out", "{blocker}/sub"),
], ids=lambda c: " ".join(c[:2]))
def test_an_output_path_through_a_file_is_one_error_line(tmp_path, command):
    """A file where a folder of the output path must be used to end in a traceback (FileExistsError,
    NotADirectoryError), for ``infer`` only after the models had loaded."""
    from ctzoo.datasets.samples import sample_ct_dicom

    blocker = tmp_path / "outfile"
    blocker.write_text("not a folder")
    result = run(*(word.format(sample=sample_ct_dicom(), blocker=blocker) for word in command))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output == f"Error: {blocker} is a file, not a folder\n"
    assert blocker.read_text() == "not a folder"


def test_an_unwritable_output_is_one_error_line(tmp_path, monkeypatch):
    """A read-only folder (or no write permission, a full disk) used to end in a traceback, on a read-only mount
    the cleanup's own error in place of the write's: now one line naming the file asked for and the reason."""
    import errno
    import os
    import pathlib

    def read_only(source, *_):
        raise OSError(errno.EROFS, os.strerror(errno.EROFS), str(source))

    monkeypatch.setattr(os, "replace", read_only)
    monkeypatch.setattr(pathlib.Path, "unlink", lambda path, missing_ok=False: read_only(path))
    out = tmp_path / "x.nii.gz"
    result = run("data", "sample", str(out))
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output == f"Error: {out}: cannot write: Read-only file system\n"


def test_only_an_unwritable_output_becomes_an_error_line():
    """Other OSErrors (a file that vanished, a bug's bad path) stay tracebacks: the line would mislead."""
    import errno

    from ctzoo.cli import unwritable_output_error

    assert unwritable_output_error(FileNotFoundError(errno.ENOENT, "No such file or directory", "x")) is None
    full = unwritable_output_error(OSError(errno.ENOSPC, "No space left on device"))
    assert full.message == "cannot write: No space left on device"
    assert unwritable_output_error(PermissionError(errno.EACCES, "Permission denied", "/o")).message == (
        "/o: permission denied: Permission denied")


@pytest.mark.parametrize("command", [("cohort", "build"), ("smap", "features")], ids=" ".join)
def test_an_unknown_model_is_one_line_and_leaves_nothing(tmp_path, command):
    """--model nosuch used to end cohort build (after creating OUT/salt) and smap features in a KeyError traceback."""
    (tmp_path / "ct.nii.gz").write_bytes(b"")
    out = tmp_path / "out"
    result = run(*command, str(tmp_path / "ct.nii.gz"), "--out", str(out / "site.npz"), "--model", "nosuch")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith("Error: no model named 'nosuch'.") and result.output.count("\n") == 1
    assert not out.exists()


@pytest.mark.parametrize("command", [("zoo", "publish", "{run}", "--config", "{config}", "--name", "m"),
                                     ("nas", "export", "{run}", "c0", "--config", "{config}", "--out", "{run}/o")],
                         ids=lambda c: " ".join(c[:2]))
def test_a_version_that_is_not_semantic_is_refused_up_front(tmp_path, command):
    """zoo publish --version banana used to be refused only after a full evaluation, in pydantic's dump."""
    (tmp_path / "c.yaml").write_text("task: recistnet\n")
    result = run(*(w.format(run=tmp_path, config=tmp_path / "c.yaml") for w in command), "--version", "banana")
    assert result.exit_code == 2, result.output
    assert result.output.endswith("Error: Invalid value for '--version': 'banana' is not a semantic version "
                                  "(MAJOR.MINOR.PATCH, e.g. 0.1.0)\n")


@pytest.mark.parametrize("address", ["hospital-a", "h:0", "h:65536", "h:port", ":5001", "[]:5001"])
def test_a_party_address_that_is_not_host_port_is_refused(tmp_path, address):
    """smap party used to take any --party text and fail later, in the connection."""
    result = run("smap", "party", "--helper", "--index", "0", "--party", "127.0.0.1:5001", "--party", address,
                 "--party", "127.0.0.1:5003", "--no-tls", "--out", str(tmp_path / "o.npz"))
    assert result.exit_code == 2, result.output
    assert f"Invalid value for '--party': '{address}' is not HOST:PORT (a port from 1 to 65535" in result.output


def test_info_says_derived_only_for_a_series_uid_the_files_lack(tmp_path):
    """Any repair (here only SOPClassUID and SOPInstanceUID, taken from the file meta) used to make ``info`` call
    the files' own series UID derived."""
    import pydicom

    assert run("data", "sample", tmp_path / "dicom").exit_code == 0
    anonymised = run("info", tmp_path / "dicom")  # the sample as shipped: no study or series UID
    assert "(derived: the files had none)" in anonymised.output, anonymised.output
    for path in sorted((tmp_path / "dicom").glob("CT.*")):
        ds = pydicom.dcmread(path)
        ds.StudyInstanceUID, ds.SeriesInstanceUID = "1.2.826.0.1.3680043.2.1125.1", "1.2.826.0.1.3680043.2.1125.2"
        ds.save_as(path)
    result = run("info", tmp_path / "dicom")
    assert result.exit_code == 0, result.output
    assert "  series UID       1.2.826.0.1.3680043.2.1125.2\n" in result.output
    assert "SOPClassUID, SOPInstanceUID empty in 20 file(s): taken from the file meta" in result.output
    dicom = json.loads(run("info", tmp_path / "dicom", "--json").output)["volume"]["dicom"]
    assert dicom["uids_repaired"] and dicom["derived_uids"] == []


def test_the_series_uid_info_prints_is_selectable_where_the_files_have_none(sample_dir, tmp_path):
    """The embedded sample has no SeriesInstanceUID: info prints the one a read derives, and --series takes it in
    info and convert."""
    described = json.loads(run("info", sample_dir, "--json").output)
    assert described["series"][0]["series_instance_uid"] == ""
    uid = described["volume"]["dicom"]["series_instance_uid"]
    assert uid.startswith("2.25.") and "SeriesInstanceUID" in described["volume"]["dicom"]["derived_uids"]
    assert f"series UID       {uid}  (derived: the files had none)" in run("info", sample_dir).output
    result = run("info", sample_dir, "--series", uid)
    assert result.exit_code == 0 and "<- chosen" in result.output, result.output
    result = run("convert", sample_dir, tmp_path / "ct.nii.gz", "--series", uid)
    assert result.exit_code == 0 and "512 x 512 x 20 voxels" in result.output, result.output
    result = run("info", sample_dir, "--series", "2.25.1")
    assert result.exit_code == 1 and "no series '2.25.1'" in result.output


def test_convert_refuses_an_existing_target_unless_forced(tmp_path):
    """convert used to replace TARGET silently, unlike ``data sample``; --force replaces it, SOURCE itself too."""
    source, target = tmp_path / "ct.nii.gz", tmp_path / "ct.nrrd"
    nib.save(nib.Nifti1Image(np.arange(64, dtype=np.int16).reshape(4, 4, 4), np.eye(4)), str(source))
    target.write_bytes(b"keep me")
    refused = run("convert", source, target)
    assert refused.exit_code == 1 and refused.output == f"Error: {target} exists; pass --force to replace it\n"
    assert target.read_bytes() == b"keep me"
    assert run("convert", source, target, "--force").exit_code == 0
    assert target.read_bytes().startswith(b"NRRD")
    assert run("convert", source, source).exit_code == 1
    in_place = run("convert", source, source, "--force", "--dtype", "float32")
    assert in_place.exit_code == 0, in_place.output
    assert nib.load(str(source)).get_data_dtype() == np.float32 and sorted(p.name for p in tmp_path.iterdir()) == [
        "ct.nii.gz", "ct.nrrd"]


def test_convert_refuses_values_the_chosen_dtype_cannot_hold(tmp_path):
    """--dtype uint8 of HU used to wrap 1839 to 47 and -1024 to 0, silently."""
    source = tmp_path / "ct.nii.gz"
    nib.save(nib.Nifti1Image(np.array([-1024.0, 2.7, 1839.0], np.float32).reshape(3, 1, 1), np.eye(4)), str(source))
    result = run("convert", source, tmp_path / "ct.mha", "--dtype", "uint8")
    assert result.exit_code == 1 and result.output == (f"Error: {tmp_path / 'ct.mha'}: voxel values -1024..1839 do "
                                                       "not fit uint8 (0..255); store a wider type (float32)\n")
    assert not (tmp_path / "ct.mha").exists()


def test_info_reports_the_voxel_type_the_file_stores(tmp_path, sample_dir):
    """"dtype" was float32 for every input (the type it is read as); now the file's own, the read one beside it."""
    grid = np.zeros((4, 4, 4))
    files = {"labels.nii.gz": grid.astype(np.uint8), "hu.nii.gz": grid.astype(np.int16)}
    for name, data in files.items():
        nib.save(nib.Nifti1Image(data, np.eye(4)), str(tmp_path / name))
    nib.save(nib.Nifti1Image(grid.astype(np.int16), np.eye(4)), str(tmp_path / "scaled.nii"))
    raw = bytearray((tmp_path / "scaled.nii").read_bytes())
    struct.pack_into("<ff", raw, 112, 0.5, -1024.0)  # scl_slope, scl_inter: value = 0.5 x stored - 1024
    (tmp_path / "scaled.nii").write_bytes(bytes(raw))
    assert run("convert", tmp_path / "hu.nii.gz", tmp_path / "hu.mha").exit_code == 0
    described = {name: json.loads(run("info", tmp_path / name, "--json").output)["volume"]
                 for name in ["labels.nii.gz", "hu.nii.gz", "scaled.nii", "hu.mha"]}
    described["sample"] = json.loads(run("info", sample_dir, "--json").output)["volume"]
    assert {name: (v["dtype"], v["array_dtype"]) for name, v in described.items()} == {
        "labels.nii.gz": ("uint8", "float32"), "hu.nii.gz": ("int16", "float32"), "scaled.nii": ("int16", "float32"),
        "hu.mha": ("int16", "float32"), "sample": ("uint16", "float32")}  # the sample: BitsAllocated 16, unsigned
    assert "dtype_scaling" not in described["hu.nii.gz"]
    assert described["scaled.nii"]["dtype_scaling"] == {"slope": 0.5, "intercept": -1024.0}
    assert "voxel type       int16 (scl_slope 0.5, scl_inter -1024) in the file, read as float32" in run(
        "info", tmp_path / "scaled.nii").output
    assert "  voxel type       uint16 in the file, read as float32\n" in run("info").output
