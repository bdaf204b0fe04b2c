"""One data loader for a whole training run: its worker processes start once, and each item's random draws come
from (epoch seed, item index) alone.

Why: a loader built anew every epoch (to seed that epoch's shuffle) starts its worker processes every epoch, and
each worker forks, imports and refills its prefetch queue before the first batch (measured in
``benchmarks/train.py``). Workers kept across epochs keep their transforms' random state from one epoch to the
next, though: an epoch would then depend on every epoch before it, and a run resumed from a checkpoint (fresh
workers) would not replay it. So every item's random transforms are seeded from ``(epoch seed, index)`` just before
it is drawn: the augmentation is the same whatever the number of workers, whichever worker draws the item and
whatever ran before, and resume stays bit for bit. An item drawn in the training process itself (no workers) is
drawn on one thread, as a worker draws it, so that its bytes are the worker's too.

Iterate an :class:`EpochLoader` once per epoch: each ``iter()`` of a loader with kept workers restarts it, drawing
the epoch's order again from the advanced shuffle and throwing away what its workers had prefetched (``fit`` once
did so through its progress bar, so that runs with and without workers trained on other orders).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from monai.data import DataLoader
from monai.utils import MAX_SEED
from torch.utils.data import ConcatDataset, Dataset, DistributedSampler, RandomSampler, Sampler, Subset, get_worker_info


def random_parts(dataset: Dataset) -> list[Any]:
    """The objects that draw ``dataset``'s random numbers: each MONAI dataset's ``transform`` (a ``Compose`` seeds
    every transform in it), found through ``ConcatDataset`` and ``Subset``; each object once."""
    if isinstance(dataset, ConcatDataset):
        parts = [part for inner in dataset.datasets for part in random_parts(inner)]
    elif isinstance(dataset, Subset):
        parts = random_parts(dataset.dataset)
    else:
        transform = getattr(dataset, "transform", None)
        parts = [transform] if hasattr(transform, "set_random_state") else []
    return list({id(part): part for part in parts}.values())


def item_seed(epoch_seed: int, index: int) -> int:
    """The seed of item ``index`` in the epoch seeded ``epoch_seed`` (independent streams, not ``seed + index``)."""
    return int(np.random.SeedSequence([epoch_seed, index]).generate_state(1)[0]) % MAX_SEED


class SeededItems(Dataset):
    """``dataset`` indexed by ``(index, seed)``: its random transforms are seeded with ``seed``, then item ``index``
    is drawn. Works in any process: the seed travels with the index."""

    def __init__(self, dataset: Dataset) -> None:
        self.dataset = dataset
        self.parts = random_parts(dataset)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        index, seed = key
        for offset, part in enumerate(self.parts):
            part.set_random_state(seed=(seed + offset) % MAX_SEED)
        if get_worker_info() is not None:  # a loader worker: PyTorch runs it on one thread
            return self.dataset[index]
        with one_thread():  # as a worker would: interpolation on more threads rounds differently (measured: up to 9e-8)
            return self.dataset[index]


@contextmanager
def one_thread() -> Iterator[None]:
    """Run PyTorch's operators on one thread in this process for the block, then as many as before."""
    threads = torch.get_num_threads()
    if threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


class EpochSampler(Sampler):
    """This epoch's order of ``size`` items as ``(index, item seed)`` pairs: shuffled from the epoch seed
    (``start_epoch``), and under DDP this rank's share of it (``DistributedSampler``, padded to equal shares)."""

    def __init__(self, size: int, shuffle: bool = True, rank: int = 0, world_size: int = 1) -> None:
        self.epoch_seed = 0
        self.generator = torch.Generator()
        items = range(size)
        if world_size > 1:  # seed 0 + set_epoch(epoch seed): the permutation is drawn from the epoch seed
            self.order: Sampler = DistributedSampler(items, world_size, rank, shuffle=shuffle, seed=0)
        else:
            self.order = RandomSampler(items, generator=self.generator) if shuffle else range(size)

    def start_epoch(self, epoch_seed: int) -> None:
        self.epoch_seed = epoch_seed
        self.generator.manual_seed(epoch_seed)
        if isinstance(self.order, DistributedSampler):
            self.order.set_epoch(epoch_seed)

    def __len__(self) -> int:
        return len(self.order)

    def __iter__(self) -> Iterator[tuple[int, int]]:
        seed = self.epoch_seed
        return ((int(index), item_seed(seed, int(index))) for index in self.order)


class EpochLoader:
    """A MONAI ``DataLoader`` over ``dataset`` for every epoch of a run, its workers kept between epochs:
    ``loader.start_epoch(seed)`` and then iterate it, as often as there are epochs. ``dataset`` is the
    dataset itself (unwrapped)."""

    def __init__(self, dataset: Dataset, batch_size: int, num_workers: int, shuffle: bool = True, rank: int = 0,
                 world_size: int = 1, collate_fn: Callable | None = None, drop_last: bool = False) -> None:
        self.dataset = dataset
        self.sampler = EpochSampler(len(dataset), shuffle, rank, world_size)
        extra = {} if collate_fn is None else {"collate_fn": collate_fn}
        self.loader = DataLoader(SeededItems(dataset), batch_size=batch_size, sampler=self.sampler,
                                 num_workers=num_workers, drop_last=drop_last, persistent_workers=num_workers > 0,
                                 **extra)

    def start_epoch(self, epoch_seed: int) -> EpochLoader:
        self.sampler.start_epoch(epoch_seed)
        return self

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self) -> Iterator[Any]:
        return iter(self.loader)

    def close(self) -> None:
        """Stop the kept workers now. Left to the garbage collector, they stop whenever a collection finds the
        loader, in whichever thread runs it (measured: the epoch writer's, blocked 5 s joining them)."""
        iterator, self.loader._iterator = getattr(self.loader, "_iterator", None), None
        if iterator is not None and hasattr(iterator, "_shutdown_workers"):
            iterator._shutdown_workers()


class KeptLoader:
    """A task's training loader, kept across epochs and built again only when what it was built from changes
    (``key``: the items and the loader's settings), so its workers start once per run, not once per epoch."""

    def __init__(self) -> None:
        self._loader: EpochLoader | None = None
        self._key: tuple = ()

    def epoch(self, epoch_seed: int, key: tuple, build: Callable[[], EpochLoader]) -> EpochLoader:
        """The loader for ``key`` (from ``build()`` if the kept one was built for another key), started on the
        epoch seeded ``epoch_seed``."""
        if self._loader is None or self._key != key:
            self.close()
            self._loader, self._key = build(), key
        return self._loader.start_epoch(epoch_seed)

    def close(self) -> None:
        """Stop the kept loader's workers (``fit`` calls its task's ``close`` when it is done)."""
        if self._loader is not None:
            self._loader.close()
            self._loader = None
