"""What a series' headers say about its files, judged when they are scanned: objects that are no slices named for
what they are (multi-frame, Secondary Capture, a scout sharing the CT's UID), unusable values and damaged files
refused naming the file, lost slices warned about."""

import logging
import warnings

import pydicom
import pytest
from dicom_factory import SeriesSpec, make_slices, slice_dataset, write_series
from pydicom.uid import EnhancedCTImageStorage, SecondaryCaptureImageStorage, generate_uid
from test_dicom_series import assert_matches_spec

from ctzoo.io import DicomError, DicomWarning, SeriesRules, read_volume, scan_folder


def other_object(spec: SeriesSpec, sop_class: str, series_uid: str | None = None, **attributes) -> pydicom.Dataset:
    """A copy of the spec's first slice as another SOP class, without the slice geometry, in its own series."""
    ds = slice_dataset(spec, spec.slices[0], 99)
    ds.SOPClassUID = ds.file_meta.MediaStorageSOPClassUID = sop_class
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
    ds.SeriesInstanceUID = series_uid or generate_uid()
    for keyword in ("ImagePositionPatient", "ImageOrientationPatient", "PixelSpacing"):
        delattr(ds, keyword)
    for keyword, value in attributes.items():
        setattr(ds, keyword, value)
    return ds


def test_multi_frame_and_secondary_capture_are_named_for_what_they_are(tmp_path):
    """A valid Enhanced CT keeps its geometry in functional groups and a Secondary Capture (a dose screen) has none:
    neither is a damaged file, and neither stops the CT series beside it from being read."""
    spec = SeriesSpec(make_slices(3))
    write_series(tmp_path, spec)
    enhanced = other_object(spec, EnhancedCTImageStorage, NumberOfFrames=3)
    enhanced.PixelData = enhanced.PixelData * 3
    enhanced.save_as(tmp_path / "ENHANCED.dcm", enforce_file_format=True)
    other_object(spec, SecondaryCaptureImageStorage).save_as(tmp_path / "DOSE.dcm", enforce_file_format=True)
    scan = scan_folder(tmp_path, progress=False)
    assert not scan.corrupt
    reasons = {s.non_images[0].display_name.rsplit("/", 1)[-1]: s.non_images[0].not_image_reason
               for s in scan.series if s.non_images}
    assert reasons == {"ENHANCED.dcm": "a multi-frame object (3 frames); only single-frame slices are read",
                       "DOSE.dcm": "not an image slice (Secondary Capture Image Storage): missing PixelSpacing, "
                                   "ImagePositionPatient, ImageOrientationPatient"}
    with warnings.catch_warnings():
        warnings.simplefilter("error", DicomWarning)  # no "corrupt ... another series; ignored"
        assert_matches_spec(read_volume(tmp_path, progress=False), spec)
    (tmp_path / "alone").mkdir()
    enhanced.save_as(tmp_path / "alone" / "ENHANCED.dcm", enforce_file_format=True)
    with pytest.raises(DicomError, match=r"no image slices \(a multi-frame object \(3 frames\); only single-frame"):
        read_volume(tmp_path / "alone", progress=False)
    # a Secondary Capture cut short before its pixel data is still a damaged file
    cut = other_object(spec, SecondaryCaptureImageStorage)
    del cut.PixelData
    cut.save_as(tmp_path / "CUT.dcm", enforce_file_format=True)
    assert [h.display_name for h in scan_folder(tmp_path, progress=False).corrupt] == [str(tmp_path / "CUT.dcm")]


@pytest.mark.parametrize("keyword, value, every_file, reason", [
    ("PixelSpacing", ["0.97"], False, r"PixelSpacing holds 1 value\(s\) \[0.97\], not 2"),
    ("ImagePositionPatient", ["0", "0"], False, r"ImagePositionPatient holds 2 value\(s\) \[0.0, 0.0\], not 3"),
    ("ImagePositionPatient", b"abc.000000", False, r"ImagePositionPatient .*is not numeric"),
    ("ImagePositionPatient", b"nan       ", False, r"ImagePositionPatient \[nan, 20.0, 105.0\] is not finite"),
    ("ImageOrientationPatient", [2, 0, 0, 0, 2, 0], True, r"ImageOrientationPatient \[2.0, 0.0, 0.0, 0.0, 2.0, 0.0\]: "
                                                            r"direction cosines of length 2 and 2, not 1"),
    ("ImageOrientationPatient", [1, 0, 0, 0.6, 0.8, 0], True, r"ImageOrientationPatient .*: row and column directions "
                                                              r"53.1 deg apart, not 90"),
    ("RescaleSlope", "0", False, "RescaleSlope is 0; HU need a positive slope"),
    ("RescaleSlope", "-1", False, "RescaleSlope is -1; HU need a positive slope"),
    ("RescaleIntercept", "inf", False, r"RescaleIntercept \[inf\] is not one finite number"),
], ids=["spacing-1-value", "position-2-values", "position-text", "position-nan", "orientation-not-unit",
        "orientation-not-perpendicular", "slope-0", "slope-negative", "intercept-inf"])
def test_unusable_geometry_or_rescale_values_are_refused_naming_the_file(tmp_path, keyword, value, every_file,
                                                                          reason):
    """Raw TypeErrors and numpy errors naming no file before; or, for cosines of length 2 and slope 0, a volume
    read without a word (a wrong slice spacing with a bogus gantry tilt, a flat slice)."""
    spec = SeriesSpec(make_slices(4))
    paths = write_series(tmp_path, spec)
    for path in paths if every_file else paths[2:3]:
        if isinstance(value, bytes):  # in place of x = -10 (pydicom would not write 'abc' as a decimal string)
            path.write_bytes(path.read_bytes().replace(b"-10.000000", value))
            continue
        ds = pydicom.dcmread(path)
        setattr(ds, keyword, value)
        ds.save_as(path)
    named = paths[0] if every_file else paths[2]
    for series in (None, spec.series_uid):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # pydicom's own on reading 'abc' / 'nan' as DS
            with pytest.raises(DicomError, match=rf"{named.name}: {reason}"):
                read_volume(tmp_path, series=series, progress=False)


def test_localizer_sharing_the_series_uid_is_set_apart(tmp_path):
    """Some scanners give the scout the CT's SeriesInstanceUID: left in, it made the series unreadable by any
    route (rules skip a series holding a localizer; naming it refused the localizer)."""
    ct = SeriesSpec(make_slices(4, seed=1))
    coronal = (1.0, 0.0, 0.0, 0.0, 0.0, -1.0)
    scout = SeriesSpec(make_slices(1, orientation=coronal, seed=2), orientation=coronal, series_uid=ct.series_uid,
                       image_type=("ORIGINAL", "PRIMARY", "LOCALIZER"))
    write_series(tmp_path, ct, prefix="CT")
    write_series(tmp_path, scout, prefix="SCOUT")
    [series] = scan_folder(tmp_path, progress=False).series
    assert (len(series.slices), len(series.localizers), series.is_localizer) == (4, 1, False)
    for choice in ({}, {"series": "1"}, {"series": ct.series_uid}, {"rules": SeriesRules(exclude_localizers=False)}):
        with pytest.warns(DicomWarning, match=r"1 localizer/scout image\(s\) \(ImageType LOCALIZER\) share the "
                                              r"series' SeriesInstanceUID; left out of the volume"):
            volume = read_volume(tmp_path, progress=False, **choice)
        assert_matches_spec(volume, ct)
        assert any("localizer" in w for w in volume.warnings)


def test_empty_slice_file_is_warned_about_and_one_cut_in_its_file_meta_refused(tmp_path):
    """An interrupted copy leaves an empty file or one cut short in its file meta; both were dropped as "not DICOM"
    without a word, and a lost first or last slice leaves no gap in the positions to warn about."""
    spec = SeriesSpec(make_slices(5))
    paths = write_series(tmp_path, spec)
    (tmp_path / "README.txt").write_text("a note that is not DICOM, and not named so: no warning for it\n" * 3)
    paths[0].write_bytes(b"")  # the first slice, lost
    with pytest.warns(DicomWarning, match=r"1 file\(s\) beside the series' slices are not DICOM but empty"):
        volume = read_volume(tmp_path, progress=False)
    assert volume.array.shape[0] == 4 and not any("missing slice" in w for w in volume.warnings)
    assert any("not DICOM but empty" in w for w in volume.warnings)
    assert not any("IMG" in w for w in volume.warnings)  # warnings never name files
    for length in (132, 150):  # the preamble and "DICM", then part of the file meta
        paths[3].write_bytes(paths[4].read_bytes()[:length])
        with pytest.raises(DicomError, match=rf"{paths[3].name}: corrupt"):
            read_volume(tmp_path, progress=False)
        with pytest.raises(DicomError, match=rf"{paths[3].name}: corrupt"):  # named alone, not "not a format"
            read_volume(paths[3], progress=False)


def test_unknown_character_set_is_logged_once_per_read(tmp_path, caplog):
    """pydicom logs it for every text value it decodes: 120 identical lines for a 20-slice series."""
    spec = SeriesSpec(make_slices(4), description="Abdomen")
    paths = write_series(tmp_path, spec)
    for path in paths:
        ds = pydicom.dcmread(path)
        ds.SpecificCharacterSet = "ISO_IR 999"
        ds.save_as(path)
    caplog.clear()  # pydicom logged it on writing too
    with caplog.at_level(logging.WARNING, logger="pydicom"), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        read_volume(tmp_path, progress=False)
    assert [r.getMessage() for r in caplog.records if "ISO_IR 999" in r.getMessage()] == [
        "Unknown encoding 'ISO_IR 999' - using default encoding instead"]


def test_deflated_slices_are_read_and_a_deflate_bomb_refused_before_inflating(tmp_path):
    """pydicom inflates a deflated data set whole, even to stop before its pixels: a 300 KB file can take 640 MB.
    A deflated series is read as any other; a file inflating past what a slice can hold is refused, naming it,
    with memory bounded by the check's pieces."""
    import tracemalloc

    from pydicom.uid import DeflatedExplicitVRLittleEndian

    from ctzoo.io.dicom_deflate import MAX_INFLATED_BYTES

    spec = SeriesSpec(make_slices(3))
    for index, slice_spec in enumerate(spec.slices):
        ds = slice_dataset(spec, slice_spec, index)
        ds.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
        ds.save_as(tmp_path / f"IM{index}.dcm", enforce_file_format=True)
    assert_matches_spec(read_volume(tmp_path, progress=False), spec)
    bomb = slice_dataset(spec, spec.slices[0], 7)
    bomb.file_meta.TransferSyntaxUID = DeflatedExplicitVRLittleEndian
    bomb.add_new(0x00091010, "OB", bytes(MAX_INFLATED_BYTES + (1 << 20)))
    bomb.save_as(tmp_path / "BOMB.dcm", enforce_file_format=True)
    del bomb
    assert (tmp_path / "BOMB.dcm").stat().st_size < 1 << 20
    tracemalloc.start()
    try:
        corrupt = scan_folder(tmp_path, progress=False).corrupt
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert [(h.display_name, h.corrupt_reason) for h in corrupt] == [
        (str(tmp_path / "BOMB.dcm"), "its deflated data set inflates to over 64 MiB, more than a CT slice can "
                                     "hold; not read")]
    assert peak < 16 << 20
