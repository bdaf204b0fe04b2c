"""Which files a MetaImage (``.mhd``) or NRRD (``.nhdr``) header makes the reader open for its voxels.

Such a header is a few lines of text; the voxels are elsewhere, named by ``ElementDataFile`` (MetaImage) or
``data file`` (NRRD) in one of three forms, relative to the header's folder unless absolute:

* one file name (``ElementDataFile = ct.raw``, ``data file: ct.raw.gz``);
* ``LIST``: the file names follow, one per line, to the end of the header;
* a printf pattern over a range, ``slice%03d.raw 1 120 1`` (first, last and step; a dimension may follow).

``LOCAL`` (MetaImage) or no such field (NRRD) means the voxels follow the header in the same file. What a batch
run reads from an input is the header *and* these files: ``ctzoo infer --resume`` must see either change
(:mod:`ctzoo.inference.resume`).
"""

from __future__ import annotations

import re
from pathlib import Path

from ctzoo.io.limits import HEADER_SEARCH_BYTES

_METAIMAGE_FIELD = re.compile(r"^\s*ElementDataFile\s*=\s*(.*?)\s*$")
_NRRD_FIELD = re.compile(r"^data ?file\s*:\s*(.*?)\s*$", re.IGNORECASE)


def detached_data_files(path: str | Path) -> list[Path]:
    """The files the header at ``path`` names for its voxels (see the module docstring); ``[]`` where its voxels
    are in the file itself (``LOCAL``, an attached NRRD) or it is no MetaImage/NRRD header at all."""
    path = Path(path)
    with open(path, "rb") as stream:
        text = stream.read(HEADER_SEARCH_BYTES).decode("latin-1")
    if text.startswith("NRRD"):
        lines, field = re.split(r"\r?\n\r?\n", text, maxsplit=1)[0].splitlines(), _NRRD_FIELD
    else:
        lines, field = text.splitlines(), _METAIMAGE_FIELD
    for number, line in enumerate(lines):
        match = field.match(line)
        if match:
            return [path.parent / name for name in _named_files(match.group(1), lines[number + 1:])]
    return []


def _named_files(value: str, following: list[str]) -> list[str]:
    """The file names a data-file field's ``value`` gives, ``following``: the header's lines after the field."""
    tokens = value.split()
    if not tokens or value.upper() == "LOCAL":
        return []
    if tokens[0].upper() == "LIST":
        return [line.strip() for line in following if line.strip()]
    if "%" in tokens[0] and len(tokens) in (4, 5) and all(re.fullmatch(r"-?\d+", t) for t in tokens[1:]):
        first, last, step = (int(t) for t in tokens[1:4])
        try:
            if step != 0:
                return [tokens[0] % k for k in range(first, last + (1 if step > 0 else -1), step)]
        except (TypeError, ValueError):  # not a pattern of one integer after all: a file name with a % in it
            pass
    return [value]
