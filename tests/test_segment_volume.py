"""Volume segmentation: an untrained template net with a small bank on the embedded sample gives labels on the
input grid, invariant to how the input is stored; a plain segmenter takes no bank; the JSON summary adds up."""

import dataclasses

import numpy as np
import pytest
import torch
from torch import nn

from ctzoo.datasets.seg_preprocessing import SegPreprocessing, volume_to_slices
from ctzoo.inference.backends import TorchSegmenter
from ctzoo.inference.segment_volume import seg_summary, segment_slices
from ctzoo.inference.tasks import run_task, segmenter_task
from ctzoo.io import Volume
from ctzoo.models.template_bank import TemplateBank
from ctzoo.models.template_seg import TemplateSegNet

CLASSES = ["liver", "spleen", "stomach", "aorta", "vertebrae"]
PREP = SegPreprocessing(spacing_mm=4.0, size=(128, 128))  # small slices keep the test fast; 500 mm fit in 128 px


class ThresholdSegmenter(nn.Module):
    """A plain segmenter (no template) with an input-dependent, spatially varied answer: intensity bins."""

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        centres = torch.linspace(0, 1, len(CLASSES) + 1).reshape(1, -1, 1, 1)
        return -(image - centres).abs()


def flipped_left_right(volume: Volume) -> Volume:
    """The same voxels stored with the column axis reversed (orientation RPS instead of LPS)."""
    direction = volume.direction.copy()
    direction[:, 0] *= -1
    origin = volume.index_to_lps(np.array([volume.array.shape[2] - 1.0, 0.0, 0.0]))
    return dataclasses.replace(volume, array=volume.array[:, :, ::-1].copy(), origin=tuple(origin),
                               direction=direction, dicom=None)


def segment_volume(model, bank, volume, prep, batch_size=16):
    """The segmenter's stages on one volume in memory, as every path runs them."""
    return run_task(segmenter_task(TorchSegmenter(model, bank, CLASSES, "cpu"), prep), volume, batch_size)


@pytest.fixture(scope="module")
def net():
    torch.manual_seed(0)
    return TemplateSegNet(2, 1, len(CLASSES), channels=(8, 16, 32), strides=(2, 2)).eval()


@pytest.fixture(scope="module")
def bank(net, sample_volume):
    """Three of the sample's own slices with boxes as 'organs' (the net is untrained: only shapes matter)."""
    slices, _ = volume_to_slices(sample_volume, PREP)
    picked = [2, 10, 17]
    masks = torch.zeros(len(picked), len(CLASSES), *PREP.size)
    for c in range(len(CLASSES)):
        masks[:, c, 20 + 16 * c:36 + 16 * c, 40:80] = 1
    return TemplateBank.build(net, slices[picked], masks, CLASSES, [f"sample_ct slice {k}" for k in picked])


@pytest.fixture(scope="module")
def labels(net, bank, sample_volume):
    return segment_volume(net, bank, sample_volume, PREP, batch_size=8)


def test_labels_on_the_input_grid(labels, sample_volume):
    assert labels.shape == sample_volume.array.shape and labels.dtype == np.uint8
    assert labels.max() <= len(CLASSES) and len(np.unique(labels)) > 1  # informative, so flip tests can fail


def test_each_slice_gets_its_nearest_template(net, bank, sample_volume):
    slices, _ = volume_to_slices(sample_volume, PREP)
    nearest = bank.nearest(net, slices)
    assert nearest[[2, 10, 17]].tolist() == [0, 1, 2]  # a bank slice is its own nearest template
    with torch.no_grad():  # one encoding per distinct template, gathered per slice == templates passed per slice
        expected = net(slices, bank.templates(nearest)).argmax(1).to(torch.uint8)
    found = segment_slices(net, bank, slices, batch_size=7)
    assert (found != expected).float().mean() < 1e-4  # batch sizes differ, so float rounding may flip a tie


def test_storage_order_does_not_change_the_result(net, bank, labels, sample_volume):
    flipped = flipped_left_right(sample_volume)
    assert flipped.orientation != "LPS"
    again = segment_volume(net, bank, flipped, PREP, batch_size=8)
    assert np.array_equal(again[:, :, ::-1], labels)


def test_plain_segmenter_and_bank_checks(net, bank, sample_volume):
    plain = ThresholdSegmenter()
    labels = segment_volume(plain, None, sample_volume, PREP)
    assert labels.shape == sample_volume.array.shape and len(np.unique(labels)) > 3
    again = segment_volume(plain, None, flipped_left_right(sample_volume), PREP)
    assert np.array_equal(again[:, :, ::-1], labels)
    with pytest.raises(ValueError, match="takes no template bank"):
        segment_volume(plain, bank, sample_volume, PREP)
    with pytest.raises(ValueError, match="needs a TemplateBank"):
        segment_volume(net, None, sample_volume, PREP)
    with pytest.raises(ValueError, match="another SegPreprocessing"):
        segment_volume(net, bank, sample_volume, SegPreprocessing(spacing_mm=4.0, size=(96, 96)))


def test_summary_counts_volumes_and_slices(sample_volume):
    labels = np.zeros(sample_volume.array.shape, np.uint8)
    labels[3:5, 10:20, 10:30] = 1  # 2 x 10 x 20 voxels of liver
    labels[7, 0, 0] = 5
    summary = seg_summary(labels, sample_volume, CLASSES, "template-seg-abdomen", "0.1.0")
    voxel_ml = np.prod(sample_volume.spacing) / 1000
    liver = summary["classes"]["liver"]
    assert liver == {"label": 1, "voxels": 400, "volume_ml": pytest.approx(400 * voxel_ml, abs=1e-3),
                     "slices": [3, 4], "slices_z_mm": [-798.5, -796.5]}  # ImagePositionPatient z of slices 3, 4
    assert summary["classes"]["vertebrae"]["slices"] == [7] and summary["classes"]["spleen"]["voxels"] == 0
    assert summary["input"]["study_instance_uid"] == sample_volume.dicom.study_instance_uid
    with pytest.raises(ValueError, match="0..5"):
        seg_summary(labels + 1, sample_volume, CLASSES)


def test_anatomy_outside_the_field_of_view_is_reported(sample_volume):
    """The embedded sample is 500 mm wide, its body about 330 mm: a 32 px canvas at 4 mm (128 mm) cuts the body,
    and the labels' background there is the model not looking; the volume's warnings (segmentation.json) say so."""
    small = SegPreprocessing(spacing_mm=4.0, size=(32, 32))
    volume = dataclasses.replace(sample_volume, warnings=[])
    segment_volume(ThresholdSegmenter(), None, volume, small)
    cut = [w for w in volume.warnings if w.startswith("field of view")]
    assert len(cut) == 1 and "the model sees 128 x 128 mm" in cut[0] and "are not segmented" in cut[0]
    assert cut[0] in seg_summary(np.zeros(volume.array.shape, np.uint8), volume, CLASSES)["input"]["warnings"]
    segment_volume(ThresholdSegmenter(), None, volume, small)
    assert volume.warnings == cut  # said once per volume
    whole = dataclasses.replace(sample_volume, warnings=[])
    segment_volume(ThresholdSegmenter(), None, whole, PREP)  # 512 mm: the whole slice fits
    assert whole.warnings == []
    air = dataclasses.replace(sample_volume, array=np.full(sample_volume.array.shape, -1000, np.float32), warnings=[])
    segment_volume(ThresholdSegmenter(), None, air, small)  # cut, but only air: nothing lost
    assert air.warnings == []
