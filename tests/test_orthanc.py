"""OrthancClient against a real Orthanc on loopback (``apt-get install -y orthanc dcmtk``)."""

from __future__ import annotations

import time

import numpy as np
import pydicom
import pytest
from orthanc_server import running_orthanc, storescu

from ctzoo.io import read_volume
from ctzoo.pacs.orthanc import OrthancClient, OrthancError, OrthancUnavailable

pytestmark = pytest.mark.timeout(120)


@pytest.fixture(scope="module")
def orthanc(tmp_path_factory):
    with running_orthanc(tmp_path_factory.mktemp("orthanc")) as instance:
        yield instance


@pytest.fixture(scope="module")
def client(orthanc):
    with OrthancClient(orthanc.url, orthanc.username, orthanc.password) as client:
        yield client


@pytest.fixture(scope="module")
def stored_series(orthanc, client, sent_files) -> str:
    """storescu the series in and wait for its StableSeries change; the Orthanc series id."""
    since = client.last_change()
    storescu(orthanc, sent_files)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        found = [series_id for series_id, _ in client.stable_series(since)]
        if found:
            assert len(found) == 1
            return found[0]
        time.sleep(0.25)
    pytest.fail(f"no StableSeries change within 20 s; log tail:\n{orthanc.log_tail()}")


def test_ping_and_changes(client):
    assert client.ping()["DicomAet"] == "ORTHANC"
    changes, last, done = client.changes(0, limit=5)
    assert isinstance(changes, list) and isinstance(last, int) and isinstance(done, bool)


def test_stored_series_tags(client, stored_series, sent_files):
    series = client.series(stored_series)
    assert series["MainDicomTags"]["Modality"] == "CT"
    assert series["MainDicomTags"]["SeriesInstanceUID"] == pydicom.dcmread(sent_files[0]).SeriesInstanceUID
    assert len(client.series_instances(stored_series)) == 20


def test_stable_series_pages(client, stored_series):
    # paging with a tiny limit still finds the change
    assert [sid for sid, _ in client.stable_series(0, limit=3)] == [stored_series]


def test_download_series_equals_sent(client, stored_series, sent_files, sample_volume, tmp_path):
    paths = client.download_series(stored_series, tmp_path / "down")
    assert len(paths) == 20 and all(p.parent == tmp_path / "down" for p in paths)
    assert not [p for p in (tmp_path / "down").iterdir() if p.name.startswith(".")]  # no leftovers
    sent = {ds.SOPInstanceUID: ds for ds in map(pydicom.dcmread, sent_files)}
    for path in paths:
        got = pydicom.dcmread(path)
        assert got.PixelData == sent[got.SOPInstanceUID].PixelData
    volume = read_volume(tmp_path / "down", progress=False)
    np.testing.assert_array_equal(volume.array, sample_volume.array)
    # a second download rewrites the same files
    assert sorted(client.download_series(stored_series, tmp_path / "down")) == sorted(paths)


def test_upload_is_idempotent(client, stored_series, sent_files, tmp_path):
    ds = pydicom.dcmread(sent_files[0])
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = pydicom.uid.generate_uid()
    ds.save_as(tmp_path / "new.dcm", enforce_file_format=True)
    first = client.upload(tmp_path / "new.dcm")
    assert first["Status"] == "Success" and first["ParentSeries"] == stored_series
    assert client.upload(tmp_path / "new.dcm")["Status"] == "AlreadyStored"
    assert client.upload(sent_files[1])["Status"] == "AlreadyStored"


def test_wrong_password(orthanc):
    wrong = "not-" + orthanc.password
    with OrthancClient(orthanc.url, orthanc.username, wrong) as bad:
        with pytest.raises(OrthancError) as caught:
            bad.ping()
    assert caught.value.status == 401 and not isinstance(caught.value, OrthancUnavailable)
    assert caught.value.path == "/system"
    assert wrong not in str(caught.value) and orthanc.password not in str(caught.value)
    assert orthanc.password not in repr(bad)


def test_bad_id_refused(client):
    with pytest.raises(ValueError):
        client.series("../system")
    with pytest.raises(OrthancError) as caught:
        client.series("0000")
    assert caught.value.status == 404


def test_stopped_orthanc_unavailable(tmp_path):
    with running_orthanc(tmp_path) as instance:
        with OrthancClient(instance.url, instance.username, instance.password, timeout=5) as live:
            live.ping()
    with OrthancClient(instance.url, instance.username, instance.password, timeout=5) as dead:
        with pytest.raises(OrthancUnavailable) as caught:
            dead.ping()
        with pytest.raises(OrthancUnavailable):
            list(dead.stable_series(0))
    assert instance.password not in str(caught.value)
