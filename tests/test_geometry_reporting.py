"""Geometry as results report it: a sagittal input names the axial slices the models ran on, a sheared (gantry-
tilted) grid measures volumes and slice steps as a tilted DICOM series does, and NIfTI headers that leave the
orientation unknown or ambiguous are refused or warned about."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest
import SimpleITK as sitk

from ctzoo.inference.overlay import plot_detections
from ctzoo.inference.recist_volume import detections_document, slice_detections
from ctzoo.inference.segment_volume import seg_summary
from ctzoo.io import NoOrientation, read_volume, reorient_lps, volume_from_sitk, volume_to_sitk, write_volume
from ctzoo.io.image_files import declared_size

CLASSES = ["liver", "kidney"]


@pytest.fixture(scope="module")
def axial_and_sagittal(sample_volume):
    """The sample CT (no DICOM identity) as stored, LPS, and the same voxels stored sagittally (PIR)."""
    axial = dataclasses.replace(sample_volume, dicom=None, warnings=[])
    sagittal = volume_from_sitk(sitk.DICOMOrient(volume_to_sitk(axial), "PIR"))
    assert sagittal.orientation == "PIR" and not sagittal.stores_axial_slices and axial.stores_axial_slices
    return axial, sagittal


def _document(volume):
    axial = reorient_lps(volume)
    points = np.array([[[100, 100], [140, 100], [120, 90], [120, 110], [120, 100]]], dtype=float)
    found = slice_detections(axial, 7, np.array([0.9]), points, np.array([1.0, 1.0]))
    return detections_document(volume, axial, found, "m", "1")


def test_a_sagittal_input_names_the_axial_slice_the_lesion_was_found_on(axial_and_sagittal, tmp_path):
    """Stored sagittally, every lesion used to be 'at z -785.5 mm' (the volume's mid-height, the centre of a
    sagittal slice) with a box of zero height: slice, z and box are now the axial grid's, as for the axial file."""
    stored, sagittal = axial_and_sagittal
    expected, found = _document(stored), _document(sagittal)
    assert expected["slice_grid"] == "input" and found["slice_grid"] == "axial"
    want, got = expected["lesions"][0], found["lesions"][0]
    assert got["slice_z_mm"] == want["slice_z_mm"] == -790.5
    assert got["slice"] == want["slice"] == 7 and got["slices"] == want["slices"] == [7]
    assert got["box_voxel"] == want["box_voxel"] == [100.0, 90.0, 140.0, 110.0]
    np.testing.assert_allclose(got["points_mm"], want["points_mm"], atol=1e-3)
    assert plot_detections(sagittal, found, tmp_path / "overlay.png").stat().st_size > 0


def test_a_sagittal_segmentation_names_axial_planes(axial_and_sagittal):
    stored, sagittal = axial_and_sagittal
    labels = np.zeros(stored.array.shape, np.uint8)
    labels[3:5, 10:20, 10:30] = 1
    on_sagittal = sitk.GetArrayFromImage(sitk.DICOMOrient(volume_to_sitk(stored.with_array(labels)), "PIR"))
    expected, found = seg_summary(labels, stored, CLASSES), seg_summary(on_sagittal, sagittal, CLASSES)
    assert found["slice_grid"] == "axial" and expected["slice_grid"] == "input"
    assert found["classes"] == expected["classes"]
    assert found["classes"]["liver"]["slices_z_mm"] == [-798.5, -796.5]


def _sheared(volume, degrees: float = 20.0):
    """``volume`` with a gantry tilt kept in the grid: each slice shifted posteriorly by tan(tilt) x its step."""
    affine = volume.affine_lps
    affine[1, 2] = affine[2, 2] * np.tan(np.deg2rad(degrees))
    spacing = np.linalg.norm(affine[:3, :3], axis=0)
    return dataclasses.replace(volume, spacing=tuple(spacing), direction=affine[:3, :3] / spacing, warnings=[])


@pytest.mark.parametrize("suffix", [".nrrd", ".nii.gz"])
def test_a_sheared_grid_measures_as_the_tilted_dicom_series_does(sample_volume, tmp_path, suffix):
    """A tilted series kept sheared (NIfTI sform, NRRD direction) used to report slices 2.128 mm apart and
    volumes 1/cos(20 deg) too large against the same series read from DICOM (2 mm, untilted voxels); the NRRD
    got no shear warning at all."""
    untilted = dataclasses.replace(sample_volume, dicom=None, warnings=[], array=sample_volume.array[:4])
    read = read_volume(write_volume(_sheared(untilted), tmp_path / f"tilt{suffix}"), progress=False)
    assert read.spacing[2] == pytest.approx(2.0 / np.cos(np.deg2rad(20)), abs=1e-4)  # along the tilted k axis
    assert read.slice_step_mm == pytest.approx(2.0, abs=1e-4) == untilted.slice_step_mm
    assert read.voxel_volume_mm3 == pytest.approx(untilted.voxel_volume_mm3, rel=1e-5)
    assert any("sheared" in warning and "2 mm apart" in warning for warning in read.warnings)
    labels = np.ones(read.array.shape, np.uint8)
    assert (seg_summary(labels, read, CLASSES)["voxel_volume_ml"]
            == pytest.approx(seg_summary(labels, untilted, CLASSES)["voxel_volume_ml"], rel=1e-5))


def test_a_nifti_without_orientation_is_refused(tmp_path):
    """qform_code = sform_code = 0: nibabel invents an orientation (ITK another, mirrored A/P) and findings change
    with it; the file is refused, naming it, rather than read in a made-up frame."""
    path = tmp_path / "noaffine.nii.gz"
    nib.save(nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), None), str(path))
    for call in (read_volume, declared_size):
        with pytest.raises(NoOrientation, match=r"noaffine.nii.gz: the header gives no orientation \(qform_code and "
                                                r"sform_code are 0\).*write the file with an affine"):
            call(path)


def test_a_qform_and_sform_that_disagree_are_warned_about(tmp_path):
    affine = np.diag([-0.8, -0.8, 2.0, 1.0])
    mirrored = affine.copy()
    mirrored[0] *= -1
    image = nib.Nifti1Image(np.zeros((8, 8, 4), np.int16), affine)
    image.set_qform(affine, code=1)
    image.set_sform(mirrored, code=2)
    nib.save(image, str(tmp_path / "disagree.nii.gz"))
    volume = read_volume(tmp_path / "disagree.nii.gz")
    assert volume.orientation == "RPS"
    assert volume.warnings == ["the qform (LPS) and the sform (RPS) orient the axes differently; the sform is used "
                               "(as nibabel does); ITK-based tools (SimpleITK, 3D Slicer) may use the qform and show "
                               "the volume mirrored"]
    image.set_sform(affine, code=2)  # agreeing: no warning
    nib.save(image, str(tmp_path / "agree.nii.gz"))
    assert read_volume(tmp_path / "agree.nii.gz").warnings == []
