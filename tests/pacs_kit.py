"""What the listener's fast tests share: a model task that writes an SR and a SEG without a network (so a job runs
in well under a second), a C-STORE sender and a destination AE in this process (pynetdicom, no dcmtk, no Orthanc)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, evt
from pynetdicom.sop_class import CTImageStorage, Verification
from stub_tasks import Predict, finish, preprocess

from ctzoo.inference.tasks import ModelTask

COMPREHENSIVE_SR = "1.2.840.10008.5.1.4.1.1.88.33"
SEGMENTATION = "1.2.840.10008.5.1.4.1.1.66.4"
RESULTS = (("sr.dcm", COMPREHENSIVE_SR, "SR"), ("seg.dcm", SEGMENTATION, "SEG"))


def _result(sop_class: str, modality: str, source_series: str, study: str) -> Dataset:
    ds = Dataset()
    ds.file_meta = FileMetaDataset()
    ds.file_meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    # deterministic, as the real results' UIDs are: the same series gives the same objects
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid(
        entropy_srcs=["pacs-kit", modality, source_series])
    ds.SeriesInstanceUID = generate_uid(entropy_srcs=["pacs-kit-series", modality, source_series])
    ds.StudyInstanceUID = study  # in the source's study, as real results are (Orthanc needs one)
    ds.Modality = modality
    return ds


def result_task(runs: list[int] | None = None) -> ModelTask:
    """A model that writes a stand-in SR and SEG (``sr.dcm``, ``seg.dcm``, as the zoo's models name them) for every
    series it runs on; each run appends to ``runs``."""

    def write(volume, result, folder: Path, overlay, runtime):
        if runs is not None:
            runs.append(1)
        folder.mkdir(parents=True, exist_ok=True)
        series, study = volume.dicom.series_instance_uid, volume.dicom.study_instance_uid
        for name, sop_class, modality in RESULTS:
            _result(sop_class, modality, series, study).save_as(folder / name, enforce_file_format=True)
        return [folder / name for name, _, _ in RESULTS], {"findings": 0, "detail": ""}

    return ModelTask("stub-results", "0.0.1", "detection", preprocess, Predict(), finish=finish, write=write)


def store(port: int, datasets: Sequence[Dataset], caller: str = "SCANNER", called: str = "CTZOO") -> list[int]:
    """C-STORE ``datasets`` (CT, as read from the sample) in one association; the status of each."""
    ae = AE(ae_title=caller)
    for syntax in sorted({str(ds.file_meta.TransferSyntaxUID) for ds in datasets}):
        ae.add_requested_context(CTImageStorage, syntax)
    association = ae.associate("127.0.0.1", port, ae_title=called)
    assert association.is_established, f"no association with {called} on port {port}"
    try:
        return [int(association.send_c_store(ds).Status) for ds in datasets]
    finally:
        association.release()


def read_all(paths: Sequence[Path]) -> list[Dataset]:
    return [pydicom.dcmread(path) for path in paths]


def storage_scp(port: int, received: list, status: int = 0x0000, sop_classes: Sequence[str] | None = None,
                require_called_aet: bool = False, maximum_associations: int = 10):
    """A destination AE (``DEST``) that keeps what it receives and answers ``status``; ``sop_classes``: the only
    storage SOP classes it takes (default: all); ``require_called_aet``: it rejects associations calling another AE
    title; beyond ``maximum_associations`` at once it rejects them for now."""
    ae = AE(ae_title="DEST")
    ae.require_called_aet, ae.maximum_associations = require_called_aet, maximum_associations
    ae.add_supported_context(Verification)
    for context in AllStoragePresentationContexts:
        if sop_classes is None or context.abstract_syntax in sop_classes:
            ae.add_supported_context(context.abstract_syntax, ALL_TRANSFER_SYNTAXES)

    def on_store(event) -> int:
        received.append(event.dataset)
        return status

    return ae.start_server(("127.0.0.1", port), block=False, evt_handlers=[(evt.EVT_C_STORE, on_store)])
