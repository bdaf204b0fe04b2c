"""How large an input may be, checked from its header before anything is allocated.

Every reader of ``ctzoo.io`` takes a :class:`ResourceLimits` (the defaults when none is given), so ``ctzoo infer``,
the PACS bridge and the service's study endpoints share one set of rules:

* **voxels per volume** (``max_volume_voxels``, default 512 x 512 x 2048): a NIfTI, NRRD or MHA header's
  dimensions, or a DICOM series' Rows x Columns x slices, are checked before the voxels are read;
* **decoded bytes per input** (``max_decoded_mb``): what an input turns into once decompressed (a gzipped NIfTI,
  a compressed NRRD/MHA, the members of a zip), from the header or the zip's directory, and counted again while
  inflating, because a crafted archive can declare small sizes;
* **inflation ratio** (``max_inflate_ratio``): decoded bytes per byte received, beyond a small allowance
  (``INFLATE_ALLOWANCE``) so small synthetic volumes pass: a 2 MB zip or a 69-byte ``.nii.gz`` cannot make the
  reader write or allocate gigabytes;
* **members per zip** (``max_zip_members``, default 20,000): counted in the archive's directory before anything is
  extracted or read, because empty members pass both limits above and each costs a file and a header read;
* **self-contained files only** (``self_contained_only``, the service's setting for uploads): an MHA/NRRD header
  that names another file for its voxels (``ElementDataFile``, ``data file``) is refused before anything is
  opened, and the message never repeats the path (no file-existence oracle).

A refusal is :class:`LimitExceeded` (a ``ValueError``; the service answers 413) or :class:`UnsafeInput` (400),
with a message naming the limit and the option that raises it.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path

#: Inputs may always decode to this many bytes, whatever their compression ratio (synthetic phantoms compress
#: far better than CT); the ratio limit applies beyond it.
INFLATE_ALLOWANCE = 64 << 20
#: Bytes of an MHA/NRRD file searched for its header.
HEADER_SEARCH_BYTES = 64 << 10


class LimitExceeded(ValueError):
    """An input is larger than a :class:`ResourceLimits` limit allows; ``option`` names the setting to raise."""

    def __init__(self, message: str, option: str) -> None:
        super().__init__(f"{message} (raise it with {option})")
        self.option = option


class UnsafeInput(ValueError):
    """An input that would make the reader open another file (a detached-data header)."""


@dataclass(frozen=True)
class ResourceLimits:
    """The size limits applied to one input (see the module docstring)."""

    max_volume_voxels: int = 512 * 512 * 2048
    max_decoded_mb: float = 2048
    max_inflate_ratio: float = 100
    self_contained_only: bool = False
    max_zip_members: int = 20_000

    @property
    def max_decoded_bytes(self) -> int:
        return int(self.max_decoded_mb * (1 << 20))

    def check_voxels(self, shape: tuple[int, ...], what: str) -> int:
        """The voxel count of ``shape``; :class:`LimitExceeded` past ``max_volume_voxels``."""
        voxels = math.prod(int(s) for s in shape)
        if voxels > self.max_volume_voxels:
            dims = " x ".join(str(int(s)) for s in shape)
            raise LimitExceeded(f"{what} declares {dims} = {voxels:,} voxels, over the limit of "
                                f"{self.max_volume_voxels:,} voxels per volume", "--max-volume-voxels")
        return voxels

    def check_members(self, members: int, what: str) -> None:
        """:class:`LimitExceeded` when an archive holds more than ``max_zip_members`` entries."""
        if members > self.max_zip_members:
            raise LimitExceeded(f"{what} holds {members:,} members, over the limit of {self.max_zip_members:,} per "
                                "archive", "--max-zip-members")

    def decoded_limit(self, received_bytes: int) -> int:
        """How many bytes an input of ``received_bytes`` may decode to: ``max_decoded_mb``, and at most
        ``max_inflate_ratio`` times its size beyond the allowance."""
        return min(self.max_decoded_bytes, max(INFLATE_ALLOWANCE, int(self.max_inflate_ratio * received_bytes)))

    def check_decoded(self, decoded_bytes: int, received_bytes: int | None, what: str) -> None:
        """:class:`LimitExceeded` when ``decoded_bytes`` from an input of ``received_bytes`` is too many
        (``received_bytes=None``: the input's size is unknown, only ``max_decoded_mb`` applies)."""
        if decoded_bytes > self.max_decoded_bytes:
            raise LimitExceeded(f"{what} decodes to {decoded_bytes / (1 << 20):,.0f} MiB, over the "
                                f"{self.max_decoded_mb:g} MiB limit per input", "--max-decoded-mb")
        if received_bytes is not None and decoded_bytes > self.decoded_limit(received_bytes):
            raise LimitExceeded(f"{what} decodes to {decoded_bytes / (1 << 20):,.0f} MiB from "
                                f"{received_bytes:,} bytes, more than {self.max_inflate_ratio:g} times its size",
                                "--max-inflate-ratio")


DEFAULT_LIMITS = ResourceLimits()

_METAIMAGE_DATA_FILE = re.compile(rb"^\s*ElementDataFile\s*=\s*(\S.*?)\s*$", re.MULTILINE)
_NRRD_DATA_FILE = re.compile(rb"^data ?file\s*:", re.MULTILINE | re.IGNORECASE)


def check_self_contained(path: str | Path) -> None:
    """:class:`UnsafeInput` when the MHA/NRRD header of ``path`` names another file for its voxels.

    Only the header is read (text up to the first blank line for NRRD, up to ``ElementDataFile`` for MetaImage);
    the named file is never opened and the message does not repeat its name.
    """
    with open(path, "rb") as stream:
        head = stream.read(HEADER_SEARCH_BYTES)
    if head.startswith(b"NRRD"):
        header = re.split(rb"\r?\n\r?\n", head, maxsplit=1)[0]
        if _NRRD_DATA_FILE.search(header):
            raise UnsafeInput("the NRRD header names a separate data file ('data file:'); only NRRD files that "
                              "carry their voxels are accepted")
        return
    match = _METAIMAGE_DATA_FILE.search(head)
    if match is None:
        raise UnsafeInput("the MetaImage header has no ElementDataFile line within its first "
                          f"{HEADER_SEARCH_BYTES >> 10} KiB")
    if match.group(1) != b"LOCAL":
        raise UnsafeInput("the MetaImage header names a separate data file (ElementDataFile); only MHA files "
                          "with ElementDataFile = LOCAL are accepted")
