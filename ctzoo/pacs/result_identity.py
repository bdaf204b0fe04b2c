"""The UIDs of the bridge's results: bound to how many instances of the series they were made from.

A result's UIDs derive from the source series, the model and its findings (:func:`ctzoo.io.dicom_uids.result_uids`),
not from which instances of the series the findings came from: a report of no lesion made from the 8 instances a
series had when Orthanc first called it stable, and the one made from all 20 once the rest arrived, would share
their UIDs, and a PACS keeps the first (Orthanc answers ``AlreadyStored``), which cites 8 instances only. So the
bridge derives each result's Series and SOP Instance UIDs again from those and the instance count
(:func:`bind_to_instances`): the same series read again (a crash between delivery and completion, an operator's
retry) gives the same UIDs and is stored once, as before; the series grown since gives results of their own,
beside the earlier ones.
"""

from __future__ import annotations

from pathlib import Path

import pydicom

from ctzoo.io.atomic import atomic_path
from ctzoo.io.dicom_uids import derived_uid

__all__ = ["bind_to_instances"]


def bind_to_instances(paths: list[Path], instances: int) -> list[Path]:
    """Give each result file in ``paths`` a Series and SOP Instance UID derived from its own and ``instances`` (the
    series' instances it was made from); the same ``paths``, rewritten in place (atomically; the file meta kept but
    for the SOP Instance UID)."""
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SeriesInstanceUID = derived_uid("series-of-instances", ds.SeriesInstanceUID, instances)
        ds.SOPInstanceUID = derived_uid("instance-of-instances", ds.SOPInstanceUID, instances)
        ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
        with atomic_path(path) as temporary:
            ds.save_as(temporary)  # as read: preamble and file meta written as they are
    return paths
