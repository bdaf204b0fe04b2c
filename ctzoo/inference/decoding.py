"""How a run decodes DICOM's JPEG 2000: GDCM on CPU threads, or nvImageCodec in batches on the GPU.

nvImageCodec (:mod:`ctzoo.io.nvimgcodec_decode`) is used only after a check on the device that will run it: the
embedded sample CT (20 real JPEG 2000 slices) read with it gives HU identical to GDCM's, every slice decoded by
nvImageCodec itself. ``auto`` (the default of ``ctzoo infer --decode``) takes it on CUDA where it is installed and
the check passes, and GDCM otherwise: on the CPU GDCM is the faster decoder (``benchmarks/dicom_read.py``), and
the Ray engine's readers run where Ray places them, without a GPU of their own.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

__all__ = ["DECODERS", "DecoderChoice", "choose_decoder", "decoder_check"]

DECODERS = ("auto", "gdcm", "nvimgcodec")
INSTALL_HINT = "pip install 'ctzoo[gpu]' (nvidia-nvimgcodec-cu13 and nvidia-nvjpeg2k-cu13)"


@dataclass(frozen=True)
class DecoderChoice:
    """``spec``: ``gdcm`` or ``nvimgcodec:DEVICE`` (what :class:`~ctzoo.inference.pipeline.PipelineOptions`
    takes); ``reason``: why; ``check``: the sample CT check's record where one ran."""

    spec: str
    reason: str
    check: dict[str, Any] | None = field(default=None, compare=False)

    @property
    def pipeline_decoder(self) -> str | None:
        return None if self.spec == "gdcm" else self.spec

    def describe(self) -> str:
        name = "GDCM" if self.spec == "gdcm" else f"nvImageCodec on {self.spec.partition(':')[2]}"
        return f"JPEG 2000 by {name} ({self.reason})"


def decoder_check(spec: str) -> dict[str, Any]:
    """The embedded sample CT read with GDCM and with ``spec``: ``passed`` when every slice was decoded by it and
    the HU are identical; RuntimeError where the decoder cannot be built (with what nvImageCodec printed)."""
    from ctzoo.datasets.samples import sample_ct_dicom
    from ctzoo.io import read_volume
    from ctzoo.io.nvimgcodec_decode import decoder_for

    try:
        decoder = decoder_for(spec)
    except Exception as exc:  # no device, no driver, a missing CUDA library
        raise RuntimeError(f"nvImageCodec could not start on {spec.partition(':')[2]}: {exc}") from exc
    files = sorted(str(p) for p in sample_ct_dicom().iterdir() if p.name.startswith("CT."))
    decoded = sum(values is not None for values in decoder.stored_values(files))
    reference = read_volume(sample_ct_dicom(), progress=False).array
    result = read_volume(sample_ct_dicom(), progress=False, decoder=spec).array
    failures = []
    if decoded < len(files):
        printed = " ".join(decoder.load_messages.split())
        failures.append(f"it decoded {decoded} of the sample's {len(files)} JPEG 2000 slices"
                        + (f" (nvImageCodec: {printed})" if printed else ""))
    differing = int((result != reference).sum())
    if differing:
        failures.append(f"{differing} voxels differ from GDCM's (largest difference "
                        f"{float(np.abs(result - reference).max()):g} HU)")
    return {"decoder": spec, "slices": len(files), "decoded": decoded, "differing_voxels": differing,
            "passed": not failures, "failures": failures}


def choose_decoder(requested: str, device: str, engine: str = "local") -> DecoderChoice:
    """What ``requested`` (:data:`DECODERS`) resolves to on ``device`` (a resolved device: ``cpu``, ``cuda:N``).
    ``nvimgcodec`` asked for must pass :func:`decoder_check` (RuntimeError with its failures otherwise; on the CPU
    it runs nvImageCodec's CPU backend); ValueError for an unknown name or nvimgcodec with the Ray engine."""
    from ctzoo.io.nvimgcodec_decode import nvimgcodec_installed

    if requested not in DECODERS:
        raise ValueError(f"unknown decoder {requested!r}: use one of {', '.join(DECODERS)}")
    if requested == "gdcm":
        return DecoderChoice("gdcm", "asked for")
    if engine != "local":
        if requested == "nvimgcodec":
            raise ValueError("--decode nvimgcodec decodes in this machine's readers: use it with --engine local")
        return DecoderChoice("gdcm", "auto: the Ray engine's readers decode with GDCM")
    if requested == "auto" and not device.startswith("cuda"):
        return DecoderChoice("gdcm", "auto: GDCM on the CPU, faster there than nvImageCodec's CPU backend")
    if not nvimgcodec_installed():
        if requested == "nvimgcodec":
            raise RuntimeError(f"nvImageCodec is not installed: {INSTALL_HINT}")
        return DecoderChoice("gdcm", f"auto: nvImageCodec is not installed; {INSTALL_HINT}")
    spec = f"nvimgcodec:{device}"
    try:
        check = decoder_check(spec)
    except RuntimeError as exc:
        if requested == "nvimgcodec":
            raise
        return DecoderChoice("gdcm", f"auto: {exc}")
    if check["passed"]:
        return DecoderChoice(spec, f"{'auto: ' if requested == 'auto' else ''}identical HU to GDCM on the sample "
                                   f"CT's {check['slices']} slices", check)
    failures = "; ".join(check["failures"])
    if requested == "nvimgcodec":
        raise RuntimeError(f"nvImageCodec on {device} failed its check on the sample CT: {failures}; "
                           "run with --decode gdcm")
    return DecoderChoice("gdcm", f"auto: nvImageCodec failed its check ({failures})", check)
