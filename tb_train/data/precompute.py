"""`tb-precompute`: turn an image set into latent shards once, on any number of ranks, never redoing work.

    tb-precompute --config configs/jobs/precompute_demo.yaml [key=value ...]   (or --config precompute_demo)
    torchrun --nproc_per_node 8 -m tb_train precompute --config job.yaml input=/data/train output=/data/lat

Order and placement: the sorted input listing gives every image its global index; shard s holds the
indices [s·S, (s+1)·S) minus rejected images, and rank r encodes the shards with s % world == r. Batches
never cross a shard boundary, so a shard's bytes depend only on its images, the VAE, the batch size and
the numeric mode — not on the world size or on where an earlier run was killed.

Idempotence: a shard tar and its member index are each written under a temporary name and renamed when
complete; then a sidecar `shard-XXXXXX.json` (count, sha256 and size of tar and index, rejected inputs,
channel sums) is written atomically. A rerun skips shards whose sidecar matches the tar's sha256 and
redoes the rest; a finished shard without its index (a folder written before indexes existed, or a lost
index file) gets one built from the tar's own bytes, without re-encoding. `precompute.json` records what
the folder was made with (VAE identity, resolution, shard size, quantizer, input listing); a rerun with
anything different is refused. When every sidecar exists, the manifest, stats and rejected list are
assembled from the sidecars (by rank 0 after a barrier when torch.distributed is initialized, else by
whichever rank finishes last — the files are deterministic, so two assemblers write the same bytes).
"""
from __future__ import annotations

import hashlib
import json
import math
import sys
import time
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import numpy as np
import torch
from einops import rearrange
from torch.utils.data import DataLoader
from tqdm import tqdm

from tb_core.config import to_dict
from tb_core.errors import ConfigError, InputError
from tb_core.fileio import atomic_write_json, atomic_write_text, sha256_file
from tb_model.ordering import frequency_order
from tb_model.quantizer import DimensionwiseQuantizer, QuantizerConfig
from tb_model.vae import LatentVAE, VAEConfig, load_vae
from tb_core.launcher import launcher_ranks
from tb_core.runlock import RunLock, rank_lock_name
from tb_train.dist import barrier
from tb_train.cli import job_main
from tb_train.data.images import ImageDataset, ImageList, collate, list_images
from tb_train.data.shards import (
    FORMAT, MANIFEST, REJECTED, STATS, LatentShards, index_from_tar, index_name, sample_key, shard_name,
    write_index, write_shard,
)

IDENTITY = "precompute.json"


@dataclass
class PrecomputeConfig:
    """One precompute job. `input`: an ImageFolder tree or webdataset tars (see tb_train.data.images)."""

    input: str
    output: str
    vae: VAEConfig
    resolution: int = 256            # ADM center crop side (pixels); must be a multiple of the VAE's downsample
    batch_size: int = 64             # images per encoder call (each also encoded flipped: 2x this per call)
    samples_per_shard: int = 1000
    num_workers: int = 8             # DataLoader decode workers per rank (0 = decode in the main process)
    store_indices: bool = False      # also store uint8 quantizer indices of the scaled posterior means
    quantizer: QuantizerConfig = field(default_factory=QuantizerConfig)
    device: str = "auto"             # "auto": cuda:LOCAL_RANK if a GPU is visible, else cpu
    dtype: Literal["auto", "float32", "bfloat16"] = "auto"  # encoder autocast; auto = bf16 on GPU, fp32 on CPU
    channels_last: bool = True       # on GPU only (no effect on CPU)
    order_samples: int = 4096        # samples read back to compute the channel frequency order
    verify_existing: bool = True     # sha256-check finished shards before skipping them
    progress: bool = True            # tqdm bar on rank 0

    def __post_init__(self) -> None:
        for name in ("resolution", "batch_size", "samples_per_shard", "order_samples"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1, got {getattr(self, name)}")
        if self.num_workers < 0:
            raise ValueError(f"num_workers must be >= 0, got {self.num_workers}")
        if self.store_indices and self.quantizer.scheme == "empirical":
            raise ValueError("store_indices needs a fixed quantizer (gaussian or uniform): an empirical "
                             "table is fitted from the latents this job produces")


def sidecar_name(shard_id: int) -> str:
    return f"shard-{shard_id:06d}.json"


def _resolve_device(spec: str, local_rank: int) -> torch.device:
    if spec == "auto":
        return torch.device("cuda", local_rank) if torch.cuda.is_available() else torch.device("cpu")
    return torch.device(spec)


def _identity(cfg: PrecomputeConfig, vae: LatentVAE, images: ImageList, autocast: bool) -> dict:
    """Everything that determines the shards' bytes, apart from batch size and kernel choice."""
    listing = hashlib.sha256()
    labels = images.labels if images.labels is not None else [-1] * len(images)
    for name, label in zip(images.names, labels):
        listing.update(f"{name}\t{label}\n".encode())
    return {
        "format": FORMAT,
        "vae": {"identity": vae.identity, "scale": vae.scale, "latent_channels": vae.latent_channels,
                "downsample": vae.downsample},
        "resolution": cfg.resolution,
        "samples_per_shard": cfg.samples_per_shard,
        "encoder_dtype": "bfloat16" if autocast else "float32",
        "quantizer": to_dict(cfg.quantizer) if cfg.store_indices else None,
        "num_inputs": len(images),
        "inputs_sha256": listing.hexdigest(),
    }


def _shown(key: str, value: object) -> str:
    """A setting as the refusal message shows it (hashes shortened)."""
    if key == "vae" and isinstance(value, dict):
        return f"{str(value.get('identity'))[:12]}… (scale {value.get('scale')})"
    if key == "inputs_sha256":
        return f"listing {str(value)[:12]}…"
    return repr(value)


def _claim_output(out: Path, ident: dict) -> None:
    """Record (or check) what this folder is made with; a different VAE/setting is refused."""
    path = out / IDENTITY
    if path.is_file():
        old = json.loads(path.read_text())
        for key in ident:
            if old.get(key) != ident[key]:
                what = {"vae": "VAE", "inputs_sha256": "another input listing"}.get(key, key)
                raise InputError(f"{out}: was precomputed with {what} {_shown(key, old.get(key))}, this "
                                      f"run has {_shown(key, ident[key])}; refusing to mix them (use another "
                                      "output folder)")
        return
    atomic_write_json(path, ident)


def _file_facts(out: Path, shard: int) -> dict:
    """What the manifest lists about a written shard besides its tar's sha256: sizes (what a restarted
    training job checks instead of hashing) and the index's sha256."""
    tar, index = out / shard_name(shard), out / index_name(shard_name(shard))
    return {"size": tar.stat().st_size, "index_sha256": sha256_file(index), "index_size": index.stat().st_size}


def _shard_state(out: Path, shard: int, verify: bool) -> Literal["done", "indexed", "redo"]:
    """"done" when the sidecar exists and (if `verify`) matches the tar's sha256, and the index is there
    (and matches its sha256); "indexed" when such a shard had to get its index built from the tar first
    (folders written before member indexes, a lost or damaged index); else "redo"."""
    side, tar = out / sidecar_name(shard), out / shard_name(shard)
    if not (side.is_file() and tar.is_file()):
        return "redo"
    try:
        info = json.loads(side.read_text())
    except json.JSONDecodeError:
        return "redo"
    if verify and sha256_file(tar) != info.get("sha256"):
        print(f"precompute: {tar} does not match its sidecar's sha256; redoing it", file=sys.stderr)
        return "redo"
    index = out / index_name(shard_name(shard))
    if "index_sha256" in info and index.is_file() and (not verify or sha256_file(index) == info["index_sha256"]):
        return "done"
    # a finished tar without a good index: build it from the tar rather than encode the images again
    try:
        rows = index_from_tar(tar)
    except (InputError, ValueError) as e:
        print(f"precompute: {tar} cannot be indexed ({e}); redoing it", file=sys.stderr)
        return "redo"
    if len(rows) != info.get("count"):
        print(f"precompute: {tar} holds {len(rows)} samples, its sidecar says {info.get('count')}; redoing it",
              file=sys.stderr)
        return "redo"
    write_index(tar, rows)
    atomic_write_json(side, {**info, **_file_facts(out, shard)}, indent=None)
    return "indexed"


def _remove_stale_temps(out: Path, shards: list[int], older_than: float | None = None) -> None:
    """Delete temporary files left by killed runs: those of `shards`, and (if `older_than` is given)
    the folder-level ones (manifest/stats/…) last modified before that time."""
    for s in shards:
        for stem in (shard_name(s), index_name(shard_name(s)), sidecar_name(s)):
            for p in out.glob(f".{stem}.*.tmp"):
                p.unlink(missing_ok=True)
    if older_than is not None:
        for p in out.glob(".*.tmp"):
            try:
                if p.stat().st_mtime < older_than:
                    p.unlink(missing_ok=True)
            except FileNotFoundError:
                pass


@dataclass
class _ShardAccumulator:
    """A shard being filled: samples in key order, rejections, per-channel sums of scaled means."""
    shard: int
    size: int                               # inputs in this shard's index range
    seen: int = 0
    keys: list = field(default_factory=list)
    moments: list = field(default_factory=list)   # float16 [2, 2C, h, w] each
    labels: list = field(default_factory=list)
    indices: list = field(default_factory=list)   # uint8 [2, C, h, w] each (store_indices)
    rejected: list = field(default_factory=list)  # (global index, reason)
    sums: np.ndarray | None = None          # float64 [2, C]: sum and sum of squares
    elements: int = 0                       # per-channel element count


class _ShardCollector:
    """Files encoded batches into their shards and hands each full shard to a writer thread, so
    writing (tar, sha256, sidecar) overlaps the encoding of the next shard."""

    def __init__(self, out: Path, images: ImageList, per_shard: int, channels: int, scale: float,
                 store_indices: bool):
        self.out, self.images, self.per, self.C, self.scale = out, images, per_shard, channels, scale
        self.store_indices = store_indices
        self.accs: dict[int, _ShardAccumulator] = {}
        self.writer = ThreadPoolExecutor(max_workers=1)
        self.writes: list[Future] = []

    def add(self, batch: dict, moments: torch.Tensor | None, indices: torch.Tensor | None) -> None:
        """batch from `collate`; moments float16 [b, 2, 2C, h, w] and indices uint8 [b, 2, C, h, w] on CPU."""
        n = len(self.images)
        shard = (batch["indices"] or [batch["rejected"][0][0]])[0] // self.per
        acc = self.accs.setdefault(shard, _ShardAccumulator(shard, min(n, (shard + 1) * self.per) - shard * self.per))
        acc.rejected.extend(batch["rejected"])
        if batch["indices"]:
            m = moments.numpy()
            acc.keys.extend(sample_key(i) for i in batch["indices"])
            acc.moments.extend(m)
            acc.labels.extend(batch["labels"].tolist())
            if indices is not None:
                acc.indices.extend(indices.numpy())
            lat = m[:, :, :self.C].astype(np.float64) * self.scale  # scaled posterior means, both views
            sums = np.stack([lat.sum(axis=(0, 1, 3, 4)), (lat**2).sum(axis=(0, 1, 3, 4))])
            acc.sums = sums if acc.sums is None else acc.sums + sums
            acc.elements += lat.size // self.C
        acc.seen += len(batch["indices"]) + len(batch["rejected"])
        if acc.seen == acc.size:
            while len(self.writes) >= 2:  # bound the memory held by shards waiting to be written
                self.writes.pop(0).result()
            self.writes.append(self.writer.submit(
                _write_shard_files, self.out, self.accs.pop(shard), self.images, self.store_indices))

    def close(self) -> None:
        """Wait for every write (re-raising a writer error) and stop the thread."""
        try:
            for f in self.writes:
                f.result()
        finally:
            self.writer.shutdown(wait=True)


def _encode_batch(vae: LatentVAE, images: torch.Tensor, device: torch.device, autocast: bool,
                  channels_last: bool) -> torch.Tensor:
    """uint8 [b, 3, R, R] -> float16 moments [b, 2, 2C, h, w] of each image and its h-flip (on device)."""
    x = images.to(device, non_blocking=True).float().div_(127.5).sub_(1.0)
    x = torch.cat([x, x.flip(-1)])  # [2b, 3, R, R]: one encoder call for both views
    if channels_last:
        x = x.contiguous(memory_format=torch.channels_last)
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
        m = vae.encode(x)  # [2b, 2C, h, w] float32
    return rearrange(m, "(view b) c h w -> b view c h w", view=2).half()


def _encode_all(loader: DataLoader, vae: LatentVAE, quantizer: DimensionwiseQuantizer | None, device: torch.device,
                autocast: bool, channels_last: bool, collector: _ShardCollector, bar: tqdm) -> int:
    """Encode every batch of `loader` into `collector`; returns the number of images encoded.

    On GPU the device→host copy of batch k is asynchronous (pinned memory + an event) and is only
    waited for after batch k+1 has been queued, so the GPU never idles on host-side shard work.
    """
    encoded = 0
    in_flight = None  # (batch, moments, indices, event | None)
    for batch in loader:
        current = (batch, None, None, None)
        if batch["images"] is not None:
            moments = _encode_batch(vae, batch["images"], device, autocast, channels_last)
            idx = None
            if quantizer is not None:
                b, _, c2, h, w = moments.shape
                means = moments[:, :, :c2 // 2].float().flatten(0, 1) * vae.scale  # [2b, C, h, w]
                idx = quantizer.quantize(means, channel_dim=1).view(b, 2, c2 // 2, h, w)
            event = None
            if device.type == "cuda":
                moments = moments.to("cpu", non_blocking=True)
                idx = idx.to("cpu", non_blocking=True) if idx is not None else None
                event = torch.cuda.Event()
                event.record()
            current = (batch, moments, idx, event)
            encoded += len(batch["indices"])
        if in_flight is not None:
            _land(in_flight, collector)
        in_flight = current
        bar.update(len(batch["indices"]) + len(batch["rejected"]))
    if in_flight is not None:
        _land(in_flight, collector)
    return encoded


def _land(item: tuple, collector: _ShardCollector) -> None:
    batch, moments, idx, event = item
    if event is not None:
        event.synchronize()
    collector.add(batch, moments, idx)


def _write_shard_files(out: Path, acc: _ShardAccumulator, images: ImageList, store_indices: bool) -> dict:
    """Tar and its index (atomic renames), then its sidecar (atomic): the sidecar's presence marks the
    shard done."""
    samples = list(zip(acc.keys, acc.moments, acc.labels))
    sha = write_shard(out / shard_name(acc.shard), samples, acc.indices if store_indices else None)
    sums = acc.sums if acc.sums is not None else np.zeros((2, 0))
    info = {
        "name": shard_name(acc.shard), "count": len(samples), "sha256": sha, **_file_facts(out, acc.shard),
        "rejected": [[i, images.names[i], reason] for i, reason in sorted(acc.rejected)],
        "sum": sums[0].tolist(), "sumsq": sums[1].tolist(), "elements": acc.elements,
        "max_label": max(acc.labels, default=-1),
    }
    atomic_write_json(out / sidecar_name(acc.shard), info, indent=None)
    return info


def _assemble(out: Path, ident: dict, images: ImageList, num_shards: int, order_samples: int,
              started: float) -> dict | None:
    """Manifest, stats and rejected.txt from the sidecars; None while some shard is unfinished."""
    infos = []
    for s in range(num_shards):
        path = out / sidecar_name(s)
        if not path.is_file():
            return None
        infos.append(json.loads(path.read_text()))
    _remove_stale_temps(out, list(range(num_shards)), older_than=started)
    num_samples = sum(i["count"] for i in infos)
    if num_samples == 0:
        raise InputError(f"{images.root}: every input image was rejected (see the shard sidecars in {out})")
    rejected = [r for i in infos for r in i["rejected"]]
    atomic_write_text(out / REJECTED, "".join(f"{idx}\t{name}\t{reason}\n" for idx, name, reason in rejected))

    elements = sum(i["elements"] for i in infos)
    total = np.sum([np.array([i["sum"], i["sumsq"]]) for i in infos if i["elements"]], axis=0)
    mean = total[0] / elements
    std = np.sqrt(np.maximum(total[1] / elements - mean**2, 0.0))
    if images.classes is not None:
        classes = images.classes
    else:
        classes = [str(c) for c in range(max(i["max_label"] for i in infos) + 1)]
    manifest = {
        "format": FORMAT, "num_samples": num_samples, "samples_per_shard": ident["samples_per_shard"],
        "shards": [{k: i[k] for k in ("name", "count", "sha256", "size", "index_sha256", "index_size")}
                   for i in infos],
        "vae": ident["vae"], "resolution": ident["resolution"], "classes": classes,
        "num_rejected": len(rejected), "quantizer": ident["quantizer"],
    }
    order = _channel_order(LatentShards(out, verify=False, manifest=manifest), order_samples)
    stats = {"num_samples": num_samples, "mean": mean.tolist(), "std": std.tolist(), "channel_order": order,
             "description": "posterior mean x scale, both views, all samples; channel_order from the image "
                            f"view of {min(order_samples, num_samples)} evenly spaced samples"}
    atomic_write_json(out / STATS, stats)
    atomic_write_json(out / MANIFEST, manifest)  # last: marks the folder done
    return manifest


def _channel_order(reader: LatentShards, max_samples: int) -> list[int]:
    """tb_model.ordering.frequency_order over the stored image-view means × scale of evenly spaced
    samples (read back from the tars, so it does not depend on which rank encoded what)."""
    n = len(reader)
    picks = np.unique(np.linspace(0, n - 1, min(n, max_samples)).round().astype(np.int64))
    means = np.stack([reader.image_mean(int(i)) for i in picks])  # [n, C, h, w]
    perm, _ = frequency_order(torch.from_numpy(means) * reader.manifest["vae"]["scale"])
    reader.close()
    return perm.tolist()


def run(cfg: PrecomputeConfig, rank: int = 0, world: int = 1, local_rank: int = 0) -> dict:
    """Encode this rank's unfinished shards, then assemble the folder if every shard is done.

    Returns a summary dict (also printed as one line): inputs, shards, encoded images, skipped shards
    (`indexed_shards` of them got their member index built from the tar on this call), seconds and
    images/s of the whole call, images/s of the decode-encode-write loop alone, and `manifest` (None
    while other ranks still have shards to finish).
    """
    started = time.time()
    out = Path(cfg.output)
    images = list_images(cfg.input)
    device = _resolve_device(cfg.device, local_rank)
    autocast = cfg.dtype == "bfloat16" or (cfg.dtype == "auto" and device.type == "cuda")
    channels_last = cfg.channels_last and device.type == "cuda"
    vae = load_vae(cfg.vae, device=device)
    if channels_last:
        vae.model.to(memory_format=torch.channels_last)
    if cfg.resolution % vae.downsample:
        raise ConfigError(f"resolution {cfg.resolution} is not a multiple of the VAE's downsample {vae.downsample}")
    out.mkdir(parents=True, exist_ok=True)
    ident = _identity(cfg, vae, images, autocast)
    _claim_output(out, ident)
    quantizer = None
    if cfg.store_indices:
        quantizer = DimensionwiseQuantizer.from_config(cfg.quantizer, channels=vae.latent_channels).to(device)

    n, per = len(images), cfg.samples_per_shard
    num_shards = math.ceil(n / per)
    mine = [s for s in range(num_shards) if s % world == rank]
    _remove_stale_temps(out, mine)
    states = {s: _shard_state(out, s, cfg.verify_existing) for s in mine}
    pending = [s for s in mine if states[s] == "redo"]
    indexed = sum(state == "indexed" for state in states.values())
    batches = [list(range(start, min(start + cfg.batch_size, stop)))  # never across a shard boundary
               for s in pending
               for stop in [min(n, (s + 1) * per)]
               for start in range(s * per, stop, cfg.batch_size)]
    loader = DataLoader(ImageDataset(images, cfg.resolution), batch_sampler=batches, collate_fn=collate,
                        num_workers=cfg.num_workers, pin_memory=device.type == "cuda",
                        prefetch_factor=4 if cfg.num_workers else None)
    collector = _ShardCollector(out, images, per, vae.latent_channels, vae.scale, cfg.store_indices)
    bar = tqdm(total=sum(map(len, batches)), unit="img", desc=f"precompute rank {rank}",
               disable=not cfg.progress or rank != 0, smoothing=0.1, dynamic_ncols=True)
    loop_start = time.time()
    try:
        encoded = _encode_all(loader, vae, quantizer, device, autocast, channels_last, collector, bar) if batches else 0
    finally:
        bar.close()
        collector.close()
    loop_seconds = time.time() - loop_start

    barrier()
    manifest = None
    if not torch.distributed.is_initialized() or rank == 0:
        manifest = _assemble(out, ident, images, num_shards, cfg.order_samples, started)
    seconds = time.time() - started
    summary = {"inputs": n, "shards": num_shards, "rank_shards": len(mine), "skipped_shards": len(mine) - len(pending),
               "indexed_shards": indexed, "encoded": encoded, "seconds": seconds, "images_per_s": encoded / seconds,
               "loop_images_per_s": encoded / loop_seconds if encoded else 0.0, "manifest": manifest}
    where = f"rank {rank}/{world}: " if world > 1 else ""
    if manifest is not None:
        done = (f"{manifest['num_samples']} samples in {num_shards} shards, {manifest['num_rejected']} rejected "
                f"(see {out / REJECTED})")
    else:
        done = "other ranks' shards still running; the last to finish writes the manifest"
    reindexed = f", {indexed} of them indexed from their tars" if indexed else ""
    print(f"precompute: {where}encoded {encoded} images in {seconds:.1f}s ({summary['images_per_s']:.1f} img/s, "
          f"{summary['skipped_shards']} of {len(mine)} shards already done{reindexed}); {out}: {done}", flush=True)
    return summary


def main(argv: list[str] | None = None) -> int:
    def body(cfg: PrecomputeConfig, source: str, args) -> None:
        rank, world, local_rank = launcher_ranks()
        if args.local_rank is not None:  # the deepspeed launcher's argument, if it gave one
            local_rank = args.local_rank
        if not 0 <= rank < world:
            raise ConfigError(f"launcher variables give rank {rank} of world size {world}")
        with RunLock(cfg.output, "tb-precompute", name=rank_lock_name(rank)):  # one job per output folder
            run(cfg, rank, world, local_rank)

    return job_main("tb-precompute", argv, body)


if __name__ == "__main__":
    sys.exit(main())
