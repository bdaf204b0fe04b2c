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
import shutil
import tempfile
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
from ctzoo.io.atomic import replace_folder
from ctzoo.models.registry import (
    _REGISTRY,
    CARD_JSON,
    CARD_MD,
    CONFIG_FILE,
    DEFAULT_SCORE_THRESHOLD,
    WEIGHTS_FILE,
    ArchitectureOverrideError,
    ModelCard,
    ModelEntry,
    WeightsMismatchError,
    _as_json,
    _state_mismatch,
    model_entry,
)

BUNDLE_FILE, FORMAT = "bundle.json", "ctzoo-bundle/1"
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
    network: NetworkDef


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
        """What a reply says about the graph that produced it: the digest of the file that ran, verified."""
        return {"file": str(self.model.relative_to(root.parent)), "precision": self.precision,
                "sha256": self.verify()[self.model.name], "opset": self.info.get("opset")}


def checked_digest(path: Path, expected: str | None, record: Path, content: bytes | None = None) -> str:
    """sha256 of ``path`` (of ``content``, its bytes, when already read), which must be ``expected`` (the digest
    ``record`` holds; None: nothing recorded, nothing to check); :class:`BundleError` otherwise."""
    from ctzoo.datasets.samples import sha256_of

    digest = hashlib.sha256(content).hexdigest() if content is not None else sha256_of(path)
    if expected is not None and digest != expected:
        raise BundleError(f"{path} has sha256 {digest}, but {record} records {expected}: the file was changed "
                          "after it was exported; export the model again")
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
    _network: nn.Module | None = field(default=None, repr=False)
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
        """The PyTorch network with the bundle's weights, in eval mode, on the CPU (built once)."""
        with self._lock:
            if self._network is None:
                expected = self.graphs.weights_sha256 if self.graphs is not None else None
                self._network = _load_weights(build_network(self.network_def), self.folder, expected)
            return self._network

    def weights_digest(self) -> str:
        """sha256 of the weights and the network definition: what exported graphs depend on."""
        from ctzoo.datasets.samples import sha256_of

        text = self.network_def.model_dump_json() + sha256_of(self.folder / WEIGHTS_FILE)
        return hashlib.sha256(text.encode()).hexdigest()


def read_weights(folder: Path) -> dict[str, torch.Tensor]:
    """The state dict in ``folder/model.safetensors``, on the CPU (the one place weights are read);
    :class:`BundleError` naming the file when it cannot be read (missing, truncated, not safetensors)."""
    path = folder / WEIGHTS_FILE
    try:
        return safetensors.torch.load_file(str(path), device="cpu")
    except (OSError, SafetensorError) as exc:
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


def _load_weights(model: nn.Module, folder: Path, expected_sha256: str | None = None) -> nn.Module:
    """``model`` with the weights of ``folder``; an exported bundle's weights must have the digest its
    ctzoo.json records (``expected_sha256``; None for bundles that record none)."""
    path = folder / WEIGHTS_FILE
    if expected_sha256 is None:
        state = read_weights(folder)
    else:  # hash the very bytes that are loaded
        content = path.read_bytes()
        checked_digest(path, expected_sha256, folder / EXPORT_INFO_FILE, content)
        try:
            state = {k: v.to("cpu") for k, v in safetensors.torch.load(content).items()}
        except SafetensorError as exc:
            raise BundleError(f"{path} cannot be read: {exc}") from None
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


def read_card(folder: Path) -> ModelCard:
    """The model card of the bundle in ``folder`` (the one card reader)."""
    try:
        return ModelCard.model_validate_json((folder / CARD_JSON).read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise BundleError(f"{folder} is not a model bundle: {CARD_JSON} is missing (no weights published "
                          "there yet?)") from None
    except ValidationError as exc:
        raise BundleError(f"{folder / CARD_JSON} is not a valid model card: {exc}") from None
    except (OSError, ValueError) as exc:  # unreadable, not UTF-8
        raise BundleError(f"{folder / CARD_JSON}: {exc}") from None


def _network_def(folder: Path) -> NetworkDef:
    if (folder / BUNDLE_FILE).is_file():
        try:
            return BundleFile.model_validate(_read_json(folder / BUNDLE_FILE)).network
        except ValidationError as exc:
            raise BundleError(f"{folder / BUNDLE_FILE}: {exc}") from None
    raise BundleError(f"{folder} is not a model bundle: {BUNDLE_FILE} is missing")


def _preprocessing(card: ModelCard, folder: Path) -> SlicePreprocessing | SegPreprocessing:
    kind = SlicePreprocessing if card.task == "detection" else SegPreprocessing
    fields = {k: v for k, v in card.input_spec.items() if k in kind.model_fields}
    try:
        return kind.model_validate(fields)
    except ValidationError as exc:
        raise BundleError(f"{folder / CARD_JSON}: input_spec is not a {kind.__name__}: {exc}") from None


def _graphs(folder: Path) -> ExportedGraphs | None:
    model = folder / GRAPH_DIR / GRAPH_FILE
    if not (model.is_file() and (folder / EXPORT_INFO_FILE).is_file()):
        return None
    embed = folder / GRAPH_DIR / EMBED_FILE
    return ExportedGraphs(model, embed if embed.is_file() else None, _read_json(folder / EXPORT_INFO_FILE))


def _template_bank(folder: Path) -> Any:
    """The TemplateBank of the bundle in ``folder``; :class:`BundleError` saying why it cannot be read."""
    from ctzoo.models.template_bank import TemplateBank

    try:
        return TemplateBank.load(folder)
    except FileNotFoundError as exc:  # its message names the missing file
        raise BundleError(str(exc)) from None
    except (OSError, ValueError, KeyError, TypeError, SafetensorError) as exc:  # damaged, another format version
        raise BundleError(f"{folder}: the template bank cannot be read: {exc}") from None


def load_bundle(name_or_path: str | os.PathLike[str]) -> ModelBundle:
    """The :class:`ModelBundle` of a zoo model name or a bundle folder; :class:`BundleError` (or the registry's
    UnknownModelError for a word that is no zoo name) saying what is missing otherwise."""
    folder = bundle_folder(name_or_path)
    card = read_card(folder)
    network = _network_def(folder)
    if not (folder / WEIGHTS_FILE).is_file():
        raise BundleError(f"{folder} is not a model bundle: {WEIGHTS_FILE} is missing")
    _check_weights_readable(folder)  # now, not when the network is first built mid-run
    from ctzoo.models.template_bank import INDEX_FILE

    bank = _template_bank(folder) if (folder / INDEX_FILE).is_file() else None
    if card.task == "segmentation":
        class_names = list(bank.class_names) if bank is not None else list(card.input_spec.get("classes", []))
    else:
        class_names = ["lesion"]
    if network.architecture == "TemplateSegNet" and bank is None:
        raise BundleError(f"{folder} holds a template segmenter but no template bank (templates.json)")
    return ModelBundle(folder, card, network, _preprocessing(card, folder), class_names, bank, _graphs(folder))


def bundle_file_text(network: NetworkDef) -> str:
    """The text of ``bundle.json`` for ``network``."""
    return BundleFile(network=network).model_dump_json(indent=2) + "\n"


# ------------------------------------------------------------------------------------- zoo models by name


def create_model(name: str, pretrained: bool = False, allow_overrides: bool = False, **overrides: Any) -> nn.Module:
    """Build a registered model from its default config updated by ``overrides``.

    With ``pretrained=True`` the model is built from the shipped ``config.json`` (the config the weights
    were trained with) and loads ``model.safetensors`` with a strict key match. An override that differs from that
    config is refused (:class:`ArchitectureOverrideError`): even one that keeps every weight's shape (a gate, a
    temperature) makes the network compute something its weights were not trained for. ``allow_overrides=True``
    loads the weights into the changed network anyway (fine-tuning it, say); overrides that change the
    architecture are refused still, as the weights cannot load. The module is returned in training mode, as torch
    builds it: call ``.eval()``.
    """
    entry = model_entry(name)
    if not pretrained:
        return entry.builder(**{**entry.default_config, **overrides})
    weights, config_path = entry.weights_dir / WEIGHTS_FILE, entry.weights_dir / CONFIG_FILE
    if not (weights.is_file() and config_path.is_file()):
        raise FileNotFoundError(f"no weights are shipped for {name!r} yet ({WEIGHTS_FILE} and {CONFIG_FILE} are "
                                f"expected in {entry.weights_dir}); use pretrained=False, or publish them with "
                                "save_pretrained()")
    trained = json.loads(config_path.read_text(encoding="utf-8"))
    before = {**entry.default_config, **trained}
    changed = {k: v for k, v in overrides.items() if _as_json(v) != _as_json(before.get(k))}
    model = entry.builder(**{**before, **overrides})
    state = read_weights(entry.weights_dir)
    problems = _state_mismatch(model.state_dict(), state)
    if problems and changed:
        raise ArchitectureOverrideError(
            f"overrides {changed} change the architecture of {name!r} from the config its weights were trained "
            f"with ({config_path}), so they cannot be loaded ({problems}). Drop those overrides, or use "
            "pretrained=False to train the changed model.")
    if problems:
        raise WeightsMismatchError(f"{weights} does not fit {name!r} built from {config_path}: {problems}")
    if changed and not allow_overrides:
        shipped = {k: before.get(k) for k in changed}
        raise ArchitectureOverrideError(
            f"overrides {changed} differ from the config the weights of {name!r} were trained with ({shipped} in "
            f"{config_path}): the network would compute something those weights were not trained for. Drop them, "
            "pass allow_overrides=True to load the weights into the changed network anyway, or use pretrained=False.")
    model.load_state_dict(state, strict=True)
    return model


# ------------------------------------------------------------------------------------------ writing


def _check_config_rebuilds(entry: ModelEntry, config: Mapping[str, Any], model: nn.Module) -> None:
    """Refuse to publish weights that ``create_model(pretrained=True)`` could not load back."""
    try:
        with torch.device("meta"):  # shapes only: no memory and no initialisation cost
            reference = entry.builder(**{**entry.default_config, **config})
    except Exception:  # a builder that computes on tensor values cannot run on meta: build it for real
        reference = entry.builder(**{**entry.default_config, **config})
    problems = _state_mismatch(reference.state_dict(), model.state_dict())
    if problems:
        raise ValueError(f"config does not rebuild the model being published as {entry.name!r}: {problems}")


def save_pretrained(model: nn.Module, name_or_dir: str | os.PathLike[str], config: Mapping[str, Any],
                    card: ModelCard, extra: Callable[[Path], Any] | None = None,
                    expansion: dict[str, Any] | None = None) -> Path:
    """Publish ``model`` with its constructor ``config`` and ``card``; returns the folder written.

    ``name_or_dir`` is a registered name (its ``weights_dir``) or any folder (pass a Path to be explicit).
    The four files (and whatever ``extra(folder)`` writes, e.g. a template bank) are written into a temporary
    folder beside the target and renamed into place, so readers see the old weights or the new ones, never a
    mixture or a half-written file.
    """
    entry = _REGISTRY.get(name_or_dir) if isinstance(name_or_dir, str) else None
    if entry is not None and card.name != entry.name:
        raise ValueError(f"card is for {card.name!r} but the weights are being published as {entry.name!r}")
    if card.name in _REGISTRY and card.task != _REGISTRY[card.name].task:
        raise ValueError(f"card says task {card.task!r}; {card.name!r} is registered as {_REGISTRY[card.name].task!r}")
    target = entry.weights_dir if entry is not None else Path(name_or_dir)
    if target.exists() and not target.is_dir():
        raise FileExistsError(f"{target} exists and is not a folder")
    n_params = sum(p.numel() for p in model.parameters())
    if card.parameters != n_params:
        raise ValueError(f"card says {card.parameters:,} parameters but the model has {n_params:,}")
    config_text = json.dumps(dict(config), indent=2, sort_keys=True) + "\n"  # TypeError for non-JSON values
    if card.name in _REGISTRY:
        _check_config_rebuilds(_REGISTRY[card.name], config, model)
    # state_dict tensors may share storage (tied weights, views), which safetensors refuses: store copies
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in model.state_dict().items()}
    target.parent.mkdir(parents=True, exist_ok=True)
    partial = Path(tempfile.mkdtemp(prefix=f".{target.name}.partial-", dir=target.parent))
    try:
        os.chmod(partial, 0o755)  # mkdtemp makes it private; shipped weights must be readable by every user
        safetensors.torch.save_file(tensors, str(partial / WEIGHTS_FILE),
                                    metadata={"format": "pt", "name": card.name, "version": card.version})
        (partial / CONFIG_FILE).write_text(config_text, encoding="utf-8")
        if type(model).__name__ in ARCHITECTURES:  # else a model only its registered builder can build
            network = NetworkDef(architecture=type(model).__name__, config=json.loads(config_text), expansion=expansion)
            (partial / BUNDLE_FILE).write_text(bundle_file_text(network), encoding="utf-8")
        (partial / CARD_JSON).write_text(card.model_dump_json(indent=2) + "\n", encoding="utf-8")
        (partial / CARD_MD).write_text(card.to_markdown(), encoding="utf-8")
        if extra is not None:
            extra(partial)
        for written in partial.iterdir():  # safetensors writes owner-only files; shipped weights are for everyone
            os.chmod(written, 0o644)
        replace_folder(partial, target)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    return target



def load_card(name: str) -> ModelCard:
    """The model card shipped with ``name``'s weights; FileNotFoundError when none are shipped yet."""
    folder = model_entry(name).weights_dir
    if not (folder / CARD_JSON).is_file():
        raise FileNotFoundError(f"no weights are shipped for {name!r} yet ({folder / CARD_JSON} does not exist)")
    return read_card(folder)


def model_input_spec(name: str) -> dict[str, Any]:
    """How inputs must be prepared for ``name``: the shipped card's ``input_spec`` (what the weights were trained
    with) when weights are shipped, else the registration's."""
    try:
        return dict(load_card(name).input_spec)
    except FileNotFoundError:
        return dict(model_entry(name).input_spec)


def model_version(name: str) -> str:
    """The semantic version of ``name``'s shipped weights."""
    return load_card(name).version
