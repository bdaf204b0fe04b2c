"""``ctzoo expand``: grow a trained model wider and deeper without changing what it computes (LEMON)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("source", metavar="MODEL_OR_CHECKPOINT")
@click.option("--width-mult", type=click.FloatRange(min=1.0), default=2.0, show_default=True,
              help="Channels of every hidden layer times this (non-integer ratios work; GroupNorm spaces round "
                   "to whole groups). Inputs, outputs and class channels keep their size.")
@click.option("--depth-add", type=click.IntRange(min=0), default=0, show_default=True,
              help="Identity residual blocks added after every residual block.")
@click.option("--seed", type=int, default=0, show_default=True, help="Seed of the new (random) weights.")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder for expanded.pt (the checkpoint), expanded.json (the report) and, for a zoo model or "
                   "bundle, bundle/ (the expanded model as a bundle every command takes).")
def expand(source: str, width_mult: float, depth_add: int, seed: int, out: Path) -> None:
    """Expand MODEL_OR_CHECKPOINT losslessly: the larger model computes the same outputs, then trains on.

    MODEL_OR_CHECKPOINT is a zoo model (recistnet-mini, template-seg-abdomen), a model bundle folder, or a
    ctzoo train checkpoint (RECIST-Net RUN/best.pt, template segmenter RUN/template_seg/best.pt, UNet
    baseline RUN/unet/best.pt).
    The expanded model is checked against the original on random inputs and on slices of the embedded
    sample CT (eval mode); the command fails above 1e-5 relative difference. Continue training it with
    'init_from_expansion: {checkpoint: OUT/expanded.pt}' in a ctzoo train config (LEMON's schedule).

    \b
    Example:
      ctzoo expand recistnet-mini --width-mult 1.5 --depth-add 1 --out runs/recistnet-mini-x1.5
    """
    from ctzoo.scaling.channel_trace import UnsupportedLayerError
    from ctzoo.scaling.zoo_expand import expand_source, load_source_model, save_expanded, save_expanded_bundle

    try:
        loaded = load_source_model(source)
        expanded, report, checks = expand_source(loaded, width_mult, depth_add, seed)
    except (UnsupportedLayerError, ValueError, FileNotFoundError, AssertionError) as exc:
        raise click.ClickException(str(exc)) from exc
    out.mkdir(parents=True, exist_ok=True)
    save_expanded(out / "expanded.pt", loaded, expanded, report, seed, checks)
    written = [out / "expanded.pt", out / "expanded.json"]
    if loaded.architecture["builder"] in ("zoo", "bundle"):  # a bundle source gives a bundle
        written.append(save_expanded_bundle(out / "bundle", loaded.architecture.get("name") or source, expanded,
                                            report, seed, loaded))
    growth = report.parameters_after / report.parameters_before
    click.echo(f"{loaded.description}: {report.parameters_before:,} -> {report.parameters_after:,} parameters "
               f"(x{growth:.2f}), {report.blocks_added} identity blocks added")
    click.echo(f"{'check':<10} {'max |diff|':>12} {'relative':>10}")
    for name, (absolute, relative) in checks.items():
        click.echo(f"{name:<10} {absolute:>12.2e} {relative:>10.2e}")
    click.echo(f"wrote {', '.join(map(str, written))}")
