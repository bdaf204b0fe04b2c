"""One model, one folder, one object: :class:`ModelBundle` and :func:`load_bundle`.

Every path that trains, publishes, expands, exports, runs, serves or sends a model to a PACS passes it around as
a :class:`ModelBundle`, read once from its folder. The folder::

    <name>/bundle.json          format, and the network: architecture, constructor config, LEMON expansion if any
    <name>/model.safetensors    the weights (safetensors: loading never runs code)
    <name>/config.json          the constructor config again, as create_model has always read it
    <name>/card.json            the model card (:class:`~ctzoo.models.registry.ModelCard`); its ``input_spec`` is
                                the preprocessing, typed here as ``SlicePreprocessing`` or ``SegPreprocessing``
    <name>/MODEL_CARD.md        the same card for people (README.md in an exported folder)
    <name>/templates.*          template segmenters: the template bank
    <name>/1/model.onnx         exported bundles (``ctzoo export``): the checked graph Triton and ctzoo serve run;
    <name>/1/embed.onnx         template segmenters also the slice embedder that picks each slice's template;
    <name>/ctzoo.json           and the export record: graph inputs/outputs, precision, parity against PyTorch
    <name>/config.pbtxt         Triton's config
    <name>/configs/*.json       MONAI bundle metadata and inference config (``ctzoo export --format monai-bundle``)

A zoo name resolves to the folder shipped in the package (``ctzoo/models/weights/<name>/``); any other argument is
a path to a user's bundle (``ctzoo zoo publish``, ``ctzoo export``, a checkpoint converted by
:func:`ctzoo.training.checkpoint_bundle.bundle_from_checkpoint`).
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import safetensors
import safetensors.torch
import torch
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from safetensors import SafetensorError
from torch import nn

from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing
from ctzoo.datasets.seg_preprocessing import SegPreprocessing
from ctzoo.models.registry import (
    _REGISTRY,
    CARD_JSON,
    DEFAULT_SCORE_THRESHOLD,
    WEIGHTS_FILE,
    ModelCard,
    _state_mismatch,
    model_entry,
)
from ctzoo.models.template_bank import INDEX_FILE, TENSORS_FILE, TemplateBank

BUNDLE_FILE, FORMAT = "bundle.json", "ctzoo-bundle/1"
#: The files whose sha256 bundle.json records (save_pretrained) and loading checks: what decides what the model
#: computes (the weights, a template segmenter's bank). The card and configs are read, and checked, as text.
DIGESTED_FILES = (WEIGHTS_FILE, TENSORS_FILE, INDEX_FILE)
EXPORT_INFO_FILE, GRAPH_DIR, GRAPH_FILE, EMBED_FILE = "ctzoo.json", "1", "model.onnx", "embed.onnx"
#: The networks a bundle may name. A bundle is data: it chooses among these, it never names code to import.
ARCHITECTURES = ("RecistNet", "TemplateSegNet", "UNet")
#: How an expanded network's structure is rebuilt, by expansion kind: filled by the module that implements the
#: kind when it is imported (``lemon``: :mod:`ctzoo.scaling.zoo_expand`, which sits above this layer).
NETWORK_REBUILDERS: dict[str, Callable[[dict[str, Any]], nn.Module]] = {}
#: The module that registers each expansion kind's rebuilder, imported by name on first need, so that every path
#: (serve, infer, MONAI's runner) can load an expanded bundle without importing it first. A fixed allow-list: the
#: kind comes from the bundle file, the module never does.
REBUILDER_MODULES = {"lemon": "ctzoo.scaling.zoo_expand"}


class BundleError(ValueError):
    """A folder is not a usable model bundle; the message says which file and what is wrong."""


class NetworkDef(BaseModel):
    """``bundle.json``'s ``network``: what to build before the weights load."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    architecture: Literal["RecistNet", "TemplateSegNet", "UNet"]
    config: dict[str, Any] = Field(description="the constructor's keyword arguments")
    expansion: dict[str, Any] | None = Field(None, description="LEMON record {kind, architecture, expansion}: the "
                                                               "structure is the source network expanded again")


class BundleFile(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["ctzoo-bundle/1"] = FORMAT
    network: NetworkDef | None = Field(description="None: a model only its registered builder builds (create_model)")
    sha256: dict[str, str] = Field(default_factory=dict, description="{file: sha256} of DIGESTED_FILES as saved; "
                                                                     "empty in bundles saved before ctzoo recorded it")


def network_class(architecture: str) -> Callable[..., nn.Module]:
    """The constructor an architecture name stands for."""
    if architecture == "RecistNet":
        from ctzoo.models.recistnet import RecistNet

        return RecistNet
    if architecture == "TemplateSegNet":
        from ctzoo.models.template_seg import TemplateSegNet

        return TemplateSegNet
    if architecture == "UNet":
        from monai.networks.nets import UNet

        return UNet
    raise BundleError(f"unknown architecture {architecture!r}; a bundle may name {', '.join(ARCHITECTURES)}")


def build_network(network: NetworkDef) -> nn.Module:
    """A freshly initialised network of ``network``'s structure (weights not loaded)."""
    if network.expansion is None:
        return network_class(network.architecture)(**network.config)
    kind = network.expansion.get("kind", "lemon")
    if kind not in REBUILDER_MODULES:
        raise BundleError(f"the network is {kind}-expanded; known expansions: {', '.join(REBUILDER_MODULES)}")
    if kind not in NETWORK_REBUILDERS:
        importlib.import_module(REBUILDER_MODULES[kind])  # registers NETWORK_REBUILDERS[kind]
    return NETWORK_REBUILDERS[kind](network.expansion)


@dataclass(frozen=True)
class ExportedGraphs:
    """The checked ONNX graphs of an exported bundle and their export record (``ctzoo.json``)."""

    model: Path  # 1/model.onnx
    embed: Path | None  # 1/embed.onnx, template segmenters
    info: dict[str, Any]
    _digests: dict[str, str] = field(default_factory=dict, compare=False, repr=False)

    @property
    def precision(self) -> str:
        return str(self.info.get("precision", "fp32"))

    @property
    def weights_sha256(self) -> str | None:
        """The digest of model.safetensors the export recorded (exports before it was recorded: None)."""
        return self.info.get("weights_sha256")

    def verify(self) -> dict[str, str]:
        """``{file name: sha256}`` of the graphs as they are on disk, each checked against the digest ctzoo.json
        records (:class:`BundleError` when one differs: the graph was changed after the export checked it).
        Hashed once per bundle, when the graphs are about to run."""
        if not self._digests:
            recorded = self.info.get("graphs") or {}
            for path in (self.model, self.embed):
                if path is not None:
                    expected = (recorded.get(path.name) or {}).get("sha256")
                    if expected is None and path == self.model:
                        expected = self.info.get("sha256")
                    self._digests[path.name] = checked_digest(path, expected, path.parent.parent / EXPORT_INFO_FILE)
        return dict(self._digests)

    def describe(self, root: Path) -> dict[str, Any]:
        """What a reply says about the graph that produced it: the digest of the file that ran, verified; the file
        relative to ``root``'s parent when it is in the bundle ``root``, else its whole path (the ONNX cache's)."""
        file = self.model.relative_to(root.parent) if self.model.parent.parent == root else self.model
        return {"file": str(file), "precision": self.precision,
                "sha256": self.verify()[self.model.name], "opset": self.info.get("opset")}


def checked_digest(path: Path, expected: str | None, record: Path, content: bytes | None = None) -> str:
    """sha256 of ``path`` (of ``content``, its bytes, when already read), which must be ``expected`` (the digest
    ``record`` holds; None: nothing recorded, nothing to check); :class:`BundleError` otherwise."""
    return _checked(path, _sha256(path, content), {record: expected})


def _sha256(path: Path, content: bytes | None = None) -> str:
    """sha256 of ``content`` (``path``'s bytes, already read), else of the file, streamed."""
    from ctzoo.datasets.samples import sha256_of

    if content is not None:
        return hashlib.sha256(content).hexdigest()
    try:
        return sha256_of(path)
    except OSError as exc:
        raise BundleError(f"{path} cannot be read: {exc.strerror or exc}") from None


def _checked(path: Path, digest: str, records: Mapping[Path, str | None]) -> str:
    """``digest`` (of ``path``), which must be the one every record file of ``records`` holds for it (None: that
    one records none); :class:`BundleError` naming both otherwise."""
    for record, expected in records.items():
        if expected is not None and digest != expected:
            remedy = ("it was exported; export the model again" if record.name == EXPORT_INFO_FILE else
                      "the bundle was saved; restore it from the published bundle, or publish the model again")
            raise BundleError(f"{path} has sha256 {digest}, but {record} records {expected}: the file was changed "
                              f"after {remedy}")
    return digest


@dataclass(eq=False)
class ModelBundle:
    """A model read from its folder: identity and card, network, preprocessing, outputs, template bank, graphs.

    Built by :func:`load_bundle`; every field is read once, the network is built on the first :meth:`network`
    call and kept (it is shared: callers must not train or move it in place; use ``copy.deepcopy`` for that).
    """

    folder: Path
    card: ModelCard
    network_def: NetworkDef
    preprocessing: SlicePreprocessing | SegPreprocessing
    class_names: list[str]
    template_bank: Any = None  # TemplateBank
    graphs: ExportedGraphs | None = None
    recorded_sha256: dict[str, str] = field(default_factory=dict)  # bundle.json's {file: sha256}; {}: older bundle
    _network: nn.Module | None = field(default=None, repr=False)
    _digests: dict[str, str] = field(default_factory=dict, repr=False)  # {file: sha256}, checked, hashed once
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def name(self) -> str:
        return self.card.name

    @property
    def version(self) -> str:
        return self.card.version

    @property
    def task(self) -> str:
        return self.card.task

    @property
    def input_spec(self) -> dict[str, Any]:
        """The card's preprocessing as a plain dict (what ctzoo.json and MONAI metadata record)."""
        return dict(self.card.input_spec)

    @property
    def score_threshold(self) -> float:
        """A detector's reporting threshold: its card's operating point (chosen on val), else the zoo default."""
        point = self.card.operating_point
        return point.score_threshold if point is not None else DEFAULT_SCORE_THRESHOLD

    @property
    def down_ratio(self) -> int:
        """Detector output stride (heads are 1/down_ratio of the input)."""
        return int(self.network_def.config.get("down_ratio", 4))

    def __getstate__(self) -> dict[str, Any]:
        # to another process (a spawned model copy of ctzoo infer): what was read from the folder; the network
        # is built again there on first use
        return {**self.__dict__, "_network": None, "_lock": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state, _lock=threading.Lock())

    def network(self) -> nn.Module:
        """The PyTorch network with the bundle's weights, in eval mode, on the CPU (built once); the weights must
        have the digest bundle.json (and an export's ctzoo.json) records (:class:`BundleError` otherwise)."""
        with self._lock:
            if self._network is None:
                state, self._digests[WEIGHTS_FILE] = _read_checked_weights(self.folder, self._weights_records())
                self._network = _load_state(build_network(self.network_def), state, self.folder)
            return self._network

    def _weights_records(self) -> dict[Path, str | None]:
        """``{record file: the sha256 it holds for model.safetensors}``: an export's ctzoo.json (first: its error
        says to export again), and bundle.json."""
        records = {self.folder / EXPORT_INFO_FILE: self.graphs.weights_sha256} if self.graphs is not None else {}
        return {**records, self.folder / BUNDLE_FILE: self.recorded_sha256.get(WEIGHTS_FILE)}

    def file_digests(self) -> dict[str, str]:
        """``{file: sha256}`` of the files that decide what the model computes (model.safetensors, a template
        bank's files), each checked against what bundle.json records (:class:`BundleError` when one differs): what
        results record as the weights that ran. Hashed once per bundle."""
        with self._lock:
            if WEIGHTS_FILE not in self._digests:
                path = self.folder / WEIGHTS_FILE
                self._digests[WEIGHTS_FILE] = _checked(path, _sha256(path), self._weights_records())
            return dict(self._digests)

    @property
    def digests_recorded(self) -> bool:
        """Whether bundle.json records the digests :meth:`file_digests` checks (False: a bundle saved before ctzoo
        recorded them, whose digests are computed, with nothing to check them against)."""
        return WEIGHTS_FILE in self.recorded_sha256

    def weights_digest(self) -> str:
        """sha256 of the weights and the network definition: what exported graphs depend on."""
        text = self.network_def.model_dump_json() + self.file_digests()[WEIGHTS_FILE]
        return hashlib.sha256(text.encode()).hexdigest()


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``folder/model.safetensors``, on the CPU, with the digest its bundle.json records (if it
    has one); :class:`BundleError` naming the file when it cannot be read (missing, truncated, not safetensors) or
    was changed after it was saved."""
    recorded = _bundle_file(folder).sha256 if (folder / BUNDLE_FILE).is_file() else {}
    return _read_checked_weights(folder, {folder / BUNDLE_FILE: recorded.get(WEIGHTS_FILE)})[0]


def _read_checked_weights(folder: Path, records: Mapping[Path, str | None]) -> tuple[dict[str, torch.Tensor], str]:
    """The state dict in ``folder/model.safetensors`` and its sha256, which must be what each of ``records`` holds
    (the one place weights are read: the very bytes hashed are loaded)."""
    path = folder / WEIGHTS_FILE
    try:
        content = path.read_bytes()
    except OSError as exc:
        raise BundleError(f"{path} cannot be read: {exc.strerror or exc}") from None
    digest = _checked(path, _sha256(path, content), records)
    try:
        return safetensors.torch.load(content), digest
    except SafetensorError as exc:
        raise BundleError(f"{path} cannot be read: {exc}") from None


def _check_weights_readable(folder: Path) -> None:
    """:class:`BundleError` unless ``folder/model.safetensors`` has a whole safetensors header (its tensor table,
    which also covers the file's length: a truncated copy fails here), read without loading a tensor."""
    path = folder / WEIGHTS_FILE
    try:
        with safetensors.safe_open(str(path), "pt"):
            pass
    except (OSError, SafetensorError) as exc:
        raise BundleError(f"{path} cannot be read: {exc}") from None


def _load_state(model: nn.Module, state: Mapping[str, torch.Tensor], folder: Path) -> nn.Module:
    """``model`` with ``state``, the weights of ``folder``, in eval mode; :class:`BundleError` when they do not fit."""
    problems = _state_mismatch(model.state_dict(), state)
    if problems:
        raise BundleError(f"{folder / WEIGHTS_FILE} does not fit the network of {folder / BUNDLE_FILE}: {problems}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def bundle_folder(name_or_path: str | os.PathLike[str]) -> Path:
    """The folder ``name_or_path`` names: a zoo model's shipped folder, or the path itself."""
    if isinstance(name_or_path, str) and name_or_path in _REGISTRY:
        return model_entry(name_or_path).weights_dir
    path = Path(name_or_path).expanduser()
    if path.is_dir():
        return path
    if isinstance(name_or_path, str) and os.sep not in name_or_path and "/" not in name_or_path \
            and not path.suffix:
        model_entry(name_or_path)  # UnknownModelError: names close matches and the known models
    if path.is_file():
        raise BundleError(f"{path} is a file; a model bundle is a folder (a checkpoint? 'ctzoo zoo publish' or "
                          "'ctzoo export' turns one into a bundle)")
    raise BundleError(f"no model bundle at {path}")


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{path.parent} is not a model bundle: {path.name} is missing") from None
    except (OSError, ValueError) as exc:
        raise BundleError(f"{path}: {exc}") from None


def _problems(exc: ValidationError) -> str:
    """A validation error on one line: ``field.path: message`` per problem, with the value found where it is short."""
    def found(value: Any) -> str:
        shown = repr(value)
        return f" (got {shown})" if isinstance(value, (str, int, float, bool)) and len(shown) <= 60 else ""

    return "; ".join(f"{'.'.join(map(str, e['loc'])) or '<root>'}: {e['msg']}{found(e.get('input'))}"
                     for e in exc.errors())


def read_card(folder: Path) -> ModelCard:
    """The model card of the bundle in ``folder`` (the one card reader)."""
    try:
        return ModelCard.model_validate_json((folder / CARD_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{folder} is not a model bundle: {CARD_JSON} is missing (no weights published "
                          "there yet?)") from None
    except ValidationError as exc:
        raise BundleError(f"{folder / CARD_JSON} is not a valid model card: {_problems(exc)}") from None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8
        raise BundleError(f"{folder / CARD_JSON}: {exc}") from None


def _bundle_file(folder: Path) -> BundleFile:
    if (folder / BUNDLE_FILE).is_file():
        try:
            return BundleFile.model_validate(_read_json(folder / BUNDLE_FILE))
        except ValidationError as exc:
            raise BundleError(f"{folder / BUNDLE_FILE}: {_problems(exc)}") from None
    raise BundleError(f"{folder} is not a model bundle: {BUNDLE_FILE} is missing")


def _network_def(bundle_file: BundleFile, folder: Path) -> NetworkDef:
    if bundle_file.network is None:
        raise BundleError(f"{folder / BUNDLE_FILE} names no network: the model is built by its registered builder "
                          "only; load it with ctzoo.models.create_model(name, pretrained=True)")
    return bundle_file.network


def _preprocessing(card: ModelCard, folder: Path) -> SlicePreprocessing | SegPreprocessing:
    kind = SlicePreprocessing if card.task == "detection" else SegPreprocessing
    fields = {k: v for k, v in card.input_spec.items() if k in kind.model_fields}
    try:
        return kind.model_validate(fields)
    except ValidationError as exc:
        raise BundleError(f"{folder / CARD_JSON}: input_spec is not a {kind.__name__}: {_problems(exc)}") from None


def read_graphs(folder: Path) -> ExportedGraphs | None:
    """The exported graphs in ``folder`` as its ``ctzoo.json`` records them (the one reader of ctzoo.json); None
    when there is no ctzoo.json (not exported: a graph without it is not trusted); :class:`BundleError` when
    ctzoo.json is unreadable or records a graph that is not there (never silently exported again)."""
    record = folder / EXPORT_INFO_FILE
    if not record.is_file():
        return None
    info = _read_json(record)
    if not isinstance(info, dict):
        raise BundleError(f"{record}: not a JSON object")
    for file_name in dict.fromkeys([GRAPH_FILE, *(info.get("graphs") or {})]):  # older exports record no "graphs"
        if not (folder / GRAPH_DIR / file_name).is_file():
            raise BundleError(f"{record} records {GRAPH_DIR}/{file_name} but it is missing; export the model again")
    embed = folder / GRAPH_DIR / EMBED_FILE
    return ExportedGraphs(folder / GRAPH_DIR / GRAPH_FILE, embed if embed.is_file() else None, info)


def _template_bank(folder: Path, recorded: Mapping[str, str]) -> tuple[TemplateBank, dict[str, str]]:
    """The TemplateBank of the bundle in ``folder`` and ``{file: sha256}`` of its files, which must be what
    bundle.json records (``recorded``); :class:`BundleError` saying why it cannot be read otherwise."""
    digests = {}
    for name in (INDEX_FILE, TENSORS_FILE):
        if (folder / name).is_file():  # a missing one: TemplateBank.load names it
            digests[name] = _checked(folder / name, _sha256(folder / name), {folder / BUNDLE_FILE: recorded.get(name)})
    try:
        return TemplateBank.load(folder), digests
    except FileNotFoundError as exc:  # its message names the missing file
        raise BundleError(str(exc)) from None
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:  # damaged, another format version
        raise BundleError(f"{folder}: the template bank cannot be read: {exc}") from None


def load_bundle(name_or_path: str | os.PathLike[str]) -> ModelBundle:
    """The :class:`ModelBundle` of a zoo model name or a bundle folder; :class:`BundleError` (or the registry's
    UnknownModelError for a word that is no zoo name) saying what is missing otherwise."""
    folder = bundle_folder(name_or_path)
    card = read_card(folder)
    bundle_file = _bundle_file(folder)
    network = _network_def(bundle_file, folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise BundleError(f"{folder} is not a model bundle: {WEIGHTS_FILE} is missing")
    _check_weights_readable(folder)  # now, not when the network is first built mid-run
    bank, digests = _template_bank(folder, bundle_file.sha256) if (folder / INDEX_FILE).is_file() else (None, {})
    if card.task == "segmentation":
        class_names = list(bank.class_names) if bank is not None else list(card.input_spec.get("classes", []))
    else:
        class_names = ["lesion"]
    if network.architecture == "TemplateSegNet" and bank is None:
        raise BundleError(f"{folder} holds a template segmenter but no template bank (templates.json)")
    return ModelBundle(folder, card, network, _preprocessing(card, folder), class_names, bank, read_graphs(folder),
                       bundle_file.sha256, _digests=digests)


def bundle_file_text(network: NetworkDef | None, sha256: Mapping[str, str] | None = None) -> str:
    """The text of ``bundle.json`` for ``network`` and the ``{file: sha256}`` it records."""
    return BundleFile(network=network, sha256=dict(sha256 or {})).model_dump_json(indent=2) + "\n"


def file_digests(folder: Path) -> dict[str, str]:
    """``{file: sha256}`` of the :data:`DIGESTED_FILES` in ``folder``: what its bundle.json records."""
    return {name: _sha256(folder / name) for name in DIGESTED_FILES if (folder / name).is_file()}
