import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ctzoo.datasets import samples  # noqa: E402
from ctzoo.datasets.samples import sample_ct_dicom  # noqa: E402
from ctzoo.io import read_volume, repair_uids  # noqa: E402


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return sample_ct_dicom()


@pytest.fixture(scope="session")
def sample_volume(sample_dir):
    return read_volume(sample_dir, progress=False)


@pytest.fixture(scope="session")
def fetched_samples() -> Path:
    """The TotalSegmentator sample folder (fetched once into the cache); skips the test when offline."""
    try:
        return samples.fetch_samples()
    except samples.SampleError as exc:
        pytest.skip(f"TotalSegmentator samples unavailable (offline?): {exc}")


@pytest.fixture(scope="session")
def sent_files(tmp_path_factory, sample_dir) -> list[Path]:
    """Copies of the sample series with its empty UIDs repaired (storescu and PACS need them)."""
    folder = tmp_path_factory.mktemp("sent")
    sources = sorted(p for p in sample_dir.iterdir() if p.name.startswith("CT"))
    repaired, _ = repair_uids([pydicom.dcmread(p) for p in sources], "sample_ct")
    paths = []
    for source, ds in zip(sources, repaired):
        ds.save_as(folder / source.name, enforce_file_format=True)
        paths.append(folder / source.name)
    assert len(paths) == 20
    return paths
