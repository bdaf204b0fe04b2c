"""Keeping a provenance store's size bounded across processes: what :class:`~ctzoo.perf.provenance.ProvenanceStore`
does when it opens a store for writing, every tenth of its cap of inserts, and at close.

* **Events.** The anomaly and window rows beyond the store's cap are deleted, oldest first, counted in the file
  (not per process: a store is written by many processes in turn, each with a count of its own).
* **Processes.** Every process adds a ``totals`` row and a ``key_states`` row per key, under its name
  (``role@host:pid``). A process that closes its monitor says so in ``ended``. The newest
  :data:`KEEP_ENDED_PROCESSES` ended processes keep their rows apart; the older ones, and any process that wrote
  nothing for :data:`SILENT_PROCESS_S` (one that crashed and never said it ended), are *folded* into the rows of
  :data:`EARLIER_PROCESSES`: their totals summed, their key states merged exactly
  (:meth:`~ctzoo.perf.detectors.KeyState.merge`), so the report's totals and distributions stay the same. A
  process that starts under the name of an ended one (a restart that got the same PID, as PID 1 in a container
  does) folds that one first, so its rows are not overwritten.

The trade-off: a live process that records no event for :data:`SILENT_PROCESS_S` is folded too, and should it
record again, its earlier events count twice in the report (its key states are cumulative).

Every function runs under the store's lock, on its connection.
"""

from __future__ import annotations

import json
import sqlite3
import time

from ctzoo.perf.detectors import KeyState

#: The process name under which folded processes' totals and key states are kept.
EARLIER_PROCESSES = "earlier processes"
#: How many ended processes (the newest) keep their own totals and key states.
KEEP_ENDED_PROCESSES = 32
#: A process whose totals and key states were not written for this long (seconds) is taken for gone and folded.
SILENT_PROCESS_S = 7 * 24 * 3600.0


def prune_events(db: sqlite3.Connection, max_events: int) -> None:
    """Delete the oldest anomaly and window rows beyond ``max_events``, and the profiles of deleted anomalies."""
    (count,) = db.execute("SELECT COUNT(*) FROM events WHERE kind != 'normal'").fetchone()
    if count > max_events:
        db.execute("DELETE FROM events WHERE id IN (SELECT id FROM events WHERE kind != 'normal' ORDER BY id "
                   "LIMIT ?)", (count - max_events,))
        db.execute("DELETE FROM profiles WHERE anomaly_id NOT IN (SELECT id FROM events)")


def processes_to_fold(db: sqlite3.Connection, now: float | None = None) -> set[str]:
    """The ended processes beyond the newest :data:`KEEP_ENDED_PROCESSES`, and the processes silent for
    :data:`SILENT_PROCESS_S`."""
    now = time.time() if now is None else now
    ended = db.execute("SELECT process FROM ended ORDER BY at DESC LIMIT -1 OFFSET ?", (KEEP_ENDED_PROCESSES,))
    silent = db.execute("SELECT process FROM (SELECT process, updated FROM totals UNION ALL SELECT process, updated "
                        "FROM key_states) WHERE process != ? GROUP BY process HAVING MAX(updated) < ?",
                        (EARLIER_PROCESSES, now - SILENT_PROCESS_S))
    return {row[0] for row in ended.fetchall()} | {row[0] for row in silent.fetchall()}


def fold_processes(db: sqlite3.Connection, processes: set[str]) -> None:
    """Sum ``processes``' totals and merge their key states into :data:`EARLIER_PROCESSES`' rows, then delete
    theirs, in one transaction."""
    processes = processes - {EARLIER_PROCESSES}
    if not processes:
        return
    db.execute("BEGIN IMMEDIATE")
    try:
        for process in sorted(processes):
            _fold_one(db, process)
        db.execute("COMMIT")
    except BaseException:
        db.execute("ROLLBACK")
        raise


def _fold_one(db: sqlite3.Connection, process: str) -> None:
    db.execute("INSERT INTO totals SELECT ?, seen, stored, updated FROM totals WHERE process = ? AND true "
               "ON CONFLICT(process) DO UPDATE SET seen = seen + excluded.seen, stored = stored + excluded.stored, "
               "updated = MAX(updated, excluded.updated)", (EARLIER_PROCESSES, process))
    key_columns = "model = ? AND version = ? AND stage = ? AND device = ? AND bucket = ?"
    rows = db.execute("SELECT model, version, stage, device, bucket, state, updated FROM key_states "
                      "WHERE process = ?", (process,)).fetchall()
    for *key, state_json, updated in rows:
        state = KeyState.from_dict(json.loads(state_json))
        earlier = db.execute(f"SELECT state, updated FROM key_states WHERE process = ? AND {key_columns}",
                             (EARLIER_PROCESSES, *key)).fetchone()
        if earlier is not None:
            state, updated = KeyState.from_dict(json.loads(earlier[0])).merge(state), max(updated, earlier[1])
        db.execute("INSERT INTO key_states VALUES (?,?,?,?,?,?,?,?) ON CONFLICT DO UPDATE SET state=excluded.state, "
                   "updated=excluded.updated", (EARLIER_PROCESSES, *key, json.dumps(state.to_dict(), sort_keys=True),
                                                updated))
    for table in ("key_states", "totals", "ended"):
        db.execute(f"DELETE FROM {table} WHERE process = ?", (process,))
