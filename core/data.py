"""Resumable infinite sampling over a dataset, split across ranks, and the DataLoader around it."""
from __future__ import annotations

import atexit
import signal
import weakref
from typing import Iterator

import torch
from torch.utils.data import DataLoader, Sampler


class InfiniteSampler(Sampler):
    """Yields `(index, epoch)` pairs for this rank forever, starting `start` items into its stream.

    Epoch e is a permutation seeded by (seed, e), padded to a multiple of the world size and dealt
    out round-robin (like DistributedSampler). Because the stream is a pure function of
    (seed, rank, world_size), resuming only needs `start` = clips drawn by all ranks / world size. The epoch
    travels with the index so that datasets drawing random clip starts stay reproducible even in
    persistent DataLoader workers, which never see `set_epoch`.
    """

    def __init__(self, length: int, rank: int = 0, world_size: int = 1, seed: int = 0,
                 shuffle: bool = True, start: int = 0):
        if length <= 0:
            raise ValueError("cannot sample from an empty dataset")
        self.length, self.rank, self.world_size = length, rank, world_size
        self.seed, self.shuffle, self.start = seed, shuffle, start
        self.per_rank = -(-length // world_size)  # ceil: every rank sees the same count per epoch

    def epoch_indices(self, epoch: int) -> list[int]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
            order = torch.randperm(self.length, generator=generator).tolist()
        else:
            order = list(range(self.length))
        padded = order + order[: self.per_rank * self.world_size - self.length]
        return padded[self.rank :: self.world_size]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, offset = divmod(self.start, self.per_rank)
        while True:
            for index in self.epoch_indices(epoch)[offset:]:
                yield index, epoch
            epoch, offset = epoch + 1, 0

    def __len__(self) -> int:  # DataLoader asks; the stream itself is endless
        return 2**62


def _ignore_stop_signals(_worker_id: int) -> None:
    """DataLoader workers leave SIGTERM/SIGINT to the main process, which checkpoints and then shuts them down.

    A scheduler (Slurm) or Ctrl-C signals the whole process group; torch's worker handler would die on it and
    the main process would then fail with "DataLoader worker ... is killed by signal" instead of saving.
    """
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)


# Every loader iterator alive, so that their worker processes can be shut down at exit (_shut_down_workers).
_LIVE_ITERATORS: "weakref.WeakSet" = weakref.WeakSet()


def _shut_down_workers() -> None:
    """Shuts down the workers of every loader still alive at interpreter exit.

    multiprocessing's own exit hook SIGTERMs daemonic children and joins them; our workers ignore SIGTERM
    (_ignore_stop_signals), so a run that died of an exception while a traceback still referenced its loader would
    wait in that join forever instead of exiting. Registered after that hook (torch imported multiprocessing
    first), this one runs before it.
    """
    for iterator in list(_LIVE_ITERATORS):
        shutdown = getattr(iterator, "_shutdown_workers", None)  # single-process iterators have no workers
        if shutdown is not None:
            shutdown()


atexit.register(_shut_down_workers)


class WorkerLoader(DataLoader):
    """A DataLoader whose workers ignore stop signals (the main process handles them) and are shut down at exit
    whatever still references them; the loaders of training and of the latent cache."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, worker_init_fn=_ignore_stop_signals, **kwargs)

    def __iter__(self):
        iterator = super().__iter__()
        _LIVE_ITERATORS.add(iterator)
        return iterator


def make_loader(dataset, batch_size: int, rank: int, world_size: int, seed: int, start: int,
                num_workers: int, pin_memory: bool) -> DataLoader:
    """Batches of this rank's stream from item `start` on (global clips drawn so far / world size: the streams are
    dealt round-robin from one permutation, so this holds exactly when the batch size changed on resume)."""
    sampler = InfiniteSampler(len(dataset), rank, world_size, seed, shuffle=True, start=start)
    return WorkerLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=num_workers,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        drop_last=True,
        # A private generator: creating the iterator must not consume the global RNG that resume restores.
        generator=torch.Generator().manual_seed(seed),
    )


def fixed_batch(dataset, count: int) -> dict:
    """The first `count` items of a held-out dataset at epoch 0, collated: the same clips every evaluation."""
    count = min(count, len(dataset))
    items = [dataset[(i, 0)] for i in range(count)]
    return torch.utils.data.default_collate(items)
