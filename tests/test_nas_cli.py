"""``ctzoo nas``: the analyst's loop from the command line -- search, view, constrain, search --resume -- and what
it writes: candidates.json (every candidate, each iteration with its constraints) and the supernet to resume."""

from __future__ import annotations

import json

import yaml
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.nas import Architecture, SearchSpace
from ctzoo.nas.search import load_supernet

TINY = {"task": "template_seg", "data": {"spacing_mm": 6.0, "size": [64, 64], "val_slices": 4, "max_templates": 8},
        "optim": {"epochs": 1, "batch_size": 4, "num_workers": 0}, "repeats": 1}


def test_search_view_constrain_and_resume(fetched_samples, tmp_path):
    config, run = tmp_path / "tiny.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(TINY))
    first = CliRunner().invoke(main, ["nas", "search", str(config), "--out", str(run), "--candidates", "2",
                                      "--reference", "--device", "cpu"])  # 2 sampled + the config's own network
    assert first.exit_code == 0, first.output
    assert "iteration 0:" in first.output and "best Dice" in first.output
    again = CliRunner().invoke(main, ["nas", "search", str(config), "--out", str(run)])
    assert again.exit_code == 1 and "--resume continues it" in again.output
    # the analyst narrows the space: checked now, kept for the next iteration, adding up across calls
    bad = CliRunner().invoke(main, ["nas", "constrain", str(run), "--drop", "level9.kernel=5"])
    assert bad.exit_code == 1 and "level9" in bad.output
    for args in (["--drop", "level*.kernel=5"], ["--lock", "gate=none"]):
        result = CliRunner().invoke(main, ["nas", "constrain", str(run), *args])
        assert result.exit_code == 0 and "architectures ->" in result.output, result.output
    assert json.loads((run / "constraints.json").read_text()) == {"drop": ["level*.kernel=5"], "lock": ["gate=none"]}
    second = CliRunner().invoke(main, ["nas", "search", str(config), "--out", str(run), "--resume",
                                       "--candidates", "2", "--device", "cpu"])
    assert second.exit_code == 0, second.output
    document = json.loads((run / "candidates.json").read_text())
    assert document["schema"] == 1 and [i["iteration"] for i in document["iterations"]] == [0, 1]
    assert all(i["steps"] > 0 for i in document["iterations"])
    candidates = document["candidates"]
    assert len(candidates) == 5 and len({c["id"] for c in candidates}) == 5
    assert candidates[0]["description"] == "w 1/1/1/1 u 2/2/2/2 k 3/3/3/3 fuse 0,1,2,3 sigmoid"
    assert [c.get("reference", False) for c in candidates[:3]] == [True, False, False]  # scored once
    assert set(candidates[1]) == {"id", "iteration", "architecture", "description", "vector", "dice", "latency_ms",
                                  "params", "flops"}
    assert len(document["iterations"][0]["candidates"]) == 3
    assert document["iterations"][1]["constraints"] == {"drop": ["level*.kernel=5"], "lock": ["gate=none"]}
    assert not (run / "constraints.json").exists()  # applied, and recorded with the iteration
    space = SearchSpace.from_json(document["space"])
    for candidate in candidates[3:]:
        assert candidate["architecture"]["gate"] == "none"
        assert all(level["kernel"] == 3 for level in candidate["architecture"]["levels"])
        architecture = Architecture.from_json(candidate["architecture"])
        space.check(architecture, constrained=True)
        assert architecture.id == candidate["id"] and candidate["iteration"] == 1 and 0 <= candidate["dice"] <= 1
    assert load_supernet(run / "supernet" / "last.pt").space == space  # what --resume continues from
    view = CliRunner().invoke(main, ["nas", "view", str(run)])
    assert view.exit_code == 0 and "5 candidates over 2 iterations" in view.output, view.output
    assert (run / "explorer.html").stat().st_size > 1_000_000


def test_resuming_nothing_is_refused(tmp_path):
    config = tmp_path / "tiny.yaml"
    config.write_text(yaml.safe_dump(TINY))
    result = CliRunner().invoke(main, ["nas", "search", str(config), "--out", str(tmp_path / "none"), "--resume"])
    assert result.exit_code == 1 and "no search to resume" in result.output
    (tmp_path / "cut" / "supernet").mkdir(parents=True)  # a first iteration interrupted: a supernet, no candidates
    (tmp_path / "cut" / "supernet" / "last.pt").write_bytes(b"")
    result = CliRunner().invoke(main, ["nas", "search", str(config), "--out", str(tmp_path / "cut"), "--resume"])
    assert result.exit_code == 1 and "first iteration was interrupted; run it again without --resume" in result.output


def search(config, run, *options):
    return CliRunner().invoke(main, ["nas", "search", str(config), "--out", str(run), "--candidates", "2",
                                     "--device", "cpu", *options])


def test_resume_scores_what_the_narrowed_space_has_left_then_refuses_an_exhausted_one(fetched_samples, tmp_path):
    config, run = tmp_path / "tiny.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump(TINY))
    assert search(config, run, "--reference").exit_code == 0  # the reference: w 1/1/1/1 ... fuse 0,1,2,3 sigmoid
    # two architectures left, the reference and the one that does not fuse at level 3
    locks = ["level*.width=1", "level*.units=2", "level*.kernel=3", "gate=sigmoid",
             *(f"level{k}.fusion=true" for k in range(3))]
    narrowed = CliRunner().invoke(main, ["nas", "constrain", str(run), *(f"--lock={lock}" for lock in locks)])
    assert narrowed.exit_code == 0 and "-> 2 (1 not scored yet)" in narrowed.output, narrowed.output
    last = search(config, run, "--resume")
    assert last.exit_code == 0, last.output
    assert "1 candidates" in last.output and "every architecture of the space is scored now" in last.output
    document = json.loads((run / "candidates.json").read_text())
    assert [c["description"] for c in document["candidates"] if c["iteration"] == 1] == [
        "w 1/1/1/1 u 2/2/2/2 k 3/3/3/3 fuse 0,1,2 sigmoid"]
    assert not (run / "constraints.json").exists()
    # exhausted: constraints that leave only scored architectures are refused, and so is the next iteration
    dropped = CliRunner().invoke(main, ["nas", "constrain", str(run), "--drop", "level3.fusion=true"])
    assert dropped.exit_code == 1 and "all scored already" in dropped.output, dropped.output
    assert not (run / "constraints.json").exists()
    files = {path: path.read_bytes() for path in (run / "candidates.json", run / "supernet" / "last.pt")}
    refused = search(config, run, "--resume")
    assert refused.exit_code == 1 and isinstance(refused.exception, SystemExit), refused.output
    assert "all 2 architectures its space allows have been scored, none is left to search" in refused.output
    assert all(path.read_bytes() == content for path, content in files.items())  # no empty iteration, no training


def test_a_search_on_classes_the_scoring_cases_lack_is_refused_before_training(fetched_samples, tmp_path):
    config, run = tmp_path / "brain.yaml", tmp_path / "run"
    config.write_text(yaml.safe_dump({**TINY, "data": {**TINY["data"], "classes": {"brain": ["brain"]}}}))
    result = search(config, run)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "none of the classes brain is in the labels of the cases candidates are scored on" in result.output
    assert not (run / "candidates.json").exists() and not (run / "supernet").exists()
