"""ctzoo export: zoo models and training checkpoints into a Triton-layout model repository, checked against PyTorch."""

import hashlib
import json
import re
import shutil
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import safetensors.torch
import torch
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.datasets.segmentation import ABDOMEN_CLASSES
from ctzoo.export import parity as export_module
from ctzoo.export.graphs import HEADS
from ctzoo.export.repository import ExportSourceError, export_model, load_source
from ctzoo.models import ModelCard, create_model, list_models, load_card, model_entry, model_version
from ctzoo.models.recistnet import RecistNet
from ctzoo.models.registry import CARD_JSON, CARD_MD
from ctzoo.models.template_bank import INDEX_FILE, TENSORS_FILE, TemplateBank
from ctzoo.training.engine import OptimConfig
from ctzoo.training.recistnet_task import RecistNetTrainConfig
from ctzoo.training.template_seg_task import TemplateSegModelConfig, TemplateSegTrainConfig, build_seg_model

DETECTOR, SEGMENTER = "recistnet-mini", "template-seg-abdomen"
DATATYPES = {onnx.TensorProto.FLOAT: "FP32", onnx.TensorProto.FLOAT16: "FP16"}


@pytest.fixture(scope="module")
def repo(tmp_path_factory):
    return tmp_path_factory.mktemp("repo")


@pytest.fixture(scope="module")
def exported(repo):
    """``exported(name)``: the zoo model's folder, exported once per module."""
    folders = {}

    def get(name: str):
        if name not in folders:
            folders[name] = export_model(name, repo)
        return folders[name]

    return get


def graph_tensors(path) -> tuple[list[dict], list[dict]]:
    """Inputs and outputs of an ONNX file, read here independently of the exporter."""
    graph = onnx.load(str(path)).graph

    def describe(value):
        dims = [d.dim_value if d.HasField("dim_value") else -1 for d in value.type.tensor_type.shape.dim]
        return {"name": value.name, "datatype": DATATYPES[value.type.tensor_type.elem_type], "shape": dims}

    return [describe(v) for v in graph.input], [describe(v) for v in graph.output]


def parse_pbtxt(text: str) -> dict:
    """The fields of our config.pbtxt that Triton needs (a small reader for the text protobuf we write)."""
    blocks = {kind: [{"name": name, "data_type": dtype, "dims": [int(d) for d in dims.split(",")]}
                     for name, dtype, dims in re.findall(r'name: "([^"]+)"\s+data_type: (\w+)\s+dims: \[([^\]]*)\]',
                                                         re.search(rf"^{kind} \[(.*?)^\]", text, re.S | re.M)[1])]
              for kind in ("input", "output")}
    return {"name": re.search(r'^name: "([^"]+)"', text, re.M)[1],
            "platform": re.search(r'^platform: "([^"]+)"', text, re.M)[1],
            "max_batch_size": int(re.search(r"^max_batch_size: (\d+)", text, re.M)[1]),
            "delay_us": int(re.search(r"dynamic_batching \{\s*max_queue_delay_microseconds: (\d+)\s*\}", text)[1]),
            **blocks}


def check_layout(folder, info: dict, precision: str) -> None:
    """The repository contract: files, config.pbtxt and ctzoo.json agree with the graph."""
    graph = folder / "1" / "model.onnx"
    onnx.checker.check_model(str(graph))
    inputs, outputs = graph_tensors(graph)
    assert info["inputs"] == inputs and info["outputs"] == outputs
    assert all(t["shape"][0] == -1 for t in inputs + outputs)  # dynamic batch
    assert info["name"] == folder.name and info["precision"] == precision and info["opset"] == 17
    assert info["max_batch_size"] == 16 and info["max_queue_delay_ms"] == 2.0
    assert {"ctzoo", "torch", "onnx", "onnxruntime"} <= set(info["software"])
    assert re.match(r"\d{4}-\d\d-\d\dT", info["created"])
    config = parse_pbtxt((folder / "config.pbtxt").read_text())
    assert (config["name"], config["platform"], config["max_batch_size"], config["delay_us"]) == \
        (folder.name, "onnxruntime_onnx", 16, 2000)
    for kind, tensors in (("input", inputs), ("output", outputs)):
        assert config[kind] == [{"name": t["name"], "data_type": f"TYPE_{t['datatype']}", "dims": t["shape"][1:]}
                                for t in tensors]
    ModelCard.model_validate_json((folder / CARD_JSON).read_text())
    assert (folder / "README.md").read_text().startswith("# ")


@pytest.mark.parametrize("name", list_models())
def test_every_zoo_model_exports_with_the_repository_layout(name, repo, exported):
    folder = exported(name)
    assert folder == repo / name
    assert not [p.name for p in repo.iterdir() if p.name.startswith(".")]  # no staging left behind
    entry = model_entry(name)
    # the bundle itself, plus what runs without PyTorch
    expected_files = {"1", "config.pbtxt", "ctzoo.json", CARD_JSON, "README.md", "model.safetensors",
                      "config.json", "bundle.json"}
    if entry.task == "segmentation":
        expected_files |= {TENSORS_FILE, INDEX_FILE}
    assert {p.name for p in folder.iterdir()} == expected_files
    graphs = ["embed.onnx", "model.onnx"] if entry.task == "segmentation" else ["model.onnx"]
    assert sorted(p.name for p in (folder / "1").iterdir()) == graphs
    info = json.loads((folder / "ctzoo.json").read_text())
    check_layout(folder, info, "fp32")
    assert (info["version"], info["task"], info["source"]) == (model_version(name), entry.task, name)
    assert info["input_spec"] == load_card(name).input_spec
    # the zoo's card and bank, byte for byte
    assert (folder / CARD_JSON).read_bytes() == (entry.weights_dir / CARD_JSON).read_bytes()
    assert (folder / "README.md").read_bytes() == (entry.weights_dir / CARD_MD).read_bytes()
    model = create_model(name, pretrained=True).eval()
    parity = info["parity"]
    assert parity["relative_tolerance"] == 1e-4
    if entry.task == "detection":
        assert info["down_ratio"] == model.down_ratio == 4
        assert [t["name"] for t in info["inputs"]] == ["image"] and info["inputs"][0]["shape"] == [-1, 9, -1, -1]
        assert [t["name"] for t in info["outputs"]] == list(HEADS)
        # the heads are a quarter of the image's size: their symbolic axes are their own, not the image's
        graph = onnx.load(str(folder / "1" / "model.onnx")).graph
        axes = {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim]
                for v in [*graph.input, *graph.output]}
        assert axes["image"] == ["batch", 9, "height", "width"]
        assert all(axes[head][::2] == ["batch", "out_height"] and axes[head][3] == "out_width" for head in HEADS)
        assert set(parity["checks"]) == {"random_b2", "random_b3", "random_size", "real_ct"}
        assert parity["checks"]["real_ct"]["inputs"] == {"image": [3, 9, 512, 512]}  # the inference canvas
    else:
        for file in (TENSORS_FILE, INDEX_FILE):
            assert (folder / file).read_bytes() == (entry.weights_dir / file).read_bytes()
        assert info["class_names"] == load_card(name).input_spec["classes"]
        assert info["inputs"] == [{"name": "image", "datatype": "FP32", "shape": [-1, 1, 128, 128]},
                                  {"name": "template", "datatype": "FP32", "shape": [-1, 6, 128, 128]}]
        assert info["outputs"] == [{"name": "logits", "datatype": "FP32", "shape": [-1, 6, 128, 128]}]
        assert set(parity["checks"]) == {"random_b2", "random_b3", "real_ct"}
        assert parity["checks"]["real_ct"]["inputs"]["template"][1:] == [6, 128, 128]
    batches = {c["inputs"][next(iter(c["inputs"]))][0] for c in parity["checks"].values()}
    assert len(batches) >= 2  # two batch sizes at least
    errors = [e for check in parity["checks"].values() for e in check["errors"].values()]
    assert len(errors) == len(parity["checks"]) * len(info["outputs"])
    # measured ~1e-6: the row-wise norm export keeps ONNX Runtime close to PyTorch
    assert all(0 <= e["max_rel"] <= 1e-5 and e["max_abs"] >= 0 for e in errors)

    # and independently of the recorded numbers: a batch of 4 that no check used
    session = ort.InferenceSession(str(folder / "1" / "model.onnx"), providers=["CPUExecutionProvider"])
    generator = torch.Generator().manual_seed(7)
    if entry.task == "detection":
        feeds = {"image": torch.rand(4, 9, 64, 96, generator=generator)}
        with torch.inference_mode():
            expected = [model(feeds["image"])[k] for k in HEADS]
    else:
        bank = TemplateBank.load(folder)
        feeds = {"image": torch.rand(4, 1, 128, 128, generator=generator), "template": bank.templates([0, 3, 5, 9])}
        with torch.inference_mode():
            expected = [model(feeds["image"], feeds["template"])]
    got = session.run(None, {k: v.numpy() for k, v in feeds.items()})
    for value, reference in zip(got, expected):
        assert value.shape == reference.shape
        assert np.abs(value - reference.numpy()).max() <= 1e-4 * (np.abs(reference.numpy()).max() + 1e-6)


def test_changed_graphs_and_weights_of_an_export_are_refused(tmp_path, exported):
    """ctzoo.json records the digests of the graph and the weights; a file changed after the export is refused
    where it is about to run (ONNX backend, ctzoo serve, the network), and replies name the digest that ran."""
    from ctzoo.inference.backends import make_backend
    from ctzoo.models.bundle import BundleError, load_bundle
    from ctzoo.serve.repository import load_repository

    info = json.loads((exported(DETECTOR) / "ctzoo.json").read_text())
    intact = load_bundle(exported(DETECTOR))
    assert intact.graphs.describe(intact.folder)["sha256"] == info["sha256"]
    assert info["weights_sha256"] == hashlib.sha256((intact.folder / "model.safetensors").read_bytes()).hexdigest()
    for changed in ("1/model.onnx", "model.safetensors"):
        repo = tmp_path / changed.replace("/", "_")
        shutil.copytree(exported(DETECTOR), repo / DETECTOR)
        path = repo / DETECTOR / changed
        content = bytearray(path.read_bytes())
        content[-100] ^= 1  # one bit in the last tensor's data: still a readable file
        path.write_bytes(bytes(content))
        bundle = load_bundle(repo / DETECTOR)
        if changed == "1/model.onnx":
            with pytest.raises(BundleError, match=r"model.onnx has sha256 \w+, but .*ctzoo.json records"):
                make_backend(bundle, "onnx", "cpu")
            with pytest.raises(BundleError, match="was changed after it was exported"):
                load_repository(repo, device="cpu")
            bundle.network()  # the weights are intact
        else:
            with pytest.raises(BundleError, match=r"model.safetensors has sha256 \w+, but .*ctzoo.json records"):
                bundle.network()
            make_backend(bundle, "onnx", "cpu")  # the graph is intact
    # exports written before the weights' digest was recorded load as before
    repo = tmp_path / "older"
    shutil.copytree(exported(DETECTOR), repo / DETECTOR)
    (repo / DETECTOR / "ctzoo.json").write_text(json.dumps({k: v for k, v in info.items() if k != "weights_sha256"}))
    load_bundle(repo / DETECTOR).network()


def test_a_graph_ctzoo_json_records_must_be_there(tmp_path, exported, monkeypatch):
    """A recorded graph that is missing is an error, not a bundle without graphs exported again into the cache."""
    from ctzoo.models.bundle import BundleError, load_bundle

    folder = shutil.copytree(exported(DETECTOR), tmp_path / DETECTOR)
    (folder / "1" / "model.onnx").unlink()
    with pytest.raises(BundleError, match=r"ctzoo.json records 1/model.onnx but it is missing; export the model"):
        load_bundle(folder)
    monkeypatch.setenv("CTZOO_CACHE", str(tmp_path / "cache"))
    result = CliRunner().invoke(main, ["infer", "--model", str(folder), "--backend", "onnx", "--out",
                                       str(tmp_path / "out"), "--workers", "0"])
    assert result.exit_code == 1 and "records 1/model.onnx but it is missing" in result.output.splitlines()[-1]
    assert not (tmp_path / "cache").exists()


def test_serve_reads_the_graph_ctzoo_json_describes_and_refuses_others(tmp_path, exported):
    """ctzoo serve reads a model folder as load_bundle does: version 1, the graph the export checked and the study
    endpoints run; another version folder is refused, and so are a ctzoo.json that cannot be read (named) and a
    recorded graph that is missing."""
    from ctzoo.models.bundle import BundleError, load_bundle
    from ctzoo.serve.repository import load_repository

    repo = tmp_path / "repo"
    folder = shutil.copytree(exported(DETECTOR), repo / DETECTOR)
    model = load_repository(repo, device="cpu")[DETECTOR]
    assert model.version == "1" and model.config == load_bundle(folder).graphs.info
    (folder / "2").mkdir()
    shutil.copyfile(folder / "1" / "model.onnx", folder / "2" / "model.onnx")
    with pytest.raises(ValueError, match=r"2/model.onnx: .*ctzoo.json describes version 1 only.* remove .*/2$"):
        load_repository(repo, device="cpu")
    shutil.rmtree(folder / "2")
    (folder / "ctzoo.json").write_text('{"name": ')
    with pytest.raises(BundleError, match=re.escape(f"{folder / 'ctzoo.json'}: ")):
        load_repository(repo, device="cpu")
    shutil.copyfile(exported(DETECTOR) / "ctzoo.json", folder / "ctzoo.json")
    (folder / "1" / "model.onnx").unlink()  # no longer skipped as a folder without a graph
    with pytest.raises(BundleError, match="records 1/model.onnx but it is missing"):
        load_repository(repo, device="cpu")
    (folder / "ctzoo.json").unlink()
    with pytest.raises(FileNotFoundError, match="no models in"):  # neither a record nor a graph: not a model
        load_repository(repo, device="cpu")


def test_fp16_detector_export(repo, exported):
    folder = export_model(DETECTOR, repo, fp16=True)
    assert folder == repo / f"{DETECTOR}-fp16"
    info = json.loads((folder / "ctzoo.json").read_text())
    check_layout(folder, info, "fp16")
    assert info["name"] == f"{DETECTOR}-fp16" and "onnxconverter-common" in info["software"]
    # fp32 in and out (same clients as the fp32 model), fp16 weights and arithmetic inside
    assert all(t["datatype"] == "FP32" for t in info["inputs"] + info["outputs"])
    model = onnx.load(str(folder / "1" / "model.onnx"))
    weights = [t for t in model.graph.initializer if t.name.endswith("stem.conv.weight")]
    assert weights and all(t.data_type == onnx.TensorProto.FLOAT16 for t in weights)
    assert info["inputs"] == json.loads((exported(DETECTOR) / "ctzoo.json").read_text())["inputs"]
    parity = info["parity"]
    assert parity["relative_tolerance"] == export_module.FP16_RELATIVE_TOLERANCE == 1e-2
    rel = [e["max_rel"] for check in parity["checks"].values() for e in check["errors"].values()]
    # measured 4e-4 .. 2e-3: within the fp16 tolerance, and far from fp32's 1e-6 (it really is fp16)
    assert max(rel) <= 1e-2 and min(rel) > 1e-5
    assert set(parity["checks"]) == {"random_b2", "random_b3", "random_size", "real_ct"}


def test_failed_check_raises_and_keeps_the_earlier_export(tmp_path, monkeypatch, exported):
    good = exported(DETECTOR)
    repo = tmp_path / "repo"
    repo.mkdir()
    shutil.copytree(good, repo / DETECTOR)
    before = {p.relative_to(repo): (p.stat().st_mtime_ns, p.read_bytes()) for p in repo.rglob("*") if p.is_file()}
    monkeypatch.setattr(export_module, "RELATIVE_TOLERANCE", -1.0)
    with pytest.raises(RuntimeError, match=r"'heatmaps' on random_b2 .*max relative error .* > -1.*'displacements'"):
        export_model(DETECTOR, repo)
    after = {p.relative_to(repo): (p.stat().st_mtime_ns, p.read_bytes()) for p in repo.rglob("*") if p.is_file()}
    assert after == before and [p.name for p in repo.iterdir()] == [DETECTOR]
    with pytest.raises(RuntimeError, match="disagree"):
        export_model(DETECTOR, tmp_path / "new")
    assert not (tmp_path / "new").exists()


def test_next_export_removes_what_a_killed_export_left_and_nothing_else(tmp_path):
    """A SIGKILLed export leaves ``.<name>.partial-XXXXXXXX/`` with its lock file, unlocked (the kernel dropped the
    dead process's lock). The next export of that name removes it; a staging folder whose export still runs
    (its lock held), another model's, one of another shape, a symlink and a young folder without a lock stay."""
    import fcntl
    import os
    import time

    from ctzoo.export.repository import STAGING_LOCK, remove_stale_staging

    repo = tmp_path / "repo"

    def staging(name: str, locked_file: bool = True) -> Path:
        folder = repo / name
        (folder / "1").mkdir(parents=True)
        (folder / "1" / "model.onnx").write_bytes(b"half an ONNX graph")
        if locked_file:
            (folder / STAGING_LOCK).write_text("")
        return folder

    killed = staging(f".{DETECTOR}.partial-k1lled_0")
    running = staging(f".{DETECTOR}.partial-runn1ng0")
    old_unlocked = staging(f".{DETECTOR}.partial-0ldc0py0", locked_file=False)  # a ctzoo before the lock wrote it
    hours_ago = time.time() - 7200
    os.utime(old_unlocked, (hours_ago, hours_ago))
    kept = [running,
            staging(f".{DETECTOR}.partial-y0ung000", locked_file=False),  # maybe an export that is just starting
            staging(f".{DETECTOR}-fp16.partial-k1lled_0"),  # another target's
            staging(f".{DETECTOR}.partial-k1lled_0.old"),  # not a name the exporter gives
            staging("other-model")]
    (repo / f".{DETECTOR}.partial-f1le0000").write_text("a file, not a staging folder")
    elsewhere = staging("elsewhere")
    (repo / f".{DETECTOR}.partial-l1nk0000").symlink_to(elsewhere, target_is_directory=True)
    kept += [repo / f".{DETECTOR}.partial-f1le0000", repo / f".{DETECTOR}.partial-l1nk0000", elsewhere]
    with open(running / STAGING_LOCK, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX | fcntl.LOCK_NB)  # as the running export holds it
        result = CliRunner().invoke(main, ["export", DETECTOR, "--out", str(repo)])
        assert result.exit_code == 0, result.output
        assert f"removed {killed}, left behind by an export that was killed" in result.output
    assert not killed.exists() and not old_unlocked.exists()
    assert all(path.exists() for path in kept) and (elsewhere / "1" / "model.onnx").is_file()
    assert sorted(p.name for p in repo.iterdir()) == sorted([DETECTOR, *(p.name for p in kept)])
    assert STAGING_LOCK not in {p.name for p in (repo / DETECTOR).iterdir()}  # the lock stays out of the export
    # the running export's lock is released (it was killed in turn): now it is stale too
    assert remove_stale_staging(repo, DETECTOR, print) == [running] and not running.exists()


def recistnet_checkpoint(run) -> tuple:
    """A fresh RECIST-Net saved as ctzoo train saves it (engine.fit's payload + train_config), trained on nothing."""
    cfg = RecistNetTrainConfig(data={"root": run / "data", "num_slices": 3})  # one window: 3 channels
    torch.manual_seed(0)
    model = RecistNet(in_channels=cfg.data.in_channels, **cfg.model.model_dump())
    optimizer = torch.optim.AdamW(model.parameters())
    run.mkdir(parents=True)
    payload = {"model": model.state_dict(), "optimizer": optimizer.state_dict(), "epoch": 2, "step": 6, "best": 0.25,
               "history": [{"epoch": 3, "step": 6, "train_loss": 1.0, "val_sensitivity_4fp": 0.25, "wall_s": 4.0}],
               "config": OptimConfig().model_dump(), "train_config": json.loads(cfg.model_dump_json())}
    torch.save(payload, run / "best.pt")
    return run / "best.pt", model


def test_checkpoint_export_through_the_cli(tmp_path):
    checkpoint, model = recistnet_checkpoint(tmp_path / "runs" / "mini-run")
    bundle, source = load_source(str(checkpoint), workdir=tmp_path / "work")
    assert bundle.name == "mini-run" and source == str(checkpoint.resolve())  # the default name: the run folder's
    repo = tmp_path / "repo"
    (repo / "recistnet-mine").mkdir(parents=True)  # an empty folder of that name is taken
    result = CliRunner().invoke(main, ["export", str(checkpoint), "--out", str(repo), "--name", "recistnet-mine"])
    assert result.exit_code == 0, result.output
    assert "real_ct" in result.output and "max rel" in result.output and "wrote" in result.output
    folder = repo / "recistnet-mine"
    info = json.loads((folder / "ctzoo.json").read_text())
    check_layout(folder, info, "fp32")
    assert info["source"] == str(checkpoint.resolve()) and info["task"] == "detection" and info["down_ratio"] == 4
    assert re.fullmatch(r"0\.0\.0\+epoch3\.[0-9a-f]{8}", info["version"])
    assert info["inputs"][0]["shape"] == [-1, 3, -1, -1]
    assert info["input_spec"]["num_slices"] == 3 and info["input_spec"]["extra_windows_hu"] == []
    assert info["input_spec"]["size_multiple"] == 32
    assert info["parity"]["checks"]["real_ct"]["inputs"] == {"image": [3, 3, 512, 512]}
    card = ModelCard.model_validate_json((folder / CARD_JSON).read_text())
    assert card.name == "recistnet-mine" and card.version == info["version"] and card.training.epochs == 3
    assert card.metrics["sensitivity_4fp"].value == 0.25
    assert card.parameters == sum(p.numel() for p in model.parameters())
    # the exported folder is a whole bundle: ctzoo infer runs it, on its ONNX graph and on its weights
    for backend in ("onnx", "torch"):
        out = tmp_path / f"infer-{backend}"
        result = CliRunner().invoke(main, ["infer", "--model", str(folder), "--backend", backend, "--out", str(out),
                                           "--workers", "0", "--no-overlay"])
        assert result.exit_code == 0, result.output
        document = json.loads((out / "sample_ct" / "detections.json").read_text())
        assert document["model"] == "recistnet-mine" and document["model_version"] == info["version"]
        runtime = document["runtime"]  # what predicted it: the graph by its hash, or the weights and precision
        assert runtime["backend"] == backend and runtime["device"] == "cpu" and runtime["precision"] == "fp32"
        if backend == "onnx":
            assert runtime["graph"]["sha256"] == info["sha256"] and runtime["graph"]["precision"] == "fp32"
        else:
            assert runtime["compiled"] is False


def test_export_replaces_only_earlier_exports_and_never_its_source(tmp_path):
    """OUT/<name> is replaced only when it is an earlier export (ctzoo.json) or an empty folder: a training run
    (the default name of a checkpoint's export is its run folder's), another folder or a file of that name is
    refused before anything is written, with what to choose instead."""
    checkpoint, _ = recistnet_checkpoint(tmp_path / "runs" / "mini-run")
    (checkpoint.parent / "train_log.jsonl").write_text('{"epoch": 1}\n')
    (tmp_path / "other" / DETECTOR).mkdir(parents=True)
    (tmp_path / "other" / DETECTOR / "notes.txt").write_text("not an export")
    (tmp_path / "file").mkdir()
    (tmp_path / "file" / DETECTOR).write_text("a file")
    cases = [([str(checkpoint), "--out", str(tmp_path / "runs")], "mini-run holds .*best.pt, which is being exported"),
             ([DETECTOR, "--out", str(tmp_path / "other")], "exists and is not an earlier export .*no ctzoo.json"),
             ([DETECTOR, "--out", str(tmp_path / "file")], "exists and is not a folder")]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    for args, message in cases:
        result = CliRunner().invoke(main, ["export", *args])
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code == 1 and len(errors) == 1 and re.search(message, errors[0]), result.output
        assert "choose another name with --name or another --out" in errors[0]
        assert "exporting" not in result.output  # refused before any graph was exported
    assert {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()} == before  # nothing hidden added


def test_an_unwritable_out_is_one_line(tmp_path, monkeypatch):
    import tempfile

    readonly = tmp_path / "ro"
    readonly.mkdir()
    mkdtemp = tempfile.mkdtemp

    def refuse_in_readonly(suffix=None, prefix=None, dir=None):  # as a read-only folder would (tests may run as root)
        if dir is not None and Path(dir) == readonly:
            raise PermissionError(13, "Permission denied")
        return mkdtemp(suffix, prefix, dir)

    monkeypatch.setattr(tempfile, "mkdtemp", refuse_in_readonly)
    result = CliRunner().invoke(main, ["export", DETECTOR, "--out", str(readonly)])
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    assert result.output.splitlines()[-1] == f"Error: cannot write to {readonly}: Permission denied"
    assert list(readonly.iterdir()) == []


def test_template_segmenter_checkpoint_needs_and_reembeds_its_bank(tmp_path):
    run = tmp_path / "seg-run" / "template_seg"
    run.mkdir(parents=True)
    cfg = TemplateSegTrainConfig(data={"spacing_mm": 3.0, "size": (128, 128)},
                                 model=TemplateSegModelConfig(channels=(8, 16, 32, 64)))
    torch.manual_seed(0)
    model = build_seg_model(cfg.model, len(ABDOMEN_CLASSES)).eval()
    torch.save({"model": model.state_dict(), "epoch": 0, "history": [], "model_kind": "template_seg",
                "class_names": list(ABDOMEN_CLASSES), "task_config": cfg.model_dump(mode="json")}, run / "best.pt")
    with pytest.raises(ExportSourceError, match="--templates DIR"):
        export_model(str(run / "best.pt"), tmp_path / "repo")
    assert not (tmp_path / "repo").exists()
    bank_dir = model_entry(SEGMENTER).weights_dir
    folder = export_model(str(run / "best.pt"), tmp_path / "repo", templates=bank_dir)
    assert folder.name == "seg-run"
    info = json.loads((folder / "ctzoo.json").read_text())
    check_layout(folder, info, "fp32")
    assert info["class_names"] == list(ABDOMEN_CLASSES) and info["input_spec"]["size"] == [128, 128]
    assert all(e["max_rel"] <= 1e-4 for c in info["parity"]["checks"].values() for e in c["errors"].values())
    # the bank's embeddings are this checkpoint's, not those shipped with the zoo weights
    embeddings = safetensors.torch.load_file(str(folder / TENSORS_FILE))["embeddings"]
    shipped = TemplateBank.load(bank_dir)
    with torch.inference_mode():
        torch.testing.assert_close(embeddings, model.embed(shipped.images))
    assert embeddings.shape == (len(shipped), 64) != shipped.embeddings.shape  # a narrower model than the zoo's


def test_cli_help_and_clear_errors(tmp_path):
    runner = CliRunner()
    assert "ctzoo export MODEL --out REPO" in runner.invoke(main, ["--help"]).output
    result = runner.invoke(main, ["export", "--help"])
    assert result.exit_code == 0
    for word in ("MODEL_OR_CHECKPOINT", "--out", "--fp16", "--opset", "--templates", "--name", "config.pbtxt"):
        assert word in result.output
    cases = [(["recistnet-mimi"], r"no model named 'recistnet-mimi'\. Did you mean recistnet-mini\?"),
             ([str(tmp_path / "run" / "best.pt")], "no checkpoint file"),
             ([DETECTOR, "--name", "Bad Name"], "choose one with --name"),
             ([DETECTOR, "--templates", str(tmp_path)], "--templates is for template-segmenter checkpoints")]
    (tmp_path / "junk.pt").write_text("not a checkpoint")
    cases.append(([str(tmp_path / "junk.pt")], "is not a PyTorch checkpoint"))
    for args, message in cases:
        result = runner.invoke(main, ["export", *args, "--out", str(tmp_path / "repo")])
        errors = [line for line in result.output.splitlines() if line.startswith("Error")]
        assert result.exit_code == 1 and len(errors) == 1 and re.search(message, errors[0]), result.output
        assert "Traceback" not in result.output
    assert not (tmp_path / "repo").exists()


def test_a_segmenter_that_never_reads_its_template_keeps_the_template_input(tmp_path):
    """Fused at no level (an architecture search may pick that), the network ignores its template; the exporter would
    drop the input, so clients and Triton configs would differ by model. ``keep_declared_inputs`` puts it back."""
    from ctzoo.export.graphs import export_graph, segmenter_graph
    from ctzoo.models.template_seg import TemplateSegNet

    net = TemplateSegNet(num_classes=2, channels=(4, 8), strides=(2,), fusion_levels=()).eval()
    generator = torch.Generator().manual_seed(0)
    example = {"image": torch.randn(2, 1, 32, 32, generator=generator),
               "template": torch.randn(2, 3, 32, 32, generator=generator)}
    path = tmp_path / "model.onnx"
    export_graph(segmenter_graph(net, [("random", example)]), path, opset=17)
    model = onnx.load(str(path))
    assert [value.name for value in model.graph.input] == ["image", "template"]
    template_shape = [d.dim_param or d.dim_value for d in model.graph.input[1].type.tensor_type.shape.dim]
    assert template_shape == ["batch", 3, 32, 32]
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    logits = session.run(None, {name: tensor.numpy() for name, tensor in example.items()})[0]
    with torch.no_grad():
        np.testing.assert_allclose(logits, net(example["image"], example["template"]).numpy(), atol=1e-4)
