"""``python tests/smap_evil_party.py MARKER ctzoo-arguments...``: the ``ctzoo`` command as a party that follows the
protocol to its end, then ends as MPyC's ``shutdown`` does (its barrier, ``transfer``, pickles an integer for every
peer and unpickles what they send) with every pickled integer replaced by a pickle that, when a peer unpickles it,
creates the file MARKER: the test that no party unpickles what a peer sends."""

from __future__ import annotations

import pickle
import sys

from ctzoo.cli import main

real_dumps = pickle.dumps


class CreatesMarker:
    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self):
        return open, (self.path, "w")  # any callable: unpickling calls it with these arguments


async def mpyc_shutdown(mpc, *args, **kwargs) -> None:
    await mpc.shutdown()


if __name__ == "__main__":
    marker, arguments = sys.argv[1], sys.argv[2:]
    pickle.dumps = lambda obj, *a, **k: real_dumps(CreatesMarker(marker) if isinstance(obj, int) else obj, *a, **k)
    import ctzoo.smap.party

    ctzoo.smap.party.close_connections = mpyc_shutdown  # end with MPyC's own pickling barrier
    sys.argv = [sys.argv[0], *arguments]
    main()
