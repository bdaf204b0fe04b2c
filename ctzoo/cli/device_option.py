"""``--device`` of the commands that run PyTorch on this machine, checked before anything is loaded or written."""

from __future__ import annotations

import click


def _checked_device(ctx: click.Context, param: click.Parameter, value: str) -> str:
    """``value`` as given (auto stays auto), once this machine has the device: a missing CUDA device is one error
    line at the start, not torch's AssertionError after the data or models have loaded."""
    from ctzoo.inference.backends import resolve_device  # torch: only when the command runs, never for --help

    try:
        resolve_device(value)
    except ValueError as exc:
        raise click.ClickException(str(exc)) from exc
    return value


def device_option(default: str, help: str):
    """A ``--device`` option whose value this machine has (:func:`ctzoo.inference.backends.resolve_device`)."""
    return click.option("--device", default=default, show_default=True, help=help, callback=_checked_device)
