"""``ctzoo infer``: run a zoo detector over CT volumes and write detections.json and overlay PNGs."""

from __future__ import annotations

import json
import re
from pathlib import Path

import click
import numpy as np

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
@click.option("--no-overlay", is_flag=True, help="Do not draw the overlay PNG.")
@series_option
@rules_option
def infer(inputs: tuple[Path, ...], model_name: str, out: Path, device: str, score_threshold: float,
          batch_size: int, no_overlay: bool, series: str | None, rules_file: Path | None) -> None:
    """Run a zoo model over each CT volume of INPUTS: detect lesions or segment organs.

    INPUTS are DICOM folders or zips, single DICOM files, NIfTI, NRRD or MHA files. Without INPUTS
    the embedded sample CT is used.

    \b
    Detectors (recistnet-mini): OUT/<case>/detections.json (schema in the README: the five RECIST
    points per lesion in voxel indices of the input as stored and in patient LPS mm) and overlay.png.
    Segmenters (template-seg-abdomen): OUT/<case>/labels.nii.gz (on the input grid),
    segmentation.json (volume per class), seg.dcm (DICOM SEG, for DICOM input) and labels_overlay.png.
    """
    import torch

    from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing
    from ctzoo.datasets.samples import sample_ct_dicom
    from ctzoo.inference.overlay import plot_detections
    from ctzoo.inference.recist_volume import detect_volume
    from ctzoo.io import read_volume
    from ctzoo.models import create_model, model_entry, model_input_spec, model_version
    from ctzoo.training.engine import pick_device

    try:
        spec = model_input_spec(model_name)
        model = create_model(model_name, pretrained=True).eval()
        version = model_version(model_name)
        segmenter = model_entry(model_name).task == "segmentation"
        bank = _template_bank(model_name) if segmenter else None
    except (KeyError, FileNotFoundError, RuntimeError, ValueError) as exc:
        raise click.ClickException(str(exc)) from exc
    prep = SlicePreprocessing(**{k: v for k, v in spec.items() if k in SlicePreprocessing.model_fields})
    dev = pick_device(device)
    with torch.no_grad():  # not set_grad_enabled: in-process callers (tests, notebooks) keep autograd
        for path in inputs or (sample_ct_dicom(),):
            case = "sample_ct" if not inputs else _case_name(path)
            if segmenter:
                _segment_case(path, case, model.to(dev), bank, spec, model_name, version, out, dev, batch_size,
                              no_overlay, series, rules_file)
                continue
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


def _template_bank(model_name: str):
    """The template bank shipped with a template segmenter (None for a segmenter without templates)."""
    from ctzoo.models import model_entry
    from ctzoo.models.template_bank import INDEX_FILE, TemplateBank

    folder = model_entry(model_name).weights_dir
    return TemplateBank.load(folder) if (folder / INDEX_FILE).is_file() else None


def _segment_case(path: Path, case: str, model, bank, spec: dict, model_name: str, version: str, out: Path, device,
                  batch_size: int, no_overlay: bool, series: str | None, rules_file: Path | None) -> None:
    from ctzoo.datasets.segmentation import SegPreprocessing
    from ctzoo.inference.segment_volume import segment_volume, write_segmentation
    from ctzoo.io import read_volume

    prep = SegPreprocessing(**{k: v for k, v in spec.items() if k in SegPreprocessing.model_fields})
    class_names = bank.class_names if bank is not None else list(spec["classes"])
    try:
        volume = read_volume(path, series=series, rules=load_rules(rules_file))
        labels = segment_volume(model, bank, volume, prep, batch_size=batch_size, device=device)
        written = write_segmentation(volume, labels, class_names, out / case, model_name, version,
                                     overlay=not no_overlay)
    except USER_ERRORS as exc:
        raise click.ClickException(f"{path}: {exc}") from exc
    voxel_ml = float(np.prod(volume.spacing)) / 1000.0
    sizes = ", ".join(f"{name} {float((labels == c).sum()) * voxel_ml:.0f} mL"
                      for c, name in enumerate(class_names, start=1))
    click.echo(f"{case}: {sizes} -> {', '.join(p.name for p in written)} in {out / case}")
