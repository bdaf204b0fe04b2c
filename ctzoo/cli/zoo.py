"""``ctzoo zoo``: the registered models, their shipped weights and model cards."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ctzoo.cli.version_option import version_option

# ctzoo.models is imported inside the commands: it imports torch, which would slow every other command


def _parameters(count: int) -> str:
    return f"{count / 1e6:.1f}M" if count >= 100_000 else f"{count:,}"


@click.group()
def zoo() -> None:
    """The model zoo: registered models, their weights (shipped in the package) and model cards.

    \b
      ctzoo zoo list              every registered model, with its version if weights are shipped
      ctzoo zoo show NAME         the model card of NAME (a zoo name or a bundle folder)

    Weights load offline in Python: ctzoo.models.create_model(NAME, pretrained=True).
    """


@zoo.command("list", short_help="Registered models, their versions and whether weights are shipped.")
@click.argument("pattern", default="*")
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
def list_command(pattern: str, as_json: bool) -> None:
    """List registered models whose name matches PATTERN (shell-style, e.g. 'recist*'; default all).

    Columns: name, task, parameters and version (from the model card, when weights are shipped) and
    whether weights are shipped in the package.
    """
    from ctzoo.models import BundleError, list_models, load_card, model_entry

    rows = []
    for name in list_models(pattern):
        entry = model_entry(name)
        row = {"name": name, "task": entry.task, "parameters": None, "weights": entry.has_weights, "version": None}
        if entry.has_weights:
            try:
                card = load_card(name)
                row.update(parameters=card.parameters, version=card.version)
            except BundleError:  # a broken card is reported, not allowed to hide the other models
                row["version"] = "invalid card"
        rows.append(row)
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    if not rows:
        click.echo("no registered model matches" if pattern != "*" else "no models are registered yet")
        return
    table = [("NAME", "TASK", "PARAMETERS", "WEIGHTS", "VERSION")] + [
        (r["name"], r["task"], "-" if r["parameters"] is None else _parameters(r["parameters"]),
         "yes" if r["weights"] else "no", r["version"] or "-") for r in rows]
    widths = [max(len(r[i]) for r in table) for i in range(len(table[0]))]
    for r in table:
        click.echo("  ".join(cell.ljust(width) for cell, width in zip(r, widths)).rstrip())


@zoo.command("show", short_help="Print the model card of NAME (a zoo name or a bundle folder).")
@click.argument("name", metavar="NAME|FOLDER")
@click.option("--json", "as_json", is_flag=True, help="Print the card as JSON (card.json) instead of markdown.")
def show(name: str, as_json: bool) -> None:
    """Print the model card of NAME, a zoo model or a bundle folder (its MODEL_CARD.md), or what is known of a zoo
    model whose weights are not shipped yet."""
    from ctzoo.models import BundleError, UnknownModelError, list_models, model_entry
    from ctzoo.models.bundle import bundle_folder, read_card

    entry = model_entry(name) if name in list_models() else None
    try:
        card = None if entry is not None and not entry.has_weights else read_card(bundle_folder(name))
    except (UnknownModelError, BundleError) as exc:
        raise click.ClickException(str(exc)) from exc
    if card is not None:
        click.echo(card.model_dump_json(indent=2) if as_json else card.to_markdown())
        return
    summary = {"name": entry.name, "task": entry.task, "description": entry.description,
               "input_spec": entry.input_spec, "default_config": entry.default_config}
    if as_json:
        click.echo(json.dumps({**summary, "weights": None}, indent=2))
        return
    click.echo(f"{name}: no weights are shipped yet (expected in {entry.weights_dir}).\n")
    for key, value in summary.items():
        click.echo(f"{key}: {value if isinstance(value, str) else json.dumps(value)}")


@zoo.command("publish")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The training config of the run.")
@click.option("--name", required=True, help="Registered zoo name to publish as (ctzoo zoo list).")
@version_option(required=True, help="Semantic version of these weights, e.g. 0.1.0.")
@click.option("--split", type=click.Choice(["val", "test"]), default="test", show_default=True,
              help="Split the card's metrics are measured on.")
@click.option("--data-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Replace data.root of the config.")
@click.option("--notes", default="", help="A line for the card's training table: a run stopped early, resumed "
                                          "on other hardware, anything a reader must know (RECIST-Net runs).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Write the bundle into this folder instead of the package's weights folder: your own model, "
                   "which every command takes as --model OUT.")
@click.option("--operating-fp", type=click.Choice(["0.125", "0.25", "0.5", "1", "2"]), default=None,
              help="RECIST-Net: choose the card's score threshold on val for this many false positives per image, "
                   "and count what it reports there on the real CT scans without known lesions.")
def publish(run_dir: Path, config: Path, name: str, version: str, split: str, data_root: Path | None,
            notes: str, out: Path | None, operating_fp: str | None) -> None:
    """Evaluate RUN_DIR/best.pt and publish it as zoo model NAME: a model bundle (weights, network,
    model card), written into the package's weights folder (or --out) atomically.

    For a template_seg run (ctzoo train configs/template_seg_*.yaml), RUN_DIR/template_seg/best.pt is
    published with its template bank, and the card takes the test metrics of RUN_DIR/comparison.json.
    """
    from ctzoo.cli.train import config_task
    from ctzoo.training.publish import publish_recistnet, publish_template_seg

    try:
        if config_task(config) == "template_seg":
            folder = publish_template_seg(run_dir, config, name, version, data_root, target=out)
        else:
            folder = publish_recistnet(run_dir, config, name, version, split, data_root, notes=notes, target=out,
                                       operating_fp=None if operating_fp is None else float(operating_fp))
    except (KeyError, ValueError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"published {name} {version} into {folder}")
