"""Compressed gradient exchange for DDP: CSER and the two-way compressed method as communication hooks.

Both plug into ``torch.nn.parallel.DistributedDataParallel.register_comm_hook`` and run on any backend (gloo on
CPUs, NCCL on GPUs): a hook receives one bucket of *local* gradients and must return a future holding the
gradients the optimiser will use. Collectives inside the hooks are synchronous (a completed future is returned),
which keeps them correct on gloo, whose future support is partial.

**CSER** (Xie et al., NeurIPS 2020): error reset with partial synchronisation. Each step, the hook averages over
workers one block of every bucket (a globally randomised block, ``ratio`` of it; the same block on every worker
from a shared seed, so no indices travel) and leaves the rest of the gradient local: local models drift apart
("bifurcated local models") by what was not synchronised, their residual error. Every ``period`` steps,
:class:`CSERModelSync` (an optimiser wrapper, since a hook cannot touch parameters) averages a random block of
``reset_ratio`` of all parameters over the workers — the error reset. ``ratio = 1`` is plain synchronous SGD;
``reset_ratio = 1`` resets everything (local SGD with partial gradient sync in between). After the last step
``CSERModelSync.finish_training`` averages the whole model once (counted), so the trained model is the workers'
consensus; before that, each epoch's evaluation and checkpoints see the consensus too (``Compression.consensus``,
one model sent to worker 0 per worker and epoch, logged apart as ``consensus_bytes``). At ``ratio = 1`` the
models never differ, so there are no resets, final average or consensus: its bytes are plain DDP's. Per step,
the training exchange is ``ratio + reset_ratio / period`` of uncompressed DDP's by construction (tested); what
that costs in accuracy on a zoo model is what ``benchmarks/compress.py`` measures, and no run of it is
committed.

**Two-way** (Zhong et al., arXiv 2105.07829; BytePS-Compress): workers compress their gradient with error
feedback, the aggregate is decompressed and averaged, then compressed again by the "server" with its own error
feedback before it goes back down — compression in both directions. In an all-reduce setting every worker plays
the server's part on the identical aggregate (deterministic compressors, shared seeds), so the server's error
state is the same everywhere and costs no communication. With SGD the compressed tensors are the gradients.
With Adam/AdamW they are the workers' local momenta after an uncompressed warm-up, with Adam's variance then
frozen (:class:`ctzoo.scaling.compressed_adam.CompressedMomentumAdam`, 1-bit Adam's design: the paper's own
adaptive rule is not available to us), since compressed gradients fed to Adam train badly.

**PowerSGD** (torch's own hook) is the anchor.

Byte accounting (:class:`CommStats`), per worker and step, from the tensors each collective is given, at ``N``
workers:

* an **all-gather** of a ``p``-byte payload (two-way with sign or top-k, whose kept coordinates differ between
  workers) counts ``p`` sent and ``(N - 1) p`` received: the worker's own payload goes out once and every other
  worker's comes in (a ring all-gather, as gloo and NCCL run it, also forwards the others' payloads, ``(N - 1) p``
  each way on the wire; the count is the logical exchange);
* an **all-reduce** of ``s`` bytes (uncompressed DDP, CSER, PowerSGD's factors and its uncompressed first steps,
  two-way's uncompressed tensors and its shared-support compressors) counts ``s`` sent and ``s`` received, what a
  parameter server would move (a ring all-reduce sends and receives ``2 (N - 1) / N s`` each: the same at 2
  workers, 1.5x at 4);
* two-way's "server" re-compression runs on every worker and moves nothing: it is not counted.

So uncompressed DDP moves ``4 n`` up and ``4 n`` down for ``n`` float32 gradient values at any ``N``, and an
all-gathered method's download grows with ``N``: with sign, ``n / 8`` up and ``(N - 1) n / 8`` down.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
import torch.distributed as dist
from pydantic import Field
from torch import nn

from ctzoo.config import StrictConfig
from ctzoo.scaling.compressed_adam import CompressedMomentumAdam, adam_step_count
from ctzoo.scaling.compressors import Compressed, Compressor, ErrorFeedback, RandomBlock, make_compressor

__all__ = ["CSERModelSync", "CSERState", "CommStats", "Compression", "CompressionConfig", "TwoWayState", "cser_hook",
           "exchange_mean", "setup_compression", "twoway_hook"]


class CompressionConfig(StrictConfig):
    """``distributed:`` in a ``ctzoo train`` config: how DDP exchanges gradients (used under torchrun)."""

    compression: Literal["none", "powersgd", "cser", "twoway"] = "none"
    ratio: float = Field(1 / 32, gt=0, le=1, description="cser: block of each bucket averaged per step; twoway: "
                                                          "fraction kept by topk / randomk / block")
    compressor: Literal["sign", "topk", "randomk", "block"] = Field("sign", description="twoway: worker side")
    server_compressor: Literal["sign", "topk", "randomk", "block", "none"] = Field(
        "sign", description="twoway: the 'server' re-compression of the average (every worker computes it, with "
                            "its own error feedback; it moves no bytes)")
    warmup_steps: int = Field(100, ge=0, description="twoway: uncompressed steps first; then Adam's second "
                                                       "moment is frozen and its momentum is what is compressed "
                                                       "(as 1-bit Adam does; >= 1 with Adam)")
    min_numel: int = Field(1024, ge=0, description="twoway: tensors smaller than this go uncompressed (biases, "
                                                   "norms: compressing them saves little and hurts most)")
    period: int = Field(16, ge=1, description="cser: error reset every this many steps")
    reset_ratio: float = Field(0.25, gt=0, le=1, description="cser: fraction of the parameters averaged per reset")
    powersgd_rank: int = Field(1, ge=1)
    seed: int = 0


@dataclass
class CommStats:
    """Bytes a worker sent (``up``) and received (``down``), and over how many optimiser steps; the collectives
    are counted by :meth:`all_reduced` and :meth:`all_gathered` (see the module's byte accounting)."""

    up: int = 0
    down: int = 0
    steps: int = 0
    values: int = 0  # gradient values per step (set at the first step): the uncompressed reference

    def all_reduced(self, nbytes: int) -> None:
        """An all-reduce of ``nbytes``: as much sent as received."""
        self.up += nbytes
        self.down += nbytes

    def all_gathered(self, nbytes: int, world: int) -> None:
        """An all-gather of ``nbytes`` from each of ``world`` workers: this one's sent, the others' received."""
        self.up += nbytes
        self.down += (world - 1) * nbytes

    def per_step(self) -> float:
        return (self.up + self.down) / max(self.steps, 1)

    def uncompressed_per_step(self) -> float:
        return 8.0 * self.values

    def reset(self) -> None:
        self.up = self.down = self.steps = 0


@dataclass
class _HookState:
    group: Any = None
    seed: int = 0
    step: int = 0
    stats: CommStats = field(default_factory=CommStats)
    _counted: int = 0

    @property
    def world(self) -> int:
        return dist.get_world_size(self.group)

    def bucket_seed(self, bucket_index: int) -> int:
        return (self.seed * 1_000_003 + self.step * 10_007 + bucket_index) % (2**63 - 1)

    def end_bucket(self, bucket, numel: int) -> None:
        self._counted += numel
        if bucket.is_last():
            self.stats.values = self._counted
            self.stats.steps += 1
            self._counted = 0
            self.step += 1


def _nbytes(tensor: torch.Tensor) -> int:
    return tensor.numel() * tensor.element_size()


def _done(tensor: torch.Tensor) -> torch.futures.Future:
    future: torch.futures.Future = torch.futures.Future()
    future.set_result(tensor)
    return future


def exchange_mean(compressor: Compressor, items: list[Compressed], group=None,
                  stats: CommStats | None = None) -> list[torch.Tensor]:
    """For each payload in ``items`` (this worker's), the mean over workers of their decompressed payloads.

    One collective per payload kind for all items: an all-reduce of the kept values when every worker keeps
    the same coordinates, else an all-gather of the concatenated payloads. ``stats`` counts the bytes of the
    tensors the collectives exchange (an all-gather: this worker's payload sent, the other workers' received)."""
    world = dist.get_world_size(group)
    if compressor.shared_support:
        values = torch.cat([item.tensors[0] for item in items])
        dist.all_reduce(values, group=group)
        if stats is not None:
            stats.all_reduced(_nbytes(values))
        parts = (values / world).split([item.tensors[0].numel() for item in items])
        return [compressor.decompress(Compressed([part], item.numel, item.context)) for part, item in zip(parts, items)]
    gathered = []  # per payload kind: per rank, the list of this kind's tensor for every item
    for kind in range(len(items[0].tensors)):
        local = torch.cat([item.tensors[kind].reshape(-1) for item in items])
        ranks = [torch.empty_like(local) for _ in range(world)]
        dist.all_gather(ranks, local, group=group)
        if stats is not None:
            stats.all_gathered(_nbytes(local), world)
        sizes = [item.tensors[kind].numel() for item in items]
        gathered.append([rank.split(sizes) for rank in ranks])
    means = []
    for index, item in enumerate(items):
        total = sum(compressor.decompress(Compressed([kind[rank][index] for kind in gathered], item.numel))
                    for rank in range(world))
        means.append(total / world)
    return means


def _segments(bucket, gradients: torch.Tensor) -> list[int]:
    """Sizes of the bucket's parameters in its flat buffer, so compression works per tensor (as BytePS does:
    one scale per layer, not one for a whole bucket of layers with different gradient magnitudes)."""
    sizes = [g.numel() for g in bucket.gradients()]
    return sizes if sum(sizes) == gradients.numel() else [gradients.numel()]


# ------------------------------------------------------------------------------------------------- CSER


@dataclass
class CSERState(_HookState):
    ratio: float = 1 / 32
    period: int = 16
    reset_ratio: float = 0.25

    @property
    def synchronous(self) -> bool:
        """``ratio >= 1``: every step averages the whole gradient, so the workers' models never differ and the
        resets, the final average and the per-epoch consensus would move bytes for nothing."""
        return self.ratio >= 1


def cser_hook(state: CSERState, bucket):  # -> Future[Tensor]; unannotated: DDP checks the annotation object
    """Average one random block (``state.ratio``) of the bucket over workers; keep the rest of it local."""
    gradients = bucket.buffer()
    if state.ratio >= 1:
        dist.all_reduce(gradients, group=state.group)
        gradients /= state.world
        state.stats.all_reduced(_nbytes(gradients))
    else:
        indices = RandomBlock(state.ratio).indices(gradients.numel(), state.bucket_seed(bucket.index()),
                                                   gradients.device)
        values = gradients[indices]
        dist.all_reduce(values, group=state.group)
        gradients[indices] = values / state.world
        state.stats.all_reduced(_nbytes(values))
    state.end_bucket(bucket, gradients.numel())
    return _done(gradients)


class CSERModelSync:
    """Optimiser wrapper for CSER's error reset: after every ``state.period``-th step, average a random block
    of ``state.reset_ratio`` of all parameters over the workers. Use it in place of the optimiser."""

    def __init__(self, optimizer: torch.optim.Optimizer, model: nn.Module, state: CSERState) -> None:
        self.optimizer, self.state, self.model = optimizer, state, model
        self.parameters = [p for p in model.parameters() if p.requires_grad]
        self.steps = state.step  # a resumed run keeps its reset phase

    def __getattr__(self, name: str) -> Any:  # param_groups, zero_grad, state_dict...: the optimiser's
        return getattr(self.optimizer, name)

    def step(self, closure=None):
        loss = self.optimizer.step(closure)
        self.steps += 1
        if self.steps % self.state.period == 0 and not self.state.synchronous:
            self.reset()
        return loss

    @torch.no_grad()
    def finish_training(self) -> None:
        """Average the whole model over the workers (counted): after the last step the local models still differ
        by their residual errors, and the trained model is their consensus, the same on every worker. Nothing
        to do at ``ratio >= 1``, whose models agree already."""
        if self.state.synchronous:
            return
        flat = torch.nn.utils.parameters_to_vector(self.parameters)
        dist.all_reduce(flat, group=self.state.group)
        torch.nn.utils.vector_to_parameters(flat / self.state.world, self.parameters)
        self.state.stats.all_reduced(_nbytes(flat))

    @torch.no_grad()
    def reset(self) -> None:
        flat = torch.nn.utils.parameters_to_vector(self.parameters)
        indices = RandomBlock(self.state.reset_ratio).indices(flat.numel(), self.state.seed * 7919 + self.steps,
                                                             flat.device)
        values = flat[indices]
        dist.all_reduce(values, group=self.state.group)
        flat[indices] = values / self.state.world
        torch.nn.utils.vector_to_parameters(flat, self.parameters)
        self.state.stats.all_reduced(_nbytes(values))


# ------------------------------------------------------------------------------------------------- two-way


@dataclass
class TwoWayState(_HookState):
    worker: ErrorFeedback = None
    server: ErrorFeedback = None
    min_numel: int = 0
    warmup_steps: int = 0
    #: adaptive mode (Adam): the wrapper whose preconditioned momentum the workers exchange after the warm-up,
    #: instead of their gradients (see :mod:`ctzoo.scaling.compressed_adam`)
    adam: CompressedMomentumAdam | None = None
    #: ``id(parameter)`` -> its name: residuals are kept per parameter, so they follow a tensor when DDP rebuilds
    #: its buckets after the first step (and when a resumed run starts on the initial buckets again)
    names: dict[int, str] = field(default_factory=dict)

    def keys(self, bucket, views: list[torch.Tensor]) -> list[object]:
        """The residual key of each view: its parameter's name, or (bucket, position) for an unsplit bucket."""
        params = bucket.parameters()
        if len(params) != len(views):
            return [(bucket.index(), i) for i in range(len(views))]
        return [self.names.get(id(param), (bucket.index(), i)) for i, param in enumerate(params)]

    def exchanged(self, bucket, views: list[torch.Tensor]) -> tuple[list[torch.Tensor], list[bool]]:
        """What each tensor of the bucket exchanges, and whether uncompressed. With SGD: its gradient, plain for
        the first ``warmup_steps``. With Adam: a parameter past its own warm-up its local preconditioned momentum,
        compressed; one that has not had ``warmup_steps`` Adam steps yet (it got no gradient during the warm-up)
        its gradient, plain, since it has no variance to precondition with (see
        :mod:`ctzoo.scaling.compressed_adam`; the Adam wrapper steps it as plain Adam the same way)."""
        if self.adam is None:
            return views, [self.step < self.warmup_steps] * len(views)
        params = bucket.parameters()
        if len(params) != len(views):
            if any(self.adam.compresses(param) for param in params):
                raise RuntimeError("two-way compression with Adam needs a bucket split per parameter")
            return views, [True] * len(views)
        momentum = [self.adam.compresses(param) for param in params]
        return ([self.adam.local_momentum(param, view) if past else view
                 for param, view, past in zip(params, views, momentum)], [not past for past in momentum])


def twoway_hook(state: TwoWayState, bucket):  # -> Future[Tensor]
    """Worker compression with error feedback, exchange, server re-compression with its own error feedback;
    per parameter tensor of the bucket (tensors under ``state.min_numel`` values, and all of them during the
    warm-up, are averaged uncompressed). In adaptive mode the exchanged tensors are the workers' local Adam
    momenta once each parameter's warm-up is over (:meth:`TwoWayState.exchanged`)."""
    gradients = bucket.buffer()
    seed = state.bucket_seed(bucket.index())
    views, warming = state.exchanged(bucket, list(gradients.split(_segments(bucket, gradients))))
    small = [i for i, view in enumerate(views) if view.numel() < state.min_numel or warming[i]]
    large = [i for i in range(len(views)) if i not in small]
    out = list(views)
    if small:
        plain = torch.cat([views[i] for i in small])
        dist.all_reduce(plain, group=state.group)
        for i, part in zip(small, (plain / state.world).split([views[i].numel() for i in small])):
            out[i] = part
        state.stats.all_reduced(_nbytes(plain))
    if large:
        keys = state.keys(bucket, views)
        sent = [state.worker.step(keys[i], views[i], seed + 7 * i)[0] for i in large]
        # counted as exchanged: sign / top-k payloads are all-gathered (N - 1 others received), shared-support
        # ones all-reduced; the server's re-compression below runs on every worker and moves nothing
        aggregates = exchange_mean(state.worker.compressor, sent, state.group, state.stats)
        for i, aggregate in zip(large, aggregates):
            out[i] = state.server.step(keys[i], aggregate, seed + 7 * i + 1)[1]
    gradients.copy_(torch.cat(out))
    state.end_bucket(bucket, gradients.numel())
    return _done(gradients)


# ------------------------------------------------------------------------------------------------- PowerSGD


def powersgd_bytes(shape: torch.Size, rank: int, min_compression_rate: float = 2.0, element_size: int = 4) -> int:
    """Bytes PowerSGD all-reduces for one gradient tensor (torch's hook): its factors ``P`` and ``Q``,
    ``r (rows + cols)`` values with ``r = min(rank, rows, cols)``, for a matrix (``rows = shape[0]``, the other
    dimensions flattened) worth compressing, ``(rows + cols) r min_compression_rate < rows cols``; all its values
    otherwise (vectors, small matrices)."""
    numel = math.prod(shape)
    rows = shape[0] if len(shape) else 1
    cols = numel // max(rows, 1)
    r = min(rank, rows, cols)
    compressed = r * (rows + cols)
    return element_size * (compressed if compressed * min_compression_rate < numel else numel)


def _powersgd(config: CompressionConfig, stats: CommStats, group):
    from torch.distributed.algorithms.ddp_comm_hooks import powerSGD_hook as powersgd

    state = powersgd.PowerSGDState(process_group=group, matrix_approximation_rank=config.powersgd_rank,
                                   start_powerSGD_iter=2, random_seed=config.seed)
    counter = _HookState(group=group, stats=stats)

    def hook(_, bucket):
        gradients = bucket.buffer()
        if state.iter < state.start_powerSGD_iter:  # torch's hook all-reduces the first steps uncompressed
            stats.all_reduced(_nbytes(gradients))
        else:
            stats.all_reduced(sum(powersgd_bytes(g.shape, state.matrix_approximation_rank, state.min_compression_rate,
                                                 g.element_size()) for g in bucket.gradients()))
        future = powersgd.powerSGD_hook(state, bucket)
        counter.end_bucket(bucket, gradients.numel())
        return future

    return hook


@dataclass
class Compression:
    """What :func:`setup_compression` set up: the optimiser to step (wrapped for CSER, and for two-way with Adam),
    the byte counter (reset it each epoch), and this worker's own state for checkpoints."""

    optimizer: Any
    stats: CommStats
    hook_state: _HookState | None = None

    def local_state(self) -> dict[str, Any]:
        """What this worker holds that worker 0's checkpoint does not, and a resume needs: two-way's
        error-feedback residuals (the worker side differs between workers), CSER's local model and optimiser
        (workers drift apart between resets). Empty for the synchronous modes."""
        if isinstance(self.hook_state, TwoWayState):
            return {"worker": dict(self.hook_state.worker.errors), "server": dict(self.hook_state.server.errors)}
        if isinstance(self.hook_state, CSERState):
            return {"model": self.optimizer.model.state_dict(), "optimizer": self.optimizer.optimizer.state_dict()}
        return {}

    @contextlib.contextmanager
    def consensus(self) -> Iterator[int]:
        """Under CSER the workers' local models differ between resets: for the block, worker 0's model holds their
        average (every floating-point parameter and buffer), which its evaluation and checkpoints then see, and
        its own values come back after it, so training goes on exactly as before. Yields the bytes each worker
        sent worker 0 for it (one reduce of the model); 0 in the synchronous modes, whose models agree already."""
        if not isinstance(self.hook_state, CSERState) or self.hook_state.synchronous:
            yield 0
            return
        tensors = [t for t in self.optimizer.model.state_dict().values() if t.is_floating_point()]
        own = [t.clone() for t in tensors]
        moved = _average_into_worker_0(tensors, self.hook_state.group)
        try:
            yield moved
        finally:
            with torch.no_grad():
                for tensor, value in zip(tensors, own):
                    tensor.copy_(value)

    def load_local_state(self, state: dict[str, Any]) -> None:
        """Restore :meth:`local_state` (after the model and optimiser were loaded from worker 0's checkpoint)."""
        if isinstance(self.hook_state, TwoWayState):
            self.hook_state.worker.errors.update(state["worker"])
            self.hook_state.server.errors.update(state["server"])
        elif isinstance(self.hook_state, CSERState):
            self.optimizer.model.load_state_dict(state["model"])
            self.optimizer.optimizer.load_state_dict(state["optimizer"])


@torch.no_grad()
def _average_into_worker_0(tensors: list[torch.Tensor], group=None) -> int:
    """Replace ``tensors`` on worker 0 by their mean over the workers (one reduce per dtype; the other workers'
    are left as they are); returns the bytes each worker sent."""
    moved = 0
    by_dtype: dict[torch.dtype, list[torch.Tensor]] = {}
    for tensor in tensors:
        by_dtype.setdefault(tensor.dtype, []).append(tensor)
    for same in by_dtype.values():
        flat = torch.cat([t.reshape(-1) for t in same])
        dist.reduce(flat, dst=dist.get_global_rank(group, 0) if group is not None else 0, group=group)
        moved += _nbytes(flat)
        if dist.get_rank(group) == 0:
            flat /= dist.get_world_size(group)
            for tensor, value in zip(same, flat.split([t.numel() for t in same])):
                tensor.copy_(value.view_as(tensor))
    return moved


def setup_compression(ddp_model: nn.parallel.DistributedDataParallel, optimizer: torch.optim.Optimizer,
                      config: CompressionConfig, group=None) -> Compression:
    """Register the hook ``config`` names on ``ddp_model``. ``compression: none`` registers torch's plain
    all-reduce, counted."""
    stats = CommStats()
    if config.compression == "cser":
        state = CSERState(group=group, seed=config.seed, stats=stats, ratio=config.ratio, period=config.period,
                          reset_ratio=config.reset_ratio, step=adam_step_count(optimizer))  # resumed runs
        ddp_model.register_comm_hook(state, cser_hook)
        return Compression(CSERModelSync(optimizer, ddp_model.module, state), stats, state)
    if config.compression == "twoway":
        worker = make_compressor(config.compressor, config.ratio)
        server = make_compressor(config.server_compressor, config.ratio)
        adaptive = any("betas" in group for group in optimizer.param_groups)
        if adaptive:
            optimizer = CompressedMomentumAdam(optimizer, config.warmup_steps)
        state = TwoWayState(group=group, seed=config.seed, stats=stats, worker=ErrorFeedback(worker),
                            server=ErrorFeedback(server), min_numel=config.min_numel,
                            warmup_steps=config.warmup_steps, adam=optimizer if adaptive else None,
                            step=adam_step_count(optimizer.optimizer) if adaptive else 0,  # resumed runs
                            names={id(param): name for name, param in ddp_model.module.named_parameters()})
        ddp_model.register_comm_hook(state, twoway_hook)
        return Compression(optimizer, stats, state)
    if config.compression == "powersgd":
        if dist.get_backend(group) == "gloo" and next(ddp_model.parameters()).is_cuda:
            raise RuntimeError("compression: powersgd needs NCCL for GPU training (one GPU per process): on gloo "
                               "with CUDA tensors torch's PowerSGD hook did not get through one 5-step epoch in "
                               "400 s (measured, torch 2.11)")
        ddp_model.register_comm_hook(None, _powersgd(config, stats, group))
        return Compression(optimizer, stats)
    ddp_model.register_comm_hook(None, _counted_allreduce(stats, group))
    return Compression(optimizer, stats)


def _counted_allreduce(stats: CommStats, group):
    """DDP's own (asynchronous) all-reduce hook, with its bytes counted."""
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    counter = _HookState(group=group, stats=stats)

    def hook(_, bucket):
        gradients = bucket.buffer()
        stats.all_reduced(_nbytes(gradients))
        counter.end_bucket(bucket, gradients.numel())
        if gradients.is_cuda and dist.get_backend(group) == "gloo":
            # processes sharing a GPU: torch's asynchronous hook hung at the end of the run on gloo with CUDA
            # tensors (measured, torch 2.11); a synchronous all-reduce, as the compressing hooks do, does not
            dist.all_reduce(gradients, group=group)
            return _done(gradients.div_(counter.world))
        return default_hooks.allreduce_hook(group, bucket)

    return hook
