"""ctzoo: a CT model zoo and inference service.

Subpackages: :mod:`ctzoo.io` (CT volumes), :mod:`ctzoo.datasets`, :mod:`ctzoo.models`,
:mod:`ctzoo.training`, :mod:`ctzoo.scaling`, :mod:`ctzoo.serve`.
"""

import os

# ONNX Runtime >= 1.32 on Linux starts Microsoft's 1DS telemetry when imported: a session file in $TMPDIR, an
# event store under ~/.cache/Microsoft and uploads. Patient-facing services must not phone home, so it is off
# unless the user sets ORT_DISABLE_TELEMETRY=0 (read when onnxruntime is imported, always after this line).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")

__version__ = "0.1.0"
