"""World-size-independent training data order over a latent shard folder.

The order is a property of the data, not of the job: per (seed, epoch) one global permutation of all
sample indices; step k of an epoch takes the next G = micro_batch * world * accum entries of it, and
micro-batch m (= rank * accum + j) of that step is the m-th contiguous chunk of `micro_batch` entries.
The cursor is just (epoch, consumed), so a job resumed at another world size or accumulation with the
same G sees exactly the same global batches, and every rank gets the same number of batches (the last
partial global batch of an epoch is dropped). Which cached view (image or its h-flip) a sample shows is
drawn per (seed, epoch, sample index), independently of the permutation and of the world size
(`data.hflip: false` always shows the image itself).

Reading runs in DataLoader workers: a sampler in the training process walks this rank's micro-batches
from the cursor on, across epoch boundaries, and hands each worker the sample indices and views of a
micro-batch; the workers read them ahead (in order) while the model computes. The epoch's permutation
lives only in the sampler, so a worker holds nothing that grows with the number of samples. Workers
start from a forkserver (`WORKER_START`), not by forking the rank: the iterator is (re)created after the
model exists (first step, every resume), and a forked worker would carry the whole training process —
under the L model that is gigabytes per worker the moment copy-on-write pages are touched.

Verification (`data.verify`) is once per run: each rank hashes its share of the shards (rank r: shards
r, r+W, …) and the job combines the ranks' outcomes (tb-train's `prepare` runs inside `agreed`); rank 0
then records the manifest's sha256 in `<run.dir>/data_verified.json`, and a restart or requeue of that
run with the same manifest checks only file sizes (every read still checks its member's crc32).
"""
from __future__ import annotations

import json
import multiprocessing as mp
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np
import torch
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler

from tb_core.errors import ConfigError, InputError
from tb_core.fileio import atomic_write_json
from tb_train.data.shards import LatentShards

# Separate random streams derived from (seed, epoch): one for the order, one for the views.
_ORDER_STREAM = 0
_VIEW_STREAM = 1

VERIFIED_MARKER = "data_verified.json"   # in the run folder: which manifest this run has hashed


@dataclass
class DataConfig:
    path: str                 # latent shard folder (tb_train.data.shards format)
    micro_batch: int = 64     # samples per rank per forward
    num_workers: int = 2      # DataLoader worker processes per rank (0 = read in the training process)
    seed: int = 0
    verify: bool = True       # sha256 of every shard, once per run (split over ranks; a restart with the
                              # same manifest checks sizes only): <run.dir>/data_verified.json
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
    """Endless (sample indices int64 [b], views uint8 [b]) of this rank's micro-batches, from a cursor on,
    in training order.

    For each global step at (epoch, consumed) it yields, for j in 0..accum-1, the entries
    [first, first + b) of the epoch's permutation, first = consumed + (rank * accum + j) * micro_batch,
    with each sample's view of that epoch. It runs in the training process, which therefore holds the
    one permutation of the current epoch; the reader workers receive only the micro-batch.
    """

    def __init__(self, epoch: int, consumed: int, rank: int, accum: int, micro_batch: int,
                 global_batch: int, num_samples: int, seed: int, hflip: bool):
        self.epoch, self.consumed = epoch, consumed
        self.rank, self.accum, self.micro_batch = rank, accum, micro_batch
        self.global_batch, self.num_samples = global_batch, num_samples
        self.seed, self.hflip = seed, hflip

    def __iter__(self) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        epoch, consumed = self.epoch, self.consumed
        arrays_of = None
        while True:
            if arrays_of != epoch:
                order = epoch_order(self.seed, epoch, self.num_samples)
                views = epoch_views(self.seed, epoch, self.num_samples, self.hflip)
                arrays_of = epoch
            for j in range(self.accum):
                first = consumed + (self.rank * self.accum + j) * self.micro_batch
                picks = order[first:first + self.micro_batch].copy()
                yield picks, views[picks]
            epoch, consumed = _next_position(epoch, consumed, self.global_batch, self.num_samples)


@dataclass
class _ReadFailure:
    """What a reader returns instead of raising: an exception raised inside a DataLoader worker reaches
    the training process as a multi-line traceback wrapped in another message; this one-line message is
    raised there as an InputError instead."""
    message: str


class _MicroBatchReader(Dataset):
    """(sample indices [b], views [b]) -> (moments float32 [b, 2C, h, w], labels int64 [b]), each sample in
    its view. Runs in the DataLoader workers."""

    def __init__(self, shards: LatentShards):
        self.shards = shards

    def _read(self, index: int) -> tuple[np.ndarray, int]:
        """-> (moments float16 [2, 2C, h, w], label) of sample `index`; damage (a member whose crc32 or
        size differs from the index, a failing read) becomes an InputError naming the shard."""
        try:
            return self.shards.read(index)
        except InputError:
            raise
        except (OSError, EOFError, ValueError, IndexError) as e:
            shard, _ = self.shards.locate(index)
            path = self.shards.folder / self.shards.shards[shard]["name"]
            raise InputError(f"shard {path}: sample {index} unreadable ({type(e).__name__}: {e})") from None

    def __getitem__(self, key: tuple[np.ndarray, np.ndarray]) -> tuple[Tensor, Tensor] | _ReadFailure:
        picks, views = key
        moments, labels = [], []
        try:
            for index, view in zip(picks.tolist(), views.tolist()):
                both, label = self._read(index)
                moments.append(both[view])
                labels.append(label)
        except InputError as e:
            return _ReadFailure(" ".join(str(e).split()))
        return (torch.from_numpy(np.stack(moments).astype(np.float32)),
                torch.tensor(labels, dtype=torch.int64))


def _verified_before(marker: Path, shards: LatentShards) -> bool:
    """Whether this run already hashed exactly this manifest (a missing or unreadable marker: no)."""
    try:
        record = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    return (isinstance(record, dict) and record.get("manifest_sha256") == shards.manifest_sha256
            and record.get("num_shards") == len(shards.shards))


WORKER_START = "forkserver"  # how reader workers start (module docstring); its server imports only the reader


def _worker_context() -> mp.context.BaseContext:
    """The forkserver context, with this module preloaded in the server (set before the server starts;
    later calls are no-ops) so that each worker only forks a small process that already imported it."""
    ctx = mp.get_context(WORKER_START)
    ctx.set_forkserver_preload([__name__])
    return ctx


class LatentLoader:
    """This rank's view of the global data order; `next_step()` yields its `accum` micro-batches."""

    def __init__(self, cfg: DataConfig, rank: int, world: int, accum: int,
                 run_dir: str | os.PathLike | None = None):
        """Opens the folder (every shard and index present with its manifest size) and, with
        `cfg.verify`, hashes this rank's share of the shards unless `run_dir` holds a marker for this
        manifest. The other ranks' shares are theirs: the caller combines the ranks' errors (tb-train's
        `prepare` runs inside `agreed`); rank 0 writes the marker when the first step's data is read,
        i.e. after every rank got through. run_dir None: no marker, this rank's share every time.
        `verified_bytes`: what this rank hashed here."""
        if not 0 <= rank < world or accum < 1:
            raise ValueError(f"bad rank/world/accum: rank {rank}, world {world}, accum {accum}")
        if not os.path.isdir(cfg.path):
            raise ConfigError(f"data.path: latent shard folder not found: {cfg.path}")
        self.cfg, self.rank, self.world, self.accum = cfg, rank, world, accum
        self.shards = LatentShards(cfg.path, verify=False)
        self.verified_bytes = 0
        self._marker: Path | None = None   # set while this start's verification is still to be recorded
        if cfg.verify:
            marker = Path(run_dir) / VERIFIED_MARKER if run_dir is not None else None
            if marker is None or not _verified_before(marker, self.shards):
                self.verified_bytes = self.shards.verify_share(rank, world)
                self._marker = marker if rank == 0 else None
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

    def _record_verification(self) -> None:
        """Write the run's marker (rank 0, once every rank verified its share). A marker that cannot be
        written costs only a repeated verification at the next start, so it is a warning, not a stop."""
        marker, self._marker = self._marker, None
        record = {"manifest_sha256": self.shards.manifest_sha256, "num_shards": len(self.shards.shards),
                  "data_path": os.path.abspath(self.cfg.path), "world": self.world,
                  "verified_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}
        try:
            atomic_write_json(marker, record)
        except OSError as e:
            print(f"warning: {marker}: not written ({e}); the next start hashes the data again",
                  file=sys.stderr, flush=True)

    def _start_iter(self) -> None:
        cfg = self.cfg
        schedule = _RankSchedule(self.epoch, self.consumed, self.rank, self.accum, cfg.micro_batch,
                                 self.global_batch, self.num_samples, cfg.seed, cfg.hflip)
        loader = DataLoader(_MicroBatchReader(self.shards), sampler=schedule,
                            batch_size=None, num_workers=cfg.num_workers, pin_memory=False,
                            prefetch_factor=2 if cfg.num_workers else None,
                            multiprocessing_context=_worker_context() if cfg.num_workers else None)
        self._iter = iter(loader)

    def next_step(self) -> list[MicroBatch]:
        """This rank's `accum` micro-batches of the next global step; advances the cursor by G."""
        if self._marker is not None:
            self._record_verification()
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


__all__ = ["DataConfig", "MicroBatch", "LatentLoader", "VERIFIED_MARKER", "epoch_order", "epoch_views"]
