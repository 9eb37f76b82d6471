"""Random streams of a training run: seeds derived per (step, micro-batch), and the process RNG state.

Everything random in a step (posterior noise, masks, label drop, dropout) is seeded from
`derive_seed(run.seed, step, micro_id, stream)`, so a run is reproducible for any world size or
accumulation split and a resume needs no RNG state to be exact. The process-wide generators (torch,
CUDA, numpy, python) are still saved per rank as the stateful part `ProcessRNG`, so that code outside
these streams (a hook, a library) continues its sequence after a resume instead of restarting it.
"""
from __future__ import annotations

import hashlib
import random

import numpy as np
import torch

NOISE_STREAM = 1                 # posterior sample of the latents
MODEL_STREAM = 0                 # the model's own randomness (masks, label drop, dropout)
MODEL_SEED_STREAM = 2 ** 31 - 1  # micro_id slot for the weight-init seed (never a real micro-batch id)


def derive_seed(seed: int, step: int, micro_id: int, stream: int) -> int:
    """A 63-bit seed from (seed, step, micro_id, stream): independent streams for posterior noise (1) and
    the model's own randomness (0), identical for any world size / accumulation split."""
    digest = hashlib.blake2b(f"{seed}/{step}/{micro_id}/{stream}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def init_seed(seed: int) -> int:
    """The seed torch is given right before the model is built: equal initial weights for every run with
    this `run.seed`, whatever the world size, ZeRO stage or resume history."""
    return derive_seed(seed, 0, MODEL_SEED_STREAM, MODEL_STREAM)


class ProcessRNG:
    """The process's generators (torch CPU, CUDA, numpy, python) as a per-rank stateful part."""

    def state_dict(self) -> dict:
        state = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(), "python": random.getstate()}
        if torch.cuda.is_available():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state: dict) -> None:
        torch.set_rng_state(state["torch"])
        np.random.set_state(state["numpy"])
        random.setstate(state["python"])
        if "cuda" in state and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state["cuda"])


__all__ = ["NOISE_STREAM", "MODEL_STREAM", "MODEL_SEED_STREAM", "derive_seed", "init_seed", "ProcessRNG"]
