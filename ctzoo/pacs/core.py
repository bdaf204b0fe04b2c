"""The processing core of the PACS bridge, shared by its two ways in (Orthanc watcher, DICOM listener).

A way in knows how to *fetch* a job's series into a folder and how to *deliver* result files; everything
between is here: :class:`SeriesWorker` claims a job from the ledger (:mod:`ctzoo.pacs.ledger`),
fetches the series into a private temporary folder, reads and decodes it once (:func:`check_series`), runs
every model task on that volume (:func:`run_models`: no model reads the files again), delivers
``sr.dcm``/``seg.dcm`` and completes the job with their SOP Instance UIDs. While a job runs, a heartbeat
thread extends its lease, so a long model run keeps the job while a worker killed with SIGKILL loses it after
``lease_s``. With a :class:`~ctzoo.perf.PerfMonitor` (``perf``), every stage of every job is timed and judged
(:mod:`ctzoo.pacs.job_events`).

Outcomes of a job:

* bad data (unreadable or corrupt instance, no series passing the rules once the files are read, NaN
  voxels): the job is SKIPPED with the reason, since retrying cannot help;
* the series not (all) here (:class:`SeriesNotHere`: a listener job requeued after its instances were removed, or
  whose instances are still arriving): WAITING, no attempt used, until the way in wakes it;
* the far end unreachable (a subclass's ``unavailable`` errors: Orthanc down, destination AE refusing
  the association) or the disk full (ENOSPC): WAITING (:meth:`~ctzoo.pacs.ledger.Ledger.wait`: no attempt used,
  retried after a backoff capped at ``max_wait_s``, however long the outage), and an unreachable far end's error
  goes up so the loop waits; once a delivery succeeds after an outage, every waiting job is made due at once;
* a result the far end does not accept at all (a destination AE without the SEG storage SOP class): the others
  are delivered, the job is DONE with its reason naming what was not (:data:`NOT_ACCEPTED`);
* anything else (a refusal, a model error): ``fail``, retried, PARKED after ``max_attempts``.

Each process works in a folder of its own under ``work_dir`` (:class:`ctzoo.pacs.work_folder.WorkFolder`:
what a killed process left there, its series with patient data, is removed when the next one starts). The results
of a job that ran its models but could not deliver them wait in its ``outbox/<job id>``: the job's next attempt
in this process only sends them again (the models do not run again for each retry of an outage). They are removed
once the job is DONE, SKIPPED or PARKED (or with the process's folder).

Result UIDs are deterministic (source series, model version, findings and the number of instances they were made
from: :mod:`ctzoo.pacs.result_identity`), so a job re-run after a crash between delivery and ``complete`` re-sends
the same objects, which a PACS stores once, while one run again on a series that has more instances since
(:meth:`~ctzoo.pacs.ledger.Ledger.rerun`) gets results of their own. A job completes with that instance count.
Logs name a series by a short hash of its SeriesInstanceUID only, never by patient data.
"""

from __future__ import annotations

import errno
import hashlib
import logging
import os
import re
import shutil
import tempfile
import threading
import time
from pathlib import Path

import numpy as np
import pydicom

from ctzoo.inference.inputs import CaseInput
from ctzoo.inference.pipeline import PipelineOptions, axial_slices, run_pipeline
from ctzoo.inference.tasks import ModelTask
from ctzoo.io.dicom_scan import DicomError, SeriesRules
from ctzoo.io.limits import DEFAULT_LIMITS, ResourceLimits
from ctzoo.pacs.job_events import JobEvents, instance_count
from ctzoo.pacs.ledger import Job, JobState, LeaseLost, Ledger
from ctzoo.pacs.result_identity import bind_to_instances
from ctzoo.pacs.work_folder import WorkFolder

__all__ = ["BadSeries", "SeriesNotHere", "SeriesWorker", "check_series", "ensure_room", "run_models", "series_tag"]

log = logging.getLogger(__name__)
RESULT_FILES = ("sr.dcm", "seg.dcm")
#: How a way in's ``deliver`` marks a result the far end does not take at all (``"not accepted: <SOP class>"``):
#: the others are delivered and the job is DONE, with a note naming what was not (a retry cannot change it).
NOT_ACCEPTED = "not accepted"
CASE = "series"


class BadSeries(ValueError):
    """The series cannot be processed whatever the retries (recorded SKIPPED with the reason)."""


class SeriesNotHere(Exception):
    """The job's series is not (all) here yet: its instances are gone, or still arriving. The job WAITS, using no
    attempt, until its way in makes it due again (:meth:`~ctzoo.pacs.ledger.Ledger.wake`) or for ``max_wait_s``."""


def series_tag(series_uid: str) -> str:
    """A short, non-identifying name of a series for logs."""
    return hashlib.sha256(series_uid.encode()).hexdigest()[:10]


def limits_in_config_terms(text: str) -> str:
    """A limit's message as the bridge's config says it: ``--max-volume-voxels`` (the option of ``ctzoo infer``, which
    :class:`~ctzoo.io.limits.LimitExceeded` names) becomes ``limits.max_volume_voxels``."""
    return re.sub(r"--(max(?:-[a-z]+)+)", lambda found: "limits." + found.group(1).replace("-", "_"), text)


def ensure_room(folder: Path, needed_bytes: int, keep_free_bytes: int, setting: str) -> None:
    """Room on ``folder``'s file system for ``needed_bytes`` while keeping ``keep_free_bytes`` free (``setting``
    names that in the config): ENOSPC (the job waits for space) when not now, :class:`BadSeries` when never."""
    usage = shutil.disk_usage(folder)
    mib = 2**20
    if needed_bytes + keep_free_bytes > usage.total:
        raise BadSeries(f"too large for this disk: the series takes {needed_bytes / mib:,.0f} MiB, the work folder's "
                        f"file system holds {usage.total / mib:,.0f} MiB in all, {keep_free_bytes / mib:,.0f} MiB "
                        f"of it kept free ({setting})")
    if usage.free - needed_bytes < keep_free_bytes:
        raise OSError(errno.ENOSPC, f"the series takes {needed_bytes / mib:,.0f} MiB, {usage.free / mib:,.0f} MiB "
                                    f"are free and {keep_free_bytes / mib:,.0f} MiB kept free ({setting})")


def check_series(folder: Path, rules: SeriesRules, limits: ResourceLimits = DEFAULT_LIMITS,
                 decoder: str | None = None):
    """The series in ``folder`` read as the models take it (every slice decoded, JPEG 2000 by ``decoder``: None
    for GDCM, ``nvimgcodec:DEVICE``; a :class:`~ctzoo.io.Volume`); :class:`BadSeries` if it cannot be.

    Reading once before any model runs is what tells "this series is damaged" (skip it) from "a model
    failed" (retry): a corrupt instance, a series the rules reject or NaN voxels are the data's fault.
    """
    from ctzoo.io import read_volume

    try:
        volume = read_volume(folder, rules=rules, progress=False, limits=limits, decoder=decoder)
    except (DicomError, ValueError, OSError) as exc:
        text = limits_in_config_terms(" ".join(str(exc).replace(str(folder), "<series>").split()))
        raise BadSeries(f"rejected after reading: {text[:300]}") from None
    if not np.isfinite(volume.array).all():
        raise BadSeries("rejected after reading: NaN or infinite voxels")
    return volume


def run_models(folder: Path, tasks: list[ModelTask], rules: SeriesRules, out: Path,
               after_each=lambda: None, volume=None, perf=None) -> list[Path]:
    """Run every task on the series in ``folder`` (``volume``: that series already read, as
    :func:`check_series` returns it, so that it is decoded once for all models); the result DICOM files written
    under ``out`` (SR, SEG).

    ``after_each`` is called after each model (the watcher checks its lease there); ``perf``, a
    :class:`~ctzoo.perf.PerfMonitor`, times each model's pipeline stages. A model that fails raises
    ``RuntimeError`` naming it."""
    case, rows = CaseInput(CASE, folder, volume), []
    for task in tasks:
        options = PipelineOptions(out=out, workers=0, overlay=False, progress=False, rules=rules, perf=perf)
        new = run_pipeline([case], task, options, other_rows=rows)
        for row in new:
            if row.get("status") != "ok" or row.get("dicom_error"):  # the bridge delivers DICOM results only
                raise RuntimeError(f"{task.model_name}: {row.get('error') or row.get('dicom_error') or 'failed'}")
        rows += new
        after_each()
    return [out / CASE / name for name in RESULT_FILES if (out / CASE / name).exists()]


class _Heartbeat:
    """Extend a job's lease every ``every_s`` from a thread while the job runs; ``lost`` once it is gone."""

    def __init__(self, ledger: Ledger, job: Job, worker: str, every_s: float) -> None:
        self.ledger, self.job, self.worker, self.every_s = ledger, job, worker, every_s
        self.lost = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{job.id}", daemon=True)

    def _run(self) -> None:
        while not self._stop.wait(self.every_s):
            try:
                self.ledger.heartbeat(self.job.id, self.worker)
            except LeaseLost:
                self.lost.set()
                return
            except Exception as exc:  # a busy database: try again at the next beat
                log.warning("heartbeat failed: %s", type(exc).__name__)

    def check(self) -> None:
        if self.lost.is_set():
            raise LeaseLost(f"job {self.job.id} was taken over")

    def __enter__(self) -> _Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


class _Repeated:
    """A line the loop would say at every poll (the same error again): said when it first comes or changes, then
    once a minute."""

    def __init__(self, every_s: float = 60) -> None:
        self.every_s, self._last, self._said = every_s, "", 0.0

    def say(self, line: str) -> None:
        now = time.monotonic()
        if line != self._last or now - self._said >= self.every_s:
            self._last, self._said = line, now
            log.error("%s", line)

    def clear(self) -> None:
        self._last = ""


class _Outage:
    """Whether the far end is down and since when. Said when it starts, then once a minute, and when the far end
    answers again (not at every poll)."""

    def __init__(self) -> None:
        self.since: float | None = None
        self._said = 0.0

    def down(self, exc: BaseException, poll_s: float) -> None:
        now = time.monotonic()
        if self.since is None or now - self._said >= 60:
            self.since, self._said = self.since or now, now
            log.warning("%s; retrying every %.3g s", " ".join(str(exc).split())[:200], poll_s)

    def answered(self) -> bool:
        """The far end did what was asked of it: an outage, if any, is over. True if one was."""
        if self.since is None:
            return False
        log.warning("reachable again after %.0f s", time.monotonic() - self.since)
        self.since = None
        return True


def _disk_full(exc: BaseException) -> bool:
    """ENOSPC: raised as such (fetching, keeping results), or in the message of a model that failed to write its
    results (the pipeline records a case's error as text)."""
    return (isinstance(exc, OSError) and exc.errno == errno.ENOSPC) or os.strerror(errno.ENOSPC) in str(exc)


class SeriesWorker:
    """Claim, fetch, check, run, deliver, complete: one job at a time. Subclasses say how to fetch and deliver.

    ``unavailable`` lists the exception types meaning "the far end is down, retry later"; they are recorded
    as a failure (with backoff) and re-raised so the caller's loop waits before polling again.
    ``discover_reaches_far_end`` says whether :meth:`discover` asks the far end (Orthanc's changes) or only
    looks at what is here (the listener's spool): only an answer from the far end ends an outage.
    """

    unavailable: tuple[type[BaseException], ...] = ()
    discover_reaches_far_end = False

    def __init__(self, ledger: Ledger, tasks: list[ModelTask], rules: SeriesRules, work_dir: str | Path,
                 worker: str, limits: ResourceLimits = DEFAULT_LIMITS, perf=None, decoder: str | None = None) -> None:
        if not tasks:
            raise ValueError("no model tasks")
        self.ledger, self.tasks, self.rules, self.worker = ledger, list(tasks), rules, worker
        self.limits = limits
        self.decoder = decoder  # how JPEG 2000 series are decoded (check_series), as the config's decode resolved
        self.perf = perf  # a ctzoo.perf.PerfMonitor timing every job's stages (ctzoo.pacs.job_events), or None
        # this process's own folder under work_dir; what killed processes left there is removed first
        self._work = WorkFolder(work_dir)
        self.work_dir = self._work.path
        #: What the far end answered to each result of the last job (e.g. Orthanc's ``Success``/``AlreadyStored``).
        self.last_delivery: list[str] = []
        self._outage = _Outage()
        self._waits = 0  # jobs that had to wait in a row (the far end down, the disk full): their backoff grows
        self._said_not_accepted: set[str] = set()
        self._made_from: dict[int, int] = {}  # per job with results in its outbox: the instances they were made from
        self._loop_error = _Repeated()

    def close(self) -> None:
        """Remove this process's work folder (results still waiting for their delivery included: a restart
        makes them again)."""
        self._work.close()

    # -- what a way in provides ---------------------------------------------------------------------------
    def discover(self) -> int:
        """Record new series in the ledger; how many new jobs."""
        raise NotImplementedError

    def fetch(self, job: Job, folder: Path) -> None:
        """Put the job's DICOM files into ``folder``."""
        raise NotImplementedError

    def deliver(self, paths: list[Path]) -> list[str]:
        """Send the result files; one status string per file."""
        raise NotImplementedError

    def finished(self, job: Job, state: JobState) -> None:
        """Called once a job is DONE or SKIPPED (e.g. to free the received files)."""

    def describe_error(self, exc: BaseException) -> str:
        """What the loop logs of an unexpected error: its type only, since a message may hold patient data; a way in
        whose errors name no such data (Orthanc's: the request and the HTTP status) says more."""
        return type(exc).__name__

    def fetch_timed(self, job: Job, folder: Path, events: JobEvents) -> None:
        """:meth:`fetch`, timed as the stage ``download``; a way in whose series arrived before its job was
        claimed times that instead (the listener's ``receive``)."""
        with events.stage("download"):
            self.fetch(job, folder)
            events.slices = instance_count(folder)

    # -- the core -----------------------------------------------------------------------------------------
    def process_one(self) -> bool:
        """Claim and process one job; False when no job is due."""
        job = self.ledger.claim(self.worker)
        if job is None:
            return False
        tag = series_tag(job.series_uid)
        log.info("series %s: attempt %d", tag, job.attempts)
        events = JobEvents(self.perf, job, self.worker)
        try:
            with _Heartbeat(self.ledger, job, self.worker, every_s=max(self.ledger.lease_s / 3, 0.05)) as beat:
                uids, note, instances = self._process(job, beat, events)
                beat.check()
        except self.unavailable as exc:
            self._wait(job, f"{type(exc).__name__}: {exc}"[:500])
            raise
        except SeriesNotHere as exc:
            self._wait(job, str(exc), delay_s=self.ledger.max_wait_s)
            log.info("series %s: %s", tag, exc)
            return True
        except BadSeries as exc:
            self._discard_results(job)
            if self._fail(job, str(exc)) is not None:
                self.ledger.skip(job.series_uid, job.source, str(exc))
                self.finished(job, JobState.SKIPPED)
            log.warning("series %s skipped: %s", tag, exc)
            return True
        except LeaseLost:
            self._discard_results(job)
            log.warning("series %s: lease lost, another worker has it", tag)
            return True
        except Exception as exc:  # one bad series never stops the worker
            if _disk_full(exc):
                delay = self._wait(job, f"disk full: {exc}"[:500])
                log.warning("series %s: the disk is full; waiting %.3g s", tag, delay)
                return True
            state = self._fail(job, f"{type(exc).__name__}: {exc}"[:500])
            if state is not JobState.FAILED:
                self._discard_results(job)
            log.warning("series %s failed (%s): %s", tag, state.value if state else "lease lost", type(exc).__name__)
            return True
        self._discard_results(job)
        try:
            self.ledger.complete(job.id, self.worker, uids, note, instances)
        except LeaseLost:
            log.warning("series %s: lease lost before completion; results were sent", tag)
            return True
        self.finished(job, JobState.DONE)
        events.record_job(models=len(self.tasks), results=len(uids))
        log.info("series %s done: %d result object(s)", tag, len(uids))
        return True

    def _fail(self, job: Job, reason: str) -> JobState | None:
        try:
            return self.ledger.fail(job.id, self.worker, reason)
        except LeaseLost:
            return None

    def _far_end_answered(self) -> None:
        self._waits = 0
        if self._outage.answered():
            self.ledger.wake()  # the jobs that waited for the far end need not wait out their backoff

    def _wait(self, job: Job, reason: str, delay_s: float | None = None) -> float:
        """The job waits for what held it up (no attempt used; after the outage backoff, or ``delay_s``); its
        results, if made, wait with it."""
        try:
            delay = self.ledger.wait(job.id, self.worker, reason, self._waits, delay_s)
        except LeaseLost:
            self._discard_results(job)
            return 0.0
        self._waits += delay_s is None
        return delay

    # -- the results of a job, kept until they are delivered ------------------------------------------------
    def _outbox(self, job: Job) -> Path:
        return self.work_dir / "outbox" / str(job.id)

    def _kept_results(self, job: Job) -> list[Path] | None:
        """The result files an earlier attempt of the job made and could not deliver; None if there are none."""
        outbox = self._outbox(job)
        names = [name for name in RESULT_FILES if (outbox / name).is_file()]
        return [outbox / name for name in names] if names else None

    def _keep_results(self, job: Job, paths: list[Path]) -> list[Path]:
        outbox = self._outbox(job)
        outbox.parent.mkdir(mode=0o700, exist_ok=True)  # results name the patient: this user's only
        outbox.mkdir(mode=0o700, exist_ok=True)
        kept = []
        for path in paths:
            os.chmod(path, 0o600)
            os.replace(path, outbox / path.name)
            kept.append(outbox / path.name)
        return kept

    def _discard_results(self, job: Job) -> None:
        self._made_from.pop(job.id, None)
        outbox = self._outbox(job)
        shutil.rmtree(outbox, ignore_errors=True)
        try:
            outbox.parent.rmdir()  # the last one: the work folder is empty again between jobs
        except OSError:
            pass

    # -- one attempt --------------------------------------------------------------------------------------
    def _process(self, job: Job, beat: _Heartbeat, events: JobEvents) -> tuple[list[str], str, int]:
        """One attempt: the UIDs of the results delivered, what was not (see :data:`NOT_ACCEPTED`), and the
        instances of the series they were made from."""
        paths = self._kept_results(job)
        if paths is None:
            paths = self._make_results(job, beat, events)
        else:
            log.debug("series %s: sending the results made by an earlier attempt", series_tag(job.series_uid))
        with events.stage("upload", files=len(paths), bytes=sum(path.stat().st_size for path in paths)):
            self.last_delivery = self.deliver(paths)
        self._far_end_answered()
        delivered = [p for p, status in zip(paths, self.last_delivery) if not status.startswith(NOT_ACCEPTED)]
        return ([str(pydicom.dcmread(p, stop_before_pixels=True).SOPInstanceUID) for p in delivered],
                self._not_delivered(self.last_delivery), self._made_from.get(job.id, 0))

    def _not_delivered(self, statuses: list[str]) -> str:
        """The job's note on the results the far end does not take (logged once a kind of result, not per job)."""
        refused = [status[len(NOT_ACCEPTED):].strip(": ") for status in statuses if status.startswith(NOT_ACCEPTED)]
        for sop_class in sorted(set(refused) - self._said_not_accepted):
            self._said_not_accepted.add(sop_class)
            log.warning("the far end does not accept %s objects: those results are not delivered (the job is DONE "
                        "with the others, its reason says so)", sop_class)
        return f"not delivered, not accepted by the far end: {', '.join(dict.fromkeys(refused))}" if refused else ""

    def _make_results(self, job: Job, beat: _Heartbeat, events: JobEvents) -> list[Path]:
        """Fetch, check and run the models on the job's series; the result files, kept in its outbox."""
        folder = Path(tempfile.mkdtemp(prefix="job-", dir=self.work_dir))
        try:
            data, out = folder / "dicom", folder / "out"
            events.name_series(data)
            self.fetch_timed(job, data, events)
            instances = instance_count(data)
            beat.check()
            with events.stage("check"):
                volume = check_series(data, self.rules, self.limits, self.decoder)
            events.slices = axial_slices(volume)
            paths = run_models(data, self.tasks, self.rules, out, after_each=beat.check, volume=volume,
                               perf=self.perf)
            kept = self._keep_results(job, bind_to_instances(paths, instances))
            self._made_from[job.id] = instances
            return kept
        finally:
            shutil.rmtree(folder, ignore_errors=True)

    # -- the loop -----------------------------------------------------------------------------------------
    def run(self, poll_s: float = 2.0, stop: threading.Event | None = None) -> None:
        """Discover and process until ``stop`` is set; waits ``poll_s`` when idle or when the far end is down.

        An outage is logged when it starts, then once a minute, and when the far end answers again: a delivery,
        or a discovery that asked it (not a scan of a local spool, which succeeds while the far end is down)."""
        stop = stop or threading.Event()
        while not stop.is_set():
            try:
                self.discover()
                if self.discover_reaches_far_end:
                    self._far_end_answered()
                while not stop.is_set() and self.process_one():
                    pass
                self._loop_error.clear()
            except self.unavailable as exc:
                self._outage.down(exc, poll_s)
            except Exception as exc:  # never crash the loop
                self._loop_error.say(f"{type(self).__name__} error: {self.describe_error(exc)}")
            stop.wait(poll_s)
