"""The Orthanc watcher of the PACS bridge against a real Orthanc: CT in, SR + SEG back, each series once; every
stage of a job timed for the latency anomaly detector, with no patient identifier in its events."""

from __future__ import annotations

import threading
import time

import httpx
import pydicom
import pytest
from dicom_validation import assert_dciodvfy_clean
from orthanc_server import OrthancServer, running_orthanc, storescu
from pacs_kit import result_task
from perf_checks import assert_no_identifiers, stages_by_key

from ctzoo import __version__
from ctzoo.export.repository import ensure_graphs
from ctzoo.inference.tasks import model_task
from ctzoo.io.dicom_scan import SeriesRules
from ctzoo.io.dicom_sr import read_recist_sr
from ctzoo.io.privacy import patient_hash
from ctzoo.models import load_bundle
from ctzoo.pacs.ledger import JobState, Ledger
from ctzoo.pacs.orthanc import OrthancClient, OrthancUnavailable
from ctzoo.pacs.watcher import OrthancWatcher
from ctzoo.perf import PerfMonitor

pytestmark = pytest.mark.timeout(180)
SALT = "test-salt"
PIPELINE_STAGES = {"read", "preprocess", "predict", "finish", "write"}


class Crash(BaseException):  # a worker dying between "uploaded" and "complete": nothing catches it
    pass


def _series_by_modality(orthanc) -> dict[str, list[dict]]:
    found: dict[str, list[dict]] = {}
    answer = httpx.get(f"{orthanc.url}/series", params={"expand": ""}, auth=(orthanc.username, orthanc.password))
    for series in answer.json():
        found.setdefault(series["MainDicomTags"].get("Modality"), []).append(series)
    return found


def _discover_until(watcher: OrthancWatcher, n: int, timeout: float = 20.0) -> int:
    deadline, added = time.monotonic() + timeout, 0
    while added < n and time.monotonic() < deadline:
        added += watcher.discover()
        time.sleep(0.25)
    return added


def test_watcher_end_to_end(tmp_path, sent_files, caplog):
    caplog.set_level("INFO", logger="ctzoo.pacs")
    (tmp_path / "sent").mkdir()
    files = []
    for source in sent_files:  # the sample has an empty PatientID: give it one, to check it is only hashed
        ds = pydicom.dcmread(source)
        ds.PatientID = "PAT-0042"
        ds.save_as(tmp_path / "sent" / source.name, enforce_file_format=True)
        files.append(tmp_path / "sent" / source.name)
    tasks = [model_task(ensure_graphs(load_bundle("recistnet-mini")), "onnx", "cpu", score_threshold=0.05),
             model_task(ensure_graphs(load_bundle("template-seg-abdomen")), "onnx", "cpu")]
    rules = SeriesRules(min_slices=5)
    uid = pydicom.dcmread(sent_files[0]).SeriesInstanceUID
    ledger_path = tmp_path / "ledger.sqlite"
    events = []
    monitor = PerfMonitor(tmp_path / "perf.sqlite", role="pacs", on_event=lambda event, label: events.append(event))
    with running_orthanc(tmp_path) as orthanc, \
            OrthancClient(orthanc.url, orthanc.username, orthanc.password) as client:
        ledger = Ledger(ledger_path)
        watcher = OrthancWatcher(client, ledger, tasks, rules, tmp_path / "work", "w1", SALT, perf=monitor)
        storescu(orthanc, files)
        assert _discover_until(watcher, 1) == 1, orthanc.log_tail()
        (job,) = ledger.jobs(JobState.PENDING)
        assert job.series_uid == uid and job.source.startswith("orthanc:")
        assert job.patient_hash == patient_hash("PAT-0042", SALT)
        seq = watcher.last_seq
        assert seq > 0 and watcher.state_path.exists()

        # first run: the worker dies after uploading, before recording completion
        ledger.complete = lambda *args, **kwargs: (_ for _ in ()).throw(Crash())
        with pytest.raises(Crash):
            watcher.process_one()
        assert watcher.last_upload_statuses == ["Success", "Success"]
        assert ledger.jobs()[0].state is JobState.RUNNING
        ledger.close()

        # restart (a fresh ledger whose clock is past the lease): the job is re-run, results re-sent
        ledger = Ledger(ledger_path, clock=lambda: time.time() + 3600)
        watcher = OrthancWatcher(client, ledger, tasks, rules, tmp_path / "work", "w2", SALT, perf=monitor)
        assert watcher.last_seq == seq  # resumes from the persisted sequence number
        assert watcher.process_one() is True
        assert watcher.last_upload_statuses == ["AlreadyStored", "AlreadyStored"]
        (done,) = ledger.jobs(JobState.DONE)
        assert done.series_uid == uid and len(done.result_uids) == 2 and done.worker == "w2"
        assert not list(watcher.work_dir.iterdir())  # the job's private temp folder removed
        _assert_job_events(events, done.id, files, tmp_path)
        monitor.close()
        assert PerfMonitor(tmp_path / "perf.sqlite", role="reader").store.reduction()["seen"] == len(events)

        # Orthanc holds one SR and one SEG series, in the study of the CT
        by_modality = _series_by_modality(orthanc)
        assert {m: len(s) for m, s in by_modality.items()} == {"CT": 1, "SR": 1, "SEG": 1}
        study = by_modality["CT"][0]["ParentStudy"]
        assert by_modality["SR"][0]["ParentStudy"] == study == by_modality["SEG"][0]["ParentStudy"]
        downloaded = {}
        for modality in ("SR", "SEG"):
            (instance,) = by_modality[modality][0]["Instances"]
            path = tmp_path / f"{modality}.dcm"
            path.write_bytes(client.instance_file(instance))
            downloaded[modality] = path
            assert pydicom.dcmread(path).SOPInstanceUID in done.result_uids
            assert_dciodvfy_clean(path)
        assert len(read_recist_sr(downloaded["SR"])) > 0

        # the result series become stable: recorded SKIPPED (not work); the CT is not re-processed
        deadline = time.monotonic() + 20
        while len(ledger.jobs(JobState.SKIPPED)) < 2 and time.monotonic() < deadline:
            assert watcher.discover() == 0
            time.sleep(0.25)
        skipped = ledger.jobs(JobState.SKIPPED)
        assert len(skipped) == 2, orthanc.log_tail()
        assert all("a ctzoo result" in job.reason and not job.patient_hash for job in skipped)
        assert watcher.process_one() is False
        assert ledger.summary()["DONE"] == 1 and ledger.summary()["PENDING"] == 0
        # a new watcher from sequence 0 (state file lost) re-discovers nothing new
        watcher.state_path.unlink()
        assert watcher.discover() == 0 and watcher.process_one() is False
        assert {m: len(s) for m, s in _series_by_modality(orthanc).items()} == {"CT": 1, "SR": 1, "SEG": 1}
        ledger.close()
    assert "PAT-0042" not in caplog.text and uid not in caplog.text and "series " in caplog.text


def _assert_job_events(events, job_id: int, files, folder) -> None:
    """Both attempts of the job (the crashed one and the re-run) timed every stage; the crashed one has no ``job``
    (it never completed). 20 slices: every event but a model's batches in the bucket 17-32."""
    assert stages_by_key(events) == {
        ("pacs", "17-32"): {"download", "check", "upload", "job"},
        ("recistnet-mini", "17-32"): PIPELINE_STAGES - {"predict"}, ("recistnet-mini", "5-8"): {"predict"},
        ("recistnet-mini", "3-4"): {"predict"}, ("template-seg-abdomen", "17-32"): PIPELINE_STAGES - {"predict"},
        ("template-seg-abdomen", "5-8"): {"predict"}, ("template-seg-abdomen", "3-4"): {"predict"}}
    bridge = [event for event in events if event.model == "pacs"]
    assert {event.key[1] for event in bridge} == {__version__} and [e.stage for e in bridge].count("job") == 1
    for attempt, worker in ((1, "w1"), (2, "w2")):
        mine = [e for e in bridge if e.context["attempt"] == attempt]
        assert {e.context["job"] for e in mine} == {job_id} and {e.context["worker"] for e in mine} == {worker}
        assert {e.context["slices"] for e in mine} == {20} and len({e.context["series_hash"] for e in mine}) == 1
    # a job's model events carry its series hash: the two attempts' hashes differ, each groups its own events
    hashes = {e.context["series_hash"] for e in events if e.stage != "predict"}
    assert hashes == {e.context["series_hash"] for e in bridge} and len(hashes) == 2
    assert_no_identifiers(events, files, str(folder))  # no path either: the job's folders are under it


def test_a_series_settling_when_orthanc_stops_is_processed_once_after_its_restart(tmp_path, sent_files):
    """Orthanc keeps a series' StableAge in memory: stopped (SIGTERM) within it, it never announces the series
    stable (no StableSeries change, ever) and after the restart reports it IsStable, at once. The watcher, which saw
    its NewSeries change before the stop, records it after the restart, once, no sooner than its StableAge after its
    last instance (the sender may go on sending once Orthanc is back); a watcher from sequence 0 too."""
    tasks = [model_task(ensure_graphs(load_bundle("recistnet-mini")), "onnx", "cpu", score_threshold=0.05)]
    server = OrthancServer(tmp_path, {"StableAge": 30})  # far longer than the store and the stop take
    stable_age_s = 5  # what the watcher takes Orthanc's StableAge to be after a restart
    try:
        orthanc = server.start()
        storescu(orthanc, sent_files)
        stored = time.monotonic()
        with OrthancClient(orthanc.url, orthanc.username, orthanc.password) as client, \
                Ledger(tmp_path / "ledger.sqlite") as ledger:
            watcher = OrthancWatcher(client, ledger, tasks, SeriesRules(min_slices=5), tmp_path / "work", "w", SALT,
                                     stable_age_s=stable_age_s)
            assert watcher.discover() == 0 and len(watcher.settling) == 1  # new, not stable yet
            server.stop()
            server.start()
            kinds = {change["ChangeType"] for change in client.changes(0, limit=1000)[0]}
            assert "NewSeries" in kinds and "StableSeries" not in kinds  # the scenario: never announced stable
            assert _discover_until(watcher, 1) == 1 and watcher.settling == [], orthanc.log_tail()
            assert time.monotonic() - stored > stable_age_s - 1  # Orthanc's dates are in whole seconds
            assert watcher.process_one() is True
            (done,) = ledger.jobs(JobState.DONE)
            assert done.series_uid == pydicom.dcmread(sent_files[0]).SeriesInstanceUID
            watcher.state_path.unlink()  # from sequence 0: the CT is known to the ledger; its SR is still settling
            assert watcher.discover() == 0 and watcher.process_one() is False
            assert ledger.summary()["DONE"] == 1 and ledger.summary()["PENDING"] == 0
            assert {m: len(s) for m, s in _series_by_modality(orthanc).items()} == {"CT": 1, "SR": 1}
    finally:
        server.stop()


def test_a_series_that_grows_after_orthanc_called_it_stable_is_processed_again(tmp_path, sent_files, caplog):
    """The sender pauses longer than StableAge after 8 instances: Orthanc announces the series stable, the job runs
    on those 8; the other 12 arrive and Orthanc announces it stable again. The watcher used to ignore that, unsaid:
    now the job runs again on the whole series, with results of their own beside the first."""
    caplog.set_level("INFO", logger="ctzoo.pacs")
    server = OrthancServer(tmp_path, {"StableAge": 1})
    try:
        orthanc = server.start()
        with OrthancClient(orthanc.url, orthanc.username, orthanc.password) as client, \
                Ledger(tmp_path / "ledger.sqlite") as ledger:
            watcher = OrthancWatcher(client, ledger, [result_task()], SeriesRules(min_slices=5), tmp_path / "work",
                                     "w", SALT)
            storescu(orthanc, sent_files[:8])
            assert _discover_until(watcher, 1) == 1 and watcher.process_one()
            (first,) = ledger.jobs(JobState.DONE)
            assert first.instances == 8
            storescu(orthanc, sent_files[8:])
            assert _discover_until(watcher, 1) == 1, orthanc.log_tail()
            assert ledger.job(first.series_uid).state is JobState.PENDING and watcher.process_one()
            second = ledger.job(first.series_uid)
            assert (second.state, second.instances) == (JobState.DONE, 20)
            assert len(second.result_uids) == 2 and set(second.result_uids).isdisjoint(first.result_uids)
            by_modality = _series_by_modality(orthanc)
            assert {m: len(s) for m, s in by_modality.items()} == {"CT": 1, "SR": 2, "SEG": 2}
            assert len(by_modality["CT"][0]["Instances"]) == 20
    finally:
        server.stop()
    assert "20 instances now, its results were made from 8: processing it again" in caplog.text
    assert first.series_uid not in caplog.text


class _FakeClient:
    """Just enough of OrthancClient: one CT series whose download holds no readable DICOM; or Orthanc down."""

    url = "http://fake"

    def __init__(self, down: bool = False) -> None:
        self.down = down
    def series_changes(self, since):
        if self.down:
            raise OrthancUnavailable("down", None, "/changes")
        yield from [("ab-01", "StableSeries", 5)] if since < 5 else []

    def last_change(self):
        if self.down:
            raise OrthancUnavailable("down", None, "/changes")
        return 5

    def series(self, series_id):
        return {"MainDicomTags": {"Modality": "CT", "SeriesInstanceUID": "1.2.3"}, "Instances": ["i"] * 10}

    def series_instances(self, series_id):
        return ["i"] * 10

    def series_shared_tags(self, series_id):
        return {"Rows": "512", "Columns": "512"}

    def series_statistics(self, series_id):
        return {"DiskSize": "5120"}

    def download_series(self, series_id, folder, instances=None):
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "x.dcm").write_bytes(b"not dicom")


def test_bad_data_is_skipped_and_orthanc_down_is_retried(tmp_path):
    tasks = [model_task(ensure_graphs(load_bundle("recistnet-mini")), "onnx", "cpu")]
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        watcher = OrthancWatcher(_FakeClient(), ledger, tasks, SeriesRules(), tmp_path / "work", "w", SALT)
        assert watcher.discover() == 1 and watcher.discover() == 0 and watcher.last_seq == 5
        assert watcher.process_one() is True
        (job,) = ledger.jobs()
        assert job.state is JobState.SKIPPED and "rejected after reading" in job.reason
        assert str(tmp_path) not in job.reason
        down = OrthancWatcher(_FakeClient(down=True), ledger, tasks, SeriesRules(), tmp_path / "work", "w", SALT)
        stop = threading.Event()
        thread = threading.Thread(target=down.run, kwargs={"poll_s": 0.05, "stop": stop})
        thread.start(), time.sleep(0.3), stop.set(), thread.join(5)
        assert not thread.is_alive()


def test_the_watcher_says_reachable_again_once_orthanc_answers_its_discovery(tmp_path, caplog):
    """Its discovery asks Orthanc, so an answer there ends an outage, even with no series to deliver."""
    caplog.set_level("WARNING", logger="ctzoo.pacs")
    tasks = [model_task(ensure_graphs(load_bundle("recistnet-mini")), "onnx", "cpu")]
    client = _FakeClient(down=True)
    with Ledger(tmp_path / "ledger.sqlite") as ledger:
        watcher = OrthancWatcher(client, ledger, tasks, SeriesRules(), tmp_path / "work", "w", SALT)
        stop = threading.Event()
        thread = threading.Thread(target=watcher.run, kwargs={"poll_s": 0.05, "stop": stop})
        thread.start(), time.sleep(0.3)
        said_while_down = [r.getMessage() for r in caplog.records]
        client.down = False
        time.sleep(0.3), stop.set(), thread.join(5)
    assert len(said_while_down) == 1 and said_while_down[0].startswith("down"), said_while_down
    said = [r.getMessage() for r in caplog.records]
    assert said[1].startswith("reachable again after ") and not any("reachable" in line for line in said[2:]), said
