"""Job ledger of the PACS bridge (``ctzoo pacs``): every CT series processed exactly once across crashes.

The bridge finds new CT series (an Orthanc watcher polling ``/changes``, or a C-STORE listener), runs
zoo models on them and sends DICOM SEG/SR back. This module is its durable memory: one SQLite file
(WAL mode, standard library only), one row per series, every state change in one ``BEGIN IMMEDIATE``
transaction, so several processes may share the file.

States: ``PENDING`` -> ``RUNNING`` (claimed, with a lease) -> ``DONE``; a failure makes the job
``FAILED`` with a backoff (``backoff_s * backoff_factor ** (attempts - 1)``) after which it is claimed
again, until ``max_attempts`` makes it ``PARKED`` with its reason kept. ``WAITING`` is a job held up by what
is not its own fault (the far end down, a full disk): :meth:`Ledger.wait` gives the attempt back and makes it due
after ``backoff_s * backoff_factor ** waits``, at most ``max_wait_s``, however long that lasts; :meth:`Ledger.wake`
makes every waiting job due at once (the far end answered again). ``SKIPPED`` records a series that must not be
processed (non-CT, too few slices, ...) with the reason; it is never claimed.

A DONE job keeps how many instances its series had when its results were made (``instances``). When the series
later has more (Orthanc announced it stable after part of it, then the rest arrived), :meth:`Ledger.rerun` makes the
job PENDING again, once per growth, keeping the earlier result UIDs and count until the new run completes: the new
results are told from the earlier ones by them (:mod:`ctzoo.pacs.core`).

Exactly once, and what the ledger guarantees
--------------------------------------------
* **No job is lost**: a series is recorded (``enqueue``) before anything is done with it, and a job
  leaves ``RUNNING`` only through ``complete``/``fail``/``wait`` or by its lease expiring.
* **No two live workers hold the same job**: ``claim`` takes a lease (``lease_s``, extended by
  ``heartbeat``) in one write transaction; only a ``RUNNING`` job whose lease has expired, i.e. whose
  worker died (SIGKILL, power loss) or hung, can be claimed again. ``heartbeat``/``complete``/``fail``
  by a worker that no longer holds the job raise :class:`LeaseLost`, so a worker that was presumed dead
  learns it and stops.
* **Re-sending is harmless**: a job's results carry UIDs derived deterministically from the source
  series, the model version and the findings (:func:`ctzoo.io.dicom_uids.result_uids`). A job re-run after a
  crash between "sent" and "complete" finds the same and re-sends identical objects (same SOP Instance UIDs),
  which the PACS stores once. So delivery is at least once and the effect is exactly once.

Privacy: the ledger stores SeriesInstanceUIDs (needed to fetch the series; UIDs are not patient
identifiers). A patient id is only ever stored as a salted SHA-256 (:func:`ctzoo.io.privacy.patient_hash`, salt from
the caller); ``enqueue`` refuses anything that is not such a hash.
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path

__all__ = ["Job", "JobState", "Ledger", "LeaseLost"]

_HASH_RE = re.compile(r"^[0-9a-f]{64}$")


class JobState(str, Enum):
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    DONE = "DONE"
    FAILED = "FAILED"  # will be retried after next_attempt_at
    WAITING = "WAITING"  # held up by the far end or the disk, not by itself: retried after next_attempt_at, no
    #                      attempt used
    PARKED = "PARKED"  # gave up after max_attempts
    SKIPPED = "SKIPPED"  # not processable, with the reason


class LeaseLost(RuntimeError):
    """The job is no longer held by this worker (its lease expired and another worker took it, or it ended)."""


@dataclass
class Job:
    id: int
    series_uid: str
    source: str
    state: JobState
    attempts: int
    reason: str
    next_attempt_at: float
    lease_until: float
    worker: str
    result_uids: list[str] = field(default_factory=list)
    created_at: float = 0.0
    updated_at: float = 0.0
    patient_hash: str = ""
    instances: int = 0  # of the series when its results were made (set by complete; 0: not known)


_SCHEMA = """
CREATE TABLE IF NOT EXISTS jobs (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    series_uid TEXT NOT NULL UNIQUE,
    source TEXT NOT NULL,
    state TEXT NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    reason TEXT NOT NULL DEFAULT '',
    next_attempt_at REAL NOT NULL DEFAULT 0,
    lease_until REAL NOT NULL DEFAULT 0,
    worker TEXT NOT NULL DEFAULT '',
    result_uids TEXT NOT NULL DEFAULT '[]',
    created_at REAL NOT NULL,
    updated_at REAL NOT NULL,
    patient_hash TEXT NOT NULL DEFAULT '',
    instances INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS jobs_state ON jobs(state, created_at);
"""

_COLUMNS = ("id, series_uid, source, state, attempts, reason, next_attempt_at, lease_until, worker, "
            "result_uids, created_at, updated_at, patient_hash, instances")
#: Columns added after the first release, with their definitions: a ledger made before them gets them at open.
_ADDED_COLUMNS = {"instances": "INTEGER NOT NULL DEFAULT 0"}


def _job(row: tuple) -> Job:
    (id_, uid, source, state, attempts, reason, nxt, lease, worker, results, created, updated, phash, count) = row
    return Job(id_, uid, source, JobState(state), attempts, reason, nxt, lease, worker,
               json.loads(results), created, updated, phash, count)


class Ledger:
    """The job ledger on one SQLite file; one instance per process (thread-safe within it)."""

    def __init__(self, path: str | Path, max_attempts: int = 5, backoff_s: float = 30.0,
                 backoff_factor: float = 2.0, lease_s: float = 600.0,
                 clock: Callable[[], float] = time.time, max_wait_s: float = 300.0) -> None:
        if max_attempts < 1 or lease_s <= 0 or backoff_s < 0 or backoff_factor < 1 or max_wait_s < 0:
            raise ValueError("need max_attempts >= 1, lease_s > 0, backoff_s >= 0, backoff_factor >= 1, "
                             "max_wait_s >= 0")
        self.path = Path(path)
        self.max_attempts, self.backoff_s, self.backoff_factor = max_attempts, backoff_s, backoff_factor
        self.max_wait_s = max_wait_s
        self.lease_s, self.clock = lease_s, clock
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.path), timeout=30.0, isolation_level=None, check_same_thread=False)
        self._db.execute("PRAGMA busy_timeout = 30000")
        self._db.execute("PRAGMA journal_mode = WAL")
        self._db.execute("PRAGMA synchronous = FULL")
        with self._tx() as db:
            for stmt in _SCHEMA.split(";"):
                if stmt.strip():
                    db.execute(stmt)
            present = {row[1] for row in db.execute("PRAGMA table_info(jobs)")}
            for column, definition in _ADDED_COLUMNS.items():
                if column not in present:
                    db.execute(f"ALTER TABLE jobs ADD COLUMN {column} {definition}")

    # -- plumbing -----------------------------------------------------------------------------
    class _Tx:
        def __init__(self, ledger: Ledger) -> None:
            self.ledger = ledger

        def __enter__(self) -> sqlite3.Connection:
            self.ledger._lock.acquire()
            try:
                self.ledger._db.execute("BEGIN IMMEDIATE")
            except BaseException:
                self.ledger._lock.release()
                raise
            return self.ledger._db

        def __exit__(self, exc_type, exc, tb) -> None:
            try:
                self.ledger._db.execute("COMMIT" if exc_type is None else "ROLLBACK")
            finally:
                self.ledger._lock.release()

    def _tx(self) -> Ledger._Tx:
        return Ledger._Tx(self)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _held(self, db: sqlite3.Connection, job_id: int, worker: str) -> int:
        row = db.execute("SELECT state, worker, attempts FROM jobs WHERE id = ?", (job_id,)).fetchone()
        if row is None:
            raise KeyError(f"no job {job_id}")
        if row[0] != JobState.RUNNING.value or row[1] != worker:
            raise LeaseLost(f"job {job_id} is {row[0]} held by {row[1]!r}, not by {worker!r}")
        return row[2]

    # -- API ----------------------------------------------------------------------------------
    def enqueue(self, series_uid: str, source: str, patient_hash: str = "") -> bool:
        """Record a new series as PENDING; False if the series is already known (in any state)."""
        if not series_uid:
            raise ValueError("empty series_uid")
        if patient_hash and not _HASH_RE.match(patient_hash):
            raise ValueError("patient_hash must be a salted SHA-256 hex digest (see patient_hash()), never a clear id")
        now = self.clock()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO jobs (series_uid, source, state, next_attempt_at, created_at, updated_at,"
                " patient_hash) VALUES (?, ?, ?, ?, ?, ?, ?)",
                (series_uid, source, JobState.PENDING.value, now, now, now, patient_hash))
            return cur.rowcount == 1

    def claim(self, worker: str) -> Job | None:
        """Atomically take the oldest due job (PENDING, FAILED or WAITING past its time, RUNNING past its lease)."""
        if not worker:
            raise ValueError("empty worker name")
        now = self.clock()
        with self._tx() as db:
            row = db.execute(
                "SELECT id FROM jobs WHERE state = ? OR (state IN (?, ?) AND next_attempt_at <= ?)"
                " OR (state = ? AND lease_until <= ?) ORDER BY created_at, id LIMIT 1",
                (JobState.PENDING.value, JobState.FAILED.value, JobState.WAITING.value, now, JobState.RUNNING.value,
                 now)).fetchone()
            if row is None:
                return None
            db.execute("UPDATE jobs SET state = ?, worker = ?, lease_until = ?, attempts = attempts + 1,"
                       " updated_at = ? WHERE id = ?",
                       (JobState.RUNNING.value, worker, now + self.lease_s, now, row[0]))
            return _job(db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE id = ?", (row[0],)).fetchone())

    def heartbeat(self, job_id: int, worker: str) -> None:
        """Extend the lease; raises LeaseLost if the job is no longer this worker's."""
        now = self.clock()
        with self._tx() as db:
            self._held(db, job_id, worker)
            db.execute("UPDATE jobs SET lease_until = ?, updated_at = ? WHERE id = ?",
                       (now + self.lease_s, now, job_id))

    def complete(self, job_id: int, worker: str, result_uids: list[str], note: str = "", instances: int = 0) -> None:
        """Mark the job DONE with the UIDs of the objects sent and the ``instances`` of the series they were made
        from; ``note``, kept as its reason: what the operator should know of a job done (a result the destination
        did not accept)."""
        now = self.clock()
        with self._tx() as db:
            self._held(db, job_id, worker)
            db.execute("UPDATE jobs SET state = ?, result_uids = ?, reason = ?, instances = ?, lease_until = 0,"
                       " updated_at = ? WHERE id = ?",
                       (JobState.DONE.value, json.dumps(list(result_uids)), note, int(instances), now, job_id))

    def fail(self, job_id: int, worker: str, reason: str) -> JobState:
        """FAILED (retried after the backoff), or PARKED once attempts >= max_attempts; the reason is kept."""
        now = self.clock()
        with self._tx() as db:
            attempts = self._held(db, job_id, worker)
            if attempts >= self.max_attempts:
                state, nxt = JobState.PARKED, 0.0
            else:
                state, nxt = JobState.FAILED, now + self.backoff_s * self.backoff_factor ** (attempts - 1)
            db.execute("UPDATE jobs SET state = ?, reason = ?, next_attempt_at = ?, lease_until = 0,"
                       " updated_at = ? WHERE id = ?", (state.value, reason, nxt, now, job_id))
            return state

    def wait(self, job_id: int, worker: str, reason: str, waits: int = 0, delay_s: float | None = None) -> float:
        """WAITING: held up by the far end or the disk, not by the job itself. The attempt is given back (a long
        outage parks nothing); the job is due again after ``backoff_s * backoff_factor ** waits`` seconds, at most
        ``max_wait_s`` (``waits``: how many waits in a row came before), or after ``delay_s``. Returns the delay."""
        now = self.clock()
        delay = min(self.backoff_s * self.backoff_factor ** min(waits, 64), self.max_wait_s) if delay_s is None \
            else delay_s
        with self._tx() as db:
            self._held(db, job_id, worker)
            db.execute("UPDATE jobs SET state = ?, attempts = MAX(attempts - 1, 0), reason = ?, next_attempt_at = ?,"
                       " lease_until = 0, updated_at = ? WHERE id = ?",
                       (JobState.WAITING.value, reason, now + delay, now, job_id))
        return delay

    def wake(self, job_id: int | None = None) -> int:
        """Make every WAITING job (or the one ``job_id``) due now: what it waited for is there; how many."""
        now = self.clock()
        only = "" if job_id is None else " AND id = ?"
        with self._tx() as db:
            return db.execute(f"UPDATE jobs SET next_attempt_at = ?, updated_at = ? WHERE state = ?"
                              f" AND next_attempt_at > ?{only}",
                              (now, now, JobState.WAITING.value, now, *([] if job_id is None else [job_id]))).rowcount

    def skip(self, series_uid: str, source: str, reason: str) -> None:
        """Record a series that must not be processed. A known series not RUNNING/DONE becomes SKIPPED too."""
        now = self.clock()
        with self._tx() as db:
            cur = db.execute(
                "INSERT OR IGNORE INTO jobs (series_uid, source, state, reason, created_at, updated_at)"
                " VALUES (?, ?, ?, ?, ?, ?)", (series_uid, source, JobState.SKIPPED.value, reason, now, now))
            if cur.rowcount == 0:
                db.execute("UPDATE jobs SET state = ?, reason = ?, updated_at = ? WHERE series_uid = ?"
                           " AND state NOT IN (?, ?)", (JobState.SKIPPED.value, reason, now, series_uid,
                                                        JobState.RUNNING.value, JobState.DONE.value))

    def unskip(self, series_uid: str, reason_like: str, patient_hash: str = "") -> bool:
        """Make a SKIPPED series whose reason matches ``reason_like`` (an SQL LIKE pattern) PENDING again, with
        ``patient_hash`` (a skip records none): what ruled it out has changed (more instances arrived). False if
        the series is unknown, not SKIPPED or skipped for another reason."""
        if patient_hash and not _HASH_RE.match(patient_hash):
            raise ValueError("patient_hash must be a salted SHA-256 hex digest (see patient_hash()), never a clear id")
        now = self.clock()
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = ?, attempts = 0, reason = '', next_attempt_at = ?,"
                             " patient_hash = ?, updated_at = ? WHERE series_uid = ? AND state = ? AND reason LIKE ?",
                             (JobState.PENDING.value, now, patient_hash, now, series_uid, JobState.SKIPPED.value,
                              reason_like))
            return cur.rowcount == 1

    def rerun(self, series_uid: str, instances: int, reason: str) -> bool:
        """Make the DONE job of a series whose results were made from fewer than ``instances`` instances PENDING
        again, ``reason`` saying why (its earlier result UIDs and count stay until it completes again). False if
        the series is unknown, not DONE, of an unknown count, or not larger: so a growth re-runs it once."""
        now = self.clock()
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = ?, attempts = 0, reason = ?, next_attempt_at = ?, updated_at = ?"
                             " WHERE series_uid = ? AND state = ? AND instances > 0 AND instances < ?",
                             (JobState.PENDING.value, reason, now, now, series_uid, JobState.DONE.value,
                              int(instances)))
            return cur.rowcount == 1

    #: The states :meth:`requeue` takes a job from.
    REQUEUABLE = (JobState.PARKED, JobState.FAILED, JobState.WAITING, JobState.SKIPPED, JobState.DONE)

    def requeue(self, job_id: int) -> bool:
        """Make a PARKED, FAILED, WAITING, SKIPPED or DONE job PENDING again with its attempts reset (an operator's
        retry after fixing the cause, or to have a series processed again); False if the job is PENDING or
        RUNNING."""
        now = self.clock()
        states = [state.value for state in self.REQUEUABLE]
        with self._tx() as db:
            cur = db.execute("UPDATE jobs SET state = ?, attempts = 0, next_attempt_at = ?, updated_at = ?"
                             f" WHERE id = ? AND state IN ({', '.join('?' * len(states))})",
                             (JobState.PENDING.value, now, now, job_id, *states))
            return cur.rowcount == 1

    def job(self, series_uid: str) -> Job | None:
        """The job of a series, or None if the series is unknown."""
        with self._lock:
            row = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE series_uid = ?", (series_uid,)).fetchone()
        return _job(row) if row else None

    def jobs(self, state: JobState | None = None) -> list[Job]:
        """All jobs (or those in ``state``), oldest first."""
        with self._lock:
            if state is None:
                rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs ORDER BY created_at, id").fetchall()
            else:
                rows = self._db.execute(f"SELECT {_COLUMNS} FROM jobs WHERE state = ? ORDER BY created_at, id",
                                        (JobState(state).value,)).fetchall()
        return [_job(r) for r in rows]

    def summary(self) -> dict[str, int]:
        """Number of jobs per state (every state present, zeros included)."""
        with self._lock:
            rows = self._db.execute("SELECT state, COUNT(*) FROM jobs GROUP BY state").fetchall()
        counts = {s.value: 0 for s in JobState}
        counts.update({s: n for s, n in rows})
        return counts
