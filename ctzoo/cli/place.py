"""``ctzoo place``: Baechi's fast algorithmic placement of a zoo model across memory-capped devices
(:mod:`ctzoo.scaling.placement`): profile the model, place its forward graph, simulate plans."""

from __future__ import annotations

from pathlib import Path

import click

DEVICES_HELP = ("Devices and their memory caps, the first one where inputs start and outputs return: "
                "cuda:0=20GiB,cuda:1=20GiB,cpu=64GiB (cpu:1, cpu:2... are logical CPU devices: the one CPU, "
                "with a cap each).")


def _devices(text: str):
    from ctzoo.scaling.placement.graph import PlacementError, parse_devices

    try:
        return parse_devices(text)
    except PlacementError as error:
        raise click.BadParameter(str(error), param_hint="--devices") from None


def _comm(graph):
    """The profile's measured transfer model (``ctzoo place profile --devices``), else the default's guess."""
    from ctzoo.scaling.placement.graph import CommModel

    measured = graph.meta.get("comm", {}).get("model")
    return CommModel.from_dict(measured) if measured else CommModel()


def _profiles(paths: tuple[Path, ...]):
    """The profiles at ``paths`` as one (:func:`~ctzoo.scaling.placement.graph.merge_profiles`: one per device
    kind, of one model)."""
    from ctzoo.scaling.placement.graph import PlacementGraph, merge_profiles

    return merge_profiles([PlacementGraph.load(path) for path in paths])


@click.group()
def place() -> None:
    """Place a model across memory-capped devices (Baechi: m-TOPO, m-ETF, m-SCT), in seconds.

    \b
    1. ctzoo place profile SOURCE --out profile.json --device cuda --device cpu --devices cuda:0=20GiB,cpu=64GiB
         the model's forward graph (module level), each node's forward/backward time on each --device kind and
         its memory, and a measured transfer-cost model between the devices
    2. ctzoo place plan profile.json --devices cuda:0=20GiB,cpu=64GiB --out plan.json
         place it (m-sct by default), print the placement time, the predicted step time and peak memory per
         device, against one device, an expert's contiguous split and m-TOPO
    3. use it: 'placement: plan.json' in a train config, or ctzoo infer --backend torch --placement plan.json
    """


@place.command("profile")
@click.argument("source")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("profile.json"),
              show_default=True, help="The profile (JSON).")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Batch to profile with [default: the config's, or 8 slices for a bundle].")
@click.option("--inference", is_flag=True, help="Profile inference (eval mode, forward only, weights only) "
              "instead of a training step.")
@click.option("--device", "device_kinds", type=click.Choice(["cpu", "cuda"]), multiple=True, default=("cpu",),
              show_default=True, help="A device kind to measure compute times on; repeat it for each kind the "
              "plan's --devices will use (a plan refuses a kind without timings).")
@click.option("--devices", "devices_text", default=None,
              help="Measure the transfer cost between these devices (same syntax as ctzoo place plan); "
              "without it a default model is used (10 GB/s, 10 us).")
@click.option("--rounds", type=click.IntRange(min=1), default=5, show_default=True,
              help="Timed runs per node (their median), after --warmup untimed runs.")
@click.option("--warmup", type=click.IntRange(min=0), default=2, show_default=True)
def profile(source: str, out: Path, batch_size: int | None, inference: bool, device_kinds: tuple[str, ...],
            devices_text: str | None, rounds: int, warmup: int) -> None:
    """Profile SOURCE (a train config YAML, a model bundle folder or a zoo name) for placement.

    \b
    Examples:
      ctzoo place profile configs/recistnet_resnet34_gpu.yaml --device cuda --device cpu \\
          --devices cuda:0=20GiB,cpu=64GiB --out r34.profile.json
      ctzoo place profile recistnet-mini --inference --out mini.profile.json
    """
    import torch

    from ctzoo.scaling.placement.graph import PlacementError, merge_profiles
    from ctzoo.scaling.placement.profile import measure_comm, profile_model
    from ctzoo.training.placement import load_model_for_placement

    devices = _devices(devices_text) if devices_text else None
    kinds = list(dict.fromkeys(device_kinds))
    if "cuda" in kinds and not torch.cuda.is_available():
        raise click.ClickException("--device cuda: this machine has no CUDA device; profile cuda on a GPU "
                                   "machine (--device cuda) and give both profiles to ctzoo place plan")
    try:
        name, model, inputs = load_model_for_placement(source, batch_size, training=not inference)
        graphs = []
        for kind in kinds:
            click.echo(f"profiling {name}: inputs {' '.join(str(list(t.shape)) for t in inputs)} on {kind}, "
                       f"{rounds} rounds", err=True)
            graphs.append(profile_model(model, inputs, kind, rounds, warmup, training=not inference, name=name))
        graph = merge_profiles(graphs)
        if devices:
            comm = measure_comm(devices, meta=graph.meta)
            for pair, (coef, intercept) in comm.pairs.items():
                click.echo(f"transfers {pair}: {1e-9 / coef if coef else float('inf'):.2f} GB/s + "
                           f"{1e6 * intercept:.0f} us", err=True)
            for note in graph.meta["comm"].get("notes", []):
                click.echo(f"warning: {note}", err=True)
    except (PlacementError, FileNotFoundError, ValueError, KeyError) as error:  # KeyError: an unknown zoo name
        raise click.ClickException(str(error).strip("'\"")) from None
    graph.save(out)
    permanent = sum(n.permanent_bytes for n in graph.nodes)
    steps = ", ".join(f"{1000 * sum(n.compute_s(kind, graph.training) for n in graph.nodes):.1f} ms on one {kind}"
                      for kind in kinds)
    click.echo(f"{out}: {len(graph.nodes)} nodes, {len(graph.edges)} edges, {_size(permanent)} permanent, "
               f"compute per step {steps}")


@place.command("plan")
@click.argument("profile_paths", metavar="PROFILE...", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--devices", "devices_text", required=True, help=DEVICES_HELP)
@click.option("--algorithm", type=click.Choice(["m-sct", "m-etf", "m-topo"]), default="m-sct", show_default=True,
              help="m-sct: ETF with the favourite child of an LP relaxation (HiGHS); m-etf: earliest start "
              "first; m-topo: fill devices in topological order.")
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=Path("plan.json"),
              show_default=True)
@click.option("--coplace", is_flag=True, help="Also merge single-successor chains into one group first "
              "(Baechi's co-placement; fewer, coarser nodes).")
def plan(profile_paths: tuple[Path, ...], devices_text: str, algorithm: str, out: Path, coplace: bool) -> None:
    """Place PROFILE's forward graph on --devices and write plan.json.

    Every kind of device in --devices needs timings in the profile: give one profile holding them all
    (ctzoo place profile --device cuda --device cpu), or one profile per kind of the same model, merged here
    (the first one's memory figures and transfer model). A kind without timings is refused.

    A graph that cannot fit is refused with larger caps that would (checked to fit; the message says how they
    were found); when the placer finds no placement but one device or the expert split fits, that baseline is
    the plan (with a warning). The table compares the plan with the baselines, all scored by the same
    simulator: one device (the fastest that holds the model), an expert's contiguous split balanced by
    compute, and m-TOPO.

    \b
    Example:
      ctzoo place plan r34.profile.json --devices cuda:0=6GiB,cpu=64GiB --out r34.plan.json
      ctzoo place plan r34.cuda.json r34.cpu.json --devices cuda:0=6GiB,cpu=64GiB --out r34.plan.json
    """
    from ctzoo.scaling.placement.graph import PlacementError
    from ctzoo.scaling.placement.planner import place as place_graph

    devices = _devices(devices_text)
    try:
        graph = _profiles(profile_paths)
        comm = _comm(graph)
        chosen = place_graph(graph, devices, algorithm, comm, coplace=coplace)
    except PlacementError as error:
        raise click.ClickException(str(error)) from None
    chosen.model = graph.model
    chosen.save(out)
    if "fallback" in chosen.meta:
        click.echo(f"warning: {algorithm} found no placement within the caps ({chosen.meta['placer_failed']}); "
                   f"the plan is the {chosen.meta['fallback']} baseline, which fits", err=True)
    click.echo(f"{algorithm} placed {len(graph.nodes)} nodes in {1000 * chosen.placement_s:.1f} ms: "
               f"predicted step {1000 * chosen.predicted_step_s:.2f} ms")
    for name, rows in _baseline_rows(graph, devices, comm, chosen, coplace):
        click.echo(f"  {name:<24} {rows}")
    click.echo(f"{out}")


def _baseline_rows(graph, devices, comm, chosen, coplace: bool):
    """(name, text) per plan: predicted step time and peak memory per device."""
    from ctzoo.scaling.placement.algorithms import CapacityError
    from ctzoo.scaling.placement.planner import place as place_graph
    from ctzoo.scaling.placement.simulate import expert_plan, simulate, single_device_plan

    def describe(placement, why: str = "does not fit") -> str:
        if placement is None:
            return why
        result = simulate(graph, placement, devices, comm)
        peaks = ", ".join(f"{d.name} {_size(result.peak_bytes.get(d.name, 0))}" for d in devices)
        return f"{1000 * result.makespan_s:9.2f} ms  {peaks}"

    label = chosen.algorithm + (f" ({chosen.meta['fallback']})" if "fallback" in chosen.meta else "")
    yield label, describe(chosen.placement)
    yield "one device", describe(single_device_plan(graph, devices, comm))
    yield "expert split", describe(expert_plan(graph, devices, comm))
    if chosen.algorithm != "m-topo":
        try:
            topo = place_graph(graph, devices, "m-topo", comm, coplace=coplace)
        except CapacityError:
            topo = None
        found = topo is not None and "fallback" not in topo.meta
        yield "m-topo", describe(topo.placement if found else None, "no placement within the caps")


@place.command("simulate")
@click.argument("paths", metavar="PROFILE... PLAN", nargs=-1, required=True,
                type=click.Path(exists=True, dir_okay=False, path_type=Path))
def simulate_plan(paths: tuple[Path, ...]) -> None:
    """Run PLAN over PROFILE in the simulator: step time, compute per device, transfers, peak memory.

    Exits with status 1 when a device's simulated peak exceeds its cap, or when PROFILE and the profile the plan
    was made from differ in a way that voids its memory figures (training against inference, other parameter
    bytes); another batch or input shape, and a plan too old to say, are warnings.
    """
    from ctzoo.scaling.placement.graph import PlacementError, plan_mismatches
    from ctzoo.scaling.placement.graph import Plan as PlacementPlan
    from ctzoo.scaling.placement.simulate import simulate

    if len(paths) < 2:
        raise click.UsageError("give a profile (or one per device kind) and then the plan")
    try:
        graph, chosen = _profiles(paths[:-1]), PlacementPlan.load(paths[-1])
        result = simulate(graph, chosen.placement, chosen.devices, _comm(graph))
    except PlacementError as error:
        raise click.ClickException(str(error)) from None
    click.echo(f"predicted step {1000 * result.makespan_s:.2f} ms, transfers {1000 * result.transfer_s:.2f} ms")
    over = []
    for device in chosen.devices:
        peak = result.peak_bytes.get(device.name, 0)
        flag = "  OVER THE CAP" if peak > device.memory_bytes else ""
        if flag:
            over.append(f"{device.name} peaks at {_size(peak)}, over its cap of {_size(device.memory_bytes)}")
        click.echo(f"  {device.name:<8} compute {1000 * result.compute_s.get(device.name, 0.0):9.2f} ms  peak "
                   f"{_size(peak)} of {_size(device.memory_bytes)}{flag}")
    errors, warnings = plan_mismatches(chosen, graph.summary())
    for warning in warnings:
        click.echo(f"warning: {warning}", err=True)
    problems = over + [f"against this profile, {error}" for error in errors]
    if problems:
        raise click.ClickException("; ".join(problems))


def _size(nbytes: int) -> str:
    from ctzoo.scaling.placement.simulate import format_bytes

    return format_bytes(nbytes)
