"""MONAI dictionary transforms that move RECIST keypoints together with a 2-D CT image.

A sample is a dict with

* ``"image"``: (C, H, W) float32 tensor or :class:`monai.data.MetaTensor` (C context slices, H rows, W
  columns), intensities normalised so that 0 is background: rotation, zoom and padding fill with 0;
* ``"keypoints"``: (N, 5, 2) tensor or array, the :mod:`~ctzoo.datasets.deeplesion.recist` points
  ``(x, y)`` = (column, row), 0-based, in the order long_a, long_b, short_a, short_b, centre; N may be 0;
* optionally ``"boxes"`` (N, 4) x1, y1, x2, y2 and ``"diameters_px"`` (N, 2), recomputed from the
  moved points, and any other per-lesion keys (first axis N) named in ``lesion_keys``.

How points move: the image transforms are plain MONAI transforms, which keep ``image.affine``
(pixel index -> world) up to date. :class:`KeypointsToWorldd` records the affine before them and
expresses the points in world coordinates; :class:`KeypointsVisibled`, after each spatial transform,
notes lesions whose centre left the image (their content is gone even if a later pad re-extends it);
:class:`KeypointsToImaged` maps the points back through the inverse of the new affine, restores the
canonical pair order and drops those lesions. All use :class:`monai.transforms.ApplyTransformToPoints`.
:func:`invert_keypoints` takes points predicted on the transformed image back to the original pixel frame the
same way.
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Mapping, Sequence
from typing import Any

import numpy as np
import torch
from monai.data import MetaTensor
from monai.transforms import (
    ApplyTransformToPoints,
    Compose,
    EnsureTyped,
    MapTransform,
    RandFlipd,
    RandGaussianNoised,
    Randomizable,
    RandRotated,
    RandScaleIntensityd,
    RandShiftIntensityd,
    RandZoomd,
    ResizeWithPadOrCropd,
    SpatialCrop,
    SpatialPadd,
    Transform,
)
from monai.utils import convert_to_dst_type, convert_to_tensor

from ctzoo.datasets.deeplesion.recist import (
    CENTRE,
    DEEPLESION_BOX_PAD,
    box_from_points,
    canonical_order,
    diameters,
)

__all__ = [
    "KeypointsToImaged",
    "KeypointsToWorldd",
    "KeypointsVisibled",
    "RandLesionCropd",
    "invert_keypoints",
    "keypoint_pipeline",
    "recist_eval_transforms",
    "recist_train_transforms",
]

WORLD_SUFFIX = "_world"  # (N, 5, 2) world coordinates while the image transforms run
SOURCE_AFFINE_SUFFIX = "_source_affine"  # (4, 4) float64 affine of the frame the keypoints came in
KEEP_SUFFIX = "_keep"  # (N,) bool: the lesion's centre has been on the image after every spatial transform
OFF_IMAGE_SUFFIX = "_off_image"  # int: lesions dropped because their centre left the image (evaluation: missed)

# The intensity augmentation of both training modes (here and ctzoo.datasets.batch_augment), for an image
# normalised to about [0, 1]: x (1 + U(-0.1, 0.1)), + U(-0.05, 0.05), + N(0, U(0, 0.01)), each with its probability.
SCALE_FACTOR, SHIFT_OFFSET, NOISE_STD = 0.1, 0.05, 0.01
INTENSITY_PROBS = {"scale": 0.5, "shift": 0.5, "noise": 0.2}


def xy_to_index(points: torch.Tensor) -> torch.Tensor:
    """Swap the last axis: ``(x, y)`` = (column, row) <-> MONAI's spatial index order (dim0, dim1) = (row, column).

    ctzoo points are (x, y), but MONAI's spatial dims of a (C, H, W) image are (H, W), so every affine of
    ``image.affine`` expects (row, column). The swap is its own inverse, so it serves both directions.
    """
    return points.flip(-1)


def _image_affine(image: Any) -> torch.Tensor:
    if not isinstance(image, MetaTensor):
        raise TypeError("the image must be a MetaTensor (put EnsureTyped(track_meta=True) first) to carry its affine")
    return image.affine.to(torch.float64)


def _map_points(points: torch.Tensor, affine: torch.Tensor, to_world: bool) -> torch.Tensor:
    """Apply ``affine`` (pixel index -> world) or its inverse to index-order points (..., 2)."""
    flat = convert_to_tensor(points, dtype=torch.float64, track_meta=False).reshape(1, -1, 2)
    # Plain tensors only: ApplyTransformToPoints folds a MetaTensor input's own affine (left there by an
    # earlier call) into the matrix, so chaining its outputs would apply the source affine twice.
    moved = ApplyTransformToPoints(dtype=torch.float64, invert_affine=not to_world)(flat, affine)
    moved = moved.as_tensor() if isinstance(moved, MetaTensor) else moved
    return moved.reshape(points.shape)


def _pixels_to_world(points_xy: Any, affine: torch.Tensor) -> torch.Tensor:
    return _map_points(xy_to_index(convert_to_tensor(points_xy, dtype=torch.float64, track_meta=False)), affine, True)


def _world_to_pixels(world: torch.Tensor, affine: torch.Tensor) -> torch.Tensor:
    return xy_to_index(_map_points(world, affine, False))


def _pixel_scale(source_affine: torch.Tensor, affine: torch.Tensor) -> float:
    """How many pixels of the current image one pixel of the source image spans (the zoom since then)."""
    source_area = abs(float(torch.linalg.det(source_affine[:2, :2])))
    area = abs(float(torch.linalg.det(affine[:2, :2])))
    return math.sqrt(source_area / area)


def points_inside(points_xy: np.ndarray, height: int, width: int) -> np.ndarray:
    """Whether each (x, y) lies on some pixel: pixel centres are integers, so the image spans [-0.5, size - 0.5)."""
    x, y = points_xy[..., 0], points_xy[..., 1]
    return (x >= -0.5) & (x < width - 0.5) & (y >= -0.5) & (y < height - 0.5)


def select_lesions(values: Any, keep: np.ndarray) -> Any:
    if isinstance(values, torch.Tensor):
        return values[torch.as_tensor(keep, device=values.device)]
    if isinstance(values, np.ndarray):
        return values[keep]
    return type(values)(v for v, k in zip(values, keep) if k)


class KeypointsToWorldd(MapTransform):
    """Put before the spatial transforms: record ``image.affine`` and express the keypoints in world coordinates.

    In: ``image`` MetaTensor (C, H, W), ``keypoints`` (N, 5, 2) pixel (x, y). Adds ``keypoints_world``
    (N, 5, 2) float64 world coordinates in MONAI's axis order, and ``keypoints_source_affine`` (4, 4)
    float64, which :func:`invert_keypoints` needs later. ``keypoints`` itself is left as it was.
    """

    def __init__(self, image_key: str = "image", keypoints_key: str = "keypoints") -> None:
        super().__init__([keypoints_key])
        self.image_key, self.keypoints_key = image_key, keypoints_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        affine = _image_affine(d[self.image_key])
        d[self.keypoints_key + SOURCE_AFFINE_SUFFIX] = affine
        world = _pixels_to_world(d[self.keypoints_key], affine)
        d[self.keypoints_key + WORLD_SUFFIX] = world
        d[self.keypoints_key + KEEP_SUFFIX] = np.ones(len(world), dtype=bool)
        return d


class KeypointsVisibled(MapTransform):
    """Put after each spatial transform: forget lesions whose centre is no longer on the image.

    Checking only at the end is not enough: a crop followed by a pad would bring back a centre whose
    content the crop already threw away (and a rotation's zero-filled corner likewise).
    """

    def __init__(self, image_key: str = "image", keypoints_key: str = "keypoints") -> None:
        super().__init__([keypoints_key])
        self.image_key, self.keypoints_key = image_key, keypoints_key

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        centres = _world_to_pixels(d[self.keypoints_key + WORLD_SUFFIX][:, CENTRE], _image_affine(image)).numpy()
        inside = points_inside(centres, *image.shape[-2:])
        d[self.keypoints_key + KEEP_SUFFIX] = d[self.keypoints_key + KEEP_SUFFIX] & inside
        return d


class KeypointsToImaged(MapTransform):
    """Put after the spatial transforms: world -> new pixel (x, y), canonical pair order, drop lesions off the image.

    In: what :class:`KeypointsToWorldd` left, and the transformed ``image`` MetaTensor (C, H', W').
    Out: ``keypoints`` (M, 5, 2), M <= N lesions whose centre is on the image, in the input's type and
    dtype; ``boxes`` (M, 4) (end points' box padded by ``box_pad`` original pixels: times the sample's ``scale``,
    if it has one, and the zoom) and
    ``diameters_px`` (M, 2) recomputed when present; other ``lesion_keys`` (first axis N) cut to the same M;
    ``keypoints_off_image`` the count N - M of lesions dropped (an evaluation scores them as missed).
    Every per-lesion key of the sample other than those must be named in ``lesion_keys``, or its rows no longer
    match the keypoints' once a lesion is dropped.
    """

    def __init__(
        self,
        image_key: str = "image",
        keypoints_key: str = "keypoints",
        lesion_keys: Sequence[str] = (),
        boxes_key: str = "boxes",
        diameters_key: str = "diameters_px",
        box_pad: float = DEEPLESION_BOX_PAD,
    ) -> None:
        super().__init__([keypoints_key])
        self.image_key, self.keypoints_key = image_key, keypoints_key
        self.lesion_keys = tuple(k for k in lesion_keys if k not in (keypoints_key, boxes_key, diameters_key))
        self.boxes_key, self.diameters_key, self.box_pad = boxes_key, diameters_key, box_pad

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = KeypointsVisibled(self.image_key, self.keypoints_key)(data)
        affine = _image_affine(d[self.image_key])
        world, keep = d.pop(self.keypoints_key + WORLD_SUFFIX), d.pop(self.keypoints_key + KEEP_SUFFIX)
        # A flip or rotation can swap which end is left, so the pair order is re-derived from the geometry.
        points = canonical_order(_world_to_pixels(world, affine).numpy())[keep]
        d[self.keypoints_key + OFF_IMAGE_SUFFIX] = int((~keep).sum())
        d[self.keypoints_key] = convert_to_dst_type(points, d[self.keypoints_key])[0]
        if self.boxes_key in d:
            # box_pad is in original DeepLesion pixels; the loader's "scale" says how many loaded pixels that is
            zoom = _pixel_scale(d[self.keypoints_key + SOURCE_AFFINE_SUFFIX], affine)
            pad = self.box_pad * float(d.get("scale", 1.0)) * zoom
            d[self.boxes_key] = convert_to_dst_type(box_from_points(points, pad), d[self.boxes_key])[0]
        if self.diameters_key in d:
            d[self.diameters_key] = convert_to_dst_type(diameters(points)[0], d[self.diameters_key])[0]
        for key in self.lesion_keys:
            if key in d:
                d[key] = select_lesions(d[key], keep)
        return d


class RandLesionCropd(MapTransform, Randomizable):
    """Random crop of ``roi_size`` that, with probability ``lesion_prob``, keeps a random lesion inside.

    Use among the spatial transforms of :func:`keypoint_pipeline` (it reads the world points it keeps).
    A lesion crop centres the ROI on a lesion's centre plus a uniform jitter of up to ``jitter`` of the
    ROI size, clamped so the ROI stays on the image; otherwise the ROI is uniform, like RandSpatialCropd.
    Why: small lesions in a uniform crop of a large slice are mostly cut away, starving the heatmaps.
    The crop itself is MONAI's ``SpatialCrop``, so ``image.affine`` is updated as by any MONAI crop.
    """

    def __init__(self, image_key: str, keypoints_key: str, roi_size: Sequence[int], lesion_prob: float = 0.7,
                 jitter: float = 0.35) -> None:
        MapTransform.__init__(self, [image_key])
        self.image_key, self.keypoints_key = image_key, keypoints_key
        self.roi_size, self.lesion_prob, self.jitter = tuple(int(v) for v in roi_size), lesion_prob, jitter

    def __call__(self, data: Mapping[Hashable, Any]) -> dict[Hashable, Any]:
        d = dict(data)
        image = d[self.image_key]
        shape = np.asarray(image.shape[-2:])
        roi = np.asarray(self.roi_size)
        keep = d[self.keypoints_key + KEEP_SUFFIX]
        lesion = self.R.rand() < self.lesion_prob and bool(np.any(keep))
        if lesion:
            centres = _world_to_pixels(d[self.keypoints_key + WORLD_SUFFIX][:, CENTRE], _image_affine(image))
            target = xy_to_index(centres[int(self.R.choice(np.flatnonzero(keep)))]).numpy()  # (row, col)
            target = target + self.R.uniform(-self.jitter, self.jitter, size=2) * roi
        else:
            target = self.R.uniform(0, 1, size=2) * np.maximum(shape - roi, 0) + roi / 2
        low = np.minimum(roi // 2, shape // 2)
        centre = np.clip(np.round(target), low, np.maximum(shape - (roi - roi // 2), low)).astype(int)
        d[self.image_key] = SpatialCrop(roi_center=centre.tolist(), roi_size=self.roi_size)(image)
        return d


def invert_keypoints(
    data: Mapping[Hashable, Any], keypoints: Any, image_key: str = "image", keypoints_key: str = "keypoints"
) -> Any:
    """Map points (..., 2) (x, y) on the transformed ``data[image_key]`` back to the original pixel frame.

    ``data`` is one transformed sample (not a batch). Goes pixel -> world with the current ``image.affine``,
    then world -> original pixel with the recorded source affine; (..., 4 or 5, 2) points get the canonical
    pair order back. Returns the type and dtype of ``keypoints``.
    """
    world = _pixels_to_world(keypoints, _image_affine(data[image_key]))
    points = _world_to_pixels(world, data[keypoints_key + SOURCE_AFFINE_SUFFIX]).numpy()
    if points.ndim >= 2 and points.shape[-2] in (4, 5):
        points = canonical_order(points)
    return convert_to_dst_type(points, keypoints)[0]


def keypoint_pipeline(
    spatial: Sequence[Transform],
    intensity: Sequence[Transform] = (),
    image_key: str = "image",
    keypoints_key: str = "keypoints",
    lesion_keys: Sequence[str] = (),
    box_pad: float = DEEPLESION_BOX_PAD,
) -> Compose:
    """Compose ``spatial`` image transforms (any MONAI ones that update ``image.affine``) with the keypoint moves.

    Intensity transforms go after the points are final: they do not touch geometry.
    """
    return Compose([
        # A plain tensor becomes a MetaTensor with an identity affine: pixel index = world, so geometry is tracked.
        EnsureTyped(keys=image_key, track_meta=True, dtype=torch.float32),
        KeypointsToWorldd(image_key, keypoints_key),
        *(step for transform in spatial for step in (transform, KeypointsVisibled(image_key, keypoints_key))),
        KeypointsToImaged(image_key, keypoints_key, lesion_keys, box_pad=box_pad),
        *intensity,
    ])


def recist_train_transforms(
    spatial_size: Sequence[int] = (512, 512),
    flip_prob: float = 0.5,
    rotate_range_deg: float = 15.0,
    scale_range: tuple[float, float] = (0.8, 1.2),
    intensity: bool = True,
    rotate_prob: float = 0.5,
    zoom_prob: float = 0.5,
    image_key: str = "image",
    keypoints_key: str = "keypoints",
    lesion_keys: Sequence[str] = (),
    box_pad: float = DEEPLESION_BOX_PAD,
    seed: int | None = None,
    lesion_crop_prob: float = 0.7,
) -> Compose:
    """Random flip, rotation, zoom, pad + random crop to ``spatial_size``, then (optionally) intensity noise.

    In: image (C, H, W), keypoints (N, 5, 2). Out: image MetaTensor (C, *spatial_size), keypoints (M, 5, 2)
    (plus boxes, diameters_px, lesion_keys cut to M). ``scale_range`` is the zoom of the content (> 1
    enlarges). The crop keeps a random lesion with probability ``lesion_crop_prob`` (:class:`RandLesionCropd`).
    ``seed`` seeds every random transform through MONAI's ``Compose.set_random_state``.
    The intensity ranges (:data:`SCALE_FACTOR`, :data:`SHIFT_OFFSET`, :data:`NOISE_STD`) assume an image normalised
    to about [0, 1].
    """
    keys = [image_key]
    spatial = [
        RandFlipd(keys, prob=flip_prob, spatial_axis=1),  # spatial axis 1 is the columns: a left-right flip
        RandRotated(keys, range_x=math.radians(rotate_range_deg), prob=rotate_prob, keep_size=True,
                    mode="bilinear", padding_mode="zeros"),
        RandZoomd(keys, prob=zoom_prob, min_zoom=scale_range[0], max_zoom=scale_range[1], keep_size=True,
                  mode="bilinear", padding_mode="constant"),
        SpatialPadd(keys, spatial_size=spatial_size),
        RandLesionCropd(image_key, keypoints_key, spatial_size, lesion_prob=lesion_crop_prob),
    ]
    noise = [
        RandScaleIntensityd(keys, factors=SCALE_FACTOR, prob=INTENSITY_PROBS["scale"]),
        RandShiftIntensityd(keys, offsets=SHIFT_OFFSET, prob=INTENSITY_PROBS["shift"]),
        RandGaussianNoised(keys, prob=INTENSITY_PROBS["noise"], std=NOISE_STD),
    ] if intensity else []
    pipeline = keypoint_pipeline(spatial, noise, image_key, keypoints_key, lesion_keys, box_pad)
    if seed is not None:
        pipeline.set_random_state(seed=seed)
    return pipeline


def recist_eval_transforms(
    spatial_size: Sequence[int] = (512, 512),
    image_key: str = "image",
    keypoints_key: str = "keypoints",
    lesion_keys: Sequence[str] = (),
    box_pad: float = DEEPLESION_BOX_PAD,
) -> Compose:
    """Deterministic centred pad/crop to ``spatial_size``.

    In: image (C, H, W), keypoints (N, 5, 2). Out: image MetaTensor (C, *spatial_size), keypoints (M, 5, 2)
    (plus boxes, diameters_px, ``lesion_keys`` cut to M, and ``keypoints_off_image`` = N - M: lesions whose centre
    the crop cut off, which an evaluation must count as missed).
    """
    resize = ResizeWithPadOrCropd([image_key], spatial_size=spatial_size)
    return keypoint_pipeline([resize], (), image_key, keypoints_key, lesion_keys, box_pad)
