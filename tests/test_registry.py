"""The model registry: build, publish (save_pretrained) and load back offline, with model cards and the CLI."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import click
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner
from pydantic import ValidationError
from torch import nn

import ctzoo.models
from ctzoo.cli.zoo import zoo
from ctzoo.models import (
    ArchitectureOverrideError,
    ModelCard,
    UnknownModelError,
    WeightsMismatchError,
    create_model,
    list_models,
    load_card,
    model_entry,
    model_input_spec,
    model_version,
    register_model,
    save_pretrained,
    unregister_model,
)

NAME = "test-tiny-net"
CONFIG = {"in_channels": 1, "width": 4, "out_channels": 2, "dropout": 0.0}


def tiny_net(in_channels: int, width: int, out_channels: int, dropout: float) -> nn.Module:
    """A real (tiny) segmentation-style network with parameters and BatchNorm buffers."""
    return nn.Sequential(nn.Conv2d(in_channels, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU(),
                         nn.Dropout(dropout), nn.Conv2d(width, out_channels, 1))


@pytest.fixture
def entry(tmp_path: Path):
    registered = register_model(NAME, builder=tiny_net, default_config=CONFIG, task="segmentation",
                                description="A tiny test network.", weights_dir=tmp_path / "weights" / NAME,
                                input_spec={"channels": 1, "spacing_mm": 0.8, "window_hu": [-1024, 3071],
                                            "size_multiple": 1})
    yield registered
    unregister_model(NAME)


def make_card(model: nn.Module, version: str = "1.0.0") -> ModelCard:
    return ModelCard(
        name=NAME, version=version, task="segmentation", description="A tiny test network.",
        architecture="Conv-BN-ReLU-Conv", parameters=sum(p.numel() for p in model.parameters()),
        input_spec={"channels": 1, "spacing_mm": 0.8, "window_hu": [-1024, 3071]},
        training={"data": "random tensors (test)", "config_file": "configs/none.yaml",
                  "command": "pytest tests/test_registry.py", "device": "cpu", "epochs": 1, "wall_time_s": 3725.0},
        metrics={"dice": {"value": 0.81234, "split": "val"}, "hd95_mm": {"value": 4.5, "split": "test"}},
        limitations=["Trained on random tensors | not for use."], licence="Apache-2.0", created=date(2025, 1, 2))


def trained_model() -> nn.Module:
    """A model whose weights and BatchNorm statistics differ from a fresh build."""
    torch.manual_seed(0)
    model = create_model(NAME)
    model.train()
    with torch.no_grad():
        model(torch.randn(4, 1, 8, 8) * 3 + 1)  # moves the running statistics away from their defaults
        for p in model.parameters():
            p.add_(torch.randn_like(p))
    return model


def test_register_list_and_build(entry) -> None:
    assert NAME in list_models() and list_models("test-tiny*") == [NAME] and list_models("zzz*") == []
    assert model_entry(NAME) is entry and not entry.has_weights
    model = create_model(NAME, width=6)
    assert model[0].weight.shape == (6, 1, 3, 3)
    assert create_model(NAME)(torch.zeros(1, 1, 8, 8)).shape == (1, 2, 8, 8)
    with pytest.raises(ValueError, match="already registered"):
        register_model(NAME, builder=tiny_net, default_config=CONFIG, task="segmentation", description="",
                       input_spec={})
    with pytest.raises(ValueError, match="task"):
        register_model("test-other", builder=tiny_net, default_config=CONFIG, task="classification",
                       description="", input_spec={})
    with pytest.raises(ValueError, match="lower-case"):
        register_model("Test Net", builder=tiny_net, default_config=CONFIG, task="segmentation", description="",
                       input_spec={})


def test_decorator_form_and_package_weights_dir() -> None:
    @register_model("test-decorated", default_config=CONFIG, task="detection", description="d", input_spec={})
    def build(**config: object) -> nn.Module:
        return tiny_net(**config)  # type: ignore[arg-type]

    try:
        assert callable(build) and isinstance(create_model("test-decorated"), nn.Sequential)
        # shipped weights are looked for inside the installed package, never anywhere else
        package = Path(ctzoo.models.__file__).parent
        assert model_entry("test-decorated").weights_dir == package / "weights" / "test-decorated"
    finally:
        unregister_model("test-decorated")
    assert "test-decorated" not in list_models()


def test_save_pretrained_round_trip(entry) -> None:
    model = trained_model()
    card = make_card(model)
    folder = save_pretrained(model, NAME, CONFIG, card)
    assert folder == entry.weights_dir and entry.has_weights
    assert sorted(p.name for p in folder.iterdir()) == ["MODEL_CARD.md", "bundle.json", "card.json", "config.json",
                                                        "model.safetensors"]
    assert json.loads((folder / "config.json").read_text()) == CONFIG
    record = json.loads((folder / "bundle.json").read_text())  # built by its registered builder: no network
    assert record["network"] is None and list(record["sha256"]) == ["model.safetensors"]
    loaded = create_model(NAME, pretrained=True)
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():
        assert torch.equal(model.eval()(x), loaded.eval()(x))
    assert load_card(NAME) == card and model_version(NAME) == "1.0.0"
    assert create_model(NAME, pretrained=True, dropout=0.0)[3].p == 0.0  # the trained config's own value


def test_an_override_that_changes_what_the_pretrained_network_computes_needs_an_opt_in(entry) -> None:
    """Overrides that keep every weight's shape still change the network the weights were trained for: refused with
    pretrained=True unless allow_overrides=True."""
    model = trained_model()
    save_pretrained(model, NAME, CONFIG, make_card(model))
    with pytest.raises(ArchitectureOverrideError, match=r"\{'dropout': 0.5\} differ .*\{'dropout': 0.0\} in .*"
                                                        "allow_overrides=True"):
        create_model(NAME, pretrained=True, dropout=0.5)
    assert create_model(NAME, pretrained=True, allow_overrides=True, dropout=0.5)[3].p == 0.5
    with pytest.raises(ArchitectureOverrideError, match="change the architecture"):
        create_model(NAME, pretrained=True, allow_overrides=True, width=8)  # the weights cannot load at all
    with pytest.raises(ArchitectureOverrideError, match="'gate': 'sigmoid'"):
        create_model("template-seg-abdomen", pretrained=True, gate="sigmoid")  # same shapes, other logits


def test_input_spec_comes_from_the_shipped_card(entry) -> None:
    assert model_input_spec(NAME)["spacing_mm"] == 0.8 and model_input_spec(NAME)["size_multiple"] == 1
    model = trained_model()
    card = make_card(model).model_copy(update={"input_spec": {"channels": 1, "spacing_mm": 1.5}})
    save_pretrained(model, NAME, CONFIG, card)
    assert model_input_spec(NAME) == {"channels": 1, "spacing_mm": 1.5}  # the weights' own preprocessing


def test_pretrained_uses_the_trained_config_not_the_defaults(entry) -> None:
    config = {**CONFIG, "width": 3}
    model = tiny_net(**config)
    save_pretrained(model, NAME, config, make_card(model))
    assert create_model(NAME, pretrained=True)[0].weight.shape == (3, 1, 3, 3)


def test_shape_changing_override_is_refused(entry) -> None:
    model = trained_model()
    save_pretrained(model, NAME, CONFIG, make_card(model))
    with pytest.raises(ArchitectureOverrideError, match="'width': 8") as info:
        create_model(NAME, pretrained=True, width=8)
    assert "0.weight" in str(info.value) and "pretrained=False" in str(info.value)
    assert create_model(NAME, pretrained=False, width=8)[0].weight.shape == (8, 1, 3, 3)


def test_strict_key_mismatch_names_the_keys(entry) -> None:
    model = trained_model()
    folder = save_pretrained(model, NAME, CONFIG, make_card(model))
    state = safetensors.torch.load_file(folder / "model.safetensors")
    del state["1.running_var"]
    state["head.extra"] = torch.zeros(2)
    state["4.bias"] = torch.zeros(5)
    safetensors.torch.save_file(state, str(folder / "model.safetensors"))
    record = json.loads((folder / "bundle.json").read_text())
    (folder / "bundle.json").write_text(json.dumps({**record, "sha256": {}}))  # as saved before digests were kept
    with pytest.raises(WeightsMismatchError) as info:
        create_model(NAME, pretrained=True)
    message = str(info.value)
    assert "missing keys: 1.running_var" in message and "unexpected keys: head.extra" in message
    assert "4.bias (weights (5,), model (2,))" in message


def test_no_weights_shipped(entry) -> None:
    with pytest.raises(FileNotFoundError, match="no weights are shipped"):
        create_model(NAME, pretrained=True)
    with pytest.raises(FileNotFoundError, match="no weights are shipped"):
        load_card(NAME)


def test_unknown_name_lists_close_matches(entry) -> None:
    with pytest.raises(KeyError) as info:
        create_model("test-tiny-nett")
    assert isinstance(info.value, UnknownModelError)
    assert f"Did you mean {NAME}?" in str(info.value) and "Known models:" in str(info.value)
    with pytest.raises(UnknownModelError, match="Known models"):
        load_card("zzzz")


def test_save_refuses_inconsistent_card_or_config(entry, tmp_path: Path) -> None:
    model = trained_model()
    with pytest.raises(ValueError, match="parameters"):
        save_pretrained(model, NAME, CONFIG, make_card(model).model_copy(update={"parameters": 1}))
    with pytest.raises(ValueError, match="does not rebuild"):
        save_pretrained(model, NAME, {**CONFIG, "width": 8}, make_card(model))
    with pytest.raises(ValueError, match="card is for"):
        save_pretrained(model, NAME, CONFIG, make_card(model).model_copy(update={"name": "other"}))
    with pytest.raises(ValueError, match="registered as 'segmentation'"):
        save_pretrained(model, NAME, CONFIG, make_card(model).model_copy(update={"task": "detection"}))
    assert not entry.weights_dir.exists()
    assert save_pretrained(model, tmp_path / "elsewhere", CONFIG, make_card(model)) == tmp_path / "elsewhere"


def test_atomic_save_leaves_no_partial_folder(entry, monkeypatch) -> None:
    model = trained_model()

    def broken_save(*args: object, **kwargs: object) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError, match="disk full"):
        save_pretrained(model, NAME, CONFIG, make_card(model))
    parent = entry.weights_dir.parent
    assert list(parent.iterdir()) == []  # neither the target nor a temporary folder
    monkeypatch.undo()
    save_pretrained(model, NAME, CONFIG, make_card(model, "1.0.0"))
    monkeypatch.setattr(safetensors.torch, "save_file", broken_save)
    with pytest.raises(OSError):
        save_pretrained(model, NAME, CONFIG, make_card(model, "2.0.0"))
    assert [p.name for p in parent.iterdir()] == [NAME] and model_version(NAME) == "1.0.0"
    monkeypatch.undo()
    save_pretrained(model, NAME, CONFIG, make_card(model, "2.0.0"))  # replacing a published version
    assert [p.name for p in parent.iterdir()] == [NAME] and model_version(NAME) == "2.0.0"


def test_card_is_strict_and_renders_markdown() -> None:
    card = make_card(tiny_net(**CONFIG))
    with pytest.raises(ValidationError):
        ModelCard.model_validate({**card.model_dump(), "version": "1.0"})  # not semver
    with pytest.raises(ValidationError):
        ModelCard.model_validate({**card.model_dump(), "parameters": "42"})
    with pytest.raises(ValidationError):
        ModelCard.model_validate({**card.model_dump(), "unknown_field": 1})
    assert ModelCard.model_validate_json(card.model_dump_json()) == card
    text = card.to_markdown()
    for heading in ("Intended use", "Inputs", "Training", "Metrics", "Limitations", "How to reproduce", "Licence"):
        assert f"\n## {heading}\n" in text
    assert "| Metric | Split | Value |\n| --- | --- | --- |\n| dice | val | 0.8123 |\n| hd95_mm | test | 4.5 |" in text
    assert "| window_hu | [-1024, 3071] |" in text and "| Wall time | 1:02:05 (h:mm:ss) |" in text
    assert "- Trained on random tensors | not for use." in text and "pytest tests/test_registry.py" in text


def test_cli_list_and_show(entry) -> None:
    cli = click.Group("ctzoo", commands={"zoo": zoo})
    runner = CliRunner()
    for args in (["zoo", "--help"], ["zoo", "list", "--help"], ["zoo", "show", "--help"]):
        assert runner.invoke(cli, args).exit_code == 0
    result = runner.invoke(cli, ["zoo", "list", "test-*"])
    assert result.exit_code == 0, result.output
    assert result.output.split("\n")[0].split() == ["NAME", "TASK", "PARAMETERS", "WEIGHTS", "VERSION"]
    assert result.output.split("\n")[1].split() == [NAME, "segmentation", "-", "no", "-"]
    result = runner.invoke(cli, ["zoo", "show", NAME])
    assert result.exit_code == 0 and "no weights are shipped yet" in result.output

    model = trained_model()
    save_pretrained(model, NAME, CONFIG, make_card(model, "1.2.0"))
    result = runner.invoke(cli, ["zoo", "list", "test-*"])
    assert result.output.split("\n")[1].split() == [NAME, "segmentation", "58", "yes", "1.2.0"]
    listed = json.loads(runner.invoke(cli, ["zoo", "list", "--json", "test-*"]).output)
    assert listed == [{"name": NAME, "task": "segmentation", "parameters": 58, "weights": True, "version": "1.2.0"}]
    result = runner.invoke(cli, ["zoo", "show", NAME])
    assert result.exit_code == 0 and result.output.startswith(f"# {NAME} 1.2.0") and "| dice | val |" in result.output
    result = runner.invoke(cli, ["zoo", "show", "test-tiny"])
    assert result.exit_code == 1 and f"Did you mean {NAME}?" in result.output


def test_a_detector_reports_at_its_cards_operating_point(sample_volume, tmp_path: Path) -> None:
    """The threshold a detector reports at comes from its card (chosen on val), unless a caller overrides it; a
    card without one falls back to the zoo default."""
    import shutil

    from ctzoo.inference.tasks import model_task, run_task
    from ctzoo.models import load_bundle
    from ctzoo.models.registry import DEFAULT_SCORE_THRESHOLD

    shipped = load_bundle("recistnet-mini")
    point = shipped.card.operating_point
    assert point is not None and point.split.startswith("val") and shipped.score_threshold == point.score_threshold
    assert "## Operating point" in shipped.card.to_markdown()
    folder = tmp_path / "strict"
    shutil.copytree(shipped.folder, folder)
    card = json.loads((folder / "card.json").read_text())
    card["operating_point"]["score_threshold"] = 0.999
    (folder / "card.json").write_text(json.dumps(card))
    strict = load_bundle(folder)
    assert strict.score_threshold == 0.999
    assert run_task(model_task(strict, "torch", "cpu"), sample_volume)["lesions"] == []
    assert run_task(model_task(strict, "torch", "cpu", score_threshold=0.0), sample_volume)["lesions"]
    del card["operating_point"]
    (folder / "card.json").write_text(json.dumps(card))
    assert load_bundle(folder).score_threshold == DEFAULT_SCORE_THRESHOLD


def test_cli_names_an_invalid_card_in_one_line(entry) -> None:
    """A card that fails validation: 'zoo list' marks that model and lists the others, 'zoo show' says why in one
    line; neither ends in a traceback."""
    cli = click.Group("ctzoo", commands={"zoo": zoo})
    model = trained_model()
    folder = save_pretrained(model, NAME, CONFIG, make_card(model))
    card = json.loads((folder / "card.json").read_text())
    (folder / "card.json").write_text(json.dumps({**card, "parameters": str(card["parameters"])}))
    result = CliRunner().invoke(cli, ["zoo", "list"])
    assert result.exit_code == 0, result.output
    assert [NAME, "segmentation", "-", "yes", "invalid", "card"] in [line.split() for line in result.output.split("\n")]
    assert "recistnet-mini" in result.output
    result = CliRunner().invoke(cli, ["zoo", "show", NAME])
    assert result.exit_code == 1 and not isinstance(result.exception, ValueError)
    assert result.output.strip().count("\n") == 0, result.output  # one line, the field and what it holds
    assert "is not a valid model card: parameters: Input should be a valid integer (got '58')" in result.output


def test_cli_show_takes_a_bundle_folder(entry, tmp_path: Path) -> None:
    """'zoo show' takes a bundle folder, as every command taking a model does."""
    cli = click.Group("ctzoo", commands={"zoo": zoo})
    model = trained_model()
    folder = save_pretrained(model, tmp_path / "mine", CONFIG, make_card(model, "1.3.0"))
    result = CliRunner().invoke(cli, ["zoo", "show", str(folder)])
    assert result.exit_code == 0, result.output
    assert result.output.startswith(f"# {NAME} 1.3.0")
    assert json.loads(CliRunner().invoke(cli, ["zoo", "show", "--json", str(folder)]).output)["version"] == "1.3.0"
    for missing, message in ((tmp_path / "nothing", "no model bundle at"), (tmp_path, "card.json is missing")):
        result = CliRunner().invoke(cli, ["zoo", "show", str(missing)])
        assert result.exit_code == 1 and message in result.output and result.exception.__class__ is SystemExit


def test_card_tables_hold_every_cell_and_end_before_the_text_below() -> None:
    """A table ends at a blank line, so the operating point's note is a paragraph, not one more row; a cell holding a
    line break (ctzoo zoo publish --notes "$(cat notes.txt)") stays in its row."""
    from ctzoo.models.registry import OperatingPoint

    card = make_card(tiny_net(**CONFIG))
    training = card.training.model_copy(update={"notes": "Stopped at epoch 95.\nResumed elsewhere | on a GPU."})
    point = OperatingPoint(score_threshold=0.3, fp_per_image=0.25, split="val", note="Chosen on val.")
    lines = card.model_copy(update={"training": training, "operating_point": point}).to_markdown().split("\n")
    for k, line in enumerate(lines):
        if line.startswith("|"):
            assert line.endswith("|") and (lines[k + 1] == "" or lines[k + 1].startswith("|")), line
    assert "| Notes | Stopped at epoch 95.<br>Resumed elsewhere \\| on a GPU. |" in lines
    note = lines.index("Chosen on val.")
    assert lines[note - 1] == "" and lines[note - 2].startswith("| ")


def test_shipped_cards_say_what_data_each_figure_is_on_and_what_the_model_is_for() -> None:
    """Every metric's split names its data (synthetic lesions or real CT); the detector's real-CT figure has a table
    of its own, apart from the synthetic val it was chosen on; the intended use is a use, not the description; and
    MODEL_CARD.md is card.json rendered."""
    for name in list_models():
        card, folder = load_card(name), model_entry(name).weights_dir
        assert (folder / "MODEL_CARD.md").read_text() == card.to_markdown(), f"{name}: MODEL_CARD.md is stale"
        assert all(("synthetic lesions" in m.split) != ("real CT," in m.split) for m in card.metrics.values()), name
        intended = card.to_markdown().split("## Intended use\n\n")[1].split("\n")[0]
        assert intended == card.intended_use and "not for diagnosis" in intended and "Input:" in intended
        assert card.description not in intended
    point = load_card("recistnet-mini").operating_point
    assert "synthetic lesions" in point.split
    section = load_card("recistnet-mini").to_markdown().split("## Operating point\n\n")[1].split("\n## ")[0]
    chosen_on, real_ct = section.split("Real CT without known lesions")
    assert "Sensitivity there" in chosen_on and "without known lesions" not in chosen_on
    assert f"| Findings per slice | {point.lesion_free_findings_per_slice:.3f} |" in real_ct
    assert "Sensitivity" not in real_ct


def test_a_card_without_an_intended_use_says_so() -> None:
    text = make_card(tiny_net(**CONFIG)).to_markdown()
    assert "## Intended use\n\nNot stated on this card: see its limitations.\n" in text
    assert "A tiny test network." in text.split("## Intended use")[0]  # the description, under the title
