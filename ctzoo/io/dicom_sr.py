"""RECIST-Net detections as a DICOM SR Measurement Report (TID 1500), and back.

:func:`write_recist_sr` turns a ``detections.json`` document (:func:`ctzoo.inference.recist_volume.detect_volume`)
on a DICOM volume into a structured report a PACS stores next to the source series and an SR viewer lists as
one measured lesion per group:

* **IOD: Comprehensive 3D SR** (``1.2.840.10008.5.1.4.1.1.88.34``). The detector reports its RECIST points in
  patient LPS mm; SCOORD3D stores them as they are, in the source's frame of reference. Comprehensive SR would
  need SCOORD pixel coordinates on one stored image, which is exact only when the series was stored axially (the
  detector works on the volume reoriented to LPS axial, so on a sagittal or oblique series the five points do
  not lie on one stored image). Both IODs validate cleanly with ``dciodvfy``; dciodvfy rejects SCOORD3D in
  Comprehensive or Enhanced SR, which is why the 3D IOD is required for this encoding.
* **One TID 1501 measurement group per lesion** (highdicom ``MeasurementsAndQualitativeEvaluations``): tracking
  identifier ``lesion N`` (N = 1-based order in the document) and a tracking UID derived from the source series,
  model and N; finding type SCT 52988006 *Lesion* (the detector finds lesions of any kind, as DeepLesion labels
  them; *Neoplasm* would claim a diagnosis it does not make); algorithm identification (model name, version, and
  as its parameter ``weights sha256 <hex>``, the digest of the weights that ran, where the caller gives it);
  the key slice as the group's source image. TID 1501 rather than TID 1410 (planar ROI) because a RECIST
  measurement is two line segments, and TID 1410 allows one region per group whose measurements may not carry
  their own coordinates; in TID 1501 each measurement is INFERRED FROM its own polyline.
* **Measurements** (TID 300): *Long axis* (SCT 103339001) and *Short axis* (SCT 103340004) in UCUM ``mm``, each
  inferred from a two-point SCOORD3D POLYLINE (the axis end points); axes that are not RECIST diameters (not
  crossing, or more than 60 deg from perpendicular; the detector reports none) are refused. The detector's score as
  *Certainty of Finding* (DCM 111012, "the likelihood that the finding detected is in fact the type of finding
  identified") in UCUM ``%`` (0-100), the unit DICOM's CAD templates give that concept. The score is the model's
  uncalibrated confidence that the finding is a lesion, not a probability of malignancy. The centre point is not
  stored.
* **Report**: title *Imaging Measurement Report* (DCM 126000), procedure reported *CT unspecified body region*
  (LOINC 25045-6, CID 100), a device observer (ctzoo, the model as model name; no serial number, an optional
  item, as the equipment's Device Serial Number: versions are no serial numbers and go in Software Versions, the
  model's and ctzoo's). Completion COMPLETE (the algorithm reported everything it found), PRELIMINARY and
  UNVERIFIED: no person has reviewed it.
* **Zero lesions** still give a report that says so: TID 1500 rows 12 and 14, a *Qualitative Evaluations*
  container (UMLS C0034375) with a TEXT *Finding* (DCM 121071) "No lesion detected by <model> <version>" (and
  "(weights sha256 <hex>)"), and no
  *Imaging Measurements* container (TID 1500 needs one of the two). highdicom's ``MeasurementReport`` refuses zero
  groups; an *Imaging Measurements* container with an empty Content Sequence fails dciodvfy (empty type 1C), and
  one without a Content Sequence validates but makes highdicom's group getters raise on read.
* **Identity**: patient and study modules come from the source headers (highdicom copies them from the first
  evidence item; :func:`ctzoo.io.dicom_seg.source_headers` completes missing type-2 attributes), in the
  source's character set made valid (:mod:`ctzoo.io.dicom_charset`); every source
  slice is listed as evidence. Series and instance UIDs derive from the source series, model name and version
  and a digest of the lesions encoded, as for the SEG: rerunning one model on one series gives the same objects,
  and a resend replaces the old one; other findings (another score threshold, other weights) make another object.
  Tracking UIDs leave the digest out, so a viewer can follow lesion N across reports.
"""

from __future__ import annotations

import importlib.metadata
import json
from pathlib import Path
from typing import Any

import highdicom as hd
import numpy as np
from highdicom.sr.templates import DEFAULT_LANGUAGE
from pydicom.sr.codedict import codes

from ctzoo.io.atomic import atomic_path
from ctzoo.io.dicom_charset import apply_character_set
from ctzoo.io.dicom_seg import source_headers
from ctzoo.io.dicom_uids import derived_uid, result_uids
from ctzoo.io.volume import Volume

COMPREHENSIVE_3D_SR = "1.2.840.10008.5.1.4.1.1.88.34"
_QUALITATIVE_EVALUATIONS = hd.sr.CodedConcept("C0034375", "UMLS", "Qualitative Evaluations")
_CONTAINS = hd.sr.RelationshipTypeValues.CONTAINS


def _ctzoo_version() -> str:
    try:
        return importlib.metadata.version("ctzoo")
    except importlib.metadata.PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


def _on_stored_slice(lesion: dict[str, Any]) -> dict[str, Any]:
    """A lesion found on a sagittal or coronal series, whose ``slice`` names the axial grid the model ran on, keyed
    to the stored image through its centre instead: the one the report can reference."""
    try:
        return {**lesion, "slice": int(round(float(lesion["points_voxel"][4][2])))}
    except (KeyError, IndexError, TypeError, ValueError):
        return lesion  # refused below as it stands


def _checked_lesions(document: dict[str, Any], volume: Volume) -> list[dict[str, Any]]:
    """The document's lesions after checking they belong to ``volume`` and can be encoded."""
    if volume.dicom is None:
        raise ValueError("DICOM SR needs DICOM input: the volume was not read from DICOM (volume.dicom is None), so "
                         "there are no source images to reference; keep detections.json instead")
    series = (document.get("input") or {}).get("series_instance_uid")
    if series and series != volume.dicom.series_instance_uid:
        raise ValueError(f"the detections were made on series {series}, not on the volume's series "
                         f"{volume.dicom.series_instance_uid}")
    lesions = [_on_stored_slice(lesion) if document.get("slice_grid") == "axial" else lesion
               for lesion in document.get("lesions", [])]
    slices = volume.array.shape[0]
    for n, lesion in enumerate(lesions, start=1):
        k = lesion.get("slice")
        if not isinstance(k, (int, np.integer)) or not 0 <= k < slices:
            raise ValueError(f"lesion {n}: key slice {k!r} is outside the volume's slices 0..{slices - 1}")
        points = np.asarray(lesion.get("points_mm"), dtype=float)
        if points.shape != (5, 3) or not np.isfinite(points).all():
            raise ValueError(f"lesion {n}: points_mm must be 5 finite (x, y, z) points in mm (long-axis ends, "
                             f"short-axis ends, centre), got shape {points.shape}")
        if not recist_axes_cross(points[:4]):
            raise ValueError(f"lesion {n}: its long and short axes do not cross within 60 deg of perpendicular, so "
                             "the short axis is not a RECIST short axis (SCT 103340004); a report would misstate it")
    return lesions


def recist_axes_cross(ends: np.ndarray, slack_mm: float = 0.05, max_abs_cos: float = 0.5) -> bool:
    """Whether the long axis ``ends[0:2]`` and the short axis ``ends[2:4]`` (mm) are RECIST diameters: each crosses
    the other (their closest points lie on both segments, within ``slack_mm``: the points are rounded) and they are
    within 60 deg of perpendicular (ctzoo.models.recist_grouping's geometry; |cos| within 0.01 of
    ``max_abs_cos``, for the rounding)."""
    long_axis, short_axis = ends[1] - ends[0], ends[3] - ends[2]
    lengths = np.array([np.linalg.norm(long_axis), np.linalg.norm(short_axis)])
    if lengths.min() <= 0:
        return False
    if abs(long_axis @ short_axis) / lengths.prod() > max_abs_cos + 0.01:
        return False
    (t, s), *_ = np.linalg.lstsq(np.column_stack([long_axis, -short_axis]), ends[2] - ends[0], rcond=None)
    gap = np.linalg.norm(ends[0] + t * long_axis - (ends[2] + s * short_axis))
    slack = slack_mm / lengths
    return bool(gap <= slack_mm and -slack[0] <= t <= 1 + slack[0] and -slack[1] <= s <= 1 + slack[1])


def _encoded(lesions: list[dict[str, Any]]) -> bytes:
    """What the report says about ``lesions`` (key slice, points, axes, score), canonically, for its UIDs."""
    return json.dumps([[int(lesion["slice"]), np.asarray(lesion["points_mm"], dtype=float).tolist(),
                        float(lesion["long_axis_mm"]), float(lesion["short_axis_mm"]),
                        None if lesion.get("score") is None else float(lesion["score"])]
                       for lesion in lesions]).encode()


def _lesion_group(n: int, lesion: dict[str, Any], headers: list, frame_of_reference_uid: str,
                  algorithm: hd.sr.AlgorithmIdentification,
                  identity: tuple) -> hd.sr.MeasurementsAndQualitativeEvaluations:
    """One TID 1501 group: long and short axis (each inferred from its polyline), score, key slice."""
    points = np.asarray(lesion["points_mm"], dtype=float)
    key = headers[int(lesion["slice"])]

    def axis(concept, value: float, ends: np.ndarray) -> hd.sr.Measurement:
        line = hd.sr.CoordinatesForMeasurement3D(hd.sr.GraphicTypeValues3D.POLYLINE, ends, frame_of_reference_uid)
        return hd.sr.Measurement(name=concept, value=float(value), unit=codes.UCUM.Millimeter,
                                 referenced_coordinates=[line])

    measurements = [axis(codes.SCT.LongAxis, lesion["long_axis_mm"], points[0:2]),
                    axis(codes.SCT.ShortAxis, lesion["short_axis_mm"], points[2:4])]
    if lesion.get("score") is not None:
        measurements.append(hd.sr.Measurement(name=codes.DCM.CertaintyOfFinding, unit=codes.UCUM.Percent,
                                              value=round(100.0 * float(lesion["score"]), 4)))
    return hd.sr.MeasurementsAndQualitativeEvaluations(
        tracking_identifier=hd.sr.TrackingIdentifier(uid=derived_uid("sr-tracking", *identity, n),
                                                     identifier=f"lesion {n}"),
        finding_type=codes.SCT.Lesion, algorithm_id=algorithm, measurements=measurements,
        source_images=[hd.sr.SourceImageForMeasurementGroup(key.SOPClassUID, key.SOPInstanceUID)])


def _no_lesion_report(observation_context: hd.sr.ObservationContext, statement: str) -> hd.sr.ContainerContentItem:
    """TID 1500 root holding only a Qualitative Evaluations container that says nothing was found."""
    finding = hd.sr.TextContentItem(name=codes.DCM.Finding, value=statement, relationship_type=_CONTAINS)
    evaluations = hd.sr.ContainerContentItem(name=_QUALITATIVE_EVALUATIONS, relationship_type=_CONTAINS)
    evaluations.ContentSequence = hd.sr.ContentSequence([finding])
    procedure = hd.sr.CodeContentItem(name=codes.DCM.ProcedureReported, value=codes.cid100.CTUnspecifiedBodyRegion,
                                      relationship_type=hd.sr.RelationshipTypeValues.HAS_CONCEPT_MOD)
    root = hd.sr.ContainerContentItem(name=codes.cid7021.ImagingMeasurementReport, template_id="1500")
    root.ContentSequence = hd.sr.ContentSequence(
        [*hd.sr.LanguageOfContentItemAndDescendants(DEFAULT_LANGUAGE), *observation_context, procedure, evaluations])
    return root


def write_recist_sr(document: dict, volume: Volume, out_path: str | Path, model_name: str, model_version: str,
                    series_number: int = 9102, weights_sha256: str | None = None) -> Path:
    """Write the detections ``document`` on ``volume`` (its DICOM source) as a Comprehensive 3D SR TID 1500
    Measurement Report at ``out_path`` (atomically); returns ``out_path``. See the module docstring for content.
    ``weights_sha256``: the digest of the weights that ran, stated as an algorithm parameter of every lesion and in
    the zero-lesion finding.

    Raises ``ValueError`` when the volume was not read from DICOM, the document names another series, a
    lesion's key slice or points do not fit the volume, or its axes are not RECIST diameters (crossing, within
    60 deg of perpendicular: :func:`recist_axes_cross`); nothing is written then.
    """
    lesions = _checked_lesions(document, volume)
    headers = source_headers(volume)
    source = volume.dicom
    identity = (source.series_instance_uid, model_name, model_version)
    ctzoo_version = _ctzoo_version()
    device = hd.sr.DeviceObserverIdentifyingAttributes(
        uid=derived_uid("sr-device", model_name, model_version), name="ctzoo", manufacturer_name="ctzoo",
        model_name=model_name[:64])
    observation_context = hd.sr.ObservationContext(observer_device_context=hd.sr.ObserverContext(
        observer_type=codes.DCM.Device, observer_identifying_attributes=device))
    weights = [f"weights sha256 {weights_sha256}"] if weights_sha256 else []
    if lesions:
        algorithm = hd.sr.AlgorithmIdentification(name=model_name, version=model_version, parameters=weights or None)
        groups = [_lesion_group(n, lesion, headers, source.frame_of_reference_uid, algorithm, identity)
                  for n, lesion in enumerate(lesions, start=1)]
        content = hd.sr.MeasurementReport(observation_context=observation_context,
                                          procedure_reported=codes.cid100.CTUnspecifiedBodyRegion,
                                          imaging_measurements=groups)[0]
    else:
        content = _no_lesion_report(observation_context, f"No lesion detected by {model_name} {model_version}"
                                    + "".join(f" ({w})" for w in weights))
    series_uid, instance_uid = result_uids("sr", *identity, _encoded(lesions))
    sr = hd.sr.Comprehensive3DSR(
        evidence=headers, content=content, series_instance_uid=series_uid,
        series_number=series_number, sop_instance_uid=instance_uid, instance_number=1,
        manufacturer="ctzoo", is_complete=True, manufacturer_model_name=model_name[:64],
        software_versions=[model_version, f"ctzoo {ctzoo_version}"], series_description=f"SR {model_name}"[:64],
        specific_character_set=None)  # highdicom refuses valid source values: set below (ctzoo.io.dicom_charset)
    apply_character_set(sr, headers[0])
    out_path = Path(out_path)
    with atomic_path(out_path) as partial:
        sr.save_as(partial, enforce_file_format=True)
    return out_path


def read_recist_sr(path: str | Path) -> list[dict[str, Any]]:
    """The lesions of a report written by :func:`write_recist_sr`, in group order, read with highdicom.

    Each is ``{"tracking_id", "tracking_uid", "long_axis_mm", "short_axis_mm", "score" (0-1, or None),
    "referenced_sop_instance_uid" (the key slice), "points_mm"}``; ``points_mm`` holds the four stored axis end
    points (long 1, long 2, short 1, short 2) in LPS mm, or is None when the axes carry no SCOORD3D. A report
    without lesions gives ``[]``.
    """
    sr = hd.sr.srread(str(path))
    if not isinstance(sr.content, hd.sr.MeasurementReport):
        raise ValueError(f"{path}: not a TID 1500 Measurement Report")
    lesions = []
    for group in sr.content.get_image_measurement_groups():
        def measured(concept):
            found = group.get_measurements(name=concept)
            return found[0] if found else None

        long_axis, short_axis, certainty = (measured(c) for c in
                                            (codes.SCT.LongAxis, codes.SCT.ShortAxis, codes.DCM.CertaintyOfFinding))
        if long_axis is None or short_axis is None:
            raise ValueError(f"{path}: measurement group {group.tracking_identifier!r} lacks a long or short axis")
        lines = [m.referenced_coordinates for m in (long_axis, short_axis)]
        points = (np.concatenate([line[0].value for line in lines]).tolist()
                  if all(len(line) == 1 and line[0].value.shape == (2, 3) for line in lines) else None)
        sources = group.source_images
        lesions.append({
            "tracking_id": group.tracking_identifier, "tracking_uid": str(group.tracking_uid),
            "long_axis_mm": float(long_axis.value), "short_axis_mm": float(short_axis.value),
            "score": None if certainty is None else float(certainty.value) / 100.0,
            "referenced_sop_instance_uid": str(sources[0].referenced_sop_instance_uid) if sources else None,
            "points_mm": points})
    return lesions
