"""A small client for Orthanc's REST API: the PACS side of the bridge (``ctzoo pacs``).

The bridge's Orthanc watcher polls ``/changes`` for ``StableSeries`` events (Orthanc raises one once a
series has received no new instance for ``StableAge`` seconds), records each series in the job ledger
(:mod:`ctzoo.pacs.ledger`) before doing anything with it, reads its main tags (:meth:`series`:
Modality, number of instances) to decide whether to process it, downloads its instances
(:meth:`download_series`, each file written atomically) for the zoo models, and uploads the resulting
DICOM SEG/SR objects (:meth:`upload`; Orthanc answers ``AlreadyStored`` to a resent object, which the
deterministic result UIDs make harmless).

Errors: every failed request raises :class:`OrthancError` carrying the HTTP status and the URL path only
(never the credentials, never patient tags from an answer), and so does an answer that is not the JSON Orthanc
gives (a proxy's HTML page, garbage). A connection failure or timeout, and HTTP 502/503/504 (a proxy in front of
Orthanc that cannot reach it, Orthanc overloaded or starting), raise :class:`OrthancUnavailable`, a subclass, so a
watcher can tell "Orthanc is down, retry later" from "Orthanc refused this request". HTTP 500 stays an
:class:`OrthancError`: Orthanc answers it to requests it cannot handle (a bad file), which a retry does not mend.

Instance files are streamed to disk (:meth:`download_series`), never held whole in memory.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ctzoo.io.atomic import atomic_path
from ctzoo.pacs.work_folder import open_private


class OrthancError(RuntimeError):
    """A request to Orthanc failed; ``status`` is the HTTP status (None when no answer came)."""

    def __init__(self, message: str, status: int | None = None, path: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.path = path


class OrthancUnavailable(OrthancError):
    """Orthanc could not be reached (connection refused, timeout, HTTP 502/503/504...): retry later."""


#: HTTP statuses meaning "Orthanc (or the proxy before it) cannot answer now", not "this request is wrong".
UNAVAILABLE_STATUSES = frozenset({502, 503, 504})
#: Orthanc's ``Status`` answers to ``POST /instances`` for an object it holds (stored now, or before).
STORED_STATUSES = ("Success", "AlreadyStored")
#: Orthanc's answer to an object its ``ReceivedInstanceFilter`` (a Lua script or plugin) refused.
FILTERED_OUT = "FilteredOut"


def _require(shape_ok: bool, method: str, path: str) -> None:
    if not shape_ok:
        raise OrthancError(f"Orthanc answered unexpected JSON to {method} {path}", 200, path)


def _safe_id(orthanc_id: str) -> str:
    """Orthanc ids are hex groups joined by '-'; refuse anything else before it goes into a URL or file name."""
    if not orthanc_id or any(c not in "0123456789abcdefABCDEF-" for c in orthanc_id):
        raise ValueError(f"not an Orthanc id: {orthanc_id!r}")
    return orthanc_id


class OrthancClient:
    """Orthanc REST client with HTTP basic auth. Use as a context manager, or call :meth:`close`."""

    def __init__(self, url: str, username: str | None = None, password: str | None = None,
                 timeout: float = 30) -> None:
        auth = httpx.BasicAuth(username, password or "") if username is not None else None
        self.url = url.rstrip("/")
        self._http = httpx.Client(base_url=self.url, auth=auth, timeout=timeout)

    def __repr__(self) -> str:  # no credentials
        return f"OrthancClient({self.url!r})"

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> OrthancClient:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- requests ---------------------------------------------------------------------------------------

    def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        try:
            response = self._http.request(method, path, **kwargs)
        except (httpx.TransportError, OSError) as exc:
            raise self._unreachable(exc, method, path) from None
        self._raise_for_status(response, method, path)
        return response

    def _unreachable(self, exc: BaseException, method: str, path: str) -> OrthancUnavailable:
        # TransportError covers connect errors and timeouts; the message names the path only.
        return OrthancUnavailable(f"Orthanc unreachable at {self.url} ({method} {path}): {type(exc).__name__}",
                                  None, path)

    def _raise_for_status(self, response: httpx.Response, method: str, path: str) -> None:
        """The :class:`OrthancError` of an HTTP error answer (read in full first if it was streamed)."""
        if response.status_code < 400:
            return
        response.read()
        kind = OrthancUnavailable if response.status_code in UNAVAILABLE_STATUSES else OrthancError
        raise kind(f"Orthanc answered HTTP {response.status_code} to {method} {path}{self._error_detail(response)}",
                   response.status_code, path)

    @staticmethod
    def _error_detail(response: httpx.Response) -> str:
        """Orthanc's own error summary (``OrthancError``/``Message``), which names no patient data."""
        try:
            body = response.json()
        except ValueError:
            return ""
        if not isinstance(body, dict):
            return ""
        detail = body.get("OrthancError") or body.get("Message")
        return f": {str(detail)[:200]}" if detail else ""

    def _json(self, method: str, path: str, **kwargs: Any) -> Any:
        response = self._request(method, path, **kwargs)
        try:
            return response.json()
        except ValueError:
            raise OrthancError(f"Orthanc answered non-JSON to {method} {path}", response.status_code,
                               path) from None

    # -- API --------------------------------------------------------------------------------------------

    def ping(self) -> dict:
        """``GET /system`` (name, version, AET...); raises if Orthanc is down or refuses the credentials."""
        return self._object("GET", "/system")

    def _object(self, method: str, path: str, **kwargs: Any) -> dict:
        """A JSON answer that must be an object (what Orthanc gives for ``/system``, ``/series/{id}``...)."""
        body = self._json(method, path, **kwargs)
        _require(isinstance(body, dict), method, path)
        return body

    def changes(self, since: int, limit: int = 100) -> tuple[list[dict], int, bool]:
        """One page of ``GET /changes``: (changes after ``since``, the last sequence number, whether done)."""
        body = self._object("GET", "/changes", params={"since": int(since), "limit": int(limit)})
        page = body.get("Changes", [])
        _require(isinstance(page, list) and all(isinstance(change, dict) for change in page), "GET", "/changes")
        try:
            return page, int(body.get("Last", since)), bool(body.get("Done", True))
        except (TypeError, ValueError):
            raise OrthancError("Orthanc answered unexpected JSON to GET /changes", 200, "/changes") from None

    def series_changes(self, since: int, limit: int = 100,
                       kinds: tuple[str, ...] = ("NewSeries", "StableSeries")) -> Iterator[tuple[str, str, int]]:
        """Yield ``(series id, change type, sequence number)`` of every change of one of ``kinds`` after
        ``since``, paging through ``/changes`` until done. Persist the sequence number after handling a
        change, and pass the last one back as ``since`` on the next poll."""
        while True:
            page, last, done = self.changes(since, limit)
            for change in page:
                if change.get("ChangeType") in kinds:
                    try:
                        series_id, seq = str(change["ID"]), int(change["Seq"])
                    except (KeyError, TypeError, ValueError):
                        raise OrthancError("Orthanc answered unexpected JSON to GET /changes", 200,
                                           "/changes") from None
                    yield series_id, change["ChangeType"], seq
            if done or last <= since:
                return
            since = last

    def stable_series(self, since: int, limit: int = 100) -> Iterator[tuple[str, int]]:
        """Yield ``(series id, sequence number)`` of every ``StableSeries`` change after ``since`` (see
        :meth:`series_changes`)."""
        for series_id, _, seq in self.series_changes(since, limit, ("StableSeries",)):
            yield series_id, seq

    def last_change(self) -> int:
        """The current last sequence number (``/changes?last``): start a fresh watcher from here."""
        body = self._object("GET", "/changes", params={"last": ""})
        try:
            return int(body.get("Last", 0))
        except (TypeError, ValueError):
            raise OrthancError("Orthanc answered unexpected JSON to GET /changes?last", 200, "/changes") from None

    def now(self) -> str:
        """``GET /tools/now``: Orthanc's clock (UTC, ``YYYYMMDDTHHMMSS``), the one its ``LastUpdate`` dates keep."""
        return self._request("GET", "/tools/now").text.strip()

    def series(self, series_id: str) -> dict:
        """``GET /series/{id}``: ``MainDicomTags`` (Modality, SeriesInstanceUID...), ``Instances``,
        ``ParentStudy``, ``IsStable``, ``LastUpdate`` (when its last instance arrived, :meth:`now`'s clock)..."""
        return self._object("GET", f"/series/{_safe_id(series_id)}")

    def series_instances(self, series_id: str) -> list[str]:
        """The Orthanc ids of the series' instances."""
        instances = self.series(series_id).get("Instances", [])
        _require(isinstance(instances, list), "GET", "/series/{id}")
        return [str(instance) for instance in instances]

    def series_statistics(self, series_id: str) -> dict:
        """``GET /series/{id}/statistics``: ``DiskSize`` (bytes Orthanc stores, what a download writes),
        ``UncompressedSize``, ``CountInstances``..."""
        return self._object("GET", f"/series/{_safe_id(series_id)}/statistics")

    def series_shared_tags(self, series_id: str) -> dict:
        """``GET /series/{id}/shared-tags?simplify``: the tags every instance of the series has with one value
        (Rows, Columns...), by name."""
        return self._object("GET", f"/series/{_safe_id(series_id)}/shared-tags", params={"simplify": ""})

    def instance_tags(self, instance_id: str) -> dict:
        """``GET /instances/{id}/simplified-tags``: one instance's tags by name (no pixel data)."""
        return self._object("GET", f"/instances/{_safe_id(instance_id)}/simplified-tags")

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of one instance, as stored (in memory: :meth:`save_instance` for a download)."""
        return self._request("GET", f"/instances/{_safe_id(instance_id)}/file").content

    def save_instance(self, instance_id: str, target: str | Path, chunk_bytes: int = 1 << 20) -> Path:
        """Stream the DICOM file of one instance to ``target`` (atomically, mode 0600), a chunk at a time."""
        path = f"/instances/{_safe_id(instance_id)}/file"
        with atomic_path(Path(target)) as temporary:
            try:
                with self._http.stream("GET", path) as response:
                    self._raise_for_status(response, "GET", path)
                    with open_private(temporary) as out:
                        for chunk in response.iter_bytes(chunk_bytes):
                            out.write(chunk)
            except (httpx.TransportError, httpx.StreamError) as exc:
                raise self._unreachable(exc, "GET", path) from None
        return Path(target)

    def download_series(self, series_id: str, folder: str | Path, instances: list[str] | None = None) -> list[Path]:
        """Write each instance of the series (or ``instances``, its ids) to ``folder/<instance id>.dcm``, streamed
        and atomically, and return the paths.

        A file already present is rewritten, so a download interrupted half way is simply redone.
        """
        folder = Path(folder)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        paths = []
        for instance_id in self.series_instances(series_id) if instances is None else instances:
            paths.append(self.save_instance(instance_id, folder / f"{_safe_id(instance_id)}.dcm"))
        return paths

    def upload(self, path: str | Path) -> dict:
        """``POST /instances`` with one DICOM file; Orthanc's answer (``ID``, ``Status``: ``Success`` or
        ``AlreadyStored``, ``ParentSeries``...)."""
        data = Path(path).read_bytes()
        return self._object("POST", "/instances", content=data, headers={"Content-Type": "application/dicom"})
