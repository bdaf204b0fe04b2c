"""The parts of ``ctzoo.smap.party`` that need no running parties: the power of two every party divides its
features by, and the dimension a party refuses before it connects."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.smap.keys import make_party_keys
from ctzoo.smap.party import MAX_FEATURE_DIM, NO_FEATURES, feature_shift, loopback_addresses, magnitude_exponent
from ctzoo.smap.site_file import write_site
from ctzoo.smap.tsne import squared_distances


def test_scaled_features_have_squared_distances_of_at_most_one_whatever_their_scale():
    rng = np.random.default_rng(0)
    for scale in (1e-6, 1e-3, 1.0, 100.0, 1e5):
        for dim in (1, 3, 64, 1000):
            x = rng.normal(0, 1, (20, dim)) * scale
            x[0] = np.abs(x).max()  # the worst case: two points at opposite corners
            x[1] = -x[0]
            exponent = magnitude_exponent(x)
            assert 2.0 ** (exponent - 1) <= np.abs(x).max() < 2.0**exponent
            scaled = squared_distances(x * 2.0 ** -feature_shift(exponent, dim))
            assert 0.25 < scaled.max() <= 1.0, (scale, dim)  # at most 1, and not needlessly small
    assert magnitude_exponent(np.zeros((3, 4))) == magnitude_exponent(np.zeros((0, 0))) == NO_FEATURES


def test_a_party_refuses_more_dimensions_than_the_fixed_point_numbers_resolve(tmp_path):
    dim = MAX_FEATURE_DIM + 1
    site = write_site({"features": np.ones((2, dim), np.float32), "labels": np.ones(2, np.int16),
                       "scores": np.full(2, np.nan, np.float32),
                       "meta": {"kind": "annotated", "model": "m", "model_version": "1", "weights": "w"}},
                      tmp_path / "wide.npz")
    result = CliRunner().invoke(main, ["smap", "party", str(site), "--index", "0", "--no-tls", "--out",
                                       str(tmp_path / "map.npz"), *[a for port in (7001, 7002, 7003)
                                                                    for a in ("--party", f"127.0.0.1:{port}")]])
    assert result.exit_code == 1 and f"{dim} features per lesion, above the {MAX_FEATURE_DIM}" in result.output
    assert "Traceback" not in result.output and not (tmp_path / "map.npz").exists()


def test_a_party_that_cannot_listen_on_its_address_says_so_in_one_line(tmp_path):
    """Party 1 listens on its own --party address: a port another process holds, or a host that is not this
    machine's, ends it at once with exit status 1 and one line (it used to be a 30-line OSError traceback)."""
    keys = make_party_keys(3, tmp_path / "keys")[1]  # off loopback, TLS is required
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        for own, cause in ((busy, "address already in use"), ("192.0.2.1:7002", "cannot assign requested address")):
            party = subprocess.run([sys.executable, "-m", "ctzoo", "smap", "party", "--helper", "--index", "1",
                                    "--keys", str(keys), "--party", "127.0.0.1:7001", "--party", own, "--party",
                                    "127.0.0.1:7003", "--connect-timeout", "30", "--out", str(tmp_path / "map.npz")],
                                   capture_output=True, text=True, timeout=60)
            assert party.returncode == 1 and "Traceback" not in party.stderr, party.stderr
            assert f"party 1 cannot listen on {own}: " in party.stderr and cause in party.stderr
            assert "(is the port in use, is the host this machine's address?)" in party.stderr
    assert not (tmp_path / "map.npz").exists()


def test_a_party_checks_its_out_path_before_it_runs(tmp_path):
    """--out is the SITE file (the map would replace it), or lies under a file (the map was lost after the whole
    run): refused at once, before any connection, the site file untouched."""
    site = write_site({"features": np.ones((2, 4), np.float32), "labels": np.ones(2, np.int16),
                       "scores": np.full(2, np.nan, np.float32),
                       "meta": {"kind": "annotated", "model": "m", "model_version": "1", "weights": "w"}},
                      tmp_path / "site.npz")
    before = site.read_bytes()
    (tmp_path / "file").write_text("not a folder\n")
    listed = [a for port in (7001, 7002, 7003) for a in ("--party", f"127.0.0.1:{port}")]
    for out, code, says in ((site, 2, "is the SITE file: the map would replace this site's lesions"),
                            (tmp_path / "file" / "map.npz", 1, f"cannot write a file in {tmp_path / 'file'}")):
        result = CliRunner().invoke(main, ["smap", "party", str(site), "--index", "0", "--no-tls", *listed,
                                           "--connect-timeout", "1", "--out", str(out)])
        assert result.exit_code == code and says in result.output, result.output
        assert "Traceback" not in result.output
    assert site.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["file", "site.npz"]


def test_a_party_stopped_by_sigterm_while_it_waits_removes_its_scratch_folder(tmp_path):
    """A party waiting for the others, stopped with SIGTERM (``kill``, ``systemctl stop``): exit status 143 and its
    temporary folder (a link to its key folder, for MPyC) removed; Python's default used to end it at once and
    leave the folder behind."""
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    keys = make_party_keys(3, tmp_path / "keys")[1]
    own = loopback_addresses(3)
    party = subprocess.Popen([sys.executable, "-m", "ctzoo", "smap", "party", "--helper", "--index", "1", "--keys",
                              str(keys), *[a for address in own for a in ("--party", address)], "--out",
                              str(tmp_path / "map.npz")], stderr=subprocess.PIPE, text=True,
                             env={**os.environ, "TMPDIR": str(scratch)})
    try:
        host, port = own[1].rsplit(":", 1)
        for _ in range(600):  # until it listens, with its scratch folder made
            try:
                socket.create_connection((host, int(port)), timeout=5).close()
                break
            except ConnectionRefusedError:
                time.sleep(0.1)
        assert [p.name[:11] for p in scratch.iterdir()] == ["ctzoo-smap-"]
        party.send_signal(signal.SIGTERM)
        _, errors = party.communicate(timeout=60)
    finally:
        party.kill()
        party.wait()
    assert party.returncode == 143 and "Stopped (SIGTERM): nothing written" in errors, errors
    assert "Traceback" not in errors and not list(scratch.iterdir())
