"""fetch-samples: the real sdist from PyPI, its sha256, the cache, the offline message, and the labels
that TotalSegmentator made on the embedded DICOM lying on the right anatomy in our geometry."""

import json
import os
import stat
import tarfile

import numpy as np
import pytest
import SimpleITK as sitk

from ctzoo.datasets import samples
from ctzoo.io import read_volume, volume_to_sitk


@pytest.fixture(scope="module")
def fetched(tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache")
    try:
        return samples.fetch_samples(cache=cache, timeout=300)
    except samples.SampleError as exc:
        if "offline" in str(exc) and "sha256" not in str(exc):
            pytest.skip(f"PyPI not reachable: {exc}")
        raise


@pytest.mark.network
def test_fetch_downloads_checks_and_extracts(fetched):
    cache = fetched.parents[1]
    assert samples.sha256_of(cache / "downloads" / samples.SDIST_NAME) == samples.SDIST_SHA256
    manifest = json.loads((fetched / samples.MANIFEST_FILE).read_text())
    assert set(manifest["files"]) == set(samples.FETCHED_SAMPLES)
    for name, entry in manifest["files"].items():
        assert samples.sha256_of(fetched / name) == entry["sha256"]
    assert "Apache License" in (fetched / "LICENSE").read_text()
    labels = json.loads((fetched / samples.LABELS_FILE).read_text())
    assert labels["1"] == "spleen" and labels["5"] == "liver" and len(labels) > 100
    ct = read_volume(fetched / "example_ct_sm.nii.gz")
    seg = read_volume(fetched / "example_seg.nii.gz", dtype=None)
    assert ct.array.shape == seg.array.shape and np.allclose(ct.affine_lps, seg.affine_lps)
    # a second call finds the cache complete and touches nothing
    stamp = (fetched / samples.MANIFEST_FILE).stat().st_mtime_ns
    assert samples.fetch_samples(cache=cache) == fetched
    assert (fetched / samples.MANIFEST_FILE).stat().st_mtime_ns == stamp
    assert samples.sample_path("example_ct.nii.gz", cache=cache).exists()


@pytest.mark.network
def test_totalsegmentator_labels_fit_our_dicom_geometry(fetched, sample_volume):
    """Labels made by another toolchain (dicom2nifti + TotalSegmentator) land on the right tissue in our grid."""
    labels = read_volume(fetched / "example_seg_dicom.nii.gz", dtype=None)
    names = {int(k): v for k, v in json.loads((fetched / samples.LABELS_FILE).read_text()).items()}
    reference = volume_to_sitk(sample_volume)
    on_our_grid = sitk.GetArrayFromImage(sitk.Resample(volume_to_sitk(labels), reference, sitk.Transform(),
                                                       sitk.sitkNearestNeighbor, 0))
    # the grids coincide: every label voxel centre is one of ours (their file is LAS, ours LPS)
    mapping = np.linalg.inv(sample_volume.affine_lps) @ labels.affine_lps
    assert np.allclose(mapping, np.round(mapping), atol=1e-3)
    assert (on_our_grid > 0).sum() == (labels.array > 0).sum()
    hu = sample_volume.array
    mean_hu = {names[v]: float(hu[on_our_grid == v].mean()) for v in np.unique(on_our_grid) if v}
    bones = [h for n, h in mean_hu.items() if n.startswith(("vertebrae", "rib", "sternum", "hip", "sacrum"))]
    assert bones and min(bones) > 150, mean_hu
    assert -20 < mean_hu["liver"] < 150 and -20 < mean_hu["spleen"] < 150, mean_hu  # soft tissue
    # left/right: the spleen (patient's left) lies at larger LPS x than the liver (patient's right)
    x = {organ: sample_volume.index_to_lps(np.argwhere(on_our_grid == value)[:, ::-1])[:, 0].mean()
         for value, organ in names.items() if organ in ("liver", "spleen")}
    assert x["spleen"] > x["liver"] + 100, x


@pytest.mark.network
def test_from_file_works_offline(fetched, tmp_path):
    sdist = fetched.parents[1] / "downloads" / samples.SDIST_NAME
    folder = samples.fetch_samples(cache=tmp_path / "other", from_file=sdist)
    assert (folder / samples.MANIFEST_FILE).exists()


def test_wrong_sha256_is_refused_and_nothing_written(tmp_path):
    fake = tmp_path / samples.SDIST_NAME
    with tarfile.open(fake, "w:gz"):
        pass
    with pytest.raises(samples.SampleError, match="does not match the pinned"):
        samples.fetch_samples(cache=tmp_path / "cache", from_file=fake)
    assert not (tmp_path / "cache").exists()


@pytest.fixture
def offline_pip(monkeypatch):
    """pip pointed at a closed port: what a hospital machine without the package registry sees."""
    monkeypatch.setenv("PIP_INDEX_URL", "http://127.0.0.1:9/simple")
    monkeypatch.setenv("PIP_FIND_LINKS", "")
    monkeypatch.setenv("PIP_RETRIES", "0")
    monkeypatch.setenv("PIP_TIMEOUT", "2")


def test_offline_says_what_to_do(tmp_path, offline_pip):
    with pytest.raises(samples.SampleError) as caught:
        samples.fetch_samples(cache=tmp_path, timeout=120)
    message = str(caught.value)
    assert "pip could not download totalsegmentator==2.18.0" in message
    assert "--from-file" in message and "offline" in message
    assert not list((tmp_path / "downloads").iterdir())  # no half-downloaded file left


def test_missing_sample_says_fetch(tmp_path):
    with pytest.raises(samples.SampleError, match="ctzoo data fetch-samples"):
        samples.sample_path("example_ct.nii.gz", cache=tmp_path)


def test_a_damaged_manifest_or_sample_means_fetch_again(tmp_path):
    """A truncated manifest.json (an interrupted copy of the cache) or a sample changed in place (same size) is
    treated as not fetched, so fetch-samples fetches again instead of crashing or handing out damaged data."""
    folder = tmp_path / "samples"
    folder.mkdir()
    files = {}
    for number, name in enumerate(samples.FETCHED_SAMPLES):
        (folder / name).write_bytes(bytes([number]) * 100)
        files[name] = {"bytes": 100, "sha256": samples.sha256_of(folder / name)}
    manifest = json.dumps({"files": files})
    (folder / samples.MANIFEST_FILE).write_text(manifest)
    assert samples._manifest_ok(folder)
    (folder / samples.MANIFEST_FILE).write_text(manifest[:len(manifest) // 2])
    assert not samples._manifest_ok(folder)
    (folder / samples.MANIFEST_FILE).write_text(manifest)
    (folder / "LICENSE").write_bytes(b"x" * 100)
    assert not samples._manifest_ok(folder)


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_fetched_samples_are_readable_by_everyone_the_umask_allows(tmp_path, fetched_samples):
    """The cache folder used to be mode 0700 whatever the umask (mkdtemp's staging folder, renamed into place)."""
    sdist = samples.cache_dir() / "downloads" / samples.SDIST_NAME
    if not sdist.exists():
        pytest.skip("the samples were fetched without keeping the sdist")
    folder = samples.fetch_samples(cache=tmp_path / "cache", from_file=sdist)
    assert stat.S_IMODE(folder.stat().st_mode) == 0o777 & ~_umask()
    assert [p.name for p in folder.parent.iterdir()] == [folder.name]  # no staging folder left beside it


def test_offline_with_a_damaged_cached_sdist_says_that_file_failed(tmp_path, offline_pip):
    """The offline help said "(or put it at CACHE/downloads/...)" where a damaged copy already lay, without a word
    on why it was not used."""
    cached = tmp_path / "downloads" / samples.SDIST_NAME
    cached.parent.mkdir()
    cached.write_bytes(b"half a download")
    with pytest.raises(samples.SampleError) as caught:
        samples.fetch_samples(cache=tmp_path, timeout=120)
    assert (f"The file at {cached} has sha256 {samples.sha256_of(cached)}, not the pinned {samples.SDIST_SHA256} "
            "(an incomplete copy?): replace it.") in str(caught.value)
