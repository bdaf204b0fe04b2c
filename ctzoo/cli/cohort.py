"""``ctzoo cohort``: cohorts of CT studies (HealthPrism in the zoo). ``build`` writes the cohort table."""

from __future__ import annotations

from pathlib import Path

import click

from ctzoo.cli.device_option import device_option


@click.group()
def cohort() -> None:
    """Cohorts of CT studies: who and what the zoo's models are run on (HealthPrism).

    \b
      ctzoo cohort build INPUTS... --deeplesion DL_info.csv --out COHORT
                                   the cohort table: one row per series, from its headers and the zoo
                                   models' outputs; with DeepLesion, one row per lesion with RECIST-Net's
                                   pooled features and the detector's findings per key slice
      ctzoo cohort fit COHORT      the gated image + context model for the lesion type, against image-only
                                   and context-only models of the same size (mean AUC on test)
      ctzoo cohort report COHORT   COHORT/report.html: Summary, Group and Individual views, offline
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
@device_option("cpu", "Where the models run (PyTorch): cpu, cuda, cuda:N or auto.")
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
    from ctzoo.cli.bundles import resolve_bundles
    from ctzoo.cohort.table import DOCUMENT_FILE, TABLE_FILE, build_cohort

    if not inputs and deeplesion_csv is None:
        raise click.UsageError("give CT inputs, --deeplesion DL_info.csv, or both")
    bundles = [] if context_only else list(resolve_bundles(models).values())  # before anything is written
    try:
        document = build_cohort(inputs, out, deeplesion_csv, models=bundles, device=device,
                                say=click.echo, progress=True)
    except (FileNotFoundError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    unknown = {column: counts["unknown"] for column, counts in document["groups"].items() if "unknown" in counts}
    click.echo(f"{out / TABLE_FILE}, {out / DOCUMENT_FILE}: {len(document['rows'])} series, "
               f"{len(document['failed'])} failed; unknown: "
               + (", ".join(f"{column} {count}" for column, count in unknown.items()) or "none"))


@cohort.command("fit")
@click.argument("cohort_dir", metavar="COHORT", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--context", "context_set", type=click.Choice(["csv", "study"]), default="csv", show_default=True,
              help="csv: all DL_info.csv gives (age, sex, spacing, window, location, diameters); study: only what "
              "a study header gives (age, sex, spacing), so the image must carry the type.")
@click.option("--seeds", default="0,1,2", show_default=True, help="Comma-separated seeds: every model is fitted at "
              "each; the AUC is reported as their mean and sd; the first seed's gated model is stored.")
@click.option("--epochs", type=click.IntRange(1, 100000), default=300, show_default=True,
              help="Full-batch epochs; the epoch with the best validation mean AUC is kept.")
@click.option("--split-seed", type=int, default=0, show_default=True,
              help="Where the lesions are split by patient: which split (the same patients and seed give the same "
              "split in every build, whatever the salt).")
def fit(cohort_dir: Path, context_set: str, seeds: str, epochs: int, split_seed: int) -> None:
    """Fit the gated image + context model on COHORT's typed lesions (target: the coarse lesion type).

    \b
    Image: RECIST-Net's pooled decoder features of each lesion's box (from ctzoo cohort build).
    Context: the lesion's DL_info.csv row (--context). Per lesion a gate z in [0, 1] weighs image against
    context; image-only and context-only models of the same size are fitted in the same run. The epoch is
    chosen on validation, the mean AUC over classes reported on test. When the CSV types no train lesion
    (DeepLesion types its val and test lesions only) or its split puts a patient in more than one split, typed
    lesions are split again by patient, 60/20/20 (--split-seed). At least two lesion types are needed, and two
    in the test split.
    Writes COHORT/fit/: fit.json (AUCs, counts, importances), predictions.csv (per lesion: split, label,
    probabilities, gate, Integrated Gradients) and gated.pt.
    """
    from ctzoo.cohort.fit import FIT_DIR, fit_cohort

    try:
        chosen = tuple(int(seed) for seed in seeds.split(","))
    except ValueError:
        raise click.BadParameter(f"comma-separated integers, e.g. 0,1,2; got {seeds!r}", param_hint="--seeds") from None
    try:
        document = fit_cohort(cohort_dir, context_set, chosen, epochs, split_seed=split_seed)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    for name, modalities in (("gated", "both"), ("image only", "image"), ("context only", "context")):
        result = document["results"][modalities]
        click.echo(f"{name:>12}: test mean AUC {result['test_auc_mean']:.3f} ± {result['test_auc_sd']:.3f} "
                   f"(seeds {', '.join(f'{v:.3f}' for v in result['test_auc'])})")
    if any("val_loss" in result["selected_on"] for result in document["results"].values()):
        val = {name: count for name, count in document["counts"]["val"].items() if count}
        click.echo(f"the validation lesions are all of one type ({', '.join(f'{n} {c}' for n, c in val.items())}): "
                   "no validation AUC, epochs chosen by validation loss")
    counts = {part: sum(by_class.values()) for part, by_class in document["counts"].items()}
    rule = document["split_rule"] + ("" if document["split_rule"] == "csv" else f", split seed {split_seed}")
    click.echo(f"mean image weight on test {document['mean_image_weight']['test']:.3f}; lesions {counts}; "
               f"split: {rule}; {cohort_dir / FIT_DIR}")


@cohort.command("report")
@click.argument("cohort_dir", metavar="COHORT", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="The page (default COHORT/report.html).")
@click.option("--min-count", type=click.IntRange(1), default=10, show_default=True,
              help="No subgroup metric is shown for a group with fewer lesions (test lesions for AUC).")
@click.option("--individuals", type=click.IntRange(1, 500), default=60, show_default=True,
              help="Lesions offered in the Individual view (their key slices are embedded; test lesions first), and "
              "as many CT series (their top finding's slice embedded; the series table lists them all).")
@click.option("--clusters", type=click.IntRange(2, 20), default=4, show_default=True,
              help="k of the k-means clusters of similar lesions.")
def report(cohort_dir: Path, out: Path | None, min_count: int, individuals: int, clusters: int) -> None:
    """Write COHORT's page: Summary, Group and Individual views (one self-contained HTML file, works offline).

    \b
    Summary     context distributions (unknown included) and correlations, the gated model's AUC against
                each modality alone, the image weight per lesion, Integrated Gradients per feature
    Group       sensitivity at 4 FPs per key slice and the gated model's AUC by sex, age band, slice
                thickness and lesion type, with 95 % intervals and counts (none under --min-count);
                series counts by scanner, kernel, contrast; clusters of similar lesions
    Individual  two lesions side by side: context, key slice with annotation and findings, gate, IG;
                the first --individuals CT series with their findings, and a table of them all
    A fit of other lesions than COHORT/lesions.csv holds (the cohort built again) is not drawn: the page
    and a warning say so. Inputs that could not be read are counted by error type, never named.
    """
    from ctzoo.cohort.report import write_report

    try:
        path = write_report(cohort_dir, out, say=lambda message: click.echo(f"warning: {message}", err=True),
                            min_count=min_count, limit=individuals, k=clusters)
    except ValueError as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{path} ({path.stat().st_size / 1e6:.1f} MB)")
