"""One timed stage of ctzoo's work: what the detectors judge and the provenance store keeps.

An event's **key** is what its statistics are kept for: ``(model, version, stage, device, size bucket)``. CT work
scales with the number of slices, so one latency distribution per model would flag every large study; ctzoo
*buckets* by slices (powers of two: ``1``, ``2``, ``3-4``, ``5-8``, ... ``257-512``) rather than normalising per
slice, because fixed costs (session calls, file opens) do not scale and would make small inputs look slow.

The **context** explains an event (batch size, queue depth, spacing, backend, a series hash, the request id's
hash...). It is JSON-friendly and must never hold patient names or identifiers: callers pass hashes only, and
:func:`checked_context` refuses the DICOM keywords that identify patients.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
import socket
from dataclasses import dataclass, field
from typing import Any

#: Context keys that may identify a patient: refused outright (use a salted hash of the series instead).
IDENTIFYING_KEYS = frozenset({"PatientName", "PatientID", "patient_name", "patient_id", "PatientBirthDate",
                              "AccessionNumber", "accession_number", "StudyInstanceUID", "SeriesInstanceUID"})

Key = tuple[str, str, str, str, str]
#: The names of a key's parts, in order (store columns, JSON fields).
KEY_FIELDS = ("model", "version", "stage", "device", "bucket")
#: How a key's parts are joined where a key travels as one string (the parameter server's JSON, the store's
#: ``key_states`` input): no part may hold it, so :func:`event_key` replaces it with :data:`SEPARATOR_STANDIN`.
KEY_SEPARATOR = "|"
SEPARATOR_STANDIN = "\N{BROKEN BAR}"


def slice_bucket(slices: int | None) -> str:
    """The size bucket of an input of ``slices`` slices (or rows of a tensor batch): ``1``, ``2``, ``3-4``,
    ``5-8``, ...; ``-`` when the stage has no size."""
    if slices is None or slices < 1:
        return "-"
    if slices <= 2:
        return str(slices)
    high = 2 ** math.ceil(math.log2(slices))
    return f"{high // 2 + 1}-{high}"


#: The key of :func:`request_hash`, random per process: without it, a request id (which a client may have made of
#: a medical record number) cannot be recovered from its hash by trying the candidates.
_REQUEST_KEY = os.urandom(32)


def request_hash(request_id: str) -> str:
    """How an event names a request: the first 16 hex digits of the HMAC-SHA-256 of its id with a key random per
    process (ids are chosen by clients, who may put identifiers in them: a plain hash of a short identifier is
    undone by trying them all). Only the process that recorded an event can hash an id to find it: the service's
    ``/v2/perf/anomalies?request=ID`` does."""
    return hmac.new(_REQUEST_KEY, request_id.encode(), hashlib.sha256).hexdigest()[:16]


def process_name(role: str) -> str:
    """How events name the process that timed them: ``role@host:pid``."""
    return f"{role}@{socket.gethostname()}:{os.getpid()}"


def checked_context(context: dict[str, Any]) -> dict[str, Any]:
    """``context`` with JSON-friendly values; ValueError if a key could identify a patient."""
    bad = IDENTIFYING_KEYS.intersection(context)
    if bad:
        raise ValueError(f"event context must not hold patient identifiers ({', '.join(sorted(bad))}); "
                         "pass a salted hash instead")
    return {k: (v if isinstance(v, (str, int, float, bool)) or v is None else str(v)) for k, v in context.items()}


@dataclass(frozen=True)
class Event:
    """One timed stage: ``key`` (model, version, stage, device, size bucket), ``seconds`` it took, ``started``
    (Unix time), the ``process`` that timed it and its ``context``."""

    key: Key
    seconds: float
    started: float
    process: str
    context: dict[str, Any] = field(default_factory=dict)

    @property
    def model(self) -> str:
        return self.key[0]

    @property
    def stage(self) -> str:
        return self.key[2]


def event_key(model: str, version: str, stage: str, device: str, slices: int | None) -> Key:
    """The key of an event; a ``|`` in a part (a training run's folder ``exp|lr=1e-3`` is its version) becomes
    ``¦`` (:data:`SEPARATOR_STANDIN`), or the joined key could not be split back into its five parts."""
    parts = (model, version, stage, device)
    if any(KEY_SEPARATOR in part for part in parts):
        parts = tuple(part.replace(KEY_SEPARATOR, SEPARATOR_STANDIN) for part in parts)
    return (*parts, slice_bucket(slices))
