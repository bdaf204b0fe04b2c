"""``ctzoo smap party``: three sites on loopback, each holding the embeddings of its own patients of the DeepLesion
miniature, compute t-SNE's joint P on secret shares (MPyC): it equals the plaintext P; inputs the parties do not
agree on, a party that never connects and one that drops out mid-run end every other party with a clear error and
nothing written."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.datasets.deeplesion.info_csv import read_dl_info
from ctzoo.smap.features import read_site, write_site
from ctzoo.smap.party import own_histogram
from ctzoo.smap.secure import full_matrix
from ctzoo.smap.tsne import conditional_p, embed, initial_embedding, joint_p, knn_agreement, squared_distances

PERPLEXITY = 5.0
ITERATIONS, GRID = 15, 12
pytestmark = pytest.mark.timeout(900)  # three CPU-bound parties share the CI machine's two cores with other tests
SCHEDULE = ("--iterations", str(ITERATIONS), "--learning-rate", "10", "--grid", str(GRID))


def free_ports(count: int) -> list[int]:
    sockets = [socket.socket() for _ in range(count)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


@pytest.fixture(scope="module")
def sites(deeplesion_mini16, tmp_path_factory) -> list[Path]:
    """Three site files, patients dealt out in turn until each site holds at least 4 lesions (17 in all:
    the secure run's cost grows with the square)."""
    folder = tmp_path_factory.mktemp("sites")
    csv_path = deeplesion_mini16 / "DL_info.csv"
    counts: dict[int, int] = {}
    for row in read_dl_info(csv_path):
        counts[row.patient_index] = counts.get(row.patient_index, 0) + 1
    chosen: list[list[int]] = [[], [], []]
    for patient in sorted(counts):
        site = min(range(3), key=lambda k: sum(counts[p] for p in chosen[k]))
        if sum(counts[p] for p in chosen[site]) < 4:
            chosen[site].append(patient)
    paths = []
    for k, patients in enumerate(chosen):
        paths.append(folder / f"site{k}.npz")
        result = CliRunner().invoke(main, ["smap", "features", "--deeplesion", str(csv_path), "--patients",
                                           ",".join(map(str, patients)), "--out", str(paths[-1])])
        assert result.exit_code == 0, result.output
    return paths


def start_parties(sites: list[Path], out: Path, *extra: str, ports: list[int] | None = None,
                  only: range | None = None) -> list[subprocess.Popen]:
    ports = ports or free_ports(len(sites))
    addresses = [a for port in ports for a in ("--party", f"127.0.0.1:{port}")]
    return [subprocess.Popen([sys.executable, "-m", "ctzoo", "smap", "party", str(site), "--index", str(k),
                              *addresses, "--perplexity", str(PERPLEXITY), "--out", str(out / f"party{k}.npz"),
                              "--iterations", "1", *extra], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for k, site in enumerate(sites) if only is None or k in only]


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """Each party's exit status and output (stdout + stderr)."""
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append((process.returncode, out + err))
    return results


@pytest.fixture(scope="module")
def secure_run(sites, tmp_path_factory):
    """One run of the three parties: P opened for the comparison, 20 iterations; parties 0 and 1 offer to share
    their points, party 2 does not."""
    out = tmp_path_factory.mktemp("run")
    ports = free_ports(3)
    started = time.monotonic()
    processes = [start_parties(sites, out, "--insecure-reveal-p", *SCHEDULE, *(["--share-points"] if k < 2 else []),
                               ports=ports, only=range(k, k + 1))[0] for k in range(3)]
    results = finish(processes, timeout=780)
    assert all(code == 0 for code, _ in results), results
    return {"out": out, "seconds": time.monotonic() - started,
            "learned": [np.load(out / f"party{k}.npz") for k in range(3)]}


def plaintext(sites):
    points = np.vstack([read_site(site)["features"].astype(np.float64) for site in sites])
    p = joint_p(conditional_p(squared_distances(points), PERPLEXITY)[0])
    return p, embed(p, initial_embedding(len(points), 0), ITERATIONS, learning_rate=10.0, early_iterations=0)


def test_the_secure_joint_p_equals_the_plaintext_p(sites, secure_run):
    plain, _ = plaintext(sites)
    for learned in secure_run["learned"]:
        assert list(learned["counts"]) == [len(read_site(site)["labels"]) for site in sites]
        secure = full_matrix(learned["p"])
        assert np.abs(secure - plain).max() < 1e-3  # measured: ~2e-7 (P's largest entries are ~0.03)
        assert secure.sum() == pytest.approx(1.0, abs=1e-4)


def test_each_site_learns_its_own_points_of_the_joint_map_and_the_density(sites, secure_run):
    _, reference = plaintext(sites)
    learned = secure_run["learned"]
    joint = np.vstack([party["own"] for party in learned])  # each party's own points, in party order
    assert knn_agreement(joint, reference, 10) >= 0.9
    assert np.abs(joint - reference).max() < 0.01 * np.abs(reference).max()
    for k, party in enumerate(learned):
        assert len(party["own"]) == len(read_site(sites[k])["labels"])
        assert party["density"].sum() == len(joint)
        assert (party["others_density"] == party["density"] - own_histogram(party["own"], party["extent"],
                                                                             GRID)).all()
        assert party["others_density"].sum() == len(joint) - len(party["own"])
        assert not party["shared"] and "all_points" not in party.files  # party 2 did not agree to share
    extent = learned[0]["extent"]
    assert extent == pytest.approx([joint[:, 0].min(), joint[:, 0].max(), joint[:, 1].min(), joint[:, 1].max()],
                                   abs=1e-6)


def test_inputs_the_parties_do_not_agree_on_end_every_party(sites, tmp_path):
    narrow = read_site(sites[2])
    site = {"features": narrow["features"][:, :32], "labels": narrow["labels"], "scores": narrow["scores"],
            "meta": {k: narrow["meta"][k] for k in ("kind", "model", "model_version", "weights")}}
    odd = write_site(site, tmp_path / "narrow.npz")
    results = finish(start_parties([sites[0], sites[1], odd], tmp_path))
    for code, output in results:
        assert code == 1 and "party 2 has 32 features per lesion, party 0 64" in output, output
        assert "Traceback" not in output
    assert not list(tmp_path.glob("party*.npz"))


def test_parties_with_other_options_stop_before_any_secret_work(sites, tmp_path):
    ports = free_ports(3)
    processes = [start_parties(sites, tmp_path, *(["--perplexity", "6"] if k == 1 else []), ports=ports,
                               only=range(k, k + 1))[0] for k in range(3)]
    for code, output in finish(processes, timeout=120):
        assert code == 1 and "party 1 runs with other options than party 0" in output, output


def test_a_party_that_never_connects_ends_the_others_start(sites, tmp_path):
    results = finish(start_parties(sites, tmp_path, "--connect-timeout", "3", only=range(2)), timeout=60)
    for code, output in results:
        assert code == 1 and "parties [2] did not connect within 3 s" in output, output


def test_a_party_that_drops_out_mid_run_ends_every_other_party(sites, tmp_path):
    processes = start_parties(sites, tmp_path)
    for line in processes[2].stderr:  # bounded by --connect-timeout: then it prints its error and exits
        if "parties connected" in line:
            break
    time.sleep(2)  # inputs shared, P under way
    assert all(p.poll() is None for p in processes)
    os.kill(processes[2].pid, signal.SIGKILL)
    results = finish(processes[:2], timeout=120)
    for code, output in results:
        assert code == 3 and "party 2 dropped out" in output and "nothing was opened" in output, output
    processes[2].wait()
    assert not list(tmp_path.glob("party*.npz")) and not list(tmp_path.glob(".*partial*"))


def test_each_party_sees_its_page_in_headless_chromium(sites, secure_run, tmp_path):
    """``ctzoo smap view``: party 0's own lesions by type over the other sites' density; a map every site agreed
    to share shows every lesion by site."""
    if not (shutil.which("chromium") and Path("/usr/bin/chromedriver").exists()):
        pytest.skip("needs Debian's chromium and chromium-driver: apt-get install -y chromium chromium-driver")
    sys.path.append(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    from perf_report_screenshot import headless_chromium, wait_until_drawn

    learned = dict(secure_run["learned"][0])
    shared = dict(learned, shared=np.asarray(True), all_points=np.vstack([p["own"] for p in secure_run["learned"]]),
                  all_sites=np.repeat(np.arange(3), learned["counts"]),
                  all_labels=np.concatenate([read_site(site)["labels"] for site in sites]))
    with open(tmp_path / "shared.npz", "wb") as handle:
        np.savez(handle, **shared)
    pages = {}
    for name, path in (("own", secure_run["out"] / "party0.npz"), ("shared", tmp_path / "shared.npz")):
        pages[name] = tmp_path / f"{name}.html"
        result = CliRunner().invoke(main, ["smap", "view", str(path), "--site", str(sites[0]), "--out",
                                           str(pages[name])])
        assert result.exit_code == 0, result.output
    wrong = CliRunner().invoke(main, ["smap", "view", str(secure_run["out"] / "party0.npz"), "--site", str(sites[1])])
    assert wrong.exit_code == 1 and "give the site file this party ran with" in wrong.output
    labels, counts = read_site(sites[0])["labels"], learned["counts"]
    driver = headless_chromium(tmp_path / "profile")
    try:
        driver.get(pages["own"].resolve().as_uri())
        wait_until_drawn(driver)
        summary = driver.find_element("id", "summary").text
        assert f"Site 0 of 3 · {counts[0]} of its lesions placed among {sum(counts)}" in summary
        assert f"the other sites' {sum(counts) - counts[0]} lesions are shown as density only" in summary
        traces = driver.execute_script(
            "return document.getElementById('map').data.map(t => [t.type, t.name, "
            "t.type === 'heatmap' ? t.z.flat().reduce((a, b) => a + b, 0) : t.x.length])")
        heatmaps = [t for t in traces if t[0] == "heatmap"]
        assert heatmaps == [["heatmap", "other sites", sum(counts) - counts[0]]]
        assert sum(t[2] for t in traces if t[0] == "scatter") == counts[0]
        for code in set(labels.tolist()):
            assert any(f"({int((labels == code).sum())})" in t[1] for t in traces if t[0] == "scatter")
        driver.get(pages["shared"].resolve().as_uri())
        wait_until_drawn(driver)
        traces = driver.execute_script("return document.getElementById('map').data.map(t => [t.name, t.x.length])")
        assert sorted(n for _, n in traces) == sorted(int(c) for c in counts) and "(this site)" in traces[0][0]
    finally:
        driver.quit()
