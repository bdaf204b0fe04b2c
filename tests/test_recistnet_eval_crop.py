"""A lesion that the evaluation crop cuts off its key slice stays in the FROC denominator as missed, and every other
lesion keeps its own diameters: training's validation and ``ctzoo eval`` alike."""

import json

import numpy as np
import pytest
import torch
import yaml
from test_deeplesion_loader import lesion_row, write_series

from ctzoo.datasets.deeplesion.dataset import (
    DeepLesionConfig,
    deeplesion_dataloader,
    deeplesion_dataset,
)
from ctzoo.datasets.deeplesion.info_csv import write_dl_info
from ctzoo.training import evaluate
from ctzoo.training.recistnet_task import (
    RecistNetTask,
    RecistNetTrainConfig,
    eval_transforms,
    evaluate_decodings,
)

#: (H, W) smaller than the 48 x 40 slice (and multiples of the network's stride): the crop keeps rows 8..39, so the
#: first lesion's centre (y = 3) is cut off
EVAL_SIZE = (32, 32)


@pytest.fixture(scope="module")
def cropped_root(tmp_path_factory):
    """One val key slice with two lesions: one near the top edge, one in the middle (a train row too, whose series
    folder is there but empty: the task builds a train set, and these tests never read it)."""
    root = tmp_path_factory.mktemp("dl_crop")
    edge = lesion_row(measurement_coordinates=(17.0, 3.0, 23.0, 3.0, 20.0, 1.0, 20.0, 5.0),
                      bounding_box=(12, -4, 28, 10), lesion_diameters_px=(6.0, 4.0), train_val_test=2)
    middle = lesion_row(measurement_coordinates=(10.0, 24.0, 30.0, 24.0, 20.0, 19.0, 20.0, 29.0),
                        bounding_box=(5, 14, 35, 34), lesion_diameters_px=(20.0, 10.0), train_val_test=2)
    train = lesion_row(file_name="000008_01_01_012.png", patient_index=8, study_index=1, train_val_test=1)
    write_series(root, edge)
    (root / "Images_png" / train.series_folder).mkdir(parents=True)
    write_dl_info([edge, middle, train], root / "DL_info.csv")
    return root


def data_config(root) -> DeepLesionConfig:
    return DeepLesionConfig(root=root, norm_spacing_mm=None)


class Oracle(torch.nn.Module):
    """Finds exactly the lesions left on the evaluated image, perfectly measured."""

    def __init__(self, points: torch.Tensor) -> None:
        super().__init__()
        self.points = points

    def forward(self, image):
        return {}

    def group(self, outputs, max_lesions, score_threshold, decode):
        return [{"points": self.points.float(), "scores": torch.ones(len(self.points))}]


def evaluated_sample(root):
    return deeplesion_dataset(data_config(root), "val", transform=eval_transforms(EVAL_SIZE))[0]


def test_the_crop_cuts_every_per_lesion_key_and_counts_the_lesion_it_drops(cropped_root):
    sample = evaluated_sample(cropped_root)
    assert sample["keypoints"].shape[0] == 1 and sample["keypoints_off_image"] == 1
    for key in ("boxes", "diameters_px", "diameters_mm", "lesion_types", "lesion_index"):
        assert len(sample[key]) == 1, key
    assert sample["lesion_index"].tolist() == [1]
    assert np.allclose(sample["diameters_mm"].numpy(), [[8.0, 4.0]])


def test_a_lesion_cut_off_the_evaluated_image_is_missed_and_the_hit_keeps_its_own_diameters(cropped_root):
    sample = evaluated_sample(cropped_root)
    dataset = deeplesion_dataset(data_config(cropped_root), "val", transform=eval_transforms(EVAL_SIZE))
    loader = deeplesion_dataloader(dataset, batch_size=1, shuffle=False, num_workers=0)
    result, _, truth = evaluate_decodings(Oracle(sample["keypoints"]), loader, torch.device("cpu"))["both"]
    assert truth[0]["off_image"] == 1
    assert result.num_lesions == 2 and result.num_off_image == 1
    assert result.sensitivities[3] == 0.5  # at 4 FPs/image
    assert result.axis_errors_mm["count"] == 1
    assert result.axis_errors_mm["long_mean"] == pytest.approx(0, abs=1e-5)
    assert result.axis_errors_mm["short_mean"] == pytest.approx(0, abs=1e-5)


def test_training_validation_counts_the_cropped_lesion_as_missed(cropped_root, caplog):
    cfg = RecistNetTrainConfig(data=data_config(cropped_root), eval_size=EVAL_SIZE, cache=False)
    metrics = RecistNetTask(cfg).evaluate(Oracle(evaluated_sample(cropped_root)["keypoints"]), torch.device("cpu"))
    assert "lesions the validation crop cuts off count as missed" in caplog.text
    assert metrics["sensitivity_4fp"] == 0.5


def test_ctzoo_eval_counts_the_cropped_lesion_as_missed_and_says_so(cropped_root, tmp_path, monkeypatch, caplog):
    config = tmp_path / "eval.yaml"
    config.write_text(yaml.safe_dump({"task": "recistnet", "eval_size": list(EVAL_SIZE),
                                      "data": {"root": str(cropped_root), "norm_spacing_mm": None}}))
    oracle = Oracle(evaluated_sample(cropped_root)["keypoints"])
    monkeypatch.setattr(evaluate, "load_recistnet", lambda checkpoint, name, prep, model, device: (oracle, prep))
    result = evaluate.evaluate_recistnet(config, tmp_path / "out", "val", checkpoint=tmp_path / "unused.pt",
                                         device="cpu")
    assert result.sensitivities[3] == 0.5 and result.axis_errors_mm["long_mean"] == pytest.approx(0, abs=1e-5)
    written = json.loads((tmp_path / "out" / "froc.json").read_text())
    assert written["num_lesions"] == 2 and written["num_off_image"] == 1
    assert "1 of 2 lesions lie off the 32 x 32 evaluation image" in caplog.text
    assert np.isclose(written["sensitivities"][3], 0.5)
