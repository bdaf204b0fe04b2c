"""Export a model bundle into a Triton-layout model repository, checked against PyTorch: the one exporter.

``REPO/<name>/`` is the bundle itself (weights, ``bundle.json``, card, template bank) plus what runs without
PyTorch; ``ctzoo serve``, ``ctzoo infer --backend onnx``, ``/studies``, the PACS bridge and Triton all read it::

    REPO/<name>/config.pbtxt        Triton config: platform onnxruntime_onnx, max_batch_size 16, inputs/outputs
                                    (dims without the batch dim, -1 dynamic), dynamic_batching 2 ms
    REPO/<name>/1/model.onnx        the graph Triton and ctzoo serve run (see :mod:`ctzoo.export.graphs`)
    REPO/<name>/1/embed.onnx        template segmenters: the slice embedder that picks each slice's template
    REPO/<name>/ctzoo.json          name, version, task, batching, inputs/outputs (with the batch dim),
                                    input_spec, down_ratio | class_names, source, parity, opset, precision,
                                    sha256 of model.onnx, created, software
    REPO/<name>/card.json, README.md, bundle.json, model.safetensors, config.json, templates.*

Every graph is checked right after it is written (:mod:`ctzoo.export.parity`); the folder is written as a hidden
sibling and renamed into place only when complete, so an earlier export of the same name stays as it was until
a new one has passed, and a failed export leaves nothing. An export killed outright (SIGKILL, out of memory)
leaves its hidden folder; the next export of that name removes it (:func:`remove_stale_staging`).

``fp16=True`` writes ``<name>-fp16``: the same graphs with fp16 weights and arithmetic inside and fp32 inputs
and outputs, so clients, the service and the preprocessing are identical for both variants.

:func:`ensure_graphs` is what ``ctzoo infer --backend onnx`` uses: a bundle that has no graphs yet is exported
once into ``cache_dir()/onnx/<name>-<version>-<sha256[:12]>/`` (keyed by the weights, :func:`graphs_digest`), and
the bundle is returned with that export's graphs, its own card, preprocessing and template bank.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import importlib.metadata
import json
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from contextlib import suppress
from pathlib import Path
from typing import IO, Any

from ctzoo.datasets.samples import sha256_of
from ctzoo.export import parity
from ctzoo.export.graphs import bundle_graphs, export_graph, to_fp16
from ctzoo.io.atomic import replace_folder
from ctzoo.models.bundle import (
    BUNDLE_FILE,
    EXPORT_INFO_FILE,
    GRAPH_DIR,
    GRAPH_FILE,
    BundleError,
    ModelBundle,
    load_bundle,
)
from ctzoo.models.registry import CARD_JSON, CARD_MD, CONFIG_FILE, WEIGHTS_FILE

logger = logging.getLogger(__name__)

MAX_BATCH_SIZE = 16
MAX_QUEUE_DELAY_US = 2000
TRITON_CONFIG, README_FILE = "config.pbtxt", "README.md"
#: A model name: a folder on every OS, one word on a command line, a valid Triton model name.
NAME_PATTERN = r"^[a-z0-9][a-z0-9_.-]*$"
_DATATYPES = {1: "FP32", 10: "FP16"}  # onnx.TensorProto.FLOAT, FLOAT16
#: Bump when graphs' names, inputs or outputs change, so cached exports of older code are redone.
EXPORT_FORMAT = 3  # 3: the detector's heads have axes of their own (out_height, out_width)
Progress = Callable[[str], None]
#: An export writes ``REPO/.<name>.partial-XXXXXXXX/`` and renames it to ``REPO/<name>`` once checked. While it
#: runs it holds an flock on STAGING_LOCK inside; the next export of ``<name>`` removes the folders whose lock
#: nobody holds (see :func:`remove_stale_staging`).
STAGING_INFIX, STAGING_LOCK = ".partial-", ".ctzoo-export.lock"
#: A staging folder without a lock file counts as stale once its mtime is this old.
UNLOCKED_STALE_S = 3600.0


class ExportSourceError(ValueError):
    """MODEL_OR_CHECKPOINT is not something ctzoo can export (unknown name, unreadable or unsupported
    checkpoint, missing template bank); the message says what to give instead."""


class ExportTargetError(ValueError):
    """``OUT/<name>`` cannot take the export: replacing it would lose something that is not an earlier export, or
    ``OUT`` cannot be written; the message says what to choose instead."""


def valid_name(name: str) -> str:
    """``name`` if it matches :data:`NAME_PATTERN`, else ExportSourceError."""
    if re.match(NAME_PATTERN, name):
        return name
    raise ExportSourceError(f"model name {name!r} must be lower-case letters, digits, '_', '-' or '.', starting "
                            "with a letter or digit: choose one with --name")


# ------------------------------------------------------------------------------------------ repository


def check_target(target: Path, keep: Path | None = None) -> None:
    """Refuse (:class:`ExportTargetError`) an export into ``target`` that would delete what is not an earlier
    export: ``target`` must be absent, an empty folder, or a folder holding ``ctzoo.json``, and must not hold
    ``keep`` (the checkpoint or bundle folder being exported; ``keep`` may be ``target`` itself, an export
    exported again). A run folder, a bundle published by ``ctzoo zoo publish``, or any other folder of the same
    name is left alone."""
    instead = "choose another name with --name or another --out"
    if keep is not None and target.resolve() in keep.resolve().parents:
        raise ExportTargetError(f"{target} holds {keep}, which is being exported, and an export replaces the whole "
                                f"folder: {instead}")
    if target.is_symlink() or (target.exists() and not target.is_dir()):
        raise ExportTargetError(f"{target} exists and is not a folder: {instead}")
    if target.is_dir() and not (target / EXPORT_INFO_FILE).is_file() and any(target.iterdir()):
        raise ExportTargetError(f"{target} exists and is not an earlier export (it has no {EXPORT_INFO_FILE}); "
                                f"ctzoo export replaces only its own exports: {instead}")


def graph_io(path: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Inputs and outputs of the ONNX graph at ``path`` as ``{"name", "datatype", "shape"}`` (-1: dynamic)."""
    import onnx

    graph = onnx.load(str(path), load_external_data=False).graph

    def describe(value) -> dict[str, Any]:
        tensor = value.type.tensor_type
        shape = [d.dim_value if d.HasField("dim_value") else -1 for d in tensor.shape.dim]
        return {"name": value.name, "datatype": _DATATYPES.get(tensor.elem_type, str(tensor.elem_type)),
                "shape": shape}

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


def triton_config(name: str, inputs: list[dict[str, Any]], outputs: list[dict[str, Any]]) -> str:
    """``config.pbtxt`` (text protobuf) for Triton's ONNX Runtime backend; dims exclude the batch dimension."""

    def block(kind: str, tensors: list[dict[str, Any]]) -> list[str]:
        lines = [f"{kind} ["]
        for k, tensor in enumerate(tensors):
            lines += ["  {", f'    name: "{tensor["name"]}"', f"    data_type: TYPE_{tensor['datatype']}",
                      f"    dims: [ {', '.join(str(d) for d in tensor['shape'][1:])} ]",
                      "  }" + ("," if k < len(tensors) - 1 else "")]
        return [*lines, "]"]

    return "\n".join([f'name: "{name}"', 'platform: "onnxruntime_onnx"', f"max_batch_size: {MAX_BATCH_SIZE}",
                      *block("input", inputs), *block("output", outputs),
                      "dynamic_batching {", f"  max_queue_delay_microseconds: {MAX_QUEUE_DELAY_US}", "}", ""])


def _software(fp16: bool) -> dict[str, str]:
    from ctzoo import __version__

    found = {"ctzoo": __version__}
    for package in ("torch", "onnx", "onnxruntime", *(["onnxconverter-common"] if fp16 else [])):
        with suppress(importlib.metadata.PackageNotFoundError):
            found[package] = importlib.metadata.version(package)
    return found


def _copy_bundle(bundle: ModelBundle, folder: Path, name: str) -> None:
    """The bundle's own files into ``folder``; the card renamed when the export gets another name."""
    from ctzoo.models.template_bank import INDEX_FILE, TENSORS_FILE

    for file_name in (WEIGHTS_FILE, CONFIG_FILE, BUNDLE_FILE, INDEX_FILE, TENSORS_FILE):
        if (bundle.folder / file_name).is_file():
            shutil.copyfile(bundle.folder / file_name, folder / file_name)
    card = bundle.card
    markdown = next((bundle.folder / f for f in (CARD_MD, README_FILE) if (bundle.folder / f).is_file()), None)
    if card.name == name.removesuffix("-fp16") and markdown is not None:  # the bundle's own card, byte for byte
        shutil.copyfile(bundle.folder / CARD_JSON, folder / CARD_JSON)
        shutil.copyfile(markdown, folder / README_FILE)
        return
    card = card.model_copy(update={"name": name.removesuffix("-fp16")})
    (folder / CARD_JSON).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
    (folder / README_FILE).write_text(card.to_markdown(), encoding="utf-8")


def export_bundle(bundle: ModelBundle, repo: Path, name: str | None = None, fp16: bool = False,
                  opset: int = 17, progress: Progress | None = None, source: str | None = None,
                  monai: bool = False, keep: Path | None = None) -> Path:
    """Export ``bundle`` into ``repo/<name>`` (``<name>-fp16`` with ``fp16``), check every graph, return the
    folder; with ``monai`` also MONAI's bundle files (:mod:`ctzoo.export.monai_bundle`). ``RuntimeError`` when a
    graph disagrees with PyTorch; nothing new is then left in ``repo``. :class:`ExportTargetError`, before any
    work, when ``repo/<name>`` is something other than an earlier export, holds ``keep`` (see
    :func:`check_target`), or ``repo`` cannot be written."""
    say = progress or (lambda message: logger.info("%s", message))
    folder_name = valid_name(name or bundle.name) + ("-fp16" if fp16 else "")
    tolerance = parity.FP16_RELATIVE_TOLERANCE if fp16 else parity.RELATIVE_TOLERANCE
    repo = Path(repo)
    check_target(repo / folder_name, keep)
    created = not repo.exists()
    try:
        repo.mkdir(parents=True, exist_ok=True)
        remove_stale_staging(repo, folder_name, say)
        staging = Path(tempfile.mkdtemp(prefix=f".{folder_name}{STAGING_INFIX}", dir=repo))
    except OSError as exc:
        raise ExportTargetError(f"cannot write to {repo}: {exc.strerror or exc}") from None
    lock = None
    try:
        lock = _lock_staging(staging)
        os.chmod(staging, 0o755)  # mkdtemp makes it private; a server may run as another user
        (staging / GRAPH_DIR).mkdir()
        records, start = {}, time.perf_counter()
        for graph in bundle_graphs(bundle):
            path = staging / GRAPH_DIR / graph.file_name
            say(f"exporting {bundle.task} graph {graph.file_name} to ONNX (opset {opset})")
            export_graph(graph, path, opset)
            if fp16:
                say("converting to fp16 (fp32 inputs and outputs)")
                to_fp16(path)
            import onnx

            onnx.checker.check_model(str(path))
            say(f"checking ONNX Runtime against PyTorch (max rel <= {tolerance:g})")
            records[graph.file_name] = parity.check_parity(path, graph, tolerance, say)
        exported_s = time.perf_counter() - start
        model_path = staging / GRAPH_DIR / GRAPH_FILE
        inputs, outputs = graph_io(model_path)
        extra = {"down_ratio": bundle.down_ratio} if bundle.task == "detection" else {"class_names":
                                                                                    bundle.class_names}
        info = {"name": folder_name, "version": bundle.version, "task": bundle.task,
                "max_batch_size": MAX_BATCH_SIZE, "max_queue_delay_ms": MAX_QUEUE_DELAY_US / 1000,
                "inputs": inputs, "outputs": outputs, "input_spec": bundle.input_spec, **extra,
                "source": source or bundle.name, "parity": records[GRAPH_FILE],
                "graphs": {file_name: {"sha256": sha256_of(staging / GRAPH_DIR / file_name), "parity": record}
                           for file_name, record in records.items()},
                "sha256": sha256_of(model_path), "weights_sha256": sha256_of(bundle.folder / WEIGHTS_FILE),
                "opset": opset, "precision": "fp16" if fp16 else "fp32",
                "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                "software": _software(fp16), "export_s": round(exported_s, 3), "format": EXPORT_FORMAT}
        if bundle.template_bank is not None:
            bank = bundle.template_bank
            info["templates"] = {"count": len(bank), "size": list(bank.images.shape[2:]),
                                 "files": ["templates.safetensors", "templates.json"]}
        say(f"writing {repo / folder_name}")
        (staging / TRITON_CONFIG).write_text(triton_config(folder_name, inputs, outputs), encoding="utf-8")
        _copy_bundle(bundle, staging, folder_name)
        if monai:
            from ctzoo.export.monai_bundle import write_monai_files

            say("writing the MONAI bundle files (configs/metadata.json, configs/inference.json, models/)")
            write_monai_files(bundle, staging)
        (staging / EXPORT_INFO_FILE).write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
        (staging / STAGING_LOCK).unlink()  # not part of the export; the open handle keeps the lock until the rename
        check_target(repo / folder_name, keep)  # again: something may have been put there while we exported
        replace_folder(staging, repo / folder_name)
    finally:
        if lock is not None:
            lock.close()
        shutil.rmtree(staging, ignore_errors=True)
        if created and not any(repo.iterdir()):
            repo.rmdir()
    return repo / folder_name


def _lock_staging(staging: Path) -> IO[str]:
    """Lock ``staging`` for as long as this export runs (the returned handle is open): other exports see that it
    is in use. The kernel drops the lock when this process dies, however it dies."""
    import fcntl

    handle = open(staging / STAGING_LOCK, "w")
    fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a fresh folder: nobody else can hold it
    return handle


def remove_stale_staging(repo: Path, folder_name: str, say: Progress) -> list[Path]:
    """Remove the staging folders of ``repo/folder_name`` that killed exports left behind (SIGKILL, out of
    memory, power loss: their own cleanup never ran); returns them. Only folders named as :func:`export_bundle`
    names them (``.<folder_name>.partial-`` and mkdtemp's 8 characters) and not locked by a running export."""
    pattern = re.compile(re.escape(f".{folder_name}{STAGING_INFIX}") + "[a-z0-9_]{8}")
    removed = []
    for path in sorted(repo.iterdir()):
        if pattern.fullmatch(path.name) and path.is_dir() and not path.is_symlink() and _is_stale(path):
            shutil.rmtree(path, ignore_errors=True)
            say(f"removed {path}, left behind by an export that was killed")
            removed.append(path)
    return removed


def _is_stale(staging: Path) -> bool:
    """True when no running export holds ``staging``'s lock. A folder without a lock file (made by a ctzoo
    before the lock, or caught between mkdtemp and the lock) is stale once untouched for UNLOCKED_STALE_S."""
    import fcntl

    try:
        handle = os.open(staging / STAGING_LOCK, os.O_RDWR)  # writable: flock over NFS needs it
    except FileNotFoundError:
        return _untouched_for(staging, UNLOCKED_STALE_S)
    except OSError:
        return False  # not ours to judge (another user's export, say): leave it
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        return False  # its export is still running
    finally:
        os.close(handle)  # nobody takes up a killed export's folder again: no need to hold the lock while removing
    return True


def _untouched_for(path: Path, seconds: float) -> bool:
    try:
        return time.time() - path.stat().st_mtime > seconds
    except OSError:
        return False  # gone meanwhile: nothing to remove


def load_source(source: str, templates: Path | None = None, workdir: Path | None = None) -> tuple[ModelBundle, str]:
    """``(bundle, source description)`` for a zoo name, a bundle folder, or a ``ctzoo train`` checkpoint file
    (converted into a bundle under ``workdir``; a template segmenter's needs ``templates``)."""
    path = Path(source).expanduser()
    if path.is_file():
        if workdir is None:
            raise ExportSourceError("a checkpoint needs a work folder to become a bundle")
        from ctzoo.training.checkpoint_bundle import CheckpointError, bundle_from_checkpoint

        try:
            folder = bundle_from_checkpoint(path, workdir / "bundle", templates)
        except CheckpointError as exc:
            raise ExportSourceError(str(exc)) from None
        return load_bundle(folder), str(path.resolve())
    if templates is not None:
        raise ExportSourceError("--templates is for template-segmenter checkpoints; bundles carry their bank")
    if path.is_dir() and not (path / CARD_JSON).is_file():
        raise ExportSourceError(f"{source} is a folder but not a model bundle: give a bundle folder or the "
                                "checkpoint file inside a run folder (best.pt or last.pt)")
    if path.suffix in (".pt", ".pth"):
        raise ExportSourceError(f"no checkpoint file {source}")
    try:
        return load_bundle(source), source
    except KeyError as exc:  # UnknownModelError's message names close matches and the known models
        raise ExportSourceError(f"{exc} (or give a bundle folder, or a checkpoint written by ctzoo train)") from None
    except BundleError as exc:
        raise ExportSourceError(str(exc)) from None


def export_model(source: str, repo: Path, name: str | None = None, fp16: bool = False, opset: int = 17,
                 templates: Path | None = None, progress: Progress | None = None, monai: bool = False) -> Path:
    """``ctzoo export``: :func:`load_source` then :func:`export_bundle`; a checkpoint's bundle is named after
    its run folder unless ``name`` is given. The export never replaces the source (:func:`check_target`)."""
    say = progress or (lambda message: logger.info("%s", message))
    if name is not None:
        valid_name(name)  # before any work
    say(f"loading {source}")
    with tempfile.TemporaryDirectory(prefix="ctzoo-export-") as workdir:
        bundle, description = load_source(source, templates, Path(workdir))
        checkpoint = Path(source).expanduser()
        keep = checkpoint if checkpoint.is_file() else bundle.folder  # a checkpoint's bundle is in workdir
        return export_bundle(bundle, repo, name or bundle.name, fp16, opset, progress, description, monai, keep)


def graphs_digest(bundle: ModelBundle) -> str:
    """sha256 of what ``bundle``'s graphs are made of: the network and its weights, and a template segmenter's
    input size (fixed in its graph). Not the card, the preprocessing otherwise, or the template bank: the graphs
    take no part of them, so a cached export serves every bundle with the same digest."""
    parts = [bundle.weights_digest()]
    if bundle.task == "segmentation":
        parts.append(json.dumps(list(bundle.preprocessing.size)))
    return hashlib.sha256("\n".join(parts).encode()).hexdigest()


def ensure_graphs(bundle: ModelBundle, cache: Path | None = None) -> ModelBundle:
    """``bundle`` itself when it carries checked graphs, else ``bundle`` with the graphs of its export in the cache
    (exported on first use, keyed by :func:`graphs_digest`). Only the graphs come from the cache: the card (its
    operating point), the preprocessing and the template bank stay ``bundle``'s own, which may have changed since
    another bundle with these weights was exported there."""
    if bundle.graphs is not None:
        return bundle
    from ctzoo.datasets.samples import cache_dir

    key = f"{bundle.name}-{bundle.version}-{graphs_digest(bundle)[:12]}"
    root = (cache or cache_dir()) / "onnx"
    folder = root / key / bundle.name
    try:
        cached = load_bundle(folder)
        if cached.graphs is None or cached.graphs.info.get("format") != EXPORT_FORMAT:
            cached = None
    except (BundleError, KeyError):
        cached = None
    if cached is None:
        start = time.perf_counter()
        export_bundle(bundle, root / key, bundle.name)
        logger.info("exported %s to ONNX in %.1f s: %s", bundle.name, time.perf_counter() - start, folder)
        cached = load_bundle(folder)
    return dataclasses.replace(bundle, graphs=cached.graphs, _network=None, _lock=threading.Lock())
