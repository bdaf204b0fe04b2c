"""``ctzoo data``: the sample CT that ships with ctzoo and the samples it can fetch."""

from __future__ import annotations

import json
from pathlib import Path

import click

from ctzoo.datasets import samples


@click.group()
def data() -> None:
    """Sample CT data: where it is, and fetching more."""


@data.command("fetch-samples")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache folder. Default: $CTZOO_CACHE, else $XDG_CACHE_HOME/ctzoo, else ~/.cache/ctzoo.")
@click.option("--from-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help=f"Use an already downloaded {samples.SDIST_NAME} (for offline machines) instead of pip.")
@click.option("--force", is_flag=True, help="Extract again even if the cache is complete.")
def fetch_samples(cache_dir: Path | None, from_file: Path | None, force: bool) -> None:
    """Fetch real CT volumes with organ labels (TotalSegmentator 2.18.0 sdist, Apache-2.0).

    Runs 'pip download --no-deps --no-binary :all: totalsegmentator==2.18.0', checks the
    pinned sha256, and extracts only the CT volumes, their label maps and the label names
    into the cache. Offline? Download the sdist elsewhere and pass --from-file.
    """
    try:
        folder = samples.fetch_samples(cache=cache_dir, from_file=from_file, force=force)
    except samples.SampleError as exc:
        raise click.ClickException(str(exc)) from exc
    manifest = json.loads((folder / samples.MANIFEST_FILE).read_text())
    click.echo(f"samples in {folder}:")
    for name, entry in manifest["files"].items():
        click.echo(f"  {name:26s} {entry['bytes'] / 1e6:6.1f} MB  {entry['description']}")
    click.echo(f"  {samples.LABELS_FILE:26s} label value -> organ name")


@data.command("list")
@click.option("--cache-dir", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Cache folder to look in (default as for fetch-samples).")
def list_samples(cache_dir: Path | None) -> None:
    """Show the embedded sample and which fetchable samples are in the cache."""
    click.echo(f"embedded  sample_ct (DICOM, 20 slices): {samples.sample_ct_dicom()}")
    folder = samples.samples_dir(cache_dir)
    for name, (_, description) in samples.FETCHED_SAMPLES.items():
        state = "fetched " if (folder / name).exists() else "missing "
        click.echo(f"{state}  {name}: {description}")
    if not (folder / samples.MANIFEST_FILE).exists():
        click.echo("run 'ctzoo data fetch-samples' to fetch the missing ones")
