"""The gated image + context model (``ctzoo/cohort/gated.py``) on studies whose label the image carries at a fixed
strength and one planted context feature carries at a controlled strength: the gate follows the context's strength,
Integrated Gradients finds the planted feature, shuffled context loses the gate, and gating costs no AUC."""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import pytest
import torch

from ctzoo.cohort.gated import GatedMultimodalNet, ModalityData, feature_importance, fit_gated, standardised

PLANTED = 2  # the context column that carries the label
SPLIT = np.array(["train"] * 500 + ["val"] * 200 + ["test"] * 200)


def studies(strength: float, seed: int = 0, shuffle_context: bool = False) -> ModalityData:
    """900 studies of 3 classes: 16 image features whose class means differ (fixed strength), 6 context features of
    noise, the planted one shifted by ``strength`` per class; standardised on the training studies."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 3, len(SPLIT))
    image = rng.normal(0, 1, (3, 16))[labels] * 0.6 + rng.normal(0, 1, (len(SPLIT), 16))
    context = rng.normal(0, 1, (len(SPLIT), 6))
    context[:, PLANTED] += strength * (labels - 1)
    if shuffle_context:  # the context of other studies: no longer about this one
        context = context[rng.permutation(len(SPLIT))]
    train = SPLIT == "train"
    return ModalityData(standardised(image[train], image)[1], standardised(context[train], context)[1], labels, SPLIT,
                        [f"image_{i}" for i in range(16)], [f"context_{i}" for i in range(6)])


def context_weight(strength: float, shuffle_context: bool = False) -> tuple[float, object, ModalityData]:
    data = studies(strength, shuffle_context=shuffle_context)
    fitted = fit_gated(data)
    image, context, _ = data.tensors("test")
    return 1 - fitted.model.image_weight(image, context).mean().item(), fitted, data


@pytest.fixture(scope="module")
def by_strength():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one thread: the same sums, so the same fits, on any machine of this build
    yield {strength: context_weight(strength) for strength in (0.0, 0.5, 1.0, 2.0, 4.0)}
    torch.set_num_threads(threads)


def test_the_gate_moves_to_the_context_as_it_carries_more_of_the_label(by_strength):
    weights = [by_strength[s][0] for s in sorted(by_strength)]
    assert weights == sorted(weights) and weights[-1] - weights[0] > 0.2, weights


def test_integrated_gradients_rank_the_planted_feature_first(by_strength):
    for strength in (1.0, 2.0, 4.0):
        _, fitted, data = by_strength[strength]
        _, context_importance = feature_importance(fitted.model, *data.tensors("test"))
        assert int(np.argmax(context_importance)) == PLANTED, (strength, context_importance)


def test_shuffled_context_sends_the_gate_to_the_image(by_strength):
    shuffled, _, _ = context_weight(2.0, shuffle_context=True)  # (the fixture's one thread still holds)
    assert shuffled < by_strength[2.0][0] - 0.1 and shuffled <= by_strength[0.0][0] + 0.05


def test_gating_costs_no_auc_against_the_better_single_modality(by_strength):
    for strength in (0.0, 1.0, 4.0):
        _, fitted, data = by_strength[strength]
        better = max(fit_gated(data, "image").test_auc, fit_gated(data, "context").test_auc)
        assert fitted.test_auc >= better - 0.01, (strength, fitted.test_auc, better)


def test_baselines_are_single_branch_networks_of_the_same_size():
    both, image_only = GatedMultimodalNet(16, 6, 3), GatedMultimodalNet(16, 6, 3, modalities="image")
    assert sum(p.numel() for p in both.parameters()) == sum(p.numel() for p in image_only.parameters())
    image, context = torch.randn(4, 16), torch.randn(4, 6)
    changed = context + 5
    assert torch.equal(image_only(image, context), image_only(image, changed))  # the context is not read
    assert torch.equal(image_only.image_weight(image, context), torch.ones(4))
    with pytest.raises(ValueError, match="both, image or context"):
        GatedMultimodalNet(16, 6, 3, modalities="text")


def test_a_validation_split_with_one_lesion_type_chooses_the_epoch_by_loss():
    """With no class both ways in val there is no AUC to choose by: the lowest validation loss chooses, and the
    model returned is a trained one (it was the random start, at epoch -1, before)."""
    data = studies(2.0)
    split = data.split.copy()
    split[(split == "val") & (data.labels != 0)] = "train"  # val holds one lesion type only
    fitted = fit_gated(dataclasses.replace(data, split=split), epochs=100)
    assert fitted.selected_on == "val_loss" and math.isnan(fitted.val_auc) and fitted.best_epoch >= 0
    assert fitted.test_auc > 0.8, fitted.test_auc
    assert fit_gated(data, epochs=100).selected_on == "val_auc"
