"""Small latent shard folders for the data-loader tests, written with the real shard writer.

Sample i's moments encode who they are: view v of sample i is filled with the value i + v/2 (exact in
float16 for i < 1024), so a test can read back which sample and which view a batch row came from.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tb_train.config import atomic_write_text
from tb_train.shards import FORMAT, MANIFEST, STATS, sample_key, shard_name, write_shard

CHANNELS = 4      # latent channels C (moments hold 2C)
LATENT = 2        # h = w
NUM_CLASSES = 7
SCALE = 0.2325


def sample_moments(index: int) -> np.ndarray:
    """float16 [2, 2C, h, w]: view v filled with index + v/2."""
    views = np.arange(2, dtype=np.float32)[:, None, None, None] / 2
    return np.broadcast_to(index + views, (2, 2 * CHANNELS, LATENT, LATENT)).astype(np.float16)


def decode_rows(moments) -> tuple[list[int], list[int]]:
    """Inverse of `sample_moments` for a batch [b, 2C, h, w] -> (sample indices, views)."""
    first = np.asarray(moments)[:, 0, 0, 0]
    return [int(v) for v in np.floor(first)], [int(round(2 * (v - np.floor(v)))) for v in first]


def write_latent_folder(folder: str | Path, num_samples: int, samples_per_shard: int) -> Path:
    """A complete precomputed folder of `num_samples` synthetic samples; label of sample i = i % 7."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s, start in enumerate(range(0, num_samples, samples_per_shard)):
        keys = range(start, min(start + samples_per_shard, num_samples))
        sha = write_shard(folder / shard_name(s),
                          [(sample_key(i), sample_moments(i), i % NUM_CLASSES) for i in keys])
        shards.append({"name": shard_name(s), "count": len(keys), "sha256": sha})
    manifest = {"format": FORMAT, "num_samples": num_samples, "samples_per_shard": samples_per_shard,
                "shards": shards,
                "vae": {"identity": "synthetic", "scale": SCALE, "latent_channels": CHANNELS, "downsample": 16},
                "resolution": LATENT * 16, "classes": [f"c{k}" for k in range(NUM_CLASSES)],
                "num_rejected": 0, "quantizer": None}
    stats = {"num_samples": num_samples, "mean": [0.0] * CHANNELS, "std": [1.0] * CHANNELS,
             "channel_order": list(range(CHANNELS))}
    atomic_write_text(folder / MANIFEST, json.dumps(manifest))
    atomic_write_text(folder / STATS, json.dumps(stats))
    (folder / "rejected.txt").write_text("")
    return folder
