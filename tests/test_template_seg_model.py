"""Template segmenter: shapes, weight sharing, the prototype/cosine maths, input checks, the UNet baseline, and
a tiny synthetic learning run."""

import pytest
import torch
from monai.losses import DiceCELoss
from monai.metrics import DiceMetric
from monai.networks.utils import one_hot

from ctzoo.models.template_seg import (
    CosinePrototypeAttention,
    TemplateSegNet,
    cosine_similarity_maps,
    count_parameters,
    downsample_masks,
    masked_prototypes,
    unet_baseline,
)

SMALL = {"channels": (8, 16, 32), "strides": (2, 2)}


def small_net(spatial_dims=2, num_classes=2, **kwargs):
    torch.manual_seed(0)
    return TemplateSegNet(spatial_dims, 1, num_classes, **{**SMALL, **kwargs})


def inputs(spatial_dims, batch=2, num_classes=2, size=16, template_batch=None):
    shape = (size,) * spatial_dims
    image = torch.randn(batch, 1, *shape)
    masks = (torch.rand(template_batch or batch, num_classes, *shape) > 0.7).float()
    return image, torch.cat([torch.randn(template_batch or batch, 1, *shape), masks], 1)


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_output_shapes_and_sharing(spatial_dims):
    image, template = inputs(spatial_dims)
    shared, separate = small_net(spatial_dims), small_net(spatial_dims, share_encoders=False)
    for net in (shared, separate):
        assert net(image, template).shape == (2, 3, *image.shape[2:])
        assert net.embed(image).shape == (2, 32)
    assert shared.template_encoder.levels is shared.image_encoder.levels
    # Sharing removes exactly the template encoder's non-stem weights.
    difference = count_parameters(separate) - count_parameters(shared)
    assert difference == count_parameters(separate.template_encoder.levels) > 0


@pytest.mark.parametrize("kwargs", [{"fusion_levels": [2]}, {"gate": "none"}, {"fusion_levels": []}])
def test_variants(kwargs):
    image, template = inputs(2)
    assert small_net(**kwargs)(image, template).shape == (2, 3, 16, 16)


def test_template_encoding_reuse_and_broadcast():
    net = small_net().eval()
    image, template = inputs(2, batch=3, template_batch=1, size=32)  # template size may differ from the image's
    image = image[..., :16, :16]
    encoding = net.encode_template(template)
    with torch.no_grad():
        once = net(image, template_encoding=encoding)
        repeated = net(image, template.expand(3, -1, -1, -1))
    assert torch.allclose(once, repeated, atol=1e-5)


def test_masked_prototypes_by_hand():
    features = torch.arange(2 * 2 * 3, dtype=torch.float32).reshape(1, 2, 2, 3)  # (B, F=2, 2, 3)
    masks = torch.zeros(1, 2, 2, 3)
    masks[0, 0, 0, 0] = masks[0, 0, 1, 2] = 1.0  # class 0: pixels (0,0) and (1,2)
    masks[0, 1, 0, 1] = 0.5  # class 1: half of pixel (0,1)
    expected = torch.tensor([[[(0 + 5) / 2, (6 + 11) / 2], [1.0, 7.0]]])
    assert torch.allclose(masked_prototypes(features, masks), expected, atol=1e-4)


def test_area_downsampling_keeps_small_classes():
    masks = torch.zeros(1, 1, 16, 16)
    masks[0, 0, 5, 5] = 1.0
    pooled = downsample_masks(masks, (2, 2))
    assert pooled.sum() * 64 == pytest.approx(1.0) and pooled[0, 0, 0, 0] > 0


def test_absent_class_is_finite_and_zero():
    attention = CosinePrototypeAttention(2, channels=4, num_classes=2)
    template_features = torch.randn(1, 4, 8, 8, requires_grad=True)
    image_features = torch.randn(1, 4, 8, 8, requires_grad=True)
    masks = torch.zeros(1, 2, 16, 16)
    masks[0, 0, :4, :4] = 1.0  # class 1 (index 1) absent
    prototypes, present = attention.prototypes(template_features, masks)
    assert present.tolist() == [[True, False]]
    assert torch.isfinite(prototypes).all() and (prototypes[0, 1] == 0).all()
    similarity = attention.similarity(image_features, prototypes, present)
    assert (similarity[0, 1] == 0).all() and similarity[0, 0].abs().sum() > 0
    attention(image_features, template_features, masks).sum().backward()
    assert torch.isfinite(template_features.grad).all() and torch.isfinite(image_features.grad).all()
    # Whole network, a template with no foreground at all.
    net = small_net()
    image, template = inputs(2)
    template[:, 1:] = 0
    out = net(image, template)
    out.sum().backward()
    assert torch.isfinite(out).all()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_cosine_map_is_one_along_the_prototype():
    prototypes = torch.tensor([[[1.0, 2.0, -1.0], [0.0, 1.0, 1.0]]])  # (1, C=2, F=3)
    features = torch.randn(1, 3, 4, 5)
    features[0, :, 1, 2] = 3.0 * prototypes[0, 0]  # same direction, other length
    features[0, :, 3, 4] = -0.5 * prototypes[0, 1]  # opposite direction
    similarity = cosine_similarity_maps(features, prototypes)
    assert similarity.shape == (1, 2, 4, 5)
    assert similarity[0, 0, 1, 2].item() == pytest.approx(1.0, abs=1e-5)
    assert similarity[0, 1, 3, 4].item() == pytest.approx(-1.0, abs=1e-5)
    assert (similarity.abs() <= 1 + 1e-5).all()


def test_gradients_reach_both_encoders_and_shared_weights_sum_both_paths():
    shared = small_net()
    separate = small_net(share_encoders=False)
    # The shared state dict lists the shared weights under both prefixes, so it loads into the separate net.
    separate.load_state_dict(shared.state_dict())
    image, template = inputs(2)
    for net in (shared, separate):
        net(image, template).square().mean().backward()
    for net in (shared, separate):
        for stem in (net.image_encoder.stem, net.template_encoder.stem):
            assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in stem.parameters())
    assert len(list(shared.parameters())) == len({id(p) for p in shared.parameters()})
    # Each shared weight gets the image-path and the template-path gradient, each once.
    shared_grads = [p.grad for p in shared.image_encoder.levels.parameters()]
    image_grads = [p.grad for p in separate.image_encoder.levels.parameters()]
    template_grads = [p.grad for p in separate.template_encoder.levels.parameters()]
    for g, gi, gt in zip(shared_grads, image_grads, template_grads, strict=True):
        assert gt.abs().sum() > 0
        assert torch.allclose(g, gi + gt, atol=1e-5, rtol=1e-4)


def test_input_errors():
    net = small_net()  # size divisor 4
    image, template = inputs(2)
    with pytest.raises(ValueError, match=r"image spatial size \(14, 16\) must be divisible by 4"):
        net(image[..., :14, :], template)
    with pytest.raises(ValueError, match=r"template spatial size \(16, 18\) must be divisible by 4"):
        net(image, torch.nn.functional.pad(template, (1, 1)))
    with pytest.raises(ValueError, match=r"template must have shape \(B, 3, \*, \*\).*got \(2, 2, 16, 16\)"):
        net(image, template[:, :2])
    with pytest.raises(ValueError, match="image must have shape"):
        net(image[:, :, None], template)
    with pytest.raises(ValueError, match="exactly one"):
        net(image)
    with pytest.raises(ValueError, match="gate"):
        small_net(gate="softmax")
    with pytest.raises(ValueError, match="fusion_levels"):
        small_net(fusion_levels=[3])


@pytest.mark.parametrize("spatial_dims", [2, 3])
def test_unet_baseline_matches_budget(spatial_dims):
    target = count_parameters(TemplateSegNet(spatial_dims))
    unet = unet_baseline(spatial_dims, 1, 6, target)
    assert abs(count_parameters(unet) - target) <= 0.1 * target
    assert unet(torch.randn(1, 1, *(16,) * spatial_dims)).shape == (1, 6, *(16,) * spatial_dims)
    with pytest.raises(ValueError, match="within"):
        unet_baseline(spatial_dims, 1, 6, 50)


def synthetic(n, generator, size=64):
    """n noisy images with a disc (class 1) and a square (class 2) of random sizes at random, disjoint places."""
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    labels = torch.zeros(n, 1, size, size, dtype=torch.long)
    for i in range(n):
        r = int(torch.randint(6, 12, (1,), generator=generator))  # disc radius
        h = int(torch.randint(5, 10, (1,), generator=generator))  # square half side
        while True:  # rejection-sample positions until the shapes cannot touch
            cy, cx = torch.randint(r, size - r, (2,), generator=generator).tolist()
            sy, sx = torch.randint(h, size - h, (2,), generator=generator).tolist()
            if max(abs(cy - sy), abs(cx - sx)) > r + h + 1:
                break
        labels[i, 0][(yy - cy) ** 2 + (xx - cx) ** 2 <= r * r] = 1
        labels[i, 0][((yy - sy).abs() <= h) & ((xx - sx).abs() <= h)] = 2
    images = (labels > 0).float() + 0.2 * torch.randn(labels.shape, generator=generator)
    return images, labels


def as_template(images, labels):
    return torch.cat([images, (labels == 1).float(), (labels == 2).float()], 1)


def test_learns_synthetic_shapes():
    torch.manual_seed(0)
    generator = torch.Generator().manual_seed(0)
    net = TemplateSegNet(2, 1, 2, channels=(8, 16, 32), strides=(2, 2))
    optimiser = torch.optim.Adam(net.parameters(), lr=3e-3)
    loss_fn = DiceCELoss(to_onehot_y=True, softmax=True)
    for _ in range(80):
        images, labels = synthetic(8, generator)
        loss = loss_fn(net(images, as_template(*synthetic(8, generator))), labels)
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
    net.eval()
    images, labels = synthetic(16, generator)  # held out, one fixed template for all
    with torch.no_grad():
        predicted = net(images, as_template(*synthetic(1, generator))).argmax(1, keepdim=True)
    metric = DiceMetric(include_background=False, reduction="mean_batch")
    metric(one_hot(predicted, 3), one_hot(labels, 3))
    dice = metric.aggregate()
    assert (dice > 0.8).all(), dice
