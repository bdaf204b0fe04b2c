"""The labelled templates a template-segmentation zoo model ships with, and how one is chosen per slice.

A :class:`~ctzoo.models.template_seg.TemplateSegNet` segments an image *given* a labelled template. At
inference the template is not supplied by the user: the zoo model ships a small bank of preprocessed slices
with their organ masks (``ctzoo/models/weights/<name>/templates.safetensors`` + ``templates.json``) and each
input slice gets the template whose embedding (:meth:`TemplateSegNet.embed`, the mean bottleneck feature) is
closest to its own by cosine similarity — the most similar anatomy, typically the same body level.

Templates are **not registered** to the image. The prototype attention only reads per-class feature averages
of the template (masked average pooling), so where an organ sits in the template does not matter, only what
it looks like; spatial alignment would buy nothing. Deformable registration would also cost seconds per slice
and add a failure mode (a bad registration silently degrades the prior), which retrieval by embedding avoids.

Embeddings belong to the weights that computed them: ship a bank together with its model's weights and rebuild
it (:meth:`TemplateBank.build` on ``bank.images``/``bank.masks``) whenever the weights change.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import safetensors.torch
import torch
import torch.nn.functional as F

from ctzoo.io.atomic import atomic_path
from ctzoo.models.template_seg import TemplateSegNet

TENSORS_FILE, INDEX_FILE = "templates.safetensors", "templates.json"
FORMAT_VERSION = 1


@dataclass(frozen=True, eq=False)  # eq would compare tensors elementwise
class TemplateBank:
    """Preprocessed template slices with binary class masks and their embeddings.

    Attributes:
        images: ``(T, 1, H, W)`` float32, preprocessed exactly as the inputs the model will see.
        masks: ``(T, C, H, W)`` float32 in {0, 1}, one channel per foreground class.
        embeddings: ``(T, F)`` float32, ``model.embed(images)``.
        class_names: ``C`` names, in mask-channel order (label value ``c + 1`` is ``class_names[c]``).
        sources: ``T`` human-readable origins, e.g. ``"example_ct_sm.nii.gz slice 14"``.
    """

    images: torch.Tensor
    masks: torch.Tensor
    embeddings: torch.Tensor
    class_names: list[str]
    sources: list[str]

    def __post_init__(self) -> None:
        _check_templates(self.images, self.masks, self.class_names, self.sources)
        if self.embeddings.ndim != 2 or self.embeddings.shape[0] != self.images.shape[0]:
            raise ValueError(f"embeddings must have shape (T={self.images.shape[0]}, F), "
                             f"got {tuple(self.embeddings.shape)}")

    @property
    def num_classes(self) -> int:
        """Foreground classes ``C``."""
        return self.masks.shape[1]

    def __len__(self) -> int:
        return self.images.shape[0]

    @classmethod
    def build(cls, model: TemplateSegNet, images: torch.Tensor, masks: torch.Tensor, class_names: Sequence[str],
              sources: Sequence[str], batch_size: int = 32) -> TemplateBank:
        """A bank from preprocessed ``images`` ``(T, 1, H, W)`` and binary ``masks`` ``(T, C, H, W)``, embedding
        the images with ``model`` (in eval mode, on the model's device; its mode is restored afterwards)."""
        images, masks = images.detach().float().cpu().contiguous(), masks.detach().float().cpu().contiguous()
        _check_templates(images, masks, class_names, sources)  # before the (costly) embedding
        if masks.shape[1] != model.num_classes:
            raise ValueError(f"masks have {masks.shape[1]} classes, the model segments {model.num_classes}")
        return cls(images, masks, _embed(model, images, batch_size).cpu(), list(class_names), list(sources))

    def embedded_by(self, model: TemplateSegNet) -> TemplateBank:
        """The same templates embedded by ``model``: the bank for other weights (trained further, expanded)."""
        return TemplateBank.build(model, self.images, self.masks, self.class_names, self.sources)

    def nearest(self, model: TemplateSegNet, images: torch.Tensor) -> torch.Tensor:
        """Index ``(B,)`` (long, on ``images``' device) of the template most cosine-similar to each image
        ``(B, 1, H, W)`` in ``model.embed`` space; ``model`` must be the one the bank was built with."""
        queries = _embed(model, images, batch_size=images.shape[0] or 1)
        if queries.shape[1] != self.embeddings.shape[1]:
            raise ValueError(f"the model embeds into {queries.shape[1]} features, the bank's embeddings have "
                             f"{self.embeddings.shape[1]}: the bank was built with another model")
        stored = self.embeddings.to(queries.device, queries.dtype)
        similarity = F.normalize(queries, dim=1) @ F.normalize(stored, dim=1).T  # (B, T)
        return similarity.argmax(dim=1).to(images.device)

    def templates(self, index: torch.Tensor | Sequence[int] | int) -> torch.Tensor:
        """Templates ready for the model: ``(B, 1 + C, H, W)`` = image then class masks, on the CPU.

        ``index`` is a ``(B,)`` tensor or sequence of template indices (an int gives ``B = 1``).
        """
        index = torch.as_tensor(index, dtype=torch.long, device="cpu").reshape(-1)
        if index.numel() and (index.min() < 0 or index.max() >= len(self)):
            raise ValueError(f"template index out of range 0..{len(self) - 1}: {index.tolist()}")
        return torch.cat([self.images[index], self.masks[index]], dim=1)

    def save(self, folder: str | Path) -> Path:
        """Write ``templates.safetensors`` (tensors) and ``templates.json`` (names, sources) into ``folder``,
        each atomically; returns the folder."""
        folder = Path(folder)
        # masks are binary: uint8 on disk is exact and a quarter of float32 (the bank ships inside the package)
        tensors = {"images": self.images, "masks": self.masks.to(torch.uint8), "embeddings": self.embeddings}
        index = {"format_version": FORMAT_VERSION, "class_names": self.class_names, "sources": self.sources,
                 "shapes": {k: list(v.shape) for k, v in tensors.items()}}
        with atomic_path(folder / TENSORS_FILE) as partial:
            safetensors.torch.save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(partial),
                                        metadata={"format": "pt", "kind": "ctzoo-template-bank"})
        with atomic_path(folder / INDEX_FILE) as partial:
            partial.write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
        return folder

    @classmethod
    def load(cls, folder: str | Path) -> TemplateBank:
        """Read a bank written by :meth:`save`; ``FileNotFoundError`` names the missing file."""
        folder = Path(folder)
        for name in (TENSORS_FILE, INDEX_FILE):
            if not (folder / name).is_file():
                raise FileNotFoundError(f"no template bank in {folder}: {name} is missing")
        index = json.loads((folder / INDEX_FILE).read_text(encoding="utf-8"))
        if index.get("format_version") != FORMAT_VERSION:
            raise ValueError(f"{folder / INDEX_FILE}: format_version {index.get('format_version')!r} is not "
                             f"{FORMAT_VERSION}; rebuild the bank with this version of ctzoo")
        tensors = safetensors.torch.load_file(str(folder / TENSORS_FILE), device="cpu")
        missing = {"images", "masks", "embeddings"} - tensors.keys()
        if missing:
            raise ValueError(f"{folder / TENSORS_FILE} lacks tensors {sorted(missing)}")
        return cls(tensors["images"], tensors["masks"].float(), tensors["embeddings"], list(index["class_names"]),
                   list(index["sources"]))


def _check_templates(images: torch.Tensor, masks: torch.Tensor, class_names: Sequence[str],
                     sources: Sequence[str]) -> None:
    """ValueError unless images ``(T, 1, H, W)``, binary masks ``(T, C, H, W)``, ``C`` unique names, ``T`` sources."""
    if images.ndim != 4 or images.shape[1] != 1:
        raise ValueError(f"template images must have shape (T, 1, H, W), got {tuple(images.shape)}")
    count, height, width = images.shape[0], *images.shape[2:]
    if count == 0:
        raise ValueError("a template bank needs at least one template")
    if masks.ndim != 4 or masks.shape[0] != count or masks.shape[2:] != images.shape[2:]:
        raise ValueError(f"template masks must have shape (T={count}, C, H={height}, W={width}), "
                         f"got {tuple(masks.shape)}")
    if masks.shape[1] != len(class_names):
        raise ValueError(f"masks have {masks.shape[1]} class channels but {len(class_names)} class names were "
                         f"given: {list(class_names)}")
    if len(set(class_names)) != len(class_names):
        raise ValueError(f"class names must be unique, got {list(class_names)}")
    if not bool(((masks == 0) | (masks == 1)).all()):
        raise ValueError("template masks must be binary (0 or 1)")
    if len(sources) != count:
        raise ValueError(f"{len(sources)} sources given for {count} templates")


def _embed(model: TemplateSegNet, images: torch.Tensor, batch_size: int) -> torch.Tensor:
    """``model.embed`` over ``images`` ``(N, 1, H, W)`` in eval mode and in batches -> ``(N, F)`` float32 on the
    model's device. Eval mode matters only for dropout/batch norm, but a bank must not depend on the caller's mode."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            chunks = [model.embed(images[i:i + batch_size].to(device))
                      for i in range(0, images.shape[0], batch_size)]
    finally:
        model.train(was_training)
    return torch.cat(chunks).float() if chunks else torch.empty(0, model.channels[-1], device=device)
