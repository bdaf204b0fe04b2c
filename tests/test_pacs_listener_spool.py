"""The DICOM listener's spool, work folder and deliveries, with a model that needs no network (tests/pacs_kit.py) and
pynetdicom on both ends in this process: series held, late instances, disk space, outages, what the destination
takes, retries. Seconds each; test_pacs_listener.py runs the real models against dcmtk and Orthanc."""

from __future__ import annotations

import dataclasses
import os
import shutil
import stat
import time
from pathlib import Path

import pytest
from orthanc_server import free_port
from pacs_kit import COMPREHENSIVE_SR, SEGMENTATION, read_all, result_task, storage_scp, store
from series_variants import variant_series

from ctzoo.io.dicom_scan import SeriesRules
from ctzoo.pacs.ledger import JobState, Ledger
from ctzoo.pacs.listener import GONE, AEAddress, DestinationUnavailable, DicomListener, SpoolUnwritable, awaits_resend

pytestmark = pytest.mark.timeout(120)
CALLER = "SCANNER"
OUT_OF_RESOURCES = 0xA700


def make_listener(tmp_path, destination_port: int | None = None, runs: list | None = None, start: bool = True,
                  spool: Path | None = None, **ledger_options) -> DicomListener:
    """A listener on a free port whose every spool folder is stable at once (stable_s 0: a test says when it looks);
    its spool ``tmp_path/spool`` unless given."""
    ledger = Ledger(tmp_path / "ledger.sqlite", **ledger_options)
    listener = DicomListener(ledger, [result_task(runs)], SeriesRules(min_slices=3), spool or tmp_path / "spool",
                             tmp_path / "work", "w1", "test-salt", AEAddress("CTZOO", "127.0.0.1", 0),
                             AEAddress("DEST", "127.0.0.1", destination_port or free_port()), [CALLER], stable_s=0.0)
    if start:
        listener.start()
    return listener


@pytest.fixture
def series(tmp_path, sent_files):
    """Six instances of a new series, as read (to be sent by pynetdicom)."""
    return read_all(variant_series(sent_files, tmp_path / "send", "six", count=6))


def test_a_series_with_a_refused_store_is_held_until_the_instance_is_sent_again(tmp_path, series, caplog):
    """A store refused for lack of disk (0xA700) part-way through a series: what did arrive is not processed as the
    whole series, across a restart too, until the sender has sent the refused instance again."""
    caplog.set_level("INFO", logger="ctzoo.pacs")
    listener = make_listener(tmp_path)
    try:
        assert store(listener.port, series[:4]) == [0] * 4
        listener.min_free_bytes = int(shutil.disk_usage(tmp_path).free + 2**30)  # more than the disk has
        assert store(listener.port, series[4:]) == [OUT_OF_RESOURCES] * 2
        assert listener.discover() == 0 and listener.discover() == 0 and not listener.ledger.jobs()
        assert sum("held, 2 instance(s) refused" in r.getMessage() for r in caplog.records) == 1  # said once
        restarted = make_listener(tmp_path, start=False)  # the hold is on disk, not only in this process
        assert restarted.discover() == 0 and not restarted.ledger.jobs()

        listener.min_free_bytes = 0
        assert store(listener.port, series[4:5]) == [0]
        assert listener.discover() == 0  # one is still missing
        assert store(listener.port, series[5:]) == [0]
        assert listener.discover() == 1
        assert "enqueued (6 instances)" in caplog.text
    finally:
        listener.stop()


def test_instances_arriving_while_the_job_runs_are_dropped_with_a_log_line_not_silently(tmp_path, series, caplog):
    """Instances acknowledged while their series' job runs are not in its results; they used to be deleted with the
    spool folder, unsaid. Now only the instances the job took are removed, and the late ones are logged as dropped."""
    caplog.set_level("INFO", logger="ctzoo.pacs")
    received: list = []
    port = free_port()
    server = storage_scp(port, received)
    listener = make_listener(tmp_path, port)
    fetch = listener.fetch

    def fetch_then_more_arrive(job, folder):
        fetch(job, folder)
        assert store(listener.port, series[4:]) == [0, 0]

    listener.fetch = fetch_then_more_arrive
    try:
        assert store(listener.port, series[:4]) == [0] * 4
        assert listener.discover() == 1 and listener.process_one() is True
        (job,) = listener.ledger.jobs()
        assert job.state is JobState.DONE and len(received) == 2
        (folder,) = listener.spool.iterdir()
        assert len(list(folder.glob("*.dcm"))) == 2  # the two late ones, not yet gone
        assert listener.discover() == 0
        assert "2 instance(s) arrived after it was done; dropped" in caplog.text
        assert not any(listener.spool.iterdir())
    finally:
        listener.stop()
        server.shutdown()


@pytest.mark.parametrize("links", [True, False], ids=["same-file-system", "no-hard-links"])
def test_a_job_takes_its_series_from_the_spool_without_a_second_copy_on_its_disk(tmp_path, series, monkeypatch,
                                                                                  links):
    """The job's series is hard-linked from the spool (spool and work share state_dir's disk, where a copy of every
    series could fill what min_free_mb keeps free); copied only where no link can be made."""
    import errno
    import os

    if not links:
        def no_link(source, target):
            raise OSError(errno.EXDEV, "Invalid cross-device link")

        monkeypatch.setattr(os, "link", no_link)
    listener = make_listener(tmp_path)
    try:
        assert store(listener.port, series) == [0] * 6
    finally:
        listener.stop()
    assert listener.discover() == 1
    listener.fetch(listener.ledger.claim("w1"), tmp_path / "job")
    (spooled,) = listener.spool.iterdir()
    taken = sorted((tmp_path / "job").iterdir())
    assert len(taken) == 6
    for path in taken:
        original = spooled / path.name
        assert path.read_bytes() == original.read_bytes() and path.samefile(original) is links


class Clock:
    def __init__(self) -> None:
        self.t = time.time()

    def __call__(self) -> float:
        return self.t


def test_a_destination_outage_parks_nothing_runs_the_models_once_and_ends_when_it_is_back(tmp_path, sent_files):
    """The destination down: its jobs WAIT (no attempt used, so max_attempts 1 parks nothing), each retry only sends
    the results made once, and the first delivery after the outage makes every waiting job due at once."""
    port, runs, received, clock = free_port(), [], [], Clock()
    listener = make_listener(tmp_path, port, runs, max_attempts=1, backoff_s=60, clock=clock)
    try:
        for name in ("one", "two"):
            assert store(listener.port, read_all(variant_series(sent_files, tmp_path / "send", name, count=4)))
        assert listener.discover() == 2
        for tried in range(2):  # both jobs tried twice while the destination is down
            clock.t += 120 * tried
            for _ in range(2):
                with pytest.raises(DestinationUnavailable) as down:
                    listener.process_one()
                listener._outage.down(down.value, 1.0)  # what run() does with it
        first, second = listener.ledger.jobs()
        assert [first.state, second.state] == [JobState.WAITING] * 2 and first.attempts == second.attempts == 0
        assert "association with DEST@127.0.0.1" in first.reason and len(runs) == 2  # the models ran once a job
        assert second.next_attempt_at > first.next_attempt_at  # the waits grow: the second job is due later...

        server = storage_scp(port, received)
        try:
            clock.t = first.next_attempt_at
            assert listener.process_one() and listener.process_one()  # ...yet goes as soon as the first is sent
        finally:
            server.shutdown()
        assert [(job.state, job.attempts) for job in listener.ledger.jobs()] == [(JobState.DONE, 1)] * 2
        assert len(runs) == 2 and sorted(str(ds.Modality) for ds in received) == ["SEG", "SEG", "SR", "SR"]
        assert not any(listener.spool.iterdir()) and not any(listener.work_dir.iterdir())
    finally:
        listener.stop()


@pytest.mark.parametrize("where", ["fetch", "model"])
def test_a_full_disk_makes_the_job_wait_not_fail(tmp_path, series, where):
    """ENOSPC while a job runs (taking its series, or a model writing its results) is the disk's fault, not the
    series': the job WAITS, using no attempt (it used to fail, and park after max_attempts, while the full disk also
    had every new store refused)."""
    import errno

    listener = make_listener(tmp_path, max_attempts=1)
    try:
        assert store(listener.port, series) == [0] * 6
    finally:
        listener.stop()
    assert listener.discover() == 1

    def full(*args):
        raise OSError(errno.ENOSPC, "No space left on device")

    if where == "fetch":
        listener.fetch = full
    else:
        listener.tasks = [dataclasses.replace(listener.tasks[0], write=full)]
    assert listener.process_one() is True
    (job,) = listener.ledger.jobs()
    assert (job.state, job.attempts) == (JobState.WAITING, 0) and job.reason.startswith("disk full: "), job.reason
    assert "No space left on device" in job.reason


def test_a_start_removes_what_killed_bridges_left_in_work_and_nothing_a_running_one_holds(tmp_path, series):
    """kill -9 mid-job left the series (patient data) in state_dir/work for ever. Each process now works in a folder
    of its own, locked while it lives; the next start removes the folders nobody holds (and those of older ctzoos,
    without a lock), never that of a process still running (watch and listen may share a state_dir)."""
    import os
    import signal
    import subprocess
    import sys

    work = tmp_path / "work"
    killed = subprocess.Popen([sys.executable, "-c", (
        "import sys, time; from ctzoo.pacs.work_folder import WorkFolder; w = WorkFolder(sys.argv[1]); "
        "(w.path / 'job-1').mkdir(); (w.path / 'job-1' / 'x.dcm').write_bytes(b'patient data'); print(w.path.name, "
        "flush=True); time.sleep(60)"), str(work)], stdout=subprocess.PIPE, text=True)
    killed_folder = work / killed.stdout.readline().strip()
    running = make_listener(tmp_path, start=False)  # a live bridge on the same state_dir
    (running.work_dir / "job-2").mkdir()
    legacy = work / "job-abcd1234" / "dicom"  # what a killed ctzoo from before the locks left
    legacy.mkdir(parents=True)
    (legacy / "x.dcm").write_bytes(b"patient data")
    os.kill(killed.pid, signal.SIGKILL)
    killed.wait()
    assert (killed_folder / "job-1" / "x.dcm").exists() and legacy.exists()

    restarted = make_listener(tmp_path, start=False)
    assert not killed_folder.exists() and not legacy.parent.exists()
    assert (running.work_dir / "job-2").is_dir() and restarted.work_dir.is_dir()
    assert sorted(p.name for p in work.iterdir()) == sorted(
        [running.work_dir.name, running.work_dir.name + ".lock", restarted.work_dir.name,
         restarted.work_dir.name + ".lock"])
    restarted.close(), running.close()
    assert not any(work.iterdir())


def test_a_destination_without_seg_storage_gets_the_sr_and_the_job_is_done_saying_so(tmp_path, sent_files, caplog):
    """The destination takes SR but not SEG: the SR is delivered once and recorded, the job is DONE with its
    reason naming what was not delivered, and the log says it once, not per job (it used to send the SR on every
    attempt, then PARK with no result recorded)."""
    caplog.set_level("WARNING", logger="ctzoo.pacs")
    port, received = free_port(), []
    server = storage_scp(port, received, sop_classes=[COMPREHENSIVE_SR])
    listener = make_listener(tmp_path, port, max_attempts=3)
    try:
        for name in ("one", "two"):
            assert store(listener.port, read_all(variant_series(sent_files, tmp_path / "send", name, count=4)))
        assert listener.discover() == 2
        assert listener.process_one() and listener.process_one()
    finally:
        listener.stop()
        server.shutdown()
    jobs = listener.ledger.jobs()
    assert [(job.state, job.attempts, len(job.result_uids)) for job in jobs] == [(JobState.DONE, 1, 1)] * 2
    assert all(job.reason == "not delivered, not accepted by the far end: Segmentation Storage" for job in jobs)
    assert sorted(str(ds.SOPInstanceUID) for ds in received) == sorted(uid for job in jobs for uid in job.result_uids)
    assert [str(ds.Modality) for ds in received] == ["SR", "SR"]
    assert sum("does not accept Segmentation Storage" in r.getMessage() for r in caplog.records) == 1


def test_send_files_sends_what_the_destination_accepts_and_refuses_a_destination_that_takes_none(tmp_path):
    from ctzoo.pacs.listener import send_files

    paths = result_task().write(_FakeVolume(), None, tmp_path, False, {})[0]
    port, received = free_port(), []
    server = storage_scp(port, received, sop_classes=[SEGMENTATION])
    try:
        statuses = send_files(paths, AEAddress("DEST", "127.0.0.1", port), "CTZOO")
        assert statuses == ["not accepted: Comprehensive SR Storage", "Success"] and len(received) == 1
        with pytest.raises(RuntimeError, match="accepts none of the SOP classes of the results: Comprehensive SR"):
            send_files(paths[:1], AEAddress("DEST", "127.0.0.1", port), "CTZOO")
    finally:
        server.shutdown()


class _FakeVolume:
    class dicom:  # noqa: N801 (the attribute a Volume has)
        series_instance_uid, study_instance_uid = "1.2.3", "1.2.4"


def test_a_destination_rejecting_the_association_for_good_is_a_failure_naming_why_not_an_outage(tmp_path, series):
    """A destination that does not know the AE title called used to be an outage forever (WAITING, "rejected"); a
    rejection for now (its association limit) still is one."""
    port = free_port()
    server = storage_scp(port, [], require_called_aet=True, maximum_associations=1)  # its AE title is DEST
    listener = make_listener(tmp_path, port, backoff_s=0, max_attempts=2)
    listener.destination = AEAddress("WRONG", "127.0.0.1", port)
    try:
        assert store(listener.port, series) == [0] * 6 and listener.discover() == 1
        assert listener.process_one() is True  # not raised: not an outage
        (job,) = listener.ledger.jobs()
        assert job.state is JobState.FAILED and job.reason == f"DestinationRefused: association with WRONG@127.0.0.1:" \
            f"{port} rejected for good: called AE title WRONG not recognised", job
        assert listener.process_one() is True and listener.ledger.jobs()[0].state is JobState.PARKED

        from pynetdicom import AE

        from ctzoo.pacs.listener import send_files

        paths = result_task().write(_FakeVolume(), None, tmp_path / "results", False, {})[0]
        holder = AE(ae_title="OTHER")
        holder.add_requested_context("1.2.840.10008.1.1")
        held = holder.associate("127.0.0.1", port, ae_title="DEST")  # its one association
        assert held.is_established
        with pytest.raises(DestinationUnavailable, match=f"^association with DEST@127.0.0.1:{port} rejected for "
                                                         "now: local limit exceeded$"):
            send_files(paths, AEAddress("DEST", "127.0.0.1", port), "CTZOO")
        held.release()
    finally:
        listener.stop()
        server.shutdown()


def test_the_spool_and_what_it_holds_are_this_users_only(tmp_path, series, caplog):
    """A state_dir made beforehand (mkdir, umask 022) used to leave the spool, its series folders and the instances
    (patient names, ids) readable by every local user."""
    umask = os.umask(0o022)
    try:
        (tmp_path / "spool").mkdir(mode=0o755)
        listener = make_listener(tmp_path)
        try:
            assert store(listener.port, series[:3]) == [0] * 3
        finally:
            listener.stop()
    finally:
        os.umask(umask)
    (folder,) = listener.spool.iterdir()
    assert [stat.S_IMODE(path.stat().st_mode) for path in (listener.spool, folder)] == [0o700, 0o700]
    assert {path.name.endswith(".dcm") or path.name for path in folder.iterdir()} == {True, "series.json"}
    assert {stat.S_IMODE(path.stat().st_mode) for path in folder.iterdir()} == {0o600}
    assert "was open to other users: made 0700" in caplog.text


#: A folder no process may create a file in, root included (sysfs takes no new files).
UNWRITABLE = Path("/sys/kernel")


def test_an_unwritable_spool_keeps_the_listener_from_starting_and_a_failed_store_says_why(tmp_path, series,
                                                                                         caplog):
    """A spool on a read-only file system used to be found only at the first C-STORE, refused as "cannot write the
    spool (OSError)", with no reason nor folder, while the listener had said it was ready."""
    with pytest.raises(SpoolUnwritable, match=f"^cannot write the spool {UNWRITABLE}: Permission denied$"):
        make_listener(tmp_path, spool=UNWRITABLE)
    listener = make_listener(tmp_path)
    try:
        assert store(listener.port, series[:1]) == [0]
        (folder,) = listener.spool.iterdir()
        shutil.rmtree(folder)
        folder.symlink_to(UNWRITABLE)  # the series' folder, where nothing can be written any more
        assert store(listener.port, series[1:2]) == [OUT_OF_RESOURCES]
    finally:
        listener.stop()
    assert f"C-STORE refused: cannot write the spool {listener.spool}: Permission denied" in caplog.text


def test_a_skipped_series_retried_waits_for_it_to_be_sent_again_then_runs(tmp_path, sent_files, caplog):
    """'ctzoo pacs retry' on a skipped listener job used to be a dead end: its instances were removed at the skip,
    the requeued job was skipped again for that, and the series sent again was dropped as skipped. Now the job waits
    for the series, and the series sent again makes it due."""
    caplog.set_level("INFO", logger="ctzoo.pacs")
    port, received, runs = free_port(), [], []
    server = storage_scp(port, received)
    listener = make_listener(tmp_path, port, runs)
    few = read_all(variant_series(sent_files, tmp_path / "send", "few", count=2))
    try:
        assert store(listener.port, few) == [0, 0] and listener.discover() == 0
        (job,) = listener.ledger.jobs()
        assert job.state is JobState.SKIPPED and not any(listener.spool.iterdir())
        listener.rules = SeriesRules(min_slices=2)  # the operator's fix, then 'ctzoo pacs retry'
        assert listener.ledger.requeue(job.id) and awaits_resend(listener.spool, job)
        assert listener.process_one() is True and listener.process_one() is False
        (job,) = listener.ledger.jobs()
        assert (job.state, job.attempts, job.reason) == (JobState.WAITING, 0, GONE) and not runs

        assert store(listener.port, few) == [0, 0]
        assert listener.discover() == 0 and "2 instance(s) here; its job is due" in caplog.text
        assert listener.process_one() is True
    finally:
        listener.stop()
        server.shutdown()
    (job,) = listener.ledger.jobs()
    assert (job.state, job.attempts, len(job.result_uids)) == (JobState.DONE, 1, 2) and len(received) == 2
    assert "dropped" not in caplog.text and not any(listener.spool.iterdir())


def test_a_job_whose_series_is_still_arriving_waits_for_the_rest(tmp_path, series):
    listener = make_listener(tmp_path, runs=(runs := []))
    try:
        assert store(listener.port, series) == [0] * 6 and listener.discover() == 1
    finally:
        listener.stop()
    listener.stable_s = 3600  # as if an instance had come in just now, after the series was enqueued
    assert listener.process_one() is True
    (job,) = listener.ledger.jobs()
    assert (job.state, job.attempts) == (JobState.WAITING, 0) and "still arriving" in job.reason and not runs


def test_the_listener_takes_associations_called_by_its_own_ae_title_only(tmp_path, series):
    from pynetdicom import AE
    from pynetdicom.sop_class import CTImageStorage

    listener = make_listener(tmp_path)
    ae = AE(ae_title=CALLER)
    ae.add_requested_context(CTImageStorage, series[0].file_meta.TransferSyntaxUID)
    try:
        association = ae.associate("127.0.0.1", listener.port, ae_title="SOMEONE_ELSE")
        assert association.is_rejected and not association.is_established
        assert store(listener.port, series[:1], called="CTZOO") == [0]
    finally:
        listener.stop()


def test_limits_are_named_as_the_config_names_them():
    from ctzoo.io.limits import ResourceLimits
    from ctzoo.pacs.core import limits_in_config_terms

    with pytest.raises(ValueError) as refused:
        ResourceLimits(max_volume_voxels=10).check_voxels((60000, 60000), "an instance")
    said = limits_in_config_terms(str(refused.value))
    assert said.endswith("(raise it with limits.max_volume_voxels)") and "60000 x 60000" in said
    assert limits_in_config_terms("(raise it with --max-decoded-mb)") == "(raise it with limits.max_decoded_mb)"
