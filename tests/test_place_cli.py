"""``ctzoo place``: profile a zoo model, place it, simulate the plan, and refuse what cannot work, from the CLI."""

from __future__ import annotations

import json

import pytest
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.scaling.placement.graph import Plan


@pytest.fixture(scope="module")
def profiled(tmp_path_factory):
    """recistnet-mini profiled for inference (1 slice, 1 round: the CLI's path, not a measurement)."""
    folder = tmp_path_factory.mktemp("place")
    result = CliRunner().invoke(main, ["place", "profile", "recistnet-mini", "--inference", "--batch-size", "1",
                                       "--rounds", "1", "--warmup", "0", "--devices", "cpu:0=1GiB,cpu:1=1GiB",
                                       "--out", str(folder / "profile.json")])
    assert result.exit_code == 0, result.output
    return folder, result.output


def test_profile_plan_and_simulate_agree(profiled):
    folder, output = profiled
    profile = json.loads((folder / "profile.json").read_text())
    assert "59 nodes" in output and "transfers cpu->cpu" in output
    assert profile["meta"]["comm"]["model"]["pairs"]["cpu->cpu"] and not profile["training"]
    plan_path = folder / "plan.json"
    result = CliRunner().invoke(main, ["place", "plan", str(folder / "profile.json"), "--devices",
                                       "cpu:0=1GiB,cpu:1=1GiB", "--algorithm", "m-etf", "--out", str(plan_path)])
    assert result.exit_code == 0, result.output
    plan = Plan.load(plan_path)
    assert plan.algorithm == "m-etf" and set(plan.placement) == {n["name"] for n in profile["nodes"]}
    assert f"placed 59 nodes in {1000 * plan.placement_s:.1f} ms" in result.output  # the placement time
    for baseline in ("one device", "expert split", "m-topo"):
        assert baseline in result.output
    simulated = CliRunner().invoke(main, ["place", "simulate", str(folder / "profile.json"), str(plan_path)])
    assert simulated.exit_code == 0 and f"predicted step {1000 * plan.predicted_step_s:.2f} ms" in simulated.output


def test_caps_too_small_are_refused_with_caps_that_fit(profiled):
    folder, _ = profiled
    result = CliRunner().invoke(main, ["place", "plan", str(folder / "profile.json"), "--devices",
                                       "cpu:0=1MiB,cpu:1=1MiB", "--out", str(folder / "none.json")])
    assert result.exit_code == 1 and "cannot place" in result.output and "--devices cpu:0=" in result.output
    suggested = result.output.split("--devices ")[-1].split()[0]
    fits = CliRunner().invoke(main, ["place", "plan", str(folder / "profile.json"), "--devices", suggested,
                                     "--out", str(folder / "fits.json")])
    assert fits.exit_code == 0, fits.output
    assert not (folder / "none.json").exists()


def test_bad_devices_and_plans_are_clear_errors(profiled, tmp_path):
    folder, _ = profiled
    profile = str(folder / "profile.json")
    for devices, message in (("tpu:0=1GiB", "unknown device 'tpu:0'"), ("cpu:0", "no memory cap"),
                             ("cpu:0=lots", "is not a number")):
        result = CliRunner().invoke(main, ["place", "plan", profile, "--devices", devices])
        assert result.exit_code == 2 and message in result.output, result.output
    broken = tmp_path / "plan.json"
    broken.write_text('{"schema": 1, "devices": {"cpu:0": 100}, "placement": {"x": "cuda:3"}}')
    result = CliRunner().invoke(main, ["place", "simulate", profile, str(broken)])
    assert result.exit_code == 1 and "cuda:3" in result.output
    broken.write_text("not json")
    result = CliRunner().invoke(main, ["place", "simulate", profile, str(broken)])
    assert result.exit_code == 1 and "is not JSON" in result.output
    result = CliRunner().invoke(main, ["place", "profile", "no-such-model", "--out", str(tmp_path / "p.json")])
    assert result.exit_code == 1 and "no-such-model" in result.output and "Traceback" not in result.output
