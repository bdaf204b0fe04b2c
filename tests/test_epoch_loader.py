"""The run-long training loader (ctzoo.training.epoch_loader) and the epoch writer (ctzoo.training.epoch_writer)."""

from __future__ import annotations

import os

import pytest
import torch
from monai.data import Dataset
from monai.transforms import Compose, Lambdad, RandFlipd, RandGaussianNoised
from torch.utils.data import ConcatDataset

from ctzoo.training.epoch_loader import EpochLoader, KeptLoader, random_parts
from ctzoo.training.epoch_writer import EpochWriter, cpu_snapshot


def _augmented_items(count: int = 12) -> Dataset:
    """Items whose every draw shows: a noisy, randomly flipped ramp, and the process that drew it."""
    transform = Compose([RandFlipd("image", prob=0.5, spatial_axis=0), RandGaussianNoised("image", prob=1.0),
                         Lambdad("pid", lambda _: os.getpid())])
    ramp = torch.arange(8.0).reshape(1, 8)
    return Dataset([{"image": ramp + k, "index": k, "pid": 0} for k in range(count)], transform)


def _epoch(loader: EpochLoader, seed: int) -> tuple[list[torch.Tensor], list[int], set[int]]:
    images, order, pids = [], [], set()
    for batch in loader.start_epoch(seed):
        images.append(batch["image"].as_tensor() if hasattr(batch["image"], "as_tensor") else batch["image"])
        order += batch["index"].tolist()
        pids |= set(batch["pid"].tolist())
    return images, order, pids


def test_an_epoch_depends_on_its_seed_alone_not_on_workers_or_the_epochs_before():
    """Epoch 2 of a loader whose 2 workers ran epochs 0 and 1 equals epoch 2 of a new in-process loader (what a
    resumed run draws), item for item; another seed shuffles and augments differently; the workers persist."""
    items = _augmented_items()
    kept = EpochLoader(items, batch_size=4, num_workers=2)
    first, _, first_pids = _epoch(kept, 100)
    _, _, second_pids = _epoch(kept, 101)
    replayed, order, third_pids = _epoch(kept, 102)
    fresh, fresh_order, fresh_pids = _epoch(EpochLoader(_augmented_items(), batch_size=4, num_workers=0), 102)
    assert order == fresh_order and sorted(order) == list(range(12))
    assert all(torch.equal(a, b) for a, b in zip(replayed, fresh))
    assert first_pids == second_pids == third_pids and os.getpid() not in first_pids  # the same 2 workers
    assert len(first_pids) == 2 and fresh_pids == {os.getpid()}
    other, other_order, _ = _epoch(EpochLoader(_augmented_items(), batch_size=4, num_workers=0), 103)
    assert other_order != order
    by_item = {i: img for i, img in zip(order, torch.cat(replayed))}
    assert not any(torch.equal(by_item[i], img) for i, img in zip(other_order, torch.cat(other)))


def test_repeated_items_draw_their_own_augmentation_and_ddp_ranks_split_the_epoch():
    """A dataset repeated (ConcatDataset, one transform object) seeds that transform once per item, and each
    repeat differs; two ranks share out one epoch's shuffled order, disjoint and whole."""
    items = _augmented_items(6)
    twice = ConcatDataset([items, items])
    assert random_parts(twice) == [items.transform]
    images, order, _ = _epoch(EpochLoader(twice, batch_size=12, num_workers=0, shuffle=False), 5)
    assert order == list(range(6)) * 2 and not torch.equal(images[0][:6], images[0][6:])
    shares = [_epoch(EpochLoader(items, batch_size=3, num_workers=0, rank=r, world_size=2), 5)[1] for r in (0, 1)]
    assert sorted(shares[0] + shares[1]) == list(range(6)) and len(shares[0]) == len(shares[1]) == 3


def test_a_kept_loader_keeps_its_workers_until_its_key_changes():
    """The same key gives the same loader and worker processes, epoch after epoch; another key (mined items, other
    settings) stops those workers and builds a new loader; close stops the last one."""
    kept, built = KeptLoader(), []

    def build(count: int) -> EpochLoader:
        built.append(EpochLoader(_augmented_items(count), batch_size=4, num_workers=1))
        return built[-1]

    first = kept.epoch(100, ("items", 12), lambda: build(12))
    _, _, first_pids = _epoch(first, 100)
    again = kept.epoch(101, ("items", 12), lambda: build(12))
    _, _, again_pids = _epoch(again, 101)
    assert again is first and len(built) == 1 and first_pids == again_pids
    other = kept.epoch(102, ("items", 8), lambda: build(8))
    _, order, other_pids = _epoch(other, 102)
    assert other is not first and len(built) == 2 and sorted(order) == list(range(8))
    assert first.loader._iterator is None and other_pids != first_pids  # the first loader's workers were stopped
    kept.close()
    assert other.loader._iterator is None


def test_a_snapshot_keeps_the_state_of_its_moment_and_a_failed_write_stops_the_next_epoch(tmp_path):
    weights = torch.zeros(3)
    state = cpu_snapshot({"model": {"w": weights}, "groups": [{"lr": 0.1, "params": [0]}]})
    weights.add_(1.0)  # the next optimiser step, in place
    assert torch.equal(state["model"]["w"], torch.zeros(3)) and state["groups"] == [{"lr": 0.1, "params": [0]}]
    writer = EpochWriter()
    writer.submit((tmp_path / "a.txt").write_text, "epoch 1")
    writer.submit((tmp_path / "missing" / "b.txt").write_text, "epoch 2")  # its folder does not exist
    with pytest.raises(FileNotFoundError):
        writer.submit((tmp_path / "c.txt").write_text, "epoch 3")
    writer.close()
    assert (tmp_path / "a.txt").read_text() == "epoch 1" and not (tmp_path / "c.txt").exists()
    assert writer.write_s > 0
