"""``ctzoo smap``: joint t-SNE maps of lesion embeddings held by several hospitals (SMAP). ``features`` writes a
site's embeddings; the secure multi-party protocol is not built yet (issue 27)."""

from __future__ import annotations

from pathlib import Path

import click


@click.group()
def smap() -> None:
    """Joint t-SNE maps of lesion embeddings across hospitals (SMAP), each site's points staying at the site.

    \b
      ctzoo smap features INPUTS... --out site.npz    a site's lesion embeddings, computed locally
    The secure multi-party joint t-SNE itself is not built yet (issue 27).
    """


@smap.command("features")
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--out", type=click.Path(dir_okay=False, path_type=Path), required=True,
              help="The site file (.npz): features, labels, scores and the model's name and weights digest.")
@click.option("--model", default="recistnet-mini", show_default=True,
              help="The zoo detector (or a bundle folder) every site must embed with.")
@click.option("--deeplesion", "deeplesion_csv", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              default=None, help="Embed the annotated lesions of this DL_info.csv instead (labels: coarse type).")
@click.option("--patients", default=None, help="With --deeplesion: only these Patient_index values, e.g. 1-40,52.")
@click.option("--device", default="cpu", show_default=True, help="Where the detector runs (PyTorch).")
def features(inputs: tuple[Path, ...], out: Path, model: str, deeplesion_csv: Path | None, patients: str | None,
             device: str) -> None:
    """Write a site's lesion embeddings: RECIST-Net's decoder features pooled over each lesion's box.

    \b
    From CT INPUTS (what ctzoo infer takes): every finding at the detector's operating point, no label.
    From --deeplesion DL_info.csv: every annotated lesion, labelled with its coarse type where known.
    The file identifies nobody: no identifiers or hashes, no file names or positions, rows shuffled.
    """
    from ctzoo.models.bundle import BundleError, load_bundle
    from ctzoo.smap.features import deeplesion_site, parse_patients, volumes_site, write_site

    if bool(inputs) == (deeplesion_csv is not None):
        raise click.UsageError("give CT INPUTS or --deeplesion DL_info.csv (one of them)")
    if patients is not None and deeplesion_csv is None:
        raise click.UsageError("--patients selects DeepLesion patients: it needs --deeplesion")
    try:
        bundle = load_bundle(model)
        if bundle.task != "detection":
            raise click.ClickException(f"{bundle.name} is a {bundle.task} model: site embeddings need a detector")
        if deeplesion_csv is not None:
            chosen = parse_patients(patients) if patients is not None else None
            site = deeplesion_site(deeplesion_csv, bundle, chosen, device)
        else:
            site = volumes_site(inputs, bundle, device, say=click.echo)
        path = write_site(site, out)
    except (BundleError, ValueError) as error:
        raise click.ClickException(str(error)) from error
    click.echo(f"{path}: {len(site['labels'])} lesions x {site['features'].shape[1]} features "
               f"({site['meta']['kind']}, {bundle.name} {bundle.version})")
