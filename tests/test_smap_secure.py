"""``ctzoo smap party``: two sites of the DeepLesion miniature and a helper on loopback, each site holding the
embeddings of its own patients, connected by mutually authenticated TLS, compute t-SNE's joint P on secret shares
(MPyC): it equals the plaintext P, and everything a party receives looks like uniform shares; inputs the parties do
not agree on, a wrong key, a party that never connects and one that drops out mid-run (three sites) end every other
party with a clear error and nothing written."""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from scipy import stats

from ctzoo.cli import main
from ctzoo.smap.features import deal_patients
from ctzoo.smap.party import loopback_addresses, own_histogram
from ctzoo.smap.secure import full_matrix
from ctzoo.smap.site_file import read_site, site_digest, write_site
from ctzoo.smap.tsne import conditional_p, embed, initial_embedding, joint_p, knn_agreement, squared_distances

PERPLEXITY = 5.0
#: 3 secure iterations (each costs seconds of three parties' CPU) show the map following the plaintext one as 6 did
ITERATIONS, GRID = 3, 12
pytestmark = pytest.mark.timeout(900)  # three CPU-bound parties share the CI machine's two cores with other tests
SCHEDULE = ("--iterations", str(ITERATIONS), "--learning-rate", "10", "--grid", str(GRID))


@pytest.fixture(scope="module")
def sites(deeplesion_mini16, tmp_path_factory) -> list[Path]:
    """Three site files, patients dealt out in turn until each site holds at least 4 lesions (6, 4 and 7: the
    secure run takes the first two, 10 points, since its cost grows with the square)."""
    folder = tmp_path_factory.mktemp("sites")
    csv_path = deeplesion_mini16 / "DL_info.csv"
    chosen = deal_patients(csv_path, sites=3, lesions_per_site=4)
    paths = []
    for k, patients in enumerate(chosen):
        paths.append(folder / f"site{k}.npz")
        result = CliRunner().invoke(main, ["smap", "features", "--deeplesion", str(csv_path), "--patients",
                                           ",".join(map(str, patients)), "--out", str(paths[-1])])
        assert result.exit_code == 0, result.output
    return paths


def synthetic_sites(folder: Path, counts: list[int], scale: float = 1.0, dim: int = 8) -> list[Path]:
    """Site files of one Gaussian cluster per site, times ``scale``: a secure run's inputs in milliseconds, for
    runs that test the protocol rather than the features (the miniature's sites take a build)."""
    rng = np.random.default_rng(1)
    paths = []
    for k, count in enumerate(counts):
        features = (rng.normal(0, 1, dim) + rng.normal(0, 1, (count, dim))) * scale
        site = {"features": features.astype(np.float32), "labels": rng.integers(1, 4, count).astype(np.int16),
                "scores": np.full(count, np.nan, np.float32),
                "meta": {"kind": "annotated", "model": "recistnet-mini", "model_version": "test", "weights": "w"}}
        paths.append(write_site(site, folder / f"synthetic{k}.npz"))
    return paths


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> Path:
    """``ctzoo smap keys`` for three parties: keys/party{i}."""
    folder = tmp_path_factory.mktemp("tls") / "keys"
    result = CliRunner().invoke(main, ["smap", "keys", "--parties", "3", "--out", str(folder)])
    assert result.exit_code == 0, result.output
    return folder


def start_parties(sites: list[Path | None], out: Path, keys: Path, *extra: str, ports: list[str] | None = None,
                  only: range | None = None, key_folders: dict[int, Path] | None = None,
                  record: Path | None = None, scripts: dict[int, list[str]] | None = None) -> list[subprocess.Popen]:
    """The parties' processes (``only`` some of them; a site None is a ``--helper``), each with ``keys/party{k}``
    unless ``key_folders`` says otherwise; with ``record``, party 0 records what it receives
    (``smap_recording_party.py``); ``scripts`` runs party k as that script and its arguments instead of ``-m ctzoo``."""
    addresses = [a for address in ports or loopback_addresses(len(sites)) for a in ("--party", address)]
    key_folders = key_folders or {}
    scripts = dict(scripts or {})
    if record:
        scripts[0] = [str(Path(__file__).with_name("smap_recording_party.py")), str(record)]
    return [subprocess.Popen([sys.executable, *scripts.get(k, ["-m", "ctzoo"]), "smap", "party",
                              *(["--helper"] if site is None else [str(site)]), "--index", str(k), *addresses,
                              "--perplexity", str(PERPLEXITY), "--out", str(out / f"party{k}.npz"),
                              "--keys", str(key_folders.get(k, keys / f"party{k}")), "--iterations", "1", *extra],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for k, site in enumerate(sites) if only is None or k in only]


def finish(processes: list[subprocess.Popen], timeout: float = 300) -> list[tuple[int, str]]:
    """Each party's exit status and output (stdout + stderr)."""
    results = []
    for process in processes:
        out, err = process.communicate(timeout=timeout)
        results.append((process.returncode, out + err))
    return results


@pytest.fixture(scope="module")
def secure_run(sites, keys, tmp_path_factory):
    """One secure run of two hospitals and a ``--helper`` (a party without lesions: three parties make the honest
    majority two hospitals lack), the smallest real deployment and half the points of three sites (the cost grows
    with the square): P opened for the comparison, ITERATIONS iterations; the sites offer to share their points,
    the helper does not; party 0 records every field element it receives."""
    out = tmp_path_factory.mktemp("run")
    ports = loopback_addresses(3)
    two_sites = [sites[0], sites[1], None]
    processes = [start_parties(two_sites, out, keys, "--insecure-reveal-p", *SCHEDULE,
                               *(["--share-points"] if k < 2 else []), ports=ports, only=range(k, k + 1),
                               record=out / "received.npz")[0] for k in range(3)]
    results = finish(processes, timeout=780)
    assert all(code == 0 for code, _ in results), results
    return {"out": out, "sites": sites[:2], "received": np.load(out / "received.npz"),
            "learned": [np.load(out / f"party{k}.npz") for k in range(3)]}


def plaintext(sites):
    points = np.vstack([read_site(site)["features"].astype(np.float64) for site in sites])
    p = joint_p(conditional_p(squared_distances(points), PERPLEXITY)[0])
    return p, embed(p, initial_embedding(len(points), 0), ITERATIONS, learning_rate=10.0, early_iterations=0)


def test_the_secure_joint_p_equals_the_plaintext_p(secure_run):
    plain, _ = plaintext(secure_run["sites"])
    for learned in secure_run["learned"]:
        assert list(learned["counts"]) == [len(read_site(site)["labels"]) for site in secure_run["sites"]] + [0]
        secure = full_matrix(learned["p"])
        assert np.abs(secure - plain).max() < 1e-3  # measured: ~2e-7 (P's largest entries are ~0.03)
        assert secure.sum() == pytest.approx(1.0, abs=1e-4)


def test_each_site_learns_its_own_points_of_the_joint_map_and_the_density(secure_run):
    """Each site its own points and the density of all; the helper places no points and learns the extent and
    the density only; the helper did not agree to share, so no site learns another's points."""
    _, reference = plaintext(secure_run["sites"])
    *learned, helper = secure_run["learned"]
    joint = np.vstack([party["own"] for party in learned])  # each site's own points, in party order
    assert knn_agreement(joint, reference, 3) >= 0.9
    assert np.abs(joint - reference).max() < 0.01 * np.abs(reference).max()
    for k, party in enumerate(secure_run["learned"]):
        assert len(party["own"]) == (len(read_site(secure_run["sites"][k])["labels"]) if k < 2 else 0)
        assert party["density"].sum() == len(joint)
        assert (party["others_density"] == party["density"] - own_histogram(party["own"], party["extent"],
                                                                             GRID)).all()
        assert party["others_density"].sum() == len(joint) - len(party["own"])
        assert not party["shared"] and "all_points" not in party.files  # the helper did not agree to share
        assert not party["plaintext"]  # the page says: on secret shares
        assert not party["p_saturated"]  # every row's precision search ended inside its range
        assert str(party["site_digest"]) == (site_digest(secure_run["sites"][k]) if k < 2 else "")
        assert list(party["extent"]) == list(learned[0]["extent"])
    assert helper["own"].shape == (0, 2)
    extent = learned[0]["extent"]
    assert extent == pytest.approx([joint[:, 0].min(), joint[:, 0].max(), joint[:, 1].min(), joint[:, 1].max()],
                                   abs=1e-6)
    view = CliRunner().invoke(main, ["smap", "view", str(secure_run["out"] / "party2.npz"), "--site",
                                     str(secure_run["sites"][0])])
    assert view.exit_code == 1 and "is a helper's map" in view.output


def looks_like_uniform_shares(u: np.ndarray) -> dict[str, float]:
    """Tests of ``u = value / modulus`` against independent uniform field elements: Kolmogorov-Smirnov, chi-square
    over 64 bins, chi-square of consecutive pairs over 8 x 8 bins (p-values; the chi-squares from 640 values on),
    and how many values lie within ``modulus * 2^-16`` of 0 against how many a uniform stream would put there, in
    standard deviations (a plaintext fixed-point number or a small integer sent in the clear is such a value)."""
    pairs = np.histogram2d(u[:-1], u[1:], bins=8, range=[[0, 1], [0, 1]])[0].ravel()
    near_zero = int(((u < 2.0**-16) | (u > 1 - 2.0**-16)).sum())
    expected = 2 * len(u) * 2.0**-16
    enough = len(u) >= 640
    return {"ks": stats.kstest(u, "uniform").pvalue,
            "bins": stats.chisquare(np.histogram(u, bins=64, range=(0, 1))[0]).pvalue if enough else 1.0,
            "pairs": stats.chisquare(pairs).pvalue if enough else 1.0,
            "near_zero_excess": (near_zero - expected) / np.sqrt(expected + 1)}


def passes(tests: dict[str, float]) -> bool:
    return min(tests["ks"], tests["bins"], tests["pairs"]) > 1e-4 and tests["near_zero_excess"] < 6


def test_everything_a_party_receives_looks_like_uniform_shares(sites, secure_run):
    """Party 0's incoming field elements over the whole run (the other sites' input shares, every product's
    resharing, every opening's shares): uniform and serially independent per field; the same tests catch the
    site's features if even 1 % of the stream carried them in the clear (as fixed-point field elements)."""
    received = secure_run["received"]
    assert sum(len(received[name]) for name in received.files) > 100_000
    for name in received.files:
        u = received[name]
        assert passes(looks_like_uniform_shares(u)), (name, len(u), looks_like_uniform_shares(u))
    name = max(received.files, key=lambda k: len(received[k]))
    modulus = int(name.split("_")[1])
    features = read_site(sites[1])["features"].ravel().astype(np.float64)
    clear = np.array([(round(v * 2**32) % modulus) / modulus for v in features])
    leaky = received[name].copy()
    leaky[::100] = np.resize(clear, len(leaky[::100]))
    assert not passes(looks_like_uniform_shares(leaky))


def test_insecure_plaintext_mode_computes_the_plaintext_t_sne_for_every_party(sites, keys, tmp_path):
    """``--insecure-plaintext``: the sites open their points to each other over the same authenticated
    connections and each computes the reference t-SNE: the same P and map as here, every point shared."""
    plain_p, reference = plaintext(sites)
    results = finish(start_parties(sites, tmp_path, keys, "--insecure-plaintext", "--insecure-reveal-p", *SCHEDULE),
                     timeout=300)
    assert all(code == 0 and "plaintext: every party saw every point's features" in out for code, out in results)
    counts = [len(read_site(site)["labels"]) for site in sites]
    for k in range(3):
        learned = np.load(tmp_path / f"party{k}.npz")
        assert np.abs(full_matrix(learned["p"]) - plain_p).max() < 1e-8
        assert np.abs(learned["all_points"] - reference).max() < 1e-6 * np.abs(reference).max()
        assert learned["plaintext"] and learned["shared"]
        assert list(learned["all_sites"]) == list(np.repeat(np.arange(3), counts))
        assert (learned["all_labels"] == np.concatenate([read_site(site)["labels"] for site in sites])).all()
        assert np.array_equal(learned["own"], learned["all_points"][sum(counts[:k]):sum(counts[:k + 1])])


def test_insecure_plaintext_parties_compute_their_t_sne_past_the_peer_timeout(keys, tmp_path):
    """Each party computes the plaintext t-SNE alone once every point is opened, for longer than --peer-timeout:
    no peer waits on it meanwhile (the labels used to be opened after it, and every party exited with status 3,
    each saying another had sent nothing)."""
    # 300 points at 5,000 iterations: about 6 s of t-SNE on an idle 2-core VM (150 points took 1.6 s there, under
    # the 2 s timeout this test once used), well past the shortest --peer-timeout
    sites = synthetic_sites(tmp_path, [100, 100, 100])
    results = finish(start_parties(sites, tmp_path, keys, "--insecure-plaintext", "--iterations", "5000",
                                   "--peer-timeout", "1"), timeout=300)
    assert all(code == 0 for code, _ in results), results
    assert min(float(np.load(tmp_path / f"party{k}.npz")["seconds"][1]) for k in range(3)) > 1


def test_parties_on_ipv6_addresses_run(keys, tmp_path):
    """``--party [::1]:PORT``: the host goes to MPyC and to the listening socket without its brackets (they used
    to reach getaddrinfo: a traceback, or a wait until the connect timeout)."""
    try:
        ports = loopback_addresses(3, "::1")
    except OSError:
        pytest.skip("no IPv6 loopback here")
    results = finish(start_parties([*synthetic_sites(tmp_path, [3, 3]), None], tmp_path, keys, "--perplexity", "2",
                                   "--insecure-plaintext", "--connect-timeout", "60", ports=ports), timeout=120)
    assert all(code == 0 and "Traceback" not in output for code, output in results), results
    unbracketed = CliRunner().invoke(main, ["smap", "party", "--helper", "--index", "0", "--no-tls", "--out",
                                            str(tmp_path / "map.npz"), *[a for port in (7001, 7002, 7003)
                                                                         for a in ("--party", f"::1:{port}")]])
    assert unbracketed.exit_code == 2 and "an IPv6 host goes in [], e.g. [::1]:7001" in unbracketed.output


def test_one_site_among_helpers_has_no_joint_map(sites, keys, tmp_path):
    for code, output in finish(start_parties([sites[0], None, None], tmp_path, keys), timeout=120):
        assert code == 1 and "1 of the 3 parties bring lesions: a joint map needs at least 2 sites" in output


def test_keys_and_tls_are_required_outside_loopback(sites, keys, tmp_path):
    listed = ["--party", "10.0.0.1:7000", "--party", "10.0.0.2:7000", "--party", "10.0.0.3:7000"]
    for extra, message in (([], "give --keys"), (["--no-tls"], "--no-tls is allowed only when every --party is on "
                                                              "loopback"),
                           (["--helper", "--keys", str(keys / "party0")], "or --helper for a party without lesions"),
                           (["--no-tls", "--keys", str(keys / "party0")], "give --keys")):
        result = CliRunner().invoke(main, ["smap", "party", str(sites[0]), "--index", "0", *listed, "--out",
                                           str(tmp_path / "map.npz"), *extra])
        assert result.exit_code == 2 and message in result.output, result.output
    result = CliRunner().invoke(main, ["smap", "party", str(sites[0]), "--index", "1", *listed, "--out",
                                       str(tmp_path / "map.npz"), "--keys", str(keys / "party0")])
    assert result.exit_code == 1 and "lacks party_1.crt, party_1.key" in result.output, result.output
    again = CliRunner().invoke(main, ["smap", "keys", "--parties", "3", "--out", str(keys)])
    assert again.exit_code == 1 and "keys are never overwritten" in again.output
    assert sorted(p.name for p in (keys / "party2").iterdir()) == ["mpyc_ca.crt", "party_2.crt", "party_2.key"]
    assert (keys / "party2" / "party_2.key").stat().st_mode & 0o077 == 0 == (keys / "party2").stat().st_mode & 0o077
    assert not list(keys.rglob("*ca.key")) and not list(tmp_path.glob("*.npz"))


@pytest.mark.parametrize("wrong", ["other CA", "another party's certificate"])
def test_a_wrong_key_ends_every_party_before_anything_is_sent(sites, keys, tmp_path, wrong):
    """A party whose key comes from another ``ctzoo smap keys`` run, or one that presents another party's
    (valid) certificate as its own: the parties that meet it stop within seconds, with a message naming the cause,
    and nothing is written. Party 2 with another CA's key only listens (the others connect to it): it ignores their
    failed handshakes as it would a stranger's and stops at its --connect-timeout, saying who never connected; so
    would a party that had not yet reached the others when they stopped (its first attempt too early, its retry
    too late)."""
    if wrong == "other CA":
        result = CliRunner().invoke(main, ["smap", "keys", "--parties", "3", "--out", str(tmp_path / "other")])
        assert result.exit_code == 0, result.output
        bad, folder = 2, tmp_path / "other" / "party2"
    else:
        bad, folder = 0, tmp_path / "impostor"
        folder.mkdir()
        shutil.copy(keys / "party1" / "mpyc_ca.crt", folder)
        for suffix in ("crt", "key"):
            shutil.copy(keys / "party1" / f"party_1.{suffix}", folder / f"party_0.{suffix}")
    results = finish(start_parties(sites, tmp_path, keys, "--connect-timeout", "15", key_folders={bad: folder}),
                     timeout=120)
    timed_out = [k for k, (_, output) in enumerate(results) if "did not connect within 15 s" in output]
    assert len(timed_out) < len(results), results  # on a loaded machine a party may miss the others (see above)
    for code, output in results:
        # the impostor's own connections succeed; it may learn of the refusal as a peer leaving at once
        assert (code == 1 and "nothing was sent" in output) or (
            wrong != "other CA" and code == 3 and "dropped out" in output and "nothing was opened" in output), output
        assert "Traceback" not in output
    outputs = " ".join(output for _, output in results)
    if wrong == "other CA":
        assert "TLS handshake" in outputs and "--keys must come from the same `ctzoo smap keys` run" in outputs
    else:
        assert "a peer claiming to be party 0 presented the certificate of 'MPyC party 1': refused" in outputs
    assert not list(tmp_path.glob("party*.npz"))


def test_inputs_the_parties_do_not_agree_on_end_every_party(sites, keys, tmp_path):
    narrow = read_site(sites[2])
    site = {"features": narrow["features"][:, :32], "labels": narrow["labels"], "scores": narrow["scores"],
            "meta": {k: narrow["meta"][k] for k in ("kind", "model", "model_version", "weights")}}
    odd = write_site(site, tmp_path / "narrow.npz")
    results = finish(start_parties([sites[0], sites[1], odd], tmp_path, keys))
    for code, output in results:
        assert code == 1 and "party 2 has 32 features per lesion, party 0 64" in output, output
        assert "Traceback" not in output
    assert not list(tmp_path.glob("party*.npz"))


def test_parties_with_other_options_stop_before_any_secret_work(sites, keys, tmp_path):
    ports = loopback_addresses(3)
    processes = [start_parties(sites, tmp_path, keys, *(["--perplexity", "6"] if k == 1 else []), ports=ports,
                               only=range(k, k + 1))[0] for k in range(3)]
    for code, output in finish(processes, timeout=120):
        assert code == 1 and "party 1 runs with other options than party 0" in output, output


def test_a_party_that_never_connects_ends_the_others_start(sites, keys, tmp_path):
    # party 0 gives up first; party 1, which would wait longer, sees it leave (with equal timeouts either may)
    ports = loopback_addresses(3)
    processes = [start_parties(sites, tmp_path, keys, "--connect-timeout", timeout, ports=ports,
                               only=range(k, k + 1))[0] for k, timeout in enumerate(["6", "60"])]
    (first_code, first), (second_code, second) = finish(processes, timeout=90)
    assert first_code == 1 and "parties [2] did not connect within 6 s" in first, first
    assert second_code == 1 and "party 0 left before every party had connected" in second, second
    assert "parties [2] had not connected either; nothing was sent" in second, second
    assert "Traceback" not in first + second


def test_a_party_that_drops_out_mid_run_ends_every_other_party(sites, keys, tmp_path, monkeypatch):
    scratch = tmp_path / "tmp"  # the parties' temporary folders (TLS keys for MPyC)
    scratch.mkdir()
    monkeypatch.setenv("TMPDIR", str(scratch))
    processes = start_parties(sites, tmp_path, keys)
    for line in processes[2].stderr:  # bounded by --connect-timeout: then it prints its error and exits
        if "parties connected" in line:
            break
    time.sleep(2)  # inputs shared, P under way
    assert all(p.poll() is None for p in processes)
    os.kill(processes[2].pid, signal.SIGKILL)
    results = finish(processes[:2], timeout=120)
    for code, output in results:  # a survivor may see the other survivor leave (over party 2) before party 2
        assert code == 3 and "dropped out" in output and "nothing was opened" in output, output
    assert "party 2 dropped out" in " ".join(output for _, output in results), results
    processes[2].wait()
    assert not list(tmp_path.glob("party*.npz")) and not list(tmp_path.glob(".*partial*"))
    # gone once connected, so neither the survivors' os._exit nor the SIGKILL leaves one behind
    assert not list(scratch.iterdir())


def test_no_party_unpickles_what_a_peer_sends(keys, tmp_path):
    """A party that ends as MPyC's shutdown does, whose barrier pickles (``smap_evil_party.py``: its pickles create
    a marker file where they are unpickled): no honest party unpickles them; each finishes, or stops with a clear
    error and writes no map."""
    marker = tmp_path / "unpickled-by-a-peer"
    evil = [str(Path(__file__).with_name("smap_evil_party.py")), str(marker)]
    processes = start_parties([*synthetic_sites(tmp_path, [3, 3]), None], tmp_path, keys, "--perplexity", "2",
                              scripts={2: evil})
    honest = finish(processes[:2], timeout=300)
    processes[2].kill()
    processes[2].communicate()
    assert not marker.exists()
    for k, (code, output) in enumerate(honest):
        assert "Traceback" not in output, output
        assert code == 0 or (code == 1 and "closing check opened" in output) or (
            code == 3 and "party 2 dropped out" in output), output
        assert (tmp_path / f"party{k}.npz").exists() == (code == 0)


def test_the_secure_p_does_not_depend_on_the_features_scale(keys, tmp_path):
    """Features of a few hundred in 1024 dimensions (squared distances ~3e7, beyond what SecFxp(64, 32) resolves
    unscaled: P drifted 0.07 towards uniform): the parties agree on a power of two to divide them by, and P equals the
    plaintext P as closely as at scale 1."""
    sites = synthetic_sites(tmp_path, [3, 3], scale=100.0, dim=1024)
    results = finish(start_parties([*sites, None], tmp_path, keys, "--perplexity", "2", "--insecure-reveal-p"))
    assert all(code == 0 for code, _ in results), results
    points = np.vstack([read_site(site)["features"].astype(np.float64) for site in sites])
    assert 300 < np.abs(points).max() < 1000 and squared_distances(points).max() > 2**24
    plain = joint_p(conditional_p(squared_distances(points), 2.0)[0])
    for k in range(3):
        assert np.abs(full_matrix(np.load(tmp_path / f"party{k}.npz")["p"]) - plain).max() < 1e-3  # measured 2e-7


def poke_as_strangers(address: str) -> None:
    """What anyone may do to a party's port: a plain TCP connection opened and closed (a port scanner, a load
    balancer's health check), then TLS without a certificate (the party refuses the handshake)."""
    host, port = address.rsplit(":", 1)
    for _ in range(300):  # until the party listens
        try:
            socket.create_connection((host, int(port)), timeout=5).close()
            break
        except ConnectionRefusedError:
            time.sleep(0.1)
    context = ssl.create_default_context()
    context.check_hostname, context.verify_mode = False, ssl.CERT_NONE
    with socket.create_connection((host, int(port)), timeout=5) as connection:
        try:
            context.wrap_socket(connection, server_hostname="stranger").recv(1)
        except (ssl.SSLError, OSError):
            pass


def test_strangers_at_a_partys_port_do_not_end_the_run(keys, tmp_path):
    """Strangers connect to the ports parties 1 and 2 listen on before party 0 has started: the parties note them
    and keep listening, and the run completes."""
    ports = loopback_addresses(3)
    sites = [*synthetic_sites(tmp_path, [2, 2]), None]
    waiting = start_parties(sites, tmp_path, keys, "--perplexity", "2", ports=ports, only=range(1, 3))
    for address in ports[1:]:
        poke_as_strangers(address)
    time.sleep(1)
    assert all(process.poll() is None for process in waiting)
    results = finish(start_parties(sites, tmp_path, keys, "--perplexity", "2", ports=ports, only=range(1)) + waiting)
    assert all(code == 0 for code, _ in results), results
    for _, output in results[1:]:
        assert "ignored a connection that failed the TLS handshake" in output and "still listening" in output


def test_a_frozen_party_ends_every_other_party_after_the_peer_timeout(keys, tmp_path):
    """A party stopped mid-run (SIGSTOP: its connections stay open, so none is lost): the others exit with status
    3 once it has sent nothing for --peer-timeout seconds (counted from its last bytes, which may precede the stop),
    naming it, and write nothing."""
    processes = start_parties([*synthetic_sites(tmp_path, [2, 2]), None], tmp_path, keys, "--perplexity", "2",
                              "--iterations", "1000", "--peer-timeout", "8")
    try:
        for line in processes[2].stderr:  # bounded by --connect-timeout: then it prints its error and exits
            if "parties connected" in line:
                break
        time.sleep(1)
        os.kill(processes[2].pid, signal.SIGSTOP)
        frozen = time.monotonic()
        results = finish(processes[:2], timeout=120)
        waited = time.monotonic() - frozen
    finally:
        for process in processes:
            process.kill()  # a stopped process too
            process.wait()
    for code, output in results:  # a survivor may see the other survivor leave over party 2 first
        assert code == 3 and "nothing written" in output and "Traceback" not in output, output
    # the one waiting for party 2 may itself fall silent first, so the other can time out on it: a cascade, as
    # with a real frozen peer; either way one survivor names a silent peer
    assert re.search(r"party [0-2] sent nothing for 8 s while this party waited for it", " ".join(
        out for _, out in results))
    assert waited < 60 and not list(tmp_path.glob("party*.npz"))


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
                  all_labels=np.concatenate([read_site(site)["labels"] for site in secure_run["sites"]]))
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
        assert f"Site 1 of 2 (and 1 helper) · {counts[0]} of its lesions placed among {sum(counts)}" in summary
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
        assert sorted(n for _, n in traces) == sorted(int(c) for c in counts if c) and "(this site)" in traces[0][0]
    finally:
        driver.quit()
