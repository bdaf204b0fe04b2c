"""Does a template segmenter read its template? Every evaluation scores it a second time with each template's class
masks rotated between classes (dice_mean_wrong_template, dice_drop_wrong_template); and the training option that
makes it read them (augment.permute_classes: template classes shuffled, target relabelled to match)."""

import math

import numpy as np
import pytest
import torch

from ctzoo.datasets.seg_preprocessing import SegPreprocessing
from ctzoo.datasets.segmentation import SegCase
from ctzoo.datasets.segmentation_slices import (
    RandPermuteClassesd,
    SegAugmentConfig,
    case_to_slices,
    template_set,
    template_slice_dataset,
    template_tensor,
)
from ctzoo.io import Volume
from ctzoo.models.template_bank import TemplateBank
from ctzoo.models.template_seg import TemplateEncoding, TemplateSegNet
from ctzoo.training.engine import seed_everything
from ctzoo.training.seg_evaluation import (
    comparison_markdown,
    evaluate_segmenter,
    template_check_line,
    wrong_template_bank,
)

NAMES = ["a", "b", "c"]
PREP = SegPreprocessing(spacing_mm=2.0, size=(32, 32))


def small_case() -> SegCase:
    """Three organs of different HU in air, the same on every slice."""
    hu = np.full((3, 32, 32), -1000, np.float32)
    labels = np.zeros(hu.shape, np.uint8)
    for value, (rows, hu_value) in enumerate([(slice(2, 10), 40), (slice(12, 20), 200), (slice(22, 30), -100)], 1):
        hu[:, rows, 4:28] = hu_value
        labels[:, rows, 4:28] = value
    return SegCase("case", Volume(hu, (2.0, 2.0, 3.0)), labels)


class TemplateReader(TemplateSegNet):
    """The extreme of a model that reads its template: it answers with the template's masks."""

    def encode_template(self, template: torch.Tensor) -> TemplateEncoding:
        masks = template[:, self.in_channels:]
        return TemplateEncoding((masks,), masks.flatten(2).sum(-1) > 0)

    def forward(self, image, template=None, template_encoding=None):
        masks = (template_encoding or self.encode_template(template)).prototypes[0]
        return torch.cat([torch.full_like(masks[:, :1], 0.5), masks], dim=1)


class ImageReader(TemplateSegNet):
    """The other extreme: it segments from the image alone (by HU band) and never looks at its template."""

    def forward(self, image, template=None, template_encoding=None):
        hu = image * 600 - 200  # the default window, undone
        bands = [(hu > 0) & (hu < 100), hu > 150, (hu > -150) & (hu < -50)]
        return torch.cat([torch.full_like(image, 0.5), *[band.float() for band in bands]], dim=1)


def templates():
    return template_set([case_to_slices(small_case(), PREP)], len(NAMES))


@pytest.mark.parametrize("kind,reads", [(TemplateReader, True), (ImageReader, False)])
def test_every_evaluation_says_whether_the_template_matters(kind, reads):
    model = kind(num_classes=len(NAMES), channels=(4, 8), strides=(2,))
    metrics = evaluate_segmenter(model, [small_case()], PREP, templates(), "cpu", NAMES, hd95=False)
    assert metrics["dice_mean"] == pytest.approx(1.0)
    wrong, drop = metrics["dice_mean_wrong_template"], metrics["dice_drop_wrong_template"]
    assert drop == pytest.approx(metrics["dice_mean"] - wrong)
    assert metrics["cases"]["case"]["dice_mean_wrong_template"] == pytest.approx(wrong)
    line = template_check_line(metrics)
    if reads:  # each organ labelled as the next one: nothing right
        assert wrong == pytest.approx(0.0) and "the model reads its template" in line
    else:
        assert drop == pytest.approx(0.0) and "the template has no measurable effect on this model" in line
    row = {"model": "template_seg", "condition": "clean", "parameters": 1,
           **{k: v for k, v in metrics.items() if k not in ("cases", "notes")}}
    assert f"* template_seg, clean: {line}" in comparison_markdown([row], NAMES)


def test_the_check_is_made_where_it_means_something():
    model = TemplateReader(num_classes=len(NAMES), channels=(4, 8), strides=(2,))
    skipped = [evaluate_segmenter(model, [small_case()], PREP, templates(), "cpu", NAMES, hd95=False,
                                  template_check=False),
               evaluate_segmenter(model, [small_case()], PREP, templates(), "cpu", NAMES, hd95=False,
                                  copy_template=True)]  # the copy has no network to test
    for metrics in skipped:
        assert "dice_mean_wrong_template" not in metrics and template_check_line(metrics) is None
    assert template_check_line({"dice_mean": 0.5, "dice_mean_wrong_template": math.nan}) is None


def test_the_wrong_template_names_every_class_wrongly():
    images, masks, sources = templates()
    bank = TemplateBank(images, masks, torch.zeros(len(images), 4), NAMES, sources)
    wrong = wrong_template_bank(bank)
    assert torch.equal(wrong.images, bank.images) and torch.equal(wrong.embeddings, bank.embeddings)
    for c in range(len(NAMES)):  # class c shows class c + 1's mask, the last the first's
        assert torch.equal(wrong.masks[:, c], bank.masks[:, (c + 1) % len(NAMES)])
    single = TemplateBank(images, masks[:, :1], torch.zeros(len(images), 4), NAMES[:1], sources)
    assert wrong_template_bank(single) is None  # one class: nothing to swap


def test_permuted_classes_relabel_the_target_as_the_template_says():
    labels = torch.zeros(8, 8, dtype=torch.long)
    for c in (1, 2, 3):
        labels[c - 1] = c
    template = template_tensor(torch.rand(1, 8, 8), labels, 3)
    shuffle = RandPermuteClassesd(3, prob=1.0)
    seen = set()
    for seed in range(12):
        shuffle.set_random_state(seed)
        item = shuffle({"template": template, "label": labels[None]})
        assert torch.equal(item["template"][0], template[0])
        for k in (1, 2, 3):  # label k is where template mask k is: the organ the template calls k
            assert torch.equal(item["label"][0] == k, item["template"][k].bool())
        seen.add(tuple(item["label"][0, :3, 0].tolist()))
    assert len(seen) > 1  # really shuffled
    kept = RandPermuteClassesd(3, prob=0.0)
    assert torch.equal(kept({"template": template, "label": labels[None]})["label"], labels[None])


def test_permute_classes_is_off_by_default_and_joins_the_training_items():
    assert SegAugmentConfig().permute_classes == 0.0
    case = case_to_slices(small_case(), PREP)
    plain = SegAugmentConfig(affine_prob=0, intensity_prob=0, noise_prob=0)
    shuffled = template_slice_dataset([case], 3, PREP, plain.model_copy(update={"permute_classes": 1.0}))
    default = template_slice_dataset([case], 3, PREP, plain)
    assert not any(isinstance(t, RandPermuteClassesd) for t in default.transform.transforms)
    seed_everything(3, shuffled)
    items = [shuffled[i] for i in range(len(shuffled))]
    for item in items:
        for k in (1, 2, 3):
            assert torch.equal(item["label"][0] == k, item["template"][k].bool())  # every slice is the same
    assert len({tuple(item["label"][0, 5::10, 16].tolist()) for item in items}) > 1
