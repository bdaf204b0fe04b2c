"""Deflated DICOM files (transfer syntax 1.2.840.10008.1.2.1.99) checked before pydicom opens them.

pydicom inflates a deflated data set whole, with no size bound, even when asked to stop before the pixels: a
300 KB file of zeros becomes 640 MB in memory. A CT slice is under a few MB however it is encoded, so a
deflated file may inflate to at most :data:`MAX_INFLATED_BYTES`; the check inflates it in pieces and keeps
nothing, so neither memory nor time grows with what the file claims.
"""

from __future__ import annotations

import zlib

import pydicom
from pydicom.uid import DeflatedExplicitVRLittleEndian

from ctzoo.io.limits import INFLATE_ALLOWANCE

#: What one deflated DICOM file may inflate to (a 2048 x 2048 16-bit slice with its header is ~8 MiB).
MAX_INFLATED_BYTES = INFLATE_ALLOWANCE
_PIECE = 1 << 20
_FILE_META_SEARCH_BYTES = 4096
_PREAMBLE_AND_PREFIX = 128 + 4
_GROUP_LENGTH_ELEMENT = 12  # tag, "UL", length, value: explicit VR little endian


def inflated_size_past(compressed: bytes | bytearray, stream, limit: int) -> int | None:
    """Bytes the raw deflate data (``compressed``, then whatever ``stream`` still holds) inflates to; None once
    that passes ``limit`` (inflation stops there)."""
    inflater = zlib.decompressobj(-zlib.MAX_WBITS)
    total, pending = 0, bytes(compressed)
    while True:
        while pending:
            total += len(inflater.decompress(pending, _PIECE))
            pending = inflater.unconsumed_tail
            if total > limit:
                return None
        if inflater.eof:
            return total
        pending = stream.read(_PIECE)
        if not pending:
            return total + len(inflater.flush())


def declares_deflate(stream) -> bool:
    """Whether the DICOM file ``stream`` is at the start of names the deflated transfer syntax in its file meta
    (searched for in its first bytes, where the file meta lies); the stream is put back where it was."""
    start = stream.tell()
    head = stream.read(_FILE_META_SEARCH_BYTES)
    stream.seek(start)
    return DeflatedExplicitVRLittleEndian.encode() in head


def deflated_problem(path: str, limit: int = MAX_INFLATED_BYTES) -> str:
    """Why the file at ``path`` must not be handed to pydicom ("" when it may): a deflated data set that
    inflates past ``limit`` bytes, or one that is not valid deflate data. Files of other transfer syntaxes
    (and files that are not DICOM) are left to the reader."""
    try:
        meta = pydicom.filereader.read_file_meta_info(path)
    except Exception:  # not DICOM, or damaged in its file meta: the reader says which
        return ""
    if meta.get("TransferSyntaxUID") != DeflatedExplicitVRLittleEndian:
        return ""
    group_length = meta.get("FileMetaInformationGroupLength")
    if not isinstance(group_length, int):
        return "a deflated data set whose file meta states no group length (0002,0000); not read"
    with open(path, "rb") as stream:
        # the deflated data set begins after the preamble, "DICM", the group length element and its group
        stream.seek(_PREAMBLE_AND_PREFIX + _GROUP_LENGTH_ELEMENT + group_length)
        try:
            size = inflated_size_past(b"", stream, limit)
        except zlib.error as exc:
            return f"corrupt deflated DICOM data set ({exc})"
    if size is None:
        return (f"its deflated data set inflates to over {limit >> 20} MiB, more than a CT slice can hold; "
                "not read")
    return ""
