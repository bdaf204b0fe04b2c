"""Whether an MHA file holds the voxels its header declares, checked before SimpleITK reads them.

ITK's MetaImage reader fills what compressed data lacks with zeros, silently: an MHA whose ``DimSize`` says 40
slices and whose data holds 20 reads as 20 slices of CT and 20 of 0 HU. A file cut short is refused by ITK, but as
"No such file or directory". So the data after the header is measured first, as NRRD's reader measures it: raw
data by its length, compressed data by its length against ``CompressedDataSize`` and then by inflating it, a
megabyte at a time and keeping nothing: as long again as ITK's own read of it (1.6 s for 512 x 512 x 300 of
noise; CT compresses, and inflates, faster). Run beside ITK's read in a thread it took longer, not shorter.
"""

from __future__ import annotations

import zlib
from pathlib import Path

from ctzoo.io.limits import HEADER_SEARCH_BYTES

_CHUNK = 1 << 20


def _local_header(path: Path) -> tuple[dict[str, str], int] | None:
    """The MetaImage header fields of ``path`` and where its voxel data starts, or None where the voxels are not
    right after the header (another file's, ``HeaderSize`` set, text data) or it is no MetaImage header: ITK
    reports those itself."""
    with open(path, "rb") as stream:
        head = stream.read(HEADER_SEARCH_BYTES)
    fields, start = {}, 0
    while (end := head.find(b"\n", start)) >= 0:
        key, equals, value = head[start:end].decode("latin-1").partition("=")
        if not equals:
            return None
        fields[key.strip()] = value.strip()
        start = end + 1
        if key.strip() == "ElementDataFile":
            local = (value.strip() == "LOCAL" and fields.get("BinaryData", "True") == "True"
                     and fields.get("HeaderSize", "0") == "0")
            return (fields, start) if local else None
    return None


def check_metaimage_data(path: str | Path, decoded_bytes: int) -> None:
    """``ValueError`` naming ``path`` when the MHA at ``path`` holds fewer bytes of voxel data than the
    ``decoded_bytes`` its header declares (``DimSize`` x channels x the element size), raw or once inflated, or
    fewer compressed bytes than its ``CompressedDataSize``. Files whose voxels are elsewhere (``.mhd`` with a data
    file) are not checked."""
    path = Path(path)
    header = _local_header(path)
    if header is None:
        return
    fields, start = header
    stored = path.stat().st_size - start
    if fields.get("CompressedData", "False") != "True":
        if stored < decoded_bytes:
            raise ValueError(f"{path}: truncated: {stored:,} of {decoded_bytes:,} bytes of voxel data")
        return
    declared = fields.get("CompressedDataSize", "")
    compressed = int(declared) if declared.isdigit() else stored
    if stored < compressed:
        raise ValueError(f"{path}: truncated: {stored:,} of {compressed:,} bytes of compressed voxel data")
    inflated = _inflated_size(path, start, compressed, decoded_bytes)
    if inflated < decoded_bytes:
        raise ValueError(f"{path}: truncated or a wrong DimSize ({fields.get('DimSize', '?')}): its compressed "
                         f"voxel data inflates to {inflated:,} bytes, not the {decoded_bytes:,} the header declares")


def _inflated_size(path: Path, start: int, compressed: int, enough: int) -> int:
    """How many bytes the ``compressed`` bytes at ``start`` of ``path`` inflate to, counted up to ``enough``
    (more is never needed): zlib or gzip data, inflated a megabyte at a time and dropped."""
    inflater, inflated, left = zlib.decompressobj(32 + zlib.MAX_WBITS), 0, compressed
    with open(path, "rb") as stream:
        stream.seek(start)
        try:
            while left > 0 and not inflater.eof and inflated < enough:
                pending = stream.read(min(_CHUNK, left))
                if not pending:
                    break
                left -= len(pending)
                while pending and inflated < enough:
                    inflated += len(inflater.decompress(pending, _CHUNK))
                    pending = inflater.unconsumed_tail
            if inflated < enough:
                inflated += len(inflater.flush())  # what zlib still holds once the input is consumed
        except zlib.error as exc:
            raise ValueError(f"{path}: damaged: its compressed voxel data does not inflate ({exc})") from exc
    return inflated
