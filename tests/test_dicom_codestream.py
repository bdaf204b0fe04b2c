"""The size a compressed slice's own stream declares, checked against Rows x Columns before anything decodes it:
parsers tested on real encoded streams (pydicom's encoders, GDCM's JPEG lossless), and the reader's refusals."""

import struct

import numpy as np
import pydicom
import pytest
import SimpleITK as sitk
from dicom_factory import SeriesSpec, make_slices, slice_dataset
from pydicom.encaps import encapsulate, generate_frames
from pydicom.uid import JPEG2000Lossless, JPEGLosslessSV1, JPEGLSLossless, RLELossless

from ctzoo.io import DicomError, read_volume
from ctzoo.io.dicom_codestream import FrameSize, j2k_frame_size, jpeg_frame_size, rle_segment_lengths
from ctzoo.io.nvimgcodec_decode import _read_frame

ROWS, COLUMNS = 40, 36
CODECS = [JPEGLSLossless, JPEG2000Lossless, JPEGLosslessSV1, RLELossless]
CODEC_NAMES = ["JPEG-LS", "JPEG-2000", "JPEG-lossless", "RLE"]


def gdcm_jpeg_lossless(stored: np.ndarray, tmp_path) -> bytes:
    """A JPEG lossless (SOF3) stream of ``stored`` as GDCM writes it (pydicom has no JPEG encoder)."""
    path = tmp_path / "gdcm-jpeg.dcm"
    writer = sitk.ImageFileWriter()
    writer.SetFileName(str(path))
    writer.SetUseCompression(True)
    writer.SetCompressor("JPEG")
    writer.Execute(sitk.GetImageFromArray(stored))
    return first_frame(pydicom.dcmread(path))


def first_frame(ds) -> bytes:
    return next(generate_frames(ds.PixelData, number_of_frames=1))


def compressed_series(folder, syntax, header_size=None, tmp_path=None):
    """Three CT slices of ROWS x COLUMNS compressed as ``syntax``; ``header_size``: the Rows, Columns written in
    their headers instead of the stream's."""
    spec = SeriesSpec(make_slices(3, rows=ROWS, columns=COLUMNS))
    folder.mkdir()
    paths = []
    for number, s in enumerate(spec.slices):
        ds = slice_dataset(spec, s, number + 1)
        if syntax == JPEGLosslessSV1:
            ds.PixelData = encapsulate([gdcm_jpeg_lossless(s.stored, tmp_path)])
            ds["PixelData"].VR = "OB"
            ds.file_meta.TransferSyntaxUID = syntax
        else:
            ds.compress(syntax)
        if header_size:
            ds.Rows, ds.Columns = header_size
        paths.append(folder / f"IMG{number:04d}.dcm")
        ds.save_as(paths[-1], enforce_file_format=True)
    return spec, paths


def declare_size(path, rows, columns):
    """Write ``rows`` x ``columns`` into the frame header of the JPEG-LS or JPEG 2000 stream of the file at ``path``:
    a few bytes that make a decoder allocate rows x columns samples."""
    ds = pydicom.dcmread(path)
    frame = bytearray(first_frame(ds))
    if frame[:4] == b"\xff\xd8\xff\xf7":  # SOI, SOF55: Lf, P, Y, X
        struct.pack_into(">HH", frame, 7, rows, columns)
    else:  # SOC, SIZ: Lsiz, Rsiz, Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz
        struct.pack_into(">II", frame, 8, columns, rows)
        struct.pack_into(">II", frame, 24, columns, rows)
    ds.PixelData = encapsulate([bytes(frame)])
    ds.save_as(path)


def jp2_file(code_stream: bytes) -> bytes:
    """``code_stream`` in a JP2 file: signature, file type, a header box with a (wrong) ihdr, then ``jp2c``."""
    def box(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", 8 + len(body)) + kind + body

    ihdr = box(b"ihdr", struct.pack(">IIHBBBB", 7, 7, 1, 15, 7, 0, 0))
    return (box(b"jP  ", b"\r\n\x87\n") + box(b"ftyp", b"jp2 \x00\x00\x00\x00jp2 ") + box(b"jp2h", ihdr)
            + box(b"jp2c", code_stream))


@pytest.mark.parametrize("syntax", CODECS, ids=CODEC_NAMES)
def test_real_streams_declare_their_size(tmp_path, syntax):
    _, paths = compressed_series(tmp_path / "series", syntax, tmp_path=tmp_path)
    frame = first_frame(pydicom.dcmread(paths[0]))
    if syntax == RLELossless:
        assert rle_segment_lengths(frame, ROWS * COLUMNS) == [ROWS * COLUMNS] * 2  # two byte planes of 16 bits
        assert rle_segment_lengths(frame, 5) == [-1, -1]  # far longer than 5 bytes can encode to: not walked
    elif syntax == JPEG2000Lossless:
        assert j2k_frame_size(frame) == FrameSize(ROWS, COLUMNS, 1)
        assert j2k_frame_size(jp2_file(frame)) == FrameSize(ROWS, COLUMNS, 1)  # the code stream's, not ihdr's
        assert jpeg_frame_size(frame) is None
    else:
        assert jpeg_frame_size(frame) == FrameSize(ROWS, COLUMNS, 1)
        assert j2k_frame_size(frame) is None
    assert jpeg_frame_size(b"\xff\xd8\xff\xda\x00\x02") is None  # a scan before any frame header
    with pytest.raises(ValueError, match="cut short"):
        rle_segment_lengths(b"\x01\x00", 10)


@pytest.mark.parametrize("syntax", [JPEGLSLossless, JPEG2000Lossless], ids=["JPEG-LS", "JPEG-2000"])
def test_stream_declaring_a_huge_image_is_refused_before_decoding(tmp_path, syntax):
    """A few bytes of frame header made GDCM allocate what they declare (30000 x 30000 JPEG-LS: 1.9 GB)."""
    _, paths = compressed_series(tmp_path / "series", syntax)
    declare_size(paths[1], 4096, 4096)
    if syntax == JPEG2000Lossless:  # nvImageCodec (--decode) is not handed it either; GDCM's path refuses it
        assert _read_frame(str(paths[0])) is not None and _read_frame(str(paths[1])) is None
    with pytest.raises(DicomError, match=r"IMG0001.dcm: cannot decode pixel data \(.*\): the .* stream declares "
                                         r"4096 x 4096 pixels, the DICOM header \(Rows x Columns\) 40 x 36 pixels"):
        read_volume(tmp_path / "series", progress=False)


@pytest.mark.parametrize("syntax", CODECS, ids=CODEC_NAMES)
def test_stream_of_another_size_than_rows_and_columns_is_refused(tmp_path, syntax):
    """GDCM crops such a stream to Rows x Columns without a word (wrong pixels in the volume)."""
    spec, _ = compressed_series(tmp_path / "good", syntax, tmp_path=tmp_path)
    volume = read_volume(tmp_path / "good", progress=False)
    np.testing.assert_allclose(volume.array[0], spec.slices[0].hu)
    compressed_series(tmp_path / "series", syntax, header_size=(30, 36), tmp_path=tmp_path)
    declared = r"the .*stream declares 40 x 36 pixels, the DICOM header \(Rows x Columns\) 30 x 36 pixels"
    reason = ("RLE segment 1 decodes to 1440 bytes, not to Rows x Columns = 30 x 36 = 1080 bytes"
              if syntax == RLELossless else declared)
    with pytest.raises(DicomError, match=rf"IMG000\d.dcm: cannot decode pixel data \(.*\): {reason}"):
        read_volume(tmp_path / "series", progress=False)
