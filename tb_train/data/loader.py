"""World-size-independent training data order over a latent shard folder.

The order is a property of the data, not of the job: per (seed, epoch) one global permutation of all
sample indices; step k of an epoch takes the next G = micro_batch * world * accum entries of it, and
micro-batch m (= rank * accum + j) of that step is the m-th contiguous chunk of `micro_batch` entries.
The cursor is just (epoch, consumed), so a job resumed at another world size or accumulation with the
same G sees exactly the same global batches, and every rank gets the same number of batches (the last
partial global batch of an epoch is dropped). Which cached view (image or its h-flip) a sample shows is
drawn per (seed, epoch, sample index), independently of the permutation and of the world size
(`data.hflip: false` always shows the image itself).

Reading runs in DataLoader workers: a sampler walks this rank's micro-batches from the cursor on, across
epoch boundaries, and the workers read them ahead (in order) while the model computes.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from tb_core.errors import ConfigError, InputError
from tb_train.data.shards import LatentShards

# Separate random streams derived from (seed, epoch): one for the order, one for the views.
_ORDER_STREAM = 0
_VIEW_STREAM = 1


@dataclass
class DataConfig:
    path: str                 # latent shard folder (tb_train.data.shards format)
    micro_batch: int = 64     # samples per rank per forward
    num_workers: int = 2      # DataLoader worker processes per rank (0 = read in the training process)
    seed: int = 0
    verify: bool = True       # sha256 check of every shard before training starts
    hflip: bool = True        # show the cached h-flip of a sample half the time (MAR/ImageNet); false for
                              # data where a mirror image is another thing (digits: a mirrored 5 is no 5)

    def __post_init__(self) -> None:
        if self.micro_batch < 1:
            raise ValueError(f"micro_batch must be >= 1, got {self.micro_batch}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")


@dataclass
class MicroBatch:
    moments: Tensor   # float32 [b, 2C, h, w]: posterior mean ‖ logvar of ONE view picked for this sample/epoch
    labels: Tensor    # int64 [b]
    micro_id: int     # global index of this micro-batch within the step: rank * accum + j (0 .. world*accum-1)


def epoch_order(seed: int, epoch: int, num_samples: int) -> np.ndarray:
    """The global permutation of sample indices for (seed, epoch): int64 [num_samples]."""
    return np.random.default_rng([seed, epoch, _ORDER_STREAM]).permutation(num_samples)


def epoch_views(seed: int, epoch: int, num_samples: int, hflip: bool = True) -> np.ndarray:
    """View per sample index for (seed, epoch): uint8 [num_samples], 0 = image, 1 = h-flip
    (all 0 without hflip)."""
    if not hflip:
        return np.zeros(num_samples, dtype=np.uint8)
    return np.random.default_rng([seed, epoch, _VIEW_STREAM]).integers(0, 2, num_samples, dtype=np.uint8)


def _next_position(epoch: int, consumed: int, global_batch: int, num_samples: int) -> tuple[int, int]:
    """Cursor after handing out one global batch at (epoch, consumed); rolls over to the next epoch
    when the rest of the epoch cannot fill another global batch (the partial batch is dropped)."""
    consumed += global_batch
    if consumed + global_batch > num_samples:
        return epoch + 1, 0
    return epoch, consumed


class _RankSchedule(Sampler):
    """Endless keys (epoch, first) of this rank's micro-batches, from a cursor on, in training order.

    For each global step at (epoch, consumed) it yields, for j in 0..accum-1, the global position
    first = consumed + (rank * accum + j) * micro_batch of micro-batch rank*accum + j.
    """

    def __init__(self, epoch: int, consumed: int, rank: int, accum: int, micro_batch: int,
                 global_batch: int, num_samples: int):
        self.epoch, self.consumed = epoch, consumed
        self.rank, self.accum, self.micro_batch = rank, accum, micro_batch
        self.global_batch, self.num_samples = global_batch, num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        epoch, consumed = self.epoch, self.consumed
        while True:
            for j in range(self.accum):
                yield epoch, consumed + (self.rank * self.accum + j) * self.micro_batch
            epoch, consumed = _next_position(epoch, consumed, self.global_batch, self.num_samples)


@dataclass
class _ReadFailure:
    """What a reader returns instead of raising: an exception raised inside a DataLoader worker reaches
    the training process as a multi-line traceback wrapped in another message; this one-line message is
    raised there as an InputError instead."""
    message: str


class _MicroBatchReader(Dataset):
    """Key (epoch, first) -> (moments float32 [b, 2C, h, w], labels int64 [b]) of the samples
    order[first:first+b] of that epoch, each in its view of that epoch. Runs in the DataLoader workers;
    each process derives (and keeps) the order of the epochs it reads."""

    def __init__(self, shards: LatentShards, seed: int, micro_batch: int, hflip: bool):
        self.shards, self.seed, self.micro_batch, self.hflip = shards, seed, micro_batch, hflip
        self._epoch: tuple[int, np.ndarray, np.ndarray] | None = None

    def _arrays(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if self._epoch is None or self._epoch[0] != epoch:
            n = len(self.shards)
            self._epoch = (epoch, epoch_order(self.seed, epoch, n), epoch_views(self.seed, epoch, n, self.hflip))
        return self._epoch[1], self._epoch[2]

    def _read(self, index: int) -> tuple[np.ndarray, int]:
        """-> (moments float16 [2, 2C, h, w], label) of sample `index`; a damaged shard (truncated tar,
        short member, bad npy) becomes an InputError naming the shard."""
        try:
            return self.shards.read(index)
        except InputError:
            raise
        except (OSError, EOFError, ValueError, IndexError) as e:
            shard, _ = self.shards.locate(index)
            path = self.shards.folder / self.shards.shards[shard]["name"]
            raise InputError(f"shard {path}: sample {index} unreadable ({type(e).__name__}: {e}); "
                             f"the file is damaged (data.verify=true checks every shard's sha256)") from None

    def __getitem__(self, key: tuple[int, int]) -> tuple[Tensor, Tensor] | _ReadFailure:
        epoch, first = key
        order, views = self._arrays(epoch)
        moments, labels = [], []
        try:
            for index in order[first:first + self.micro_batch]:
                both, label = self._read(int(index))
                moments.append(both[views[index]])
                labels.append(label)
        except InputError as e:
            return _ReadFailure(" ".join(str(e).split()))
        return (torch.from_numpy(np.stack(moments).astype(np.float32)),
                torch.tensor(labels, dtype=torch.int64))


class LatentLoader:
    """This rank's view of the global data order; `next_step()` yields its `accum` micro-batches."""

    def __init__(self, cfg: DataConfig, rank: int, world: int, accum: int):
        if not 0 <= rank < world or accum < 1:
            raise ValueError(f"bad rank/world/accum: rank {rank}, world {world}, accum {accum}")
        if not os.path.isdir(cfg.path):
            raise ConfigError(f"data.path: latent shard folder not found: {cfg.path}")
        self.cfg, self.rank, self.world, self.accum = cfg, rank, world, accum
        self.shards = LatentShards(cfg.path, verify=cfg.verify)
        self.num_samples = len(self.shards)
        self.global_batch = cfg.micro_batch * world * accum
        if self.global_batch > self.num_samples:
            raise ConfigError(
                f"data: global batch micro_batch*world*accum = {cfg.micro_batch}*{world}*{accum} = "
                f"{self.global_batch} exceeds the {self.num_samples} samples in {cfg.path}")
        self.steps_per_epoch = self.num_samples // self.global_batch
        self.scale = float(self.shards.manifest["vae"]["scale"])
        self.epoch = 0
        self.consumed = 0          # global samples of this epoch already handed out (all ranks)
        self._iter: Iterator | None = None

    def _start_iter(self) -> None:
        cfg = self.cfg
        schedule = _RankSchedule(self.epoch, self.consumed, self.rank, self.accum, cfg.micro_batch,
                                 self.global_batch, self.num_samples)
        loader = DataLoader(_MicroBatchReader(self.shards, cfg.seed, cfg.micro_batch, cfg.hflip), sampler=schedule,
                            batch_size=None, num_workers=cfg.num_workers, pin_memory=False,
                            prefetch_factor=2 if cfg.num_workers else None)
        self._iter = iter(loader)

    def next_step(self) -> list[MicroBatch]:
        """This rank's `accum` micro-batches of the next global step; advances the cursor by G."""
        if self._iter is None:
            self._start_iter()
        batches = []
        for j in range(self.accum):
            item = next(self._iter)
            if isinstance(item, _ReadFailure):
                self.close()
                raise InputError(item.message)
            moments, labels = item
            batches.append(MicroBatch(moments, labels, self.rank * self.accum + j))
        self.epoch, self.consumed = _next_position(self.epoch, self.consumed, self.global_batch,
                                                   self.num_samples)
        return batches

    @property
    def samples_seen(self) -> int:
        """Position on the data axis: epoch × (steps_per_epoch × G) + consumed. Divided by
        steps_per_epoch × G it is the fractional epoch (the x of epoch_1000x), also after a resume that
        changed G."""
        return self.epoch * self.steps_per_epoch * self.global_batch + self.consumed

    def close(self) -> None:
        """Stop the reader workers (they also stop when the loader is garbage collected)."""
        self._iter = None

    def state_dict(self) -> dict:
        """The data cursor (a stateful part of the checkpoint, the same on every rank)."""
        return {"epoch": self.epoch, "consumed": self.consumed, "seed": self.cfg.seed}

    def load_state_dict(self, sd: dict) -> None:
        """Continue at the saved position; world/accum (even G) may differ from the saving run."""
        if int(sd["seed"]) != self.cfg.seed:
            raise ConfigError(f"data.seed is {self.cfg.seed} but the saved data cursor used seed {sd['seed']}")
        epoch, consumed = int(sd["epoch"]), int(sd["consumed"])
        if consumed + self.global_batch > self.num_samples:  # a larger G no longer fits in this epoch
            epoch, consumed = epoch + 1, 0
        self.epoch, self.consumed = epoch, consumed
        self._iter = None


__all__ = ["DataConfig", "MicroBatch", "LatentLoader", "epoch_order", "epoch_views"]
