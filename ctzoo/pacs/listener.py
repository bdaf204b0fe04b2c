"""The DICOM listener of the PACS bridge: a C-STORE SCP in, zoo models, DICOM SR/SEG out by C-STORE.

Any modality or PACS can send to it (pynetdicom). Every received instance is written to a spool folder
before the sender is told "success" (atomically: temporary name, then rename), grouped by series::

    SPOOL/<hash of SeriesInstanceUID>/series.json        uid, modality, salted patient hash (never the id)
    SPOOL/<hash of SeriesInstanceUID>/<hash of SOP UID>.dcm   the instance as sent (no re-encoding)

A series is *stable* once its folder has not changed for ``stable_s`` seconds (the folder's mtime, so a
restart loses nothing: whatever was acknowledged is on disk). A series one of whose instances was refused for lack
of disk (``min_free_mb``, status 0xA700: the sender keeps it and sends it again) is *held* until that instance has
been stored: each refusal leaves ``<hash of SOP UID>.refused`` in its folder (and in memory, should even that write
fail), removed when the instance arrives, so the part that did arrive is never taken for the whole series, across
restarts too. :meth:`DicomListener.discover` records stable
series in the job ledger (``source="dicom:<hash>"``) or SKIPs them with the reason (modality not accepted,
too few instances); processing is :class:`ctzoo.pacs.core.SeriesWorker`'s, and the results go to the
destination AE by C-STORE (:func:`send_files`). The instances a job took are removed from the spool once it is
DONE or SKIPPED; those that arrived while it ran stay, and the next discovery drops them with a log line, as it
drops instances of a processed series that arrive later (a re-run would add a second result set, with other UIDs,
beside the first: send the series again under a new SeriesInstanceUID to have it processed again).

A job whose instances are not all here when it is claimed WAITS instead of failing
(:class:`~ctzoo.pacs.core.SeriesNotHere`): one requeued by ``ctzoo pacs retry`` after it was skipped or done (its
instances were removed then) waits for the series to be sent again, one whose series is still arriving waits for
the rest; discovery makes it due as soon as instances came since it began to wait and the series is stable.

With a :class:`~ctzoo.perf.PerfMonitor` (``perf``) the listener keeps, per series, how long the associations took
to deliver its instances (:class:`ctzoo.pacs.job_events.ReceiveTimes`), recorded as the job's ``receive`` stage.

Only the calling AE titles in ``allowed_calling_aets`` may associate, calling our own AE title (pynetdicom
rejects the others), and the listener binds to loopback unless told otherwise. An instance whose header declares
more pixels than ``limits.max_volume_voxels`` is refused with 0xC000 (cannot understand): a failure the sender
does not retry, unlike 0xA700 (out of resources), which is kept for a full disk.
"""

from __future__ import annotations

import errno
import hashlib
import json
import logging
import os
import shutil
import stat
import time
from dataclasses import dataclass
from pathlib import Path

import pydicom
from pydicom.uid import ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import Verification

from ctzoo.inference.tasks import ModelTask
from ctzoo.io.dicom_scan import SeriesRules
from ctzoo.io.limits import DEFAULT_LIMITS, LimitExceeded, ResourceLimits
from ctzoo.io.privacy import patient_hash
from ctzoo.pacs.core import NOT_ACCEPTED, BadSeries, SeriesNotHere, SeriesWorker, limits_in_config_terms, series_tag
from ctzoo.pacs.job_events import JobEvents, ReceiveTimes, instance_count
from ctzoo.pacs.ledger import Job, JobState, Ledger
from ctzoo.pacs.work_folder import write_private

__all__ = ["AEAddress", "DestinationRefused", "DestinationUnavailable", "DicomListener", "SpoolUnwritable",
           "association_failure", "awaits_resend", "send_files"]

log = logging.getLogger(__name__)
SOURCE_PREFIX = "dicom:"
SERIES_FILE = "series.json"
GONE = "waiting for the series to be sent again: its instances are no longer in the spool"
#: The suffix of the marker a store refused for lack of disk leaves in its series' folder (see the module docstring).
REFUSED_SUFFIX = ".refused"
# C-STORE status codes (PS3.4 Annex B.2.3)
STATUS_SUCCESS, STATUS_OUT_OF_RESOURCES, STATUS_CANNOT_UNDERSTAND = 0x0000, 0xA700, 0xC000
WARNING_STATUSES = {0x0001, 0xB000, 0xB006, 0xB007}


class DestinationUnavailable(ConnectionError):
    """The destination AE could not be reached, dropped the association or rejected it for now: retry later."""


class DestinationRefused(RuntimeError):
    """The destination AE rejected the association for good (it does not know an AE title): a failure of the job,
    retried and then PARKED, not an outage to wait out."""


class SpoolUnwritable(RuntimeError):
    """The spool folder cannot be made or written: the listener must not start."""


@dataclass(frozen=True)
class AEAddress:
    """A DICOM application entity: AE title, host, port."""

    ae_title: str
    host: str
    port: int

    def __str__(self) -> str:
        return f"{self.ae_title}@{self.host}:{self.port}"


def _uid_hash(uid: str) -> str:
    return hashlib.sha256(uid.encode()).hexdigest()[:32]


def association_failure(assoc, destination: AEAddress, calling_ae_title: str) -> tuple[str, bool]:
    """Why an association with ``destination`` (that we called as ``calling_ae_title``) was not established, as
    what follows "association with X" (``failed: ...``, ``rejected for good: ...``), and whether for good. A
    rejection says so in its A-ASSOCIATE-RJ: its result (permanent or transient) and diagnostic (the AE title it
    does not know, named here); a connection that failed or was dropped is not for good."""
    primitive = getattr(assoc.acceptor, "primitive", None)
    if not assoc.is_rejected or primitive is None:
        return "failed: nothing listens there, or it dropped the connection", False
    permanent = primitive.result == 0x01
    if (primitive.result_source, primitive.diagnostic) == (1, 7):
        reason = f"called AE title {destination.ae_title} not recognised"
    elif (primitive.result_source, primitive.diagnostic) == (1, 3):
        reason = f"calling AE title {calling_ae_title} (ours) not recognised"
    else:
        reason = primitive.reason_str.lower()
    return f"rejected {'for good' if permanent else 'for now'}: {reason}", permanent


def send_files(paths: list[Path], destination: AEAddress, calling_ae_title: str, timeout_s: float = 30) -> list[str]:
    """C-STORE ``paths`` to ``destination`` in one association; one status string per file.

    A file whose SOP class the destination did not accept in the association is not sent: its status is
    ``"not accepted: <SOP class name>"`` (:data:`~ctzoo.pacs.core.NOT_ACCEPTED`). Raises
    :class:`DestinationUnavailable` when no association can be made, the destination rejects it for now or it
    breaks; :class:`DestinationRefused` when the destination rejects it for good; ``RuntimeError`` naming the
    object when the destination refuses one (a failure status), or when it accepts none of the SOP classes."""
    datasets = [pydicom.dcmread(p) for p in paths]
    if not datasets:
        return []
    ae = AE(ae_title=calling_ae_title)
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = timeout_s
    # one presentation context per (SOP class, transfer syntax) sent, since the peer accepts one syntax per
    # context; the uncompressed ones too, so a peer without the file's syntax can still take it
    pairs = {(str(ds.SOPClassUID), str(ds.file_meta.TransferSyntaxUID)) for ds in datasets}
    for sop_class, syntax in sorted(pairs):
        ae.add_requested_context(sop_class, syntax)
    for sop_class in sorted({sop for sop, _ in pairs}):
        ae.add_requested_context(sop_class, [ExplicitVRLittleEndian, ImplicitVRLittleEndian])
    assoc = ae.associate(destination.host, destination.port, ae_title=destination.ae_title)
    if not assoc.is_established:
        if assoc.rejected_contexts and not assoc.accepted_contexts:  # it answered, and takes none of them
            raise RuntimeError(f"{destination} accepts none of the SOP classes of the results: "
                               f"{', '.join(sorted({ds.SOPClassUID.name for ds in datasets}))}")
        why, permanent = association_failure(assoc, destination, calling_ae_title)
        raise (DestinationRefused if permanent else DestinationUnavailable)(f"association with {destination} {why}")
    statuses = []
    try:
        accepted = {str(context.abstract_syntax) for context in assoc.accepted_contexts}
        for ds in datasets:
            if str(ds.SOPClassUID) not in accepted:
                statuses.append(f"{NOT_ACCEPTED}: {ds.SOPClassUID.name}")
                continue
            answer = assoc.send_c_store(ds)
            if "Status" not in answer:
                raise DestinationUnavailable(f"{destination} gave no answer to C-STORE (association lost)")
            code = int(answer.Status)
            if code == STATUS_SUCCESS:
                statuses.append("Success")
            elif code in WARNING_STATUSES:
                statuses.append(f"Warning 0x{code:04X}")
            else:
                raise RuntimeError(f"{destination} refused the {ds.SOPClassUID.name} object: status 0x{code:04X}")
    finally:
        if assoc.is_established:
            assoc.release()
    return statuses


class DicomListener(SeriesWorker):
    """Receive series by C-STORE on ``address``, run ``tasks`` on each CT series once, C-STORE SR/SEG to
    ``destination``. Call :meth:`start` (listen in background threads), then :meth:`run`; :meth:`stop` ends."""

    unavailable = (DestinationUnavailable,)

    def __init__(self, ledger: Ledger, tasks: list[ModelTask], rules: SeriesRules, spool_dir: str | Path,
                 work_dir: str | Path, worker: str, salt: str, address: AEAddress, destination: AEAddress,
                 allowed_calling_aets: list[str] | None, stable_s: float = 30.0, min_free_mb: float = 0.0,
                 limits: ResourceLimits = DEFAULT_LIMITS, perf=None, decoder: str | None = None) -> None:
        super().__init__(ledger, tasks, rules, work_dir, worker, limits, perf, decoder)
        if not salt:
            raise ValueError("a non-empty salt is required (patient ids are hashed with it)")
        if allowed_calling_aets is not None and not allowed_calling_aets:
            raise ValueError("allowed_calling_aets is empty: list the AE titles that may send, or pass None "
                             "to accept any")
        self.spool = Path(spool_dir)
        self._prepare_spool()
        self.salt, self.address, self.destination, self.stable_s = salt, address, destination, stable_s
        self.allowed_calling_aets = allowed_calling_aets
        self.min_free_bytes = int(min_free_mb * 2**20)
        self._server = None
        self.receive_times = ReceiveTimes()
        #: Per spool folder, the instances refused for lack of disk and not stored since (with the files
        #: ``*.refused``, which a full disk may have kept from being written).
        self._refused: dict[str, set[str]] = {}
        self._said_held: set[str] = set()
        self._fetched: dict[int, list[str]] = {}  # per job, the spooled instances its last fetch took

    def _prepare_spool(self) -> None:
        """Make the spool, 0700 (it holds patient data; one made before with other modes is made so too), and write
        and remove a file in it: :class:`SpoolUnwritable` if that fails, since a listener that can store nothing
        would refuse every instance while saying it is ready."""
        probe = self.spool / f".probe-{os.getpid()}"
        try:
            self.spool.mkdir(mode=0o700, parents=True, exist_ok=True)
            write_private(probe, b"")
            probe.unlink()
        except OSError as exc:
            raise SpoolUnwritable(f"cannot write the spool {self.spool}: {exc.strerror or type(exc).__name__}") \
                from None
        if stat.S_IMODE(self.spool.stat().st_mode) & 0o077:
            try:
                self.spool.chmod(0o700)
                log.warning("spool %s was open to other users: made 0700 (it holds patient data)", self.spool)
            except OSError as exc:
                log.warning("spool %s is open to other users and cannot be made 0700: %s", self.spool, exc.strerror)

    # -- receiving ----------------------------------------------------------------------------------------
    def start(self) -> None:
        """Listen for associations in background threads (C-STORE of any storage SOP class, C-ECHO)."""
        ae = AE(ae_title=self.address.ae_title)
        for context in AllStoragePresentationContexts:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)
        ae.add_supported_context(Verification)
        ae.maximum_associations = 16
        ae.require_called_aet = True  # an association meant for another AE title is not ours to take
        if self.allowed_calling_aets:
            ae.require_calling_aet = self.allowed_calling_aets
        self._server = ae.start_server((self.address.host, self.address.port), block=False,
                                       evt_handlers=[(evt.EVT_C_STORE, self._on_store)])
        log.info("DICOM listener %s ready", self.address)

    @property
    def port(self) -> int:
        """The port listened on (useful with port 0)."""
        return self._server.server_address[1] if self._server else self.address.port

    def stop(self) -> None:
        if self._server is not None:
            self._server.shutdown()
            self._server = None

    def _on_store(self, event) -> int:
        arrived = time.time()
        try:
            ds = event.dataset
            series_uid, sop_uid = str(ds.SeriesInstanceUID), str(ds.SOPInstanceUID)
            modality, patient_id = str(ds.get("Modality", "")), str(ds.get("PatientID", ""))
        except Exception as exc:  # an unreadable data set: tell the sender, keep listening
            log.warning("C-STORE refused: unreadable data set (%s)", type(exc).__name__)
            return STATUS_CANNOT_UNDERSTAND
        if not series_uid or not sop_uid:
            log.warning("C-STORE refused: no SeriesInstanceUID or SOPInstanceUID")
            return STATUS_CANNOT_UNDERSTAND
        try:  # the pixels the header declares, before anything is written or decoded
            frames = int(ds.get("NumberOfFrames") or 1)
            self.limits.check_voxels((frames, int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)), "an instance")
        except (LimitExceeded, TypeError, ValueError) as exc:  # not 0xA700: sending it again cannot help
            log.warning("C-STORE refused: %s", limits_in_config_terms(str(exc)) if isinstance(exc, LimitExceeded)
                        else "unreadable image size")
            return STATUS_CANNOT_UNDERSTAND
        folder, instance = self.spool / _uid_hash(series_uid), _uid_hash(sop_uid)
        try:
            payload = event.encoded_dataset()
            free = shutil.disk_usage(self.spool).free
            if free - len(payload) < self.min_free_bytes:  # keep the disk from filling: the sender retries later
                log.error("C-STORE refused: %.0f MB free on the spool's disk, %.0f MB are kept free (min_free_mb)",
                          free / 2**20, self.min_free_bytes / 2**20)
                self._hold(folder, instance)
                return STATUS_OUT_OF_RESOURCES
            folder.mkdir(mode=0o700, exist_ok=True)  # a series' instances: this user's only
            if not (folder / SERIES_FILE).exists():
                info = {"series_uid": series_uid, "modality": modality,
                        "patient_hash": patient_hash(patient_id, self.salt) if patient_id else ""}
                write_private(folder / SERIES_FILE, json.dumps(info).encode())
            write_private(folder / f"{instance}.dcm", payload)
        except OSError as exc:  # a full disk, or a spool made read-only: the sender keeps the instance, may retry
            log.error("C-STORE refused: cannot write the spool %s: %s", self.spool,
                      exc.strerror or type(exc).__name__)
            self._hold(folder, instance)
            return STATUS_OUT_OF_RESOURCES
        self._unhold(folder, instance)
        if self.perf is not None:
            self.receive_times.stored(folder.name, event.assoc, arrived, time.time(), len(payload))
        return STATUS_SUCCESS

    def _hold(self, folder: Path, instance: str) -> None:
        """Keep the series of a refused instance from being taken as complete until that instance is stored."""
        self._refused.setdefault(folder.name, set()).add(instance)
        try:
            folder.mkdir(mode=0o700, exist_ok=True)
            (folder / f"{instance}{REFUSED_SUFFIX}").touch()
        except OSError:  # the disk is that full: the hold in memory stands until a restart
            pass

    def _unhold(self, folder: Path, instance: str) -> None:
        self._refused.get(folder.name, set()).discard(instance)
        (folder / f"{instance}{REFUSED_SUFFIX}").unlink(missing_ok=True)

    def _refused_instances(self, folder: Path) -> int:
        """How many instances of the series were refused for lack of disk and not stored since."""
        on_disk = {path.name[:-len(REFUSED_SUFFIX)] for path in folder.glob(f"*{REFUSED_SUFFIX}")}
        return len(on_disk | self._refused.get(folder.name, set()))

    # -- discovery ----------------------------------------------------------------------------------------
    def discover(self) -> int:
        """Record every stable series of the spool in the ledger (not one held for a refused instance); how
        many new jobs."""
        added, now = 0, time.time()
        for folder in sorted(p for p in self.spool.iterdir() if p.is_dir() and not p.name.startswith(".")):
            try:
                if now - folder.stat().st_mtime < self.stable_s:
                    continue
                if refused := self._refused_instances(folder):
                    if folder.name not in self._said_held:  # once a series, not at every look
                        self._said_held.add(folder.name)
                        log.warning("spool folder %s: held, %d instance(s) refused for lack of disk not sent again "
                                    "yet", folder.name[:10], refused)
                else:
                    self._said_held.discard(folder.name)
                    added += self._discover_one(folder)
            except (OSError, ValueError) as exc:
                log.warning("spool folder %s: %s", folder.name[:10], type(exc).__name__)
        return added

    def _discover_one(self, folder: Path) -> int:
        info = json.loads((folder / SERIES_FILE).read_text())
        uid, source = str(info["series_uid"]), SOURCE_PREFIX + folder.name
        known = self.ledger.job(uid)
        if known is not None:
            if known.state is JobState.WAITING and folder.stat().st_mtime > known.updated_at - self.stable_s:
                # instances arrived since it began to wait (sent again after a retry, or the rest of the series)
                if self.ledger.wake(known.id):
                    log.info("series %s: %d instance(s) here; its job is due", series_tag(uid),
                             len(_instances(folder)))
                return 0
            if known.state in (JobState.DONE, JobState.SKIPPED):
                count = len(_instances(folder))
                log.warning("series %s: %d instance(s) arrived after it was %s; dropped", series_tag(uid), count,
                            known.state.value.lower())
                shutil.rmtree(folder, ignore_errors=True)
                self.receive_times.forget(folder.name)
            return 0
        modality = str(info.get("modality", "")).upper()
        count = len(_instances(folder))
        reason = ""
        if modality not in {m.upper() for m in self.rules.modalities}:
            reason = f"modality {modality or '(empty)'} is not one of {self.rules.modalities}"
        elif count < self.rules.min_slices:
            reason = f"{count} instances, fewer than {self.rules.min_slices}"
        if reason:
            self.ledger.skip(uid, source, reason)
            log.info("series %s skipped: %s", series_tag(uid), reason)
            shutil.rmtree(folder, ignore_errors=True)
            self.receive_times.forget(folder.name)
            return 0
        if self.ledger.enqueue(uid, source, str(info.get("patient_hash", ""))):
            log.info("series %s enqueued (%d instances)", series_tag(uid), count)
            return 1
        return 0

    # -- the way in and out -------------------------------------------------------------------------------
    def _spool_folder(self, job: Job) -> Path:
        if not job.source.startswith(SOURCE_PREFIX):
            raise BadSeries(f"not a DICOM listener job: {job.source}")
        name = job.source[len(SOURCE_PREFIX):]
        if not name or any(c not in "0123456789abcdef" for c in name):
            raise BadSeries(f"bad spool name in {job.source}")
        return self.spool / name

    def fetch(self, job: Job, folder: Path) -> None:
        source = self._spool_folder(job)
        files = _instances(source) if source.is_dir() else []
        if not files:  # a job requeued after it was skipped or done: its instances were removed then
            raise SeriesNotHere(GONE)
        if time.time() - source.stat().st_mtime < self.stable_s or self._refused_instances(source):
            raise SeriesNotHere("waiting for the rest of the series: instances are still arriving")
        folder.mkdir(parents=True, exist_ok=True)
        for path in files:
            _link_or_copy(path, folder / path.name)
        self._fetched[job.id] = [path.name for path in files]

    def fetch_timed(self, job: Job, folder: Path, events: JobEvents) -> None:
        """:meth:`fetch`, recording the series' ``receive`` stage (taking it from the spool, hard links or a
        local copy, is in the context as ``copy_s``)."""
        clock = time.perf_counter()
        self.fetch(job, folder)
        copy_s = time.perf_counter() - clock
        received = self.receive_times.take(self._spool_folder(job).name)
        events.slices = instance_count(folder)
        if received is not None:
            events.record("receive", received.seconds, received.started, instances=received.instances,
                          bytes=received.bytes, associations=received.associations, copy_s=round(copy_s, 4))

    def deliver(self, paths: list[Path]) -> list[str]:
        return send_files(paths, self.destination, self.address.ae_title)

    def finished(self, job: Job, state: JobState) -> None:
        """Free the instances the job took. Those that arrived while it ran stay: the next discovery logs them as
        arriving after the series was done (or skipped) and drops them, instead of their vanishing unsaid."""
        spooled = self._spool_folder(job)
        for name in self._fetched.pop(job.id, []):
            (spooled / name).unlink(missing_ok=True)
        if not _instances(spooled):
            shutil.rmtree(spooled, ignore_errors=True)
            self.receive_times.forget(spooled.name)


def awaits_resend(spool: Path, job: Job) -> bool:
    """True for a listener job whose instances are no longer in ``spool`` (removed when it was skipped or done):
    requeued, it waits for the series to be sent again."""
    name = job.source[len(SOURCE_PREFIX):]
    if not job.source.startswith(SOURCE_PREFIX) or not name.isalnum():
        return False
    return not ((spool / name).is_dir() and _instances(spool / name))


def _link_or_copy(source: Path, target: Path) -> None:
    """Hard-link ``source`` as ``target``: the job's view of a series takes no second copy of it on the disk the
    spool fills (a copy could hit ENOSPC there while min_free_mb refuses every new store: a deadlock). A copy where
    no link can be made (another file system, one without hard links)."""
    try:
        os.link(source, target)
    except OSError as exc:
        if exc.errno in (errno.ENOSPC, errno.ENOENT):
            raise
        shutil.copyfile(source, target)


def _instances(folder: Path) -> list[Path]:
    """The received instance files of a spool folder (not the temporary files of writes in flight)."""
    return sorted(p for p in folder.glob("*.dcm") if not p.name.startswith("."))
