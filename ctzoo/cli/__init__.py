"""The ``ctzoo`` command line. One module per command group; this file only assembles them."""

from __future__ import annotations

import logging
import warnings

import click

from ctzoo import __version__
from ctzoo.cli.cohort import cohort
from ctzoo.cli.data import data
from ctzoo.cli.expand import expand
from ctzoo.cli.export import export
from ctzoo.cli.infer import infer
from ctzoo.cli.info import convert, info
from ctzoo.cli.nas import nas
from ctzoo.cli.pacs import pacs
from ctzoo.cli.perf import perf
from ctzoo.cli.place import place
from ctzoo.cli.serve import serve
from ctzoo.cli.smap import smap
from ctzoo.cli.train import evaluate, train
from ctzoo.cli.zoo import zoo


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
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


main.add_command(info)
main.add_command(convert)
main.add_command(data)
main.add_command(zoo)
main.add_command(infer)
main.add_command(train)
main.add_command(evaluate)
main.add_command(export)
main.add_command(serve)
main.add_command(pacs)
main.add_command(expand)
main.add_command(perf)
main.add_command(place)
main.add_command(nas)
main.add_command(cohort)
main.add_command(smap)
