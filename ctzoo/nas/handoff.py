"""The hand-off: one candidate of a search run, retrained standalone and published as a zoo model bundle.

:func:`export_candidate` reads the candidate from ``RUN/candidates.json``, describes its network as a training
config (the template segmenter's ``model:`` block with per-level channels, kernels, residual units, fused levels
and gate: :func:`candidate_model`), trains it with the template segmenter's own recipe
(:func:`~ctzoo.training.template_seg_task.train_with_baseline` without the UNet baseline: CONFIG's data,
augmentation, optimiser and epochs, validation picking ``best.pt``, then the test patient, clean only: the
card reports that, and the robustness study belongs to the segmenter's own benchmark) and publishes it with
:func:`~ctzoo.training.publish.publish_template_seg`, the one template-segmenter bundle and card writer. The
retraining lives in ``RUN/export/<candidate>/``: ``config.yaml`` (what was trained; ``ctzoo train`` can run it
again), ``init/model.safetensors`` (the starting weights), checkpoints and ``comparison.json``.

By default the network starts from the weights the supernet holds for it now (``RUN/supernet/last.pt``, cut out
by :func:`~ctzoo.nas.supernet.extract`): those are the weights the candidate was scored with (or, for a candidate
of an earlier iteration, the same weights trained further), so a short retraining refines what the search
measured instead of starting over (and the one-shot score is where it starts). ``init="scratch"`` trains a freshly
initialised network instead (the standalone figure a ranking study such as the planned benchmark wants).
"""

from __future__ import annotations

import math
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any, Literal

import safetensors.torch
import yaml

from ctzoo.models.registry import WEIGHTS_FILE, Metric
from ctzoo.models.seg_networks import TemplateSegModelConfig
from ctzoo.nas.search import CANDIDATES_FILE, load_supernet, read_candidates
from ctzoo.nas.space import Architecture, SearchSpace
from ctzoo.nas.supernet import extract, subnet_config
from ctzoo.training.publish import SEG_LIMITATIONS, publish_template_seg
from ctzoo.training.seg_evaluation import CONDITIONS
from ctzoo.training.template_seg_task import load_seg_config, seg_classes, train_with_baseline

EXPORT_DIR = "export"
Init = Literal["supernet", "scratch"]


def find_candidate(document: dict[str, Any], candidate_id: str, run: str | Path = "RUN") -> dict[str, Any]:
    """The entry of ``candidates.json`` whose id is ``candidate_id`` (or starts with it, when only one does);
    ValueError naming a few ids (the best by Dice first) otherwise."""
    candidates = document["candidates"]
    exact = [c for c in candidates if c["id"] == candidate_id]
    matches = exact or [c for c in candidates if candidate_id and c["id"].startswith(candidate_id)]
    if len(matches) == 1:
        return matches[0]
    best = sorted(candidates, key=lambda c: -c["dice"])  # the reader guarantees a number
    listed = ", ".join(f"{c['id']} (Dice {c['dice']}, {c['description']})" for c in (matches or best)[:5])
    if matches:
        raise ValueError(f"candidate {candidate_id!r} is ambiguous in {run}: it starts {len(matches)} ids: {listed}")
    raise ValueError(f"no candidate {candidate_id!r} in {Path(run) / CANDIDATES_FILE} ({len(candidates)} "
                     f"candidates); the best by Dice: {listed or 'none'}")


def candidate_model(space: SearchSpace, arch: Architecture) -> TemplateSegModelConfig:
    """The training config's ``model:`` block of ``arch``: the network :func:`~ctzoo.nas.supernet.extract` gives
    (same constructor arguments, :func:`~ctzoo.nas.supernet.subnet_config`), for 2-D single-channel spaces."""
    net = subnet_config(space, arch)
    if net["spatial_dims"] != 2 or net["in_channels"] != 1 or set(net["strides"]) != {2}:
        raise ValueError("the template segmenter's training recipe trains 2-D single-channel networks with stride 2 "
                         f"between levels; this search space is {net['spatial_dims']}-D, {net['in_channels']} "
                         f"channel(s), strides {net['strides']}")
    return TemplateSegModelConfig(channels=net["channels"], share_encoders=net["share_encoders"],
                                  fusion_levels=net["fusion_levels"], gate=net["gate"],
                                  temperature=net["temperature"], kernel_sizes=net["kernel_sizes"],
                                  subunits=net["subunits"])


def export_candidate(run: str | Path, candidate_id: str, config: str | Path, out: str | Path,
                     epochs: int | None = None, name: str | None = None, version: str = "0.1.0",
                     init: Init = "supernet", device: str = "auto", progress: bool = False) -> Path:
    """Retrain candidate ``candidate_id`` of search ``run`` standalone with the template-seg recipe of ``config``
    (its ``epochs`` unless given) and publish it as a bundle in ``out`` named ``name`` (default
    ``template-seg-nas-<id>``); see the module docstring. The card records the run, the candidate, its
    architecture, its one-shot Dice and latency, and the retrained network's validation and test Dice.

    ValueError for an unknown candidate, a run without a search, or a config whose classes do not match the
    search's; the bundle folder is written atomically once training and evaluation have finished (nothing is
    written there on failure). Returns the bundle folder."""
    if init not in ("supernet", "scratch"):
        raise ValueError(f"init must be 'supernet' or 'scratch', got {init!r}")
    run, out = Path(run), Path(out)
    document = read_candidates(run)
    if document is None or not document["candidates"]:
        raise ValueError(f"{run} holds no search candidates ({CANDIDATES_FILE} is missing or empty): run ctzoo nas "
                         "search first")
    candidate = find_candidate(document, candidate_id, run)
    space = replace(SearchSpace.from_json(document["space"]), allowed={})  # a candidate of an earlier iteration
    arch = Architecture.from_json(candidate["architecture"])                # may lie outside the later constraints
    cfg = load_seg_config(config)
    classes = list(seg_classes(cfg.data))
    if len(classes) != space.num_classes:
        raise ValueError(f"{config} segments {len(classes)} classes ({', '.join(classes)}); the search's networks "
                         f"have {space.num_classes}: use the config the search ran with")
    work = run / EXPORT_DIR / candidate["id"]
    shutil.rmtree(work, ignore_errors=True)  # a fresh retraining each time: never resume an earlier export's
    work.mkdir(parents=True)
    init_weights = None
    if init == "supernet":
        init_weights = work / "init"
        init_weights.mkdir()
        net = extract(load_supernet(run / "supernet" / "last.pt", space), arch)
        safetensors.torch.save_file({k: v.detach().contiguous().clone() for k, v in net.state_dict().items()},
                                    str(init_weights / WEIGHTS_FILE))  # copies: the shared encoders tie tensors
    optim = cfg.optim if epochs is None else cfg.optim.model_copy(update={"epochs": epochs})
    trained = {**cfg.model_dump(mode="json"), "model": candidate_model(space, arch).model_dump(mode="json"),
               "optim": optim.model_dump(mode="json"), "baseline_unet": False, "init_from_expansion": None,
               "init_weights": None if init_weights is None else str(init_weights)}
    config_file = work / "config.yaml"
    config_file.write_text(yaml.safe_dump(trained, sort_keys=False), encoding="utf-8")
    comparison = train_with_baseline(load_seg_config(config_file), work, device=device, progress=progress,
                                     conditions={"clean": CONDITIONS["clean"]})
    summary = comparison["training"]["template_seg"]
    cid = candidate["id"]
    scored_on = scored_split(document, candidate)
    extra = {"oneshot_dice_mean": (candidate["dice"], f"{scored_on} (the search's scoring cases, supernet weights)"),
             "oneshot_latency_ms": (candidate["latency_ms"], "CPU, ONNX Runtime, 1 thread (the search's measure)"),
             "dice_mean_val": (summary.get("best_dice_mean"), "val (standalone, best epoch)")}
    metrics = {k: Metric(value=round(float(v), 4), split=split) for k, (v, split) in extra.items()
               if v is not None and math.isfinite(float(v))}
    start = "the supernet's weights for it (RUN/supernet/last.pt)" if init == "supernet" else "scratch"
    notes = (f"Candidate {cid} of the one-shot search {run} (iteration {candidate['iteration']}): "
             f"{candidate['description']}; one-shot Dice {candidate['dice']} and latency "
             f"{candidate['latency_ms']:.2f} ms in the search. Retrained standalone from {start} for "
             f"{optim.epochs} epochs.")
    command = (f"ctzoo nas export {run} {cid} --config {config} --out {out}"
               f"{'' if epochs is None else f' --epochs {epochs}'}{'' if init == 'supernet' else ' --init scratch'}")
    description = (f"Template segmenter found by one-shot architecture search (candidate {cid} of {run}: "
                   f"{candidate['description']}), retrained standalone; segments {', '.join(classes)}.")
    limitation = ("Chosen by a search that scored candidates on the data's test cases (the TotalSegmentator sample "
                  "has no validation patient of its own): when they are this model's test cases (search and "
                  "retraining on the same config), the test Dice is optimistic; an honest figure needs a test patient "
                  "the search never scored on (benchmarks/nas.py swaps them).")
    caveat = [limitation] if scored_on == "test" else []
    return publish_template_seg(work, config_file, name or f"template-seg-nas-{cid}", version, command=command,
                                target=out, description=description, notes=notes, extra_metrics=metrics,
                                limitations=[*SEG_LIMITATIONS[:-1], *caveat, SEG_LIMITATIONS[-1]])


def scored_split(document: dict[str, Any], candidate: dict[str, Any]) -> str:
    """The split ``candidate`` was scored on, as its iteration of ``candidates.json`` records it (``test`` in files
    written before iterations recorded it: the search scored on test then)."""
    entry = next(e for e in document["iterations"] if e["iteration"] == candidate["iteration"])
    return entry.get("scored_on", "test")
