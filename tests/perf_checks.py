"""Checks shared by the tests that switch latency anomaly detection on (``ctzoo.perf``): which stages were timed
under which key, and that no event's context names the patient or the study."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from pathlib import Path

import pydicom

IDENTIFYING_KEYWORDS = ("PatientName", "PatientID", "AccessionNumber", "StudyInstanceUID", "SeriesInstanceUID",
                        "SOPInstanceUID")


def identifying_values(files: Iterable[Path]) -> set[str]:
    """The patient's name and id, the accession number and every UID of the DICOM ``files`` (the non-empty ones)."""
    found: set[str] = set()
    for file in files:
        dataset = pydicom.dcmread(file, stop_before_pixels=True)
        found |= {str(dataset.get(keyword) or "") for keyword in IDENTIFYING_KEYWORDS} - {""}
    return found


def assert_no_identifiers(events: Sequence, files: Iterable[Path], *more: str) -> None:
    """No event's context holds an identifying value of ``files``, nor any of ``more``."""
    text = json.dumps([event.context for event in events])
    leaked = sorted(value for value in identifying_values(files) | set(more) if value in text)
    assert not leaked, f"perf events name {leaked}"


def stages_by_key(events: Sequence) -> dict[tuple[str, str], set[str]]:
    """``{(model, bucket): {stages}}`` of ``events``."""
    found: dict[tuple[str, str], set[str]] = {}
    for event in events:
        found.setdefault((event.model, event.key[4]), set()).add(event.stage)
    return found
