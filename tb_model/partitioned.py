"""Writing initial values into parameters that ZeRO-3 has already partitioned.

Under DeepSpeed's `zero.Init` every submodule's parameters are partitioned over the ranks as soon as its
constructor returns (each rank keeps 1/world of the elements, `p.data` becomes empty), so no rank ever holds
the whole model. The released init rules (`init_layers`, `MAR.init_weights`, the head's `init_weights`) run
after the submodules exist; they write through `full_tensors`, which gathers the parameters of ONE module
(or tensor) at a time, lets the init write the whole tensor, and re-partitions it. Because the init then
draws from the RNG with the full shapes in the same order as a plain build, the initial weights are
bit-identical to the whole-model build for every ZeRO stage and world size (tests/test_zero_init.py).

Outside zero.Init (or on a parameter DeepSpeed has not converted yet) it does nothing, and the model library
does not import DeepSpeed unless it meets a partitioned parameter.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator

import torch


def is_partitioned(p: torch.Tensor) -> bool:
    """True for a parameter converted by ZeRO-3 (it carries DeepSpeed's `ds_id`)."""
    return hasattr(p, "ds_id")


@contextlib.contextmanager
def full_tensors(params: Iterable[torch.Tensor]) -> Iterator[None]:
    """Make `params` whole fp32 tensors for the block's writes.

    Partitioned parameters are gathered and, on exit, rank 0's values are re-partitioned to every rank (all
    ranks run the same seeded init, so rank 0's values are everyone's); collective then: every rank must
    enter with the same parameters in the same order, as a constructor run on every rank does. Parameters
    held in a 16-bit dtype (zero.Init creates them in the training dtype) are written through an fp32 copy
    and rounded on exit: the random draws of `nn.init` in bf16 are not the rounded fp32 draws, and a plain
    build draws in fp32. Ordinary fp32 tensors are written directly."""
    params = list(params)
    parts = [p for p in params if is_partitioned(p)]
    if parts:  # the parameters' own ZeRO-3 methods: the model library does not import DeepSpeed
        parts[0].all_gather(param_list=parts)
    try:
        low = [(p, p.data) for p in params if p.dtype in (torch.bfloat16, torch.float16)]
        for p, data in low:
            p.data = data.float()
        try:
            yield
        finally:
            for p, data in low:
                data.copy_(p.data)
                p.data = data
    finally:
        if parts:  # every rank wrote the same seeded values: each keeps its own slice of them
            parts[0].partition(param_list=parts, has_been_updated=True)


def shape_of(p: torch.Tensor) -> torch.Size:
    """The full shape of a parameter, partitioned (ZeRO-3 keeps it as `ds_shape`) or not."""
    return torch.Size(getattr(p, "ds_shape", p.shape))


__all__ = ["is_partitioned", "full_tensors", "shape_of"]
