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


def as_kind(profile: dict, kind: str, scale: float = 1.0) -> dict:
    """``profile`` as if profiled on ``kind`` (``ctzoo place profile --device KIND``), times x ``scale``."""
    profile = json.loads(json.dumps(profile))
    for node in profile["nodes"]:
        node["forward_s"] = {kind: scale * s for s in node["forward_s"].values()}
        node["backward_s"] = {kind: scale * s for s in node["backward_s"].values()}
    return profile


def test_a_device_kind_without_timings_is_refused_and_profiles_of_two_kinds_merge(profiled):
    folder, _ = profiled
    profile = json.loads((folder / "profile.json").read_text())
    cuda, cpu = folder / "cuda.json", folder / "cpu.json"
    cuda.write_text(json.dumps(as_kind(profile, "cuda", 0.01)))
    cpu.write_text(json.dumps(as_kind(profile, "cpu")))
    devices = ["--devices", "cuda:0=40GiB,cpu=64GiB"]
    refused = CliRunner().invoke(main, ["place", "plan", str(cuda), *devices, "--out", str(folder / "x.json")])
    assert refused.exit_code == 1 and "no cpu timings" in refused.output and "--device cpu" in refused.output
    merged = CliRunner().invoke(main, ["place", "plan", str(cuda), str(cpu), *devices, "--out",
                                       str(folder / "merged.json")])
    assert merged.exit_code == 0, merged.output
    placement = list(Plan.load(folder / "merged.json").placement.values())  # the model stays on the faster kind
    assert placement.count("cpu") <= 0.05 * len(placement), placement  # (m-SCT may park a tiny op on the idle CPU)
    simulated = CliRunner().invoke(main, ["place", "simulate", str(cuda), str(cpu), str(folder / "merged.json")])
    assert simulated.exit_code == 0, simulated.output


def test_simulate_flags_a_peak_over_its_cap_and_a_plan_made_for_inference(profiled):
    folder, _ = profiled
    profile, plan_path = folder / "profile.json", folder / "flagged.json"
    assert CliRunner().invoke(main, ["place", "plan", str(profile), "--devices", "cpu:0=1GiB,cpu:1=1GiB",
                                     "--out", str(plan_path)]).exit_code == 0
    plan = json.loads(plan_path.read_text())
    assert plan["profiled"]["training"] is False and plan["profiled"]["batch_size"] == 1
    assert plan["profiled"]["input_shapes"] and plan["profiled"]["parameter_bytes"] > 0
    training = json.loads(profile.read_text())
    training["training"] = True
    for node in training["nodes"]:
        node["backward_s"] = dict(node["forward_s"])
    (folder / "training.json").write_text(json.dumps(training))
    mismatch = CliRunner().invoke(main, ["place", "simulate", str(folder / "training.json"), str(plan_path)])
    assert mismatch.exit_code == 1 and "profiled for inference" in mismatch.output
    plan["devices"] = {name: 1024 for name in plan["devices"]}
    plan_path.write_text(json.dumps(plan))
    over = CliRunner().invoke(main, ["place", "simulate", str(profile), str(plan_path)])
    assert over.exit_code == 1 and "OVER THE CAP" in over.output and "over its cap" in over.output
    del plan["profiled"]
    plan_path.write_text(json.dumps(plan))
    old = CliRunner().invoke(main, ["place", "simulate", str(profile), str(plan_path)])
    assert "cannot be checked" in old.output
