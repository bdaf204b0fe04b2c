"""The PACS bridge's job ledger: idempotent enqueue, leases, backoff, crash recovery, privacy."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ctzoo.io.privacy import patient_hash
from ctzoo.pacs.ledger import JobState, LeaseLost, Ledger

ROOT = Path(__file__).resolve().parents[1]


class FakeClock:
    def __init__(self, t: float = 1000.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(tmp_path, clock):
    with Ledger(tmp_path / "ledger.db", clock=clock) as led:
        yield led


def test_enqueue_is_idempotent(ledger, clock):
    assert ledger.enqueue("1.2.3", "orthanc:abc")
    clock.t += 5
    assert not ledger.enqueue("1.2.3", "listener")
    (job,) = ledger.jobs()
    assert (job.series_uid, job.source, job.state, job.attempts) == ("1.2.3", "orthanc:abc", JobState.PENDING, 0)
    assert job.created_at == 1000.0
    assert ledger.summary()["PENDING"] == 1


def test_claim_oldest_first_and_never_twice(ledger, clock):
    for i in range(3):
        ledger.enqueue(f"1.2.{i}", "listener")
        clock.t += 1
    a, b, c = ledger.claim("w1"), ledger.claim("w2"), ledger.claim("w1")
    assert [j.series_uid for j in (a, b, c)] == ["1.2.0", "1.2.1", "1.2.2"]
    assert ledger.claim("w3") is None
    assert a.state is JobState.RUNNING and a.worker == "w1" and a.attempts == 1
    assert a.lease_until == clock.t + 600.0


def test_complete(ledger):
    ledger.enqueue("1.2.3", "listener")
    job = ledger.claim("w1")
    ledger.heartbeat(job.id, "w1")
    ledger.complete(job.id, "w1", ["2.25.1", "2.25.2"])
    (done,) = ledger.jobs(JobState.DONE)
    assert done.result_uids == ["2.25.1", "2.25.2"] and done.attempts == 1
    assert ledger.claim("w2") is None
    with pytest.raises(LeaseLost):
        ledger.complete(job.id, "w1", [])


def test_fail_backoff_then_parked(ledger, clock):
    ledger.enqueue("1.2.3", "listener")
    delays = []
    for attempt in range(1, 5):
        job = ledger.claim("w1")
        assert job.attempts == attempt
        assert ledger.fail(job.id, "w1", f"boom {attempt}") is JobState.FAILED
        (failed,) = ledger.jobs(JobState.FAILED)
        delays.append(failed.next_attempt_at - clock.t)
        clock.t = failed.next_attempt_at - 0.001
        assert ledger.claim("w1") is None  # not due yet
        clock.t += 0.001
    assert delays == [30.0, 60.0, 120.0, 240.0]
    job = ledger.claim("w1")
    assert job.attempts == 5
    assert ledger.fail(job.id, "w1", "out of memory") is JobState.PARKED
    (parked,) = ledger.jobs(JobState.PARKED)
    assert parked.reason == "out of memory"
    clock.t += 1e6
    assert ledger.claim("w1") is None
    assert ledger.summary() == {"PENDING": 0, "RUNNING": 0, "DONE": 0, "FAILED": 0, "PARKED": 1, "SKIPPED": 0,
                                "WAITING": 0}


def test_waiting_uses_no_attempt_backs_off_to_a_cap_and_is_woken(tmp_path, clock):
    """A job held up by the far end or the disk waits: however often, it is never PARKED for it; its wait grows
    with the waits in a row up to max_wait_s, and wake() makes it due at once."""
    with Ledger(tmp_path / "ledger.db", clock=clock, max_attempts=2, max_wait_s=100) as ledger:
        ledger.enqueue("1.2.3", "listener")
        delays = []
        for waits in range(6):
            job = ledger.claim("w1")
            assert job.attempts == 1
            delays.append(ledger.wait(job.id, "w1", "destination down", waits))
            (waiting,) = ledger.jobs(JobState.WAITING)
            assert waiting.attempts == 0 and waiting.reason == "destination down"
            assert waiting.next_attempt_at == clock.t + delays[-1] and ledger.claim("w1") is None
            clock.t += delays[-1]
        assert delays == [30.0, 60.0, 100.0, 100.0, 100.0, 100.0]
        job = ledger.claim("w1")
        ledger.wait(job.id, "w1", "destination down", 9)
        assert ledger.claim("w1") is None and ledger.wake() == 1
        job = ledger.claim("w1")
        ledger.complete(job.id, "w1", ["2.25.1"])
        (done,) = ledger.jobs(JobState.DONE)
        assert done.attempts == 1 and ledger.wake() == 0


def test_expired_lease_is_reclaimed_unexpired_is_not(ledger, clock):
    ledger.enqueue("1.2.3", "listener")
    job = ledger.claim("dead")
    clock.t += 599
    assert ledger.claim("w2") is None
    ledger.heartbeat(job.id, "dead")  # lease now until t + 600
    clock.t += 599
    assert ledger.claim("w2") is None
    clock.t += 1
    again = ledger.claim("w2")
    assert again.id == job.id and again.worker == "w2" and again.attempts == 2
    with pytest.raises(LeaseLost):
        ledger.heartbeat(job.id, "dead")
    with pytest.raises(LeaseLost):
        ledger.fail(job.id, "dead", "late")
    ledger.complete(job.id, "w2", ["2.25.9"])
    assert ledger.summary()["DONE"] == 1


def test_heartbeat_wrong_worker_raises(ledger):
    ledger.enqueue("1.2.3", "listener")
    job = ledger.claim("w1")
    with pytest.raises(LeaseLost):
        ledger.heartbeat(job.id, "w2")
    with pytest.raises(KeyError):
        ledger.heartbeat(999, "w1")


def test_skip_records_reason_and_is_never_claimed(ledger, clock):
    ledger.skip("1.2.3", "orthanc:x", "modality MR, not CT")
    ledger.enqueue("1.2.4", "listener")
    ledger.skip("1.2.4", "listener", "only 3 slices")
    assert not ledger.enqueue("1.2.3", "listener")
    clock.t += 1e6
    assert ledger.claim("w1") is None
    reasons = {j.series_uid: j.reason for j in ledger.jobs(JobState.SKIPPED)}
    assert reasons == {"1.2.3": "modality MR, not CT", "1.2.4": "only 3 slices"}


def test_a_done_job_runs_again_once_when_its_series_grows(ledger):
    ledger.enqueue("1.2.3", "orthanc:a")
    job = ledger.claim("w1")
    ledger.complete(job.id, "w1", ["2.25.1"], instances=8)
    assert not ledger.rerun("1.2.3", 8, "no more") and not ledger.rerun("1.2.9", 20, "unknown")
    assert ledger.rerun("1.2.3", 20, "grew") and not ledger.rerun("1.2.3", 20, "grew")  # once: it is PENDING now
    (again,) = ledger.jobs(JobState.PENDING)
    # what the earlier run made stays until this one completes: its results are told from those by them
    assert (again.reason, again.attempts, again.result_uids, again.instances) == ("grew", 0, ["2.25.1"], 8)
    job = ledger.claim("w1")
    ledger.complete(job.id, "w1", ["2.25.9"], instances=20)
    assert (ledger.jobs()[0].result_uids, ledger.jobs()[0].instances) == (["2.25.9"], 20)


def test_a_ledger_from_before_the_instance_count_gains_it_and_its_done_jobs_are_not_run_again(tmp_path):
    path = tmp_path / "old.sqlite"
    with sqlite3.connect(path) as db:  # the schema before the count
        db.execute("CREATE TABLE jobs (id INTEGER PRIMARY KEY AUTOINCREMENT, series_uid TEXT NOT NULL UNIQUE, source "
                   "TEXT NOT NULL, state TEXT NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, reason TEXT NOT NULL "
                   "DEFAULT '', next_attempt_at REAL NOT NULL DEFAULT 0, lease_until REAL NOT NULL DEFAULT 0, worker "
                   "TEXT NOT NULL DEFAULT '', result_uids TEXT NOT NULL DEFAULT '[]', created_at REAL NOT NULL, "
                   "updated_at REAL NOT NULL, patient_hash TEXT NOT NULL DEFAULT '')")
        db.execute("INSERT INTO jobs (series_uid, source, state, created_at, updated_at) VALUES "
                   "('1.2.3', 'orthanc:a', 'DONE', 1, 1)")
    with Ledger(path) as ledger:
        (job,) = ledger.jobs()
        assert (job.state, job.instances) == (JobState.DONE, 0)
        assert not ledger.rerun("1.2.3", 20, "grew")  # what it was made from is not known
    with Ledger(path) as ledger:  # opened again: nothing more to add
        assert ledger.jobs()[0].instances == 0


def test_requeue_takes_any_job_but_a_pending_or_running_one(ledger):
    for uid in ("1.2.1", "1.2.2", "1.2.3"):
        ledger.enqueue(uid, "orthanc:a")
    done, running = ledger.claim("w1"), ledger.claim("w1")
    ledger.complete(done.id, "w1", ["2.25.1"], instances=8)
    assert ledger.requeue(done.id) and not ledger.requeue(running.id) and not ledger.requeue(3)
    assert ledger.jobs()[0].state is JobState.PENDING and ledger.jobs()[0].result_uids == ["2.25.1"]


def _python(code: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    return subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True, env=env)


def test_sigkilled_worker_job_is_reclaimed_once(tmp_path):
    db = tmp_path / "ledger.db"
    with Ledger(db, lease_s=0.5) as led:
        led.enqueue("1.2.3", "listener")
        proc = _python(
            "import sys, time\nfrom ctzoo.pacs.ledger import Ledger\n"
            f"job = Ledger({str(db)!r}, lease_s=0.5).claim('doomed')\n"
            "print(job.id, flush=True)\ntime.sleep(60)\n")
        job_id = int(proc.stdout.readline())
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait(timeout=10)
        proc.stdout.close()
        assert proc.returncode == -signal.SIGKILL
        (running,) = led.jobs(JobState.RUNNING)
        assert running.worker == "doomed"
        if time.time() < running.lease_until - 0.05:
            assert led.claim("survivor") is None  # lease still live
        time.sleep(max(0.0, running.lease_until - time.time()) + 0.05)
        job = led.claim("survivor")
        assert job.id == job_id and job.attempts == 2
        led.complete(job.id, "survivor", ["2.25.1"])
        assert led.claim("survivor") is None
        assert led.summary()["DONE"] == 1 and len(led.jobs()) == 1


def test_four_processes_claim_each_job_exactly_once(tmp_path):
    db = tmp_path / "ledger.db"
    with Ledger(db) as led:
        for i in range(20):
            led.enqueue(f"1.2.{i}", "listener")
    code = ("import sys\nfrom ctzoo.pacs.ledger import Ledger\n"
            f"led = Ledger({str(db)!r})\nw = sys.argv[1]\n"
            "while (job := led.claim(w)) is not None:\n"
            "    print(job.id, flush=True)\n    led.complete(job.id, w, [])\n")
    env = dict(os.environ, PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, "-c", code, f"w{k}"], stdout=subprocess.PIPE, text=True, env=env)
             for k in range(4)]
    claimed = []
    for p in procs:
        out, _ = p.communicate(timeout=60)
        assert p.returncode == 0
        claimed += [int(x) for x in out.split()]
    assert sorted(claimed) == list(range(1, 21))
    with Ledger(db) as led:
        assert led.summary()["DONE"] == 20
        assert all(j.attempts == 1 for j in led.jobs())


def test_no_patient_id_in_clear(tmp_path):
    db = tmp_path / "ledger.db"
    pid = "PAT-0042-DOE^JANE"
    h = patient_hash(pid, salt="site-secret")
    assert h == patient_hash(pid, salt="site-secret") != patient_hash(pid, salt="other")
    with Ledger(db) as led:
        with pytest.raises(ValueError):
            led.enqueue("1.2.3", "listener", patient_hash=pid)
        assert led.enqueue("1.2.3", "listener", patient_hash=h)
        assert led.jobs()[0].patient_hash == h
    raw = b"".join(p.read_bytes() for p in tmp_path.iterdir() if p.name.startswith("ledger.db"))
    assert b"1.2.3" in raw
    assert pid.encode() not in raw and b"PAT-0042" not in raw
