"""JPEG 2000 slices of a DICOM series decoded in batches by NVIDIA nvImageCodec (nvJPEG2000 on a GPU).

Why: JPEG 2000 is how many PACS store CT, and its decode bounds inference on a GPU (about 270 slices/s on 16 CPU
processes against about 750 with nvJPEG2000 on one H100, for a model that takes thousands: the figures issue 28
cites, measured before this module existed). nvImageCodec decodes a
whole list of code streams in one call, which is where a GPU decoder wins; so a series' JPEG 2000 frames are handed
over together, :data:`BATCH_FRAMES` at a time (bounded memory), and come back as stored values on the host, where
the usual HU rescale and preprocessing take over.

Results are the reference's or nothing: a slice is decoded here only when it is a plain CT slice (one frame, one
MONOCHROME2 sample of 16 bits allocated) and its decoded image has the header's size and signedness; every other
slice, and every frame nvImageCodec cannot decode, goes through :func:`ctzoo.io.dicom_series.decode_slice_hu`
(GDCM), which also words the error of a corrupt file. :func:`ctzoo.inference.decoding.choose_decoder` uses it only
after the embedded sample CT decodes to identical HU both ways on the device that will run it.

A decoder is named by a picklable spec, ``"nvimgcodec:cuda:0"`` (or ``"nvimgcodec:cpu"``: nvImageCodec's CPU
backend, OpenJPEG, slower than GDCM, used to test this path on machines without a GPU); each process builds its
decoder once (:func:`decoder_for`). Package: ``nvidia-nvimgcodec-cu13`` with ``nvidia-nvjpeg2k-cu13`` (extra
``ctzoo[gpu]``); CUDA work in readers needs spawned processes (the pipeline starts them so).
"""

from __future__ import annotations

import functools
import threading
from concurrent.futures import Executor
from dataclasses import dataclass

import numpy as np
import pydicom
from pydicom.uid import UID

from ctzoo._quiet_import import PRINTED, captured_output, one_line, quiet_import
from ctzoo.io.dicom_codestream import frame_size_problem

__all__ = ["BATCH_FRAMES", "J2K_SYNTAXES", "NvImageCodecDecoder", "decoder_for", "nvimgcodec_installed"]

#: Transfer syntaxes nvImageCodec decodes here: JPEG 2000 (lossless only / any) and High-Throughput JPEG 2000.
J2K_SYNTAXES = frozenset(UID(u) for u in ("1.2.840.10008.1.2.4.90", "1.2.840.10008.1.2.4.91",
                                          "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.202",
                                          "1.2.840.10008.1.2.4.203"))
#: Frames per decode call: a bound on memory (64 x 512 x 512 x 2 bytes = 32 MB decoded at once) that still hands a
#: GPU decoder many streams at a time, which is how it beats CPU threads.
BATCH_FRAMES = 64


def _module():
    """``nvidia.nvimgcodec`` (imported quietly by ``import ctzoo``; ImportError when not installed)."""
    return quiet_import("nvidia.nvimgcodec")


def nvimgcodec_installed() -> bool:
    try:
        _module()
    except ImportError:
        return False
    return True


def _load_messages() -> str:
    return PRINTED.get("nvidia.nvimgcodec", "")


@dataclass
class _Frame:
    """One slice's code stream and what its decoded image must be."""

    data: bytes
    rows: int
    columns: int
    signed: bool


class NvImageCodecDecoder:
    """Batched JPEG 2000 decode on ``device`` (``cuda``, ``cuda:N`` or ``cpu``); see the module docstring."""

    def __init__(self, device: str = "cuda"):
        codec = _module()
        self.device = device
        if device == "cpu":
            backends, device_id = [codec.Backend(codec.BackendKind.CPU_ONLY)], codec.NVIMGCODEC_DEVICE_CPU_ONLY
        elif device.startswith("cuda"):
            backends = [codec.Backend(codec.BackendKind.GPU_ONLY), codec.Backend(codec.BackendKind.HYBRID_CPU_GPU)]
            device_id = int(device.partition(":")[2] or 0)
        else:
            raise ValueError(f"nvImageCodec decodes on cuda, cuda:N or cpu, not {device!r}")
        try:
            self._decoder, printed = captured_output(lambda: codec.Decoder(device_id=device_id, backends=backends))
        except RuntimeError as exc:  # what it printed while loading names the missing library
            raise RuntimeError(f"{exc}; on loading, nvImageCodec printed: {one_line(_load_messages())}"
                               if _load_messages() else str(exc)) from exc
        self.load_messages = "\n".join(text for text in (_load_messages(), printed) if text)
        self._params = codec.DecodeParams(color_spec=codec.ColorSpec.UNCHANGED, allow_any_depth=True)
        # one decoder per process is shared by every thread reading (the service's concurrent studies); one
        # batch at a time, since nvImageCodec does not promise a Decoder is safe to call from two threads
        self._lock = threading.Lock()

    @property
    def spec(self) -> str:
        return f"nvimgcodec:{self.device}"

    def stored_values(self, paths: list[str], pool: Executor | None = None) -> list[np.ndarray | None]:
        """Each file's stored pixel values, (rows, columns) int16 or uint16 as its PixelRepresentation says; None
        for a file this decoder does not take or could not decode (its caller's reference path takes it).
        ``pool``: threads to read the files with (pydicom releases the GIL in file reads)."""
        frames = list(pool.map(_read_frame, paths) if pool is not None else map(_read_frame, paths))
        decoded: list[np.ndarray | None] = [None] * len(paths)
        for start in range(0, len(paths), BATCH_FRAMES):
            block = list(range(start, min(start + BATCH_FRAMES, len(paths))))
            for index, image in zip(block, self._decode([frames[i] for i in block])):
                decoded[index] = image
        return decoded

    def _decode(self, frames: list[_Frame | None]) -> list[np.ndarray | None]:
        codec = _module()
        streams, where = [], []
        for index, frame in enumerate(frames):
            if frame is None:
                continue
            try:
                streams.append(codec.CodeStream(frame.data))
            except RuntimeError:  # not a JPEG 2000 code stream nvImageCodec can parse
                continue
            where.append(index)
        results: list[np.ndarray | None] = [None] * len(frames)
        try:
            with self._lock:
                images = self._decoder.decode(streams, params=self._params) if streams else []
        except Exception:  # the device failed the whole batch (out of memory, a lost GPU): GDCM takes it
            return results
        for index, image in zip(where, images):
            results[index] = None if image is None else _checked(np.asarray(image.cpu()), frames[index])
        return results


def _read_frame(path: str) -> _Frame | None:
    """The single JPEG 2000 frame of a plain CT slice file, else None."""
    try:
        ds = pydicom.dcmread(path)
        syntax = UID(str(ds.file_meta.get("TransferSyntaxUID", "")))
        plain = (syntax in J2K_SYNTAXES and "PixelData" in ds and int(ds.get("NumberOfFrames", 1) or 1) == 1
                 and int(ds.get("SamplesPerPixel", 1)) == 1 and int(ds.BitsAllocated) == 16
                 and str(ds.get("PhotometricInterpretation", "")).upper() == "MONOCHROME2")
        if not plain or frame_size_problem(ds):  # the reference path refuses it, naming the file
            return None
        data = next(pydicom.encaps.generate_frames(ds.PixelData, number_of_frames=1))
        return _Frame(data, int(ds.Rows), int(ds.Columns), int(ds.PixelRepresentation) == 1)
    except Exception:  # any problem: the reference path reads the file again and says what is wrong
        return None


def _checked(image: np.ndarray, frame: _Frame) -> np.ndarray | None:
    """The decoded image as (rows, columns) when it has the header's size and signedness, else None."""
    expected = np.int16 if frame.signed else np.uint16
    if image.dtype != expected or image.size != frame.rows * frame.columns:
        return None
    return image.reshape(frame.rows, frame.columns)


@functools.cache
def decoder_for(spec: str | None) -> NvImageCodecDecoder | None:
    """The decoder a spec names (``nvimgcodec:DEVICE``), built once per process; None for None or ``gdcm``."""
    if spec in (None, "gdcm"):
        return None
    kind, _, device = spec.partition(":")
    if kind != "nvimgcodec" or not device:
        raise ValueError(f"unknown decoder {spec!r}: use gdcm or nvimgcodec:DEVICE")
    return NvImageCodecDecoder(device)
