"""RECIST-Net on DeepLesion: the training task, its config, and the detector evaluation it shares with
``ctzoo eval``."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
import torch.distributed as dist
from pydantic import Field, field_validator
from torch import nn
from torch.utils.data import ConcatDataset

from ctzoo.config import StrictConfig
from ctzoo.datasets.batch_augment import augment_batch, recist_batch_train_transforms
from ctzoo.datasets.deeplesion.dataset import (
    LESION_KEYS,
    DeepLesionConfig,
    collate_lesions,
    deeplesion_dataloader,
    deeplesion_dataset,
)
from ctzoo.datasets.deeplesion.recist import (
    DEEPLESION_BOX_PAD,
    box_from_points,
    diameters,
)
from ctzoo.datasets.keypoint_transforms import (
    OFF_IMAGE_SUFFIX,
    recist_eval_transforms,
    recist_train_transforms,
)
from ctzoo.models.recistnet import LEVEL_STRIDES, RecistNet, pool_box_features
from ctzoo.models.recistnet_targets import loss_counts, make_targets, recistnet_loss
from ctzoo.scaling.compress import CompressionConfig
from ctzoo.scaling.zoo_expand import ExpansionInit, expanded_model
from ctzoo.training.engine import OptimConfig
from ctzoo.training.epoch_loader import EpochLoader, KeptLoader
from ctzoo.training.froc import FrocResult, froc
from ctzoo.training.hard_negatives import HardNegativeConfig, HardNegativeMiner, focus_size
from ctzoo.training.resume_check import DATA_FILES

log = logging.getLogger(__name__)

#: Per-lesion keys the augmentation and the evaluation crop filter together with the keypoints (the boxes and
#: diameters_px they recompute).
_CARRIED_LESION_KEYS = tuple(k for k in LESION_KEYS if k not in ("keypoints", "boxes", "diameters_px"))


#: Why training never scores the test split (``eval_split``), and what does.
TEST_SELECTION = ("test: training picks best.pt (and thresholds are later chosen) on the validation split only; "
                  "a model chosen on test has no unbiased test score. Train with eval_split: val, then score the "
                  "test split with ctzoo eval CONFIG --checkpoint RUN/best.pt --split test")


class RecistNetModelConfig(StrictConfig):
    backbone: Literal["light", "resnet34_fpn"] = "light"
    width: int = Field(32, ge=8)
    head_channels: int = Field(64, ge=8)


class AugmentConfig(StrictConfig):
    flip_prob: float = Field(0.5, ge=0, le=1)
    rotate_range_deg: float = Field(15.0, ge=0, le=90)
    scale_range: tuple[float, float] = (0.8, 1.2)
    intensity: bool = True
    resample_on: Literal["loader", "device"] = Field(
        "loader", description="where the flips, rotations, zooms and crops are resampled: per sample by MONAI "
                              "transforms in the loader's workers (after the spacing resample and windowing), or "
                              "per batch on the training device together with the spacing resample, then windowed "
                              "(the workers only read the HU under a window and draw: ctzoo/datasets/"
                              "batch_augment.py)")


class RecistNetTrainConfig(StrictConfig):
    """``configs/recistnet_*.yaml``: data, model, optimisation, and input sizes."""

    task: Literal["recistnet"] = "recistnet"
    data: DeepLesionConfig
    model: RecistNetModelConfig = RecistNetModelConfig()
    optim: OptimConfig = OptimConfig()
    augment: AugmentConfig = AugmentConfig()
    train_size: tuple[int, int] = Field((256, 256), description="random crop (H, W) for training; multiples of 32")
    eval_size: tuple[int, int] = Field((512, 512), description="pad/crop (H, W) for evaluation; multiples of 32")
    eval_split: Literal["val"] = Field("val", description="the split that picks best.pt and fills the val_* "
                                                          "columns: validation only (ctzoo eval scores test)")
    max_lesions: int = Field(20, ge=1, description="detections kept per image")
    min_score: float = Field(0.01, ge=0, le=1, description="weakest detection kept for FROC: the curve ranks by "
                                                            "score, so weak detections only extend its tail")
    cache: bool = Field(True, description="cache decoded slices in memory (CacheDataset): resampled and windowed, "
                                          "or their HU planes with augment.resample_on: device")
    repeats: int = Field(1, ge=1, description="passes over the training set per epoch (small sets: fewer, "
                                              "longer epochs, so loader start-up and validation cost less)")
    hard_negatives: HardNegativeConfig | None = Field(
        None, description="mine the lesion-free training slices the model fires on most, and train on them")
    init_from_expansion: ExpansionInit | None = Field(None, description="start from a model grown by ctzoo expand "
                                                                        "(LEMON); model: is then ignored")
    distributed: CompressionConfig = Field(default_factory=CompressionConfig,
                                           description="gradient exchange under torchrun (CSER, two-way, PowerSGD)")
    placement: Path | None = Field(None, description="plan.json of ctzoo place: train the model spread over this "
                                                     "machine's devices as the plan places it (not with torchrun)")

    @field_validator("train_size", "eval_size")
    @classmethod
    def _network_multiple(cls, size: tuple[int, int]) -> tuple[int, int]:
        # the network halves its input down to 1/32: another size fails at the first step, deep in the FPN
        multiple = LEVEL_STRIDES[-1]
        if min(size) < 1 or any(side % multiple for side in size):
            rounded = [max(multiple, round(side / multiple) * multiple) for side in size]
            raise ValueError(f"{list(size)}: height and width must be positive multiples of {multiple} (the "
                             f"network's coarsest stride), e.g. {rounded}")
        return size

    @field_validator("eval_split", mode="before")
    @classmethod
    def _validation_only(cls, split: Any) -> Any:
        if split == "test":  # Literal's own message would not say why, nor what to do instead
            raise ValueError(TEST_SELECTION)
        return split


def build_recistnet(cfg: RecistNetTrainConfig) -> nn.Module:
    """The network ``cfg`` trains: a fresh RecistNet, or the expanded one of ``init_from_expansion``."""
    if cfg.init_from_expansion is not None:
        return expanded_model(cfg.init_from_expansion, RecistNet)
    return RecistNet(in_channels=cfg.data.in_channels, **cfg.model.model_dump())


def example_images(cfg: RecistNetTrainConfig, batch_size: int, training: bool = True) -> tuple[torch.Tensor]:
    """A random batch shaped as ``cfg`` feeds the network: ``(B, in_channels, *train_size)`` (``eval_size``
    for inference), for tracing and profiling."""
    size = cfg.train_size if training else cfg.eval_size
    return (torch.randn(batch_size, cfg.data.in_channels, *size),)


def eval_transforms(eval_size: tuple[int, int]):
    """The evaluation's centred pad/crop to ``eval_size`` (training's validation and ``ctzoo eval``). Every
    per-lesion key is cut with the keypoints, so each box keeps its own ``diameters_mm``; a lesion whose centre the
    crop cuts off is counted (``keypoints_off_image``) and :func:`evaluate_decodings` scores it as missed."""
    return recist_eval_transforms(eval_size, lesion_keys=_CARRIED_LESION_KEYS)


def predicted_boxes(points: torch.Tensor, scale: float) -> np.ndarray:
    """Boxes as DeepLesion draws them: the end points' box padded by 5 original pixels (``scale`` px now)."""
    return box_from_points(points.detach().cpu().numpy().astype(np.float64), DEEPLESION_BOX_PAD * scale)


def evaluate_detector(model: RecistNet, loader, device: torch.device, max_lesions: int = 20, min_score: float = 0.01,
                      decode: str = "both") -> tuple[FrocResult, list[dict[str, Any]], list[dict[str, np.ndarray]]]:
    """Run ``model`` over ``loader``, group with ``decode`` and score it with DeepLesion's FROC protocol.

    Returns the FROC result, per image its detections (points, scores, padded boxes, diameters in mm) and
    per image its truth (boxes, diameters in mm, and ``off_image``: the lesions a crop cut off the image, which
    count as missed).
    """
    return evaluate_decodings(model, loader, device, (decode,), max_lesions, min_score)[decode]


def evaluate_decodings(model: RecistNet, loader, device: torch.device, decodes: tuple[str, ...] = ("both",),
                       max_lesions: int = 20, min_score: float = 0.01, pool_features: bool = False):
    """:func:`evaluate_detector` for several decoding modes from one forward pass per batch:
    ``{mode: (FrocResult, detections, truth)}``. With ``pool_features`` each truth entry also holds
    ``features`` (N, F): every annotated lesion's pooled decoder features (:func:`pool_box_features`), and the
    batch's per-lesion ``lesion_index`` when it has one."""
    detections: dict[str, list[dict[str, Any]]] = {mode: [] for mode in decodes}
    truth = []
    model.eval()
    with torch.no_grad():
        for batch in loader:
            image = batch["image"].to(device)
            features = model.feature_map(image) if pool_features else None
            outputs = model.heads(features) if pool_features else model(image)
            for mode in decodes:
                found = model.group(outputs, max_lesions=max_lesions, score_threshold=min_score, decode=mode)
                detections[mode] += [_image_detections(batch, k, result) for k, result in enumerate(found)]
            for k, (boxes, mm) in enumerate(zip(batch["boxes"], batch["diameters_mm"])):
                entry = _image_truth(batch, k, boxes, mm)
                if pool_features:
                    entry["features"] = pool_box_features(features[k].float(), boxes.reshape(-1, 4),
                                                          model.down_ratio).cpu().numpy()
                    if "lesion_index" in batch:
                        entry["lesion_index"] = batch["lesion_index"][k].numpy().reshape(-1)
                truth.append(entry)
    return {mode: (froc(found, truth), found, truth) for mode, found in detections.items()}


def _image_truth(batch: dict[str, Any], k: int, boxes: torch.Tensor, mm: torch.Tensor) -> dict[str, Any]:
    """Image ``k``'s truth: boxes, diameters in mm row by row, and the lesions cut off it (scored as missed)."""
    boxes, mm = boxes.numpy().reshape(-1, 4), mm.numpy().reshape(-1, 2)
    if len(boxes) != len(mm):  # a transform cut one per-lesion key and not the other
        raise ValueError(f"{batch['file_name'][k]}: {len(boxes)} boxes but {len(mm)} diameters_mm rows; cut every "
                         "per-lesion key with the keypoints (eval_transforms)")
    off_image = batch.get("keypoints" + OFF_IMAGE_SUFFIX)
    return {"boxes": boxes, "diameters_mm": mm, "off_image": 0 if off_image is None else int(off_image[k])}


def _image_detections(batch: dict[str, Any], k: int, result: dict[str, torch.Tensor]) -> dict[str, Any]:
    points = result["points"].cpu().numpy().astype(np.float64)
    return {"file_name": batch["file_name"][k], "points": points, "scores": result["scores"].cpu().numpy(),
            "boxes": predicted_boxes(result["points"], float(batch["scale"][k])),
            "diameters_mm": diameters(points, batch["spacing_mm"][k].numpy())[1].reshape(-1, 2)}


def data_parallel_loss(outputs: dict[str, torch.Tensor], targets: dict[str, torch.Tensor]):
    """:func:`recistnet_loss` of this process's share of a step, such that DDP's average of the processes'
    gradients is the gradient one process takes on the whole step's batch: each term is normalised by its count
    (positives, points) summed over the processes (mmdet's ``reduce_mean(avg_factor)``), not by this share's
    own, and the share is scaled by the number of processes (DDP averages). The mean over the processes of the
    returned loss and parts is the whole batch's. One process: :func:`recistnet_loss` itself."""
    counts = loss_counts(targets)
    world = dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1
    if world == 1:
        return recistnet_loss(outputs, targets, counts=counts)
    dist.all_reduce(counts)
    total, parts = recistnet_loss(outputs, targets, counts=counts)
    return total * world, {key: value * world for key, value in parts.items()}


class RecistNetTask:
    """The :class:`ctzoo.training.engine.Task` for RECIST-Net."""

    name = "recistnet"
    primary_metric = "sensitivity_4fp"

    def __init__(self, cfg: RecistNetTrainConfig) -> None:
        self.cfg = cfg
        augment = cfg.augment
        on_device = augment.resample_on == "device"
        shared = dict(spatial_size=cfg.train_size, flip_prob=augment.flip_prob,
                      rotate_range_deg=augment.rotate_range_deg, scale_range=augment.scale_range,
                      intensity=augment.intensity, lesion_keys=_CARRIED_LESION_KEYS)
        if on_device:  # the loader reads HU planes (only the window's part) and draws; the device does the rest
            focus = None if cfg.hard_negatives is None else focus_size(cfg.hard_negatives, cfg.train_size)
            self.train_transform = recist_batch_train_transforms(**shared, preprocessing=cfg.data, focus_size=focus)
        else:
            self.train_transform = recist_train_transforms(**shared)
        # RandWindowd writes nothing into the cached sample (it cuts a new window), so the cache need not copy the
        # slice's planes for every draw
        self.train_set = deeplesion_dataset(cfg.data, "train", cache=cfg.cache, transform=self.train_transform,
                                            copy_cache=not on_device, resample=not on_device)
        if cfg.repeats > 1:  # each pass draws its own augmentation; the cache is shared
            self.train_set = ConcatDataset([self.train_set] * cfg.repeats)
        self.miner = None if cfg.hard_negatives is None else HardNegativeMiner(
            cfg.hard_negatives, cfg.data, self.train_transform, cfg.train_size, augment.resample_on)
        if min(cfg.eval_size) < cfg.data.max_size:
            log.warning("eval_size %s is smaller than a resampled slice may be (max_size %d): lesions the validation "
                        "crop cuts off count as missed", list(cfg.eval_size), cfg.data.max_size)
        self.eval_set = deeplesion_dataset(cfg.data, cfg.eval_split, cache=cfg.cache,
                                           transform=eval_transforms(cfg.eval_size))
        self.loader = KeptLoader()

    def build_model(self) -> nn.Module:
        return build_recistnet(self.cfg)

    def example_inputs(self, batch_size: int) -> tuple[torch.Tensor]:
        return example_images(self.cfg, batch_size)

    def before_epoch(self, model: nn.Module, device: torch.device, epoch: int) -> None:
        """Mine hard negatives when they are due (``hard_negatives``)."""
        if self.miner is not None and self.miner.due(epoch):
            self.miner.mine(model, device, epoch)

    def checkpoint_state(self) -> dict[str, Any]:
        """What a checkpoint keeps of the task beyond the model: the mined hard negatives (a resumed run trains on
        the same items)."""
        return {} if self.miner is None else {"hard_negatives": self.miner.state()}

    def restore_checkpoint_state(self, state: dict[str, Any]) -> None:
        """Continue from :meth:`checkpoint_state` (``--resume``)."""
        if self.miner is not None and "hard_negatives" in state:
            self.miner.restore(state["hard_negatives"])

    def train_batches(self, epoch_seed: int, batch_size: int, num_workers: int, rank: int, world_size: int):
        """This epoch's batches, from one loader kept for the run (its workers start once); a new one only when
        hard-negative mining has changed the items. Under DDP this rank's share: DistributedSampler pads the
        epoch to equal shares (repeating fewer than ``world_size`` items) and nothing is dropped, so every rank
        takes as many steps, its last batch short as one process's is."""
        mined = None if self.miner is None else self.miner.mined
        return self.loader.epoch(
            epoch_seed, (mined, batch_size, num_workers, rank, world_size),  # datasets compare by identity
            lambda: EpochLoader(self.train_set if mined is None else ConcatDataset([self.train_set, mined]),
                                batch_size, num_workers, rank=rank, world_size=world_size,
                                collate_fn=collate_lesions))

    def close(self) -> None:
        """Stop the training loader's workers (``fit`` calls this when it is done)."""
        self.loader.close()

    def loss(self, model: nn.Module, batch: dict[str, Any], device: torch.device):
        if self.cfg.augment.resample_on == "device":  # the batch holds windows and their draws (RandWindowd)
            images = augment_batch(batch, self.cfg.train_size, device, self.cfg.data)
        else:
            images = batch["image"].to(device)
        targets = make_targets(batch["keypoints"], batch["boxes"], tuple(images.shape[-2:]))
        targets = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in targets.items()}
        return data_parallel_loss(model(images), targets)

    def evaluate(self, model: nn.Module, device: torch.device) -> dict[str, float]:
        loader = deeplesion_dataloader(self.eval_set, batch_size=4, shuffle=False, num_workers=0)
        result, _, _ = evaluate_detector(model, loader, device, self.cfg.max_lesions, self.cfg.min_score)
        sens = dict(zip(result.fps_per_image, result.sensitivities))
        return {"sensitivity_4fp": sens[4], "sensitivity_1fp": sens[1],
                "froc_mean_0p5_4": result.mean_sensitivity_0p5_to_4}


def data_record(data: DeepLesionConfig) -> dict[str, dict[str, str]]:
    """What a checkpoint records of the dataset it trained on: a digest (SHA-256) of its annotation file
    (DL_info.csv: every lesion and the split of every patient), so that a resumed run may read the same data from
    another ``data.root`` but not other data (:mod:`ctzoo.training.resume_check`). Empty when the file is unreadable
    (the task then says why)."""
    try:
        digest = hashlib.sha256((data.root / data.info_csv).read_bytes()).hexdigest()[:16]
    except OSError:
        return {}
    return {DATA_FILES: {data.info_csv: digest}}


def load_train_config(path: str | Path, data_root: str | Path | None = None) -> RecistNetTrainConfig:
    """Read a RECIST-Net training config; ``data_root`` replaces ``data.root`` (handy for tests and clusters)."""
    from ctzoo.config import load_config

    cfg = load_config(path, RecistNetTrainConfig)
    if data_root is not None:
        cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update={"root": Path(data_root)})})
    return cfg
