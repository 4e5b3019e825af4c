"""Batches of one split for this process: index order, transforms, and the uint8 -> float step.

Training: a `DistributedSampler` permutation (seed + epoch, the same on any
number of processes), global batches split evenly across processes.
Evaluation: each process takes every world_size-th item, no padding, so
summed counts cover each test image exactly once. The transforms' random
parameters are drawn for the whole split once per epoch from (seed, epoch)
and indexed by item, so an epoch is the same on 1 or N processes, with or
without workers, and after a resume.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import DataLoader, DistributedSampler

from capsnet.data.transforms import Transforms, epoch_generator
from capsnet.types import Batch


def to_unit_float(x: torch.Tensor) -> torch.Tensor:
    """uint8 pixels -> float in [0, 1]; other tensors pass unchanged."""
    return x.float().div_(255) if x.dtype == torch.uint8 else x


def make_batch(split, idx: torch.Tensor, epoch: int, params: list | None) -> Batch:
    """The items `idx` of `split` as model inputs (transformed with this epoch's `params`)."""
    images, labels, targets = split.get(idx, epoch)
    x = split.transforms(to_unit_float(images), None if params is None else Transforms.index(params, idx))
    return Batch(x, labels, {k: to_unit_float(v) for k, v in targets.items()})


class _EpochBatches(torch.utils.data.Dataset):
    """Batch k of one epoch: a map-style dataset, so DataLoader workers can build batches."""

    def __init__(self, split, batches, epoch, params):
        self.split, self.batches, self.epoch, self.params = split, batches, epoch, params

    def __len__(self):
        return len(self.batches)

    def __getitem__(self, k):
        return make_batch(self.split, self.batches[k], self.epoch, self.params)


def _leave_signals_to_the_main_process(worker_id: int) -> None:
    """A SIGTERM or Ctrl-C sent to the whole process group must not kill the workers under the run, which
    then could not save: the main process stops them itself."""
    import signal

    for name in ("SIGTERM", "SIGINT", "SIGUSR1"):
        signal.signal(getattr(signal, name), signal.SIG_IGN)


class BatchLoader:
    """Yields `Batch`es of this process's share of one split, epoch by epoch."""

    def __init__(self, split, batch_size: int, train: bool, seed: int = 0, rank: int = 0, world_size: int = 1,
                 num_workers: int = 0, pin_memory: bool = False):
        self.split, self.train, self.seed = split, train, seed
        self.batch_size, self.rank, self.world_size = batch_size, rank, world_size
        self.num_workers, self.pin_memory = num_workers, pin_memory
        self.epoch, self.skip = 0, 0
        self.sampler = DistributedSampler(range(len(split)), num_replicas=world_size, rank=rank,
                                          shuffle=train, seed=seed) if train else None

    def set_epoch(self, epoch: int, skip_batches: int = 0) -> None:
        """Choose the epoch's permutation; skip its first batches when resuming mid-epoch."""
        self.epoch, self.skip = epoch, skip_batches
        if self.sampler is not None:
            self.sampler.set_epoch(epoch)

    def _batches(self) -> list[torch.Tensor]:
        if self.sampler is None:
            idx = torch.arange(self.rank, len(self.split), self.world_size)
        else:
            idx = torch.tensor(list(self.sampler))
        return list(idx.split(self.batch_size)) if len(idx) else []  # split() of nothing gives one empty batch

    def __len__(self) -> int:
        if self.sampler is None:
            return math.ceil(len(range(self.rank, len(self.split), self.world_size)) / self.batch_size)
        return math.ceil(self.sampler.num_samples / self.batch_size)

    def _params(self) -> list | None:
        """Every transform's random parameters for the whole split (training only: evaluation is fixed)."""
        if not self.train:
            return None
        return self.split.transforms.draw(len(self.split), epoch_generator(self.seed, self.epoch))

    def __iter__(self):
        ds = _EpochBatches(self.split, self._batches()[self.skip:], self.epoch, self._params())
        if self.num_workers == 0:
            for k in range(len(ds)):
                yield ds[k]
            return
        yield from DataLoader(ds, batch_size=None, shuffle=False, num_workers=self.num_workers,
                              pin_memory=self.pin_memory, worker_init_fn=_leave_signals_to_the_main_process)
