"""``python -m ctzoo`` is the ``ctzoo`` command."""

from ctzoo.cli import main

main()
