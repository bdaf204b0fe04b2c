"""The segmenter through the CLI, as a user runs it: ctzoo train (with the UNet baseline: both runs and their
comparison under every condition) -> ctzoo zoo publish (weights + template bank + card) -> ctzoo infer on the
embedded DICOM sample -> NIfTI label map and DICOM SEG that agree voxel for voxel and reference the source slices."""

import json

import numpy as np
import pydicom
import pytest
import yaml
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.io import read_volume
from ctzoo.io.dicom_seg import read_dicom_seg_labels

NAMES = ["liver", "spleen", "stomach", "aorta", "vertebrae"]


@pytest.fixture(scope="module")
def fetched(fetched_samples):
    return fetched_samples


def run(*args):
    result = CliRunner().invoke(main, [str(a) for a in args])
    assert result.exit_code == 0, result.output
    return result


def test_train_publish_infer_writes_aligned_nifti_and_dicom_seg(fetched, tmp_path, monkeypatch, sample_dir):
    from ctzoo.models import load_card, model_entry

    config = yaml.safe_load(open("configs/template_seg_abdomen.yaml"))
    config["model"]["channels"] = [8, 16, 32, 64]
    config["data"].update(spacing_mm=6.0, size=[64, 64], max_templates=16)  # a quarter of the pixels: 24 -> 18 s
    config["optim"].update(epochs=1, batch_size=4)
    config["repeats"] = 1
    path = tmp_path / "seg.yaml"
    path.write_text(yaml.safe_dump(config))
    result = run("train", path, "--out", tmp_path / "run", "--device", "cpu")
    assert "template copy" in result.output and "unet" in result.output  # the comparison table
    _assert_the_comparison(path, tmp_path / "run")
    evaluated = run("eval", path, "--checkpoint", tmp_path / "run" / "template_seg" / "best.pt", "--split", "test",
                    "--out", tmp_path / "eval", "--device", "cpu")
    assert "template check: mean Dice" in evaluated.output  # does the model read its template? every eval says
    metrics = json.loads((tmp_path / "eval" / "metrics.json").read_text())
    assert metrics["dice_drop_wrong_template"] == pytest.approx(
        metrics["dice_mean"] - metrics["dice_mean_wrong_template"])

    monkeypatch.setattr(model_entry("template-seg-abdomen"), "weights_dir", tmp_path / "weights")
    run("zoo", "publish", tmp_path / "run", "--config", path, "--name", "template-seg-abdomen", "--version", "0.0.1")
    card = load_card("template-seg-abdomen")
    assert {"dice_liver", "dice_mean", "dice_mean_unet_baseline", "dice_mean_template_copy_baseline"} <= set(
        card.metrics)
    assert card.input_spec["classes"] == NAMES
    assert all(m.split == "test: real CT, sample_ct_dicom" for m in card.metrics.values())
    assert "not for diagnosis" in card.intended_use
    assert {"templates.safetensors", "templates.json", "model.safetensors"} <= {
        p.name for p in (tmp_path / "weights").iterdir()}

    run("infer", "--model", "template-seg-abdomen", "--out", tmp_path / "out")
    case = tmp_path / "out" / "sample_ct"
    volume = read_volume(sample_dir, progress=False)
    nifti = read_volume(case / "labels.nii.gz", dtype=None)
    labels = nifti.array.astype(np.uint8)
    assert labels.shape == volume.array.shape and labels.max() <= 5
    np.testing.assert_allclose(nifti.affine_lps, volume.affine_lps, atol=1e-4)  # on the source grid
    summary = json.loads((case / "segmentation.json").read_text())
    assert summary["model"] == "template-seg-abdomen" and set(summary["classes"]) == set(card.input_spec["classes"])
    assert summary["runtime"] == {"backend": "torch", "device": "cpu", "precision": "fp32", "compiled": False,
                                  "decoder": "gdcm", "preprocessing": "cpu"}
    assert (case / "labels_overlay.png").stat().st_size > 1000
    if labels.any():  # a one-epoch model may find nothing; then no SEG is written, by design
        seg = pydicom.dcmread(case / "seg.dcm")
        assert seg.Modality == "SEG" and seg.StudyInstanceUID == volume.dicom.study_instance_uid
        referenced = {f.DerivationImageSequence[0].SourceImageSequence[0].ReferencedSOPInstanceUID
                      for f in seg.PerFrameFunctionalGroupsSequence}
        assert referenced <= set(volume.dicom.sop_instance_uids)
        np.testing.assert_array_equal(read_dicom_seg_labels(case / "seg.dcm", volume, card.input_spec["classes"]),
                                      labels)
    else:
        assert not (case / "seg.dcm").exists()


def _assert_the_comparison(config, out):
    """What a template-segmenter run with ``baseline_unet`` writes: both networks' runs, and their comparison (with
    the template copied as a third row) under every condition, as JSON, a table and an overlay; the same budget."""
    from ctzoo.models.template_seg import TemplateSegNet, count_parameters
    from ctzoo.training.template_seg_task import load_seg_config, load_seg_model

    for kind in ("template_seg", "unet"):
        assert (out / kind / "best.pt").exists() and (out / kind / "metrics.csv").exists()
    saved = json.loads((out / "comparison.json").read_text())
    assert saved["class_names"] == NAMES
    rows = {(r["model"], r["condition"]) for r in saved["rows"]}
    assert rows == {(m, c) for m in ("template_seg", "unet", "template copy")
                    for c in ("clean", "shift_+100HU", "noise_30HU", "slices_5mm")}
    params = saved["training"]
    assert abs(params["unet"]["parameters"] / params["template_seg"]["parameters"] - 1) < 0.1  # same budget
    table = (out / "comparison.md").read_text()
    assert "| model | condition | Dice liver |" in table and "| unet | slices_5mm |" in table
    checked = [r for r in saved["rows"] if "dice_mean_wrong_template" in r]  # the template check: clean, template_seg
    assert [(r["model"], r["condition"]) for r in checked] == [("template_seg", "clean")]
    assert "* template_seg, clean: template check: mean Dice" in table
    assert (out / "overlay.png").exists()
    unet = load_seg_model(load_seg_config(config), out / "unet" / "best.pt", len(NAMES))
    assert not isinstance(unet, TemplateSegNet) and count_parameters(unet) == params["unet"]["parameters"]
