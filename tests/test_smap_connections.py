"""The parts of ``ctzoo.smap.connections`` that need no running parties: what MPyC's runtime module may still
unpickle from a peer (plain integers only)."""

from __future__ import annotations

import pickle

import pytest

from ctzoo.smap.connections import integers_only


class CreatesFile:
    def __init__(self, path):
        self.path = path

    def __reduce__(self):
        return open, (str(self.path), "w")


def test_the_runtime_unpickles_plain_integers_only(tmp_path):
    assert integers_only(pickle.dumps(7)) == 7 and integers_only(pickle.dumps(-2**200)) == -2**200
    with pytest.raises(pickle.UnpicklingError, match="a peer sent a pickle of io.open: refused"):
        integers_only(pickle.dumps(CreatesFile(tmp_path / "created")))
    assert not (tmp_path / "created").exists()
    for other in ([1, 2], "text", 1.5, True, None):
        with pytest.raises(pickle.UnpicklingError, match="only integers"):
            integers_only(pickle.dumps(other))
