"""``ctzoo export``: a model bundle or checkpoint into a Triton-layout model repository (:mod:`ctzoo.export`)."""

from __future__ import annotations

from pathlib import Path

import click


@click.command()
@click.argument("source", metavar="MODEL_OR_CHECKPOINT")
@click.option("--out", "repo", type=click.Path(file_okay=False, path_type=Path), required=True,
              help="Model repository folder (created if missing); the model goes to OUT/<name>/.")
@click.option("--name", default=None,
              help="Model name in the repository (default: the zoo name, or a checkpoint's run folder name).")
@click.option("--fp16", is_flag=True,
              help="Write OUT/<name>-fp16/: fp16 weights and arithmetic, fp32 inputs and outputs; checked against "
                   "PyTorch fp32 with a 1e-2 relative tolerance instead of 1e-4.")
@click.option("--opset", type=click.IntRange(13, 20), default=17, show_default=True, help="ONNX opset.")
@click.option("--format", "layout", type=click.Choice(["triton", "monai-bundle"]), default="triton", show_default=True,
              help="monai-bundle: also MONAI's bundle files (configs/metadata.json, configs/inference.json, "
                   "models/model.pt), so 'python -m monai.bundle run' runs it.")
@click.option("--templates", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None,
              help="Template-segmenter checkpoints: the template bank folder (templates.safetensors and "
                   "templates.json); it is re-embedded with the checkpoint's weights.")
def export(source: str, repo: Path, name: str | None, fp16: bool, opset: int, layout: str,
           templates: Path | None) -> None:
    """Export MODEL_OR_CHECKPOINT to ONNX in a Triton model repository, checked against PyTorch.

    MODEL_OR_CHECKPOINT is a zoo model (ctzoo zoo list), a model bundle folder, or a checkpoint
    written by ctzoo train (RUN/best.pt or RUN/last.pt of RECIST-Net; RUN/template_seg/best.pt of
    the template segmenter, with --templates).

    \b
    Writes OUT/<name>/, a whole model bundle that every command takes (--model OUT/<name>):
      config.pbtxt         Triton config (onnxruntime_onnx, max_batch_size 16, dynamic batching)
      1/model.onnx         the graph: detector image -> heatmaps, offsets, displacements;
                           template segmenter image, template -> logits
      1/embed.onnx         template segmenters: the slice embedding that picks each template
      ctzoo.json           what ctzoo serve reads: tensors, preprocessing, version, parity
      card.json, README.md the model card
      bundle.json, model.safetensors, config.json   the network and its weights
      templates.*          template segmenters: the template bank
      configs/, models/    with --format monai-bundle: MONAI's bundle files

    Every export is checked right after it is written: ONNX Runtime against PyTorch on random
    input (two batch sizes; the detector also a second image size) and on the embedded sample CT
    preprocessed as ctzoo infer does it. A disagreement fails the export and leaves nothing
    behind; an earlier export of the same name is replaced only by one that passed. OUT/<name>
    is replaced only when it is an earlier export (ctzoo.json) or an empty folder: a training run,
    another folder or a file of that name is refused (choose --name or another --out). The hidden
    OUT/.<name>.partial-* folder of an export that was killed (SIGKILL, out of memory) is removed
    by the next export of that name, unless that export is still running (docs/serving.md).

    \b
    Examples:
      ctzoo export recistnet-mini --out model_repository
      ctzoo export template-seg-abdomen --out model_repository --fp16
      ctzoo export runs/mini/best.pt --out model_repository --name recistnet-mine
      ctzoo export recistnet-mini --out bundles --format monai-bundle
    """
    from ctzoo.cli.paths import require_folder
    from ctzoo.export.parity import parity_table
    from ctzoo.export.repository import ExportSourceError, ExportTargetError, export_model
    from ctzoo.models.bundle import read_graphs

    require_folder(repo)
    try:
        folder = export_model(source, repo, name=name, fp16=fp16, opset=opset, templates=templates,
                              progress=lambda message: click.echo(message, err=True), monai=layout == "monai-bundle")
    except (ExportSourceError, ExportTargetError, FileNotFoundError, KeyError) as exc:
        raise click.ClickException(str(exc)) from exc
    except OSError as exc:  # e.g. the disk filled while the graphs were written; the staging folder is removed
        raise click.ClickException(f"export failed, nothing written: {exc}") from exc
    except (RuntimeError, ValueError) as exc:  # a failed parity check, or the exporter refusing the model
        raise click.ClickException(f"export failed, nothing written: {exc}") from exc
    info = read_graphs(folder).info  # what the export recorded, read as every command reads it
    click.echo(parity_table(info["parity"]))
    click.echo(f"wrote {folder} ({info['task']}, {info['precision']}, version {info['version']})")
