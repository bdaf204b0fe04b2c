"""A search run's integrity: which cases candidates are scored on, an iteration interrupted after its training, and
a resumed search with another config. ``measure`` is stubbed (the ONNX latency is tested elsewhere)."""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
import torch

import ctzoo.nas.search as search
from ctzoo.training.template_seg_task import SegData, TemplateSegTrainConfig, load_seg_data

TINY = {"task": "template_seg", "data": {"spacing_mm": 6.0, "size": [64, 64], "val_slices": 4, "max_templates": 8},
        "optim": {"epochs": 1, "batch_size": 4, "num_workers": 0}, "repeats": 1}


def tiny(**data) -> TemplateSegTrainConfig:
    return TemplateSegTrainConfig.model_validate({**TINY, "data": {**TINY["data"], **data}})


@pytest.fixture(autouse=True)
def quick_cost(monkeypatch):
    monkeypatch.setattr(search, "measure", lambda net, size, **options: {"params": 1, "flops": 1, "latency_ms": 1.0})


@pytest.fixture(scope="module")
def sample_data(fetched_samples) -> SegData:
    return load_seg_data(tiny().data)


def test_candidates_are_scored_on_val_where_it_holds_patients_of_its_own(sample_data, tmp_path, monkeypatch):
    other = sample_data.cases["test"][0]
    msd_like = SegData({"train": sample_data.cases["train"], "val": [replace(other, name="val-patient")],
                        "test": [replace(other, name="test-patient")]}, sample_data.class_names)
    scored_on = []

    def spy(net, cases, *args, **kwargs):
        scored_on.extend(case.name for case in cases)
        return {"dice_mean": 0.5}

    monkeypatch.setattr(search, "evaluate_segmenter", spy)
    document = search.search_iteration(tiny(source="msd", root=str(tmp_path)), tmp_path / "run", candidates=1,
                                       device="cpu", data=msd_like)
    assert set(scored_on) == {"val-patient"}  # the test patient stays unseen by the search
    assert document["iterations"][0]["scored_on"] == "val"
    # the TotalSegmentator sample: its val slab is the training patient's, so the other patient scores
    assert search.scoring_split(tiny().data, sample_data) == "test"
    assert search.scoring_split(tiny(source="msd", root=str(tmp_path)).data, replace(msd_like, cases={
        **msd_like.cases, "val": []})) == "test"


def test_an_iteration_interrupted_while_scoring_is_completed_without_training_again(sample_data, tmp_path,
                                                                                     monkeypatch):
    run, cfg = tmp_path / "run", tiny()

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    with monkeypatch.context() as patch:
        patch.setattr(search, "evaluate_candidates", interrupted)
        with pytest.raises(KeyboardInterrupt):
            search.search_iteration(cfg, run, epochs=1, candidates=1, device="cpu", data=sample_data)
    trained = torch.load(run / "supernet" / "last.pt", weights_only=False)
    assert not (run / "candidates.json").exists() and trained["epoch"] == 0
    document = search.search_iteration(cfg, run, epochs=1, candidates=1, device="cpu", data=sample_data)
    after = torch.load(run / "supernet" / "last.pt", weights_only=False)
    assert after["epoch"] == 0 and after["step"] == trained["step"]  # not trained a second time
    assert document["iterations"][0]["epochs"] == 1 and document["iterations"][0]["steps"] == after["step"]
    document = search.search_iteration(cfg, run, epochs=1, candidates=1, device="cpu", data=sample_data)
    final = torch.load(run / "supernet" / "last.pt", weights_only=False)
    assert final["epoch"] == 1 and sum(i["steps"] for i in document["iterations"]) == final["step"]


def test_resuming_a_search_with_another_config_is_refused(sample_data, tmp_path):
    run = tmp_path / "run"
    search.search_iteration(tiny(), run, candidates=1, device="cpu", data=sample_data)
    before = (run / "candidates.json").read_text()
    swapped = tiny(train_patient="sample_ct_dicom")  # trains on the patient iteration 0 scored on
    with pytest.raises(ValueError, match="data.train_patient"):
        search.search_iteration(swapped, run, candidates=1, device="cpu")
    assert (run / "candidates.json").read_text() == before
    assert json.loads(before)["iterations"][0]["scored_on"] == "test"


def test_the_exported_card_flags_selection_on_test_only_where_the_search_scored_on_test():
    from ctzoo.nas.handoff import scored_split

    document = {"iterations": [{"iteration": 0, "scored_on": "val"}, {"iteration": 1}]}
    assert scored_split(document, {"iteration": 0}) == "val"
    assert scored_split(document, {"iteration": 1}) == "test"  # a file written before iterations recorded it
