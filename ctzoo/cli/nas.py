"""``ctzoo nas``: one-shot architecture search over the template segmenter (NAS-Navigator); ``view`` draws a
search run as one self-contained HTML page (:mod:`ctzoo.nas.explorer`); ``export`` hands a candidate over to the
zoo as a retrained bundle (:mod:`ctzoo.nas.handoff`)."""

from __future__ import annotations

from pathlib import Path

import click

from ctzoo.cli.device_option import device_option
from ctzoo.cli.version_option import version_option
from ctzoo.io.atomic import atomic_path
from ctzoo.nas.explorer import read_candidates, render_explorer_html  # plotly is imported on use


@click.group()
def nas() -> None:
    """One-shot architecture search over the template segmenter (NAS-Navigator).

    \b
    A search trains one supernet, scores candidate architectures with its shared weights (Dice, measured
    latency, params, FLOPs) and writes them to RUN/candidates.json, one iteration after another as blocks
    are dropped or locked:
      ctzoo nas search CONFIG --out RUN          train the supernet, score candidates (iteration 0)
      ctzoo nas view RUN                         one self-contained page to pick an architecture from
      ctzoo nas constrain RUN --drop level2.kernel=5 --lock gate=none     narrow the space
      ctzoo nas search CONFIG --out RUN --resume the next iteration, on the narrowed space
      ctzoo nas export RUN ID --config CONFIG --out FOLDER   retrain candidate ID standalone, publish a bundle
    """


PENDING_FILE = "constraints.json"  # constraints recorded by `constrain`, applied by the next `search --resume`


def _pending(run: Path) -> dict[str, list[str]]:
    import json

    path = run / PENDING_FILE
    if not path.exists():
        return {"drop": [], "lock": []}
    try:
        pending = json.loads(path.read_text("utf-8"))
        return {"drop": [str(c) for c in pending["drop"]], "lock": [str(c) for c in pending["lock"]]}
    except (ValueError, KeyError, TypeError) as error:
        raise click.ClickException(f"{path} is not a constraints file written by ctzoo nas constrain ({error})")


@nas.command("search")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", "run", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The search run's folder: the supernet's checkpoints and candidates.json.")
@click.option("--epochs", type=click.IntRange(min=1), default=1, show_default=True,
              help="Supernet epochs this iteration (one sampled architecture per step).")
@click.option("--candidates", type=click.IntRange(min=1), default=8, show_default=True,
              help="New architectures scored this iteration with the shared weights.")
@click.option("--resume", is_flag=True, help="Continue the search in RUN: the supernet trains on, on the space "
              "narrowed by ctzoo nas constrain, and new candidates are scored.")
@click.option("--reference", is_flag=True, help="Also score the network CONFIG's model: block describes (the model "
              "you have now, e.g. the shipped one), once, so the explorer shows where it stands among the candidates.")
@click.option("--seed", type=int, default=0, show_default=True)
@device_option("auto", "auto, cpu or cuda (training; latency is "
               "measured on the CPU with ONNX Runtime, on a GPU with PyTorch).")
def search(config: Path, run: Path, epochs: int, candidates: int, resume: bool, reference: bool, seed: int,
           device: str) -> None:
    """One iteration of a one-shot search over the template segmenter of CONFIG (a template_seg train config).

    Trains the supernet (its sub-networks are the candidates: width, residual units, kernel size and fusion per
    level, the gate) with one uniformly sampled architecture per step, then scores CANDIDATES architectures not
    seen before with the shared weights: Dice on the data's val cases where they are patients of their own (MSD
    folders; the test cases stay unseen), else on the other patient (the TotalSegmentator sample's test patient),
    params, FLOPs, and the latency of the extracted sub-network exported to ONNX. Appends them to
    RUN/candidates.json. An iteration interrupted after training is completed by running it again (without
    retraining); --resume with another config than the run's is refused.
    """
    from ctzoo.nas.search import CANDIDATES_FILE, architecture_of, search_iteration, space_for
    from ctzoo.training.template_seg_task import load_seg_config, seg_classes

    started = (run / CANDIDATES_FILE).exists()
    if started and not resume:
        raise click.ClickException(f"{run} already holds a search: --resume continues it, or choose another --out")
    if resume and not started:
        interrupted = (run / "supernet" / "last.pt").exists()
        raise click.ClickException(f"{run} holds no search to resume" + (
            ": its first iteration was interrupted; run it again without --resume, which completes it"
            if interrupted else ": start without --resume"))
    pending = _pending(run)
    try:
        cfg = load_seg_config(config)
        include = [architecture_of(space_for(cfg, len(seg_classes(cfg.data))), cfg.model)] if reference else []
        document = search_iteration(cfg, run, epochs, candidates, pending["drop"], pending["lock"], seed, device,
                                    progress=True, include=include)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    (run / PENDING_FILE).unlink(missing_ok=True)  # applied: recorded in the iteration's constraints
    iteration = document["iterations"][-1]
    scored = [c for c in document["candidates"] if c["iteration"] == iteration["iteration"]]
    best = max(scored, key=lambda c: c["dice"])
    left = _unscored(document)
    click.echo(f"iteration {iteration['iteration']}: {iteration['steps']} supernet steps, {len(scored)} candidates; "
               f"best Dice {best['dice']:.4f} ({best['id']}: {best['description']}, {best['latency_ms']:.1f} ms); "
               + ("every architecture of the space is scored now; " if left == 0 else "") + f"ctzoo nas view {run}")


def _unscored(document: dict) -> int:
    """How many architectures the space of a ``candidates.json`` ``document`` allows that it has not scored."""
    from ctzoo.nas.space import Architecture, SearchSpace, count_unscored

    scored = [Architecture.from_json(c["architecture"]) for c in document["candidates"]]
    return count_unscored(SearchSpace.from_json(document["space"]), scored)


@nas.command("constrain")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--drop", multiple=True, metavar="DECISION=VALUE",
              help="Exclude a value, e.g. level2.kernel=5 or level*.units=1 (every level). Repeatable.")
@click.option("--lock", multiple=True, metavar="DECISION=VALUE",
              help="Keep only this value, e.g. gate=none or level0.fusion=true. Repeatable.")
def constrain(run: Path, drop: tuple[str, ...], lock: tuple[str, ...]) -> None:
    """Narrow the search space of RUN for its next iteration (ctzoo nas search ... --resume).

    The constraints are checked against the run's space now (an unknown decision or value, one that would
    leave a decision no value, or constraints that leave no architecture unscored, are refused) and kept in
    RUN/constraints.json until that iteration applies them; repeated calls add up.
    """
    import json

    from ctzoo.nas.space import SearchSpace, count_architectures

    try:
        document = read_candidates(run)
        space = SearchSpace.from_json(document["space"])
        pending = _pending(run)
        pending = {"drop": pending["drop"] + list(drop), "lock": pending["lock"] + list(lock)}
        narrowed = space.constrain(pending["drop"], pending["lock"])
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    left = _unscored({**document, "space": narrowed.to_json()})
    if left == 0:
        raise click.ClickException(f"these constraints leave {count_architectures(narrowed):,} architectures, all "
                                   "scored already: the next search would have none to score; nothing recorded")
    with atomic_path(run / PENDING_FILE) as partial:
        partial.write_text(json.dumps(pending, indent=2) + "\n", encoding="utf-8")
    click.echo(f"{count_architectures(space):,} architectures -> {count_architectures(narrowed):,} ({left:,} not "
               f"scored yet); the next ctzoo nas search ... --out {run} --resume searches them")


@nas.command("view")
@click.argument("run", type=click.Path(path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The HTML file to write. Default: explorer.html in RUN.")
def view(run: Path, out: Path | None) -> None:
    """Write one self-contained HTML page (no network needed to open it) exploring a search RUN: the folder
    holding candidates.json, or that file.

    \b
    The page shows:
      Dice against latency, one point per candidate coloured by iteration, with the Pareto front
        (highest Dice for its latency) drawn as a step line and its points ringed, and the model
        scored by search --reference as a red diamond;
      the candidates' vectors in 2-D (PCA by SVD, signs fixed), coloured by Dice, the front outlined;
      each decision of the architecture (nested keys flattened, e.g. levels.2.kernel) and value: the
        mean Dice and mean latency of the candidates with it, and how many;
      per iteration: supernet steps, candidates, best Dice, front size, the blocks dropped and locked;
      a header with the run, the counts, the best candidate by Dice and the fastest on the front.
    Hovering a point names the candidate (id, description, Dice, latency, params, FLOPs); clicking it
    shows its whole architecture beside the plots and marks it in every plot.
    """
    try:
        data = read_candidates(run)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    out = out if out is not None else Path(data["run"]) / "explorer.html"
    page = render_explorer_html(data)
    with atomic_path(out) as partial:
        partial.write_text(page, encoding="utf-8")
    click.echo(f"{out}: {len(data['candidates'])} candidates over {len(data['iterations'])} iterations, "
               f"{len(page) / 2**20:.1f} MiB")


@nas.command("export")
@click.argument("run", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.argument("candidate")
@click.option("--config", type=click.Path(exists=True, dir_okay=False, path_type=Path), required=True,
              help="The template_seg train config whose recipe retrains it (data, augmentation, optimiser, epochs): "
                   "the one the search ran with.")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The bundle folder to write (every command takes it as --model OUT).")
@click.option("--epochs", type=click.IntRange(min=1), default=None, help="Retraining epochs. Default: the config's.")
@click.option("--name", default=None, help="The model's name on its card. Default: template-seg-nas-CANDIDATE.")
@version_option(default="0.1.0", show_default=True, help="Semantic version of the weights.")
@click.option("--init", type=click.Choice(["supernet", "scratch"]), default="supernet", show_default=True,
              help="Start from the supernet's weights for the candidate (RUN/supernet/last.pt), or from scratch.")
@device_option("auto", "auto, cpu or cuda.")
def export_command(run: Path, candidate: str, config: Path, out: Path, epochs: int | None, name: str | None,
                   version: str, init: str, device: str) -> None:
    """Hand candidate CANDIDATE of search RUN over to the zoo: retrain it standalone and publish it as a bundle.

    \b
    CANDIDATE is an id of RUN/candidates.json (as ctzoo nas view shows; a unique prefix will do). Its
    sub-network is rebuilt (per-level widths, kernels, residual units, fused levels, gate), trained with
    the normal template segmenter recipe of CONFIG (no UNet baseline), starting from the supernet's
    weights for it unless --init scratch, chosen on the val cases and tested on the test cases, then
    written to OUT as a model bundle with its template bank. The card names the run and the candidate,
    its architecture, its one-shot Dice and latency and its standalone val and test Dice. The retraining
    stays in RUN/export/CANDIDATE (config.yaml, checkpoints, comparison.json). Then, e.g.:
      ctzoo infer SCAN --model OUT --out masks
      ctzoo export OUT --out REPO  (then ctzoo serve --repository REPO)
    """
    from ctzoo.nas.handoff import export_candidate

    try:
        folder = export_candidate(run, candidate, config, out, epochs, name, version, init, device, progress=True)
    except (ValueError, FileNotFoundError) as error:
        raise click.ClickException(str(error)) from error
    from ctzoo.models import load_bundle

    card = load_bundle(folder).card
    dice = card.metrics.get("dice_mean")
    click.echo(f"published {card.name} {card.version} into {folder}: {card.parameters:,} parameters, test Dice "
               f"{'-' if dice is None else f'{dice.value:.4f}'}")
