"""``ctzoo data``: the sample CT that ships with ctzoo and the samples it can fetch."""

from __future__ import annotations

import json
import os
from pathlib import Path

import click

from ctzoo.cli.paths import require_folder
from ctzoo.datasets import samples
from ctzoo.datasets.deeplesion import mini


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


@data.command("sample")
@click.argument("out", type=click.Path(path_type=Path))
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def sample(out: Path, force: bool) -> None:
    """Write the embedded sample CT (a real 20-slice abdominal CT, Apache-2.0) to OUT.

    \b
    OUT decides the format:
      ct.nii.gz, ct.nii, ct.nrrd, ct.mha   the volume (int16 HU, geometry kept)
      ct.zip                               the DICOM series zipped (what POST /studies takes)
      any other name                       a folder with the DICOM files, LICENSE and NOTICE.md

    \b
    Example:
      ctzoo data sample ct.nii.gz && ctzoo info ct.nii.gz
    """
    require_folder(out.parent)
    try:
        written, what = samples.write_sample(out, force=force)
    except (FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(f"wrote {written} ({what})")


@data.command("make-deeplesion-mini")
@click.argument("out", type=click.Path(file_okay=False, path_type=Path))
@click.option("--cases", type=click.IntRange(min=1), default=24, show_default=True,
              help="Number of series (patient/study/series); patients get 1-2 studies, split 60/20/20 by patient.")
@click.option("--seed", type=int, default=0, show_default=True,
              help="Random seed; the same seed writes byte-identical files.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists and is not empty.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Processes building cases [default: the CPU count]; the files are the same for any number.")
@click.option("--test-source", type=click.Choice(list(samples.REAL_CT_SCANS)), default=None,
              help="Hold this real scan out: its cases form the whole test split and no train or val case "
                   "comes from it (unseen anatomy). Train/val then split the other scans' patients 75/25.")
@click.option("--from", "built", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="With --test-source: re-split this already built miniature (built without --test-source; its "
                   "cases and seed are used) instead of drawing it again. Images are hard-linked; seconds, not "
                   "minutes, and the same files as a fresh build.")
def make_deeplesion_mini(out: Path, cases: int, seed: int, force: bool, workers: int | None,
                         test_source: str | None, built: Path | None) -> None:
    """Build a miniature DeepLesion in OUT from the real sample CT with synthetic lesions.

    Writes DeepLesion's exact layout (DL_info.csv, Images_png/{patient}_{study}_{series}/{slice}.png as
    16-bit HU + 32768, 512 x 512) plus masks/ (each lesion's key-slice mask), lesions.json (true type,
    organ, HU, volume) and NOTICE.md. Uses the TotalSegmentator 2.18.0 samples (fetched into the cache
    if missing). Built beside OUT and renamed into place when complete.

    \b
    Leave-one-scan-out (FROC on anatomy the model never saw):
      ctzoo data make-deeplesion-mini data/loso-aorta --cases 240 --test-source aorta_example_ct
      ctzoo data make-deeplesion-mini data/loso-aorta --test-source aorta_example_ct --from data/deeplesion-mini
    """
    if built is not None and test_source is None:
        raise click.UsageError("--from re-splits a built miniature: give --test-source too")
    try:
        if built is not None:
            from ctzoo.datasets.deeplesion.held_out import hold_out_source

            folder = hold_out_source(built, out, test_source, force=force)
        else:
            folder = mini.make_deeplesion_mini(out, cases=cases, seed=seed, force=force, progress=True,
                                              workers=workers or os.cpu_count() or 1, test_source=test_source)
    except (samples.SampleError, FileExistsError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    summary = json.loads((folder / "lesions.json").read_text())
    click.echo(f"{folder}: {len(summary['series'])} series, {len(summary['lesions'])} lesions "
               f"(DL_info.csv, Images_png/, masks/, lesions.json, NOTICE.md)")


@data.command("cache")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="The store's folder [default: ROOT/slice_cache]: a new or empty folder, or a slice store, which is "
                   "replaced whole when the build completes. Anything else, ROOT or Images_png is refused.")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="Decoding processes [default: CPUs - 1, at most 8].")
def cache(root: Path, out: Path | None, workers: int | None) -> None:
    """Decode DeepLesion's PNG slices once into a memory-mapped store (HU as int16, each series contiguous) that
    training reads instead of the PNGs: set `slice_cache: ROOT/slice_cache` under `data:` in the train config.

    ROOT holds DL_info.csv and Images_png/ (the download, or a miniature). Every slice of every series the CSV
    names is stored; samples read from the store are identical to those decoded from the PNGs, and a series whose
    PNGs changed since is read from its PNGs again (with a warning) until the store is rebuilt. A build that does
    not fit the free disk space is refused before decoding.
    """
    from concurrent.futures.process import BrokenProcessPool

    from tqdm import tqdm

    from ctzoo.datasets.deeplesion.info_csv import read_dl_info
    from ctzoo.datasets.deeplesion.slice_cache import CACHE_DIR, build_slice_cache, check_store_target

    target = out or root / CACHE_DIR
    try:
        check_store_target(root / "Images_png", target)  # before the progress bar: a refusal is one line
        folders = {row.series_folder for row in read_dl_info(root / "DL_info.csv")}
        with tqdm(total=len(folders), desc="slice store", unit="series") as bar:
            report = build_slice_cache(root / "Images_png", folders, target, workers,
                                       progress=lambda done, total: bar.update(done - bar.n))
    except (FileNotFoundError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    except BrokenProcessPool as exc:
        raise click.ClickException(f"{target}: a decoding process died (out of memory? try fewer --workers); "
                                   "nothing was written") from exc
    except OSError as exc:  # a full disk, a read-only or vanished folder: the old store (if any) is kept
        raise click.ClickException(f"{target}: building the slice store failed: {exc}") from exc
    click.echo(f"{target}: {report['series']} series, {report['slices']} slices, {report['bytes'] / 1e9:.2f} GB "
               f"in {report['seconds']:.1f} s ({report['slices'] / max(report['seconds'], 1e-9):.0f} slices/s)")


@data.command("stats")
@click.argument("root", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--png", "png_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the lesion-size histogram here (default: ROOT/lesion_sizes.png if ROOT is writable).")
@click.option("--overlays", type=click.Path(file_okay=False, path_type=Path), default=None,
              help="Also draw up to --limit key slices with their RECIST axes and boxes into this folder.")
@click.option("--limit", type=click.IntRange(min=1), default=8, show_default=True, help="Key slices to draw.")
@click.option("--json", "as_json", is_flag=True, help="Print the counts as JSON instead of a table.")
@click.option("--vs-deeplesion", "versus_path", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write lesion types and sizes beside DeepLesion's here (default: ROOT/vs_deeplesion.png if ROOT "
                   "is writable).")
@click.option("--reference", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None,
              help="The real DeepLesion DL_info.csv to compare with (default: DeepLesion's published type counts "
                   "and median size).")
def stats(root: Path, png_path: Path | None, overlays: Path | None, limit: int, as_json: bool,
          versus_path: Path | None, reference: Path | None) -> None:
    """Count what a DeepLesion folder holds (ROOT with DL_info.csv and Images_png/).

    Prints lesions, key images and patients per official split, lesions by coarse type
    (DeepLesion types only val/test lesions; train lesions are 'unknown'), the noisy
    ones, and a long-axis size histogram; writes the histogram as a PNG, and a second PNG
    with the lesion types and sizes beside DeepLesion's (a miniature's true types, from its
    lesions.json, cover every split).
    """
    from ctzoo.datasets.deeplesion.info_csv import DLInfoError, read_dl_info
    from ctzoo.datasets.deeplesion.plots import plot_against_deeplesion, plot_key_slices, plot_size_histogram
    from ctzoo.datasets.deeplesion.stats import deeplesion_reference, format_stats, lesion_stats, long_axis_mm

    try:
        rows = read_dl_info(root / "DL_info.csv")
        reference_rows = read_dl_info(reference) if reference is not None else None
    except (DLInfoError, FileNotFoundError) as exc:
        raise click.ClickException(str(exc)) from exc
    summary = lesion_stats(rows)
    click.echo(json.dumps(summary, indent=2) if as_json else format_stats(summary))
    writable = os.access(root, os.W_OK)
    target = png_path or (root / "lesion_sizes.png" if writable else None)
    if target is not None and rows:
        click.echo(f"size histogram: {plot_size_histogram(rows, target)}", err=as_json)
    versus = versus_path or (root / "vs_deeplesion.png" if writable else None)
    if versus is not None and rows:
        truth = root / "lesions.json"  # a miniature knows every lesion's type, train included
        types = ([lesion["type_name"] for lesion in json.loads(truth.read_text())["lesions"]] if truth.exists()
                 else [r.lesion_type for r in rows])
        drawn = plot_against_deeplesion(types, [long_axis_mm(r) for r in rows], deeplesion_reference(reference_rows),
                                        versus, label=root.name)
        click.echo(f"types and sizes vs DeepLesion: {drawn}", err=as_json)
    if overlays is not None:
        try:
            drawn = plot_key_slices(root / "Images_png", rows, overlays, limit)
        except FileNotFoundError as exc:
            raise click.ClickException(str(exc)) from exc
        click.echo(f"{len(drawn)} key slices drawn in {overlays}", err=as_json)
