"""``--version`` of the commands that publish weights: a semantic version, checked before any work is done."""

from __future__ import annotations

import re

import click


def _semantic_version(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``value`` when it is a semantic version as a model card takes it (MAJOR.MINOR.PATCH[-pre][+build])."""
    from ctzoo.models.registry import SEMVER  # the card's own pattern; torch only when the command runs

    if not re.match(SEMVER, value):
        raise click.BadParameter(f"{value!r} is not a semantic version (MAJOR.MINOR.PATCH, e.g. 0.1.0)")
    return value


def version_option(**settings):
    """A ``--version`` option for the weights' semantic version."""
    return click.option("--version", "version", callback=_semantic_version, **settings)
