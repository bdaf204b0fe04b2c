"""The segmenter cross-validation: swapping the two labelled patients (``data.train_patient``) and the benchmark's
aggregation (``benchmarks/segmenter_cv.py``: mean ± sd over seeds, paired differences, the noise verdict)."""

import importlib.util
import math
from pathlib import Path

import numpy as np
import pytest
from pydantic import ValidationError

from ctzoo.datasets.segmentation import totalsegmentator_cases
from ctzoo.io import reorient_lps
from ctzoo.training.template_seg_task import (
    SegDataConfig,
    TemplateSegModelConfig,
    TemplateSegTask,
    TemplateSegTrainConfig,
    load_seg_data,
)

ROOT = Path(__file__).resolve().parents[1]
NAMES = ["liver", "spleen", "stomach", "aorta", "vertebrae"]


def load_benchmark():
    spec = importlib.util.spec_from_file_location("segmenter_cv", ROOT / "benchmarks" / "segmenter_cv.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def patients(fetched_samples):
    return {case.name: case for cases in totalsegmentator_cases().values() for case in cases}


@pytest.mark.parametrize("train_patient, test_patient, depths", [
    ("example_ct_sm", "sample_ct_dicom", (22, 8)),  # the default, as before the option existed
    ("sample_ct_dicom", "example_ct_sm", (12, 8))])
def test_train_patient_swaps_the_patients(patients, train_patient, test_patient, depths):
    options = {} if train_patient == "example_ct_sm" else {"train_patient": train_patient}
    data_cfg = SegDataConfig(spacing_mm=6.0, size=(64, 64), **options)
    data = load_seg_data(data_cfg)
    (train,), (val,), (test,) = data.cases["train"], data.cases["val"], data.cases["test"]
    assert (train.name, val.name, test.name) == (f"{train_patient}[0:{depths[0]}]",
                                                 f"{train_patient}[{depths[0]}:{sum(depths)}]", test_patient)
    # train + val are exactly the training patient (val its superior slab); the test patient is whole and apart
    whole = reorient_lps(patients[train_patient].image).array
    assert np.array_equal(np.concatenate([train.image.array, val.image.array]), whole)
    assert np.array_equal(test.image.array, patients[test_patient].image.array)
    assert np.array_equal(test.labels, patients[test_patient].labels)
    # templates, what inference retrieves from, come from the training slices alone
    model = TemplateSegModelConfig(channels=(8, 16, 32, 64))
    task = TemplateSegTask(TemplateSegTrainConfig(data=data_cfg, model=model), data)
    assert task.templates[2] and all(source.startswith(f"{train.name} slice ") for source in task.templates[2])


def test_train_patient_is_for_the_totalsegmentator_samples_only():
    assert SegDataConfig().train_patient == "example_ct_sm"
    with pytest.raises(ValidationError, match="train_patient"):
        SegDataConfig(source="msd", train_patient="sample_ct_dicom")
    with pytest.raises(ValidationError):
        SegDataConfig(train_patient="someone_else")
    msd = TemplateSegTrainConfig(data=SegDataConfig(source="msd"))  # a checkpoint's dumped msd config still loads
    assert TemplateSegTrainConfig.model_validate(msd.model_dump(mode="json")).data.source == "msd"


def fake_run(fold: str, seed: int, template: float, unet: float) -> dict:
    def model(mean: float) -> dict:
        dice = {"mean": mean, **{c: mean for c in NAMES}}
        return {"parameters": 1000, "train_wall_s": 10.0 + seed, "test_dice": {"last": dice, "best": dice},
                "compute": {"ms_per_slice": 5.0, "gflop_per_slice": 0.5}}

    return {"fold": fold, "train_patient": f"p{fold}", "test_patient": "other", "seed": seed, "class_names": NAMES,
            "models": {"template_seg": model(template), "unet": model(unet)},
            "template_copy_dice": {"mean": 0.3}}


def test_aggregation_mean_sd_and_paired_difference():
    cv = load_benchmark()
    # fold A: template_seg ahead by 0.10-0.12 at every seed; fold B: the sign flips from seed to seed
    runs = [fake_run("A", s, t, u) for s, (t, u) in enumerate([(0.60, 0.50), (0.62, 0.51), (0.58, 0.46)])]
    runs += [fake_run("B", s, t, u) for s, (t, u) in enumerate([(0.40, 0.50), (0.55, 0.45), (0.50, 0.45)])]
    summary = cv.summarise(runs)
    assert list(summary) == ["fold A", "fold B", "both folds"]
    template = summary["fold A"]["models"]["template_seg"]["test_dice"]["last"]["mean"]
    assert template["values"] == [0.60, 0.62, 0.58] and template["mean"] == pytest.approx(0.60)
    assert template["sd"] == pytest.approx(0.02)  # sample sd (n - 1)
    assert summary["fold A"]["models"]["unet"]["train_wall_s"]["mean"] == pytest.approx(11.0)
    a = summary["fold A"]["difference_template_minus_unet"]["last"]
    assert a["values"] == pytest.approx([0.10, 0.11, 0.12]) and a["mean"] == pytest.approx(0.11)
    assert a["sd"] == pytest.approx(0.01)
    half = 4.302653 * 0.01 / math.sqrt(3)  # t(0.975, 2 df)
    assert a["ci95"] == pytest.approx([0.11 - half, 0.11 + half], abs=1e-6) and a["inside_noise"] is False
    b = summary["fold B"]["difference_template_minus_unet"]["best"]
    assert b["values"] == pytest.approx([-0.10, 0.10, 0.05]) and b["inside_noise"] is True
    assert summary["both folds"]["difference_template_minus_unet"]["last"]["n"] == 6
    table = cv.table(summary, NAMES, {"A": {"train": "pA", "test": "pB"}, "B": {"train": "pB", "test": "pA"}})
    assert table.startswith("fold A: train pA, test pB, fold B: train pB, test pA; mean ± sd over seeds.")
    assert "| fold A | template_seg | 1,000 | 0.600 ± 0.020 |" in table
    assert "| fold A | last epoch | +0.100, +0.110, +0.120 | 0.110 ± 0.010 |" in table and "| no |" in table
    assert "| fold B | best val | -0.100, +0.100, +0.050 |" in table and "| yes |" in table
    one = cv.summarise(runs[:1])["fold A"]["difference_template_minus_unet"]["last"]  # one seed: no error bar
    assert one["sd"] is None and one["ci95"] is None and one["inside_noise"] is None
