"""``python tests/smap_recording_party.py RECORD.npz ctzoo-arguments...``: the ``ctzoo`` command, recording every
field element this process receives from its peers (MPyC decodes all of them, shares of inputs, products and
openings alike, with ``FiniteFieldElement.from_bytes`` once the parties run with ``--mix32-64bit``, as
``ctzoo smap party`` does), as ``value / modulus`` per modulus, for the test that they look uniform."""

from __future__ import annotations

import atexit
import sys

import numpy as np

from ctzoo.cli import main

received: dict[int, list[float]] = {}
decoders = []  # MPyC's own from_bytes, once imported


def recording_from_bytes(cls, data):
    values = decoders[0](cls, data)
    received.setdefault(int(cls.order), []).extend(v / cls.order for v in values)
    return values


def save(path: str) -> None:
    with open(path, "wb") as handle:
        np.savez(handle, **{f"modulus_{modulus}": np.asarray(values) for modulus, values in received.items()})


if __name__ == "__main__":
    record, arguments = sys.argv[1], sys.argv[2:]
    sys.argv = [sys.argv[0], "--no-log"]  # mpyc parses the command line when first imported: give it its own
    from mpyc import finfields

    decoders.append(finfields.FiniteFieldElement.from_bytes.__func__)
    finfields.FiniteFieldElement.from_bytes = classmethod(recording_from_bytes)
    sys.argv = [sys.argv[0], *arguments]
    atexit.register(save, record)
    main()
