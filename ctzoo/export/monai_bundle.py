"""An exported bundle as a MONAI bundle: ``configs/metadata.json``, ``configs/inference.json`` and ``models/``.

``ctzoo export --format monai-bundle`` writes these into the exported folder, so MONAI's own tools take it::

    python -m monai.bundle verify_metadata --meta_file configs/metadata.json --filepath SCHEMA.json
    python -m monai.bundle run --config_file configs/inference.json --image ct.nii.gz --output_dir out

``metadata.json`` follows MONAI's metadata schema (``meta_schema_20240725.json``): versions, task, the
``network_data_format`` of the network's tensors (``image`` in, ``pred`` or the detector's three heads out) and
the post-processed outputs ``ctzoo infer`` writes. ``inference.json`` builds ``network_def`` from the folder's
weights (:func:`ctzoo.inference.monai_entry.load_network`) and runs ``ctzoo infer``'s pipeline on ``@image``
(:func:`ctzoo.inference.monai_entry.infer_file`). ``models/model.pt`` is the state dict MONAI's bundle
specification asks for (a plain tensor dict: ``torch.load(..., weights_only=True)`` reads it); ``model.onnx`` is
the checked graph of ``1/``.
"""

from __future__ import annotations

import importlib.metadata
import json
import shutil
from contextlib import suppress
from pathlib import Path
from typing import Any

import torch

from ctzoo.datasets.deeplesion.context import neighbour_offsets
from ctzoo.models.bundle import GRAPH_DIR, GRAPH_FILE, ModelBundle

SCHEMA_URL = ("https://github.com/Project-MONAI/MONAI-extra-test-data/releases/download/0.8.1/"
              "meta_schema_20240725.json")
HEAD_CHANNELS = {"heatmaps": ("logits", ["long_a", "long_b", "short_a", "short_b", "centre"]),
                 "offsets": ("regression", ["(dx, dy) of each of the 5 points, interleaved, in heatmap cells"]),
                 "displacements": ("regression", ["(dx, dy) from the centre to each of the 4 end points, interleaved"])}
HEAD_SIZES = {"heatmaps": 5, "offsets": 10, "displacements": 8}
LOGGING_CONF = """[loggers]
keys=root

[handlers]
keys=consoleHandler

[formatters]
keys=fullFormatter

[logger_root]
level=INFO
handlers=consoleHandler

[handler_consoleHandler]
class=StreamHandler
level=INFO
formatter=fullFormatter
args=(sys.stdout,)

[formatter_fullFormatter]
format=%(asctime)s - %(name)s - %(levelname)s - %(message)s
"""


def _version(package: str) -> str:
    with suppress(importlib.metadata.PackageNotFoundError):
        return importlib.metadata.version(package)
    return "unknown"


def _tensor(num_channels: int, shape: list, value_range: list, channel_def: dict[str, str], kind: str = "image",
            fmt: str = "hounsfield", dtype: str = "float32") -> dict[str, Any]:
    return {"type": kind, "format": fmt, "modality": "CT", "num_channels": num_channels, "spatial_shape": shape,
            "dtype": dtype, "value_range": value_range, "is_patch_data": False, "channel_def": channel_def}


def _slice_name(dz: float) -> str:
    """A context channel's slice by its distance from the key slice (``dz``: patient z, superior positive)."""
    return "key slice" if dz == 0 else f"slice {abs(dz):g} mm {'superior' if dz > 0 else 'inferior'}"


def network_data_format(bundle: ModelBundle) -> dict[str, Any]:
    """The tensors of the network (what ``network_def`` takes and gives) and what ctzoo writes from them."""
    prep = bundle.preprocessing
    if bundle.task == "detection":
        windows = [tuple(prep.window_hu), *map(tuple, prep.extra_windows_hu)]
        # each channel's patient z (LPS mm, superior positive) from the key slice, in the order inference builds
        offsets = [k * prep.slice_interval_mm for k in neighbour_offsets(prep.num_slices, prep.slice_interval_mm,
                                                                         prep.slice_interval_mm, "head")]
        channels = {str(w * prep.num_slices + k): f"{_slice_name(dz)}, window [{lo:g}, {hi:g}] HU"
                    for w, (lo, hi) in enumerate(windows) for k, dz in enumerate(offsets)}
        multiple = bundle.input_spec.get("size_multiple", 32)
        out_multiple = f"{multiple // bundle.down_ratio}*n"
        outputs = {name: _tensor(HEAD_SIZES[name], [out_multiple, out_multiple], [],
                                 {str(i): text for i, text in enumerate(HEAD_CHANNELS[name][1])},
                                 fmt=HEAD_CHANNELS[name][0]) for name in HEAD_SIZES}
        return {"inputs": {"image": _tensor(prep.in_channels, [f"{multiple}*n", f"{multiple}*n"],
                                            list(prep.output_range), channels)},
                "outputs": outputs,
                "post_processed_outputs": {
                    "detections": "detections.json (ctzoo infer): lesions with score, key slice, points_voxel and "
                                  "points_mm (long_a, long_b, short_a, short_b, centre), long_axis_mm, "
                                  "short_axis_mm; DICOM SR for DICOM input"}}
    names = {"0": "background", **{str(i): name for i, name in enumerate(bundle.class_names, start=1)}}
    size = list(prep.size)
    lo, hi = prep.window_hu
    inputs = {"image": _tensor(1, size, [0, 1], {"0": f"CT, window [{lo:g}, {hi:g}] HU"})}
    if bundle.template_bank is not None:
        inputs["template"] = _tensor(1 + len(bundle.class_names), size, [0, 1],
                                     {"0": "template CT", **{k: v for k, v in names.items() if k != "0"}})
    return {"inputs": inputs,
            "outputs": {"pred": _tensor(len(names), size, [], names, fmt="segmentation")},
            "post_processed_outputs": {"pred": _tensor(1, ["*", "*", "*"], [0, len(names) - 1], names,
                                                       fmt="labels", dtype="uint8")}}


def metadata(bundle: ModelBundle) -> dict[str, Any]:
    """``configs/metadata.json`` in MONAI's schema, from the bundle's card."""
    card = bundle.card
    task = ("CT lesion detection with RECIST measurement (long and short axes)" if bundle.task == "detection"
            else f"CT segmentation of {', '.join(bundle.class_names)}")
    return {
        "schema": SCHEMA_URL, "version": card.version,
        "changelog": {card.version: f"ctzoo {card.name} {card.version}: {card.training.epochs_text(' epochs')}"},
        "monai_version": _version("monai"), "pytorch_version": torch.__version__.split("+")[0],
        "numpy_version": _version("numpy"),
        "required_packages_version": {p: _version(p) for p in ("ctzoo", "safetensors", "nibabel", "SimpleITK")},
        "name": card.name, "task": task, "description": card.description,
        "authors": "ctzoo contributors", "copyright": "Copyright (c) ctzoo contributors",
        "data_source": card.training.data, "data_type": "nibabel, SimpleITK or DICOM (ctzoo.io.read_volume)",
        "intended_use": card.intended_use or " ".join(card.limitations[-1:]) or "Research use only.",
        "eval_metrics": {name: metric.value for name, metric in card.metrics.items()},
        "references": [], "licence": card.licence,
        "network_data_format": network_data_format(bundle),
    }


def inference_config() -> dict[str, Any]:
    """``configs/inference.json``: override ``image`` and ``output_dir`` on MONAI's command line."""
    return {
        "imports": ["$import torch"],
        "bundle_root": ".",
        "device": "$'cuda' if torch.cuda.is_available() else 'cpu'",
        "image": "$@bundle_root + '/ct.nii.gz'",
        "output_dir": "$@bundle_root + '/eval'",
        "score_threshold": None,  # the bundle's operating point (its card); a number overrides it
        "network_def": {"_target_": "ctzoo.inference.monai_entry.load_network", "bundle_root": "@bundle_root",
                        "device": "@device"},
        "run": {"_target_": "ctzoo.inference.monai_entry.infer_file", "network": "@network_def",
                "bundle_root": "@bundle_root", "image": "@image", "output_dir": "@output_dir", "device": "@device",
                "score_threshold": "@score_threshold"},
    }


def write_monai_files(bundle: ModelBundle, folder: Path) -> None:
    """Write the MONAI bundle files of ``bundle`` into ``folder`` (an export being staged)."""
    configs, models = folder / "configs", folder / "models"
    configs.mkdir(exist_ok=True)
    models.mkdir(exist_ok=True)
    (configs / "metadata.json").write_text(json.dumps(metadata(bundle), indent=2) + "\n", encoding="utf-8")
    (configs / "inference.json").write_text(json.dumps(inference_config(), indent=2) + "\n", encoding="utf-8")
    (configs / "logging.conf").write_text(LOGGING_CONF, encoding="utf-8")
    state = {k: v.detach().clone() for k, v in bundle.network().state_dict().items()}
    torch.save(state, models / "model.pt")
    if (folder / GRAPH_DIR / GRAPH_FILE).is_file():
        shutil.copyfile(folder / GRAPH_DIR / GRAPH_FILE, models / "model.onnx")
