"""ctzoo train on the DeepLesion miniature: logs, checkpoints, bit-for-bit resume, falling loss; and the
volume inference that infer/serve/PACS share (orientation-independent, merged across slices)."""

import json
import math

import numpy as np
import pytest
import torch
import yaml
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.cli.zoo import zoo
from ctzoo.datasets.deeplesion.dataset import SlicePreprocessing
from ctzoo.datasets.deeplesion.info_csv import read_dl_info
from ctzoo.inference.backends import TorchDetector
from ctzoo.inference.recist_volume import SliceDetection, merge_across_slices
from ctzoo.inference.tasks import detector_task, run_task
from ctzoo.io import Volume
from ctzoo.models.recistnet import RecistNet


@pytest.fixture(scope="module")
def mini(small_deeplesion_mini):
    return small_deeplesion_mini


def tiny_config(tmp_path, root, epochs=2):
    config = {"task": "recistnet", "data": {"root": str(root), "negatives_per_series": 1},
              "model": {"backbone": "light", "width": 8, "head_channels": 16},
              "optim": {"epochs": epochs, "batch_size": 4, "lr": 0.004, "num_workers": 0, "eval_every": 1},
              "train_size": [128, 128], "eval_size": [512, 512]}
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_train(*args):
    result = CliRunner().invoke(main, ["train", *map(str, args)])
    assert result.exit_code == 0, result.output
    return result


def test_train_writes_logs_and_resumes_bit_for_bit(mini, tmp_path):
    config = tiny_config(tmp_path, mini)
    run_train(config, "--out", tmp_path / "straight")
    run_train(config, "--out", tmp_path / "resumed", "--epochs", "1")
    first = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    run_train(config, "--out", tmp_path / "resumed", "--resume")
    summary = json.loads((tmp_path / "resumed" / "summary.json").read_text())
    # the wall time of a resumed run counts every segment, in summary.json and in metrics.csv
    assert summary["complete"] and summary["epochs_done"] == 2 and summary["wall_s"] > first["wall_s"]
    import csv

    walls = [float(row["wall_s"]) for row in csv.DictReader((tmp_path / "resumed" / "metrics.csv").open())]
    assert walls[0] <= first["wall_s"] and walls[0] < walls[1] <= summary["wall_s"]
    assert torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["wall_s"] == walls[1]  # carried on
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert straight["epoch"] == resumed["epoch"] == 1
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
    rows = (tmp_path / "straight" / "metrics.csv").read_text().splitlines()
    assert len(rows) == 3 and "val_sensitivity_4fp" in rows[0] and "train_heatmap" in rows[0]
    assert len((tmp_path / "resumed" / "metrics.csv").read_text().splitlines()) == 3  # epoch 1 kept, 2 appended
    assert list((tmp_path / "straight" / "tensorboard").glob("events.out.tfevents.*"))
    assert (tmp_path / "straight" / "training_curves.png").stat().st_size > 1000
    assert json.loads((tmp_path / "straight" / "summary.json").read_text())["epochs"] == 2
    # each epoch states its costs; the files were written off the loop, and their cost is in the summary
    for row in csv.DictReader((tmp_path / "straight" / "metrics.csv").open()):
        assert 0 < float(row["first_batch_s"]) <= float(row["train_s"]) and float(row["eval_s"]) > 0
        assert float(row["write_wait_s"]) >= 0
    assert json.loads((tmp_path / "straight" / "summary.json").read_text())["epoch_files_s"] > 0
    result = CliRunner().invoke(main, ["train", str(config), "--out", str(tmp_path / "none"), "--resume"])
    assert result.exit_code == 1 and "nothing to resume from" in result.output


def _resume_error(config, out, *extra):
    """What a refused --resume says: exit 1, one line (no traceback)."""
    result = CliRunner().invoke(main, ["train", str(config), "--out", str(out), "--resume", *map(str, extra)])
    assert result.exit_code == 1, result.output
    assert result.output.startswith("Error: --resume: ") and result.output.count("\n") == 1, result.output
    return result.output


@pytest.mark.parametrize("left", ["last.pt", "best.pt", "metrics.csv", "template_seg/last.pt"])
def test_train_refuses_a_run_folder_without_resume(mini, tmp_path, left):
    """A fresh run into a folder that holds a run would overwrite it from epoch 0: refused in one line, and the
    earlier run is left as it was (its config.json too)."""
    run = tmp_path / "run"
    (run / left).parent.mkdir(parents=True)
    (run / left).write_bytes(b"earlier run")
    (run / "config.json").write_text("{}")
    result = CliRunner().invoke(main, ["train", str(tiny_config(tmp_path, mini)), "--out", str(run)])
    assert result.exit_code == 1
    assert result.output == f"Error: {run} holds a training run: --resume continues it, or choose another --out\n"
    assert (run / left).read_bytes() == b"earlier run" and (run / "config.json").read_text() == "{}"


def test_a_train_start_that_fails_on_its_data_leaves_nothing(tmp_path):
    """The data load before anything is written to OUT: a start that fails there leaves no config.json."""
    (tmp_path / "empty").mkdir()
    result = CliRunner().invoke(main, ["train", str(tiny_config(tmp_path, tmp_path / "empty")), "--out",
                                       str(tmp_path / "run")])
    assert result.exit_code == 1 and result.output.startswith("Error: ") and "Traceback" not in result.output
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("command", [("expand", "{run}/best.pt", "--out", "{out}"),
                                     ("eval", "{config}", "--checkpoint", "{run}/best.pt", "--out", "{out}"),
                                     ("zoo", "publish", "{run}", "--config", "{config}", "--name", "recistnet-mini",
                                      "--version", "0.1.0", "--out", "{out}")], ids=lambda c: c[0])
def test_a_damaged_checkpoint_is_one_error_line(mini, tmp_path, command):
    """A checkpoint cut short (an interrupted copy) used to end expand, eval and zoo publish in torch's traceback."""
    run = tmp_path / "run"
    run.mkdir()
    (run / "best.pt").write_bytes(b"PK\x03\x04 cut short")
    words = [w.format(run=run, out=tmp_path / "out", config=tiny_config(tmp_path, mini)) for w in command]
    result = CliRunner().invoke(main, words)
    assert result.exit_code == 1 and isinstance(result.exception, SystemExit), result.output
    assert result.output.startswith(f"Error: {run / 'best.pt'} is not a PyTorch checkpoint (")
    assert result.output.count("\n") == 1 and not (tmp_path / "out").exists()


def _same_data_elsewhere(mini, folder, edit=None):
    """``mini``'s data under another root (its images linked), its DL_info.csv rewritten by ``edit``."""
    folder.mkdir()
    (folder / "Images_png").symlink_to(mini / "Images_png")
    table = (mini / "DL_info.csv").read_bytes()
    (folder / "DL_info.csv").write_bytes(edit(table) if edit else table)
    return folder


def test_resume_refuses_another_config_and_keeps_the_runs_record(mini, tmp_path):
    """--resume continues a run only with its own settings: another learning rate, batch, seed, architecture,
    gradient exchange or dataset is refused in one line that lists each difference (old → new), before the run's
    config.json is touched. The epochs, loader workers, eval_every and the data's place (same DL_info.csv) may
    change. Weights that do not fit the model (whatever the config says) fail in one line too."""
    config = tiny_config(tmp_path, mini, epochs=2)
    run = tmp_path / "run"
    run_train(config, "--out", run, "--epochs", "1")
    recorded = (run / "config.json").read_text()
    settings = yaml.safe_load(config.read_text())

    def variant(name, **sections):  # the config with some fields of some sections changed
        changed = {**settings, **{key: {**settings.get(key, {}), **fields} for key, fields in sections.items()}}
        (tmp_path / name).write_text(yaml.safe_dump(changed))
        return tmp_path / name

    said = _resume_error(variant("b.yaml", optim={"lr": 0.04, "batch_size": 2, "seed": 7}), run)
    assert "optim.lr: 0.004 → 0.04" in said and "optim.batch_size: 4 → 2" in said and "optim.seed: 0 → 7" in said
    assert "optim.epochs" not in said.split("may change")[0]
    assert "model.width: 8 → 16" in _resume_error(variant("w16.yaml", model={"width": 16}), run)
    cser = variant("cser.yaml", distributed={"compression": "cser"})
    assert 'distributed.compression: "none" → "cser"' in _resume_error(cser, run)
    other = _same_data_elsewhere(mini, tmp_path / "other-data", lambda table: table.replace(b",1,", b",2,", 1))
    said = _resume_error(config, run, "--data-root", other)
    assert "data.root: " in said and "data_files.DL_info.csv: " in said
    assert (run / "config.json").read_text() == recorded  # a refused resume leaves the run's record alone
    # the same data elsewhere, more epochs, another number of loader workers and validation interval: resumed
    moved = _same_data_elsewhere(mini, tmp_path / "moved")
    run_train(variant("more.yaml", optim={"num_workers": 1, "eval_every": 2}), "--out", run, "--resume",
              "--data-root", moved)
    assert json.loads((run / "summary.json").read_text())["epochs_done"] == 2
    assert json.loads((run / "config.json").read_text())["optim"]["num_workers"] == 1
    state = torch.load(run / "last.pt", weights_only=False)
    state["model"]["heatmap_head.0.weight"] = state["model"]["heatmap_head.0.weight"][:, :4]
    torch.save(state, run / "last.pt")
    said = _resume_error(config, run, "--epochs", "3")
    assert "do not fit the model this config builds: size mismatch for heatmap_head.0.weight" in said


def test_what_a_resumed_run_may_change():
    """The comparison behind --resume: the task's config field by field (the optimiser's own record only for a task
    without one), the fields a resumed run may change aside, data.root only with the same data's digest, fields an
    older checkpoint lacks not compared, a section switched on (None → settings) reported, records that do not
    say what the run is (a search's space) not compared."""
    from ctzoo.training.resume_check import config_changes, resume_record

    task = {"optim": {"epochs": 2, "lr": 0.1, "num_workers": 0}, "data": {"root": "/a"}, "hard_negatives": None}
    saved = {"config": {"epochs": 2, "decay_epochs": 1.0}, "train_config": task, "data_files": {"DL_info.csv": "x"}}
    moved = {**task, "optim": {"epochs": 9, "lr": 0.1, "num_workers": 4}, "data": {"root": "/b"}, "new_field": 1}
    # LEMON derives decay_epochs from the epochs: the optimiser's record is not compared beside the task's config
    same = resume_record({"epochs": 9, "decay_epochs": 4.5},
                         {"train_config": moved, "data_files": {"DL_info.csv": "x"}})
    assert config_changes(saved, same) == []
    other = resume_record({}, {"train_config": {**moved, "hard_negatives": {"keep": 2}},
                               "data_files": {"DL_info.csv": "y"}})
    assert config_changes(saved, other) == ['data.root: "/a" → "/b"', 'hard_negatives: null → {"keep": 2}',
                                            'data_files.DL_info.csv: "x" → "y"']
    assert config_changes({"config": {"lr": 0.1, "epochs": 1}}, resume_record({"lr": 0.2, "epochs": 5}, None)) == [
        "optim.lr: 0.1 → 0.2"]  # a task without a config of its own: the optimiser's
    # other extra_state is not what the run is: a search narrows its space between iterations (ctzoo.nas.search)
    assert config_changes({"config": {"lr": 0.1}, "space": {"width": [1, 2]}},
                          resume_record({"lr": 0.1}, {"space": {"width": [2]}})) == []


def test_template_seg_resume_refuses_another_config(tmp_path):
    """ctzoo train --resume of a template-segmenter run compares each model's checkpoint with its own config."""
    from ctzoo.training.template_seg_task import TemplateSegTrainConfig, check_resume

    cfg = TemplateSegTrainConfig(baseline_unet=False)
    (tmp_path / "template_seg").mkdir()
    torch.save({"task_config": cfg.model_dump(mode="json"), "model_kind": "template_seg"},
               tmp_path / "template_seg" / "last.pt")
    check_resume(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"epochs": 50})}), tmp_path)
    with pytest.raises(ValueError, match=r"optim.lr: 0.001 → 0.01"):
        check_resume(cfg.model_copy(update={"optim": cfg.optim.model_copy(update={"lr": 0.01})}), tmp_path)


def test_training_selects_on_validation_only(tmp_path):
    """best.pt (and the val_* columns, and a bundle card's "val" metrics) come from the validation split:
    eval_split: test is refused, naming ctzoo eval, which scores the test split; a checkpoint chosen on the test
    split by an older version is not exported as validated."""
    from ctzoo.training.checkpoint_bundle import CheckpointError, bundle_from_checkpoint

    config = tiny_config(tmp_path, tmp_path)
    settings = yaml.safe_load(config.read_text())
    config.write_text(yaml.safe_dump({**settings, "eval_split": "test"}))
    result = CliRunner().invoke(main, ["train", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and "eval_split" in result.output and "ctzoo eval" in result.output, result.output
    assert not (tmp_path / "run").exists()
    train_config = {**settings, "eval_split": "test"}
    torch.save({"model": {}, "train_config": train_config, "epoch": 0}, tmp_path / "best.pt")
    with pytest.raises(CheckpointError, match="chosen on the test split") as refused:
        bundle_from_checkpoint(tmp_path / "best.pt", tmp_path / "bundle")
    assert "\n" not in str(refused.value)


@pytest.mark.parametrize("field", ["train_size", "eval_size"])
def test_input_sizes_must_be_multiples_of_the_network_stride(tmp_path, field):
    """A train_size or eval_size that is not a multiple of 32 is refused with the config, in one line that names
    the field and the nearest good size, not at the first training or validation step deep in the network."""
    config = tiny_config(tmp_path, tmp_path)
    config.write_text(yaml.safe_dump({**yaml.safe_load(config.read_text()), field: [250, 256]}))
    result = CliRunner().invoke(main, ["train", str(config), "--out", str(tmp_path / "run")])
    assert result.exit_code == 1 and result.exception.__class__ is SystemExit, result.output
    said = [line for line in result.output.splitlines() if field in line]
    assert len(said) == 1 and "multiples of 32" in said[0] and "[256, 256]" in said[0], result.output
    assert not (tmp_path / "run").exists()


def test_a_run_trains_the_same_weights_with_and_without_loader_workers(mini, tmp_path):
    """Loader workers change only which process draws an item: the same epochs, augmentation and weights, bit for
    bit, with the training process on two threads (its own draws run on one, as a worker's do) and over two
    epochs (the kept worker restarts between them)."""
    config = tiny_config(tmp_path, mini, epochs=2)
    settings = yaml.safe_load(config.read_text())
    weights, threads = [], torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for workers in (0, 1):
            settings["optim"]["num_workers"] = workers
            config.write_text(yaml.safe_dump(settings))
            run_train(config, "--out", tmp_path / f"workers{workers}")
            weights.append(torch.load(tmp_path / f"workers{workers}" / "last.pt", weights_only=False)["model"])
    finally:
        torch.set_num_threads(threads)
    for name, tensor in weights[0].items():
        assert torch.equal(tensor, weights[1][name]), name


#: AdamW under two-way compression: one plain step, then the compressed momentum (CompressedMomentumAdam)
TWOWAY_SIGN = {"compression": "twoway", "compressor": "sign", "server_compressor": "sign", "warmup_steps": 1,
               "min_numel": 0}


def _torchrun_train(config, out, *extra):
    import subprocess
    import sys

    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "-m", "ctzoo",
                           "train", str(config), "--out", str(out), *extra], capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return done


def _assert_one_ddp_epoch(out, done, compression):
    """What a one-epoch run of two processes on the CPU (gloo) writes, as torchrun launches them on a cluster:
    rank 0 alone logs and saves; with gradient compression (distributed.compression), the bytes per step are logged
    beside the loss."""
    import csv

    summary = json.loads((out / "summary.json").read_text())
    assert summary["world_size"] == 2 and done.stdout.count('"world_size": 2') == 1
    (row,) = list(csv.DictReader((out / "metrics.csv").open()))
    steps = int(row["step"])
    if compression is None:
        assert float(row["comm_reduction"]) == pytest.approx(1.0, rel=0.05)
    elif compression["compression"] == "cser":
        # a block per step, a reset every period steps, and at the end of training one whole-model average
        per_step = compression["ratio"] + compression["reset_ratio"] * (steps // compression["period"]) / steps
        assert float(row["comm_reduction"]) == pytest.approx(1 / (per_step + 1 / steps), rel=0.05)
    else:  # one uncompressed step, then 1 bit (plus a 4-byte scale per tensor) each way: >= 2x over the epoch
        assert steps >= 3 and float(row["comm_reduction"]) > 2
    assert steps > 0 and float(row["comm_bytes_per_step"]) > 0 and float(row["train_loss"]) > 0


def _ddp_config(tmp_path, mini, epochs, compression):
    config = tiny_config(tmp_path, mini, epochs=epochs)
    settings = yaml.safe_load(config.read_text())
    settings["optim"]["batch_size"] = 1  # the 4-case miniature split over 2 processes: a few steps each
    config.write_text(yaml.safe_dump({**settings, "distributed": compression or {}}))
    return config


def test_torchrun_ddp_on_gloo(mini, tmp_path):
    """Uncompressed DDP (the compressed runs are checked the same way by the resume test below)."""
    config = _ddp_config(tmp_path, mini, 1, None)
    _assert_one_ddp_epoch(tmp_path / "ddp", _torchrun_train(config, tmp_path / "ddp"), None)


@pytest.mark.parametrize("compression", [
    TWOWAY_SIGN, {"compression": "cser", "ratio": 0.03125, "period": 2, "reset_ratio": 0.125}], ids=["twoway", "cser"])
def test_a_compressed_run_resumes_with_every_workers_own_state(mini, tmp_path, compression):
    """A compressed one-epoch run logs its bytes per step; each worker saves what worker 0's last.pt cannot hold
    (two-way's error-feedback residuals, CSER's local model and optimiser) and gets it back on --resume: two-way
    then resumes bit for bit (its straight run is the reference; CSER's averaging of random blocks is not compared
    so: it has no straight run)."""
    config = _ddp_config(tmp_path, mini, 2, compression)
    first = _torchrun_train(config, tmp_path / "resumed", "--epochs", "1")
    _assert_one_ddp_epoch(tmp_path / "resumed", first, compression)
    local = [torch.load(tmp_path / "resumed" / f"compression.rank{rank}.pt", weights_only=False) for rank in (0, 1)]
    assert [saved["epoch"] for saved in local] == [0, 0]
    if compression["compression"] == "twoway":  # the worker-side residuals differ between workers, the server's not
        worker, server = [saved["state"]["worker"] for saved in local], [saved["state"]["server"] for saved in local]
        assert worker[0] and worker[0].keys() == worker[1].keys()
        assert all(isinstance(key, str) for key in worker[0])  # parameter names: they outlive DDP's bucket rebuild
        assert any(not torch.equal(worker[0][key], worker[1][key]) for key in worker[0])
        assert all(torch.equal(server[0][key], server[1][key]) for key in server[0])
    else:
        assert set(local[0]["state"]) == {"model", "optimizer"}
    _torchrun_train(config, tmp_path / "resumed", "--resume")
    assert json.loads((tmp_path / "resumed" / "summary.json").read_text())["epochs_done"] == 2
    if compression["compression"] == "twoway":
        _torchrun_train(config, tmp_path / "straight")
        straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["model"]
        resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["model"]
        for name, tensor in straight.items():
            assert torch.equal(tensor, resumed[name]), name


@pytest.mark.parametrize("world,batch", [(2, 4), (4, 2)])
def test_ddp_ranks_train_every_item_each_epoch(mini, tmp_path, world, batch):
    """Under DDP each rank trains its share of the epoch, DistributedSampler's padding to equal shares (fewer than
    world size items repeated) the only difference from one process: nothing dropped, so a training set smaller
    than batch_size x world size still trains (6 items, 2 x 4: it once gave no step at all, and reported
    complete), and every rank takes as many steps (DDP's collectives need them all)."""
    from collections import Counter

    from ctzoo.training.recistnet_task import RecistNetTask, load_train_config

    task = RecistNetTask(load_train_config(tiny_config(tmp_path, mini)).model_copy(update={"cache": False}))
    items = len(task.train_set)
    steps, seen = set(), Counter()
    for rank in range(world):
        batches = task.train_batches(11, batch, 0, rank, world)
        steps.add(len(batches))
        seen.update(name for drawn in batches for name in drawn["file_name"])
    assert len(steps) == 1 and steps.pop() > 0
    assert len(seen) == items and sum(seen.values()) == world * math.ceil(items / world) < items + world


def test_an_epoch_without_a_training_step_is_an_error(tmp_path):
    """An epoch that would take no optimiser step (on any rank: they all have as many) stops the run, saying how
    many items there are against the batch, instead of reporting a complete run of untrained weights."""
    from ctzoo.training.engine import OptimConfig, fit

    class Empty:
        name, primary_metric = "empty", "score"
        train_set = []

        def build_model(self):
            return torch.nn.Linear(2, 1)

        def train_batches(self, epoch_seed, batch_size, num_workers, rank, world_size):
            return torch.utils.data.DataLoader(self.train_set, batch_size=batch_size, drop_last=True)

        def loss(self, model, batch, device):
            raise AssertionError("no batch to train on")

        def evaluate(self, model, device):
            return {"score": 0.0}

    with pytest.raises(ValueError, match=r"epoch 1 has no training step: the training set \(0 items\) is smaller "
                                         r"than batch_size × world size \(4 × 1\)"):
        fit(Empty(), OptimConfig(epochs=1, batch_size=4, num_workers=0), tmp_path / "run", progress=False)
    assert not (tmp_path / "run" / "summary.json").exists()


class _Interrupted(Exception):
    """A run stopped from outside (a test's stand-in for a kill)."""


class _GrowingEpochs:
    """A stub task whose epochs take 2, 5 and 3 steps (as hard-negative mining lengthens an epoch); it may stop
    before epoch ``stop_at``, as an interrupted run."""

    name, primary_metric = "growing", "score"

    def __init__(self, stop_at=None):
        self.stop_at = stop_at

    def build_model(self):
        return torch.nn.Linear(2, 1)

    def before_epoch(self, model, device, epoch):
        if epoch == self.stop_at:
            raise _Interrupted

    def train_batches(self, seed, batch_size, num_workers, rank, world_size):
        from ctzoo.training.engine import epoch_seed

        steps = {epoch_seed(0, epoch): length for epoch, length in enumerate((2, 5, 3))}[seed]
        drawn = torch.Generator().manual_seed(seed)  # from the epoch's seed alone, as Task.train_batches says
        return [torch.randn(batch_size, 2, generator=drawn) for _ in range(steps)]

    def loss(self, model, batch, device):
        loss = model(batch.to(device)).pow(2).mean()
        return loss, {}

    def evaluate(self, model, device):
        return {"score": 0.0}


def test_the_learning_rate_follows_the_fraction_of_epochs_done(tmp_path):
    """Warm-up and cosine decay run on epochs done (each epoch's steps counted as fractions of it), not on a step
    count from the current epoch's length: epochs of 2, 5 and 3 steps (mining lengthens epochs) still end the
    one-epoch warm-up at the full rate, are half-way down the decay after epoch 2 and at lr * final_lr_ratio
    on the last step; an interrupted and resumed run takes the same rates and ends with the same weights."""
    import csv

    from ctzoo.training.engine import OptimConfig, fit

    cfg = OptimConfig(epochs=3, batch_size=2, lr=0.1, warmup_epochs=1, final_lr_ratio=0.01, num_workers=0)
    fit(_GrowingEpochs(), cfg, tmp_path / "straight", device="cpu", progress=False)
    rows = list(csv.DictReader((tmp_path / "straight" / "metrics.csv").open()))
    assert [int(row["step"]) for row in rows] == [2, 7, 10]
    assert [float(row["lr"]) for row in rows] == pytest.approx([0.1, 0.1 * (0.01 + 0.99 * 0.5), 0.1 * 0.01])
    with pytest.raises(_Interrupted):
        fit(_GrowingEpochs(stop_at=2), cfg, tmp_path / "resumed", device="cpu", progress=False)
    fit(_GrowingEpochs(), cfg, tmp_path / "resumed", resume=True, device="cpu", progress=False)
    resumed = list(csv.DictReader((tmp_path / "resumed" / "metrics.csv").open()))
    assert [row["lr"] for row in resumed] == [row["lr"] for row in rows]
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)["model"]
    again = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)["model"]
    assert all(torch.equal(straight[name], again[name]) for name in straight)


def _step_gradient(task, model, batch):
    """The loss (and its parts) and the flat gradient of one training step of ``task`` on ``batch``."""
    model.zero_grad()
    loss, parts = task.loss(model, batch, torch.device("cpu"))
    loss.backward()
    module = getattr(model, "module", model)
    return float(loss.detach()), parts, torch.cat([p.grad.reshape(-1) for p in module.parameters()])


def _ddp_gradient_worker(rank, world, init_file, config, out):
    """One DDP rank of a 2-process step on gloo: its share of the epoch's first global batch of 6."""
    import os

    import torch.distributed as dist

    from ctzoo.training.engine import epoch_seed
    from ctzoo.training.recistnet_task import RecistNetTask, load_train_config

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    os.environ["WORLD_SIZE"] = str(world)
    task = RecistNetTask(load_train_config(config).model_copy(update={"cache": False}))
    torch.manual_seed(0)
    model = torch.nn.parallel.DistributedDataParallel(task.build_model())
    batch = next(iter(task.train_batches(epoch_seed(0, 0), 6 // world, 0, rank, world)))
    loss, parts, gradient = _step_gradient(task, model, batch)
    torch.save({"loss": loss, "parts": parts, "gradient": gradient, "files": list(batch["file_name"]),
                "lesions": sum(len(k) for k in batch["keypoints"])}, f"{out}.{rank}")
    del model
    dist.barrier()
    dist.destroy_process_group()


def test_ddp_gradient_is_the_one_process_gradient_of_the_global_batch(mini, tmp_path):
    """Two DDP processes on gloo, each with half of a global batch of 6, step with the gradient one process computes
    on the whole batch: the losses are normalised by the step's positives over all ranks (mmdet's
    reduce_mean(avg_factor)), not by each rank's own (the ranks hold different numbers of lesions here), and the
    mean of the ranks' losses, which metrics.csv logs, is the one process's loss."""
    import torch.multiprocessing as mp

    from ctzoo.training.engine import epoch_seed
    from ctzoo.training.recistnet_task import RecistNetTask, load_train_config

    config = tiny_config(tmp_path, mini)
    mp.spawn(_ddp_gradient_worker, args=(2, str(tmp_path / "init"), str(config), str(tmp_path / "rank")), nprocs=2,
             join=True)
    ranks = [torch.load(tmp_path / f"rank.{rank}", weights_only=False) for rank in (0, 1)]
    task = RecistNetTask(load_train_config(config).model_copy(update={"cache": False}))
    torch.manual_seed(0)
    model = task.build_model()
    batch = next(iter(task.train_batches(epoch_seed(0, 0), 6, 0, 0, 1)))
    loss, parts, gradient = _step_gradient(task, model, batch)
    assert sorted(batch["file_name"]) == sorted(ranks[0]["files"] + ranks[1]["files"])  # the same global batch
    assert ranks[0]["lesions"] != ranks[1]["lesions"]  # so the ranks' own normalisers would differ
    torch.testing.assert_close(ranks[0]["gradient"], ranks[1]["gradient"])  # DDP: both step alike
    scale = gradient.abs().max()
    torch.testing.assert_close(ranks[0]["gradient"] / scale, gradient / scale, rtol=0, atol=1e-5)
    assert (ranks[0]["loss"] + ranks[1]["loss"]) / 2 == pytest.approx(loss, rel=1e-5)
    for key, value in parts.items():
        assert (ranks[0]["parts"][key] + ranks[1]["parts"][key]) / 2 == pytest.approx(value, rel=1e-5, abs=1e-7)


def test_processes_sharing_a_gpu_use_gloo(monkeypatch):
    """NCCL refuses two ranks on one GPU: with more processes than GPUs on a node the engine takes gloo."""
    from ctzoo.training.engine import distributed_backend

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "2")
    assert distributed_backend() == "gloo"
    monkeypatch.setenv("LOCAL_WORLD_SIZE", "1")
    assert distributed_backend() == "nccl"
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert distributed_backend() == "gloo"


def test_training_loss_falls(mini, tmp_path):
    config = tiny_config(tmp_path, mini, epochs=8)
    run_train(config, "--out", tmp_path / "run")
    history = torch.load(tmp_path / "run" / "last.pt", weights_only=False)["history"]
    first, last = history[0]["train_heatmap"], history[-1]["train_heatmap"]
    assert last < 0.7 * first, (first, last)


def test_eval_writes_froc_table_and_curve(mini, tmp_path):
    config = tiny_config(tmp_path, mini, epochs=1)
    run_train(config, "--out", tmp_path / "run")
    result = CliRunner().invoke(main, ["eval", str(config), "--checkpoint", str(tmp_path / "run" / "last.pt"),
                                       "--split", "test", "--decode", "all", "--out", str(tmp_path / "eval")])
    assert result.exit_code == 0, result.output
    froc = json.loads((tmp_path / "eval" / "froc.json").read_text())
    assert froc["split"] == "test" and len(froc["sensitivities"]) == 6
    # the three decoders from one forward pass; the first is the one written and calibrated
    assert froc["decode"] == "both" and set(froc["decodes"]) == {"both", "grouping", "centre"}
    assert froc["decodes"]["both"]["sensitivities"] == froc["sensitivities"]
    assert 0 <= froc["calibration"]["ece"] <= 1 and len(froc["calibration"]["bins"]) == 10
    thresholds = [p["score_threshold"] for p in froc["operating_points"]]
    assert thresholds == sorted(thresholds, reverse=True)  # more false positives allowed, lower threshold
    points = froc["operating_points"]
    assert all(p["achieved_fp_per_image"] <= p["fp_per_image"] for p in points), points
    assert "decode grouping: sensitivity at 4 FPs/image" in result.output
    for picture in ("froc.png", "reliability.png"):
        assert (tmp_path / "eval" / picture).stat().st_size > 1000
    detections = json.loads((tmp_path / "eval" / "detections.json").read_text())
    assert {d["file_name"] for d in detections}
    # DeepLesion's protocol: the test split's key slices alone, although the config adds lesion-free slices to
    # training; asked for, they are scored too, and the table says how many there were
    rows = read_dl_info(mini / "DL_info.csv")
    key_slices = {r.file_name for r in rows if r.split == "test" and not r.possibly_noisy}
    assert {d["file_name"] for d in detections} == key_slices
    assert froc["num_images"] == len(key_slices) and froc["num_lesion_free"] == 0
    assert froc["lesion_free_per_series"] == 0
    with_free = CliRunner().invoke(main, ["eval", str(config), "--checkpoint", str(tmp_path / "run" / "last.pt"),
                                          "--lesion-free-per-series", "1", "--out", str(tmp_path / "eval-free")])
    assert with_free.exit_code == 0, with_free.output
    free = json.loads((tmp_path / "eval-free" / "froc.json").read_text())
    assert free["num_images"] == len(key_slices) + free["num_lesion_free"] and free["num_lesion_free"] > 0
    assert f"({free['num_lesion_free']} lesion-free)" in with_free.output


def test_eval_prepares_slices_as_the_model_was_trained(mini, tmp_path, caplog):
    """A config whose preprocessing differs from the checkpoint's (coarser spacing, windows swapped) scores the
    checkpoint exactly as its own config does, and says which settings it overrode."""
    config = tiny_config(tmp_path, mini, epochs=1)
    run_train(config, "--out", tmp_path / "run")
    other = yaml.safe_load(config.read_text())
    other["data"] |= {"norm_spacing_mm": 1.6, "window_hu": [-160, 240]}
    (tmp_path / "other.yaml").write_text(yaml.safe_dump(other))
    froc = {}
    for name in ("tiny", "other"):
        result = CliRunner().invoke(main, ["eval", str(tmp_path / f"{name}.yaml"), "--checkpoint",
                                           str(tmp_path / "run" / "last.pt"), "--out", str(tmp_path / name)])
        assert result.exit_code == 0, result.output
        froc[name] = json.loads((tmp_path / name / "froc.json").read_text())
    assert froc["other"]["preprocessing"] == froc["tiny"]["preprocessing"]
    assert froc["tiny"]["preprocessing"]["norm_spacing_mm"] == 0.8
    assert froc["other"]["curve_sensitivity"] == froc["tiny"]["curve_sensitivity"]
    assert froc["other"]["curve_fps"] == froc["tiny"]["curve_fps"]
    said = [r.getMessage() for r in caplog.records if "model's own preprocessing" in r.getMessage()]
    assert len(said) == 1 and "norm_spacing_mm: 0.8 (config: 1.6)" in said[0], said


def test_volume_detections_do_not_depend_on_storage_orientation(sample_volume):
    """The same anatomy stored LPS or flipped to R/A/I order gives the same lesions in mm (an untrained model
    is a fixed function of its input; the reorientation must hand it identical slices)."""
    torch.manual_seed(0)
    model = RecistNet(in_channels=3, width=8, head_channels=16).eval()
    prep = SlicePreprocessing()
    crop = sample_volume.with_array(sample_volume.array)
    crop = Volume(crop.array[:6, 128:384, 128:384], crop.spacing,
                  tuple(crop.index_to_lps([128, 128, 0])), crop.direction)
    flipped_array = crop.array[::-1, :, ::-1]
    direction = crop.direction @ np.diag([-1.0, 1.0, -1.0])
    flipped = Volume(np.ascontiguousarray(flipped_array), crop.spacing,
                     tuple(crop.index_to_lps([crop.size[0] - 1, 0, crop.size[2] - 1])), direction)
    assert flipped.orientation == "RPI"
    task = detector_task(TorchDetector(model, "cpu"), prep, score_threshold=0.0, max_lesions=3)
    a = run_task(task, crop)
    b = run_task(task, flipped)
    assert len(a["lesions"]) == len(b["lesions"]) > 0
    for x, y in zip(a["lesions"], b["lesions"]):
        np.testing.assert_allclose(x["points_mm"], y["points_mm"], atol=1e-3)
        mirrored = crop.size[0] - 1 - np.asarray(x["points_voxel"])[:, 0]
        np.testing.assert_allclose(np.asarray(y["points_voxel"])[:, 0], mirrored, atol=1e-3)
        assert y["slice"] == crop.size[2] - 1 - x["slice"]
    assert b["input"]["orientation"] == "RPI"


def test_volume_inference_orders_context_slices_as_training(mini):
    """slice_inputs on a miniature series read as a volume (PNG k at z = origin - k dz: stored head to feet, as
    DeepLesion's PNG numbers are assumed to run, then reoriented to LPS as inference does) gives each key slice
    the DeepLesion loader's input, channel by channel: the superior neighbour first in both (before, inference
    reversed the context planes of every window)."""
    from ctzoo.datasets.deeplesion.dataset import DeepLesionConfig, LoadDeepLesiond, key_slice_items
    from ctzoo.datasets.deeplesion.png_slices import read_png_hu, slice_path
    from ctzoo.inference.recist_volume import slice_inputs
    from ctzoo.io import reorient_lps

    cfg = DeepLesionConfig(root=mini, num_slices=5)
    item = key_slice_items(read_dl_info(mini / "DL_info.csv"))[0]
    row = item["context_row"]
    first, last = row.slice_range
    stored = Volume(np.stack([read_png_hu(slice_path(cfg.images_root, row.series_folder, png))
                              for png in range(first, last + 1)]), spacing=row.spacing_mm_px,
                    direction=np.diag([1.0, 1.0, -1.0]))  # slice index towards the feet
    axial = reorient_lps(stored)
    assert axial.orientation == "LPS"
    trained = LoadDeepLesiond(cfg)(item)["image"].as_tensor()
    channels, rows, columns = trained.shape
    assert not torch.allclose(trained[0], trained[cfg.num_slices - 1], atol=1e-2)  # the order shows
    key = last - row.key_slice_index  # the key slice's index in the LPS volume
    image, _ = next(image for k, image in enumerate(slice_inputs(axial, cfg)) if k == key)
    np.testing.assert_allclose(image[:, :rows, :columns].numpy(), trained.numpy(), atol=1e-5)
    assert image.shape[0] == channels and not image[:, rows:].any() and not image[:, :, columns:].any()


def test_merge_across_slices():
    def detection(score, k, x_mm, long_mm=20.0):
        mm = np.zeros((5, 3))
        mm[:, 0], mm[:, 2] = x_mm, 2.0 * k
        return SliceDetection(score, k, np.zeros((5, 3)), mm, long_mm, long_mm / 2, [k])

    merged = merge_across_slices([detection(0.9, 5, 0.0), detection(0.8, 6, 2.0), detection(0.7, 7, 3.0),
                                  detection(0.6, 5, 80.0), detection(0.5, 12, 0.0)], slice_spacing_mm=2.0)
    assert [(m.score, sorted(m.slices)) for m in merged] == [(0.9, [5, 6, 7]), (0.6, [5]), (0.5, [12])]


def test_publish_then_infer_on_the_sample(mini, tmp_path, monkeypatch):
    """A finished run becomes a zoo model (weights + card), loads by name offline, and ctzoo infer runs it."""
    from ctzoo.models import create_model, load_card, model_entry

    config = tiny_config(tmp_path, mini, epochs=1)
    run_train(config, "--out", tmp_path / "run")
    monkeypatch.setattr(model_entry("recistnet-mini"), "weights_dir", tmp_path / "weights")
    result = CliRunner().invoke(main, ["zoo", "publish", str(tmp_path / "run"), "--config", str(config),
                                       "--name", "recistnet-mini", "--version", "0.0.1", "--split", "val",
                                       "--notes", "stopped at epoch 1 of 1", "--operating-fp", "1"])
    assert result.exit_code == 0, result.output
    card = load_card("recistnet-mini")
    point = card.operating_point  # chosen on val, then counted on the three real scans without known lesions
    assert point.fp_per_image == 1 and point.split.startswith("val") and 0 <= point.score_threshold <= 1
    assert point.lesion_free_findings_per_slice >= 0 and "aorta_example_ct" in point.note
    assert "same anatomy appears in the training and test splits" in card.limitations[0]  # no scan held out here
    assert card.version == "0.0.1" and "sensitivity_at_4_fp" in card.metrics and card.training.epochs == 1
    # every figure says it is on synthetic lesions; the intended use is one (research, not diagnosis, which input)
    assert all(m.split == "val: synthetic lesions in real CT" for m in card.metrics.values())
    assert point.split.endswith(": synthetic lesions in real CT") and "not for diagnosis" in card.intended_use
    assert card.training.device == "cpu" and card.training.notes == "stopped at epoch 1 of 1"
    assert "make-deeplesion-mini" in card.training.command and "--cases 4 --seed 3" in card.training.command
    assert "Metrics" in (tmp_path / "weights" / "MODEL_CARD.md").read_text()
    assert "| Notes | stopped at epoch 1 of 1 |" in (tmp_path / "weights" / "MODEL_CARD.md").read_text()
    model = create_model("recistnet-mini", pretrained=True)
    saved = torch.load(tmp_path / "run" / "best.pt", weights_only=False)["model"]
    assert all(torch.equal(v, saved[k]) for k, v in model.state_dict().items())
    result = CliRunner().invoke(main, ["infer", "--out", str(tmp_path / "out"), "--score-threshold", "0.0"])
    assert result.exit_code == 0, result.output
    document = json.loads((tmp_path / "out" / "sample_ct" / "detections.json").read_text())
    assert document["model"] == "recistnet-mini" and document["model_version"] == "0.0.1"
    assert document["input"]["size_ijk"] == [512, 512, 20]
    for lesion in document["lesions"]:
        assert len(lesion["points_voxel"]) == len(lesion["points_mm"]) == 5 and 0 <= lesion["slice"] < 20
        assert lesion["long_axis_mm"] >= lesion["short_axis_mm"] - 1e-6
    assert (tmp_path / "out" / "sample_ct" / "overlay.png").stat().st_size > 1000



def test_repeats_make_longer_epochs_with_fresh_augmentation(mini, tmp_path):
    from ctzoo.training.recistnet_task import RecistNetTask, load_train_config

    config = tiny_config(tmp_path, mini)
    once = RecistNetTask(load_train_config(config))
    cfg = load_train_config(config)
    thrice = RecistNetTask(cfg.model_copy(update={"repeats": 3}))
    assert len(thrice.train_set) == 3 * len(once.train_set)
    n = len(once.train_set)
    first, again = thrice.train_set[0], thrice.train_set[n]  # the same key slice, augmented twice
    assert first["file_name"] == again["file_name"] and not torch.equal(first["image"], again["image"])


def test_limitations_name_the_held_out_scan(tmp_path):
    from ctzoo.training.calibration import OPERATING_FP_RATES
    from ctzoo.training.publish import _held_out_scan, miniature_limitations

    (tmp_path / "lesions.json").write_text(json.dumps({"test_source": "sample_ct (DICOM)"}))
    assert _held_out_scan(tmp_path) == "sample_ct"
    assert "every patient drawn from sample_ct (DICOM)" in miniature_limitations(tmp_path)[0]
    (tmp_path / "lesions.json").write_text(json.dumps({"test_source": "example_ct.nii.gz"}))
    assert _held_out_scan(tmp_path) == "example_ct"
    publish = next(p for p in zoo.commands["publish"].params if p.name == "operating_fp")
    assert list(publish.type.choices) == [f"{r:g}" for r in OPERATING_FP_RATES]  # the rates calibration computes


def test_card_device_words():
    """The card names the card a run trained on (summary.json's device_name) and how many processes."""
    from ctzoo.training.publish import _device_words

    assert _device_words({"device": "cpu", "world_size": 1}) == "cpu"
    assert _device_words({"device": "cuda", "device_name": "NVIDIA H200"}) == "cuda (NVIDIA H200)"
    assert _device_words({"device": "cuda", "device_name": "NVIDIA H100", "world_size": 4}) == \
        "cuda (NVIDIA H100), 4 processes"
    assert _device_words({}) == "unknown"


def test_summary_of_an_unfinished_run_says_so():
    """summary.json is written after every epoch: one cut off by a scheduler says how far it got."""
    from ctzoo.training.engine import OptimConfig, _summary
    from ctzoo.training.recistnet_task import RecistNetTask

    summary = _summary(RecistNetTask, OptimConfig(epochs=120), 95, 0.94, 493.0, torch.device("cpu"), 1)
    assert summary["complete"] is False and summary["epochs_done"] == 95 and summary["epochs"] == 120
    assert _summary(RecistNetTask, OptimConfig(epochs=120), 120, 0.94, 600.0, torch.device("cpu"), 1)["complete"]


@pytest.mark.parametrize("augment_on", ["loader", "device"])
def test_hard_negatives_are_mined_from_lesion_free_training_slices_and_trained_on(mini, tmp_path, augment_on):
    """The miner scores only lesion-free slices of training patients, keeps the highest-scoring ones cropped around
    their strongest false detection, and the next epoch's batches include them (no keypoints: pure negatives),
    with the augmentation in the loader or on the device."""
    from ctzoo.datasets.deeplesion.info_csv import read_dl_info
    from ctzoo.training.hard_negatives import CropToFocusd
    from ctzoo.training.recistnet_task import RecistNetTask, load_train_config

    config = tiny_config(tmp_path, mini)
    cfg = load_train_config(config)
    cfg = cfg.model_copy(update={"hard_negatives": {"pool_per_series": 3, "keep": 2, "every": 1, "start_epoch": 1,
                                                    "margin": 32}, "augment": {"resample_on": augment_on}})
    cfg = type(cfg).model_validate(cfg.model_dump())
    task = RecistNetTask(cfg)
    model = task.build_model()
    train_series = {r.series_folder for r in read_dl_info(mini / "DL_info.csv") if r.train_val_test == 1}
    assert task.miner.items and all(not item["lesions"] for item in task.miner.items)
    assert {item["context_row"].series_folder for item in task.miner.items} <= train_series
    lesion_slices = {(r.series_folder, r.key_slice_index) for r in read_dl_info(mini / "DL_info.csv")}
    assert not {(i["context_row"].series_folder, i["context_row"].key_slice_index) for i in task.miner.items} \
        & lesion_slices
    assert not task.miner.due(0) and task.miner.due(1)
    task.before_epoch(model, torch.device("cpu"), 0)
    assert task.miner.mined is None  # nothing before start_epoch
    plain = len(task.train_batches(0, 4, 0, 0, 1).dataset)
    model.train()
    task.before_epoch(model, torch.device("cpu"), 1)
    assert model.training  # the miner scores in eval mode and leaves the mode as it found it
    history = task.miner.history[-1]
    assert history["kept"] == 2 and history["pool"] == len(task.miner.items)
    assert history["min_kept_score"] >= history["pool_mean_score"] - 1e-9  # the hardest, not random ones
    batches = task.train_batches(1, 4, 0, 0, 1)
    assert len(batches.dataset) == plain + 2
    assert sum(len(batch["keypoints"]) for batch in batches) == plain + 2  # mined items collate with the rest
    mined = [task.miner.mined[i] for i in range(2)]
    for sample in mined:  # on the device: the HU planes under the drawn output, at the slice's own pixel size
        assert len(sample["keypoints"]) == 0 and "focus" not in sample
        if augment_on == "loader":
            assert tuple(sample["image"].shape) == (3, 128, 128)
        else:
            assert sample["image"].shape[0] == 3 and min(sample["image"].shape[-2:]) >= 127 / 1.2 / 1.3
    crop = CropToFocusd((160, 160))({"image": torch.zeros(3, 300, 400), "focus": np.array([5.0, 390.0])})
    assert tuple(crop["image"].shape) == (3, 160, 160)  # clamped to the image at its corner


def test_a_run_mining_hard_negatives_resumes_bit_for_bit(mini, tmp_path):
    """The mined hard negatives are in every checkpoint: a run interrupted between two minings (every 2 epochs
    from epoch 0) and resumed trains on the set the interrupted one mined, not a new one, and ends with the
    straight run's weights."""
    from ctzoo.training.engine import fit
    from ctzoo.training.recistnet_task import RecistNetTask, load_train_config

    cfg = load_train_config(tiny_config(tmp_path, mini))
    cfg = type(cfg).model_validate({**cfg.model_dump(), "train_size": [64, 64], "eval_size": [128, 128],
                                    "model": {"width": 8, "head_channels": 8},
                                    "optim": {**cfg.optim.model_dump(), "eval_every": 10},
                                    "hard_negatives": {"pool_per_series": 2, "keep": 3, "every": 2, "start_epoch": 0}})

    class StopsAtEpoch1(RecistNetTask):
        def before_epoch(self, model, device, epoch):
            if epoch == 1:
                raise _Interrupted
            super().before_epoch(model, device, epoch)

    fit(RecistNetTask(cfg), cfg.optim, tmp_path / "straight", device="cpu", progress=False)
    with pytest.raises(_Interrupted):
        fit(StopsAtEpoch1(cfg), cfg.optim, tmp_path / "resumed", device="cpu", progress=False)
    saved = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert saved["epoch"] == 0 and saved["task_state"]["hard_negatives"]["epoch"] == 0
    assert len(saved["task_state"]["hard_negatives"]["items"]) == 3
    resumed_task = RecistNetTask(cfg)
    fit(resumed_task, cfg.optim, tmp_path / "resumed", resume=True, device="cpu", progress=False)
    assert len(resumed_task.miner.history) == 1  # restored, not mined again
    straight = torch.load(tmp_path / "straight" / "last.pt", weights_only=False)
    resumed = torch.load(tmp_path / "resumed" / "last.pt", weights_only=False)
    assert straight["task_state"] == resumed["task_state"]
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name
