"""2-D training data for the template segmenter: preprocessed slices, template choice, augmentation.

Each training item pairs a target slice with a *template*: another labelled training slice (image + one binary
mask per class), as the segmenter sees at inference, where the template is the nearest stored training slice.

* Templates come from the training cases only, from :func:`template_candidates` (slices holding every class).
  During training the template of each item is drawn at random among the candidates other than the target
  itself (:class:`RandTemplated`), so the network learns to use a template that is similar but not identical.
* Augmentation (MONAI dictionary transforms, target slice only; the template stays a stored slice, as at
  inference): rotation +-10 deg and scale +-10 % (:class:`~monai.transforms.RandAffined`; image bilinear, labels
  nearest), intensity scale and shift, Gaussian noise. Never left-right flips: liver and spleen differ by side.
* Slices without foreground are kept at ``empty_fraction`` (evenly spaced), so they do not dominate a scan's ends.
* Class permutation (``permute_classes``, off by default; :class:`RandPermuteClassesd`): the template's class masks
  are shuffled and the target relabelled to match, so that output class ``k`` is whatever organ the template's mask
  ``k`` shows. Without it every item has the classes in the same order and the network can segment from the image
  alone, ignoring its template (the shipped model does: docs/template-segmenter.md, "Does the template matter?").
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from monai.data import Dataset
from monai.networks.utils import one_hot
from monai.transforms import (
    Compose,
    DeleteItemsd,
    EnsureTyped,
    MapTransform,
    RandAffined,
    RandGaussianNoised,
    Randomizable,
    RandScaleIntensityd,
    RandShiftIntensityd,
)
from pydantic import Field

from ctzoo.config import StrictConfig
from ctzoo.datasets.seg_preprocessing import SegPreprocessing, SliceGeometry, labels_to_slices, volume_to_slices
from ctzoo.datasets.segmentation import SegCase


class SegAugmentConfig(StrictConfig):
    """Training augmentation; intensities in HU (converted to the window's [0, 1] units)."""

    affine_prob: float = Field(0.8, ge=0, le=1)
    rotate_deg: float = Field(10.0, ge=0)
    scale: float = Field(0.1, ge=0, lt=1, description="isotropic zoom drawn from 1 +- scale")
    # Strong intensity changes: enhancement differs between scans (the sample CTs: liver 46 HU non-contrast,
    # 93 HU portal venous), and a network trained on one phase must not rely on absolute HU.
    intensity_prob: float = Field(0.8, ge=0, le=1)
    shift_hu: float = Field(100.0, ge=0, description="intensity shift drawn from +-shift_hu")
    scale_intensity: float = Field(0.2, ge=0, description="contrast factor drawn from 1 +- scale_intensity")
    noise_prob: float = Field(0.3, ge=0, le=1)
    noise_sd_hu: float = Field(20.0, ge=0)
    empty_fraction: float = Field(0.25, ge=0, le=1, description="share of slices without foreground kept")
    permute_classes: float = Field(0.0, ge=0, le=1, description="share of items whose template class masks are "
                                                                "shuffled and target relabelled to match "
                                                                "(RandPermuteClassesd): makes the network read "
                                                                "which class is which from its template")


@dataclass
class SliceCase:
    """A case as network slices: ``images`` (Z, 1, H, W) float32, ``labels`` (Z, H, W) int64, and its geometry."""

    name: str
    images: torch.Tensor
    labels: torch.Tensor
    geometry: SliceGeometry


def case_to_slices(case: SegCase, prep: SegPreprocessing) -> SliceCase:
    """Preprocess one case (see :mod:`ctzoo.datasets.segmentation`)."""
    images, geometry = volume_to_slices(case.image, prep)
    return SliceCase(case.name, images, labels_to_slices(case.labels, case.image, geometry), geometry)


def template_candidates(slices_labels: torch.Tensor | np.ndarray, num_classes: int | None = None) -> np.ndarray:
    """Indices of slices fit to serve as templates: those where all ``num_classes`` classes are present.

    ``slices_labels``: (N, H, W) ints, 0 = background. If no slice holds every class, falls back to the slices
    holding the most classes (so a template always shows as much anatomy as the data offers). ``num_classes``
    defaults to the largest label present.
    """
    labels = torch.as_tensor(np.asarray(slices_labels) if not isinstance(slices_labels, torch.Tensor)
                             else slices_labels).reshape(len(slices_labels), -1)
    num_classes = int(labels.max()) if num_classes is None else num_classes
    if len(labels) == 0 or num_classes == 0:
        return np.arange(len(labels))
    present = torch.stack([(labels == c).any(dim=1) for c in range(1, num_classes + 1)], dim=1).sum(dim=1)
    return np.flatnonzero((present == present.max()).numpy())


def template_tensor(image: torch.Tensor, labels: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Image (1, H, W) and labels (H, W) -> template (1 + C, H, W): the image, then one binary mask per class."""
    masks = one_hot(labels[None, None].long(), num_classes + 1, dim=1)[0, 1:]
    return torch.cat([image.float(), masks.float()], dim=0)


def template_set(cases: Sequence[SliceCase], num_classes: int, max_templates: int | None = None
                 ) -> tuple[torch.Tensor, torch.Tensor, list[str]]:
    """The candidate slices of ``cases`` as templates: images ``(T, 1, H, W)``, binary masks ``(T, C, H, W)`` and
    their sources (``"case slice k"``), evenly thinned to ``max_templates``.

    What inference retrieves from (:class:`ctzoo.models.template_bank.TemplateBank`): pass training cases only.
    """
    images = torch.cat([c.images for c in cases])
    labels = torch.cat([c.labels for c in cases])
    sources = [f"{c.name} slice {k}" for c in cases for k in range(len(c.labels))]
    chosen = template_candidates(labels, num_classes)
    if max_templates is not None and len(chosen) > max_templates:
        chosen = chosen[np.linspace(0, len(chosen) - 1, max_templates).round().astype(int)]
    masks = torch.stack([template_tensor(images[i], labels[i], num_classes)[1:] for i in chosen])
    return images[chosen], masks, [sources[i] for i in chosen]


class RandTemplated(Randomizable, MapTransform):
    """Add ``"template"`` (1 + C, H, W) to an item holding ``"index"`` (its slice in ``labels``): a random candidate
    slice other than the item's own (if it is the only candidate, any other slice holding the most classes)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, num_classes: int,
                 candidates: Sequence[int] | None = None, index_key: str = "index") -> None:
        MapTransform.__init__(self, [index_key])
        if len(images) < 2:
            raise ValueError("template pairing needs at least two training slices")
        self.images, self.labels, self.num_classes = images, labels, num_classes
        self.candidates = np.asarray(template_candidates(labels, num_classes) if candidates is None else candidates)
        self.index_key = index_key

    def pick(self, index: int) -> int:
        choices = self.candidates[self.candidates != index]
        if len(choices) == 0:
            counts = [len(torch.unique(self.labels[i])) if i != index else -1 for i in range(len(self.labels))]
            choices = np.flatnonzero(np.asarray(counts) == max(counts))
        return int(choices[self.R.randint(len(choices))])

    def randomize(self, data=None) -> None:  # the draw happens in pick(), per item
        pass

    def __call__(self, data):
        item = dict(data)
        j = self.pick(int(item[self.index_key]))
        item["template"] = template_tensor(self.images[j], self.labels[j], self.num_classes)
        return item


class RandPermuteClassesd(Randomizable, MapTransform):
    """With probability ``prob``, shuffle the class masks of ``"template"`` (1 + C, H, W) and relabel ``"label"``
    to match: after it, label ``k`` marks the organ that template mask ``k`` shows. A network trained with it
    cannot tie an output class to an organ; it must read the assignment from the template."""

    def __init__(self, num_classes: int, prob: float, template_key: str = "template",
                 label_key: str = "label") -> None:
        MapTransform.__init__(self, [template_key, label_key])
        self.num_classes, self.prob = num_classes, prob
        self.template_key, self.label_key = template_key, label_key
        self._order: np.ndarray | None = None

    def randomize(self, data=None) -> None:
        shuffle = self.num_classes > 1 and self.R.random_sample() < self.prob
        self._order = self.R.permutation(self.num_classes) if shuffle else None

    def __call__(self, data):
        self.randomize()
        if self._order is None:
            return data
        item = dict(data)
        order = torch.as_tensor(self._order, dtype=torch.long)  # mask k shows what was mask order[k]
        template = item[self.template_key]
        item[self.template_key] = torch.cat([template[:1], template[1:][order]])
        relabel = torch.zeros(self.num_classes + 1, dtype=torch.long)
        relabel[order + 1] = torch.arange(1, self.num_classes + 1)  # old class order[k] + 1 -> new class k + 1
        label = torch.as_tensor(item[self.label_key])
        item[self.label_key] = relabel[label.long()].to(label.dtype)
        return item


def seg_train_transforms(augment: SegAugmentConfig, prep: SegPreprocessing) -> list:
    """MONAI dictionary transforms for ``{"image": (1, H, W), "label": (1, H, W)}`` (see the module docstring)."""
    width = prep.window_hu[1] - prep.window_hu[0]  # HU per unit of the [0, 1] window
    return [
        RandAffined(["image", "label"], prob=augment.affine_prob, rotate_range=math.radians(augment.rotate_deg),
                    scale_range=(augment.scale, augment.scale), mode=("bilinear", "nearest"),
                    padding_mode="zeros"),  # 0 = below the window = air
        RandScaleIntensityd("image", factors=augment.scale_intensity, prob=augment.intensity_prob),
        RandShiftIntensityd("image", offsets=augment.shift_hu / width, prob=augment.intensity_prob),
        RandGaussianNoised("image", std=augment.noise_sd_hu / width, prob=augment.noise_prob),
    ]


def kept_slices(labels: torch.Tensor, empty_fraction: float) -> np.ndarray:
    """Indices of (N, H, W) labels to train on: every slice with foreground, ``empty_fraction`` of the others
    (evenly spaced, deterministic)."""
    has_foreground = (labels.reshape(len(labels), -1) > 0).any(dim=1).numpy()
    empty = np.flatnonzero(~has_foreground)
    keep = round(len(empty) * empty_fraction)
    thinned = empty[np.linspace(0, len(empty) - 1, keep).round().astype(int)] if keep else empty[:0]
    return np.sort(np.concatenate([np.flatnonzero(has_foreground), thinned]))


def template_slice_dataset(cases: Sequence[SliceCase], num_classes: int, prep: SegPreprocessing,
                           augment: SegAugmentConfig | None = None, repeats: int = 1) -> Dataset:
    """MONAI ``Dataset`` of training slices ``{"image": (1, H, W) float32, "label": (1, H, W) int64,
    "template": (1 + C, H, W) float32}``, each target with a random template from ``cases``; ``augment=None``
    turns augmentation off. ``repeats`` passes over the slices per epoch (each draws its own template and
    augmentation)."""
    images = torch.cat([c.images for c in cases])
    labels = torch.cat([c.labels for c in cases])
    items = [{"image": images[i], "label": labels[i][None], "index": int(i)}
             for i in kept_slices(labels, augment.empty_fraction if augment else 1.0)]
    transforms = [RandTemplated(images, labels, num_classes)]
    if augment and augment.permute_classes > 0:  # only then: the default draws the same numbers as before it existed
        transforms.append(RandPermuteClassesd(num_classes, augment.permute_classes))
    transforms += seg_train_transforms(augment, prep) if augment else []
    transforms += [DeleteItemsd("index"), EnsureTyped(["image", "template"], dtype=torch.float32, track_meta=False),
                   EnsureTyped("label", dtype=torch.int64, track_meta=False)]
    return Dataset(items * repeats, Compose(transforms))
