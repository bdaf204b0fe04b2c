import os
import sys
from pathlib import Path

import pydicom
import pytest

sys.path.insert(0, str(Path(__file__).parent))

if os.environ.get("PYTEST_XDIST_WORKER"):
    # two pytest workers on two cores: one compute thread each (and in every process a test starts), else their
    # OpenMP threads fight over the cores and spin-waiting makes both slower than one worker alone
    os.environ["OMP_NUM_THREADS"] = "1"
    import torch

    torch.set_num_threads(1)

#: Modules that take minutes, longest first. They run before the rest, so that with two workers (pyproject's
#: ``-n 2 --dist loadfile``: one module stays on one worker) the short modules fill the gaps at the end instead
#: of one long module starting last while the other worker idles. Measured with ``--durations``.
#: test_precision runs bf16, which a CPU without AVX512-BF16 emulates (about 100x fp32's time): minutes there.
LONG_MODULES = ("test_recistnet_learning", "test_smap_secure", "test_template_seg_training", "test_precision",
                "test_training", "test_infer_pipeline", "test_compress", "test_expand", "test_infer_schedule",
                "test_ray_engine", "test_deeplesion_mini", "test_slice_cache", "test_cohort_report", "test_readme",
                "test_monai_bundle", "test_perf_parameter_server", "test_serve_abuse", "test_serve_studies",
                "test_nas_cli", "test_pacs_listener", "test_pacs_cli", "test_nvimgcodec_decode", "test_nas_export",
                "test_serve", "test_serve_v2", "test_template_seg_cli", "test_preprocess_on_model", "test_infer_stop")


def pytest_collection_modifyitems(items):
    rank = {name: position for position, name in enumerate(LONG_MODULES)}
    items.sort(key=lambda item: rank.get(item.module.__name__, len(rank)))  # stable: file order otherwise


from ctzoo.datasets import samples  # noqa: E402
from ctzoo.datasets.samples import sample_ct_dicom  # noqa: E402
from ctzoo.io import read_volume, repair_uids  # noqa: E402


def built_once(tmp_path_factory, name: str, **settings) -> Path:
    """A DeepLesion miniature built by whichever pytest worker asks first and read by all: the xdist workers'
    temporary folders share a parent, and a file lock there makes the others wait for the build (which renames
    a finished miniature into place) instead of building their own. Why: a build takes 10-40 s of a core."""
    from filelock import FileLock

    from ctzoo.datasets.deeplesion.mini import make_deeplesion_mini

    base = tmp_path_factory.getbasetemp()
    shared = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    out = shared / "built-once" / name
    out.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(out) + ".lock"):
        if not out.exists():
            make_deeplesion_mini(out, progress=False, **settings)
    return out


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
def small_deeplesion_mini(fetched_samples, tmp_path_factory) -> Path:
    """A 4-series DeepLesion-format miniature (seed 3), built once for the training and expansion tests (read
    only: tests write their runs elsewhere; shared by the pytest workers)."""
    return built_once(tmp_path_factory, "mini4-seed3", cases=4, seed=3)


@pytest.fixture(scope="session")
def deeplesion_mini16(fetched_samples, tmp_path_factory) -> Path:
    """A 16-series miniature (seed 5: 11 patients, 46 lesions, 18 typed), built once for the cohort, SMAP and
    slice-store tests (read only; shared by the pytest workers)."""
    return built_once(tmp_path_factory, "mini16-seed5", cases=16, seed=5)


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
