"""Session-wide test environment: CPU DeepSpeed and one thread per process.

One thread everywhere makes in-process results and subprocess results (ranks, killed-and-rerun jobs)
bit-comparable — CPU kernels can sum in another order with another thread count — and keeps the 2-rank
tests from oversubscribing a 2-core machine. It must be set before torch is first imported.
"""
from __future__ import annotations

import os

os.environ["OMP_NUM_THREADS"] = "1"
os.environ.setdefault("DS_ACCELERATOR", "cpu")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import torch  # noqa: E402  (after the environment above)

torch.set_num_threads(1)
