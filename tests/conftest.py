"""Session-wide test environment: CPU DeepSpeed, one thread per process, and the shared fixtures.

One thread everywhere makes in-process results and subprocess results (ranks, killed-and-rerun jobs)
bit-comparable — CPU kernels can sum in another order with another thread count — and keeps the 2-rank
tests from oversubscribing a 2-core machine. It must be set before torch is first imported.

The expensive fixtures (DeepSpeed's one-time comm-op build, the reference training run, the tiny VAE)
live in `tests/fixtures/` and are registered here as plugins, so each is built once per session.
Markers: `slow` (over ~20 s), `distributed` (starts several processes), `slurm` (needs the local
Slurm); `pytest -m "not slow"` is the quick inner loop, the README's command runs everything.
"""
from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(1)

pytest_plugins = ["fixtures.data", "fixtures.engine", "fixtures.precompute", "fixtures.inception", "fixtures.slurm"]
