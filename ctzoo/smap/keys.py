"""Keys for mutually authenticated TLS between the parties of ``ctzoo smap party``: one certificate authority and,
per party, a key and a certificate signed by it, named as MPyC checks them (the common name ``MPyC party {i}``).

Each party gets a folder with the CA's certificate (``mpyc_ca.crt``), its own ``party_{i}.key`` and
``party_{i}.crt``: a party accepts a peer only when the peer's certificate is signed by that CA *and* names the
party index the peer claims (:func:`check_peer_certificate`). The CA's private key exists only while the
certificates are signed, in a temporary folder that is then removed, so nobody can mint another party's
certificate afterwards; whoever runs :func:`make_party_keys` is trusted to hand each site only its own folder.

Made with the ``openssl`` command line (in every Debian: ``ca-certificates`` depends on it), not by hand.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import tempfile
from pathlib import Path
from typing import Any

from ctzoo.io.atomic import atomic_folder

CA_CERTIFICATE = "mpyc_ca.crt"
VALID_DAYS = 365


def party_name(index: int) -> str:
    """The certificate's common name MPyC expects of party ``index`` (it sends it as the TLS server name)."""
    return f"MPyC party {index}"


def key_files(index: int) -> tuple[str, str]:
    return f"party_{index}.crt", f"party_{index}.key"


def openssl(*arguments: str, cwd: Path) -> None:
    if shutil.which("openssl") is None:
        raise RuntimeError("the openssl command is needed to make keys: apt-get install -y openssl")
    result = subprocess.run(["openssl", *arguments], cwd=cwd, capture_output=True, text=True)
    if result.returncode:
        raise RuntimeError(f"openssl {arguments[0]} failed: {result.stderr.strip()}")


def extensions_config(parties: int) -> str:
    """The OpenSSL configuration of the certificates' X.509 v3 extensions (the system's openssl.cnf is not read):
    section ``ca`` for the CA, ``party{i}`` for party i. Verifiers in strict mode (Python >= 3.13's default
    ``VERIFY_X509_STRICT``) refuse a CA without key usage and a certificate without key identifiers; a party's
    certificate serves both ends of TLS, so it may sign handshakes as server and client; its name is also a
    subjectAltName (hostname checks read only that when it is there) and stays the common name, which
    :func:`check_peer_certificate` reads. No keyEncipherment: the keys are EC, which TLS uses to sign only."""
    lines = ["[req]", "distinguished_name = name", "[name]",
             "[ca]", "basicConstraints = critical, CA:TRUE", "keyUsage = critical, keyCertSign, cRLSign",
             "subjectKeyIdentifier = hash", "authorityKeyIdentifier = keyid:always"]
    for index in range(parties):
        lines += [f"[party{index}]", "basicConstraints = critical, CA:FALSE", "keyUsage = critical, digitalSignature",
                  "extendedKeyUsage = serverAuth, clientAuth", f"subjectAltName = DNS:{party_name(index)}",
                  "subjectKeyIdentifier = hash", "authorityKeyIdentifier = keyid, issuer"]
    return "\n".join(lines) + "\n"


def make_party_keys(parties: int, out: str | Path, days: int = VALID_DAYS) -> list[Path]:
    """One folder per party, ``out/party{i}``, with the CA certificate and the party's key and certificate (EC
    P-256, ``days`` valid). Written whole or not at all; refuses an existing ``out``."""
    out = Path(out)
    if parties < 3:
        raise ValueError(f"a joint run needs at least 3 parties, got {parties}")
    if out.exists():
        raise FileExistsError(f"{out} exists: keys are never overwritten (a party still holding the old ones could "
                              "not connect); give a new folder")
    with tempfile.TemporaryDirectory(prefix="ctzoo-ca-") as scratch, atomic_folder(out) as partial:
        work = Path(scratch)
        (work / "extensions.cnf").write_text(extensions_config(parties))
        openssl("req", "-x509", "-config", "extensions.cnf", "-extensions", "ca", "-newkey", "ec", "-pkeyopt",
                "ec_paramgen_curve:P-256", "-nodes", "-keyout", "ca.key", "-out", CA_CERTIFICATE, "-days", str(days),
                "-subj", "/CN=ctzoo smap CA", cwd=work)
        for index in range(parties):
            certificate, key = key_files(index)
            openssl("req", "-config", "extensions.cnf", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256",
                    "-nodes", "-keyout", key, "-out", "request.csr", "-subj", f"/CN={party_name(index)}", cwd=work)
            openssl("x509", "-req", "-in", "request.csr", "-CA", CA_CERTIFICATE, "-CAkey", "ca.key",
                    "-CAcreateserial", "-out", certificate, "-days", str(days), "-extfile", "extensions.cnf",
                    "-extensions", f"party{index}", cwd=work)
            folder = Path(partial) / f"party{index}"
            folder.mkdir(mode=0o700)  # a party's folder holds its private key: its owner's only
            for name in (CA_CERTIFICATE, certificate, key):
                shutil.copy(work / name, folder / name)
            (folder / key).chmod(0o600)
    return [out / f"party{index}" for index in range(parties)]


def check_key_folder(folder: str | Path, index: int) -> Path:
    """``folder`` if it holds what party ``index`` needs, loadable as MPyC loads it (the CA certificate, and the
    party's certificate with its own key), else a ValueError naming the file: a key that does not match its
    certificate otherwise fails only in the handshake, as a traceback on a listening party or as peers that seem
    never to connect."""
    folder = Path(folder)
    missing = [name for name in (CA_CERTIFICATE, *key_files(index)) if not (folder / name).is_file()]
    if missing:
        raise ValueError(f"{folder} lacks {', '.join(missing)}: party {index} needs the CA certificate and its own "
                         f"key and certificate (ctzoo smap keys)")
    certificate, key = (folder / name for name in key_files(index))
    for path in (folder / CA_CERTIFICATE, certificate):  # each alone: a certificate loads as a trusted one
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_verify_locations(cafile=path)
        except (ssl.SSLError, OSError) as error:
            raise ValueError(f"{path} is not a readable PEM certificate ({reason(error)}): give this party's folder "
                             "from ctzoo smap keys") from None
    try:
        ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(certificate, key)
    except (ssl.SSLError, OSError) as error:
        if getattr(error, "reason", None) == "KEY_VALUES_MISMATCH":
            raise ValueError(f"{key} is not the key of {certificate} (KEY_VALUES_MISMATCH): give party {index}'s "
                             "own key and certificate, from one ctzoo smap keys run") from None
        raise ValueError(f"{key} is not a readable PEM private key ({reason(error)}): give this party's folder from "
                         "ctzoo smap keys") from None
    return folder


def reason(error: Exception) -> str:
    """OpenSSL's short reason for a failed load, or the error itself."""
    return str(getattr(error, "reason", None) or getattr(error, "strerror", None) or error)


def common_name(certificate: dict[str, Any] | None) -> str | None:
    """The subject's common name of a certificate as :meth:`ssl.SSLSocket.getpeercert` gives it."""
    for entry in (certificate or {}).get("subject", ()):
        for key, value in entry:
            if key == "commonName":
                return value
    return None


def check_peer_certificate(certificate: dict[str, Any] | None, claimed_index: int) -> None:
    """A ValueError unless the peer's (already CA-verified) certificate names the party index it claims: MPyC
    itself checks the name only of the parties it connects to, not of those that connect to it."""
    name = common_name(certificate)
    if name != party_name(claimed_index):
        raise ValueError(f"a peer claiming to be party {claimed_index} presented the certificate of "
                         f"{name or 'no party'!r}: refused")
