"""A real Orthanc on loopback for tests: ``running_orthanc(tmp_path)`` and ``storescu(instance, files)``.

Needs the Debian packages ``orthanc`` (``/usr/sbin/Orthanc``) and ``dcmtk`` (``storescu``); a missing
binary fails the test (CI installs them: ``apt-get install -y orthanc dcmtk``), it never skips. Imports nothing
of pytest, so ``tests/smoke_install.py`` can start an Orthanc in the main job's environment, which has no test
tools: a failure raises :class:`OrthancTestError`, an AssertionError, which pytest reports as a failed test.
"""

from __future__ import annotations

import json
import os
import secrets
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path

import httpx

ORTHANC_CANDIDATES = ("Orthanc", "/usr/sbin/Orthanc", "/usr/bin/Orthanc")
START_TIMEOUT_S = 20.0


class OrthancTestError(AssertionError):
    """Orthanc or dcmtk missing, or Orthanc did not start."""


def fail(message: str):
    raise OrthancTestError(message)


@dataclass(frozen=True)
class OrthancInstance:
    url: str
    dicom_port: int
    aet: str
    username: str
    password: str
    log_path: Path
    destination_port: int  # DicomModalities["dest"] (AET "DEST") points here; nothing listens unless a test does

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return "(no log)"


def orthanc_binary() -> str:
    for candidate in ORTHANC_CANDIDATES:
        found = shutil.which(candidate)
        if found:
            return found
    fail("Orthanc not found: apt-get install orthanc")


def dcmtk(tool: str) -> str:
    """The path of dcmtk's ``tool`` (storescu, echoscu...). pynetdicom installs Python apps of the same names,
    with other options, into every virtual environment that has it, and an activated venv (this one or another
    one) puts them on PATH first: take the first compiled program of that name, which is dcmtk's."""
    for folder in [*os.environ.get("PATH", "").split(os.pathsep), "/usr/bin"]:
        candidate = Path(folder) / tool
        if candidate.is_file() and os.access(candidate, os.X_OK):
            with candidate.open("rb") as program:
                if program.read(4) == b"\x7fELF":
                    return str(candidate)
    fail(f"dcmtk's {tool} not found: apt-get install dcmtk")


def free_port() -> int:
    with closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def write_config(folder: Path, http_port: int, dicom_port: int, destination_port: int,
                 username: str, password: str, extra: dict | None = None) -> Path:
    storage = folder / "orthanc-storage"
    storage.mkdir(parents=True, exist_ok=True)
    config = {
        "Name": "ctzoo-test",
        "StorageDirectory": str(storage),
        "IndexDirectory": str(storage),
        "HttpPort": http_port,
        "DicomPort": dicom_port,
        "RemoteAccessAllowed": False,
        "AuthenticationEnabled": True,
        "RegisteredUsers": {username: password},
        "DicomAet": "ORTHANC",
        "DicomCheckCalledAet": False,
        "StableAge": 2,
        "Plugins": [],
        "DicomModalities": {"dest": ["DEST", "127.0.0.1", destination_port]},
        "SaveJobs": False,
        "HttpDescribeErrors": True,
    }
    for key, value in (extra or {}).items():  # dictionaries (e.g. DicomModalities) are merged
        config[key] = {**config[key], **value} if isinstance(config.get(key), dict) else value
    path = folder / "orthanc.json"
    path.write_text(json.dumps(config, indent=2))
    return path


class OrthancServer:
    """An Orthanc process with a fresh config/storage under ``tmp_path``, on ports fixed at construction, so a
    test can stop it and start it again as the same PACS (same ports, same storage, same /changes)."""

    def __init__(self, tmp_path: Path, extra_config: dict | None = None) -> None:
        self.binary = orthanc_binary()
        self.folder = Path(tmp_path) / "orthanc"
        self.folder.mkdir(parents=True, exist_ok=True)
        http_port, dicom_port, destination_port = free_port(), free_port(), free_port()
        username, password = "ctzoo", secrets.token_urlsafe(16)
        self.config = write_config(self.folder, http_port, dicom_port, destination_port, username, password,
                                   extra_config)
        self.instance = OrthancInstance(f"http://127.0.0.1:{http_port}", dicom_port, "ORTHANC", username, password,
                                        self.folder / "orthanc.log", destination_port)
        self.process: subprocess.Popen | None = None

    def start(self) -> OrthancInstance:
        """Start Orthanc and wait until ``/system`` answers."""
        with open(self.instance.log_path, "ab") as log:
            self.process = subprocess.Popen([self.binary, str(self.config)], stdout=log, stderr=subprocess.STDOUT,
                                            cwd=self.folder)
        _wait_ready(self.instance, self.process)
        return self.instance

    def stop(self) -> None:
        """Stop Orthanc (SIGTERM, then SIGKILL after 10 s)."""
        if self.process is None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait(timeout=10)
        self.process = None


@contextmanager
def running_orthanc(tmp_path: Path) -> Iterator[OrthancInstance]:
    """Start Orthanc with a fresh config/storage under ``tmp_path``; yield once ``/system`` answers; stop it."""
    server = OrthancServer(tmp_path)
    try:
        yield server.start()
    finally:
        server.stop()


def _wait_ready(instance: OrthancInstance, process: subprocess.Popen) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    last_error = "no answer"
    while time.monotonic() < deadline:
        if process.poll() is not None:
            fail(f"Orthanc exited with code {process.returncode} while starting; log tail:\n"
                        f"{instance.log_tail()}")
        try:
            answer = httpx.get(f"{instance.url}/system", auth=(instance.username, instance.password), timeout=2)
            if answer.status_code == 200:
                return
            last_error = f"HTTP {answer.status_code}"
        except httpx.HTTPError as exc:
            last_error = type(exc).__name__
        time.sleep(0.1)
    fail(f"Orthanc did not answer GET /system within {START_TIMEOUT_S:.0f} s ({last_error}); log tail:\n"
                f"{instance.log_tail()}")


def run_storescu(aet: str, port: int, files: Sequence[Path], calling_aet: str = "CTZOO",
                propose: Sequence[str] = ("-xv",)) -> tuple[int, str]:
    """C-STORE ``files`` to ``aet`` on loopback ``port`` with dcmtk's ``storescu``; (exit code, output).

    ``propose`` picks the transfer syntaxes offered: storescu offers only uncompressed ones by default (and
    cannot decompress JPEG 2000, nor does ``-R`` help), so the JPEG 2000 sample needs ``-xv``; pass ``()``
    for uncompressed files."""
    command = [dcmtk("storescu"), *propose, "-aet", calling_aet, "-aec", aet, "127.0.0.1", str(port),
               *[str(f) for f in files]]
    done = subprocess.run(command, capture_output=True, text=True, timeout=60)
    return done.returncode, (done.stdout + done.stderr).strip()


def storescu(instance: OrthancInstance, files: Sequence[Path], calling_aet: str = "CTZOO",
             propose: Sequence[str] = ("-xv",)) -> None:
    """C-STORE ``files`` to the instance (see :func:`run_storescu`); fails the test unless every store
    succeeds."""
    code, output = run_storescu(instance.aet, instance.dicom_port, files, calling_aet, propose)
    assert code == 0, f"storescu failed (code {code}):\n{output[-3000:]}"
    # storescu exits 0 even when some stores are refused; a refused store logs an error line.
    assert "E: " not in output, f"storescu reported errors:\n{output[-3000:]}"
