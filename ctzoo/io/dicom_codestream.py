"""The size a compressed DICOM frame declares in its own stream, read before anything decodes it.

A decoder allocates what the stream says, not what the DICOM header's Rows x Columns say: a 6 KB JPEG-LS slice whose
frame header declares 30000 x 30000 made GDCM allocate 1.9 GB, a 362-byte JPEG 2000 stream declaring 8192 x 8192
466 MB; and a stream of another size than Rows x Columns is cropped by GDCM without a word. So the first frame of
every compressed slice is compared with its header before it is decoded (:func:`frame_size_problem`):

* JPEG and JPEG-LS: the frame header (SOFn, SOF55 for JPEG-LS): lines, samples per line, components;
* JPEG 2000: the SIZ marker of the code stream (inside the ``jp2c`` box of a JP2 file): the image area, components;
* RLE: the segment count, and how many bytes each segment decodes to, found by walking its PackBits runs (the walk
  allocates nothing; a segment too long to decode to Rows x Columns is refused without walking it).

The parsers are small pure functions on bytes; they read headers only (the first bytes of the frame).
"""

from __future__ import annotations

import struct
from dataclasses import dataclass

import pydicom
from pydicom.encaps import generate_frames
from pydicom.uid import UID, JPEG2000TransferSyntaxes, JPEGLSTransferSyntaxes, JPEGTransferSyntaxes, RLELossless

#: JPEG frame header markers (SOF0-SOF15 less DHT, JPG and DAC, which share the range) and JPEG-LS's SOF55.
JPEG_FRAME_MARKERS = frozenset({*range(0xC0, 0xD0)} - {0xC4, 0xC8, 0xCC} | {0xF7})
#: JPEG markers that stand alone, without a length: TEM, RST0-7, SOI, EOI.
JPEG_STANDALONE_MARKERS = frozenset({0x01, *range(0xD0, 0xDA)})
JPEG_START_OF_SCAN = 0xDA
RLE_HEADER_BYTES = 64


@dataclass(frozen=True)
class FrameSize:
    """A frame's size: rows, columns and samples (components) per pixel."""

    rows: int
    columns: int
    samples: int = 1

    def __str__(self) -> str:
        return f"{self.rows} x {self.columns} pixels" + (f" of {self.samples} samples" if self.samples != 1 else "")


def jpeg_frame_size(stream: bytes) -> FrameSize | None:
    """The size a JPEG or JPEG-LS stream's frame header (SOFn / SOF55) declares; None where the stream is no JPEG
    (no SOI) or ends or starts its scan before a frame header."""
    if stream[:2] != b"\xff\xd8":
        return None
    position = 2
    while position + 4 <= len(stream):
        if stream[position] != 0xFF:
            return None
        marker = stream[position + 1]
        if marker == 0xFF:  # a fill byte before a marker
            position += 1
        elif marker in JPEG_STANDALONE_MARKERS:
            position += 2
        elif marker == JPEG_START_OF_SCAN:
            return None
        elif marker in JPEG_FRAME_MARKERS:
            if position + 10 > len(stream):
                return None
            # Lf (2 bytes), P (1), Y lines (2), X samples per line (2), Nf components (1)
            lines, per_line = struct.unpack_from(">HH", stream, position + 5)
            return FrameSize(lines, per_line, stream[position + 9])
        else:
            position += 2 + int.from_bytes(stream[position + 2:position + 4], "big")
    return None


def j2k_frame_size(stream: bytes) -> FrameSize | None:
    """The image area and component count the SIZ marker of a JPEG 2000 code stream declares, the stream bare
    (SOC, SIZ) or in a JP2 file's ``jp2c`` box (what the decoder allocates from); None where there is none."""
    if stream[4:8] == b"jP  ":
        stream = _jp2_code_stream(stream)
    if stream[:4] != b"\xff\x4f\xff\x51" or len(stream) < 44:
        return None
    # after SOC and SIZ's marker: Lsiz, Rsiz (2 bytes each), Xsiz, Ysiz, XOsiz, YOsiz, XTsiz, YTsiz, XTOsiz, YTOsiz
    # (4 bytes each), Csiz (2)
    width, height, x_offset, y_offset = struct.unpack_from(">IIII", stream, 8)
    (components,) = struct.unpack_from(">H", stream, 40)
    return FrameSize(height - y_offset, width - x_offset, components)


def _jp2_code_stream(stream: bytes) -> bytes:
    """The contents of a JP2 file's ``jp2c`` box (b'' if it has none), walking the top-level boxes."""
    position = 0
    while position + 8 <= len(stream):
        length, kind = struct.unpack_from(">I4s", stream, position)
        header = 8
        if length == 1:  # the length follows as 8 bytes
            if position + 16 > len(stream):
                return b""
            (length,) = struct.unpack_from(">Q", stream, position + 8)
            header = 16
        if kind == b"jp2c":
            return stream[position + header:] if length == 0 else stream[position + header:position + length]
        if length < header:  # 0 (to the end of the file) on any other box, or a length shorter than its header
            return b""
        position += length
    return b""


def rle_segment_lengths(frame: bytes, expected: int) -> list[int]:
    """How many bytes each segment of an RLE frame decodes to (DICOM PS3.5 G: a 64-byte header holding the segment
    count and offsets, then one PackBits segment per byte plane). A segment longer than a PackBits encoding of
    ``expected`` bytes can be is not walked: its length is given as -1. ValueError for a damaged header."""
    if len(frame) < RLE_HEADER_BYTES:
        raise ValueError(f"the RLE header is cut short ({len(frame)} bytes)")
    count, *offsets = struct.unpack_from("<16I", frame)
    if not 1 <= count <= 15:
        raise ValueError(f"the RLE header gives {count} segments (1 to 15 allowed)")
    bounds = [*offsets[:count], len(frame)]
    if bounds[0] != RLE_HEADER_BYTES or any(b > a for a, b in zip(bounds[1:], bounds)):
        raise ValueError(f"the RLE segment offsets {bounds[:-1]} do not lie in order within its {len(frame)} bytes")
    longest = 2 * expected + 2  # every byte a literal run of one, plus a pad byte
    return [_packbits_length(frame, start, end) if end - start <= longest else -1
            for start, end in zip(bounds, bounds[1:])]


def _packbits_length(data: bytes, start: int, end: int) -> int:
    """Bytes the PackBits runs in ``data[start:end]`` decode to (a run cut short by ``end`` counts what is there)."""
    length, position = 0, start
    while position < end:
        header = data[position]
        if header < 128:  # a literal run of header + 1 bytes
            length += min(header + 1, end - position - 1)
            position += header + 2
        elif header > 128:  # the next byte, 257 - header times
            length += 257 - header if position + 1 < end else 0
            position += 2
        else:  # 128: no operation
            position += 1
    return length


def frame_size_problem(ds: pydicom.Dataset) -> str:
    """Why the first frame of ``ds``'s compressed pixel data is not the size its header gives (Rows x Columns,
    SamplesPerPixel), read from the stream's own header before decoding; '' when it is, and for pixel data that is
    not compressed as JPEG, JPEG-LS, JPEG 2000 or RLE."""
    syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
    if not syntax.is_encapsulated or "PixelData" not in ds:
        return ""
    expected = FrameSize(int(ds.Rows), int(ds.Columns), int(ds.get("SamplesPerPixel") or 1))
    try:
        frame = next(generate_frames(ds.PixelData, number_of_frames=1))
    except (StopIteration, ValueError) as exc:
        return f"the encapsulated pixel data holds no frame ({exc or 'empty'})"
    if syntax in JPEGTransferSyntaxes or syntax in JPEGLSTransferSyntaxes:
        return _declared_size_problem("JPEG-LS" if syntax in JPEGLSTransferSyntaxes else "JPEG",
                                      jpeg_frame_size(frame), expected)
    if syntax in JPEG2000TransferSyntaxes:  # HTJ2K included
        return _declared_size_problem("JPEG 2000", j2k_frame_size(frame), expected)
    if syntax == RLELossless:
        return _rle_problem(frame, expected, int(ds.BitsAllocated))
    return ""


def _declared_size_problem(codec: str, declared: FrameSize | None, expected: FrameSize) -> str:
    if declared is None:
        return f"no {codec} frame header found in the pixel data's first frame"
    if declared != expected:
        return f"the {codec} stream declares {declared}, the DICOM header (Rows x Columns) {expected}; not decoded"
    return ""


def _rle_problem(frame: bytes, expected: FrameSize, bits_allocated: int) -> str:
    plane = expected.rows * expected.columns
    try:
        lengths = rle_segment_lengths(frame, plane)
    except ValueError as exc:
        return str(exc)
    planes = expected.samples * -(-bits_allocated // 8)
    if len(lengths) != planes:
        return (f"the RLE frame holds {len(lengths)} segments, the DICOM header asks for {planes} "
                f"(SamplesPerPixel x BitsAllocated / 8); not decoded")
    for number, length in enumerate(lengths, start=1):
        if length != plane:
            decodes = "is too long to decode" if length < 0 else f"decodes to {length} bytes, not"
            return (f"RLE segment {number} {decodes} to Rows x Columns = {expected.rows} x {expected.columns} = "
                    f"{plane} bytes; not decoded")
    return ""
