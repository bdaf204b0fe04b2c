"""Hard-negative mining for RECIST-Net: train on the lesion-free slices where the model is most confidently wrong.

Random lesion-free slices (``data.negatives_per_series``) teach little once the model has learnt that most of a
slice is background: what it still gets wrong on real CT are vessels, bowel loops and muscle seen end-on, which look
like small round lesions. Every ``every`` epochs (from ``start_epoch``) the :class:`HardNegativeMiner` scores a
pool of lesion-free context slices of the *training* patients — real CT, far from every annotated lesion along
z — and the ``keep`` slices with the highest detection score join the next epochs' training items, each cropped
around its strongest false detection so that the random training crop keeps it (as in ULDor's hard negative
example mining for DeepLesion, Tang et al., ISBI 2019).

DeepLesion's own lesion-free slices may hold lesions nobody marked (its authors say so); on the miniature they hold
none, by construction. Validation and test patients are never mined.

The mined set is part of a run's state: :meth:`HardNegativeMiner.state` (pool positions, focus points and the
epoch that mined them) goes into every checkpoint and :meth:`HardNegativeMiner.restore` brings it back, so a resumed
run trains on the items the interrupted one had mined and replays its epochs bit for bit.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from monai.data import Dataset
from monai.transforms import Compose, SpatialCrop, Transform
from pydantic import Field
from tqdm import tqdm

from ctzoo.config import StrictConfig
from ctzoo.datasets.batch_augment import focus_box
from ctzoo.datasets.deeplesion.dataset import DeepLesionConfig, LoadDeepLesiond, key_slice_items
from ctzoo.datasets.deeplesion.info_csv import read_dl_info

log = logging.getLogger(__name__)


class HardNegativeConfig(StrictConfig):
    """``hard_negatives:`` of a RECIST-Net config."""

    pool_per_series: int = Field(2, ge=1, description="lesion-free context slices per training series scored")
    keep: int = Field(48, ge=1, description="highest-scoring pool slices trained on until the next mining")
    every: int = Field(5, ge=1, description="mine again every this many epochs")
    start_epoch: int = Field(2, ge=0, description="first epoch (0-based) that mines: an untrained model's "
                                                  "errors say nothing")
    margin: int = Field(64, ge=0, description="pixels kept around the training crop's size in the focus crop")


class CropToFocusd(Transform):
    """Crop ``image`` (C, H, W) to ``size`` around ``item["focus"]`` ((row, col) pixels), clamped to the image;
    ``focus`` is dropped, so mined items collate with the others.

    MONAI's ``SpatialCrop`` does the cropping, so the image's affine follows as for any MONAI crop.
    """

    def __init__(self, size: tuple[int, int]) -> None:
        self.size = np.asarray(size)

    def __call__(self, item: dict[str, Any]) -> dict[str, Any]:
        image = item["image"]
        start, size = focus_box(item["focus"], self.size, image.shape[-2:])
        cropped = {key: value for key, value in item.items() if key != "focus"}  # batches share their keys
        return {**cropped, "image": SpatialCrop(roi_start=start.tolist(), roi_end=(start + size).tolist())(image)}


def focus_size(cfg: HardNegativeConfig, train_size: tuple[int, int]) -> tuple[int, int]:
    """(H, W) of the box around a mined slice's false detection that its training crops stay in."""
    return tuple(s + cfg.margin for s in train_size)


def _padded(image: torch.Tensor, multiple: int = 32) -> torch.Tensor:
    """(C, H, W) -> (1, C, H', W'), zero-padded right and bottom to multiples of ``multiple`` (pixels keep their
    coordinates)."""
    height, width = image.shape[-2:]
    pad = (0, -width % multiple, 0, -height % multiple)
    return F.pad(torch.as_tensor(image)[None], pad)


class HardNegativeMiner:
    """Scores a fixed pool of lesion-free training slices and keeps the hardest, cropped around their strongest
    false detection (``mine``); ``due(epoch)`` says when."""

    def __init__(self, cfg: HardNegativeConfig, data: DeepLesionConfig, train_transform: Transform,
                 train_size: tuple[int, int], resample_on: str = "loader") -> None:
        self.cfg = cfg
        rows = read_dl_info(data.root / data.info_csv)
        self.items = [item for item in key_slice_items(rows, "train", data.drop_noisy, cfg.pool_per_series)
                      if not item["lesions"]]
        self.load = LoadDeepLesiond(data)
        self.pool = Dataset(self.items, self.load)  # not cached: the pool is read once per mining
        self.crop = focus_size(cfg, train_size)
        # the mined items' training pipeline: ``augment: {resample_on: device}``'s RandWindowd reads the HU planes
        # itself, and keeps its crop around the item's focus
        self.train_pipeline = Compose([self.load, CropToFocusd(self.crop), train_transform] if resample_on == "loader"
                                      else [LoadDeepLesiond(data, resample=False, lazy=True), train_transform])
        self.mined: Dataset | None = None
        self.mined_at: int | None = None  # the epoch that mined ``mined``
        self.chosen: list[tuple[int, np.ndarray]] = []  # ``mined``'s items: (pool position, focus (row, col))
        self.history: list[dict[str, float]] = []

    def due(self, epoch: int) -> bool:
        """Mine at ``start_epoch`` and every ``every`` epochs after it; and on the first epoch of a run resumed past
        ``start_epoch`` from a checkpoint without a mined set (written before ctzoo kept it: mining again then is
        the best it can do)."""
        if not self.items or epoch < self.cfg.start_epoch:
            return False
        return self.mined is None or (epoch - self.cfg.start_epoch) % self.cfg.every == 0

    @torch.no_grad()
    def scores(self, model: torch.nn.Module, device: torch.device) -> list[tuple[float, np.ndarray]]:
        """Per pool slice: its strongest detection's score and centre (row, col), (0, slice centre) when none."""
        found = []
        for sample in tqdm(self.pool, desc="mining hard negatives", unit="slice", leave=False, disable=None):
            image = sample["image"]
            detections = model.detect(_padded(image).to(device), max_lesions=1, score_threshold=0.0)[0]
            if len(detections["scores"]):
                x, y = detections["points"][0, 4].cpu().numpy()
                found.append((float(detections["scores"][0]), np.array([y, x])))
            else:
                found.append((0.0, np.asarray(image.shape[-2:]) / 2))
        return found

    def mine(self, model: torch.nn.Module, device: torch.device, epoch: int | None = None) -> Dataset:
        """The ``keep`` highest-scoring pool slices as training items, each cropped around its false detection
        (mined at ``epoch``)."""
        scored = self.scores(model, device)  # detect() scores in eval mode and restores the model's mode
        order = np.argsort([-score for score, _ in scored], kind="stable")[: self.cfg.keep]
        kept = [scored[i][0] for i in order]
        self.history.append({"pool": len(scored), "kept": len(order), "min_kept_score": float(min(kept)),
                             "mean_kept_score": float(np.mean(kept)),
                             "pool_mean_score": float(np.mean([s for s, _ in scored]))})
        log.info("hard negatives: kept %d of %d lesion-free slices, scores %.3f-%.3f (pool mean %.3f)",
                 len(order), len(scored), min(kept), max(kept), self.history[-1]["pool_mean_score"])
        return self._use([(int(i), scored[i][1]) for i in order], epoch)

    def _use(self, chosen: list[tuple[int, np.ndarray]], epoch: int | None) -> Dataset:
        """Train on the pool items ``chosen`` ((position, focus) pairs), mined at ``epoch``."""
        self.chosen, self.mined_at = chosen, epoch
        # float64 focus points: a checkpoint keeps them as Python floats, exactly
        self.mined = Dataset([{**self.items[i], "focus": np.asarray(focus, dtype=np.float64)} for i, focus in chosen],
                             self.train_pipeline)
        return self.mined

    def state(self) -> dict[str, Any]:
        """The mined set as a checkpoint keeps it (plain numbers): ``{"pool": pool size, "epoch": the epoch that
        mined it, "items": [[pool position, focus row, focus col], ...], "history": ...}``; ``items`` is empty
        before the first mining."""
        return {"pool": len(self.items), "epoch": self.mined_at, "history": list(self.history),
                "items": [[i, *map(float, np.asarray(focus, dtype=np.float64))] for i, focus in self.chosen]}

    def restore(self, state: dict[str, Any]) -> None:
        """Train on the mined set of :meth:`state` again (a resumed run). ``ValueError`` when it does not fit this
        pool (the checkpoint's data or ``pool_per_series`` differ)."""
        if state["pool"] != len(self.items) or any(not 0 <= i < len(self.items) for i, *_ in state["items"]):
            raise ValueError(f"--resume: the checkpoint's hard negatives were mined from a pool of {state['pool']} "
                             f"slices, this run's has {len(self.items)}: not the same data")
        self.history = list(state["history"])
        if state["items"]:
            self._use([(int(i), np.array([row, col], dtype=np.float64)) for i, row, col in state["items"]],
                      state["epoch"])
