"""What a series' headers say about its files, judged when they are scanned: objects that are no slices named for
what they are (multi-frame, Secondary Capture, a scout sharing the CT's UID), unusable values and damaged files
refused naming the file, lost slices warned about."""

import warnings

import pydicom
import pytest
from dicom_factory import SeriesSpec, make_slices, write_series

from ctzoo.io import DicomError, read_volume


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
