"""Gradient compressors for distributed training, with the bookkeeping that error feedback needs.

A compressor turns a flat float32 tensor into a smaller *payload* and back. Every compressor states:

* ``payload_bytes(n)``: what one worker sends for ``n`` values (the log counts the exchanged tensors themselves,
  whose bytes are this; at ``N`` workers an all-gathered payload is received ``N - 1`` times);
* ``shared_support``: whether every worker keeps the same coordinates (chosen from a seed all workers share,
  as CSER's GRBS and BytePS' seeded random-k do), so the kept values can be summed by an all-reduce with no
  index exchange; otherwise payloads are all-gathered and decompressed one by one;
* ``unbiased``: whether ``E[decompress(compress(x))] = x`` over the compressor's randomness (random-k and
  random-block with ``scale=True``); top-k and scaled sign are biased and need error feedback. Under error
  feedback the unscaled sparsifiers are the ones to use (``make_compressor`` gives those): scaling by
  ``n / k`` makes the residual grow without bound.

Compressors:

=====================  =======================================  ===========================  ==========
name                   keeps                                    bytes for n values           unbiased
=====================  =======================================  ===========================  ==========
``none``               everything                               4 n                          yes
``block``              one wrapping block of ratio * n          4 ceil(ratio n)              if scaled
``randomk``            ratio * n seeded random coordinates      4 ceil(ratio n)              if scaled
``topk``               the ratio * n largest magnitudes         8 ceil(ratio n) (values+ids) no
``sign``               sign bits, times mean |x| (1-bit SGD)    ceil(n / 8) + 4              no
=====================  =======================================  ===========================  ==========

:class:`ErrorFeedback` keeps, per key (a DDP bucket), what compression dropped and adds it back next time:
``v = x + e; c = C(v); e = v - D(c)`` (so over steps nothing is lost, only delayed).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

__all__ = ["Compressed", "Compressor", "ErrorFeedback", "make_compressor"]


@dataclass
class Compressed:
    """A payload (the tensors that travel) and what decompression needs locally (size, indices from a seed)."""

    tensors: list[torch.Tensor]
    numel: int
    context: dict = field(default_factory=dict)


class Compressor:
    """Base class: subclasses implement :meth:`compress`, :meth:`decompress` and :meth:`payload_bytes`."""

    name = "base"
    shared_support = False
    unbiased = False

    def compress(self, tensor: torch.Tensor, seed: int = 0) -> Compressed:
        raise NotImplementedError

    def decompress(self, compressed: Compressed) -> torch.Tensor:
        raise NotImplementedError

    def payload_bytes(self, numel: int) -> int:
        raise NotImplementedError

    def roundtrip(self, tensor: torch.Tensor, seed: int = 0) -> torch.Tensor:
        return self.decompress(self.compress(tensor, seed))


def _kept(ratio: float, numel: int) -> int:
    return min(numel, max(1, math.ceil(ratio * numel)))


def _check_ratio(ratio: float) -> float:
    if not 0 < ratio <= 1:
        raise ValueError(f"compression ratio must be in (0, 1], got {ratio}")
    return ratio


class NoCompression(Compressor):
    name, shared_support, unbiased = "none", True, True

    def compress(self, tensor: torch.Tensor, seed: int = 0) -> Compressed:
        return Compressed([tensor.clone()], tensor.numel())

    def decompress(self, compressed: Compressed) -> torch.Tensor:
        return compressed.tensors[0]

    def payload_bytes(self, numel: int) -> int:
        return 4 * numel


class _SeededSparsifier(Compressor):
    """Keeps ``ratio * n`` coordinates that every worker derives from the same seed (no indices travel);
    ``scale=True`` multiplies them by ``n / kept`` (unbiased when every coordinate is equally likely kept)."""

    shared_support = True

    def __init__(self, ratio: float, scale: bool = False) -> None:
        self.ratio, self.scale = _check_ratio(ratio), scale
        self.unbiased = scale

    def indices(self, numel: int, seed: int, device=None) -> torch.Tensor:
        """The kept coordinates for a tensor of ``numel`` values at ``seed`` (the same on every worker)."""
        raise NotImplementedError

    def compress(self, tensor: torch.Tensor, seed: int = 0) -> Compressed:
        indices = self.indices(tensor.numel(), seed, tensor.device)
        values = tensor[indices]  # advanced indexing: a copy
        if self.scale:
            values *= tensor.numel() / indices.numel()
        return Compressed([values], tensor.numel(), {"indices": indices})

    def decompress(self, compressed: Compressed) -> torch.Tensor:
        values = compressed.tensors[0]
        out = torch.zeros(compressed.numel, dtype=values.dtype, device=values.device)
        out[compressed.context["indices"]] = values
        return out

    def payload_bytes(self, numel: int) -> int:
        return 4 * _kept(self.ratio, numel)


class RandomBlock(_SeededSparsifier):
    """One contiguous block, wrapping around the end, at an offset drawn from ``seed`` (CSER's globally
    randomised blockwise sparsifier for a flat bucket). Wrapping makes every coordinate equally likely to be
    kept (``ratio``), so ``scale=True`` (times ``n / block``) gives an unbiased estimate."""

    name = "block"

    def indices(self, numel: int, seed: int, device=None) -> torch.Tensor:
        length = _kept(self.ratio, numel)
        offset = int(torch.randint(numel, (1,), generator=torch.Generator().manual_seed(seed)))
        return ((offset + torch.arange(length)) % numel).to(device)


class RandomK(_SeededSparsifier):
    """``ratio * n`` coordinates drawn without replacement from ``seed`` (the same on every worker)."""

    name = "randomk"

    def __init__(self, ratio: float, scale: bool = True) -> None:
        super().__init__(ratio, scale)

    def indices(self, numel: int, seed: int, device=None) -> torch.Tensor:
        generator = torch.Generator().manual_seed(seed)
        return torch.randperm(numel, generator=generator)[: _kept(self.ratio, numel)].to(device)


class TopK(Compressor):
    """The ``ratio * n`` entries of largest magnitude, sent as values and int32 indices."""

    name = "topk"

    def __init__(self, ratio: float) -> None:
        self.ratio = _check_ratio(ratio)

    def compress(self, tensor: torch.Tensor, seed: int = 0) -> Compressed:
        indices = tensor.abs().topk(_kept(self.ratio, tensor.numel()), sorted=False).indices
        return Compressed([tensor[indices].clone(), indices.to(torch.int32)], tensor.numel())

    def decompress(self, compressed: Compressed) -> torch.Tensor:
        values, indices = compressed.tensors
        out = torch.zeros(compressed.numel, dtype=values.dtype, device=values.device)
        out[indices.long()] = values
        return out

    def payload_bytes(self, numel: int) -> int:
        return 8 * _kept(self.ratio, numel)


_BITS = torch.tensor([128, 64, 32, 16, 8, 4, 2, 1], dtype=torch.uint8)


class ScaledSign(Compressor):
    """1-bit compression: the signs packed 8 per byte and one float scale, ``mean |x|`` (so the decompressed
    vector has the input's L1 norm). Zero counts as positive."""

    name = "sign"

    def compress(self, tensor: torch.Tensor, seed: int = 0) -> Compressed:
        numel = tensor.numel()
        bits = (tensor >= 0).to(torch.uint8)
        padded = torch.zeros(math.ceil(numel / 8) * 8, dtype=torch.uint8, device=tensor.device)
        padded[:numel] = bits
        packed = (padded.view(-1, 8) * _BITS.to(tensor.device)).sum(dim=1).to(torch.uint8)
        scale = tensor.abs().mean().reshape(1).to(torch.float32)
        return Compressed([packed, scale], numel)

    def decompress(self, compressed: Compressed) -> torch.Tensor:
        packed, scale = compressed.tensors
        bits = (packed.unsqueeze(1) & _BITS.to(packed.device)).ne(0).reshape(-1)[: compressed.numel]
        return (bits.to(torch.float32) * 2 - 1) * scale

    def payload_bytes(self, numel: int) -> int:
        return math.ceil(numel / 8) + 4


def make_compressor(name: str, ratio: float = 1.0) -> Compressor:
    """``none``, ``block``, ``randomk``, ``topk`` or ``sign`` (``ratio``: the fraction kept; not used by sign)."""
    if name == "none":
        return NoCompression()
    if name == "block":
        return RandomBlock(ratio)
    if name == "randomk":
        return RandomK(ratio, scale=False)  # under error feedback: a scaled (unbiased) one makes the residual grow
    if name == "topk":
        return TopK(ratio)
    if name == "sign":
        return ScaledSign()
    raise ValueError(f"unknown compressor {name!r}: none, block, randomk, topk or sign")


class ErrorFeedback:
    """Per-key residuals of a compressor: :meth:`step` returns the compressed ``x + e`` and keeps ``e = v - D(c)``.

    A residual whose shape no longer matches (DDP rebuilds its buckets after the first iteration) restarts at
    zero."""

    def __init__(self, compressor: Compressor) -> None:
        self.compressor = compressor
        self.errors: dict[object, torch.Tensor] = {}

    def step(self, key: object, tensor: torch.Tensor, seed: int = 0) -> tuple[Compressed, torch.Tensor]:
        """(the payload, its decompressed value) for ``tensor`` plus the residual of ``key``."""
        error = self.errors.get(key)
        value = tensor + error if error is not None and error.shape == tensor.shape else tensor.clone()
        compressed = self.compressor.compress(value, seed)
        decompressed = self.compressor.decompress(compressed)
        self.errors[key] = value - decompressed
        return compressed, decompressed
