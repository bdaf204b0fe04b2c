"""Every benchmark records where its figures came from in one way (``benchmarks/_provenance.py``): the commit and
whether the tree differed from it, UTC start and end, the load average at both, the configs' text, the machine; and
``benchmarks/shipped_detectors.py`` scores val and test with the lesion-free setting its committed run used."""

from __future__ import annotations

import datetime
import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    if str(BENCHMARKS) not in sys.path:
        sys.path.append(str(BENCHMARKS))  # appended, as the benchmarks do: nothing installed is shadowed
    spec = importlib.util.spec_from_file_location(f"{name}_benchmark", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def provenance():
    return _load("_provenance")


def _git(folder: Path, *args: str) -> str:
    return subprocess.run(["git", "-C", str(folder), *args], check=True, capture_output=True, text=True).stdout


def test_git_state_is_the_commit_and_whether_tracked_files_differ(provenance, tmp_path):
    _git(tmp_path, "init", "-q")
    (tmp_path / "recipe.yaml").write_text("epochs: 1\n")
    _git(tmp_path, "add", "recipe.yaml")
    _git(tmp_path, "-c", "user.name=t", "-c", "user.email=t@example.org", "commit", "-qm", "recipe")
    head = _git(tmp_path, "rev-parse", "HEAD").strip()
    (tmp_path / "untracked.json").write_text("{}")  # a run's output beside the code: not a change to the code
    assert provenance.git_state(tmp_path) == {"commit": head, "dirty": False, "changed": []}
    (tmp_path / "recipe.yaml").write_text("epochs: 2\n")
    assert provenance.git_state(tmp_path) == {"commit": head, "dirty": True, "changed": ["recipe.yaml"]}


def test_outside_a_checkout_the_commit_is_unknown_not_clean(provenance, tmp_path):
    assert provenance.git_state(tmp_path) == {"commit": None, "dirty": None, "changed": []}


def test_a_record_holds_this_checkout_the_times_the_loads_and_the_config_text(provenance):
    config = ROOT / "configs" / "recistnet_mini_cpu.yaml"
    run = provenance.Provenance(config, None)
    record = run.record(extra_library="1.0")
    assert record["commit"] == _git(ROOT, "rev-parse", "HEAD").strip()
    assert isinstance(record["dirty"], bool)
    assert record["configs"] == {"configs/recistnet_mini_cpu.yaml": config.read_text()}
    started, finished = (datetime.datetime.fromisoformat(record[k]) for k in ("started_utc", "finished_utc"))
    assert started.utcoffset() == datetime.timedelta(0) and started <= finished
    assert all(len(record["load_average"][k]) == 3 for k in ("start", "end"))
    machine = record["machine"]
    assert machine["extra_library"] == "1.0" and machine["cpus"] >= 1 and machine["torch"] and machine["python"]


def test_library_versions_are_read_without_importing_the_libraries():
    """MPyC parses the command line when imported: asking its version by importing it stopped benchmarks/smap.py
    at its end with 'ambiguous option: --out'. Versions come from the installed distributions instead."""
    probe = ("import sys; sys.path.append(sys.argv[1]); from _provenance import versions; "
             "found = versions('mpyc', 'onnxruntime', 'no_such_module'); "
             "print(found['no_such_module'], bool(found['onnxruntime']), 'mpyc' in sys.modules)")
    ran = subprocess.run([sys.executable, "-c", probe, str(BENCHMARKS), "--out", "x.json"], capture_output=True,
                         text=True, check=True)
    assert ran.stdout.split() == ["None", "True", "False"], ran.stdout + ran.stderr


def _writes_a_result(source: str) -> bool:
    return re.search(r"""["']benchmark["']\s*(?::|\]\s*=)""", source) is not None


def test_every_benchmark_records_its_provenance_with_the_one_helper():
    """Each benchmark that writes a result JSON starts a Provenance and writes its record; none keeps a machine or
    load helper of its own (they had drifted apart: most recorded no load, none the commit)."""
    writers = {path.name: path.read_text() for path in sorted(BENCHMARKS.glob("*.py"))
               if _writes_a_result(path.read_text())}
    assert len(writers) >= 20, sorted(writers)
    for name, source in writers.items():
        assert "from _provenance import" in source and "Provenance(" in source and ".record(" in source, name
        assert re.search(r"""["']provenance["']\]?\s*[:=]|provenance=""", source), name
        for own in ("platform.platform(", "os.getloadavg(", "def machine", "def cpu_model", '"uptime"'):
            assert own not in source, (name, own)


def test_a_benchmark_run_writes_its_provenance(tmp_path):
    """The smallest real run of one benchmark (4 slices, once): its JSON carries the record."""
    out = tmp_path / "dicom_read.json"
    subprocess.run([sys.executable, str(BENCHMARKS / "dicom_read.py"), "--slices", "2", "--repeat", "1",
                    "--nvimgcodec", "", "--out", str(out)], check=True, capture_output=True, cwd=tmp_path)
    record = json.loads(out.read_text())["provenance"]
    assert record["commit"] == _git(ROOT, "rev-parse", "HEAD").strip()
    assert set(record) == {"commit", "dirty", "changed", "started_utc", "finished_utc", "load_average", "configs",
                           "machine"}
    assert record["machine"]["simpleitk"] and record["machine"]["pydicom"]


def test_shipped_detectors_scores_val_and_test_with_one_lesion_free_slice_per_series(small_deeplesion_mini,
                                                                                     tmp_path):
    """The committed run, and so the card's operating point, scored val and test with one lesion-free slice per
    series; rerun with its defaults the benchmark does the same, and records it."""
    bench = _load("shipped_detectors")
    args = bench.parse_args([])
    assert args.lesion_free_per_series == 1
    with pytest.raises(SystemExit):
        bench.parse_args(["--lesion-free-per-series", "-1"])
    val = bench.scored("recistnet-mini", args.config, small_deeplesion_mini, "val", tmp_path / "val",
                       args.lesion_free_per_series)
    assert val["lesion_free_per_series"] == 1 and val["num_lesion_free"] >= 1
    bench.froc_by_decoder("recistnet-mini", args.config, small_deeplesion_mini, tmp_path / "test", 0)
    assert json.loads((tmp_path / "test" / "froc.json").read_text())["num_lesion_free"] == 0
