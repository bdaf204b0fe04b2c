"""What the secure joint t-SNE costs, against the plaintext t-SNE on the same points, measured in the same run:
``python benchmarks/smap.py --screenshot docs/images/smap-joint-map.png`` (defaults ``--sizes 16,32,64
--iterations 2 --map-iterations 60 --map-lesions-per-site 8``; ~25 min on 2 cores).

1. **Scaling.** For each total ``n`` of points (three sites on loopback, mutually authenticated TLS, 64 features
   per point), one secure run of ``ctzoo smap party``: P in full, then ``--iterations`` gradient steps; each
   party's map file records its seconds and bytes sent per phase. The secure protocol has no data-dependent
   control flow (module docstring of ``ctzoo.smap.secure``), so its cost depends on ``n`` and the dimension only:
   these runs use synthetic features (three Gaussian clusters), and the per-step cost times 300 steps is the
   projected whole run. Beside it, in the same run: ``--insecure-plaintext`` over the same connections (300 steps,
   measured) and the plaintext t-SNE in this process. The exponent of each cost in ``n`` is fitted (log-log).
2. **The joint map** on real CT: the 16-series DeepLesion-format miniature (seed 5, as the tests; synthetic
   lesions in real CT), lesions embedded with ``recistnet-mini``, patients dealt to three sites; one secure
   run of ``--map-iterations`` steps with P opened for the comparison: P's largest error, the 10-NN agreement
   with the plaintext t-SNE from the same start; party 0's page (``ctzoo smap view``) captured in headless
   chromium (``--screenshot``).

Writes ``benchmarks/results/smap.json``; the README's table and figure come from it.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from ctzoo.smap.features import deal_patients
from ctzoo.smap.keys import make_party_keys
from ctzoo.smap.party import loopback_addresses
from ctzoo.smap.secure import full_matrix
from ctzoo.smap.site_file import read_site, write_site
from ctzoo.smap.tsne import conditional_p, embed, initial_embedding, joint_p, knn_agreement, squared_distances

sys.path.append(str(Path(__file__).resolve().parent))  # appended: a benchmark never shadows an installed module
from _provenance import Provenance, versions  # noqa: E402

PERPLEXITY, LEARNING_RATE, FULL_ITERATIONS, DIMENSION = 5.0, 10.0, 300, 64


def run_parties(sites: list[Path], keys: Path, out: Path, *extra: str) -> list[dict]:
    """The three parties of one run (their own processes); what each wrote."""
    out.mkdir(parents=True, exist_ok=True)
    addresses = [a for address in loopback_addresses(len(sites)) for a in ("--party", address)]
    processes = [subprocess.Popen([sys.executable, "-m", "ctzoo", "smap", "party", str(site), "--index", str(k),
                                   *addresses, "--keys", str(keys / f"party{k}"), "--perplexity", str(PERPLEXITY),
                                   "--learning-rate", str(LEARNING_RATE), "--out", str(out / f"party{k}.npz"),
                                   "--connect-timeout", "300", *extra],
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for k, site in enumerate(sites)]
    for k, process in enumerate(processes):
        output, _ = process.communicate()
        if process.returncode:
            raise RuntimeError(f"party {k} failed:\n{output}")
        print(output.strip().splitlines()[-1], flush=True)
    return [dict(np.load(out / f"party{k}.npz")) for k in range(len(sites))]


def synthetic_sites(n: int, folder: Path, seed: int = 0) -> list[Path]:
    """Three site files with ``n`` points in all: three Gaussian clusters in 64 dimensions, dealt to the sites."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 1, (3, DIMENSION))
    labels = np.arange(n) % 3
    features = centres[labels] + rng.normal(0, 0.5, (n, DIMENSION))
    paths = []
    for k in range(3):
        rows = np.arange(n) % 3 == k
        site = {"features": features[rows].astype(np.float32), "labels": labels[rows] + 1,
                "scores": np.ones(int(rows.sum()), dtype=np.float32),
                "meta": {"kind": "synthetic", "model": "none", "model_version": "0", "weights": "synthetic"}}
        paths.append(write_site(site, folder / f"site{k}.npz"))
    return paths


def plaintext_map(sites: list[Path], iterations: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    points = np.vstack([read_site(site)["features"].astype(np.float64) for site in sites])
    started = time.perf_counter()
    p = joint_p(conditional_p(squared_distances(points), PERPLEXITY)[0])
    p_done = time.perf_counter()
    y = embed(p, initial_embedding(len(points), 0), iterations, learning_rate=LEARNING_RATE, early_iterations=0)
    return p, y, {"p": p_done - started, "embedding": time.perf_counter() - p_done}


def scaling_row(n: int, keys: Path, work: Path, iterations: int) -> dict:
    folder = work / f"n{n}"
    sites = synthetic_sites(n, folder)
    secure = run_parties(sites, keys, folder / "secure", "--iterations", str(iterations))
    clear = run_parties(sites, keys, folder / "plaintext", "--insecure-plaintext", "--iterations",
                        str(FULL_ITERATIONS))
    _, _, local = plaintext_map(sites, FULL_ITERATIONS)
    p_seconds = max(float(party["seconds"][0]) for party in secure)
    step_seconds = max(float(party["seconds"][1]) for party in secure) / iterations
    p_bytes = float(np.mean([party["bytes_phases"][0] for party in secure]))
    step_bytes = float(np.mean([party["bytes_phases"][1] for party in secure])) / iterations
    return {"n": n, "secure": {"p_seconds": p_seconds, "seconds_per_iteration": step_seconds,
                               "p_mb_sent_per_party": p_bytes / 1e6,
                               "mb_sent_per_party_per_iteration": step_bytes / 1e6,
                               "projected_seconds": p_seconds + FULL_ITERATIONS * step_seconds,
                               "projected_gb_sent_per_party": (p_bytes + FULL_ITERATIONS * step_bytes) / 1e9,
                               "measured_iterations": iterations},
            "insecure_plaintext_parties": {"seconds": max(float(sum(party["seconds"])) for party in clear),
                                           "mb_sent_per_party": float(np.mean([party["bytes_sent"]
                                                                              for party in clear])) / 1e6},
            "plaintext_in_process": {"seconds": local["p"] + local["embedding"]}}


def exponent(rows: list[dict], value) -> float:
    """The slope of log(value) against log(n)."""
    return float(np.polyfit(np.log([row["n"] for row in rows]), np.log([value(row) for row in rows]), 1)[0])


def miniature_sites(work: Path, per_site: int) -> list[Path]:
    """Three sites: the 16-series miniature's patients dealt out until each holds at least ``per_site`` lesions
    (the tests deal 4)."""
    from ctzoo.datasets.deeplesion.mini import make_deeplesion_mini

    mini = work / "mini16"
    if not (mini / "DL_info.csv").exists():
        make_deeplesion_mini(mini, cases=16, seed=5, progress=False)
    chosen = deal_patients(mini / "DL_info.csv", sites=3, lesions_per_site=per_site)
    paths = []
    for k, patients in enumerate(chosen):
        paths.append(work / f"real{per_site}" / f"site{k}.npz")
        if not paths[-1].exists():
            subprocess.run([sys.executable, "-m", "ctzoo", "smap", "features", "--deeplesion",
                            str(mini / "DL_info.csv"), "--patients", ",".join(map(str, patients)), "--out",
                            str(paths[-1])], check=True)
    return paths


def joint_map(keys: Path, work: Path, iterations: int, per_site: int, screenshot: Path | None) -> dict:
    sites = miniature_sites(work, per_site)
    folder = sites[0].parent
    learned = run_parties(sites, keys, folder / "secure", "--iterations", str(iterations),
                          "--insecure-reveal-p")
    p, reference, _ = plaintext_map(sites, iterations)
    joint = np.vstack([party["own"] for party in learned])
    result = {"sites": [len(read_site(site)["labels"]) for site in sites], "iterations": iterations,
              "p_max_abs_error": float(np.abs(full_matrix(learned[0]["p"]) - p).max()),
              "p_max": float(p.max()),
              "knn10_agreement_with_plaintext": knn_agreement(joint, reference, 10),
              "max_coordinate_error_relative": float(np.abs(joint - reference).max() / np.abs(reference).max()),
              "secure_seconds": max(float(sum(party["seconds"])) for party in learned),
              "gb_sent_per_party": float(np.mean([party["bytes_sent"] for party in learned])) / 1e9}
    page = folder / "party0.html"
    subprocess.run([sys.executable, "-m", "ctzoo", "smap", "view", str(folder / "secure" / "party0.npz"),
                    "--site", str(sites[0]), "--out", str(page)], check=True)
    if screenshot is not None:
        sys.path.append(str(Path(__file__).resolve().parent))
        from perf_report_screenshot import capture

        capture(page, screenshot, 1100, 860)
        result["screenshot"] = str(screenshot)
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", default="16,32,64", help="total points per secure run (three sites)")
    parser.add_argument("--iterations", type=int, default=2, help="gradient steps measured per secure run")
    parser.add_argument("--map-iterations", type=int, default=60, help="steps of the joint map on real CT (0: skip)")
    parser.add_argument("--map-lesions-per-site", type=int, default=8,
                        help="deal patients until each site has this many lesions")
    parser.add_argument("--work", type=Path, default=Path("runs/smap-benchmark"))
    parser.add_argument("--screenshot", type=Path, default=None, help="PNG of party 0's page of the joint map")
    parser.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results" / "smap.json")
    args = parser.parse_args()
    provenance = Provenance()
    args.work.mkdir(parents=True, exist_ok=True)
    keys = args.work / f"keys-{os.getpid()}"
    make_party_keys(3, keys)
    rows = [scaling_row(int(n), keys, args.work, args.iterations) for n in args.sizes.split(",")]
    fits = {"secure_p_seconds": exponent(rows, lambda r: r["secure"]["p_seconds"]),
            "secure_seconds_per_iteration": exponent(rows, lambda r: r["secure"]["seconds_per_iteration"]),
            "secure_bytes_per_iteration": exponent(rows, lambda r: r["secure"]["mb_sent_per_party_per_iteration"]),
            "secure_p_bytes": exponent(rows, lambda r: r["secure"]["p_mb_sent_per_party"]),
            "plaintext_in_process_seconds": exponent(rows, lambda r: r["plaintext_in_process"]["seconds"])}
    largest = rows[-1]
    projection = {str(n): {"projected_hours": largest["secure"]["projected_seconds"]
                           * (n / largest["n"]) ** fits["secure_seconds_per_iteration"] / 3600,
                           "projected_gb_sent_per_party": largest["secure"]["projected_gb_sent_per_party"]
                           * (n / largest["n"]) ** 2}
                  for n in (100, 600)}
    document = {"benchmark": "smap", "command": "python " + " ".join(sys.argv),
                # MPyC's field arithmetic is 2-2.8x faster with gmpy2 (docs/smap.md): say which this run had
                "gmpy2": importlib.util.find_spec("gmpy2") is not None,
                "parties": 3, "transport": "TLS on loopback", "features": DIMENSION, "perplexity": PERPLEXITY,
                "full_iterations": FULL_ITERATIONS, "scaling": rows, "exponents_in_n": fits,
                "projected_from_largest_n": projection}
    if args.map_iterations:
        document["joint_map_real_ct"] = joint_map(keys, args.work, args.map_iterations, args.map_lesions_per_site,
                                                  args.screenshot)
    document["provenance"] = provenance.record(**versions("mpyc", "gmpy2"))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(document, indent=2) + "\n")
    print(json.dumps({"exponents": fits, "projection": projection}, indent=2))


if __name__ == "__main__":
    main()
