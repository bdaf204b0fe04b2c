"""TemplateBank: build, save/load round trip, nearest-template retrieval, template tensors and shape checks."""

import pytest
import torch

from ctzoo.models.template_bank import INDEX_FILE, TENSORS_FILE, TemplateBank
from ctzoo.models.template_seg import TemplateSegNet

NAMES = ["liver", "spleen"]


def small_net(channels=(8, 16, 32)):
    torch.manual_seed(0)
    return TemplateSegNet(2, 1, len(NAMES), channels=channels, strides=(2, 2))


def templates(count=4, size=32):
    generator = torch.Generator().manual_seed(1)
    images = torch.rand(count, 1, size, size, generator=generator)
    masks = (torch.rand(count, len(NAMES), size, size, generator=generator) > 0.7).float()
    return images, masks, [f"synthetic slice {k}" for k in range(count)]


@pytest.fixture(scope="module")
def bank():
    images, masks, sources = templates()
    return TemplateBank.build(small_net(), images, masks, NAMES, sources)


def test_build_embeds_with_the_model_and_keeps_its_mode(bank):
    net = small_net().train()
    images, masks, sources = templates()
    built = TemplateBank.build(net, images, masks, NAMES, sources, batch_size=3)  # two batches
    assert net.training  # the caller's mode is restored
    with torch.no_grad():
        expected = net.eval().embed(images)
    assert built.embeddings.shape == (4, 32) and torch.allclose(built.embeddings, expected, atol=1e-5)
    assert len(built) == 4 and built.num_classes == 2


def test_save_load_round_trip(bank, tmp_path):
    folder = bank.save(tmp_path / "bank")
    assert sorted(p.name for p in folder.iterdir()) == sorted([TENSORS_FILE, INDEX_FILE])  # no partial files left
    loaded = TemplateBank.load(folder)
    for name in ("images", "masks", "embeddings"):
        assert torch.equal(getattr(loaded, name), getattr(bank, name))
    assert loaded.class_names == NAMES and loaded.sources == bank.sources
    with pytest.raises(FileNotFoundError, match=INDEX_FILE):
        (folder / INDEX_FILE).unlink()
        TemplateBank.load(folder)


def test_nearest_picks_the_identical_image_and_templates_stack(bank):
    net = small_net()
    order = torch.tensor([2, 0, 3, 1])
    assert torch.equal(bank.nearest(net, bank.images[order]), order)
    template = bank.templates(order)
    assert template.shape == (4, 1 + 2, 32, 32)
    assert torch.equal(template[:, :1], bank.images[order]) and torch.equal(template[:, 1:], bank.masks[order])
    assert bank.templates(1).shape == (1, 3, 32, 32)
    with pytest.raises(ValueError, match="out of range"):
        bank.templates([4])


def test_nearest_refuses_another_models_embeddings(bank):
    with pytest.raises(ValueError, match="another model"):
        bank.nearest(small_net(channels=(8, 16, 24)), bank.images[:1])


@pytest.mark.parametrize("change, message", [
    (lambda i, m, n, s: (i[:, 0], m, n, s), r"\(T, 1, H, W\)"),
    (lambda i, m, n, s: (i[:, :1].expand(-1, 2, -1, -1), m, n, s), r"\(T, 1, H, W\)"),
    (lambda i, m, n, s: (i, m[:3], n, s), "masks must have shape"),
    (lambda i, m, n, s: (i, m[..., :16], n, s), "masks must have shape"),
    (lambda i, m, n, s: (i, m, n[:1], s), "class channels"),
    (lambda i, m, n, s: (i, m, ["liver", "liver"], s), "unique"),
    (lambda i, m, n, s: (i, m * 0.5, n, s), "binary"),
    (lambda i, m, n, s: (i, m, n, s[:2]), "sources"),
    (lambda i, m, n, s: (i[:0], m[:0], n, s[:0]), "at least one"),
])
def test_shape_errors(change, message):
    with pytest.raises(ValueError, match=message):
        images, masks, sources = templates()
        TemplateBank.build(small_net(), *change(images, masks, NAMES, sources))


def test_embeddings_and_model_class_count_are_checked(bank):
    with pytest.raises(ValueError, match="embeddings"):
        TemplateBank(bank.images, bank.masks, bank.embeddings[:2], NAMES, bank.sources)
    images, masks, sources = templates()
    three = TemplateSegNet(2, 1, 3, channels=(8, 16, 32), strides=(2, 2))
    with pytest.raises(ValueError, match="the model segments 3"):
        TemplateBank.build(three, images, masks, NAMES, sources)
