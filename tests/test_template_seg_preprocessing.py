"""A template-segmenter checkpoint is scored and published with the preprocessing and the network it was trained with
(its recorded task_config), whatever the eval or publish config says, with a warning naming what differs; with other
data or classes than it was trained on it is refused. A card says what its test cases could not measure."""

import json
import logging
import shutil

import numpy as np
import pytest
import torch
from click.testing import CliRunner

import ctzoo.datasets.segmentation_slices as segmentation_slices
import ctzoo.training.seg_evaluation as seg_evaluation
import ctzoo.training.template_seg_task as template_seg_task
from ctzoo.cli import main
from ctzoo.datasets.segmentation import SegCase
from ctzoo.io import Volume, write_volume
from ctzoo.models.bundle import read_card
from ctzoo.models.seg_networks import build_seg_model
from ctzoo.training.publish import publish_template_seg
from ctzoo.training.template_seg_task import (
    SegData,
    TemplateSegTrainConfig,
    checkpoint_state,
    evaluate_template_seg,
    load_seg_config,
    load_seg_model,
    trained_preprocessing,
)

NAMES = ["a", "b"]
TRAINED = {"spacing_mm": 3.0, "size": [32, 32], "window_hu": [-1000.0, 1000.0]}
#: what an eval or publish config might say instead: another spacing and window, the same size
OTHER = {"spacing_mm": 1.5, "size": [32, 32], "window_hu": [-200.0, 400.0]}
#: the network trained, and what an eval or publish config might say instead: the gate and its temperature hold no
#: weights, so the state dict loads into either
TRAINED_MODEL = {"channels": [8, 16], "gate": "none", "temperature": 5.0}
OTHER_MODEL = {"channels": [8, 16], "gate": "sigmoid", "temperature": 10.0}


def small_case(name: str) -> SegCase:
    hu = np.full((3, 48, 48), -1000, np.float32)
    hu[:, 10:38, 10:38] = 40
    labels = np.zeros(hu.shape, np.uint8)
    labels[:, 15:25, 15:25] = 1
    labels[:, 28:35, 28:35] = 2
    return SegCase(name, Volume(hu, (1.0, 1.0, 3.0)), labels)


@pytest.fixture()
def trained_checkpoint(tmp_path):
    """An (untrained) template segmenter whose checkpoint records TRAINED as its preprocessing."""
    trained = TemplateSegTrainConfig.model_validate({"data": TRAINED, "model": TRAINED_MODEL})
    path = tmp_path / "run" / "template_seg" / "best.pt"
    path.parent.mkdir(parents=True)
    model = build_seg_model(trained.model, len(NAMES))
    torch.save({"model": model.state_dict(), "epoch": 0, **checkpoint_state(trained, NAMES)}, path)
    return path


def other_config() -> TemplateSegTrainConfig:
    return TemplateSegTrainConfig.model_validate({"data": OTHER, "model": OTHER_MODEL})


def small_data() -> SegData:
    return SegData({split: [small_case(split)] for split in ("train", "val", "test")}, NAMES)


def test_the_checkpoints_preprocessing_wins_with_a_warning(trained_checkpoint, caplog):
    with caplog.at_level(logging.WARNING):
        own = trained_preprocessing(other_config(), trained_checkpoint)
    assert own.model_dump(mode="json") == TRAINED
    assert "spacing_mm: 3.0 (config: 1.5); window_hu: [-1000.0, 1000.0] (config: [-200.0, 400.0])" in caplog.text
    caplog.clear()
    same = TemplateSegTrainConfig.model_validate({"data": TRAINED, "model": {"channels": [8, 16]}})
    assert trained_preprocessing(same, trained_checkpoint) == own and not caplog.text


def test_the_checkpoints_network_wins_with_a_warning(trained_checkpoint, caplog):
    with caplog.at_level(logging.WARNING):
        model = load_seg_model(other_config(), trained_checkpoint, len(NAMES))
    assert {(f.gate, f.temperature) for f in model.fusion.values()} == {("none", 5.0)}
    assert "gate: none (config: sigmoid); temperature: 5.0 (config: 10.0)" in caplog.text
    caplog.clear()
    same = TemplateSegTrainConfig.model_validate({"data": OTHER, "model": TRAINED_MODEL})
    load_seg_model(same, trained_checkpoint, len(NAMES))
    assert not caplog.text


def test_ctzoo_eval_scores_with_the_checkpoints_preprocessing_and_records_it(trained_checkpoint, tmp_path,
                                                                              monkeypatch):
    used = []
    resample = seg_evaluation.resample_slices

    def spy(volume, prep, *args, **kwargs):
        used.append(prep.model_dump(mode="json"))
        return resample(volume, prep, *args, **kwargs)

    monkeypatch.setattr(seg_evaluation, "resample_slices", spy)
    metrics = evaluate_template_seg(other_config(), tmp_path / "eval", "test", trained_checkpoint, "cpu",
                                    small_data())
    assert used and all(prep == TRAINED for prep in used)
    assert metrics["preprocessing"] == TRAINED
    assert json.loads((tmp_path / "eval" / "metrics.json").read_text())["preprocessing"] == TRAINED


def test_publish_states_the_preprocessing_the_weights_saw(trained_checkpoint, tmp_path, monkeypatch):
    config = tmp_path / "publish.yaml"
    config.write_text(json.dumps({"task": "template_seg", "data": OTHER, "model": {"channels": [8, 16]}}))
    # the run's template check found no effect (as on the zoo model): the card must say so before anything else
    clean = {"model": "template_seg", "condition": "clean", "dice_a": 0.5, "dice_b": 0.5, "dice_mean": 0.5,
             "hd95_mean": 3.0, "dice_mean_wrong_template": 0.49, "dice_drop_wrong_template": 0.01}
    (tmp_path / "run" / "comparison.json").write_text(json.dumps({"rows": [clean], "test_cases": ["case_b"]}))
    monkeypatch.setattr(template_seg_task, "load_seg_data", lambda data: small_data())
    banked = []
    slices_of = segmentation_slices.case_to_slices
    monkeypatch.setattr(segmentation_slices, "case_to_slices",
                        lambda case, prep: banked.append(prep.model_dump(mode="json")) or slices_of(case, prep))
    folder = publish_template_seg(tmp_path / "run", config, "seg-test", "0.0.1", target=tmp_path / "bundle",
                                  description="a test bundle")
    card = read_card(folder)
    spec = card.input_spec
    assert {k: spec[k] for k in TRAINED} == TRAINED and spec["classes"] == NAMES
    assert "gate='none'" in card.architecture and "temperature=5.0" in card.architecture  # the network trained
    assert json.loads((folder / "config.json").read_text())["gate"] == "none"
    assert banked == [TRAINED]  # the template bank: the training slices as the weights saw them
    assert card.metrics["dice_drop_wrong_template"].value == 0.01
    assert card.limitations[0].startswith("The template has no measurable effect on this model")
    assert "0.490 against 0.500" in card.limitations[0]


def test_eval_refuses_another_training_patient_or_class_order(trained_checkpoint, tmp_path):
    """Another train_patient would cut the templates from the test patient and score the training one; another class
    order would name each organ's Dice after another organ."""
    swapped = TemplateSegTrainConfig.model_validate({"data": {**TRAINED, "train_patient": "sample_ct_dicom"}})
    with pytest.raises(ValueError, match=r'trained on other data or classes than the config gives '
                                         r'\(data.train_patient: "example_ct_sm" → "sample_ct_dicom"\)'):
        evaluate_template_seg(swapped, tmp_path / "eval", "test", trained_checkpoint, "cpu", small_data())
    reordered = SegData(small_data().cases, NAMES[::-1])
    with pytest.raises(ValueError, match=r'\(class_names: \["a", "b"\] → \["b", "a"\]\): give the run\'s own config'):
        evaluate_template_seg(other_config(), tmp_path / "eval", "test", trained_checkpoint, "cpu", reordered)
    with pytest.raises(ValueError, match=r"trained for 2 classes \['a', 'b'\], not 3"):
        load_seg_model(other_config(), trained_checkpoint, 3)
    assert not (tmp_path / "eval").exists()


MSD_CLASSES = ["organa", "organb"]


def write_small_msd(root, count: int = 5):
    """A Medical Segmentation Decathlon folder of ``count`` 8 x 48 x 48 cases (2 x 2 x 3 mm), both organs in each."""
    (root / "imagesTr").mkdir(parents=True)
    (root / "labelsTr").mkdir()
    entries = []
    for i in range(count):
        hu = np.full((8, 48, 48), -1000, np.int16)
        hu[:, 8:40, 8:40] = 40
        labels = np.zeros(hu.shape, np.uint8)
        labels[1:7, 12 + i % 3:24, 12:24] = 1
        labels[1:7, 28:36, 26:36 + i % 3] = 2
        hu[labels > 0] = 100 * labels[labels > 0]
        for array, folder in ((hu, "imagesTr"), (labels, "labelsTr")):
            write_volume(Volume(array, (2.0, 2.0, 3.0)), root / folder / f"case_{i:03d}.nii.gz")
        entries.append({"image": f"./imagesTr/case_{i:03d}.nii.gz", "label": f"./labelsTr/case_{i:03d}.nii.gz"})
    labels = {"0": "background", "1": "organa", "2": "organb"}
    (root / "dataset.json").write_text(json.dumps({"name": "small", "labels": labels, "training": entries}))
    return root


@pytest.fixture()
def msd_run(tmp_path):
    """An (untrained) template segmenter run on a small MSD folder: its config file and its run folder."""
    data = {"source": "msd", "root": str(write_small_msd(tmp_path / "msd")), "spacing_mm": 2.0, "size": [32, 32]}
    config = tmp_path / "run.yaml"
    config.write_text(json.dumps({"task": "template_seg", "data": data, "model": {"channels": [8, 16]}}))
    trained = load_seg_config(config)
    run = tmp_path / "run"
    (run / "template_seg").mkdir(parents=True)
    model = build_seg_model(trained.model, len(MSD_CLASSES))
    torch.save({"model": model.state_dict(), "epoch": 0, **checkpoint_state(trained, MSD_CLASSES)},
               run / "template_seg" / "best.pt")
    return config, run


def cli(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def edited(config, path, **data):
    document = json.loads(config.read_text())
    path.write_text(json.dumps({**document, "data": {**document["data"], **data}}))
    return path


@pytest.mark.parametrize("data, refusal", [
    ({"classes": {"organb": ["organb"], "organa": ["organa"]}}, 'class_names: ["organa", "organb"] → ["organb", '
                                                                '"organa"]'),
    ({"classes": {"organa": ["organa"]}}, 'class_names: ["organa", "organb"] → ["organa"]'),
    ({"classes": {"organa": ["organb"], "organb": ["organa"]}}, 'data.classes.organa: ["organa"] → ["organb"]; '
                                                                'data.classes.organb: ["organb"] → ["organa"]'),
    ({"val_fraction": 0.4}, "data.val_fraction: 0.2 → 0.4")])
def test_ctzoo_eval_and_publish_refuse_other_classes_or_splits(msd_run, tmp_path, data, refusal):
    config, run = msd_run
    other = edited(config, tmp_path / "other.yaml", **data)
    checkpoint = run / "template_seg" / "best.pt"
    for args in (["eval", other, "--checkpoint", checkpoint, "--split", "test", "--out", tmp_path / "eval"],
                 ["zoo", "publish", run, "--config", other, "--name", "template-seg-abdomen", "--version", "0.0.1",
                  "--out", tmp_path / "bundle"]):
        result = cli(*args)
        assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output  # no traceback
        assert f"{checkpoint} was trained on other data or classes than the config gives ({refusal})" in result.output
    assert not (tmp_path / "eval").exists() and not (tmp_path / "bundle").exists()


def test_the_same_msd_data_may_be_read_from_another_root(msd_run, tmp_path):
    """The checkpoint records a digest of dataset.json: the same folder copied elsewhere is the same data (and the
    classes the run's null stands for, spelt out, the same classes)."""
    config, run = msd_run
    shutil.copytree(tmp_path / "msd", tmp_path / "moved")
    checkpoint = run / "template_seg" / "best.pt"
    spelt_out = edited(config, tmp_path / "spelt_out.yaml", classes={name: [name] for name in MSD_CLASSES})
    result = cli("eval", spelt_out, "--checkpoint", checkpoint, "--split", "test", "--out", tmp_path / "eval",
                 "--data-root", tmp_path / "moved", "--device", "cpu")
    assert result.exit_code == 0, result.output
    index = json.loads((tmp_path / "moved" / "dataset.json").read_text())
    index["training"] = index["training"][::-1]  # other cases in the test split
    (tmp_path / "moved" / "dataset.json").write_text(json.dumps(index))
    result = cli("eval", config, "--checkpoint", checkpoint, "--split", "test", "--out", tmp_path / "eval2",
                 "--data-root", tmp_path / "moved", "--device", "cpu")
    assert result.exit_code == 1 and "data.root: " in result.output and "data_files.dataset.json: " in result.output


def clean_row(model: str, **values) -> dict:
    return {"model": model, "condition": "clean", "dice_organa": 0.6, "dice_organb": 0.4, "dice_mean": 0.5,
            "hd95_mean": 4.0, "hd95_missed": 0, **values}


def test_publish_names_what_the_test_cases_could_not_measure(msd_run, tmp_path):
    """comparison.json stores what it could not measure as null: a class absent from every test case has no Dice, a
    model that found nothing no HD95. The card leaves them out and says so; test cases without any labelled voxel
    leave nothing to publish."""
    config, run = msd_run
    rows = [clean_row("template_seg", dice_organb=None, dice_mean=0.6, hd95_mean=None, hd95_missed=1),
            clean_row("template copy", dice_organb=None, dice_mean=0.3)]
    (run / "comparison.json").write_text(json.dumps({"rows": rows, "test_cases": ["case_004"]}))
    folder = publish_template_seg(run, config, "template-seg-abdomen", "0.0.1", target=tmp_path / "bundle")
    card = read_card(folder)
    assert {"dice_organa", "dice_mean", "hd95_missed_classes"} <= set(card.metrics)
    assert "dice_organb" not in card.metrics and "hd95_mean_mm" not in card.metrics
    assert card.limitations[:2] == ["No Dice for organb: not in the test cases (case_004); the mean Dice is over the "
                                    "other classes.", "No HD95: the model found none of the classes in the test cases."]
    rows = [clean_row("template_seg", dice_organa=None, dice_organb=None, dice_mean=None, hd95_mean=None)]
    (run / "comparison.json").write_text(json.dumps({"rows": rows, "test_cases": ["case_004"]}))
    result = cli("zoo", "publish", run, "--config", config, "--name", "template-seg-abdomen", "--version", "0.0.2",
                 "--out", tmp_path / "bundle2")
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert "comparison.json: the test cases ['case_004'] hold no voxel of any class ['organa', 'organb']: no Dice " \
           "to publish" in result.output
