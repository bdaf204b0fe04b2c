"""Builders of uploads for the service's and readers' tests: zips, MetaImage headers, NIfTI headers."""

from __future__ import annotations

import io
import struct
import zipfile
from collections.abc import AsyncIterator


def mha_header(data_file: str, size: str = "512 512 512") -> bytes:
    return (f"ObjectType = Image\nNDims = 3\nDimSize = {size}\nElementType = MET_SHORT\n"
            f"ElementSpacing = 1 1 1\nElementDataFile = {data_file}\n").encode()


def nifti_header(shape: tuple[int, int, int], datatype: int = 4, bitpix: int = 16) -> bytes:
    """A NIfTI-1 single-file header (348 bytes + 4 extension bytes) declaring ``shape`` (1 mm voxels, a qform),
    without voxels."""
    header = bytearray(348)
    struct.pack_into("<i", header, 0, 348)
    struct.pack_into("<8h", header, 40, 3, *shape, 1, 1, 1, 1)
    struct.pack_into("<hh", header, 70, datatype, bitpix)
    struct.pack_into("<8f", header, 76, 1, 1, 1, 1, 1, 1, 1, 1)
    struct.pack_into("<f", header, 108, 352.0)
    struct.pack_into("<h", header, 252, 1)  # qform_code 1 (identity quaternion): a file with an orientation
    header[344:348] = b"n+1\x00"
    return bytes(header) + b"\x00" * 4


def zip_bytes(members: dict[str, bytes]) -> bytes:
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return buffer.getvalue()


async def held_open(body: bytes, release) -> AsyncIterator[bytes]:
    """``body`` sent in part, the rest once ``release`` (an ``asyncio.Event``) is set: a client still uploading."""
    yield body[:10]
    await release.wait()
    yield body[10:]
