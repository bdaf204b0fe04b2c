"""The provenance store: anomalies, a window of the events around each, and one normal sample per key.

Everything else is counted, not kept: the reduction (events seen / events stored) is what Chimbuko's design buys.
SQLite (one file, WAL), schema:

``events``
    ``id`` INTEGER PRIMARY KEY; ``kind`` (``anomaly``, ``window``: one of the ``window`` events of the same process
    around an anomaly, half just before it and half just after, or ``normal``: the first normal event of its key,
    stored once more as a ``window`` row if it is an anomaly's neighbour);
    ``anomaly_id`` (a window event's anomaly); ``process``; the key: ``model``, ``version``, ``stage``, ``device``,
    ``bucket``; ``seconds``, ``started`` (Unix time); the verdict: ``algorithm``, ``score``, ``threshold``,
    ``judged`` (0 during a key's warm-up); ``context`` (JSON; never patient identifiers).
``totals``
    ``process`` PRIMARY KEY, ``seen`` and ``stored`` events, ``updated`` (Unix time).
``key_states``
    one process's detector statistics of one key, so a report can draw the real distribution (not only the
    stored samples) and merge processes exactly: ``process``, the key (``model``, ``version``, ``stage``,
    ``device``, ``bucket``), ``state`` (JSON, :meth:`~ctzoo.perf.detectors.KeyState.to_dict`: running moments
    and the fine log2 histogram) of this process's own events only (also when it judges against a parameter
    server's global statistics), so the states of several processes merge exactly; ``updated`` (Unix time);
    PRIMARY KEY (process, key). Written with the totals.
``profiles``
    on-demand deep profiles of anomalous model runs (:mod:`ctzoo.perf.deep_profile`): ``id`` INTEGER PRIMARY KEY,
    ``anomaly_id`` (the ``events`` row), ``tool`` (``onnxruntime`` or ``torch``), ``created`` (Unix time),
    ``rerun_s`` (the profiled rerun), ``anomaly_s`` (the anomalous run), ``ops`` (JSON: ``[{"op", "seconds",
    "calls"}]``, slowest first), ``trace`` (the profiler's Chrome-trace JSON, gzip; NULL when too large).
``ended``
    ``process`` PRIMARY KEY, ``at`` (Unix time): the processes that closed their monitor, which may be folded
    (:mod:`ctzoo.perf.store_upkeep`: the store's size stays bounded however many processes write to it).
"""

from __future__ import annotations

import json
import logging
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path

from ctzoo.perf.detectors import Label
from ctzoo.perf.events import KEY_FIELDS, Event
from ctzoo.perf.store_upkeep import fold_processes, processes_to_fold, prune_events

log = logging.getLogger("ctzoo.perf")

SCHEMA = """
CREATE TABLE IF NOT EXISTS events (
    id INTEGER PRIMARY KEY, kind TEXT NOT NULL CHECK (kind IN ('anomaly', 'window', 'normal')),
    anomaly_id INTEGER, process TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, stage TEXT NOT NULL,
    device TEXT NOT NULL, bucket TEXT NOT NULL, seconds REAL NOT NULL, started REAL NOT NULL,
    algorithm TEXT NOT NULL, score REAL NOT NULL, threshold REAL NOT NULL, judged INTEGER NOT NULL,
    context TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS events_kind ON events (kind, started);
CREATE INDEX IF NOT EXISTS events_anomaly ON events (anomaly_id);
CREATE INDEX IF NOT EXISTS events_process ON events (process, started);
CREATE TABLE IF NOT EXISTS totals (process TEXT PRIMARY KEY, seen INTEGER NOT NULL, stored INTEGER NOT NULL,
                                   updated REAL NOT NULL);
CREATE TABLE IF NOT EXISTS key_states (
    process TEXT NOT NULL, model TEXT NOT NULL, version TEXT NOT NULL, stage TEXT NOT NULL, device TEXT NOT NULL,
    bucket TEXT NOT NULL, state TEXT NOT NULL, updated REAL NOT NULL,
    PRIMARY KEY (process, model, version, stage, device, bucket));
CREATE TABLE IF NOT EXISTS profiles (
    id INTEGER PRIMARY KEY, anomaly_id INTEGER NOT NULL, tool TEXT NOT NULL, created REAL NOT NULL,
    rerun_s REAL NOT NULL, anomaly_s REAL NOT NULL, ops TEXT NOT NULL, trace BLOB);
CREATE INDEX IF NOT EXISTS profiles_anomaly ON profiles (anomaly_id);
CREATE TABLE IF NOT EXISTS ended (process TEXT PRIMARY KEY, at REAL NOT NULL);
"""
#: The first bytes of every SQLite database file.
SQLITE_HEADER = b"SQLite format 3\x00"
#: SQLite's largest INTEGER (a rowid never exceeds it)
MAX_ROWID = 2**63 - 1
#: The most anomaly and window rows a store keeps (about 0.5 kB each): beyond it the oldest go, so a service that
#: keeps --perf on does not fill its disk. Normal samples (one per key) are kept. Counted in the file when a
#: process opens it, every tenth of it that process inserts, and at its close: with several processes writing at
#: once, each may add up to a tenth before it counts again.
MAX_STORED_EVENTS = 200_000
#: How many of a process's latest anomalies tell how many neighbours it files before and after one (its window).
HALVES_FROM_ANOMALIES = 200
#: A deep profile's rerun this fraction of its anomaly's time or slower: the slowness reproduces.
REPRODUCED = 0.5
#: Totals are written at most this often (seconds) while events flow, and at :meth:`ProvenanceRecorder.close`.
TOTALS_EVERY_S = 5.0
#: How long a write waits for another connection's lock (seconds) before it fails (the monitor then counts it and
#: goes on: the monitored work must not wait on its provenance).
BUSY_TIMEOUT_S = 0.5


class ProvenanceStore:
    """The SQLite file (see the module docstring); thread-safe.

    ``read_only=True`` opens an existing store without creating or changing anything (a report must not turn a
    stray file into a store, nor leave files beside it); ValueError if the file is not a SQLite database with
    ctzoo's ``events`` and ``totals`` tables, or is damaged (:func:`read_problem`).
    """

    def __init__(self, path: str | Path, read_only: bool = False, max_events: int = MAX_STORED_EVENTS,
                 busy_timeout_s: float = BUSY_TIMEOUT_S) -> None:
        self.path, self.max_events, self._inserted = Path(path), max_events, 0
        self._lock = threading.Lock()
        self.read_only, self.immutable = read_only, False  # immutable: read without locks (see below)
        if read_only:
            # no -wal (or -journal) beside the file: no writer has it open (SQLite deletes the -wal when the last
            # connection closes), and immutable=1 reads it without leaving the -wal and -shm files that a mode=ro
            # connection to a WAL database creates and cannot delete
            self.immutable = not any(Path(f"{self.path}{suffix}").exists() for suffix in ("-wal", "-journal"))
            self._db = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro{'&immutable=1' * self.immutable}",
                                       uri=True, check_same_thread=False, isolation_level=None)
            try:
                self.tables = {row[0] for row in self._db.execute("SELECT name FROM sqlite_master "
                                                                  "WHERE type = 'table'")}
            except sqlite3.DatabaseError as error:
                self._db.close()
                raise ValueError(read_problem(self.path, error)) from None
            if not {"events", "totals"} <= self.tables:
                self._db.close()
                raise ValueError(f"{self.path} is not a ctzoo perf store (no events and totals tables)")
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=busy_timeout_s)
        self._db.execute("PRAGMA journal_mode=WAL")
        # no fsync per insert (2 ms each here): in WAL mode a crash can lose the last inserts, never corrupt the file
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(SCHEMA)  # also adds what an older store lacks (the events_anomaly index)
        self.tables = {"events", "totals", "key_states", "profiles", "ended"}
        self._upkeep(self._tidy)

    def _tidy(self) -> None:
        """What opening for writing does: the events beyond the cap pruned, old processes folded."""
        prune_events(self._db, self.max_events)
        fold_processes(self._db, processes_to_fold(self._db))

    def _upkeep(self, work: Callable[[], object]) -> None:
        """``work`` (:mod:`ctzoo.perf.store_upkeep`) under the lock; should it fail (another connection holds the
        store's lock past the busy timeout, a state that does not parse), it is logged and left to the next time:
        opening a store never fails for it."""
        try:
            with self._lock:
                work()
        except (sqlite3.Error, ValueError, TypeError, KeyError) as error:
            log.warning("perf: could not tidy provenance store %s (%s: %s); the next process to open it tries "
                        "again", self.path, type(error).__name__, error)

    def insert(self, kind: str, event: Event, label: Label, algorithm: str, anomaly_id: int | None = None) -> int:
        model, version, stage, device, bucket = event.key
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO events (kind, anomaly_id, process, model, version, stage, device, bucket, seconds, "
                "started, algorithm, score, threshold, judged, context) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
                (kind, anomaly_id, event.process, model, version, stage, device, bucket, event.seconds,
                 event.started, algorithm, _finite(label.score), _finite(label.threshold), int(label.judged),
                 json.dumps(event.context, sort_keys=True)))
            self._inserted += 1
            if self._inserted % max(1, self.max_events // 10) == 0:
                prune_events(self._db, self.max_events)
            return int(cursor.lastrowid)

    def start_process(self, process: str) -> None:
        """``process`` starts writing: an ended process of the same name (a restart that got the same PID) is
        folded first, so that its totals and key states are not overwritten."""
        def fold_namesake() -> None:
            if self._db.execute("SELECT 1 FROM ended WHERE process = ?", (process,)).fetchone():
                fold_processes(self._db, {process})
        self._upkeep(fold_namesake)

    def end_process(self, process: str) -> None:
        """``process`` wrote its last totals and key states: it may be folded (:mod:`ctzoo.perf.store_upkeep`)."""
        with self._lock:
            self._db.execute("INSERT INTO ended VALUES (?, ?) ON CONFLICT(process) DO UPDATE SET at = excluded.at",
                             (process, time.time()))

    def write_totals(self, process: str, seen: int, stored: int) -> None:
        with self._lock:
            self._db.execute("INSERT INTO totals VALUES (?,?,?,?) ON CONFLICT(process) DO UPDATE SET "
                             "seen=excluded.seen, stored=excluded.stored, updated=excluded.updated",
                             (process, seen, stored, time.time()))

    def save_key_states(self, process: str, states: dict[str, dict]) -> None:
        """Keep ``process``'s own detector statistics
        (:meth:`~ctzoo.perf.detectors.AnomalyDetector.own_state_dict` output:
        ``{"model|version|stage|device|bucket": KeyState.to_dict()}``), replacing its earlier ones."""
        now, rows = time.time(), []
        for name, state in states.items():
            key = name.split("|")
            if len(key) != len(KEY_FIELDS):
                raise ValueError(f"key states must be keyed model|version|stage|device|bucket, got {name!r}")
            rows.append((process, *key, json.dumps(state, sort_keys=True), now))
        with self._lock:
            self._db.execute("BEGIN")
            try:
                self._db.executemany("INSERT INTO key_states VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET "
                                     "state=excluded.state, updated=excluded.updated", rows)
                self._db.execute("COMMIT")
            except BaseException:
                self._db.execute("ROLLBACK")
                raise

    def key_states(self) -> list[dict]:
        """Every process's state of every key (``state`` decoded; none from a store older than the table)."""
        if "key_states" not in self.tables:
            return []
        found = self.rows("SELECT * FROM key_states ORDER BY model, version, stage, device, bucket, process")
        for row in found:
            row["state"] = json.loads(row["state"])
        return found

    def save_profile(self, profile: dict) -> int:
        """Keep a deep profile (:class:`~ctzoo.perf.deep_profile.DeepProfiler`'s dict) with its anomaly."""
        with self._lock:
            cursor = self._db.execute(
                "INSERT INTO profiles (anomaly_id, tool, created, rerun_s, anomaly_s, ops, trace) "
                "VALUES (?,?,?,?,?,?,?)", (profile["anomaly_id"], profile["tool"], time.time(), profile["rerun_s"],
                                           profile["anomaly_s"], json.dumps(profile["ops"]), profile["trace"]))
            return int(cursor.lastrowid)

    def profiles(self, anomaly_ids: list[int] | None = None) -> dict[int, dict]:
        """Each profiled anomaly's newest profile, without its trace: ``{anomaly_id: {"id", "tool", "rerun_s",
        "anomaly_s", "ops", "trace_bytes", "reproduces"}}`` (all anomalies', or ``anomaly_ids``'); none from an
        older store. ``reproduces``: the rerun took at least :data:`REPRODUCED` of the anomalous run's time (the
        input or the model is slow, not the moment)."""
        if "profiles" not in self.tables:
            return {}
        rows = self.rows("SELECT id, anomaly_id, tool, created, rerun_s, anomaly_s, ops, LENGTH(trace) AS "
                         "trace_bytes FROM profiles ORDER BY id")
        wanted = None if anomaly_ids is None else set(anomaly_ids)
        found = {}
        for row in rows:
            if wanted is None or row["anomaly_id"] in wanted:
                found[row["anomaly_id"]] = {**row, "ops": json.loads(row["ops"]),
                                            "reproduces": row["rerun_s"] >= REPRODUCED * row["anomaly_s"]}
        return found

    def profile_trace(self, profile_id: int) -> bytes | None:
        """A profile's gzip-compressed Chrome trace (None: no such profile, or its trace was too large)."""
        # ids are SQLite rowids (1 up): anything beyond a 64-bit integer would overflow the query's parameter
        if "profiles" not in self.tables or not 1 <= int(profile_id) <= MAX_ROWID:
            return None
        with self._lock:
            row = self._db.execute("SELECT trace FROM profiles WHERE id = ?", (int(profile_id),)).fetchone()
        return None if row is None else row[0]

    def sampled_keys(self) -> set[tuple[str, ...]]:
        """The keys that already have their normal sample."""
        with self._lock:
            rows = self._db.execute("SELECT DISTINCT model, version, stage, device, bucket FROM events "
                                    "WHERE kind = 'normal'").fetchall()
        return {tuple(row) for row in rows}

    def rows(self, sql: str, parameters: tuple = ()) -> list[dict]:
        """Rows of a read-only query as dicts (``context`` decoded)."""
        with self._lock:
            cursor = self._db.execute(sql, parameters)
            names = [c[0] for c in cursor.description]
            rows = [dict(zip(names, row)) for row in cursor.fetchall()]
        for row in rows:
            if isinstance(row.get("context"), str):
                row["context"] = json.loads(row["context"])
        return rows

    def anomalies(self, limit: int = 100, request: str | None = None) -> list[dict]:
        """The latest anomalies, newest first, each with its window (``window``: the neighbours, in time order,
        :meth:`windows`) and its deep profile's summary (``profile``; None when it has none). ``request``: only the
        anomalies whose own event or filed window rows name that request hash
        (:func:`~ctzoo.perf.events.request_hash`, in a context's ``request`` or ``requests``)."""
        if request is None:
            found = self.rows("SELECT * FROM events WHERE kind = 'anomaly' ORDER BY started DESC, id DESC LIMIT ?",
                              (int(limit),))
        else:  # a substring match finds the candidates, the decoded contexts decide
            found = self.rows("SELECT * FROM events WHERE kind = 'anomaly' AND (INSTR(context, ?) > 0 OR id IN ("
                              "SELECT anomaly_id FROM events WHERE kind = 'window' AND INSTR(context, ?) > 0)) "
                              "ORDER BY started DESC, id DESC", (request, request))
        if request is not None:
            filed = self._filed_windows([anomaly["id"] for anomaly in found])
            found = [a for a in found if any(_names_request(e, request) for e in [a, *filed[a["id"]]])][:limit]
        windows = self.windows(found)
        profiles = self.profiles([anomaly["id"] for anomaly in found])
        for anomaly in found:
            anomaly["window"] = windows[anomaly["id"]]
            anomaly["profile"] = profiles.get(anomaly["id"])
        return found

    def _filed_windows(self, ids: list[int]) -> dict[int, list[dict]]:
        """The window rows filed under each anomaly of ``ids``, in time order."""
        windows: dict[int, list[dict]] = {anomaly_id: [] for anomaly_id in ids}
        for chunk in range(0, len(ids), 500):  # one query per 500 anomalies (SQLite's parameter limit)
            part = ids[chunk:chunk + 500]
            for row in self.rows(f"SELECT * FROM events WHERE anomaly_id IN ({','.join('?' * len(part))}) "
                                 "ORDER BY started, id", tuple(part)):
                windows[row["anomaly_id"]].append(row)
        return windows

    def windows(self, anomalies: list[dict]) -> dict[int, list[dict]]:
        """Each anomaly's window, in time order: the rows filed under it, and the stored events of its process
        nearest it in time whichever anomaly they were filed under, as many before and after it as that process
        filed around any one anomaly (its recorder's halves, :meth:`_window_halves`). Anomalies close together
        share their neighbours, so the later one's own rows hold none of the events just before it: they are
        filed under the earlier one. A store without the ``events_process`` index (last written by an older
        ctzoo, read read-only) gives the filed rows only."""
        windows = self._filed_windows([anomaly["id"] for anomaly in anomalies])
        if not self.rows("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = 'events_process'"):
            return windows
        halves = {process: self._window_halves(process) for process in {a["process"] for a in anomalies}}
        for anomaly in anomalies:
            before, after = halves[anomaly["process"]]
            where = (anomaly["process"], anomaly["started"], anomaly["started"], anomaly["id"])
            # "started <= ?" (not "started < ? OR ..."): a range the (process, started, id) index can seek
            near = self.rows("SELECT * FROM events WHERE process = ? AND kind != 'normal' AND started <= ? AND NOT "
                             "(started = ? AND id >= ?) ORDER BY started DESC, id DESC LIMIT ?", (*where, before))
            near += self.rows("SELECT * FROM events WHERE process = ? AND kind != 'normal' AND started >= ? AND NOT "
                              "(started = ? AND id <= ?) ORDER BY started, id LIMIT ?", (*where, after))
            own = windows[anomaly["id"]]
            filed = {event["id"] for event in own}
            own.extend(event for event in near if event["id"] not in filed)
            own.sort(key=lambda event: (event["started"], event["id"]))
        return windows

    def _window_halves(self, process: str) -> tuple[int, int]:
        """The most window rows ``process`` filed before and after any one of its latest
        :data:`HALVES_FROM_ANOMALIES` anomalies (one process keeps one window size; normal samples are not counted:
        one that is a neighbour is filed as a window row too)."""
        [row] = self.rows(
            "SELECT COALESCE(MAX(before), 0) AS before, COALESCE(MAX(filed - before), 0) AS after FROM ("
            "SELECT SUM(w.started < a.started OR w.started = a.started AND w.id < a.id) AS before, COUNT(*) AS filed "
            "FROM (SELECT id, started FROM events WHERE process = ? AND kind = 'anomaly' ORDER BY started DESC "
            "LIMIT ?) a JOIN events w ON w.anomaly_id = a.id GROUP BY a.id)", (process, HALVES_FROM_ANOMALIES))
        return row["before"], row["after"]

    def reduction(self) -> dict:
        """``{"seen", "stored", "ratio"}`` over every process (ratio: events seen per event stored)."""
        [row] = self.rows("SELECT COALESCE(SUM(seen), 0) AS seen, COALESCE(SUM(stored), 0) AS stored FROM totals")
        seen, stored = row["seen"], row["stored"]
        return {"seen": seen, "stored": stored, "ratio": seen / stored if stored else None}

    def close(self) -> None:
        with self._lock:
            try:
                if self._inserted and not self.read_only:  # the cap holds between processes too
                    prune_events(self._db, self.max_events)
            finally:
                self._db.close()


def read_problem(path: Path, error: sqlite3.DatabaseError) -> str:
    """What a read of the store at ``path`` that failed with ``error`` says to the user: it cannot be read (locked,
    no permission), it is damaged or truncated (a SQLite file whose pages are not), or it is no store at all."""
    if isinstance(error, sqlite3.OperationalError):
        return f"{path} cannot be read ({error})"
    try:
        with open(path, "rb") as file:
            sqlite_file = file.read(len(SQLITE_HEADER)) == SQLITE_HEADER
    except OSError:
        sqlite_file = False
    if sqlite_file:
        return f"{path} is damaged or truncated ({error})"
    return f"{path} is not a ctzoo perf store ({error})"


def _names_request(event: dict, request: str) -> bool:
    """Whether a stored event's context names the request hash ``request`` (its own, or a batch's)."""
    context = event.get("context") or {}
    return context.get("request") == request or request in str(context.get("requests") or "").split(",")


def _finite(value: float) -> float:
    return value if value == value and abs(value) != float("inf") else 1e300


class ProvenanceRecorder:
    """Decides what of one process's event stream is kept: each anomaly with a window of ``window`` neighbouring
    events (the ``window // 2`` just before it that are in no earlier anomaly's window and the rest just after;
    default 10: 5 + 5), and the first normal event of each key (which is also a window row when it is among an
    anomaly's neighbours).

    ``window`` counts the neighbours of one anomaly, as the issue and Chimbuko's ``-anom_win_size`` (default 10)
    word it: "a window of this size around the anomalous event". Anomalies close together share their
    neighbours, so a burst of them costs one window, not one each."""

    def __init__(self, store: ProvenanceStore, process: str, algorithm: str, window: int = 10) -> None:
        self.store, self.process, self.algorithm, self.window = store, process, algorithm, window
        self.before, self.after = window // 2, window - window // 2
        self._recent: deque[tuple[Event, Label]] = deque(maxlen=self.before)
        self._after: tuple[int, int] | None = None  # (anomaly id, events still to keep after it)
        self._sampled = store.sampled_keys()
        store.start_process(process)
        self.seen = self.stored = 0
        self._totals_written = 0.0
        self._lock = threading.Lock()
        #: Called after each write of the totals (the monitor saves its detector's key states there).
        self.on_flush: Callable[[], None] | None = None

    def record(self, event: Event, label: Label) -> int | None:
        """Take one judged event; returns its row id when it was stored as an anomaly."""
        with self._lock:
            self.seen += 1
            anomaly_id = None
            if label.anomalous:
                anomaly_id = self._keep("anomaly", event, label)
                for before, before_label in self._recent:
                    self._keep("window", before, before_label, anomaly_id)
                self._recent.clear()
                self._after = (anomaly_id, self.after) if self.after else None
            elif self._after is not None:
                self._keep("window", event, label, self._after[0])
                left = self._after[1] - 1
                self._after = (self._after[0], left) if left > 0 else None
            else:
                if label.judged and event.key not in self._sampled:
                    self._sampled.add(event.key)
                    self._keep("normal", event, label)
                # a key's normal sample is also a neighbour: should an anomaly follow, it is stored once more as
                # one of its window rows, so that every reader of a window (by kind or by anomaly_id) sees it
                self._recent.append((event, label))
            if time.monotonic() - self._totals_written > TOTALS_EVERY_S:
                self.flush()
            return anomaly_id

    def _keep(self, kind: str, event: Event, label: Label, anomaly_id: int | None = None) -> int:
        self.stored += 1
        return self.store.insert(kind, event, label, self.algorithm, anomaly_id)

    def flush(self) -> None:
        self.store.write_totals(self.process, self.seen, self.stored)
        self._totals_written = time.monotonic()
        if self.on_flush is not None:
            self.on_flush()

    def close(self) -> None:
        """The last totals and key states, and the process marked ended (its rows may be folded later)."""
        self.flush()
        self.store.end_process(self.process)
