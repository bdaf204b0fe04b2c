"""The ``ctzoo`` command line. One module per command group; this file only assembles them."""

from __future__ import annotations

import errno
import importlib
import logging
import warnings
from collections.abc import Iterator

import click

from ctzoo import __version__

#: Each command, where it is defined and its one-line summary: a module is imported only when its command runs, so
#: ``ctzoo smap party`` or ``ctzoo perf report`` starts without importing torch and MONAI (3-4 s on a small machine)
#: that it never uses, and ``ctzoo --help`` lists the commands from these summaries without importing any
#: (tests/test_cli.py checks each summary against its command's own docstring).
COMMANDS = {
    "cohort": ("ctzoo.cli.cohort:cohort",
               "Cohorts of CT studies: who and what the zoo's models are run on (HealthPrism)."),
    "convert": ("ctzoo.cli.info:convert", "Convert SOURCE (DICOM folder/zip/file, NIfTI, NRRD, MHA) to TARGET "
                "(.nii.gz, .nii, .nrrd or .mha)."),
    "data": ("ctzoo.cli.data:data", "Sample CT data: where it is, and fetching more."),
    "eval": ("ctzoo.cli.train:evaluate",
             "Score a model on a split: detectors (RECIST-Net) by FROC, segmenters by Dice and HD95."),
    "expand": ("ctzoo.cli.expand:expand",
               "Expand MODEL_OR_CHECKPOINT losslessly: the larger model computes the same outputs, then trains on."),
    "export": ("ctzoo.cli.export:export",
               "Export MODEL_OR_CHECKPOINT to ONNX in a Triton model repository, checked against PyTorch."),
    "infer": ("ctzoo.cli.infer:infer",
              "Run zoo models over CT volumes: detect lesions (RECIST-Net) or segment organs."),
    "info": ("ctzoo.cli.info:info",
             "Show what PATH holds: DICOM series found, size, spacing, orientation, HU range."),
    "nas": ("ctzoo.cli.nas:nas", "One-shot architecture search over the template segmenter (NAS-Navigator)."),
    "pacs": ("ctzoo.cli.pacs:pacs", "Wire ctzoo to a PACS: every new CT series is processed once, results go back "
             "as DICOM SR and SEG."),
    "perf": ("ctzoo.cli.perf:perf", "Latency anomalies of ctzoo's own work (Chimbuko's design)."),
    "place": ("ctzoo.cli.place:place",
              "Place a model across memory-capped devices (Baechi: m-TOPO, m-ETF, m-SCT), in seconds."),
    "serve": ("ctzoo.cli.serve:serve",
              "Serve the models of a repository over HTTP: KServe v2 / Open Inference Protocol."),
    "smap": ("ctzoo.cli.smap:smap", "Joint t-SNE maps of lesion embeddings across hospitals (SMAP), each site's "
             "points staying at the site."),
    "train": ("ctzoo.cli.train:train",
              "Train the model that CONFIG describes (e.g. configs/recistnet_mini_cpu.yaml)."),
    "zoo": ("ctzoo.cli.zoo:zoo",
            "The model zoo: registered models, their weights (shipped in the package) and model cards."),
}


#: Errors of an output that cannot be written (a read-only or full disk, a folder without write permission).
_UNWRITABLE = {errno.EROFS: "cannot write", errno.ENOSPC: "cannot write", errno.EDQUOT: "cannot write",
               errno.EFBIG: "cannot write", errno.EACCES: "permission denied", errno.EPERM: "permission denied"}


def unwritable_output_error(exc: OSError) -> click.ClickException | None:
    """One error line for an uncaught OSError of an output that cannot be written, naming the path (where the
    OSError does) and the system's reason; None for any other OSError, which stays a traceback: a bug to show."""
    if exc.errno not in _UNWRITABLE:
        return None
    where = f"{exc.filename}: " if exc.filename is not None else ""
    return click.ClickException(f"{where}{_UNWRITABLE[exc.errno]}: {exc.strerror}")


class LazyGroup(click.Group):
    """A click group whose subcommands (:data:`COMMANDS`) are imported on first use; an output the command cannot
    write (:func:`unwritable_output_error`) ends it with one error line, whichever command it was."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except OSError as exc:
            if (error := unwritable_output_error(exc)) is None:
                raise
            raise error from exc

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(COMMANDS)

    def get_command(self, ctx: click.Context, name: str) -> click.Command | None:
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name][0].split(":")
        command = getattr(importlib.import_module(module), attribute)
        if command.name != name:  # the table and the definition must agree, or `ctzoo --help` would mislead
            raise RuntimeError(f"{COMMANDS[name][0]} defines the command {command.name!r}, not {name!r}")
        return command

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        """The commands and their summaries, shortened as click shortens a command's own help."""
        limit = formatter.width - 6 - max(len(name) for name in COMMANDS)
        # a stand-in command with the summary as its help: click's own shortening, without importing the command
        rows = [(name, click.Command(name, help=COMMANDS[name][1]).get_short_help_str(limit))
                for name in self.list_commands(ctx)]
        with formatter.section("Commands"):
            formatter.write_dl(rows)


def command_paths(group: click.Group, prefix: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command under ``group`` as its words, e.g. ``("smap", "party")``, groups before their commands (each
    command's module is imported on the way)."""
    context = click.Context(group)
    for name in group.list_commands(context):
        command = group.get_command(context, name)
        yield (*prefix, name)
        if isinstance(command, click.Group):
            yield from command_paths(command, (*prefix, name))


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="ctzoo")
@click.option("-v", "--verbose", count=True, help="More log output (-v info, -vv debug).")
def main(verbose: int) -> None:
    """ctzoo: CT models you can train, trust, export and serve.

    \b
    Start with:
      ctzoo info                  what the embedded sample CT holds
      ctzoo info PATH             the same for your DICOM folder/zip, NIfTI, NRRD or MHA
      ctzoo convert IN OUT.nii.gz a DICOM series (or any volume) to NIfTI/NRRD/MHA
      ctzoo data fetch-samples    fetch more real CT with organ labels into the cache
      ctzoo data make-deeplesion-mini OUT   a DeepLesion-format dataset built from real CT
      ctzoo data cache ROOT       decode DeepLesion's PNG slices once into a shared store for training
      ctzoo train CONFIG --out RUN          train (configs/recistnet_*.yaml); --resume continues
      ctzoo eval CONFIG --checkpoint RUN/best.pt --out DIR   DeepLesion FROC
      ctzoo zoo list / ctzoo infer [INPUT]  zoo models, and running one over CT volumes
      ctzoo export MODEL --out REPO         ONNX model repository (Triton layout), checked against PyTorch
      ctzoo serve --repository REPO         KServe v2 inference service (token: $CTZOO_SERVE_TOKENS)
      ctzoo pacs watch|listen CONFIG        the PACS bridge: CT series in, DICOM SR/SEG back
      ctzoo expand MODEL --width-mult 2 --out DIR   grow a trained model losslessly (LEMON)
      ctzoo perf report STORE --out R.html  latency anomalies and their provenance (--perf on a command)
      ctzoo nas view RUN                    a NAS search run's candidates: Dice vs latency, front, effects
      ctzoo cohort build|fit|report         cohorts: context and image per series, a gated model, 3 views
      ctzoo smap features|keys|party|view   a joint t-SNE of lesions across hospitals on secret shares

    Run 'ctzoo COMMAND --help' for the options of each command.
    """
    level = logging.WARNING - 10 * verbose
    logging.basicConfig(level=max(level, logging.DEBUG), format="%(levelname)s %(name)s: %(message)s")
    # Library warnings are collected on each Volume and printed by the commands, once.
    warnings.simplefilter("ignore", UserWarning)

