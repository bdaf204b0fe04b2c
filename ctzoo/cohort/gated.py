"""The cohort's gated image + context model: how much of each study's prediction comes from the image, and how much
from the study's context (HealthPrism, arXiv 2307.12242: a multimodal model "with a gate mechanism" for
"cross-modality feature importance comparison"; its equations are not public, so this is the usual Gated Multimodal
Unit of Arevalo et al., 2017)::

    e_i = encoder_i(image)        e_c = encoder_c(context)           (B, H) each: Linear + ReLU
    h_i = tanh(W_i e_i)           h_c = tanh(W_c e_c)
    z   = sigmoid(W_z [e_i; e_c])                                   (B, H): per study and unit
    h   = z * h_i + (1 - z) * h_c  ->  logits = head(h)              (B, K)

A study's **image weight** is the mean of its ``z``; its context weight is one minus that. The single-modality
baselines are the same network with one branch: ``h = h_i`` or ``h = h_c`` (same encoders, width and head).
Per-feature importance within each modality is Integrated Gradients (captum) of the true class's logit, from a
zero baseline (the features are standardised on the training studies, so zero is the training mean).

:func:`fit_gated` trains one model (full batch, AdamW, cross-entropy), keeps the epoch with the best validation mean
AUC, and reports the test mean AUC (one-vs-rest per class, averaged over the classes the test split has both ways).
"""

from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import torch
from torch import nn

Modalities = Literal["both", "image", "context"]


class GatedMultimodalNet(nn.Module):
    """``(image (B, I), context (B, C)) -> logits (B, K)``; ``modalities`` "image" or "context" makes the
    single-modality baseline of the same size (the other input is ignored)."""

    def __init__(self, image_dim: int, context_dim: int, classes: int, hidden: int = 32,
                 modalities: Modalities = "both") -> None:
        super().__init__()
        if modalities not in ("both", "image", "context"):
            raise ValueError(f"modalities must be both, image or context, got {modalities!r}")
        self.modalities = modalities
        self.image_encoder = nn.Sequential(nn.Linear(image_dim, hidden), nn.ReLU())
        self.context_encoder = nn.Sequential(nn.Linear(context_dim, hidden), nn.ReLU())
        self.image_projection = nn.Linear(hidden, hidden)
        self.context_projection = nn.Linear(hidden, hidden)
        self.gate = nn.Linear(2 * hidden, hidden)
        self.head = nn.Linear(hidden, classes)

    def fuse(self, image: torch.Tensor, context: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(h (B, H), z (B, H))``: the fused representation and the gate (all ones / zeros for a baseline)."""
        e_i, e_c = self.image_encoder(image), self.context_encoder(context)
        h_i, h_c = torch.tanh(self.image_projection(e_i)), torch.tanh(self.context_projection(e_c))
        if self.modalities == "image":
            return h_i, torch.ones_like(h_i)
        if self.modalities == "context":
            return h_c, torch.zeros_like(h_c)
        z = torch.sigmoid(self.gate(torch.cat([e_i, e_c], dim=1)))
        return z * h_i + (1 - z) * h_c, z

    def forward(self, image: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        return self.head(self.fuse(image, context)[0])

    @torch.no_grad()
    def image_weight(self, image: torch.Tensor, context: torch.Tensor) -> torch.Tensor:
        """``(B,)``: each study's mean gate, the image's share of its fused representation."""
        return self.fuse(image, context)[1].mean(dim=1)


@dataclass
class ModalityData:
    """Studies as two standardised feature matrices, labels ``0..K-1`` and the split of each study."""

    image: np.ndarray  # (N, I) float
    context: np.ndarray  # (N, C) float
    labels: np.ndarray  # (N,) int
    split: np.ndarray  # (N,) "train" | "val" | "test"
    image_names: list[str] = field(default_factory=list)
    context_names: list[str] = field(default_factory=list)

    def tensors(self, part: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        rows = self.split == part
        return (torch.as_tensor(self.image[rows], dtype=torch.float32),
                torch.as_tensor(self.context[rows], dtype=torch.float32), torch.as_tensor(self.labels[rows]))


def standardised(train: np.ndarray, *others: np.ndarray) -> list[np.ndarray]:
    """Every matrix standardised with ``train``'s column means and standard deviations (constant columns: sd 1)."""
    mean, sd = train.mean(axis=0), train.std(axis=0)
    sd = np.where(sd > 0, sd, 1.0)
    return [(matrix - mean) / sd for matrix in (train, *others)]


def mean_auc(logits: torch.Tensor, labels: torch.Tensor, classes: int) -> float:
    """One-vs-rest ROC AUC per class (MONAI's), averaged over the classes ``labels`` holds both ways; NaN if none."""
    from monai.metrics import compute_roc_auc

    probabilities = torch.softmax(logits.float(), dim=1)
    aucs = [compute_roc_auc(probabilities[:, k], (labels == k).float()) for k in range(classes)
            if 0 < int((labels == k).sum()) < len(labels)]
    return float(np.mean(aucs)) if aucs else float("nan")


@dataclass
class FitResult:
    model: GatedMultimodalNet
    val_auc: float  # NaN where the validation studies hold no class both ways
    test_auc: float
    best_epoch: int
    selected_on: str = "val_auc"  # or "val_loss": what chose best_epoch


def fit_gated(data: ModalityData, modalities: Modalities = "both", hidden: int = 32, epochs: int = 300,
              lr: float = 0.01, weight_decay: float = 1e-3, seed: int = 0) -> FitResult:
    """Train a :class:`GatedMultimodalNet` on ``data``'s train studies (full batch), keep the epoch with the best
    validation mean AUC, return it with its validation and test mean AUC.

    Where the validation studies hold no class both ways (one lesion, or one type only) there is no AUC to choose
    by: the epoch with the lowest validation cross-entropy is kept instead (``selected_on`` says which), so the
    model returned is always a trained one. ValueError when there are no training or validation studies."""
    torch.manual_seed(seed)
    classes = int(data.labels.max()) + 1
    model = GatedMultimodalNet(data.image.shape[1], data.context.shape[1], classes, hidden, modalities)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    (image, context, labels), val = data.tensors("train"), data.tensors("val")
    if not len(labels) or not len(val[2]):
        raise ValueError(f"fitting needs training and validation studies: {len(labels)} train, {len(val[2])} val")
    by_auc = any(0 < int((val[2] == k).sum()) < len(val[2]) for k in range(classes))  # mean_auc is not NaN
    best = (-math.inf, -1, None)  # (score, epoch, weights): higher is better
    for epoch in range(epochs):
        model.train()
        loss = nn.functional.cross_entropy(model(image, context), labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        model.eval()
        with torch.no_grad():
            logits = model(val[0], val[1])
            score = mean_auc(logits, val[2], classes) if by_auc else -float(
                nn.functional.cross_entropy(logits, val[2]))
        if score > best[0]:
            best = (score, epoch, copy.deepcopy(model.state_dict()))
    model.load_state_dict(best[2])
    model.eval()
    test = data.tensors("test")
    with torch.no_grad():
        test_auc = mean_auc(model(test[0], test[1]), test[2], classes)
    return FitResult(model, best[0] if by_auc else math.nan, test_auc, best[1], "val_auc" if by_auc else "val_loss")


def feature_importance(model: GatedMultimodalNet, image: torch.Tensor, context: torch.Tensor,
                       labels: torch.Tensor, steps: int = 32, per_study: bool = False) -> tuple[np.ndarray, np.ndarray]:
    """Integrated Gradients (captum) of each study's true-class logit from a zero baseline: the mean absolute
    attribution of every image feature and every context feature, ``((I,), (C,))``; with ``per_study`` every
    study's signed attributions, ``((B, I), (B, C))``."""
    from captum.attr import IntegratedGradients

    attributions = IntegratedGradients(model).attribute((image, context), baselines=(image * 0, context * 0),
                                                        target=labels, n_steps=steps)
    if per_study:
        return tuple(a.detach().numpy() for a in attributions)
    return tuple(a.abs().mean(dim=0).detach().numpy() for a in attributions)
