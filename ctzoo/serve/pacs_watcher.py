"""The Orthanc watcher of the PACS bridge: new stable CT series -> zoo models -> DICOM SR/SEG back into Orthanc.

:meth:`OrthancWatcher.discover` reads ``StableSeries`` changes after the last sequence number seen and records
each series in the job ledger (:mod:`ctzoo.serve.pacs_ledger`) as ``source="orthanc:<series id>"``; series
whose Orthanc tags alone rule them out (Modality not accepted, e.g. SR/SEG such as ctzoo's own results, or
too few instances) are recorded SKIPPED with the reason. The sequence number is kept in a small JSON file
next to the ledger (``<ledger file>.orthanc-seq.json``, one entry per Orthanc URL, written atomically after
each change), so a restarted watcher resumes where it stopped; a fresh watcher starts at sequence 0, i.e.
everything Orthanc already holds (the ledger makes re-discovery harmless).

:meth:`OrthancWatcher.process_one` claims a job, downloads the series into a private temporary folder under
``work_dir`` (removed afterwards), checks it against the series rules, runs every model task on it, uploads the
``sr.dcm``/``seg.dcm`` results and completes the job with their SOP Instance UIDs. Outcomes:

* bad data (no series passes the rules once the files are read, unreadable files): the job is SKIPPED with
  the reason (retrying cannot help);
* Orthanc unreachable: ``fail`` (retried after the ledger's backoff), and the error goes up so ``run`` waits;
* anything else (an Orthanc refusal, a model error): ``fail``, retried, PARKED after ``max_attempts``.

Result UIDs are deterministic, so a job re-run after a crash between upload and ``complete`` re-sends the
same objects, which Orthanc answers ``AlreadyStored``. Logs name a series by a short hash of its
SeriesInstanceUID only, never by patient data.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import tempfile
import threading
from pathlib import Path

import pydicom

from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.pipeline import PipelineOptions, run_pipeline
from ctzoo.inference.tasks import ModelTask
from ctzoo.io.atomic import atomic_path
from ctzoo.io.dicom_scan import DicomError, SeriesRules, choose_series, scan_folder
from ctzoo.serve.orthanc import (
    OrthancClient,
    OrthancError,
    OrthancUnavailable,
    _safe_id,
)
from ctzoo.serve.pacs_ledger import Job, LeaseLost, Ledger, patient_hash

__all__ = ["OrthancWatcher", "series_tag"]

log = logging.getLogger(__name__)
SOURCE_PREFIX = "orthanc:"
RESULT_FILES = ("sr.dcm", "seg.dcm")
CASE = "series"


def series_tag(series_uid: str) -> str:
    """A short, non-identifying name of a series for logs."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:10]


class OrthancWatcher:
    """Discover stable series in Orthanc, run ``tasks`` on each CT series once, send SR/SEG back."""

    def __init__(self, client: OrthancClient, ledger: Ledger, tasks: list[ModelTask], rules: SeriesRules,
                 work_dir: str | Path, worker: str, salt: str) -> None:
        if not tasks:
            raise ValueError("no model tasks")
        self.client, self.ledger, self.tasks, self.rules = client, ledger, list(tasks), rules
        self.work_dir, self.worker, self.salt = Path(work_dir), worker, salt
        self.work_dir.mkdir(parents=True, exist_ok=True)
        self.state_path = ledger.path.with_name(ledger.path.name + ".orthanc-seq.json")
        #: Orthanc's ``Status`` answers of the last job's uploads (``Success`` / ``AlreadyStored``).
        self.last_upload_statuses: list[str] = []

    # -- the last sequence number seen --------------------------------------------------------------------
    def _state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def last_seq(self) -> int:
        return int(self._state().get(self.client.url, 0))

    def _save_seq(self, seq: int) -> None:
        state = self._state()
        state[self.client.url] = int(seq)
        with atomic_path(self.state_path) as temporary:
            temporary.write_text(json.dumps(state))

    # -- discovery ------------------------------------------------------------------------------------------
    def _patient_id(self, info: dict) -> str:
        study = info.get("ParentStudy")
        if not study:
            return ""
        body = self.client._json("GET", f"/studies/{_safe_id(study)}")
        return str(body.get("PatientMainDicomTags", {}).get("PatientID", ""))

    def discover(self) -> int:
        """Enqueue the series of new ``StableSeries`` changes; returns how many new jobs were recorded."""
        added = 0
        for series_id, seq in self.client.stable_series(self.last_seq):
            added += self._discover_one(series_id)
            self._save_seq(seq)
        return added

    def _discover_one(self, series_id: str) -> int:
        source = SOURCE_PREFIX + series_id
        try:
            info = self.client.series(series_id)
        except OrthancUnavailable:
            raise
        except OrthancError as exc:
            if exc.status == 404:  # deleted since it became stable: nothing to do
                log.info("Orthanc series %s is gone; ignored", series_id)
                return 0
            raise
        tags = info.get("MainDicomTags", {})
        uid = str(tags.get("SeriesInstanceUID", "")) or source
        modality = str(tags.get("Modality", "")).upper()
        accepted = {m.upper() for m in self.rules.modalities}
        if modality not in accepted:
            reason = f"modality {modality or '(empty)'} is not one of {self.rules.modalities}"
            if modality in ("SR", "SEG"):
                reason += " (e.g. a ctzoo result)"
            self.ledger.skip(uid, source, reason)
            log.info("series %s skipped: %s", series_tag(uid), reason)
            return 0
        count = len(info.get("Instances", []))
        if count < self.rules.min_slices:
            reason = f"{count} instances, fewer than {self.rules.min_slices}"
            self.ledger.skip(uid, source, reason)
            log.info("series %s skipped: %s", series_tag(uid), reason)
            return 0
        phash = patient_hash(pid, self.salt) if (pid := self._patient_id(info)) else ""
        if self.ledger.enqueue(uid, source, phash):
            log.info("series %s enqueued", series_tag(uid))
            return 1
        return 0

    # -- processing -----------------------------------------------------------------------------------------
    def process_one(self) -> bool:
        """Claim and process one job; False when no job is due."""
        job = self.ledger.claim(self.worker)
        if job is None:
            return False
        tag = series_tag(job.series_uid)
        try:
            uids = self._process(job)
        except OrthancUnavailable as exc:
            self._fail(job, f"Orthanc unavailable: {exc}")
            raise
        except _BadData as exc:
            self._fail(job, str(exc))
            self.ledger.skip(job.series_uid, job.source, str(exc))
            log.warning("series %s skipped: %s", tag, exc)
            return True
        except LeaseLost:
            log.warning("series %s: lease lost, another worker has it", tag)
            return True
        except Exception as exc:  # one bad series never stops the watcher
            state = self._fail(job, f"{type(exc).__name__}: {exc}"[:500])
            log.warning("series %s failed (%s): %s", tag, state, type(exc).__name__)
            return True
        try:
            self.ledger.complete(job.id, self.worker, uids)
        except LeaseLost:
            log.warning("series %s: lease lost before completion; results were sent", tag)
            return True
        log.info("series %s done: %d result object(s)", tag, len(uids))
        return True

    def _fail(self, job: Job, reason: str):
        try:
            return self.ledger.fail(job.id, self.worker, reason)
        except LeaseLost:
            return None

    def _process(self, job: Job) -> list[str]:
        if not job.source.startswith(SOURCE_PREFIX):
            raise _BadData(f"not an Orthanc job: {job.source}")
        series_id = _safe_id(job.source[len(SOURCE_PREFIX):])
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=self.work_dir))
        try:
            data, out = folder / "dicom", folder / "out"
            self.client.download_series(series_id, data)
            self.ledger.heartbeat(job.id, self.worker)
            try:
                choose_series(scan_folder(data, progress=False), self.rules)
            except (DicomError, ValueError) as exc:
                text = " ".join(str(exc).replace(str(data), "<series>").split())
                raise _BadData(f"rejected after reading: {text[:300]}") from None
            case = CaseInput(CASE, data)
            rows: list[dict] = []
            for task in self.tasks:
                options = PipelineOptions(out=out, workers=0, overlay=False, progress=False, rules=self.rules)
                new = run_pipeline([case], task, options, other_rows=rows)
                for row in new:
                    if row.get("status") != "ok":
                        raise RuntimeError(f"{task.model_name}: {row.get('error', 'failed')}")
                rows += new
                self.ledger.heartbeat(job.id, self.worker)
            uids, self.last_upload_statuses = [], []
            for name in RESULT_FILES:
                path = out / CASE / name
                if path.exists():
                    answer = self.client.upload(path)
                    self.last_upload_statuses.append(str(answer.get("Status", "")))
                    uids.append(str(pydicom.dcmread(path, stop_before_pixels=True).SOPInstanceUID))
            return uids
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- loop -----------------------------------------------------------------------------------------------
    def run(self, poll_s: float = 2.0, stop: threading.Event | None = None) -> None:
        """Discover and process until ``stop`` is set; waits ``poll_s`` when idle or when Orthanc is down."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.discover()
                while not stop.is_set() and self.process_one():
                    pass
            except OrthancUnavailable as exc:
                log.warning("Orthanc unavailable (%s); retrying in %.0f s", exc.path or "?", poll_s)
            except Exception as exc:  # never crash the loop
                log.error("watcher error: %s", type(exc).__name__)
            stop.wait(poll_s)


class _BadData(ValueError):
    """The series cannot be processed whatever the retries (recorded SKIPPED with the reason)."""
