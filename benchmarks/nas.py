"""One-shot architecture search over the template segmenter on the CPU, checked against standalone training.

Only two labelled CT patients are at hand (the TotalSegmentator samples: ``example_ct_sm``, 30 slices of 3 mm,
non-contrast; ``sample_ct_dicom``, 20 slices of 2 mm, contrast-enhanced), so the roles are split so that no Dice
the search looks at is ever on the patient the final figure is measured on:

1. **Search** (fold B of ``segmenter_cv.py``): the supernet trains on ``sample_ct_dicom`` (minus its val slab);
   candidates are scored with the shared weights on ``example_ct_sm``, the *validation* patient. Two analyst
   iterations through the real ``search_iteration``: iteration 0 (the shipped model's architecture scored too,
   so the explorer shows where it sits), then one constraint chosen by a fixed rule standing in for the analyst
   (drop the value whose marginal effect on Dice is the most negative) and ``--resume``. ``ctzoo nas view`` writes
   the explorer page.
2. **Standalone**: the top Pareto layers (non-dominated sorting on Dice up, latency down) until ``--standalone``
   candidates, plus the shipped architecture, each retrained from scratch with the normal recipe of the same fold
   at ``--standalone-seeds`` through the real hand-off (``export_candidate(..., init="scratch")``: best val-slab
   checkpoint, scored on ``example_ct_sm``). Kendall tau (and Spearman rho) between one-shot Dice (as scored, and
   re-scored with the final supernet) and the mean standalone Dice; the seed-to-seed tau of the standalone Dice
   themselves says how far a ranking of these candidates can be resolved at all.
3. **Choice** (validation data only): the retrained candidate with the best mean standalone Dice whose latency is
   within the shipped model's (the question "best Dice for the latency I have").
4. **Final** (fold A, the shipped model's own protocol): the chosen architecture and the shipped architecture
   each retrained from scratch with ``configs/template_seg_abdomen.yaml`` at ``--seeds`` on ``example_ct_sm`` and
   tested on ``sample_ct_dicom``, whose labels no candidate was ever scored on (they did train the supernet, in
   step 1). Also the shipped bundle's own weights on the same test, and both latencies re-measured together.

Resumable: every finished step leaves a JSON in ``--work`` and is read, not redone.

    OMP_NUM_THREADS=2 python benchmarks/nas.py [--work runs/nasbench] [--search-epochs 30 10]
        [--candidates 24 16] [--standalone 8] [--standalone-seeds 0 1 2] [--seeds 0 1 2] [--epochs N]
        [--out benchmarks/results/nas.json]

Needs the TotalSegmentator samples (``ctzoo data fetch-samples``).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # as segmenter_cv.py: idle threads sleep on a shared machine

import torch
import yaml
from scipy import stats

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance, load_average  # noqa: E402

from ctzoo.models.pretrained import create_model
from ctzoo.models.template_seg import TemplateSegNet
from ctzoo.nas.explorer import marginal_effects, pareto_front
from ctzoo.nas.handoff import export_candidate
from ctzoo.nas.measure import measure
from ctzoo.nas.search import (
    SuperNetTask,
    ValidationSet,
    architecture_of,
    evaluate_candidates,
    load_supernet,
    read_candidates,
    search_iteration,
    space_for,
)
from ctzoo.nas.space import Architecture, SearchSpace
from ctzoo.nas.supernet import subnet_config
from ctzoo.training.seg_evaluation import evaluate_segmenter
from ctzoo.training.template_seg_task import TemplateSegTask, load_seg_config, load_seg_data, seg_classes

ROOT = Path(__file__).resolve().parents[1]
BASE_CONFIG = ROOT / "configs" / "template_seg_abdomen.yaml"
SEARCH_PATIENT, TEST_PATIENT = "sample_ct_dicom", "example_ct_sm"  # fold B: trained on, scored on


def write_config(path: Path, train_patient: str, seed: int) -> Path:
    """The shipped recipe with ``data.train_patient`` and ``optim.seed`` set, no UNet baseline."""
    config = yaml.safe_load(BASE_CONFIG.read_text(encoding="utf-8"))
    config["data"]["train_patient"] = train_patient
    config["optim"]["seed"] = seed
    config["baseline_unet"] = False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(config, sort_keys=False), encoding="utf-8")
    return path


def analyst_drop(candidates: list[dict], space: SearchSpace) -> str:
    """The rule standing in for the analyst: the value with the most negative marginal effect on Dice (among
    values held by at least 3 candidates), as a ``--drop`` constraint (``levels.2.kernel`` -> ``level2.kernel``)."""
    effects = [e for e in marginal_effects([c for c in candidates if c["dice"] is not None])
               if e["dice_effect"] is not None and e["count"] >= 3]
    worst = min(effects, key=lambda e: e["dice_effect"])
    parts = worst["decision"].split(".")
    decision = f"level{parts[1]}.{parts[2]}" if parts[0] == "levels" else parts[0]
    assert len(space.allowed_values(decision)) > 1, decision  # a dropped value always leaves one
    return f"{decision}={worst['value']}"


def pareto_layers(candidates: list[dict], count: int) -> list[dict]:
    """The first ``count`` candidates by non-dominated sorting (front 1, then the front of the rest, ...); the last
    layer used is cut by Dice."""
    left, picked = [c for c in candidates if c["dice"] is not None], []
    while left and len(picked) < count:
        front = set(pareto_front(left))
        layer = sorted((c for c in left if c["id"] in front), key=lambda c: -c["dice"])
        picked += layer[:count - len(picked)]
        left = [c for c in left if c["id"] not in front]
    return picked


def retrain(run: Path, candidate_id: str, config: Path, bundles: Path, record: Path, epochs: int | None) -> dict:
    """The hand-off retraining a candidate from scratch with ``config``'s recipe; the figures kept in ``record``."""
    if record.exists():
        return {k: v for k, v in json.loads(record.read_text()).items() if k != "best_epoch"}  # older records
    start = time.perf_counter()
    export_candidate(run, candidate_id, config, bundles / candidate_id, init="scratch", epochs=epochs, progress=False)
    comparison = json.loads((run / "export" / candidate_id / "comparison.json").read_text())
    training = comparison["training"]["template_seg"]
    row = next(r for r in comparison["rows"] if r["model"] == "template_seg" and r["condition"] == "clean")
    result = {"id": candidate_id, "config": str(config.relative_to(record.parents[1])),
              "test_cases": comparison["test_cases"], "dice": row["dice_mean"],
              "dice_per_class": {c: row[f"dice_{c}"] for c in comparison["class_names"]},
              "val_dice_best": training.get("best_dice_mean"),
              "epochs": training.get("epochs"), "train_wall_s": round(training.get("wall_s", 0.0), 1),
              "wall_s": round(time.perf_counter() - start, 1), "load_average": load_average()}
    record.parent.mkdir(parents=True, exist_ok=True)
    record.write_text(json.dumps(result, indent=2) + "\n")
    return result


def search(run: Path, config: Path, epochs: list[int], counts: list[int], reference: Architecture) -> dict:
    cfg = load_seg_config(config)
    document = read_candidates(run)
    for iteration, (epoch_count, count) in enumerate(zip(epochs, counts, strict=True)):
        if document is not None and len(document["iterations"]) > iteration:
            continue
        space = SearchSpace.from_json(document["space"]) if document else None
        drop = [analyst_drop(document["candidates"], space)] if iteration else []
        print(f"search iteration {iteration}: {epoch_count} epochs, {count} candidates, drop {drop}", flush=True)
        document = search_iteration(cfg, run, epochs=epoch_count, candidates=count, drop=drop, progress=False,
                                    include=[] if iteration else [reference])
    return document


def rescore(run: Path, config: Path, document: dict, ids: list[str], record: Path) -> dict[str, float]:
    """One-shot Dice of ``ids`` from the *final* supernet (a candidate of iteration 0 was scored with the weights of
    then): every candidate of the ranking study scored by the same weights, on the same validation patient."""
    if record.exists():
        return json.loads(record.read_text())
    cfg = load_seg_config(config)
    space = replace(SearchSpace.from_json(document["space"]), allowed={})  # earlier candidates may lie outside
    task = SuperNetTask(cfg, space)
    validation = ValidationSet(task.data.cases["test"], task.prep, task.templates, task.class_names)
    archs = [Architecture.from_json(c["architecture"]) for c in document["candidates"] if c["id"] in ids]
    scored = evaluate_candidates(load_supernet(run / "supernet" / "last.pt", space), archs, validation,
                                 runs=2, warmup=1)
    dice = {c["id"]: c["dice"] for c in scored}
    record.write_text(json.dumps(dice, indent=2) + "\n")
    return dice


def latencies(space: SearchSpace, archs: dict[str, Architecture], rounds: int = 5) -> dict[str, dict]:
    """Each architecture's ONNX Runtime latency (1 thread, 128²) measured in interleaved rounds, the median."""
    nets = {name: TemplateSegNet(**subnet_config(space, arch)) for name, arch in archs.items()}
    rounds_of: dict[str, list[dict]] = {name: [] for name in nets}
    for _ in range(rounds):
        for name, net in nets.items():
            rounds_of[name].append(measure(net))
    return {name: {"latency_ms": statistics.median(r["latency_ms"] for r in runs),
                   "rounds_ms": [r["latency_ms"] for r in runs], "params": runs[0]["params"],
                   "flops": runs[0]["flops"]} for name, runs in rounds_of.items()}


def shipped_bundle_dice(config: Path) -> dict:
    """The shipped template-seg-abdomen weights on the final test patient (its own templates: the same training
    slices of example_ct_sm)."""
    cfg = load_seg_config(config)
    data = load_seg_data(cfg.data)
    task = TemplateSegTask(cfg, data)
    scores = evaluate_segmenter(create_model("template-seg-abdomen", pretrained=True).eval(), data.cases["test"],
                                cfg.data.preprocessing, task.templates, torch.device("cpu"), data.class_names,
                                hd95=False)
    return {"dice": scores["dice_mean"], "dice_per_class": {c: scores[f"dice_{c}"] for c in data.class_names},
            "test_cases": [c.name for c in data.cases["test"]]}


def spread(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "sd": statistics.stdev(values) if len(values) > 1 else 0.0,
            "n": len(values), "values": values}


def t_interval(values: list[float]) -> list[float] | None:
    """The 95 % t-interval of the mean of ``values`` (paired differences)."""
    if len(values) < 2:
        return None
    half = stats.t.ppf(0.975, len(values) - 1) * statistics.stdev(values) / math.sqrt(len(values))
    return [statistics.fmean(values) - half, statistics.fmean(values) + half]


def finite(value):
    """JSON without NaN (scipy's statistics of a constant column): None instead."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: finite(v) for k, v in value.items()}
    if isinstance(value, list):
        return [finite(v) for v in value]
    return value


def ranking_table(standalone: list[dict]) -> str:
    seeds = len(standalone[0]["runs"])
    alone = f"standalone Dice, mean ± sd of {seeds} seeds" if seeds > 1 else "standalone Dice"
    rows = ["| candidate | architecture | iteration | latency ms | params | one-shot Dice, as scored | one-shot Dice, "
            f"final supernet | {alone} |", "|---|---|---:|---:|---:|---:|---:|---:|"]
    for s in sorted(standalone, key=lambda s: -s["dice"]):
        name = f"{s['id']}{' (shipped architecture)' if s['reference'] else ''}"
        spread_text = "" if s["dice_sd"] is None else f" ± {s['dice_sd']:.3f}"
        rows.append(f"| {name} | `{s['description']}` | {s['iteration']} | {s['latency_ms']:.1f} | "
                    f"{s['params'] / 1e6:.2f} M | {s['oneshot_dice']:.3f} | {s['oneshot_dice_final_supernet']:.3f} | "
                    f"{s['dice']:.3f}{spread_text} |")
    return "\n".join(rows)


def final_table(summary: dict, shipped: dict, descriptions: dict[str, str]) -> str:
    classes = list(shipped["dice_per_class"])
    rows = [f"| model | architecture | latency ms | params | test Dice, mean of 5 | {' | '.join(classes)} |",
            "|---|---|---:|---:|---:|" + "---:|" * len(classes)]
    names = {"chosen": "searched, chosen on validation", "shipped_architecture": "shipped architecture"}
    for role, s in summary.items():
        per_class = " | ".join(f"{s['dice_per_class'][c]['mean']:.2f} ± {s['dice_per_class'][c]['sd']:.2f}"
                               for c in classes)
        rows.append(f"| {names[role]}, retrained (seeds {', '.join(str(v) for v in s['seeds'])}) | "
                    f"`{descriptions[role]}` | {s['latency_ms']:.1f} | {s['params'] / 1e6:.2f} M | "
                    f"{s['dice']['mean']:.3f} ± {s['dice']['sd']:.3f} | {per_class} |")
    per_class = " | ".join(f"{shipped['dice_per_class'][c]:.2f}" for c in classes)
    rows.append(f"| `template-seg-abdomen` as shipped | `{descriptions['shipped_architecture']}` | "
                f"{summary['shipped_architecture']['latency_ms']:.1f} | "
                f"{summary['shipped_architecture']['params'] / 1e6:.2f} M | {shipped['dice']:.3f} | {per_class} |")
    return "\n".join(rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--work", type=Path, default=ROOT / "runs" / "nasbench")
    parser.add_argument("--search-epochs", type=int, nargs="+", default=[30, 10], help="per iteration")
    parser.add_argument("--candidates", type=int, nargs="+", default=[24, 16], help="per iteration")
    parser.add_argument("--standalone", type=int, default=8, help="top Pareto candidates retrained")
    parser.add_argument("--epochs", type=int, default=None, help="retraining epochs (default: the recipe's)")
    parser.add_argument("--standalone-seeds", type=int, nargs="+", default=[0, 1, 2],
                        help="seeds of each standalone retraining (their mean Dice is ranked)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="final retrainings")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "nas.json")
    args = parser.parse_args()
    provenance = Provenance(BASE_CONFIG)  # a resumed run records its own start; earlier runs show in wall_s only
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", os.cpu_count() or 1)))
    work = args.work
    clock_file = work / "wall_s.json"  # stage times of the runs that did the work (a resumed run reads them)
    clock = json.loads(clock_file.read_text()) if clock_file.exists() else {}

    def timed_stage(name: str, start: float) -> None:
        clock[name] = clock.get(name, 0.0) + time.perf_counter() - start
        clock_file.write_text(json.dumps(clock) + "\n")
    run = work / "search"
    search_config = write_config(work / "configs" / "search.yaml", SEARCH_PATIENT, 0)
    cfg = load_seg_config(search_config)
    space = space_for(cfg, len(seg_classes(cfg.data)))
    reference = architecture_of(space, cfg.model)

    start = time.perf_counter()
    document = search(run, search_config, args.search_epochs, args.candidates, reference)
    timed_stage("search_s", start)
    subprocess.run([sys.executable, "-m", "ctzoo", "nas", "view", str(run)], check=True)
    candidates = {c["id"]: c for c in document["candidates"]}

    start = time.perf_counter()
    picked = [c for c in pareto_layers(list(candidates.values()), args.standalone) if c["id"] != reference.id]
    runs: dict[str, list[dict]] = {c["id"]: [] for c in [*picked, candidates[reference.id]]}
    for seed in args.standalone_seeds:  # seeds outer: an interrupted run has whole seeds
        config = write_config(work / "configs" / f"standalone-seed{seed}.yaml", SEARCH_PATIENT, seed)
        for cid, done in runs.items():
            print(f"standalone seed {seed}: {cid} ({candidates[cid]['description']}), one-shot Dice "
                  f"{candidates[cid]['dice']:.3f}", flush=True)
            done.append({"seed": seed, **retrain(run, cid, config, work / "bundles" / f"standalone-seed{seed}",
                                                 work / "standalone" / f"{cid}-seed{seed}.json", args.epochs)})
    standalone = [{"id": cid, "dice": statistics.fmean(r["dice"] for r in done),
                   "dice_sd": statistics.stdev(r["dice"] for r in done) if len(done) > 1 else None,
                   "val_dice_best": statistics.fmean(r["val_dice_best"] for r in done),
                   "oneshot_dice": candidates[cid]["dice"], "reference": cid == reference.id,
                   **{k: candidates[cid][k] for k in ("latency_ms", "params", "flops", "description", "iteration")},
                   "runs": done} for cid, done in runs.items()]
    timed_stage("standalone_s", start)
    final_weights = rescore(run, search_config, document, [s["id"] for s in standalone], work / "rescored.json")
    for s in standalone:
        s["oneshot_dice_final_supernet"] = final_weights[s["id"]]
    ranking = {"n": len(standalone), "n_searched": len(standalone) - 1}
    for key, scores in (("as_scored", "oneshot_dice"), ("final_supernet", "oneshot_dice_final_supernet")):
        for group, rows in (("all", standalone), ("searched", [s for s in standalone if not s["reference"]])):
            tau = stats.kendalltau([s[scores] for s in rows], [s["dice"] for s in rows])
            rho = stats.spearmanr([s[scores] for s in rows], [s["dice"] for s in rows])
            ranking[f"{key}_{group}"] = {"kendall_tau": tau.statistic, "kendall_p": tau.pvalue,
                                         "spearman_rho": rho.statistic, "spearman_p": rho.pvalue}
    pairs = [(a, b) for i, a in enumerate(args.standalone_seeds) for b in args.standalone_seeds[i + 1:]]
    ranking["seed_to_seed"] = [{"seeds": [a, b], "kendall_tau": stats.kendalltau(
        [s["runs"][args.standalone_seeds.index(a)]["dice"] for s in standalone],
        [s["runs"][args.standalone_seeds.index(b)]["dice"] for s in standalone]).statistic} for a, b in pairs]
    ranking["standalone_spread"] = {"between_candidates_sd": statistics.stdev(s["dice"] for s in standalone),
                                    "within_candidate_sd_mean": statistics.fmean(s["dice_sd"] for s in standalone)
                                    if len(args.standalone_seeds) > 1 else None}
    searched = [s for s in standalone if not s["reference"]]

    budget = candidates[reference.id]["latency_ms"]
    within = [s for s in searched if s["latency_ms"] <= budget] or searched
    chosen = max(within, key=lambda s: s["dice"])
    print(f"chosen {chosen['id']} ({chosen['description']}): standalone val-patient Dice {chosen['dice']:.3f}, "
          f"{chosen['latency_ms']:.2f} ms (shipped {budget:.2f} ms)", flush=True)

    start = time.perf_counter()
    final = {"chosen": [], "shipped_architecture": []}
    for seed in args.seeds:
        config = write_config(work / "configs" / f"final-seed{seed}.yaml", TEST_PATIENT, seed)
        for role, cid in (("chosen", chosen["id"]), ("shipped_architecture", reference.id)):
            print(f"final seed {seed}: {role} {cid}", flush=True)
            final[role].append({"seed": seed, **retrain(run, cid, config, work / "bundles" / f"final-seed{seed}",
                                                        work / "final" / f"{cid}-seed{seed}.json", args.epochs)})
    timed_stage("final_s", start)
    shipped = shipped_bundle_dice(work / "configs" / f"final-seed{args.seeds[0]}.yaml")
    timed = latencies(SearchSpace.from_json(document["space"]),
                      {"chosen": Architecture.from_json(candidates[chosen["id"]]["architecture"]),
                       "shipped_architecture": reference})

    summary = {role: {"seeds": [r["seed"] for r in rows], "dice": spread([r["dice"] for r in rows]),
                      "dice_per_class": {c: spread([r["dice_per_class"][c] for r in rows])
                                         for c in rows[0]["dice_per_class"]},
                      **timed[role]} for role, rows in final.items()}
    difference = [a["dice"] - b["dice"] for a, b in zip(final["chosen"], final["shipped_architecture"], strict=True)]
    result = {
        "benchmark": "nas", "command": "OMP_NUM_THREADS=2 python benchmarks/nas.py " + " ".join(sys.argv[1:]),
        "protocol": {"search_train_patient": SEARCH_PATIENT, "validation_patient": TEST_PATIENT,
                     "final_train_patient": TEST_PATIENT, "final_test_patient": SEARCH_PATIENT,
                     "analyst_rule": "drop the value with the most negative marginal Dice effect (>= 3 candidates)",
                     "choice": "best mean standalone validation-patient Dice, latency <= the shipped architecture's",
                     "dice": "mean over classes (MONAI DiceMetric), best val-slab checkpoint, 3 mm slice grid",
                     "latency": "ONNX Runtime, CPU, 1 thread, 128x128 image + template, median"},
        "search": {"iterations": document["iterations"], "candidates": len(document["candidates"]),
                   "space": document["space"], "reference": reference.id},
        "standalone": standalone,
        "ranking": ranking,
        "chosen": {k: chosen[k] for k in ("id", "description", "oneshot_dice", "dice", "latency_ms", "params")},
        "final": final, "final_summary": summary,
        "final_difference": {**spread(difference), "chosen_minus": "shipped_architecture",
                             "ci95": t_interval(difference), "latency_ratio": summary["chosen"]["latency_ms"]
                             / summary["shipped_architecture"]["latency_ms"]},
        "shipped_bundle": shipped,
        "wall_s": {k: round(v, 1) for k, v in clock.items()},
        "tables": {"ranking": ranking_table(standalone),
                   "final": final_table(summary, shipped, {"chosen": chosen["description"],
                                                           "shipped_architecture": reference.describe()})},
        "provenance": provenance.record(device="cpu"),
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(finite(result), indent=2, allow_nan=False) + "\n")
    print(json.dumps(finite({k: result[k] for k in ("ranking", "chosen", "final_difference", "wall_s")}), indent=2))
    print(result["tables"]["ranking"], result["tables"]["final"], sep="\n\n")


if __name__ == "__main__":
    main()
