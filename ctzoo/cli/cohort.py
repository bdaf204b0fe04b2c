"""``ctzoo cohort``: cohorts of CT studies (HealthPrism in the zoo). ``build`` writes the cohort table."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def cohort() -> None:
    """Cohorts of CT studies: who and what the zoo's models are run on (HealthPrism).

    \b
      ctzoo cohort build INPUTS... --out COHORT    the cohort table: one row per series, from its headers
                                                   and the zoo models' outputs
    The gated image + context model and the report page are not built yet (issue 26).
    """


@cohort.command("build")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="The cohort folder: cohort.csv, cohort.json and (without $CTZOO_COHORT_SALT) its salt.")
@click.option("--deeplesion", "deeplesion_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Also one row per series of this DeepLesion DL_info.csv (age, sex, spacing, "
              "window, lesions).")
@click.option("--model", "models", multiple=True, default=("recistnet-mini", "template-seg-abdomen"),
              show_default=True, help="Zoo models (or bundle folders) run on every input for the image modality. "
              "Repeatable.")
@click.option("--context-only", is_flag=True, help="Headers only: run no model.")
@click.option("--device", default="cpu", show_default=True, help="Where the models run (PyTorch): cpu, cuda, auto.")
def build(inputs: tuple[Path, ...], out: Path, deeplesion_csv: Path | None, models: tuple[str, ...],
          context_only: bool, device: str) -> None:
    """Write the cohort table of INPUTS (DICOM folders and zips, NIfTI, NRRD, MHA, lists: what ctzoo infer takes).

    \b
    One row per CT series, from its headers:
      patient, study, series    salted SHA-256 digests, never the identifiers ($CTZOO_COHORT_SALT or
                                COHORT/salt, created once: use the same salt for tables that must join)
      age_years, age_band, sex  from PatientAge and PatientSex (the birth date is never read)
      manufacturer, model, kvp, tube_current_ma, kernel, slice_thickness_mm, spacing_*_mm, slices,
      contrast, contrast_agent, body_part
    and from the models run on it (the image modality):
      findings, finding_long_mm, finding_score    the detector's lesions at its operating point
      <organ>_ml                                   the segmenter's organ volumes
    A field a header lacks is 'unknown' and counts as its own group; an input that cannot be read is listed
    in cohort.json's 'failed' with the reason. Patient names and IDs are never printed.
    """
    from ctzoo.cohort.table import DOCUMENT_FILE, TABLE_FILE, build_cohort

    if not inputs and deeplesion_csv is None:
        raise click.UsageError("give CT inputs, --deeplesion DL_info.csv, or both")
    try:
        document = build_cohort(inputs, out, deeplesion_csv, models=() if context_only else models, device=device,
                                say=click.echo)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    unknown = {column: counts["unknown"] for column, counts in document["groups"].items() if "unknown" in counts}
    click.echo(f"{out / TABLE_FILE}, {out / DOCUMENT_FILE}: {len(document['rows'])} series, "
               f"{len(document['failed'])} failed; unknown: "
               + (", ".join(f"{column} {count}" for column, count in unknown.items()) or "none"))
