"""The Orthanc watcher of the PACS bridge: new stable CT series -> zoo models -> DICOM SR/SEG back into Orthanc.

:meth:`OrthancWatcher.discover` reads ``StableSeries`` changes after the last sequence number seen and records
each series in the job ledger (:mod:`ctzoo.pacs.ledger`) as ``source="orthanc:<series id>"``; series
whose Orthanc tags alone rule them out (Modality not accepted, e.g. SR/SEG such as ctzoo's own results, or
too few instances) are recorded SKIPPED with the reason. The sequence number is kept in a small JSON file
next to the ledger (``<ledger file>.orthanc-seq.json``, one entry per Orthanc URL, written atomically after
each change), so a restarted watcher resumes where it stopped; a fresh watcher starts at sequence 0, i.e.
everything Orthanc already holds (the ledger makes re-discovery harmless), or with ``start_from="now"`` at Orthanc's
last change.

A series Orthanc is still receiving when it stops never gets its ``StableSeries`` change: Orthanc tracks the
series' StableAge in memory only, and after a restart reports the series ``IsStable`` without announcing it.
So ``NewSeries`` changes are read too: each new series is kept as *settling* (in the same JSON file, under
``"settling"``) until its ``StableSeries`` change comes, or until ``GET /series/{id}`` says ``IsStable`` and its
``LastUpdate`` (its last instance) is ``stable_age_s`` (Orthanc's ``StableAge``) old by Orthanc's clock (asked for
at most ``MAX_SETTLING_CHECKS`` settling series a poll, oldest first); then it is recorded like any other. Right
after a restart Orthanc says ``IsStable`` of a series whose sender may still be sending: the wait gives it the
StableAge Orthanc would have given it.

A series Orthanc announces stable, processes, and then receives more instances of (its sender paused longer than
StableAge, or resumed after Orthanc restarted) is announced stable again: the job, DONE with results made from the
instances it had then (the ledger keeps that count), is run again on the whole series
(:meth:`~ctzoo.pacs.ledger.Ledger.rerun`), with a warning; the new results have UIDs of their own
(:mod:`ctzoo.pacs.result_identity`) and go beside the earlier ones. A series announced stable while its job is in
hand (not DONE, SKIPPED or PARKED) is kept settling, and looked at again until that job has ended, so that
instances that came while it ran are not missed.

Processing is :class:`ctzoo.pacs.core.SeriesWorker`'s: a job's series is downloaded from Orthanc
(:meth:`OrthancWatcher.fetch`), checked, run through the models, and the SR/SEG results uploaded back
(:meth:`OrthancWatcher.deliver`). Orthanc unreachable is retried with the ledger's backoff; Orthanc answers
``AlreadyStored`` to results re-sent after a crash. Only ``Success`` and ``AlreadyStored`` count as delivered: a
result Orthanc's ``ReceivedInstanceFilter`` refuses (``FilteredOut``) is not delivered (the job is DONE with a note
naming it, as for a destination that does not take SEG), any other answer is a failure.

Before a download, the series' size is checked from what Orthanc says of it (instances, Rows, Columns, frames:
over ``limits``, SKIPPED with the limit named) and its ``DiskSize`` against the work folder's free space (less than
``min_free_mb`` would be left: WAITING for space; more than that disk could ever hold: SKIPPED, saying so).

A series first seen with fewer than ``rules.min_slices`` instances (a StableSeries change while it still arrives,
StableAge too short for the sender) is SKIPPED, and enqueued again when a later StableSeries change finds enough.
A saved sequence number beyond Orthanc's last change (Orthanc's database recreated) is reset to 0, with a warning.
"""

from __future__ import annotations

import json
import logging
from datetime import datetime
from pathlib import Path
from typing import Literal

import pydicom

from ctzoo.inference.tasks import ModelTask
from ctzoo.io.atomic import atomic_path
from ctzoo.io.dicom_scan import SeriesRules
from ctzoo.io.limits import DEFAULT_LIMITS, LimitExceeded, ResourceLimits
from ctzoo.io.privacy import patient_hash
from ctzoo.pacs.core import NOT_ACCEPTED, BadSeries, SeriesWorker, ensure_room, limits_in_config_terms, series_tag
from ctzoo.pacs.ledger import Job, JobState, Ledger
from ctzoo.pacs.orthanc import FILTERED_OUT, STORED_STATUSES, OrthancClient, OrthancError, OrthancUnavailable, _safe_id

__all__ = ["OrthancWatcher", "series_tag"]

log = logging.getLogger(__name__)
SOURCE_PREFIX = "orthanc:"
#: The most settling series whose stability one poll asks Orthanc about (one GET each).
MAX_SETTLING_CHECKS = 100
#: The reason of a series skipped for too few instances (``{count}``, ``{minimum}``); such a series is reconsidered.
TOO_FEW = "{count} instances, fewer than {minimum}"
#: The reason of a DONE job made PENDING again because its series has more instances now.
GREW = "the series has {count} instances, its results were made from {before}: processed again"
#: The states of a job that will not change by itself: a series announced stable again is not looked at again.
ENDED = (JobState.DONE, JobState.SKIPPED, JobState.PARKED)


def _tag_int(tags: dict, name: str, default: int) -> int:
    """An integer tag of Orthanc's simplified tags (strings such as ``"512"``); ``default`` when absent or odd."""
    try:
        return int(float(str(tags[name]).split("\\")[0]))
    except (KeyError, TypeError, ValueError):
        return default


def declared_shape(instances: int, tags: dict) -> tuple[int, int, int]:
    """(frames in all, Rows, Columns) of a series of ``instances`` whose instances have ``tags`` (NumberOfFrames
    1 when absent, as in a CT series of single-frame instances)."""
    return instances * max(_tag_int(tags, "NumberOfFrames", 1), 1), _tag_int(tags, "Rows", 0), \
        _tag_int(tags, "Columns", 0)


class OrthancWatcher(SeriesWorker):
    """Discover stable series in Orthanc, run ``tasks`` on each CT series once, send SR/SEG back."""

    unavailable = (OrthancUnavailable,)
    discover_reaches_far_end = True  # it reads Orthanc's changes

    def __init__(self, client: OrthancClient, ledger: Ledger, tasks: list[ModelTask], rules: SeriesRules,
                 work_dir: str | Path, worker: str, salt: str, limits: ResourceLimits = DEFAULT_LIMITS,
                 perf=None, decoder: str | None = None, min_free_mb: float = 0.0,
                 start_from: Literal["beginning", "now"] = "beginning", stable_age_s: float = 60.0) -> None:
        super().__init__(ledger, tasks, rules, work_dir, worker, limits, perf, decoder)
        self.client, self.salt = client, salt
        self.stable_age_s = stable_age_s  # Orthanc's StableAge (see _quiet_since)
        self.min_free_bytes = int(min_free_mb * 2**20)
        self.start_from = start_from  # where a watcher with no saved sequence number starts: 0, or Orthanc's last
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
        body = self.client._object("GET", f"/studies/{_safe_id(study)}")
        return str(body.get("PatientMainDicomTags", {}).get("PatientID", ""))

    def _start_seq(self) -> int:
        """The sequence number to read changes after: the saved one; for a first start, 0 or (``start_from: now``)
        Orthanc's last change; 0 again, with a warning, when the saved one is beyond Orthanc's last change (its
        database was recreated: the ledger makes the re-discovery of what it had harmless)."""
        if self.client.url not in self._state():
            if self.start_from == "now":
                self._save(self.client.last_change(), [])
                log.warning("first start: changes in Orthanc from now on are watched, not the series it holds already "
                            "(start_from: now)")
            return self.last_seq
        seq = self.last_seq
        if seq > 0 and (last := self.client.last_change()) < seq:
            log.warning("Orthanc's last change is %d, before the %d saved here: its database was recreated; reading "
                        "its changes from 0 again", last, seq)
            self._save(0, [])
            return 0
        return seq

    def discover(self) -> int:
        """Enqueue the series of new ``StableSeries`` changes, and the settling series Orthanc now calls stable
        (see the module docstring); returns how many jobs were recorded, or made due again."""
        added, seq = 0, self._start_seq()
        settling = self.settling
        for series_id, change, seq in self.client.series_changes(seq):
            if series_id in settling:
                settling.remove(series_id)
            if change == "NewSeries":
                settling.append(series_id)
            else:
                new, settled = self._discover_one(series_id)
                added += new
                if not settled:
                    settling.append(series_id)
            self._save(seq, settling)
        orthanc_now = ""  # asked once a poll, when a settling series says IsStable
        for series_id in settling[:MAX_SETTLING_CHECKS]:  # a copy: the list shrinks as series are recorded
            info = self._series_info(series_id)
            if info is not None:
                if info.get("IsStable") and orthanc_now == "":
                    orthanc_now = self._orthanc_now()
                if not info.get("IsStable") or not self._quiet_since(info, orthanc_now):
                    continue  # still receiving: its StableSeries change, or a later check, will record it
                new, settled = self._discover_one(series_id, info)
                added += new
                if not settled:
                    continue
            settling.remove(series_id)
            self._save(seq, settling)
        return added

    def _orthanc_now(self) -> str | None:
        """Orthanc's clock; None where it does not tell (a proxy or an authorization plugin refusing /tools/now)."""
        try:
            return self.client.now()
        except OrthancUnavailable:
            raise
        except OrthancError as exc:
            log.debug("no clock from Orthanc (%s): a settling series is recorded once IsStable", exc)
            return None

    def _quiet_since(self, info: dict, orthanc_now: str | None) -> bool:
        """True once the series' last instance (``LastUpdate``) is ``stable_age_s`` old by Orthanc's clock; True
        when either is unknown or odd (``IsStable`` alone decides then)."""
        try:
            quiet = datetime.strptime(orthanc_now, "%Y%m%dT%H%M%S") - \
                datetime.strptime(str(info["LastUpdate"]), "%Y%m%dT%H%M%S")
        except (KeyError, TypeError, ValueError):
            return True
        return quiet.total_seconds() >= self.stable_age_s

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

    def _discover_one(self, series_id: str, info: dict | None = None) -> tuple[int, bool]:
        """Record a series Orthanc calls stable: (jobs recorded or made due again, whether it is settled; not while
        its job is in hand, see the module docstring)."""
        source = SOURCE_PREFIX + series_id
        info = info or self._series_info(series_id)
        if info is None:
            return 0, True
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
            return 0, True
        count = len(info.get("Instances", []))
        if count < self.rules.min_slices:
            reason = TOO_FEW.format(count=count, minimum=self.rules.min_slices)
            self.ledger.skip(uid, source, reason)
            log.info("series %s skipped: %s", series_tag(uid), reason)
            return 0, True
        known = self.ledger.job(uid)
        if known is None:
            phash = patient_hash(pid, self.salt) if (pid := self._patient_id(info)) else ""
            if self.ledger.enqueue(uid, source, phash):
                log.info("series %s enqueued", series_tag(uid))
                return 1, True
            return 0, True  # another watcher recorded it in between
        return self._stable_again(known, count, info)

    def _stable_again(self, job: Job, count: int, info: dict) -> tuple[int, bool]:
        """A series the ledger knows is announced stable again, with ``count`` instances (see
        :meth:`_discover_one`)."""
        tag = series_tag(job.series_uid)
        if job.state is JobState.SKIPPED:
            phash = patient_hash(pid, self.salt) if (pid := self._patient_id(info)) else ""
            if self.ledger.unskip(job.series_uid, TOO_FEW.format(count="%", minimum="%"), phash):  # arriving then
                log.info("series %s: skipped with too few instances, now stable with %d: enqueued again", tag, count)
                return 1, True
            return 0, True
        if job.state is JobState.DONE and 0 < job.instances < count and \
                self.ledger.rerun(job.series_uid, count, GREW.format(count=count, before=job.instances)):
            log.warning("series %s: %d instances now, its results were made from %d: processing it again (the "
                        "earlier results stay in Orthanc)", tag, count, job.instances)
            return 1, True
        return 0, job.state in ENDED

    # -- the way in and out -------------------------------------------------------------------------------
    def fetch(self, job: Job, folder: Path) -> None:
        if not job.source.startswith(SOURCE_PREFIX):
            raise BadSeries(f"not an Orthanc job: {job.source}")
        series_id = _safe_id(job.source[len(SOURCE_PREFIX):])
        instances = self.client.series_instances(series_id)
        self._check_before_download(series_id, instances)
        self.client.download_series(series_id, folder, instances)

    def _check_before_download(self, series_id: str, instances: list[str]) -> None:
        """What Orthanc says of the series' size, against ``limits`` (:class:`BadSeries`, as the check after
        reading would) and the work folder's free space (:func:`~ctzoo.pacs.core.ensure_room`)."""
        tags = self.client.series_shared_tags(series_id)
        if instances and not {"Rows", "Columns"} <= tags.keys():  # they differ between instances: ask one
            tags = {**self.client.instance_tags(instances[0]), **tags}
        try:
            self.limits.check_voxels(declared_shape(len(instances), tags), "the series")
        except LimitExceeded as exc:
            raise BadSeries(f"rejected before download: {limits_in_config_terms(str(exc))}") from None
        disk_size = _tag_int(self.client.series_statistics(series_id), "DiskSize", 0)
        ensure_room(self.work_dir, disk_size, self.min_free_bytes, "orthanc.min_free_mb")

    def deliver(self, paths: list[Path]) -> list[str]:
        return [self._upload_status(path, self.client.upload(path)) for path in paths]

    @staticmethod
    def _upload_status(path: Path, answer: dict) -> str:
        """``Success``/``AlreadyStored``: delivered; ``FilteredOut`` (Orthanc's ReceivedInstanceFilter refused it):
        :data:`~ctzoo.pacs.core.NOT_ACCEPTED`; anything else raises :class:`OrthancError`."""
        status = str(answer.get("Status", ""))
        if status in STORED_STATUSES:
            return status
        if status == FILTERED_OUT:
            sop_class = pydicom.dcmread(path, stop_before_pixels=True).SOPClassUID.name
            return f"{NOT_ACCEPTED}: {sop_class} (Orthanc's filter: {FILTERED_OUT})"
        raise OrthancError(f"Orthanc answered Status {status[:40]!r} to POST /instances, not one of "
                           f"{', '.join(STORED_STATUSES)}", 200, "/instances")

    def describe_error(self, exc: BaseException) -> str:
        """An Orthanc error names the request and the HTTP status only: said whole; refused credentials called so."""
        if isinstance(exc, OrthancError) and exc.status in (401, 403):
            return f"Orthanc refused the credentials ({exc})"
        if isinstance(exc, OrthancError):
            return str(exc)
        return super().describe_error(exc)

    @property
    def last_upload_statuses(self) -> list[str]:
        """Orthanc's ``Status`` answers of the last job's uploads (``Success`` / ``AlreadyStored``)."""
        return self.last_delivery
