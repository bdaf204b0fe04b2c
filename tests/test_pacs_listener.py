"""The DICOM listener of the PACS bridge: storescu in, SR + SEG out by C-STORE (to a real Orthanc, or to a
pynetdicom SCP that a test starts late or makes refuse); with perf on, each job's stages from receive to upload."""

from __future__ import annotations

import shutil
import threading
import time

import httpx
import pydicom
import pytest
from orthanc_server import (
    OrthancServer,
    free_port,
    run_storescu,
    running_orthanc,
    storescu,
)
from pacs_kit import storage_scp
from perf_checks import assert_no_identifiers, stages_by_key
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage, Verification
from series_variants import variant_series

from ctzoo.export.repository import ensure_graphs
from ctzoo.inference.tasks import model_task
from ctzoo.io.dicom_scan import SeriesRules
from ctzoo.io.privacy import patient_hash
from ctzoo.models import load_bundle
from ctzoo.pacs.ledger import JobState, Ledger
from ctzoo.pacs.listener import (
    AEAddress,
    DestinationUnavailable,
    DicomListener,
    send_files,
)
from ctzoo.perf import PerfMonitor

pytestmark = pytest.mark.timeout(240)
SALT = "test-salt"
CALLER = "SCANNER"
MODELS = ("recistnet-mini", "template-seg-abdomen")


@pytest.fixture(scope="module")
def tasks():
    return [model_task(ensure_graphs(load_bundle("recistnet-mini")), "onnx", "cpu", score_threshold=0.05),
            model_task(ensure_graphs(load_bundle("template-seg-abdomen")), "onnx", "cpu")]


def _listener(tmp_path, tasks, destination: AEAddress, port: int = 0, callers=(CALLER,), perf=None,
              **ledger_options) -> DicomListener:
    ledger = Ledger(tmp_path / "ledger.sqlite", **ledger_options)
    listener = DicomListener(ledger, tasks, SeriesRules(min_slices=5), tmp_path / "spool", tmp_path / "work", "w1",
                             SALT, AEAddress("CTZOO", "127.0.0.1", port), destination, list(callers), stable_s=1.0,
                             perf=perf)
    listener.start()
    return listener


def _send(listener: DicomListener, files, propose=("-xv",), caller: str = CALLER) -> str:
    code, output = run_storescu("CTZOO", listener.port, files, calling_aet=caller, propose=propose)
    assert code == 0 and "E: " not in output, output[-2000:]
    return output


def _discover_until(listener: DicomListener, jobs: int, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while len(listener.ledger.jobs()) < jobs and time.monotonic() < deadline:
        listener.discover()
        time.sleep(0.2)
    assert len(listener.ledger.jobs()) == jobs, [(j.state, j.reason) for j in listener.ledger.jobs()]


def test_listener_end_to_end_into_orthanc(tmp_path, sent_files, tasks, caplog):
    caplog.set_level("INFO", logger="ctzoo.pacs")
    good = variant_series(sent_files, tmp_path / "send", "good", patient_id="PAT-0042")
    mr = variant_series(sent_files, tmp_path / "send", "mr", count=5, modality="MR")
    few = variant_series(sent_files, tmp_path / "send", "few", count=3)
    corrupt = variant_series(sent_files, tmp_path / "send", "corrupt", count=6, truncate_pixels_of=2)
    uid = {name: pydicom.dcmread(files[0]).SeriesInstanceUID
           for name, files in {"good": good, "mr": mr, "few": few, "corrupt": corrupt}.items()}
    events = []
    monitor = PerfMonitor(None, role="pacs", on_event=lambda event, label: events.append(event))
    with running_orthanc(tmp_path) as orthanc:
        listener = _listener(tmp_path, tasks, AEAddress("ORTHANC", "127.0.0.1", orthanc.dicom_port), perf=monitor)
        try:
            # a caller not on the list is turned away, and nothing is kept
            code, output = run_storescu("CTZOO", listener.port, good[:1], calling_aet="INTRUDER")
            assert code != 0 or "E: " in output
            assert not any(listener.spool.iterdir())

            _send(listener, good), _send(listener, mr), _send(listener, few), _send(listener, corrupt, propose=())
            spooled = sorted(listener.spool.iterdir())
            assert len(spooled) == 4 and sum(len(list(f.glob("*.dcm"))) for f in spooled) == 20 + 5 + 3 + 6
            assert not any("PAT-0042" in (f / "series.json").read_text() for f in spooled)

            _discover_until(listener, 4)
            jobs = {job.series_uid: job for job in listener.ledger.jobs()}
            assert jobs[uid["mr"]].state is JobState.SKIPPED and "modality MR" in jobs[uid["mr"]].reason
            assert jobs[uid["few"]].state is JobState.SKIPPED and "3 instances" in jobs[uid["few"]].reason
            assert jobs[uid["good"]].patient_hash == patient_hash("PAT-0042", SALT)
            assert len(list(listener.spool.iterdir())) == 2  # the skipped series' files are freed

            while listener.process_one():
                pass
            jobs = {job.series_uid: job for job in listener.ledger.jobs()}
            assert jobs[uid["corrupt"]].state is JobState.SKIPPED
            assert "rejected after reading" in jobs[uid["corrupt"]].reason
            assert "pixel data" in jobs[uid["corrupt"]].reason, jobs[uid["corrupt"]].reason
            done = jobs[uid["good"]]
            assert done.state is JobState.DONE and len(done.result_uids) == 2
            assert listener.last_delivery == ["Success", "Success"]
            assert not any(listener.spool.iterdir()) and not any(listener.work_dir.iterdir())
            _assert_job_events(events, done.id, jobs[uid["corrupt"]].id)

            # the results are in Orthanc, in the study of the CT (which itself was never sent there)
            auth = (orthanc.username, orthanc.password)
            stored = httpx.get(f"{orthanc.url}/instances", params={"expand": ""}, auth=auth).json()
            assert sorted(i["MainDicomTags"]["SOPInstanceUID"] for i in stored) == sorted(done.result_uids)
            study_uid = pydicom.dcmread(good[0]).StudyInstanceUID
            for instance in stored:
                tags = httpx.get(f"{orthanc.url}/instances/{instance['ID']}/simplified-tags", auth=auth).json()
                assert tags["StudyInstanceUID"] == study_uid and tags["Modality"] in ("SR", "SEG")

            # the same series sent again: dropped as already processed, nothing new in Orthanc
            _send(listener, good)
            deadline = time.monotonic() + 20
            while any(listener.spool.iterdir()) and time.monotonic() < deadline:
                assert listener.discover() == 0
                time.sleep(0.2)
            assert not any(listener.spool.iterdir()) and listener.process_one() is False
            assert len(httpx.get(f"{orthanc.url}/instances", auth=auth).json()) == 2
        finally:
            listener.stop()
            listener.ledger.close()
    assert "PAT-0042" not in caplog.text and uid["good"] not in caplog.text and "after it was done" in caplog.text
    assert_no_identifiers(events, good + mr + few + corrupt, str(tmp_path))  # no path: spool and work are under it
    assert [event.stage for event in events].count("receive") == 2  # the series sent again was dropped: no event


def _assert_job_events(events, good_job: int, corrupt_job: int) -> None:
    """The good series (20 instances, one association): received, checked, each model, uploaded, done; the corrupt
    one (6) was received, its check failed (not recorded); the series skipped at discovery left no event."""
    assert stages_by_key(events) == {
        ("pacs", "17-32"): {"receive", "check", "upload", "job"}, ("pacs", "5-8"): {"receive"},
        **{(model, "17-32"): {"read", "preprocess", "finish", "write"} for model in MODELS},
        **{(model, bucket): {"predict"} for model in MODELS for bucket in ("3-4", "5-8")}}
    receive = {e.context["job"]: e for e in events if e.stage == "receive"}
    assert receive.keys() == {good_job, corrupt_job}
    assert receive[good_job].context["instances"] == 20 and receive[good_job].context["associations"] == 1
    assert receive[corrupt_job].context["instances"] == 6 and 0 < receive[good_job].seconds < 60


def test_listener_retries_while_the_destination_is_down(tmp_path, sent_files, tasks):
    series = variant_series(sent_files, tmp_path / "send", "short", count=6)
    port = free_port()  # nothing listens there yet
    listener = _listener(tmp_path, tasks, AEAddress("DEST", "127.0.0.1", port), backoff_s=0.2)
    received: list = []
    try:
        _send(listener, series)
        _discover_until(listener, 1)
        with pytest.raises(DestinationUnavailable, match="association with DEST@127.0.0.1"):
            listener.process_one()
        (job,) = listener.ledger.jobs()
        assert job.state is JobState.WAITING and "DestinationUnavailable" in job.reason and job.attempts == 0
        assert len(list(listener.spool.iterdir())) == 1  # the received series is kept for the retry

        server = storage_scp(port, received)
        try:
            time.sleep(0.3)  # the backoff
            assert listener.process_one() is True
        finally:
            server.shutdown()
        (job,) = listener.ledger.jobs()
        assert job.state is JobState.DONE and job.attempts == 1  # the outage used no attempt
        assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(job.result_uids)
        assert sorted(str(ds.Modality) for ds in received) == ["SEG", "SR"]
        assert not any(listener.spool.iterdir())
    finally:
        listener.stop()
        listener.ledger.close()


def test_the_listener_says_reachable_again_only_once_a_delivery_succeeds(tmp_path, sent_files, tasks, caplog):
    """Its discovery scans the local spool and always succeeds: that used to be logged as the destination being
    reachable again, right after every failed retry, while the destination was still down."""
    caplog.set_level("WARNING", logger="ctzoo.pacs")
    series = variant_series(sent_files, tmp_path / "send", "short", count=6)
    port = free_port()  # nothing listens there yet
    listener = _listener(tmp_path, tasks, AEAddress("DEST", "127.0.0.1", port), backoff_s=0.05, backoff_factor=1)
    stop, received, deliveries = threading.Event(), [], []
    deliver = listener.deliver
    listener.deliver = lambda paths: deliveries.append(paths) or deliver(paths)
    loop = threading.Thread(target=listener.run, kwargs={"poll_s": 0.05, "stop": stop})
    try:
        _send(listener, series)
        loop.start()
        _wait_for(lambda: len(deliveries) >= 3)
        down = _said(caplog)
        assert len(down) == 1 and "association with DEST@127.0.0.1" in down[0] and "retrying" in down[0], down
        server = storage_scp(port, received)
        try:
            _wait_for(lambda: [job.state for job in listener.ledger.jobs()] == [JobState.DONE])
        finally:
            server.shutdown()
    finally:
        stop.set()
        loop.join(30)
        listener.stop()
        listener.ledger.close()
    said = _said(caplog)
    assert len(said) == 2 and said[1].startswith("reachable again after "), said
    assert sorted(str(ds.Modality) for ds in received) == ["SEG", "SR"]


def _said(caplog) -> list[str]:
    """What ctzoo's PACS bridge logged (not pynetdicom's own lines)."""
    return [r.getMessage() for r in caplog.records if r.name.startswith("ctzoo.pacs")]


def _wait_for(condition, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.05)


def test_listener_refuses_instances_that_would_fill_its_disk(tmp_path, sent_files, tasks):
    """Below min_free_mb of free disk a C-STORE is refused with 0xA700 (out of resources: the sender keeps the
    instance and retries), nothing is written, and the listener goes on serving."""
    free_mb = shutil.disk_usage(tmp_path).free / 2**20
    listener = _listener(tmp_path, tasks, AEAddress("DEST", "127.0.0.1", free_port()))
    listener.min_free_bytes = int((free_mb + 1024) * 2**20)  # more than the disk has
    dataset = pydicom.dcmread(sent_files[0])
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(CTImageStorage, dataset.file_meta.TransferSyntaxUID)  # as sent: no re-encoding
    ae.add_requested_context(Verification)
    try:
        association = ae.associate("127.0.0.1", listener.port, ae_title="CTZOO")
        assert association.is_established
        assert association.send_c_store(dataset).Status == 0xA700
        assert not list((tmp_path / "spool").rglob("*.dcm"))
        assert association.send_c_echo().Status == 0x0000  # still serving
        listener.min_free_bytes = 0
        assert association.send_c_store(dataset).Status == 0x0000
        assert len(list((tmp_path / "spool").rglob("*.dcm"))) == 1
        association.release()
    finally:
        listener.stop()


def test_listener_refuses_instances_declaring_more_pixels_than_its_limit(tmp_path, sent_files, tasks, caplog):
    """An instance whose header declares more pixels than limits.max_volume_voxels gets 0xC000 (cannot understand:
    not 0xA700, out of resources, which tells the sender to try again and again) before anything is written, and the
    log names the config key that raises the limit; the next instance within the limit is stored."""
    from ctzoo.io.limits import ResourceLimits

    caplog.set_level("WARNING", logger="ctzoo.pacs")
    listener = _listener(tmp_path, tasks, AEAddress("DEST", "127.0.0.1", free_port()))
    dataset = pydicom.dcmread(sent_files[0])
    listener.limits = ResourceLimits(max_volume_voxels=int(dataset.Rows) * int(dataset.Columns) - 1)
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(CTImageStorage, dataset.file_meta.TransferSyntaxUID)
    try:
        association = ae.associate("127.0.0.1", listener.port, ae_title="CTZOO")
        assert association.is_established
        assert association.send_c_store(dataset).Status == 0xC000
        assert not list((tmp_path / "spool").rglob("*.dcm"))
        (said,) = [r.getMessage() for r in caplog.records if r.name.startswith("ctzoo.pacs")]
        assert "raise it with limits.max_volume_voxels" in said and "--max" not in said, said
        listener.limits = ResourceLimits()
        assert association.send_c_store(dataset).Status == 0x0000
        association.release()
    finally:
        listener.stop()


def test_send_files_reports_a_refusal(tmp_path, sent_files):
    port, received = free_port(), []
    server = storage_scp(port, received, status=0xA700)
    try:
        with pytest.raises(RuntimeError, match="refused the CT Image Storage object: status 0xA700"):
            send_files(sent_files[:1], AEAddress("DEST", "127.0.0.1", port), "CTZOO")
    finally:
        server.shutdown()
    with pytest.raises(DestinationUnavailable, match="association with DEST"):
        send_files(sent_files[:1], AEAddress("DEST", "127.0.0.1", port), "CTZOO", timeout_s=5)


ROUTE_CT_LUA = """
function OnStableSeries(id, tags, metadata)
  if tags["Modality"] == "CT" then
    RestApiPost("/modalities/ctzoo/store", id)
  end
end
"""


def test_orthanc_routes_ct_to_the_listener_as_the_readme_says(tmp_path, sent_files, tasks):
    """The README's listener wiring: Orthanc's Lua OnStableSeries sends CT series to CTZOO, results come back."""
    script = tmp_path / "route-ct.lua"
    script.write_text(ROUTE_CT_LUA)
    port = free_port()
    server = OrthancServer(tmp_path, {"LuaScripts": [str(script)],
                                      "DicomModalities": {"ctzoo": ["CTZOO", "127.0.0.1", port]}})
    orthanc = server.start()
    listener = _listener(tmp_path, tasks, AEAddress("ORTHANC", "127.0.0.1", orthanc.dicom_port), port=port,
                         callers=("ORTHANC",))
    try:
        storescu(orthanc, sent_files)
        _discover_until(listener, 1, timeout=60)
        assert listener.process_one() is True
        (job,) = listener.ledger.jobs()
        assert job.state is JobState.DONE and listener.last_delivery == ["Success", "Success"]
        auth = (orthanc.username, orthanc.password)
        series = httpx.get(f"{orthanc.url}/series", params={"expand": ""}, auth=auth).json()
        assert sorted(s["MainDicomTags"]["Modality"] for s in series) == ["CT", "SEG", "SR"]
        assert len({s["ParentStudy"] for s in series}) == 1
        time.sleep(3)  # the results become stable too; the script does not send them to us
        assert listener.discover() == 0 and not any(listener.spool.iterdir())
    finally:
        listener.stop()
        listener.ledger.close()
        server.stop()
