"""A small client for Orthanc's REST API: the PACS side of the bridge (``ctzoo pacs``).

The bridge's Orthanc watcher polls ``/changes`` for ``StableSeries`` events (Orthanc raises one once a
series has received no new instance for ``StableAge`` seconds), records each series in the job ledger
(:mod:`ctzoo.pacs.ledger`) before doing anything with it, reads its main tags (:meth:`series`:
Modality, number of instances) to decide whether to process it, downloads its instances
(:meth:`download_series`, each file written atomically) for the zoo models, and uploads the resulting
DICOM SEG/SR objects (:meth:`upload`; Orthanc answers ``AlreadyStored`` to a resent object, which the
deterministic result UIDs make harmless).

Errors: every failed request raises :class:`OrthancError` carrying the HTTP status and the URL path only
(never the credentials, never patient tags from an answer). A connection failure or timeout raises
:class:`OrthancUnavailable`, a subclass, so a watcher can tell "Orthanc is down, retry later" from
"Orthanc refused this request".
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from ctzoo.io.atomic import atomic_path


class OrthancError(RuntimeError):
    """A request to Orthanc failed; ``status`` is the HTTP status (None when no answer came)."""

    def __init__(self, message: str, status: int | None = None, path: str = "") -> None:
        super().__init__(message)
        self.status = status
        self.path = path


class OrthancUnavailable(OrthancError):
    """Orthanc could not be reached (connection refused, timeout...): retry later."""


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
            # TransportError covers connect errors and timeouts; the message names the path only.
            raise OrthancUnavailable(f"Orthanc unreachable at {self.url} ({method} {path}): "
                                     f"{type(exc).__name__}", None, path) from None
        if response.status_code >= 400:
            raise OrthancError(f"Orthanc answered HTTP {response.status_code} to {method} {path}"
                               f"{self._error_detail(response)}", response.status_code, path)
        return response

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
        return self._json("GET", "/system")

    def changes(self, since: int, limit: int = 100) -> tuple[list[dict], int, bool]:
        """One page of ``GET /changes``: (changes after ``since``, the last sequence number, whether done)."""
        body = self._json("GET", "/changes", params={"since": int(since), "limit": int(limit)})
        return list(body.get("Changes", [])), int(body.get("Last", since)), bool(body.get("Done", True))

    def series_changes(self, since: int, limit: int = 100,
                       kinds: tuple[str, ...] = ("NewSeries", "StableSeries")) -> Iterator[tuple[str, str, int]]:
        """Yield ``(series id, change type, sequence number)`` of every change of one of ``kinds`` after
        ``since``, paging through ``/changes`` until done. Persist the sequence number after handling a
        change, and pass the last one back as ``since`` on the next poll."""
        while True:
            page, last, done = self.changes(since, limit)
            for change in page:
                if change.get("ChangeType") in kinds:
                    yield change["ID"], change["ChangeType"], int(change["Seq"])
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
        return int(self._json("GET", "/changes", params={"last": ""}).get("Last", 0))

    def series(self, series_id: str) -> dict:
        """``GET /series/{id}``: ``MainDicomTags`` (Modality, SeriesInstanceUID...), ``Instances``,
        ``ParentStudy``, ``IsStable``..."""
        return self._json("GET", f"/series/{_safe_id(series_id)}")

    def series_instances(self, series_id: str) -> list[str]:
        """The Orthanc ids of the series' instances."""
        return list(self.series(series_id).get("Instances", []))

    def instance_file(self, instance_id: str) -> bytes:
        """The DICOM file of one instance, as stored."""
        return self._request("GET", f"/instances/{_safe_id(instance_id)}/file").content

    def download_series(self, series_id: str, folder: str | Path) -> list[Path]:
        """Write each instance of the series to ``folder/<instance id>.dcm`` (atomically) and return the paths.

        A file already present is rewritten, so a download interrupted half way is simply redone.
        """
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        paths = []
        for instance_id in self.series_instances(series_id):
            target = folder / f"{_safe_id(instance_id)}.dcm"
            with atomic_path(target) as temporary:
                temporary.write_bytes(self.instance_file(instance_id))
            paths.append(target)
        return paths

    def upload(self, path: str | Path) -> dict:
        """``POST /instances`` with one DICOM file; Orthanc's answer (``ID``, ``Status``: ``Success`` or
        ``AlreadyStored``, ``ParentSeries``...)."""
        data = Path(path).read_bytes()
        return self._json("POST", "/instances", content=data, headers={"Content-Type": "application/dicom"})
