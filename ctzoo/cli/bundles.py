"""Model arguments of the commands: a zoo name or a bundle folder, resolved once into a ModelBundle."""

from __future__ import annotations

from collections.abc import Iterable

import click

from ctzoo.models.bundle import BundleError, ModelBundle, load_bundle


def resolve_bundles(names: Iterable[str], backend: str = "torch") -> dict[str, ModelBundle]:
    """``{name: bundle}`` for each distinct model argument; with the ONNX backend, a bundle without graphs is
    exported once into the cache (checked against PyTorch) and that exported bundle is used."""
    bundles = {}
    try:
        for name in dict.fromkeys(names):
            bundles[name] = load_bundle(name)
    except (KeyError, BundleError) as exc:  # UnknownModelError lists the zoo's names and close matches
        raise click.ClickException(str(exc).strip('"')) from exc
    if backend == "onnx":
        from ctzoo.export.repository import ensure_graphs

        try:
            bundles = {name: ensure_graphs(bundle) for name, bundle in bundles.items()}
        except (RuntimeError, ValueError) as exc:
            raise click.ClickException(f"exporting to ONNX failed: {exc}") from exc
    return bundles
