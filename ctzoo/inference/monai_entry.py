"""What a MONAI bundle's ``configs/inference.json`` calls: ``python -m monai.bundle run`` on a ctzoo bundle.

MONAI builds ``network_def`` with :func:`load_network` and then runs :func:`infer_file`, which is ``ctzoo infer``
(the same pipeline, preprocessing and outputs) on one file with that network. MONAI passes config keys as keyword
arguments, paths as strings and the device as a string or ``torch.device``.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ctzoo.models.bundle import load_bundle


def load_network(bundle_root: str | Path, device: str | torch.device = "cpu") -> nn.Module:
    """The bundle's network with its weights (safetensors), in eval mode, on ``device``."""
    return load_bundle(Path(bundle_root)).network().to(str(device))  # a fresh bundle: nothing else shares it


def infer_file(network: nn.Module, bundle_root: str | Path, image: str | Path, output_dir: str | Path,
               device: str | torch.device = "cpu", score_threshold: float | None = None,
               overlay: bool = False) -> list[str]:
    """Run ``network`` on one CT file or DICOM folder as ``ctzoo infer`` does; writes ``output_dir/<case>/``
    (``detections.json`` of a detector; ``labels.nii.gz`` and ``segmentation.json`` of a segmenter) and returns
    the written paths. ``RuntimeError`` when the case failed (MONAI's run must not exit 0 on it)."""
    from ctzoo.inference.backends import TorchDetector, TorchSegmenter
    from ctzoo.inference.inputs import discover_cases
    from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
    from ctzoo.inference.tasks import bundle_task

    bundle, device = load_bundle(Path(bundle_root)), str(device)
    if bundle.task == "segmentation":
        backend = TorchSegmenter(network, bundle.template_bank, bundle.class_names, device)
    else:
        backend = TorchDetector(network, device)
    task = bundle_task(bundle, backend, score_threshold)
    out = Path(output_dir)
    rows = run_pipeline(discover_cases([Path(image)]), task,
                        PipelineOptions(out=out, workers=0, overlay=overlay, progress=False))
    failed = [f"{row['case']}: {row['error']}" for row in rows if row["status"] != "ok"]
    if failed:
        raise RuntimeError("; ".join(failed))
    return [str(out / path) for row in rows for path in row["outputs"].split()]
