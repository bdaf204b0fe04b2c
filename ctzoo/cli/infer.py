"""``ctzoo infer``: run a zoo detector over CT volumes and write detections.json and overlay PNGs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click

from ctzoo.cli.info import USER_ERRORS, load_rules, rules_option, series_option
from ctzoo.io.atomic import atomic_path


def _case_name(path: Path) -> str:
    name = path.name
    for suffix in (".nii.gz", ".nii", ".nrrd", ".mha", ".mhd", ".zip"):
        if name.lower().endswith(suffix):
            name = name[: -len(suffix)]
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "case"


def _write_json(document: dict, path: Path) -> None:
    with atomic_path(path) as temporary:
        temporary.write_text(json.dumps(document, indent=2))


@click.command()
@click.argument("inputs", nargs=-1, type=click.Path(exists=True, path_type=Path))
@click.option("--model", "model_name", default="recistnet-mini", show_default=True, help="Zoo model (ctzoo zoo list).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=Path("ctzoo-out"), show_default=True,
              help="Output folder: OUT/<case>/detections.json and OUT/<case>/overlay.png.")
@click.option("--device", default="auto", show_default=True, help="auto (CUDA when present, else CPU), cpu or cuda.")
@click.option("--score-threshold", type=click.FloatRange(0, 1), default=0.3, show_default=True,
              help="Keep lesions scoring at least this.")
@click.option("--batch-size", type=click.IntRange(min=1), default=8, show_default=True, help="Slices per forward pass.")
@click.option("--no-overlay", is_flag=True, help="Do not draw overlay.png.")
@series_option
@rules_option
def infer(inputs: tuple[Path, ...], model_name: str, out: Path, device: str, score_threshold: float,
          batch_size: int, no_overlay: bool, series: str | None, rules_file: Path | None) -> None:
    """Detect lesions (RECIST long and short axes, in mm) in each CT volume of INPUTS.

    INPUTS are DICOM folders or zips, single DICOM files, NIfTI, NRRD or MHA files. Without INPUTS
    the embedded sample CT is used. Each case gets OUT/<case>/detections.json (schema in the README:
    the five RECIST points per lesion in voxel indices of the input as stored and in patient LPS mm)
    and an overlay PNG of the slices with lesions.
    """
    import torch

    from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing
    from ctzoo.datasets.samples import sample_ct_dicom
    from ctzoo.inference.overlay import plot_detections
    from ctzoo.inference.recist_volume import detect_volume
    from ctzoo.io import read_volume
    from ctzoo.models import create_model, model_input_spec, model_version
    from ctzoo.training.engine import pick_device

    try:
        spec = model_input_spec(model_name)
        model = create_model(model_name, pretrained=True).eval()
        version = model_version(model_name)
    except (KeyError, FileNotFoundError, RuntimeError) as exc:
        raise click.ClickException(str(exc)) from exc
    prep = SlicePreprocessing(**{k: v for k, v in spec.items() if k in SlicePreprocessing.model_fields})
    dev = pick_device(device)
    torch.set_grad_enabled(False)
    for path in inputs or (sample_ct_dicom(),):
        case = "sample_ct" if not inputs else _case_name(path)
        try:
            volume = read_volume(path, series=series, rules=load_rules(rules_file))
            document = detect_volume(model.to(dev), volume, prep, model_name, version, batch_size=batch_size,
                                     score_threshold=score_threshold, device=dev)
        except USER_ERRORS as exc:
            raise click.ClickException(f"{path}: {exc}") from exc
        folder = out / case
        folder.mkdir(parents=True, exist_ok=True)
        _write_json(document, folder / "detections.json")
        if not no_overlay:
            plot_detections(volume, document, folder / "overlay.png")
        sizes = ", ".join(f"{d['long_axis_mm']:.0f}x{d['short_axis_mm']:.0f} mm ({d['score']:.2f})"
                          for d in document["lesions"][:5])
        click.echo(f"{case}: {len(document['lesions'])} lesion(s){': ' + sizes if sizes else ''} -> {folder}")
