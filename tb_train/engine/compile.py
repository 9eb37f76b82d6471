"""`engine.compile`: torch.compile applied to each transformer block of the training model.

What is compiled: the `forward` of every entry of `model.checkpoint_block_lists()` (MAR's encoder and
decoder blocks and the head's adaLN blocks; where activation checkpointing wrapped a block, the
`CheckpointedBlock` around it), replaced in place on that object. The model's own forward stays eager:
it draws the mask count on the host (a graph break) and gathers a data-dependent number of positions,
while the blocks are pure tensor code of a few shapes.

Why per block, and not DeepSpeed's `engine.compile()` (checked in DeepSpeed 0.19.8,
`DeepSpeedEngine.compile`): that hook calls `module.compile()` on the WHOLE model, i.e. compiles
`nn.Module._call_impl` of the root, so dynamo also traces the host-side mask draw and every ZeRO-3
module hook (the parameter fetch/release hooks of all submodules; DeepSpeed disables only some of them
for dynamo and offers its DeepCompile pass only with the inductor/eager backends) and the activation-
checkpointing wrappers, and the varying masked count changes the shapes of the whole graph. Per block:
- identical blocks share one compiled graph (dynamo's cache is per code object; parameters are graph
  inputs), so compile time grows with the number of block *types* (2 here), not with the depth;
- ZeRO-3's hooks stay eager and outside the graph: each compiled entry is marked a ZeRO-3 "leaf module"
  (`deepspeed.utils.set_z3_leaf_module`), so DeepSpeed gathers all of the block's parameters in the
  block's own pre-forward hook and registers no hooks on its children; the compiled forward then sees
  full parameters and no hooks. Stages 0-2 have no module hooks; the flag is read by stage 3 only;
- activation checkpointing keeps working and is compiled with the block: dynamo traces the wrapper's
  `torch.utils.checkpoint` call into the graph, and AOT autograd recomputes the block inside the
  compiled backward (dropout masks are kept, not redrawn). Compiling the inner block instead would
  dispatch the recompute through dynamo a second time, which may pick another cached graph (static vs
  dynamic shapes) than the forward did: torch then fails with "a different number of tensors was
  saved" (seen here; pytorch issue 166926);
- no parameter or state-dict name changes: compiling the bound `forward` in place adds no wrapper
  module (torch's `OptimizedModule` would add `_orig_mod.` to every name), so checkpoints, the EMA and
  the export need nothing new, and a run may switch compile on or off across a resume.

Randomness: with `backend: aot_eager` the dropout masks are eager's own (same losses as uncompiled, the
tests' backend on CPU); inductor draws them from its own generator (seeded from torch's, so runs are
still reproducible and resumable, but losses differ from an uncompiled run in the dropout noise).

Compile time is reported by rank 0 as `engine.compile: ...` lines: at the first forward after torch
compiled anything (the first step's forward and backward graphs; with `dynamic: null` a second
compile follows when a block first sees a second sequence length). Caches between runs: inductor's
FX-graph cache and the AOT-autograd cache (both on by default in torch 2.14) and dynamo's
profile-guided dynamic-shape record live in TORCHINDUCTOR_CACHE_DIR (default /tmp/torchinductor_USER,
node-local): `cache_dir` puts them on storage that outlives the node, e.g. for requeued jobs.
"""
from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn as nn

from tb_core.errors import ConfigError
from tb_train.dist import DistInfo


@dataclass
class CompileConfig:
    """torch.compile of each transformer block during training (see tb_train.engine.compile)."""
    enabled: bool = False               # compile each transformer block's forward (MAR and head)
    backend: str = "inductor"           # a torch.compile backend; aot_eager = tracing only (CPU tests)
    mode: Literal["default", "max-autotune-no-cudagraphs"] = "default"  # no CUDA graphs (ZeRO-3, varying lengths)
    dynamic: bool | None = None         # None: static first, a dimension becomes dynamic once it changes
    cache_dir: str | None = None        # TORCHINDUCTOR_CACHE_DIR for the compile caches; None = torch's


class CompileClock:
    """Seconds and number of torch compilations in this process (dynamo frames and lazily compiled
    backward graphs), from torch's compile start/end callbacks."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self.graphs = 0
        self._start: float | None = None

    def register(self) -> None:
        """(Re-)install the callbacks: `torch._dynamo.reset()` removes every registered callback."""
        handler = torch._dynamo.callback_handler
        if self._on_start not in handler.start_callbacks:
            handler.register_start_callback(self._on_start)
            handler.register_end_callback(self._on_end)

    def _on_start(self, args: Any) -> None:
        self._start = time.perf_counter()

    def _on_end(self, args: Any) -> None:
        if self._start is not None:
            self.seconds += time.perf_counter() - self._start
            self.graphs += 1
            self._start = None


_CLOCK: CompileClock | None = None


def compile_clock() -> CompileClock:
    """The process's one CompileClock; `compile_block_forwards` (re-)registers its callbacks."""
    global _CLOCK
    if _CLOCK is None:
        _CLOCK = CompileClock()
    return _CLOCK


class _Reporter:
    """Forward pre-hook of the model: prints what torch compiled in this process since the previous
    report (or since the hook was made), when anything was, so a recompile in the middle of a run shows
    up too, not only the start-up compile. Compilations outside the blocks (`sampling.compile` of a
    sample-grid hook) count too: the clock sees every torch.compile of the process."""

    def __init__(self, backend: str) -> None:
        self.backend = backend
        self.seen = (compile_clock().graphs, compile_clock().seconds)

    def __call__(self, module: nn.Module, args: Any) -> None:
        clock = compile_clock()
        graphs, seconds = clock.graphs, clock.seconds
        if graphs == self.seen[0]:
            return
        new, spent = graphs - self.seen[0], seconds - self.seen[1]
        self.seen = (graphs, seconds)
        hits = torch._dynamo.utils.counters["inductor"]
        cache = (f"; inductor FX-graph cache {hits['fxgraph_cache_hit']} hits, {hits['fxgraph_cache_miss']} "
                 f"misses" if self.backend == "inductor" else "")
        print(f"engine.compile: {new} compilation(s) in {spent:.1f} s (process total {graphs} in "
              f"{seconds:.1f} s, backend {self.backend}{cache})", flush=True)


def compile_blocks(model: nn.Module, cfg: CompileConfig, dist: DistInfo) -> int:
    """Compile the forward of every entry of `model.checkpoint_block_lists()` in place (a block, or
    the `CheckpointedBlock` around it); returns how many. Call after activation checkpointing is
    applied and before `deepspeed.initialize`, which reads the ZeRO-3 leaf flags when it registers
    its hooks."""
    if not cfg.enabled:
        return 0
    from deepspeed.utils import set_z3_leaf_module

    try:
        torch._dynamo.lookup_backend(cfg.backend)
    except Exception:  # torch raises its own InvalidBackend, a private type
        known = ", ".join(torch._dynamo.list_backends())
        raise ConfigError(f"engine.compile.backend: unknown torch.compile backend '{cfg.backend}' "
                          f"(known: {known})") from None
    if cfg.cache_dir is not None:
        os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.abspath(os.path.expanduser(cfg.cache_dir))
    blocks = compile_block_forwards(model, cfg.backend, cfg.mode, cfg.dynamic)
    for block in blocks:
        set_z3_leaf_module(block, True)
    if dist.is_main:
        model.register_forward_pre_hook(_Reporter(cfg.backend))
    return len(blocks)


def compile_block_forwards(model: nn.Module, backend: str, mode: str = "default",
                           dynamic: bool | None = None) -> list[nn.Module]:
    """torch.compile the `forward` of every entry of `model.checkpoint_block_lists()` in place and return
    the entries: the compilation `compile_blocks` does, without DeepSpeed (tools/gpu_check.py measures
    it with a plain torch step on a GPU without DeepSpeed installed). `compile_clock()` counts what
    torch then compiles."""
    compile_clock().register()
    entries = [block for blocks in model.checkpoint_block_lists() for block in blocks]
    for block in entries:
        block.forward = torch.compile(block.forward, backend=backend, mode=mode, dynamic=dynamic)
    return entries


__all__ = ["CompileConfig", "CompileClock", "compile_block_forwards", "compile_blocks", "compile_clock"]
