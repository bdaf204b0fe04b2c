"""LEMON expansion: lossless for every supported layer type and zoo architecture, trainable afterwards, clear
errors for what cannot be expanded; ctzoo expand and init_from_expansion."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from ctzoo.models.recistnet import RecistNet
from ctzoo.models.template_seg import TemplateSegNet, unet_baseline
from ctzoo.scaling.channel_trace import UnsupportedLayerError
from ctzoo.scaling.expand import compare_outputs, expand_model
from ctzoo.training.engine import OptimConfig, lr_factor

#: float32, relative to the largest output: eval mode (measured <= 6.7e-6, RECIST-Net's ResNet-34 FPN, worst of 30
#: seeds; <= 2.1e-6 for the other zoo architectures), and training mode (batch statistics) or eval mode after a
#: training-mode pass updated BatchNorm's running statistics (measured <= 1.1e-5 and 1.4e-5, the same network).
#: float64: the expansion is exact up to rounding (measured <= 1.7e-14), so the differences above are float32's.
TOLERANCE = 1e-5
TRAIN_TOLERANCE = 3e-5
FLOAT64_TOLERANCE = 1e-12


def randomise(model: nn.Module, seed: int = 0) -> nn.Module:
    """Give every parameter and norm statistic non-trivial values, as training would (so no path is silent)."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in list(model.named_parameters()) + list(model.named_buffers()):
            if not tensor.is_floating_point():
                continue
            if name.endswith("running_var"):
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            else:
                tensor.add_(0.2 * torch.randn(tensor.shape, generator=generator))
    return model.eval()


def assert_lossless(model: nn.Module, inputs: tuple, width_mult: float, depth_add: int = 0) -> nn.Module:
    expanded, report = expand_model(model, inputs, width_mult, depth_add, seed=1)
    absolute, relative = compare_outputs(model, expanded, inputs)
    assert relative <= TOLERANCE, (width_mult, depth_add, absolute, relative)
    assert report.parameters_after > report.parameters_before
    return expanded


class Residual2d(nn.Module):
    """conv-norm-act twice with a residual add, a transposed conv, a skip concatenation and a pooled linear head."""

    def __init__(self, norm: str) -> None:
        super().__init__()

        def make_norm(channels: int) -> nn.Module:
            return {"batch": nn.BatchNorm2d(channels), "instance": nn.InstanceNorm2d(channels),
                    "instance_affine": nn.InstanceNorm2d(channels, affine=True, track_running_stats=True),
                    "group": nn.GroupNorm(4, channels)}[norm]

        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.body = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), make_norm(8), nn.PReLU(8),
                                  nn.Conv2d(8, 8, 3, padding=1), make_norm(8))
        self.down = nn.Conv2d(8, 12, 3, stride=2, padding=1)
        self.up = nn.ConvTranspose2d(12, 8, 2, stride=2)
        self.fuse = nn.Conv2d(16, 8, 1)  # reads the concatenation [up, skip]
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        skip = F.relu(self.stem(x))
        skip = F.relu(skip + self.body(skip))
        y = self.fuse(torch.cat([self.up(F.relu(self.down(skip))), skip], dim=1))
        return self.head(y.mean(dim=(2, 3))), y


class Volumetric(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv3d(1, 6, 3, padding=1), nn.BatchNorm3d(6), nn.ReLU(),
                                 nn.ConvTranspose3d(6, 4, 3, padding=1), nn.InstanceNorm3d(4), nn.ReLU(),
                                 nn.Conv3d(4, 2, 1))

    def forward(self, x):
        return self.net(x)


class Signal(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Conv1d(2, 6, 5, padding=2), nn.GroupNorm(3, 6), nn.ReLU(), nn.Conv1d(6, 3, 1))

    def forward(self, x):
        return self.net(x)


class TokenMLP(nn.Module):
    """Pre-LN transformer-style MLP block on (B, N, D) tokens: Linear on the last dim, LayerNorm, residual."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(4, 8), nn.LayerNorm(8)
        self.fc1, self.fc2, self.out = nn.Linear(8, 16), nn.Linear(16, 8), nn.Linear(8, 3)

    def forward(self, x):
        h = self.embed(x)
        h = h + self.fc2(F.gelu(self.fc1(self.norm(h))))
        return self.out(h)


@pytest.mark.parametrize("norm", ["batch", "instance", "instance_affine", "group"])
@pytest.mark.parametrize("width_mult", [2.0, 1.5, 1.3])
def test_conv_norm_residual_concat_linear_are_lossless(norm, width_mult):
    model = randomise(Residual2d(norm))
    inputs = (torch.randn(2, 3, 16, 16),)
    assert_lossless(model, inputs, width_mult)
    expanded, _ = expand_model(model, inputs, width_mult, seed=1)
    model.train(), expanded.train()  # batch statistics: copies and zero channels keep them exact too
    with torch.no_grad():
        assert torch.allclose(model(*inputs)[1], expanded(*inputs)[1], atol=1e-5)


@pytest.mark.parametrize("width_mult", [2.0, 2.5])
def test_conv3d_transposed_3d_and_conv1d_groupnorm_are_lossless(width_mult):
    assert_lossless(randomise(Volumetric()), (torch.randn(2, 1, 8, 8, 8),), width_mult)
    assert_lossless(randomise(Signal()), (torch.randn(2, 2, 32),), width_mult)


def test_linear_layernorm_are_lossless_in_whole_copies():
    model = randomise(TokenMLP())
    inputs = (torch.randn(2, 7, 4),)
    assert assert_lossless(model, inputs, 2.0).norm.normalized_shape == (16,)
    assert assert_lossless(model, inputs, 3.0).norm.normalized_shape == (24,)
    # a LayerNorm's mean over zero channels would change: its space is rounded up to whole copies
    expanded = assert_lossless(model, inputs, 1.5)
    assert expanded.norm.normalized_shape == (16,) and expanded.fc1.out_features == 24


ZOO_ARCHITECTURES = {
    "recistnet_light": lambda: (RecistNet(9, "light", 16, 32), (torch.randn(2, 9, 64, 64),)),
    "recistnet_resnet34_fpn": lambda: (RecistNet(3, "resnet34_fpn", 8, 16), (torch.randn(2, 3, 64, 64),)),
    "template_seg": lambda: (TemplateSegNet(2, 1, 5, (8, 16, 32, 64)),
                             (torch.randn(2, 1, 32, 32), torch.cat([torch.randn(1, 1, 32, 32),
                                                                    (torch.rand(1, 5, 32, 32) > 0.6).float()], 1))),
    "unet_baseline": lambda: (unet_baseline(2, 1, 6, 60000, tolerance=0.5), (torch.randn(2, 1, 32, 32),)),
}


@pytest.mark.parametrize("architecture", sorted(ZOO_ARCHITECTURES))
@pytest.mark.parametrize("width_mult,depth_add", [(2.0, 0), (1.5, 1), (1.25, 2)])
def test_zoo_architectures_expand_losslessly(architecture, width_mult, depth_add):
    torch.manual_seed(0)
    model, inputs = ZOO_ARCHITECTURES[architecture]()
    expanded = assert_lossless(randomise(model), inputs, width_mult, depth_add)
    if depth_add:
        assert len(list(expanded.modules())) > len(list(model.modules()))


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("architecture", sorted(ZOO_ARCHITECTURES))
@pytest.mark.parametrize("width_mult,depth_add", [(2.0, 0), (1.5, 1), (1.25, 2)])
def test_zoo_architectures_expand_losslessly_in_training_mode(architecture, width_mult, depth_add, dtype):
    """Training mode too: norms then use the batch's statistics, which the copies of a channel share and zero
    channels keep at zero, and the identity blocks' zeroed norms stay silent. The training-mode pass updates the
    BatchNorms' running statistics of both models; eval mode still agrees afterwards. In float64 the outputs agree
    to rounding in every mode, so what float32 shows (TOLERANCE, TRAIN_TOLERANCE) is float32 rounding."""
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)  # the models, the inputs and the expansion's new layers
    try:
        torch.manual_seed(0)
        model, inputs = ZOO_ARCHITECTURES[architecture]()
        model = randomise(model)
        expanded, _ = expand_model(model, inputs, width_mult, depth_add, seed=1)
        assert next(expanded.parameters()).dtype == dtype
        before = compare_outputs(model, expanded, inputs)[1]
        training = compare_outputs(model, expanded, inputs, training=True)[1]
        after = compare_outputs(model, expanded, inputs)[1]
    finally:
        torch.set_default_dtype(default)
    batch_norms = [m for net in (model, expanded) for m in net.modules() if isinstance(m, nn.BatchNorm2d)]
    assert all(int(m.num_batches_tracked) == 1 for m in batch_norms)  # the training-mode pass updated them
    assert bool(batch_norms) == (architecture == "recistnet_resnet34_fpn")  # the others have instance/group norms
    single = FLOAT64_TOLERANCE if dtype == torch.float64 else TOLERANCE
    double = FLOAT64_TOLERANCE if dtype == torch.float64 else TRAIN_TOLERANCE
    assert before <= single and training <= double and after <= double, (before, training, after)


def test_expanded_model_trains_and_copies_diverge():
    torch.manual_seed(0)
    model = randomise(TemplateSegNet(2, 1, 2, (8, 16, 32), (2, 2)))
    image = torch.randn(4, 1, 32, 32)
    template = torch.cat([torch.randn(1, 1, 32, 32), (torch.rand(1, 2, 32, 32) > 0.5).float()], 1)
    target = (image[:, 0] > 0.3).long() + (image[:, 0] > 1.0).long()
    expanded, _ = expand_model(model, (image, template), 2.0, 1, seed=3)
    captured = {}
    layer = expanded.image_encoder.stem.conv
    layer.register_forward_hook(lambda module, args, output: captured.__setitem__("out", output.detach()))
    expanded.train()
    optimizer = torch.optim.Adam(expanded.parameters(), lr=3e-3)
    losses = []
    for _ in range(25):
        loss = F.cross_entropy(expanded(image, template), target)
        optimizer.zero_grad(), loss.backward(), optimizer.step()
        losses.append(loss.item())
        if len(losses) == 1:
            first = captured["out"]
            assert torch.allclose(first[:, :8], first[:, 8:16], atol=1e-6)  # copies are equal at the start
    assert losses[-1] < 0.7 * losses[0], losses
    with torch.no_grad():
        expanded(image, template)
    assert (captured["out"][:, :8] - captured["out"][:, 8:16]).abs().max() > 1e-3  # ... and diverge


def test_layers_that_cannot_be_expanded_are_named():
    class WithAttention(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.attention = nn.MultiheadAttention(8, 2, batch_first=True)

        def forward(self, x):
            h = self.proj(x)
            return self.attention(h, h, h)[0]

    with pytest.raises(UnsupportedLayerError, match=r"layer attention \(MultiheadAttention\)"):
        expand_model(WithAttention(), (torch.randn(2, 3, 4),), 2.0)
    grouped = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(8, 8, 3, groups=4), nn.Conv2d(8, 2, 1))
    with pytest.raises(UnsupportedLayerError, match=r"layer 1 \(Conv2d\) is a grouped convolution"):
        expand_model(grouped, (torch.randn(1, 4, 12, 12),), 2.0)
    with pytest.raises(ValueError, match="width_mult must be >= 1"):
        expand_model(Signal(), (torch.randn(1, 2, 8),), 0.5)


def test_lemon_schedule_decays_faster_at_the_same_peak():
    from ctzoo.scaling.zoo_expand import ExpansionInit, lemon_optim

    scratch = OptimConfig(epochs=10, lr=1e-3, warmup_epochs=1)
    assert lemon_optim(scratch, ExpansionInit(checkpoint="x.pt")).warmup_epochs == 1  # the config's
    lemon = lemon_optim(scratch, ExpansionInit(checkpoint="x.pt", decay_fraction=0.5, warmup_epochs=0))
    assert lemon.lr == scratch.lr and lemon.warmup_epochs == 0 and lemon.decay_epochs == 5
    assert lr_factor(0.0, lemon) == pytest.approx(1.0)  # epochs done
    assert lr_factor(5.0, lemon) == pytest.approx(lemon.final_lr_ratio)
    assert lr_factor(8.0, lemon) == pytest.approx(lemon.final_lr_ratio)
    assert lr_factor(5.0, scratch) > 0.4
    assert lemon_optim(scratch, ExpansionInit(checkpoint="x.pt", lemon_schedule=False)) is scratch


def test_ctzoo_expand_zoo_models_checks_on_real_ct_and_reloads(tmp_path):
    from click.testing import CliRunner

    from ctzoo.cli import main
    from ctzoo.models import create_model, load_bundle
    from ctzoo.scaling.zoo_expand import load_expanded

    for name, width, depth in (("recistnet-mini", "1.5", "1"), ("template-seg-abdomen", "2", "0")):
        result = CliRunner().invoke(main, ["expand", name, "--width-mult", width, "--depth-add", depth,
                                           "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        assert "real_ct" in result.output and "random" in result.output
        model, meta = load_expanded(tmp_path / name / "expanded.pt")
        assert meta["checks"]["real_ct"]["max_rel_diff"] <= TOLERANCE
        assert meta["report"]["parameters_after"] == sum(p.numel() for p in model.parameters())
        original = create_model(name, pretrained=True).eval()
        inputs = ((torch.randn(1, 9, 64, 64),) if name == "recistnet-mini" else
                  (torch.randn(1, 1, 128, 128), torch.cat([torch.randn(1, 1, 128, 128),
                                                           torch.ones(1, 5, 128, 128) / 2], 1)))
        assert compare_outputs(original, model, inputs)[1] <= TOLERANCE  # the reloaded model, fresh inputs
        # and as a bundle, which every path takes: the same network rebuilt from bundle.json and its weights
        bundle = load_bundle(tmp_path / name / "bundle")
        assert bundle.name == f"{name}-expanded"
        assert bundle.network_def.expansion["expansion"]["depth_add"] == int(depth)
        assert bundle.card.parameters == meta["report"]["parameters_after"]
        assert compare_outputs(original, bundle.network(), inputs)[1] <= TOLERANCE
        if name == "template-seg-abdomen":
            source = load_bundle(name)
            assert bundle.template_bank is not None and bundle.class_names == source.class_names
            # its templates embedded by the expanded network (the source's embeddings are narrower): each slice
            # gets the template the source model chooses
            slices = torch.cat([source.template_bank.images, torch.randn(4, 1, 128, 128)])
            chosen = bundle.template_bank.nearest(bundle.network(), slices)
            assert torch.equal(chosen, source.template_bank.nearest(source.network(), slices))
        # a bundle expanded by the earlier method (no "method" recorded) names why it cannot be rebuilt
        record = json.loads((tmp_path / name / "bundle" / "bundle.json").read_text())
        del record["network"]["expansion"]["expansion"]["method"]
        (tmp_path / name / "bundle" / "bundle.json").write_text(json.dumps(record))
        with pytest.raises(ValueError, match="expanded by an earlier ctzoo .*expand the source again"):
            load_bundle(tmp_path / name / "bundle").network()
    bad = CliRunner().invoke(main, ["expand", str(tmp_path / "nope.pt"), "--out", str(tmp_path / "x")])
    assert bad.exit_code != 0 and "neither a zoo model" in bad.output


@pytest.fixture(scope="module")
def mini(small_deeplesion_mini):
    return small_deeplesion_mini


def test_train_continues_from_an_expanded_checkpoint(mini, tmp_path):
    import yaml
    from click.testing import CliRunner

    from ctzoo.cli import main

    config = {"task": "recistnet", "data": {"root": str(mini), "negatives_per_series": 1},
              "model": {"backbone": "light", "width": 8, "head_channels": 16},
              "optim": {"epochs": 1, "batch_size": 4, "lr": 0.004, "num_workers": 0},
              "train_size": [128, 128], "eval_size": [512, 512]}  # whole slices: a 256 crop can cut val's lesions away
    (tmp_path / "small.yaml").write_text(yaml.safe_dump(config))
    runner = CliRunner()
    assert runner.invoke(main, ["train", str(tmp_path / "small.yaml"), "--out", str(tmp_path / "small")]).exit_code == 0
    result = runner.invoke(main, ["expand", str(tmp_path / "small" / "last.pt"), "--width-mult", "2",
                                  "--depth-add", "1", "--out", str(tmp_path / "grown")])
    assert result.exit_code == 0, result.output
    config["optim"]["epochs"] = 2
    config["init_from_expansion"] = {"checkpoint": str(tmp_path / "grown" / "expanded.pt"), "decay_fraction": 0.5}
    (tmp_path / "grown.yaml").write_text(yaml.safe_dump(config))
    result = runner.invoke(main, ["train", str(tmp_path / "grown.yaml"), "--out", str(tmp_path / "large")])
    assert result.exit_code == 0, result.output
    state = torch.load(tmp_path / "large" / "last.pt", weights_only=False)
    grown = torch.load(tmp_path / "grown" / "expanded.pt", weights_only=False)
    assert {k: v.shape for k, v in state["model"].items()} == {k: v.shape for k, v in grown["model"].items()}
    assert state["config"]["decay_epochs"] == 1.0 and state["config"]["warmup_epochs"] == 1.0
    rows = (tmp_path / "large" / "metrics.csv").read_text().splitlines()
    lr_last = float(rows[-1].split(",")[rows[0].split(",").index("lr")])
    assert lr_last == pytest.approx(0.004 * 0.01)  # decayed by half-way, then held (LEMON's faster decay)
    assert "expanded_from" in state  # so eval and export rebuild the grown network without expanded.pt:
    (tmp_path / "grown" / "expanded.pt").unlink()
    result = runner.invoke(main, ["eval", str(tmp_path / "grown.yaml"), "--checkpoint", str(tmp_path / "large" /
                                  "last.pt"), "--split", "val", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "eval" / "froc.json").exists()


def test_template_segmenter_trains_from_an_expanded_checkpoint(fetched_samples, tmp_path):
    from ctzoo.scaling.zoo_expand import ExpansionInit, expand_source, load_source_model, save_expanded
    from ctzoo.training.seg_evaluation import CONDITIONS
    from ctzoo.training.template_seg_task import load_seg_config, train_with_baseline

    source = load_source_model("template-seg-abdomen")
    expanded, report, checks = expand_source(source, 1.5, 0)
    save_expanded(tmp_path / "expanded.pt", source, expanded, report, 0, checks)
    cfg = load_seg_config("configs/template_seg_abdomen.yaml")
    cfg = cfg.model_copy(update={
        "baseline_unet": False, "repeats": 1,
        # a quarter of the recipe's pixels: the expanded weights fit any grid (a fully convolutional network)
        "data": cfg.data.model_copy(update={"spacing_mm": 6.0, "size": (64, 64), "max_templates": 16}),
        "optim": cfg.optim.model_copy(update={"epochs": 1}),
        "init_from_expansion": ExpansionInit(checkpoint=tmp_path / "expanded.pt")})
    # the clean condition only: the robustness conditions are tested by tests/test_template_seg_cli.py
    comparison = train_with_baseline(cfg, tmp_path / "run", device="cpu", progress=False,
                                     conditions={"clean": CONDITIONS["clean"]})
    state = torch.load(tmp_path / "run" / "template_seg" / "last.pt", weights_only=False)
    assert state["expanded_from"]["expansion"]["width_mult"] == 1.5
    # the stem's 16 channels feed the cosine attention and a parameter-free InstanceNorm: whole copies (x2)
    assert state["model"]["image_encoder.stem.conv.weight"].shape[0] == 32
    assert state["model"]["image_encoder.levels.0.conv.unit0.conv.weight"].shape[0] == 24  # x1.5 inside blocks
    assert comparison  # the test-set comparison ran on the reloaded (expanded) best checkpoint


def test_ctzoo_expand_a_unet_baseline_checkpoint(tmp_path):
    """The same-budget UNet of a template-segmenter run (RUN/unet/best.pt) expands and checks on real CT."""
    from click.testing import CliRunner

    from ctzoo.cli import main
    from ctzoo.training.template_seg_task import TemplateSegTrainConfig, build_seg_model, checkpoint_state

    cfg = TemplateSegTrainConfig.model_validate({"model": {"kind": "unet", "channels": [8, 16, 32, 64]}})
    names = ["liver", "spleen", "stomach", "aorta", "vertebrae"]
    model = randomise(build_seg_model(cfg.model, len(names)))
    torch.save({"model": model.state_dict(), "epoch": 0, **checkpoint_state(cfg, names)}, tmp_path / "best.pt")
    result = CliRunner().invoke(main, ["expand", str(tmp_path / "best.pt"), "--width-mult", "1.5", "--depth-add", "1",
                                       "--out", str(tmp_path / "grown")])
    assert result.exit_code == 0, result.output
    assert "real_ct" in result.output and "checkpoint" in result.output


@pytest.fixture(scope="module")
def expanded_bundle(tmp_path_factory):
    """recistnet-mini expanded x1.5 +1 as a model bundle."""
    from ctzoo.scaling.zoo_expand import expand_source, load_source_model, save_expanded_bundle

    source = load_source_model("recistnet-mini")
    expanded, report, _ = expand_source(source, 1.5, 1)
    return save_expanded_bundle(tmp_path_factory.mktemp("expanded") / "bundle", "recistnet-mini", expanded, report,
                                0, source)


def test_an_expanded_bundle_loads_in_a_process_that_never_imported_the_expansion(expanded_bundle):
    """serve, infer and MONAI's runner only load the bundle: the LEMON rebuilder is found by its kind."""
    import subprocess
    import sys

    code = ("import sys; from ctzoo.models.bundle import load_bundle; "
            "assert 'ctzoo.scaling.zoo_expand' not in sys.modules; "
            "net = load_bundle(sys.argv[1]).network(); print(sum(p.numel() for p in net.parameters()))")
    run = subprocess.run([sys.executable, "-c", code, str(expanded_bundle)], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    from ctzoo.models import load_bundle

    assert int(run.stdout.split()[-1]) == load_bundle(expanded_bundle).card.parameters


def _sgd_steps(model: nn.Module, inputs: tuple, steps: int) -> dict[str, torch.Tensor]:
    """``steps`` SGD steps in training mode; which parameter entries never changed."""
    model.train()
    start = {n: p.detach().clone() for n, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-2)
    for _ in range(steps):
        outputs = model(*inputs)
        loss = sum((o - 0.3).pow(2).mean() for o in (outputs.values() if isinstance(outputs, dict) else [outputs]))
        optimizer.zero_grad(), loss.backward(), optimizer.step()
    return {n: p.detach() == start[n] for n, p in model.named_parameters()}


def test_the_parameters_an_expansion_adds_all_train():
    """Extra channels are circular copies and identity blocks end in a zeroed norm without a ReLU after it, so no
    added parameter sits behind a ReLU at exactly 0 (whose gradient is 0, for ever): after a few SGD steps only
    what the source's own inactive ReLU units hold still (measured 3.7 % of the added count, before: 70 %)."""
    from ctzoo.scaling.zoo_expand import load_source_model

    source = load_source_model("recistnet-mini")
    expanded, report = expand_model(source.model, source.example_inputs, 1.5, 1, seed=0)
    unchanged = _sgd_steps(expanded, source.real_inputs, 4)  # slices of the sample CT
    added = report.parameters_after - report.parameters_before
    assert sum(int(u.sum()) for u in unchanged.values()) < 0.05 * added
    identity_blocks = [n for n in unchanged if ".1.conv." in n and "stages" in n]
    assert identity_blocks and all(not unchanged[n].all() for n in identity_blocks)


def test_a_non_integer_ratio_keeps_the_template_segmenter_on_its_first_step():
    """Channels that the cosine attention reads are zero-extended, but not where a norm without parameters
    follows (norm(eps * x) would be of order 1 after one step): there the space grows by whole copies. One small
    AdamW step moves x1.5's output about as far as the source's."""
    import copy

    from ctzoo.models import create_model
    from ctzoo.scaling.zoo_expand import _example_inputs

    source = create_model("template-seg-abdomen", pretrained=True).eval()
    inputs = _example_inputs(source, torch.Generator().manual_seed(0))

    def step_change(model: nn.Module) -> float:
        model = copy.deepcopy(model).train()
        with torch.no_grad():
            before = model(*inputs)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=1e-4)
        F.cross_entropy(model(*inputs), before.argmax(1)).backward()
        optimizer.step()
        with torch.no_grad():
            return float((model(*inputs) - before).abs().max() / before.abs().max())

    expanded, _ = expand_model(source, inputs, 1.5, 0, seed=0)
    assert step_change(expanded) < 4 * step_change(source)
