"""``ctzoo pacs`` as a hospital runs it: a watcher process against a real Orthanc, killed with SIGKILL mid-job
and restarted, Orthanc stopped mid-job and started again; bad series skipped; status, retry, check; the config's
perf section timing every job's stages into its store."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from click.testing import CliRunner
from orthanc_server import OrthancServer, dcmtk, free_port, storescu
from pacs_kit import storage_scp
from series_variants import variant_series

from ctzoo.cli import main
from ctzoo.pacs.config import load_pacs_config
from ctzoo.pacs.ledger import JobState, Ledger
from ctzoo.perf import ProvenanceStore

pytestmark = pytest.mark.timeout(300)
PASSWORD_ENV = "TEST_ORTHANC_PASSWORD"


def write_pacs_config(tmp_path: Path, orthanc=None, listener: dict | None = None, perf: dict | None = None,
                      **retry) -> Path:
    config = {"state_dir": "state", "backend": "onnx", "device": "cpu", "score_threshold": 0.05,
              "rules": {"min_slices": 5},
              "retry": {"max_attempts": 4, "backoff_s": 0.5, "backoff_factor": 1, "lease_s": 3, **retry}}
    if perf is not None:
        config["perf"] = perf
    if orthanc is not None:
        config["orthanc"] = {"url": orthanc.url, "username": orthanc.username, "password_env": PASSWORD_ENV,
                             "poll_s": 0.3}
    if listener is not None:
        config["listener"] = listener
    path = tmp_path / "pacs.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


class Watcher:
    """``ctzoo pacs watch CONFIG`` as its own process, output to a log file."""

    def __init__(self, config: Path, orthanc, log: Path) -> None:
        env = {**os.environ, PASSWORD_ENV: orthanc.password, "CTZOO_PACS_SALT": "test-salt", "OMP_NUM_THREADS": "1"}
        self.log = log
        with open(log, "ab") as out:
            self.process = subprocess.Popen([sys.executable, "-m", "ctzoo", "pacs", "watch", str(config)],
                                            stdout=out, stderr=subprocess.STDOUT, env=env)

    def output(self) -> str:
        return self.log.read_text(errors="replace")[-4000:]

    def kill(self) -> None:
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=10)

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                return self.process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        return self.process.returncode


def wait_for(condition, timeout: float, what: str, watcher: Watcher | None = None, every: float = 0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(every)
    pytest.fail(f"timed out waiting for {what}" + (f"; watcher output:\n{watcher.output()}" if watcher else ""))


def job_state(ledger_path: Path, series_uid: str):
    if not ledger_path.exists():
        return None
    with Ledger(ledger_path) as ledger:
        job = ledger.job(series_uid)
    return job


def results_in_orthanc(orthanc) -> dict[str, int]:
    answer = httpx.get(f"{orthanc.url}/series", params={"expand": ""}, auth=(orthanc.username, orthanc.password))
    counts: dict[str, int] = {}
    for series in answer.json():
        modality = series["MainDicomTags"].get("Modality")
        counts[modality] = counts.get(modality, 0) + len(series["Instances"])
    return counts


def test_watcher_killed_mid_job_and_restarted_gives_one_result_set(tmp_path, sent_files):
    good = variant_series(sent_files, tmp_path / "send", "good", count=12)
    mr = variant_series(sent_files, tmp_path / "send", "mr", count=5, modality="MR")
    few = variant_series(sent_files, tmp_path / "send", "few", count=3)
    corrupt = variant_series(sent_files, tmp_path / "send", "corrupt", count=6, truncate_pixels_of=2)
    uid = {name: pydicom.dcmread(files[0]).SeriesInstanceUID
           for name, files in {"good": good, "mr": mr, "few": few, "corrupt": corrupt}.items()}
    server = OrthancServer(tmp_path)
    orthanc = server.start()
    try:
        config = write_pacs_config(tmp_path, orthanc, perf={"enabled": True})
        ledger_path = load_pacs_config(config).ledger_path
        storescu(orthanc, mr), storescu(orthanc, few), storescu(orthanc, corrupt, propose=())
        storescu(orthanc, good)
        first = Watcher(config, orthanc, tmp_path / "watch-1.log")
        running = wait_for(lambda: (job := job_state(ledger_path, uid["good"])) and job.state is JobState.RUNNING,
                           120, "the CT series to be RUNNING", first)
        assert running
        first.kill()  # SIGKILL: no cleanup, the job stays RUNNING under a lease that will expire

        second = Watcher(config, orthanc, tmp_path / "watch-2.log")
        done = wait_for(lambda: (job := job_state(ledger_path, uid["good"])) and job.state is JobState.DONE and job,
                        120, "the CT series to be DONE", second)
        wait_for(lambda: job_state(ledger_path, uid["corrupt"]).state is JobState.SKIPPED, 60,
                 "the corrupt series to be SKIPPED", second)
        assert second.stop() == 0, second.output()  # SIGTERM: a clean stop
        assert done.attempts == 2 and len(done.result_uids) == 2
        assert results_in_orthanc(orthanc) == {"CT": 12 + 3 + 6, "MR": 5, "SR": 1, "SEG": 1}
        with Ledger(ledger_path) as ledger:
            reasons = {uid_: (ledger.job(uid_).state, ledger.job(uid_).reason) for uid_ in uid.values()}
        assert reasons[uid["mr"]][0] is JobState.SKIPPED and "modality MR" in reasons[uid["mr"]][1]
        assert reasons[uid["few"]][0] is JobState.SKIPPED and "3 instances" in reasons[uid["few"]][1]
        assert "pixel data" in reasons[uid["corrupt"]][1]

        status = CliRunner().invoke(main, ["pacs", "status", str(config)])
        assert status.exit_code == 0, status.output
        assert "DONE: 1" in status.output and "DONE " in status.output and "modality MR" in status.output
        assert uid["good"] not in status.output  # series by hash in the table
    finally:
        server.stop()
    _assert_perf_store(load_pacs_config(config).perf_store_path)


def _assert_perf_store(path: Path) -> None:
    """The perf section's store, beside the ledger, with the totals of the watcher that finished the good series
    (written at its close): at least that job's 16 events (download, check, upload, job; per model read,
    preprocess, finish, write and two batches of its 12 slices). Its key statistics hold only keys seen twice, and
    the detector skips each key's first event; ``tests/test_pacs_watcher.py`` checks the keys themselves."""
    assert path == path.parent / "perf.sqlite" and (path.parent / "ledger.sqlite").exists()
    totals = ProvenanceStore(path, read_only=True).rows("SELECT * FROM totals")
    assert max(row["seen"] for row in totals) >= 4 + 2 * 6, totals


def test_watcher_waits_for_orthanc_to_come_back(tmp_path, sent_files):
    series = variant_series(sent_files, tmp_path / "send", "short", count=8)
    series_uid = pydicom.dcmread(series[0]).SeriesInstanceUID
    server = OrthancServer(tmp_path)
    orthanc = server.start()
    watcher = None
    try:
        config = write_pacs_config(tmp_path, orthanc)
        ledger_path = load_pacs_config(config).ledger_path
        watcher = Watcher(config, orthanc, tmp_path / "watch.log")
        storescu(orthanc, series)
        wait_for(lambda: (job := job_state(ledger_path, series_uid)) and job.state is JobState.RUNNING,
                 120, "the series to be RUNNING", watcher)
        server.stop()  # Orthanc goes away in the middle of the job
        waiting = wait_for(lambda: (job := job_state(ledger_path, series_uid)) and job.state is JobState.WAITING
                           and job, 120, "the job to wait while Orthanc is down", watcher)
        assert "unreachable" in waiting.reason and waiting.attempts == 0  # an outage uses no attempt
        time.sleep(2)  # down for a while: the watcher keeps polling in vain
        assert watcher.process.poll() is None, watcher.output()
        server.start()
        done = wait_for(lambda: (job := job_state(ledger_path, series_uid)) and job.state is JobState.DONE and job,
                        120, "the job to finish once Orthanc is back", watcher)
        assert done.attempts == 1 and len(done.result_uids) == 2
        assert results_in_orthanc(orthanc) == {"CT": 8, "SR": 1, "SEG": 1}
        assert "retrying" in watcher.output()
    finally:
        if watcher is not None:
            watcher.stop()
        server.stop()


def test_status_retry_and_check(tmp_path, monkeypatch):
    dead_port = free_port()
    config = write_pacs_config(tmp_path, listener={
        "ae_title": "CTZOO", "port": 0, "allowed_calling_aets": ["SCANNER"],
        "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": dead_port}})
    runner = CliRunner()
    assert "no ledger" in runner.invoke(main, ["pacs", "status", str(config)]).output
    settings = load_pacs_config(config)
    # retry without a ledger used to create an empty one and say "0 job(s) queued again", exit 0
    refused = runner.invoke(main, ["pacs", "retry", str(config), "5"])
    assert refused.exit_code == 1 and refused.output == f"Error: no ledger at {settings.ledger_path} yet (nothing " \
        "was received)\n"
    assert not settings.ledger_path.exists()
    settings.state_dir.mkdir(parents=True)
    with Ledger(settings.ledger_path, max_attempts=1) as ledger:
        ledger.enqueue("1.2.3", "dicom:ab")
        job = ledger.claim("w")
        assert ledger.fail(job.id, "w", "model exploded") is JobState.PARKED
    table = runner.invoke(main, ["pacs", "status", str(config), "--state", "PARKED"])
    assert table.exit_code == 0 and "PARKED" in table.output and "model exploded" in table.output
    unknown = runner.invoke(main, ["pacs", "retry", str(config), "1", "5", "7"])
    assert unknown.exit_code == 1 and unknown.output.startswith("Error: no job 5, 7 in ")
    retried = runner.invoke(main, ["pacs", "retry", str(config), "--parked"])
    assert retried.exit_code == 0 and "1 job(s) queued again" in retried.output
    # a listener job whose instances are gone from the spool waits for them: retry says so
    assert "[1]: the received instances are no longer in the spool" in retried.output
    (line,) = runner.invoke(main, ["pacs", "status", str(config), "--json"]).output.strip().splitlines()
    assert '"state": "PENDING"' in line and '"attempts": 0' in line and '"series_uid": "1.2.3"' in line
    # a job queued already cannot be queued again: said, and exit 1 (it used to exit 0 whatever was requeued)
    pending = runner.invoke(main, ["pacs", "retry", str(config), "1"])
    assert pending.exit_code == 1 and pending.output.startswith("0 job(s) queued again; not requeued (PENDING or "
                                                                "RUNNING already): [1]\n"), pending.output
    # a DONE job is queued again, as the help says (it used to be refused, with exit 0)
    with Ledger(settings.ledger_path) as ledger:
        job = ledger.claim("w")
        ledger.complete(job.id, "w", ["2.25.1"], instances=5)
    done = runner.invoke(main, ["pacs", "retry", str(config), "1"])
    assert done.exit_code == 0 and done.output.startswith("1 job(s) queued again\n"), done.output
    # the destination AE does not answer: check says so and exits 1
    checked = runner.invoke(main, ["pacs", "check", str(config)])
    assert checked.exit_code == 1 and f"PACS@127.0.0.1:{dead_port}: C-ECHO FAILED (association failed: nothing " \
        "listens there, or it dropped the connection)" in checked.output, checked.output
    # it answers, and rejects the AE title called: check names that one (it used to blame our own AE title)
    server = storage_scp(dead_port, [], require_called_aet=True)
    try:
        checked = runner.invoke(main, ["pacs", "check", str(config)])
    finally:
        server.shutdown()
    assert checked.exit_code == 1 and checked.output == f"destination PACS@127.0.0.1:{dead_port}: C-ECHO FAILED " \
        "(association rejected for good: called AE title PACS not recognised)\n", checked.output


def test_config_errors_are_clear(tmp_path, monkeypatch):
    monkeypatch.delenv("CTZOO_PACS_SALT", raising=False)
    from ctzoo.config import ConfigError

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump({"state_dir": "s", "listener": {
        "allowed_calling_aets": [], "destination": {"ae_title": "A" * 17}}}))
    with pytest.raises(ConfigError) as error:
        load_pacs_config(path)
    assert "listener.allowed_calling_aets" in str(error.value) and "listener.destination.ae_title" in str(error.value)

    class FakeOrthanc:
        url, username, password = "http://127.0.0.1:9", "ctzoo", "x"

    monkeypatch.delenv(PASSWORD_ENV, raising=False)
    config = write_pacs_config(tmp_path, FakeOrthanc())
    result = CliRunner().invoke(main, ["pacs", "watch", str(config)])
    assert result.exit_code != 0 and f"${PASSWORD_ENV} is empty" in result.output
    assert (load_pacs_config(config).salt() == load_pacs_config(config).salt()
            and oct((load_pacs_config(config).state_dir / "salt").stat().st_mode)[-3:] == "600")


def test_credential_mistakes_are_named_and_no_password_is_echoed(tmp_path, monkeypatch, caplog):
    """A password file without a user was dropped unsaid (Orthanc answered 401); a password in the file met "Extra
    inputs are not permitted"."""
    (tmp_path / "pw").write_text("s3cret")
    path = tmp_path / "pacs.yaml"
    for orthanc, said in (({"password_file": "pw"}, "orthanc.password_file is set but orthanc.username is not"),
                          ({"username": "ctzoo", "password": "s3cret"}, "orthanc.password: passwords never go in this "
                           "file: use $CTZOO_ORTHANC_PASSWORD (orthanc.password_env) or orthanc.password_file")):
        path.write_text(yaml.safe_dump({"orthanc": orthanc}))
        result = CliRunner().invoke(main, ["pacs", "check", str(path)])
        assert result.exit_code == 1 and said in result.output and "s3cret" not in result.output, result.output
    monkeypatch.setenv("CTZOO_ORTHANC_PASSWORD", "s3cret")
    path.write_text(yaml.safe_dump({"orthanc": {}}))
    assert load_pacs_config(path).orthanc_password() is None
    assert "$CTZOO_ORTHANC_PASSWORD is set but orthanc.username is not: no credentials are sent to Orthanc" in \
        caplog.text and "s3cret" not in caplog.text


def test_listen_refuses_to_start_on_a_spool_it_cannot_write(tmp_path):
    config = write_pacs_config(tmp_path, listener={
        "ae_title": "CTZOO", "port": 0, "allowed_calling_aets": ["SCANNER"],
        "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}})
    spool = load_pacs_config(config).state_dir / "spool"
    spool.parent.mkdir(mode=0o700)
    spool.symlink_to("/sys/kernel")  # a folder no process may create a file in, root included (sysfs)
    result = CliRunner().invoke(main, ["pacs", "listen", str(config)])
    assert result.exit_code == 1 and result.output.endswith(f"Error: cannot write the spool {spool}: Permission "
                                                            "denied; not listening\n"), result.output


def test_listen_command_answers_echo_from_allowed_callers_only(tmp_path):
    port = free_port()
    config = write_pacs_config(tmp_path, listener={
        "ae_title": "CTZOO", "port": port, "allowed_calling_aets": ["SCANNER"],
        "destination": {"ae_title": "PACS", "host": "127.0.0.1", "port": free_port()}})
    log = tmp_path / "listen.log"
    with open(log, "wb") as out:
        process = subprocess.Popen([sys.executable, "-m", "ctzoo", "pacs", "listen", str(config)], stdout=out,
                                   stderr=subprocess.STDOUT, env={**os.environ, "OMP_NUM_THREADS": "1"})
    try:
        wait_for(lambda: "DICOM listener CTZOO on 127.0.0.1" in log.read_text(), 120, "the listener to start",
                 every=0.2)

        def echo(caller: str) -> int:
            return subprocess.run([dcmtk("echoscu"), "-aet", caller, "-aec", "CTZOO", "127.0.0.1", str(port)],
                                  capture_output=True, timeout=30).returncode

        assert echo("SCANNER") == 0 and echo("INTRUDER") != 0
        process.send_signal(signal.SIGTERM)
        assert process.wait(timeout=30) == 0, log.read_text()
    finally:
        if process.poll() is None:
            process.kill()
