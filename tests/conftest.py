import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from ctzoo.datasets.samples import sample_ct_dicom  # noqa: E402
from ctzoo.io import read_volume  # noqa: E402


@pytest.fixture(scope="session")
def sample_dir() -> Path:
    return sample_ct_dicom()


@pytest.fixture(scope="session")
def sample_volume(sample_dir):
    return read_volume(sample_dir, progress=False)
