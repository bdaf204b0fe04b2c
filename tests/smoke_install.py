"""What a plain install must do: ctzoo as the README's main-job command installs it (``'.[cpu]'``, no test tools).

The test suite runs with the ``[test]`` extra, which brings packages (httpx once) that a user's install lacks, so
a command can pass every test and still crash for users. CI (``.ci/run``) runs this script with the main job's
own Python, after the tests, so Orthanc and dcmtk are installed::

    .venv/bin/python tests/smoke_install.py

It imports every ``ctzoo`` module, asks every command for ``--help``, runs the quick path of the commands that need
no training data through the installed ``ctzoo`` program (data sample, info, convert, zoo, infer with a bad model
name, pacs status, expand, export and serve), and ``ctzoo pacs check`` against an unreachable Orthanc (a clear
message, exit 1, no traceback) and against a real one started on loopback (exit 0). Only the standard library,
ctzoo's own dependencies and ``tests/orthanc_server.py`` are used. It ends with the plain ``N passed, N failed`` line.
"""

from __future__ import annotations

import importlib
import os
import pkgutil
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path

import httpx
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(HERE))
CTZOO = Path(sys.executable).with_name("ctzoo")  # the console script of this environment
TOKEN = "smoke-install-token-0123456789"


def ctzoo(*args: str, expect: int = 0, timeout: float = 300, env: dict | None = None, cwd: Path | None = None) -> str:
    """Run the installed ``ctzoo`` program; its stdout+stderr, after checking the exit code and that no
    traceback was printed (every failure a user can cause must be a message)."""
    done = subprocess.run([str(CTZOO), *args], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **(env or {})}, cwd=cwd)
    output = done.stdout + done.stderr
    assert "Traceback" not in output, f"ctzoo {' '.join(args)} printed a traceback:\n{output[-3000:]}"
    assert done.returncode == expect, (f"ctzoo {' '.join(args)} exited {done.returncode}, not {expect}:\n"
                                       f"{output[-3000:]}")
    return output


def check_every_module_imports() -> None:
    import ctzoo

    failed = []
    for module in pkgutil.walk_packages(ctzoo.__path__, "ctzoo."):
        if module.name.endswith("__main__"):  # importing it runs the command line
            continue
        try:
            importlib.import_module(module.name)
        except Exception as exc:  # noqa: BLE001 - each broken module is reported
            failed.append(f"{module.name}: {type(exc).__name__}: {exc}")
    assert not failed, "modules that do not import in a plain install:\n" + "\n".join(failed)


def check_every_command_has_help() -> None:
    """The installed program answers --help, and every command's help renders in this install (its module imported,
    as ``ctzoo CMD --help`` would: in this process, since a process per command costs a second of start-up each,
    and with click's own rendering, which unlike its test runner leaves this thread's stdout alone)."""
    import click

    from ctzoo.cli import command_paths, main

    assert "Usage:" in ctzoo("--help")
    names = list(command_paths(main))
    assert len(names) > 15, names
    for name in names:
        context = click.Context(main, info_name="ctzoo")
        command = main
        for word in name:
            context = click.Context(command.get_command(context, word), parent=context, info_name=word)
            command = context.command
        assert "Usage:" in command.get_help(context), name


def check_sample_info_convert(work: Path) -> None:
    assert "wrote" in ctzoo("data", "sample", str(work / "ct.nii.gz"))
    assert "512 x 512 x 20" in ctzoo("info", str(work / "ct.nii.gz"))
    ctzoo("data", "sample", str(work / "ct.zip"))
    assert "dicom-zip" in ctzoo("info", str(work / "ct.zip"))
    ctzoo("convert", str(work / "ct.zip"), str(work / "ct.mha"))
    assert "embedded" in ctzoo("data", "list")
    assert "recistnet-mini" in ctzoo("zoo", "list")


def check_bad_model_name(work: Path) -> None:
    output = ctzoo("infer", "--model", "nosuch", "--out", str(work / "out"), expect=1)
    assert "nosuch" in output and "recistnet-mini" in output, output


def pacs_config(work: Path, name: str, orthanc: dict, destination_port: int | None = None) -> Path:
    """configs/pacs.yaml as shipped, pointed at ``orthanc`` (and the listener's destination), state under work."""
    config = yaml.safe_load((ROOT / "configs" / "pacs.yaml").read_text())
    config["state_dir"] = str(work / f"state-{name}")
    config["orthanc"].update(orthanc)
    if destination_port is None:
        config.pop("listener")
    else:
        config["listener"]["destination"] = {"ae_title": "ORTHANC", "host": "127.0.0.1", "port": destination_port}
    path = work / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def check_pacs_check_unreachable(work: Path) -> None:
    from orthanc_server import free_port

    config = pacs_config(work, "down", {"url": f"http://127.0.0.1:{free_port()}", "timeout_s": 5})
    started = time.monotonic()
    output = ctzoo("pacs", "check", str(config), expect=1, env={"CTZOO_ORTHANC_PASSWORD": "not-used"})
    assert "orthanc: FAILED" in output and "unreachable" in output, output
    assert time.monotonic() - started < 60


def check_pacs_check_real_orthanc(work: Path) -> None:
    from orthanc_server import OrthancServer

    server = OrthancServer(work / "orthanc")
    orthanc = server.start()
    try:
        config = pacs_config(work, "up", {"url": orthanc.url, "username": orthanc.username},
                             destination_port=orthanc.dicom_port)
        output = ctzoo("pacs", "check", str(config), env={"CTZOO_ORTHANC_PASSWORD": orthanc.password})
        assert "orthanc: ok" in output and "C-ECHO ok" in output, output
        refused = ctzoo("pacs", "check", str(config), expect=1, env={"CTZOO_ORTHANC_PASSWORD": "wrong"})
        assert "401" in refused, refused
    finally:
        server.stop()


def check_expand(work: Path) -> None:
    output = ctzoo("expand", "recistnet-mini", "--width-mult", "1.25", "--out", str(work / "grown"), timeout=600)
    assert (work / "grown" / "expanded.pt").is_file(), output


def check_pacs_status_before_anything_arrived(work: Path) -> None:
    config = pacs_config(work, "empty", {"url": "http://127.0.0.1:9"})
    assert "no ledger" in ctzoo("pacs", "status", str(config), expect=1)


def check_export_and_serve(work: Path) -> None:
    from orthanc_server import free_port

    ctzoo("data", "sample", str(work / "ct.nii.gz"))
    ctzoo("export", "recistnet-mini", "--out", str(work / "models"), timeout=600)
    port = free_port()
    log = open(work / "serve.log", "w+")
    server = subprocess.Popen([str(CTZOO), "serve", "--repository", str(work / "models"), "--port", str(port),
                               "--threads", "1", "--state-dir", str(work / "serve-state")], stdout=log,
                              stderr=subprocess.STDOUT,
                              env={**os.environ, "CTZOO_SERVE_TOKENS": TOKEN})
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, f"ctzoo serve exited:\n{(work / 'serve.log').read_text()[-3000:]}"
            try:
                if httpx.get(f"{url}/v2/health/ready", timeout=2).status_code == 200:  # open: no token
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "ctzoo serve did not become ready"
            time.sleep(0.5)
        assert httpx.get(f"{url}/v2", timeout=10).status_code == 401
        answer = httpx.post(f"{url}/studies/recistnet-mini", content=(work / "ct.nii.gz").read_bytes(),
                            headers={"Authorization": f"Bearer {TOKEN}"}, timeout=300)
        assert answer.status_code == 200 and "lesions" in answer.json(), answer.text[:500]
    finally:
        server.terminate()
        server.wait(timeout=30)
        log.close()


#: Longest first: they run side by side, as many at a time as there are cores (each is mostly a ctzoo process of
#: its own, seconds of Python start-up), each in its own folder.
CHECKS: list[Callable] = [
    check_export_and_serve,
    check_every_command_has_help,
    check_sample_info_convert,
    check_expand,
    check_pacs_status_before_anything_arrived,
    check_every_module_imports,
    check_bad_model_name,
    check_pacs_check_real_orthanc,
    check_pacs_check_unreachable,
]


def run_check(check: Callable, folder: Path) -> tuple[bool, str]:
    """Run one check in its own folder under ``folder``: (passed, the line to print)."""
    started = time.monotonic()
    work = folder / check.__name__
    work.mkdir()
    try:
        check(work) if check.__code__.co_argcount else check()
    except Exception:  # noqa: BLE001 - every check runs; each failure is printed
        return False, f"FAILED {check.__name__} ({time.monotonic() - started:.1f} s)\n{traceback.format_exc()}"
    return True, f"ok     {check.__name__} ({time.monotonic() - started:.1f} s)"


def main() -> int:
    from concurrent.futures import ThreadPoolExecutor, as_completed

    passed = failed = 0
    with tempfile.TemporaryDirectory(prefix="ctzoo-smoke-") as folder, \
            ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        for done in as_completed([pool.submit(run_check, check, Path(folder)) for check in CHECKS]):
            ok, line = done.result()
            passed, failed = passed + ok, failed + (not ok)
            print(line, flush=True)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
