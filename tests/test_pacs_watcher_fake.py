"""The Orthanc watcher against a fake Orthanc (httpx.MockTransport, in this process, no network): what Orthanc
answers beyond the happy path (FilteredOut, 5xx, garbage, refused credentials, a recreated database), a series
skipped while it still arrived, limits and disk space checked before a download, private work folders. The real
client runs on it; the models are pacs_kit's stand-in (a job takes well under a second)."""

from __future__ import annotations

import io
import json
import shutil
import stat
import threading
import time
from pathlib import Path

import httpx
import pydicom
import pytest
import yaml
from pacs_kit import result_task

from ctzoo.config import ConfigError
from ctzoo.io.dicom_scan import SeriesRules
from ctzoo.io.limits import ResourceLimits
from ctzoo.pacs.config import load_pacs_config
from ctzoo.pacs.ledger import JobState, Ledger
from ctzoo.pacs.orthanc import OrthancClient, OrthancError, OrthancUnavailable
from ctzoo.pacs.watcher import OrthancWatcher

SERIES = "0a-01"
SALT = "test-salt"


class FakeOrthanc:
    """Orthanc's REST API as the watcher uses it, over one CT series (``files``); ``answers`` overrides what a path
    answers (an httpx.Response, or a callable of the request); ``upload_status`` what POST /instances says per
    Modality; ``uploaded`` the SOP Instance UIDs posted; ``last_update`` and ``now`` Orthanc's clock (the series'
    last instance a minute ago)."""

    def __init__(self, files: list[Path], instances: int | None = None) -> None:
        self.files = files
        self.instances = [f"0b-{i:02x}" for i in range(len(files) if instances is None else instances)]
        self.changes = [{"ChangeType": "StableSeries", "ID": SERIES, "Seq": 5}]
        self.last = 5
        self.answers: dict[str, object] = {}
        self.upload_status = {"SR": "Success", "SEG": "Success"}
        self.shared_tags = {"Rows": "64", "Columns": "64"}
        self.disk_size = sum(path.stat().st_size for path in files)
        self.requests: list[str] = []
        self.uid = str(pydicom.dcmread(files[0], stop_before_pixels=True).SeriesInstanceUID)
        self.uploaded: list[str] = []
        self.last_update, self.now = "20250101T120000", "20250101T120100"

    def __call__(self, request: httpx.Request) -> httpx.Response:
        path = request.url.path
        self.requests.append(f"{request.method} {path}")
        if path in self.answers:
            answer = self.answers[path]
            return answer(request) if callable(answer) else answer
        if path == "/changes":
            if "last" in request.url.params:
                return httpx.Response(200, json={"Last": self.last})
            since = int(request.url.params["since"])
            return httpx.Response(200, json={"Changes": [c for c in self.changes if c["Seq"] > since],
                                             "Last": self.last, "Done": True})
        if path == f"/series/{SERIES}":
            return httpx.Response(200, json={"MainDicomTags": {"Modality": "CT", "SeriesInstanceUID": self.uid},
                                             "Instances": self.instances, "IsStable": True,
                                             "LastUpdate": self.last_update})
        if path == "/tools/now":
            return httpx.Response(200, text=self.now)
        if path == f"/series/{SERIES}/shared-tags":
            return httpx.Response(200, json=self.shared_tags)
        if path == f"/series/{SERIES}/statistics":
            return httpx.Response(200, json={"DiskSize": str(self.disk_size), "CountInstances": len(self.instances)})
        if path.startswith("/instances/") and path.endswith("/file"):
            index = self.instances.index(path.split("/")[2])
            return httpx.Response(200, content=self.files[index].read_bytes())
        if path == "/instances" and request.method == "POST":
            ds = pydicom.dcmread(io.BytesIO(request.content), stop_before_pixels=True)
            self.uploaded.append(str(ds.SOPInstanceUID))
            return httpx.Response(200, json={"ID": "0c-01", "Status": self.upload_status[ds.Modality]})
        return httpx.Response(404, json={"Message": "Unknown resource"})


def fake_client(orthanc: FakeOrthanc) -> OrthancClient:
    client = OrthancClient("http://fake-orthanc")
    client._http = httpx.Client(base_url=client.url, transport=httpx.MockTransport(orthanc))
    return client


@pytest.fixture
def orthanc(sent_files) -> FakeOrthanc:
    return FakeOrthanc(sent_files)


def watcher_on(orthanc: FakeOrthanc, folder: Path, **options) -> OrthancWatcher:
    folder.mkdir(exist_ok=True)
    ledger = Ledger(folder / "ledger.sqlite", backoff_s=0, max_wait_s=0)
    rules = options.pop("rules", SeriesRules(min_slices=5))
    return OrthancWatcher(fake_client(orthanc), ledger, [result_task()], rules, folder / "work", "w", SALT, **options)


def test_a_result_orthanc_filters_out_is_not_delivered_and_an_unknown_status_is_a_failure(tmp_path, orthanc,
                                                                                           caplog):
    orthanc.upload_status["SEG"] = "FilteredOut"  # a ReceivedInstanceFilter refusing SEG objects
    watcher = watcher_on(orthanc, tmp_path)
    assert watcher.discover() == 1 and watcher.process_one()
    (job,) = watcher.ledger.jobs()
    assert job.state is JobState.DONE and len(job.result_uids) == 1, job
    assert job.reason == "not delivered, not accepted by the far end: Segmentation Storage (Orthanc's filter: " \
                         "FilteredOut)"
    assert sum("does not accept Segmentation Storage" in r.getMessage() for r in caplog.records) == 1
    orthanc.upload_status["SEG"] = "Failure"
    watcher = watcher_on(orthanc, tmp_path / "again")
    assert watcher.discover() == 1 and watcher.process_one()
    (job,) = watcher.ledger.jobs()
    assert job.state is JobState.FAILED and "Status 'Failure' to POST /instances" in job.reason, job


def test_a_series_skipped_while_still_arriving_is_enqueued_once_stable_with_enough(tmp_path, sent_files, caplog):
    caplog.set_level("INFO", logger="ctzoo.pacs")
    orthanc = FakeOrthanc(sent_files, instances=3)  # StableAge passed while the sender paused
    watcher = watcher_on(orthanc, tmp_path)
    assert watcher.discover() == 0
    assert watcher.ledger.jobs()[0].state is JobState.SKIPPED
    orthanc.instances = FakeOrthanc(sent_files).instances  # the rest arrived: Orthanc says it is stable again
    orthanc.changes.append({"ChangeType": "StableSeries", "ID": SERIES, "Seq": 9})
    orthanc.last = 9
    assert watcher.discover() == 1 and watcher.discover() == 0
    (job,) = watcher.ledger.jobs()
    assert job.state is JobState.PENDING and job.attempts == 0 and job.reason == ""
    assert sum("enqueued again" in r.getMessage() for r in caplog.records) == 1
    assert watcher.process_one() and watcher.ledger.jobs()[0].state is JobState.DONE


def _stable_again(orthanc: FakeOrthanc, instances: int | None = None) -> None:
    """Orthanc announces the series stable again (with ``instances`` of the sent files now)."""
    if instances is not None:
        orthanc.instances = FakeOrthanc(orthanc.files, instances).instances
    orthanc.last += 1
    orthanc.changes.append({"ChangeType": "StableSeries", "ID": SERIES, "Seq": orthanc.last})


def test_a_series_grown_after_its_job_was_done_is_processed_again_with_results_of_its_own(tmp_path, sent_files,
                                                                                          caplog):
    """Orthanc called the series stable after 8 of its 20 instances (the sender paused longer than StableAge), the
    job ran on those; the rest arrived and Orthanc announced it stable again. That used to be ignored, unsaid."""
    caplog.set_level("INFO", logger="ctzoo.pacs")
    orthanc = FakeOrthanc(sent_files, instances=8)
    watcher = watcher_on(orthanc, tmp_path)
    assert watcher.discover() == 1 and watcher.process_one()
    (first,) = watcher.ledger.jobs()
    assert (first.state, first.instances, len(first.result_uids)) == (JobState.DONE, 8, 2), first
    _stable_again(orthanc, 20)
    assert watcher.discover() == 1 and watcher.discover() == 0  # once
    (again,) = watcher.ledger.jobs()
    assert again.state is JobState.PENDING and again.reason == "the series has 20 instances, its results were " \
                                                                "made from 8: processed again", again
    (warning,) = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert warning.endswith(": 20 instances now, its results were made from 8: processing it again (the earlier "
                            "results stay in Orthanc)"), warning
    assert watcher.process_one()
    (second,) = watcher.ledger.jobs()
    assert (second.state, second.instances, len(second.result_uids)) == (JobState.DONE, 20, 2), second
    # the stand-in model's findings do not change with the slices (as a report of no lesion would not): the results
    # of the whole series still have UIDs of their own, not those Orthanc already holds for the 8 instances
    assert set(second.result_uids).isdisjoint(first.result_uids)
    assert orthanc.uploaded == first.result_uids + second.result_uids
    _stable_again(orthanc)  # stable again, nothing more: nothing to do
    assert watcher.discover() == 0 and watcher.ledger.jobs()[0].state is JobState.DONE
    assert orthanc.uid not in caplog.text


def test_a_series_announced_stable_while_its_job_is_in_hand_is_looked_at_again_once_that_job_ends(tmp_path,
                                                                                                  sent_files):
    """Another watcher has the job, with the 8 instances it fetched, when Orthanc announces the whole series: the
    series is kept settling until that job is DONE, then run again on the whole."""
    orthanc = FakeOrthanc(sent_files, instances=8)
    watcher = watcher_on(orthanc, tmp_path)
    assert watcher.discover() == 1
    job = watcher.ledger.claim("another watcher")
    _stable_again(orthanc, 20)
    assert watcher.discover() == 0 and watcher.settling == [SERIES]
    assert watcher.discover() == 0 and watcher.settling == [SERIES]  # still in hand
    watcher.ledger.complete(job.id, "another watcher", ["2.25.1"], instances=8)
    assert watcher.discover() == 1 and watcher.settling == []
    assert watcher.process_one() and watcher.ledger.jobs()[0].instances == 20


def test_a_series_orthanc_calls_stable_unannounced_is_recorded_a_stable_age_after_its_last_instance(tmp_path,
                                                                                                     orthanc):
    """After a restart Orthanc says IsStable of every series, one whose sender is still sending too: the watcher
    waits Orthanc's StableAge after the series' last instance, by Orthanc's clock."""
    orthanc.changes = [{"ChangeType": "NewSeries", "ID": SERIES, "Seq": 5}]  # its StableSeries never comes
    orthanc.now = "20250101T120002"  # 2 s after its last instance
    watcher = watcher_on(orthanc, tmp_path, stable_age_s=10)
    assert watcher.discover() == 0 and watcher.settling == [SERIES] and not watcher.ledger.jobs()
    orthanc.now = "20250101T120010"
    assert watcher.discover() == 1 and watcher.settling == []


def test_orthanc_or_a_proxy_answering_502_503_504_is_an_outage_and_500_an_error(tmp_path, orthanc):
    for status in (502, 503, 504):
        orthanc.answers["/system"] = httpx.Response(status, text="<html>Bad Gateway</html>")
        with pytest.raises(OrthancUnavailable, match=f"HTTP {status} to GET /system"):
            fake_client(orthanc).ping()
    orthanc.answers["/system"] = httpx.Response(500, json={"Message": "Internal error"})
    with pytest.raises(OrthancError) as error:
        fake_client(orthanc).ping()
    assert not isinstance(error.value, OrthancUnavailable) and error.value.status == 500
    # a job whose upload meets a 503 waits (no attempt used); its results wait in a private outbox
    orthanc.answers["/instances"] = httpx.Response(503)
    watcher = watcher_on(orthanc, tmp_path)
    assert watcher.discover() == 1
    with pytest.raises(OrthancUnavailable):
        watcher.process_one()
    (job,) = watcher.ledger.jobs()
    assert job.state is JobState.WAITING and job.attempts == 0, job
    outbox = watcher.work_dir / "outbox" / str(job.id)
    for folder in (watcher.work_dir, outbox.parent, outbox):
        assert stat.S_IMODE(folder.stat().st_mode) == 0o700, folder
    assert {stat.S_IMODE(path.stat().st_mode) for path in outbox.iterdir()} == {0o600}


def test_a_series_over_the_limits_is_skipped_before_its_download(tmp_path, orthanc):
    orthanc.shared_tags = {"Rows": "512", "Columns": "512"}
    watcher = watcher_on(orthanc, tmp_path, limits=ResourceLimits(512 * 512 * 5, 4096, 64))
    assert watcher.discover() == 1 and watcher.process_one()
    (job,) = watcher.ledger.jobs()
    assert job.state is JobState.SKIPPED, job
    assert job.reason.startswith("rejected before download: the series declares 20 x 512 x 512")
    assert "limits.max_volume_voxels" in job.reason
    assert not [r for r in orthanc.requests if r.endswith("/file")]


def test_a_series_is_downloaded_only_when_the_disk_has_room_for_it(tmp_path, orthanc):
    usage = shutil.disk_usage(tmp_path)
    watcher = watcher_on(orthanc, tmp_path, min_free_mb=usage.free / 2**20)  # no room now: the job waits
    assert watcher.discover() == 1 and watcher.process_one()
    (job,) = watcher.ledger.jobs()
    assert job.state is JobState.WAITING and "orthanc.min_free_mb" in job.reason, job
    assert not [r for r in orthanc.requests if r.endswith("/file")]
    orthanc.disk_size = usage.total + 1  # never room
    watcher.ledger.wake()
    assert watcher.process_one()
    (job,) = watcher.ledger.jobs()
    assert job.state is JobState.SKIPPED and job.reason.startswith("too large for this disk"), job
    # room: each instance is streamed to a file only this user reads
    orthanc.disk_size, watcher.min_free_bytes = 1000, 0
    folder = tmp_path / "download"
    paths = watcher.client.download_series(SERIES, folder)
    assert [p.read_bytes() for p in paths] == [f.read_bytes() for f in orthanc.files]
    assert {stat.S_IMODE(p.stat().st_mode) for p in paths} == {0o600}


def test_a_cursor_beyond_orthancs_last_change_restarts_from_0(tmp_path, orthanc, caplog):
    watcher = watcher_on(orthanc, tmp_path)
    watcher._save(500, [])  # Orthanc's database recreated: its changes start again from 1
    assert watcher.discover() == 1 and watcher.last_seq == 5
    assert sum("database was recreated" in r.getMessage() for r in caplog.records) == 1
    assert watcher.discover() == 0 and sum("database was recreated" in r.getMessage() for r in caplog.records) == 1
    # start_from: now: a first start skips what Orthanc holds already
    fresh = watcher_on(orthanc, tmp_path / "fresh", start_from="now")
    assert fresh.discover() == 0 and fresh.last_seq == 5 and fresh.ledger.jobs() == []


def test_loop_errors_say_what_failed_once_and_refused_credentials_are_called_so(tmp_path, orthanc, caplog):
    orthanc.answers["/changes"] = httpx.Response(401, text="Unauthorized")
    watcher = watcher_on(orthanc, tmp_path)
    stop = threading.Event()
    thread = threading.Thread(target=watcher.run, kwargs={"poll_s": 0.02, "stop": stop})
    thread.start(), time.sleep(0.3), stop.set(), thread.join(5)
    said = [r.getMessage() for r in caplog.records if r.levelname == "ERROR"]
    assert said == ["OrthancWatcher error: Orthanc refused the credentials (Orthanc answered HTTP 401 to GET "
                    "/changes)"], said
    # garbage instead of Orthanc's JSON: a clear OrthancError, not an AttributeError
    for garbage in ([1, 2], {"Changes": [1], "Last": 3}, {"Changes": [{"ChangeType": "StableSeries"}]}):
        orthanc.answers["/changes"] = httpx.Response(200, json=garbage)
        with pytest.raises(OrthancError, match="unexpected JSON to GET /changes"):
            watcher.discover()


def test_a_password_in_the_orthanc_url_is_refused_and_not_echoed(tmp_path):
    path = tmp_path / "pacs.yaml"
    path.write_text(yaml.safe_dump({"orthanc": {"url": "http://ctzoo:s3cret@127.0.0.1:8042"}}))
    with pytest.raises(ConfigError) as error:
        load_pacs_config(path)
    assert "orthanc.url" in str(error.value) and "password_file" in str(error.value)
    assert "s3cret" not in str(error.value)
    path.write_text(json.dumps({"orthanc": {"url": "http://127.0.0.1:8042", "start_from": "now"}}))
    assert load_pacs_config(path).orthanc.start_from == "now"
