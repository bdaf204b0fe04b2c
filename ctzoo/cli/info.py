"""``ctzoo info`` and ``ctzoo convert``."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import click
import numpy as np
import pydicom

from ctzoo.cli.paths import require_folder
from ctzoo.config import ConfigError, load_config
from ctzoo.datasets.samples import sample_ct_dicom
from ctzoo.io import DicomError, SeriesRules, read_volume, write_volume
from ctzoo.io.image_files import written_file_warnings

USER_ERRORS = (DicomError, ConfigError, FileNotFoundError, ValueError)

series_option = click.option(
    "--series", metavar="UID|N",
    help="Series to read: its SeriesInstanceUID as 'ctzoo info' prints it (derived where the files have none), "
         "or its number N as 'ctzoo info' lists it. Default: chosen by the selection rules.")
rules_option = click.option(
    "--rules", "rules_file", type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="YAML file of series selection rules (see configs/series_selection.yaml). "
         "Default: CT, axial, not a localizer, most slices.")


def load_rules(rules_file: Path | None) -> SeriesRules:
    return load_config(rules_file, SeriesRules) if rules_file else SeriesRules()


def _fmt(values, digits: int = 3) -> str:
    return " x ".join(f"{v:.{digits}f}" for v in values)


def format_volume(volume: dict[str, Any]) -> list[str]:
    """Human-readable lines for one volume description."""
    axes = {"L": "left", "R": "right", "P": "posterior", "A": "anterior", "S": "superior", "I": "inferior"}
    orientation = volume["orientation"]
    lines = [
        f"  size (i, j, k)   {' x '.join(str(n) for n in volume['size_ijk'])} voxels "
        f"(array {tuple(volume['array_shape_zyx'])} in z, y, x order)",
        f"  spacing          {_fmt(volume['spacing_mm'])} mm",
        f"  extent           {_fmt(volume['extent_mm'], 1)} mm",
        f"  origin (LPS)     {_fmt(volume['origin_lps_mm'], 2)} mm",
        f"  orientation      {orientation} (i -> {axes[orientation[0]]}, j -> {axes[orientation[1]]}, "
        f"k -> {axes[orientation[2]]})",
    ]
    if volume.get("dtype"):
        scaling = volume.get("dtype_scaling")
        lines.append(f"  voxel type       {volume['dtype']}"
                     + (f" (scl_slope {scaling['slope']:g}, scl_inter {scaling['intercept']:g})" if scaling else "")
                     + f" in the file, read as {volume['array_dtype']}")
    if volume["value_range"] is not None:
        low, high = volume["value_range"]
        lines.append(f"  values           {low:g} .. {high:g}" + (" HU" if volume.get("dicom") else ""))
    if volume["non_finite_voxels"]:
        lines.append(f"  non-finite       {volume['non_finite_voxels']} voxels (NaN/inf)")
    dicom = volume.get("dicom")
    if dicom:
        syntax = pydicom.uid.UID(dicom["transfer_syntax_uid"])
        lines.append(f"  DICOM            {dicom['modality']} {dicom['manufacturer']} '{dicom['series_description']}', "
                     f"{syntax.name or syntax}")
        lines.append(f"  series UID       {dicom['series_instance_uid']}"
                     + ("  (derived: the files had none)" if "SeriesInstanceUID" in dicom["derived_uids"] else ""))
        lines.append(f"  frame of ref.    {dicom['frame_of_reference_uid']}")
    return lines


def format_description(info: dict[str, Any]) -> str:
    """The text ``ctzoo info`` prints for one path."""
    lines = [f"{info['path']}: {info['kind']}"]
    for series in info.get("series", []):
        chosen = "  <- chosen" if series["index"] == info.get("chosen_series") else ""
        why = f"  [skipped: {series['rejected_because']}]" if series.get("rejected_because") else ""
        thickness = f", thickness {series['slice_thickness_mm']:g} mm" if series["slice_thickness_mm"] else ""
        lines.append(f"  series #{series['index']}: {series['modality'] or '?'} '{series['description']}', "
                     f"{series['slices']} slices, {series['orientation']}{thickness}{why}{chosen}")
    if info.get("non_dicom_files"):
        lines.append(f"  {info['non_dicom_files']} non-DICOM file(s)"
                     + (f", volumes among them: {', '.join(info['other_volumes'])}" if info["other_volumes"] else ""))
    if info.get("volume"):
        lines.append("volume" + (f" (series #{info['chosen_series']})" if info.get("chosen_series") else "") + ":")
        lines += format_volume(info["volume"])
        lines += [f"warning: {info['path']}: {w}" for w in info["volume"]["warnings"]]
    if info.get("error"):
        lines.append(f"error: {info['error']}")
    return "\n".join(lines)


@click.command()
@click.argument("path", required=False, type=click.Path(exists=True, path_type=Path))
@series_option
@rules_option
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def info(path: Path | None, series: str | None, rules_file: Path | None, as_json: bool) -> None:
    """Show what PATH holds: DICOM series found, size, spacing, orientation, HU range.

    PATH is a DICOM folder (searched recursively), a zip of DICOM files, one DICOM
    file (its series is read), or a NIfTI/NRRD/MHA file. Without PATH, the embedded
    sample CT is described. Patient names and IDs are never printed.
    """
    from ctzoo.io.describe import describe_path

    try:
        description = describe_path(path or sample_ct_dicom(), series=series, rules=load_rules(rules_file))
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    click.echo(json.dumps(description, indent=2) if as_json else format_description(description))
    if description.get("error"):
        raise SystemExit(1)


@click.command()
@click.argument("source", type=click.Path(exists=True, path_type=Path))
@click.argument("target", type=click.Path(dir_okay=False, path_type=Path))
@series_option
@rules_option
@click.option("--dtype", type=click.Choice(["float32", "int16", "uint8"]), default=None,
              help="Voxel type to store. Default: int16 when every value is a whole number in range, else float32. "
                   "int16 and uint8 round to the nearest integer; values outside the type's range are refused.")
@click.option("--force", is_flag=True, help="Replace TARGET if it exists (it may be SOURCE itself).")
def convert(source: Path, target: Path, series: str | None, rules_file: Path | None, dtype: str | None,
            force: bool) -> None:
    """Convert SOURCE (DICOM folder/zip/file, NIfTI, NRRD, MHA) to TARGET (.nii.gz, .nii, .nrrd or .mha).

    Geometry is kept exactly (NIfTI gets the RAS affine in both qform and sform; a sheared
    one, e.g. a gantry tilt, in the sform only, as a qform cannot hold a shear: NRRD and MHA
    keep it for every reader). An existing TARGET is refused unless --force; TARGET is
    written to a temporary name and renamed, so it is never half-written.
    """
    require_folder(target.parent)
    if (target.exists() or target.is_symlink()) and not force:
        raise click.ClickException(f"{target} exists; pass --force to replace it")
    try:
        volume = read_volume(source, series=series, rules=load_rules(rules_file))
        if dtype is None:
            whole = np.array_equal(volume.array, np.round(volume.array))
            fits = volume.array.size and -32768 <= volume.array.min() and volume.array.max() <= 32767
            dtype = "int16" if whole and fits else "float32"
        written = write_volume(volume, target, dtype=np.dtype(dtype))
    except USER_ERRORS as exc:
        raise click.ClickException(str(exc)) from exc
    for warning in volume.warnings:
        click.echo(f"warning: {source}: {warning}", err=True)
    for warning in written_file_warnings(volume, written):
        click.echo(f"warning: {written}: {warning}", err=True)
    click.echo(f"wrote {written} ({' x '.join(map(str, volume.size))} voxels, {dtype})")
