import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ctzoo.datasets import samples  # noqa: E402
from ctzoo.datasets.samples import sample_ct_dicom  # noqa: E402
from ctzoo.io import read_volume  # noqa: E402


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
