"""ctzoo: a CT model zoo and inference service.

Subpackages: :mod:`ctzoo.io` (CT volumes), :mod:`ctzoo.datasets`, :mod:`ctzoo.models`,
:mod:`ctzoo.training`, :mod:`ctzoo.scaling`, :mod:`ctzoo.serve`.
"""

import os

# ONNX Runtime >= 1.32 on Linux starts Microsoft's 1DS telemetry when imported: a session file in $TMPDIR, an
# event store under ~/.cache/Microsoft and uploads. Patient-facing services must not phone home, so it is off
# unless the user sets ORT_DISABLE_TELEMETRY=0 (read when onnxruntime is imported, always after this line).
os.environ.setdefault("ORT_DISABLE_TELEMETRY", "1")


def _import_nvimgcodec_quietly() -> None:
    """nvImageCodec, where installed, imported now with its loading messages kept (ctzoo._quiet_import): MONAI
    imports it too, and would let it print a line per CUDA library it lacks on every command."""
    from ctzoo import _quiet_import

    if _quiet_import.installed("nvidia.nvimgcodec"):
        os.environ.setdefault("PYNVIMGCODEC_VERBOSITY", "0")  # its own logging; the loader prints regardless
        os.environ.setdefault("OPENCV_LOG_LEVEL", "FATAL")  # its CPU backend's OpenCV: a warning per slice
        try:
            _quiet_import.quiet_import("nvidia.nvimgcodec")
        except Exception:  # a broken install: ctzoo.io.nvimgcodec_decode reports it where it is asked for
            pass


_import_nvimgcodec_quietly()

__version__ = "0.1.0"
