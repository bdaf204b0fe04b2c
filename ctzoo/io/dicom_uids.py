"""Deterministic DICOM UIDs: repair empty ones in anonymised series, derive result UIDs from sources.

Anonymisers often blank Study/Series/SOP Instance UIDs (the embedded sample
does). A PACS cannot store such objects and a DICOM SEG cannot reference
them, so ctzoo fills them in. The new UIDs are *derived*, not random
(``2.25.<UUID>`` from a name-based UUID, ISO/IEC 9834-8 / DICOM PS3.5 B.2):
reading the same files twice gives the same UIDs, so results made from them
are the same objects and a resend does not duplicate anything.
"""

from __future__ import annotations

import copy
import hashlib
import uuid
from collections.abc import Sequence

import pydicom

#: Namespace for every UID ctzoo derives (a fixed random UUID; changing it changes every derived UID).
CTZOO_UID_NAMESPACE = uuid.UUID("6f1c0f5e-3b0e-4c35-9a57-1d1b8f0c2a11")


def derived_uid(*parts: object) -> str:
    """A valid DICOM UID that depends only on ``parts`` (same parts, same UID)."""
    name = "\x1f".join(str(p) for p in parts)
    return f"2.25.{uuid.uuid5(CTZOO_UID_NAMESPACE, name).int}"


def result_uids(kind: str, source_series_uid: str, algorithm_name: str, algorithm_version: str,
                *content: bytes | memoryview) -> tuple[str, str]:
    """``(SeriesInstanceUID, SOPInstanceUID)`` of a result object of ``kind`` (``"sr"``, ``"seg"``) that an
    algorithm made on a source series, derived from those and a SHA-256 of ``content``: what the object encodes
    (measurements, segment pixels and labels). Rerunning with the same result gives the same UIDs, so a resend
    replaces the stored object; results that differ (another score threshold, other weights, another precision
    or backend) never share one, which a PACS would keep only the first of."""
    digest = hashlib.sha256()
    for part in content:
        view = memoryview(part).cast("B")  # an array's bytes without copying them
        digest.update(len(view).to_bytes(8, "little"))  # parts of other lengths never hash alike
        digest.update(view)
    identity = (source_series_uid, algorithm_name, algorithm_version, digest.hexdigest())
    return derived_uid(f"{kind}-series", *identity), derived_uid(f"{kind}-instance", *identity)


def _value(ds: pydicom.Dataset, keyword: str) -> str:
    return str(ds.get(keyword, "") or "").strip()


def instance_uid(ds: pydicom.Dataset) -> str:
    """The object's SOP Instance UID: its SOPInstanceUID, or where that is empty the file meta's
    MediaStorageSOPInstanceUID (which names the same object); '' when neither has one."""
    meta = getattr(ds, "file_meta", None) or pydicom.Dataset()
    return _value(ds, "SOPInstanceUID") or _value(meta, "MediaStorageSOPInstanceUID")


#: How :func:`fill_empty_uids` filled a UID: a new one ctzoo derived, or the file meta's, which names the same object.
DERIVED = "derived UIDs"
FROM_FILE_META = "taken from the file meta"


def repair_uids(datasets: Sequence[pydicom.Dataset], series_key: str,
                in_place: bool = False) -> tuple[list[pydicom.Dataset], list[str]]:
    """Return copies of one series' datasets with empty UIDs filled in (:func:`fill_empty_uids`), and a line per
    repair made (:func:`repair_notes`)."""
    repaired, repairs = fill_empty_uids(datasets, series_key, in_place)
    return repaired, repair_notes(repairs)


def fill_empty_uids(datasets: Sequence[pydicom.Dataset], series_key: str,
                    in_place: bool = False) -> tuple[list[pydicom.Dataset], dict[tuple[str, str], int]]:
    """Return copies of one series' datasets with empty UIDs filled in, and per ``(keyword, how)`` (``how``:
    :data:`DERIVED` or :data:`FROM_FILE_META`) the number of files where it was filled that way.

    * SOPInstanceUID: the file meta's MediaStorageSOPInstanceUID if present (it names the same object),
      else derived from the series key and the slice position and instance number.
    * SOPClassUID: the file meta's MediaStorageSOPClassUID.
    * SeriesInstanceUID / StudyInstanceUID: derived from ``series_key`` and what the files share, the same for all.
    * FrameOfReferenceUID: derived likewise when empty (one frame of reference per series).
    Present UIDs are never changed. The inputs are copied first unless ``in_place`` (deep copies of
    headers dominate a series read, so the reader, which owns its datasets, repairs them in place).
    """
    repaired = list(datasets) if in_place else [copy.deepcopy(ds) for ds in datasets]
    counts: dict[tuple[str, str], int] = {}
    if not repaired:
        return repaired, counts
    series_wide = series_wide_uids(series_key, repaired[0])

    def note(keyword: str, how: str) -> None:
        counts[(keyword, how)] = counts.get((keyword, how), 0) + 1

    for ds in repaired:
        for keyword, uid in series_wide.items():
            if not _value(ds, keyword):
                setattr(ds, keyword, uid)
                note(keyword, DERIVED)
        meta = getattr(ds, "file_meta", None) or pydicom.Dataset()
        if not _value(ds, "SOPClassUID") and _value(meta, "MediaStorageSOPClassUID"):
            ds.SOPClassUID = meta.MediaStorageSOPClassUID
            note("SOPClassUID", FROM_FILE_META)
        if not _value(ds, "SOPInstanceUID"):
            from_meta = instance_uid(ds)
            ds.SOPInstanceUID = from_meta or derived_uid(
                "instance", series_key, _value(ds, "ImagePositionPatient"), _value(ds, "InstanceNumber"))
            note("SOPInstanceUID", FROM_FILE_META if from_meta else DERIVED)
    return repaired, counts


def series_wide_uids(series_key: str, first: pydicom.Dataset) -> dict[str, str]:
    """The Study, Series and FrameOfReference UIDs :func:`fill_empty_uids` gives a series whose files have none:
    derived from ``series_key`` and what its ``first`` slice (in slice order) shares with the others."""
    shared = (series_key, _value(first, "FrameOfReferenceUID"), _value(first, "StudyDate"),
              _value(first, "StudyTime"), _value(first, "AccessionNumber"))
    return {"StudyInstanceUID": derived_uid("study", *shared), "SeriesInstanceUID": derived_uid("series", *shared),
            "FrameOfReferenceUID": derived_uid("frame-of-reference", *shared)}


def repair_notes(repairs: dict[tuple[str, str], int]) -> list[str]:
    """One line per way of repairing (:func:`fill_empty_uids`' counts), not one per UID: anonymised series lack
    several at once. E.g. ``StudyInstanceUID, SeriesInstanceUID empty in 20 file(s): derived UIDs``."""
    grouped: dict[tuple[str, int], list[str]] = {}
    for (keyword, how), count in repairs.items():
        grouped.setdefault((how, count), []).append(keyword)
    return [f"{', '.join(keywords)} empty in {count} file(s): {how}" for (how, count), keywords in grouped.items()]


def derived_keywords(repairs: dict[tuple[str, str], int]) -> tuple[str, ...]:
    """The UIDs (keywords) that :func:`fill_empty_uids` derived anew in at least one file, in its order."""
    return tuple(dict.fromkeys(keyword for keyword, how in repairs if how == DERIVED))
