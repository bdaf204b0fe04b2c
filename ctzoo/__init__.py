"""ctzoo: a CT model zoo and inference service.

Subpackages: :mod:`ctzoo.io` (CT volumes), :mod:`ctzoo.datasets`, :mod:`ctzoo.models`,
:mod:`ctzoo.training`, :mod:`ctzoo.scaling`, :mod:`ctzoo.serve`.
"""

__version__ = "0.1.0"
