"""The Orthanc watcher of the PACS bridge: new stable CT series -> zoo models -> DICOM SR/SEG back into Orthanc.

:meth:`OrthancWatcher.discover` reads ``StableSeries`` changes after the last sequence number seen and records
each series in the job ledger (:mod:`ctzoo.pacs.ledger`) as ``source="orthanc:<series id>"``; series
whose Orthanc tags alone rule them out (Modality not accepted, e.g. SR/SEG such as ctzoo's own results, or
too few instances) are recorded SKIPPED with the reason. The sequence number is kept in a small JSON file
next to the ledger (``<ledger file>.orthanc-seq.json``, one entry per Orthanc URL, written atomically after
each change), so a restarted watcher resumes where it stopped; a fresh watcher starts at sequence 0, i.e.
everything Orthanc already holds (the ledger makes re-discovery harmless).

A series Orthanc is still receiving when it stops never gets its ``StableSeries`` change: Orthanc tracks the
series' StableAge in memory only, and after a restart reports the series ``IsStable`` without announcing it.
So ``NewSeries`` changes are read too: each new series is kept as *settling* (in the same JSON file, under
``"settling"``) until its ``StableSeries`` change comes, or until ``GET /series/{id}`` says ``IsStable`` (asked
for at most ``MAX_SETTLING_CHECKS`` settling series a poll, oldest first); then it is recorded like any other.

Processing is :class:`ctzoo.pacs.core.SeriesWorker`'s: a job's series is downloaded from Orthanc
(:meth:`OrthancWatcher.fetch`), checked, run through the models, and the SR/SEG results uploaded back
(:meth:`OrthancWatcher.deliver`). Orthanc unreachable is retried with the ledger's backoff; Orthanc answers
``AlreadyStored`` to results re-sent after a crash.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from ctzoo.inference.tasks import ModelTask
from ctzoo.io.atomic import atomic_path
from ctzoo.io.dicom_scan import SeriesRules
from ctzoo.io.limits import DEFAULT_LIMITS, ResourceLimits
from ctzoo.io.privacy import patient_hash
from ctzoo.pacs.core import BadSeries, SeriesWorker, series_tag
from ctzoo.pacs.ledger import Job, Ledger
from ctzoo.pacs.orthanc import OrthancClient, OrthancError, OrthancUnavailable, _safe_id

__all__ = ["OrthancWatcher", "series_tag"]

log = logging.getLogger(__name__)
SOURCE_PREFIX = "orthanc:"
#: The most settling series whose stability one poll asks Orthanc about (one GET each).
MAX_SETTLING_CHECKS = 100


class OrthancWatcher(SeriesWorker):
    """Discover stable series in Orthanc, run ``tasks`` on each CT series once, send SR/SEG back."""

    unavailable = (OrthancUnavailable,)
    discover_reaches_far_end = True  # it reads Orthanc's changes

    def __init__(self, client: OrthancClient, ledger: Ledger, tasks: list[ModelTask], rules: SeriesRules,
                 work_dir: str | Path, worker: str, salt: str, limits: ResourceLimits = DEFAULT_LIMITS,
                 perf=None, decoder: str | None = None) -> None:
        super().__init__(ledger, tasks, rules, work_dir, worker, limits, perf, decoder)
        self.client, self.salt = client, salt
        self.state_path = ledger.path.with_name(ledger.path.name + ".orthanc-seq.json")

    # -- the last sequence number seen --------------------------------------------------------------------
    def _state(self) -> dict:
        try:
            return json.loads(self.state_path.read_text())
        except (OSError, ValueError):
            return {}

    @property
    def last_seq(self) -> int:
        return int(self._state().get(self.client.url, 0))

    @property
    def settling(self) -> list[str]:
        """Series ids seen in ``NewSeries`` changes and not recorded yet, oldest first."""
        return list(self._state().get("settling", {}).get(self.client.url, []))

    def _save(self, seq: int, settling: list[str]) -> None:
        """The sequence number and the settling series, in one atomic write: a crash loses neither."""
        state = self._state()
        state[self.client.url] = int(seq)
        state.setdefault("settling", {})[self.client.url] = settling
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
        """Enqueue the series of new ``StableSeries`` changes, and the settling series Orthanc now calls stable
        (see the module docstring); returns how many new jobs were recorded."""
        added, seq, settling = 0, self.last_seq, self.settling
        for series_id, change, seq in self.client.series_changes(seq):
            if series_id in settling:
                settling.remove(series_id)
            if change == "NewSeries":
                settling.append(series_id)
            else:
                added += self._discover_one(series_id)
            self._save(seq, settling)
        for series_id in settling[:MAX_SETTLING_CHECKS]:  # a copy: the list shrinks as series are recorded
            info = self._series_info(series_id)
            if info is not None and not info.get("IsStable"):
                continue  # still receiving: its StableSeries change, or a later check, will record it
            if info is not None:
                added += self._discover_one(series_id, info)
            settling.remove(series_id)
            self._save(seq, settling)
        return added

    def _series_info(self, series_id: str) -> dict | None:
        """``GET /series/{id}``; None when Orthanc no longer has it."""
        try:
            return self.client.series(series_id)
        except OrthancUnavailable:
            raise
        except OrthancError as exc:
            if exc.status == 404:  # deleted since: nothing to do
                log.info("Orthanc series %s is gone; ignored", series_id)
                return None
            raise

    def _discover_one(self, series_id: str, info: dict | None = None) -> int:
        source = SOURCE_PREFIX + series_id
        info = info or self._series_info(series_id)
        if info is None:
            return 0
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

    # -- the way in and out -------------------------------------------------------------------------------
    def fetch(self, job: Job, folder: Path) -> None:
        if not job.source.startswith(SOURCE_PREFIX):
            raise BadSeries(f"not an Orthanc job: {job.source}")
        self.client.download_series(_safe_id(job.source[len(SOURCE_PREFIX):]), folder)

    def deliver(self, paths: list[Path]) -> list[str]:
        return [str(self.client.upload(path).get("Status", "")) for path in paths]

    @property
    def last_upload_statuses(self) -> list[str]:
        """Orthanc's ``Status`` answers of the last job's uploads (``Success`` / ``AlreadyStored``)."""
        return self.last_delivery
