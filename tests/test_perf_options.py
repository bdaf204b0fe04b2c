"""The --perf options shared by serve, infer and train build the monitor they describe."""

from __future__ import annotations

import click
from click.testing import CliRunner

from ctzoo.cli.perf_options import perf_monitor, perf_options


def test_perf_options_reach_the_monitor(tmp_path):
    built = {}

    @click.command()
    @perf_options(deep_profiles=True)
    def command(**options):
        built["monitor"] = perf_monitor(options, "test", tmp_path / "default.sqlite")
        built["left"] = options

    args = ["--perf", "--perf-algorithm", "sstd", "--perf-store", str(tmp_path / "s.sqlite"), "--perf-window", "6",
            "--perf-min-samples", "7", "--perf-profile", "3"]
    result = CliRunner().invoke(command, args)
    assert result.exit_code == 0, result.output
    monitor = built.pop("monitor")
    try:
        assert built["left"] == {}  # every perf option was taken
        assert (monitor.config.algorithm, monitor.config.min_samples) == ("sstd", 7)
        assert monitor.store.path == tmp_path / "s.sqlite" and monitor.profiler.budget == 3
        assert (monitor.recorder.before, monitor.recorder.after) == (3, 3)
    finally:
        monitor.close()
    off = CliRunner().invoke(command, ["--perf-profile", "2"])
    assert off.exit_code == 0 and built["monitor"] is None  # off by default outside serve


def test_commands_without_deep_profiles_have_no_profile_option():
    @click.command()
    @perf_options
    def command(**options):
        pass

    result = CliRunner().invoke(command, ["--perf-profile", "1"])
    assert result.exit_code == 2 and "No such option" in result.output
