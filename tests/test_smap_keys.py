"""``ctzoo smap keys``: the certificates pass the handshake MPyC makes (a client checks the server's name, a server
requires the client's certificate) under strict X.509 verification, the default of Python >= 3.13's
``ssl.create_default_context`` (set here explicitly, so the test means the same on older Pythons)."""

from __future__ import annotations

import shutil
import socket
import ssl
import threading

import pytest
from click.testing import CliRunner

from ctzoo.cli import main
from ctzoo.smap.keys import check_key_folder, check_peer_certificate, make_party_keys, party_name

STRICT = ssl.VERIFY_X509_STRICT | ssl.VERIFY_X509_PARTIAL_CHAIN


def handshake(folders, client: int, server: int, server_hostname: str) -> dict:
    """Party ``client`` connects to party ``server`` as MPyC does, both verifying strictly; the certificate the
    server saw (``check_peer_certificate`` reads it)."""
    def context(purpose, index):
        made = ssl.create_default_context(purpose)
        made.load_cert_chain(folders[index] / f"party_{index}.crt", folders[index] / f"party_{index}.key")
        made.load_verify_locations(folders[index] / "mpyc_ca.crt")
        made.verify_mode = ssl.CERT_REQUIRED
        made.verify_flags |= STRICT
        return made

    server_end, client_end = socket.socketpair()
    seen: dict = {}

    def serve():
        try:
            with context(ssl.Purpose.CLIENT_AUTH, server).wrap_socket(server_end, server_side=True) as tls:
                seen["certificate"] = tls.getpeercert()
        except ssl.SSLError as error:
            seen["error"] = error

    thread = threading.Thread(target=serve)
    thread.start()
    try:
        with context(ssl.Purpose.SERVER_AUTH, client).wrap_socket(client_end, server_hostname=server_hostname):
            pass
    finally:
        thread.join(timeout=30)
    if "error" in seen:
        raise seen["error"]
    return seen["certificate"]


def test_the_keys_pass_strict_x509_verification(tmp_path):
    folders = make_party_keys(3, tmp_path / "keys")
    for client, server in ((0, 1), (0, 2), (1, 2)):
        seen = handshake(folders, client, server, party_name(server))
        check_peer_certificate(seen, client)  # the common name the server checks
    with pytest.raises(ssl.SSLCertVerificationError, match="Hostname mismatch"):
        handshake(folders, 0, 1, party_name(2))  # the name still binds: party 1 cannot pose as party 2


def test_a_key_folder_is_checked_as_mpyc_loads_it(tmp_path):
    """A key that is not the certificate's, or files that are not PEM: refused before connecting, naming the file
    (the key mismatch used to surface only in the handshake: a traceback, or peers that seemed never to connect)."""
    folders = make_party_keys(3, tmp_path / "keys")
    assert check_key_folder(folders[0], 0) == folders[0]
    mixed = tmp_path / "mixed"
    shutil.copytree(folders[0], mixed)
    shutil.copy(folders[1] / "party_1.key", mixed / "party_0.key")
    with pytest.raises(ValueError, match=r"party_0.key is not the key of .*party_0.crt \(KEY_VALUES_MISMATCH\)"):
        check_key_folder(mixed, 0)
    result = CliRunner().invoke(main, ["smap", "party", "--helper", "--index", "0", "--keys", str(mixed), "--out",
                                       str(tmp_path / "map.npz"), *[a for port in (7001, 7002, 7003)
                                                                    for a in ("--party", f"127.0.0.1:{port}")]])
    assert result.exit_code == 1 and "party_0.key is not the key of" in result.output, result.output
    assert "Traceback" not in result.output
    for name, says in (("party_0.key", "is not a readable PEM private key"),
                       ("party_0.crt", "is not a readable PEM certificate"),
                       ("mpyc_ca.crt", "is not a readable PEM certificate")):
        broken = tmp_path / f"broken-{name}"
        shutil.copytree(folders[0], broken)
        (broken / name).write_text("not PEM\n")
        with pytest.raises(ValueError, match=f"{name} {says}"):
            check_key_folder(broken, 0)
