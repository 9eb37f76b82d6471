"""Training metrics: TensorBoard scalars on two x-axes, throughput, MFU, memory, sample grids.

Every logged value is written twice: by optimizer step (tag as is, event files in `tensorboard/`) and
by `epoch_1000x` (tag prefixed `by_epoch1000x/`, x = int(1000 * samples seen / samples per epoch), event
files in `tensorboard/by_epoch1000x/`), so that runs with different global batches can be compared on the
same data axis (MAR's convention). The two axes live in separate folders because TensorBoard's purge
(below) drops every event at or after one x value of a folder, whatever its tag.

The logger is a stateful part of the checkpoint: its state is where its curves end (last step and its
epoch_1000x). Loading it makes the next event files start with a purge at the following step on each
axis (SummaryWriter `purge_step`), so the events a killed run wrote after its last checkpoint disappear
and a resumed run's curves have no duplicate or out-of-order steps.

Definitions (all per logging interval, averaged over its steps):
- step time: from `step_start()` to `step_end()` (data wait + forward/backward/optimizer); time spent
  outside (checkpoint saves, sample grids) is not counted.
- data-wait fraction: time from `step_start()` to `data_ready()` ÷ step time.
- samples/s: global samples (all ranks) per second = global_batch × steps ÷ summed step time.
- tokens/s: samples/s × tokens_per_sample, where a token is one (latent position, channel) pair — the
  unit the dimension-wise head predicts: h·w·C per image (4096 for 256 px with KL-16).
- MFU: model FLOP/s per device (flops_per_sample × samples/s ÷ world) ÷ peak FLOP/s of one device.
- peak memory: torch.cuda.max_memory_allocated() on GPU; on CPU the process's peak resident set size.
"""
from __future__ import annotations

import math
import resource
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor

from tb_core.fileio import atomic_write_with

EPOCH_AXIS = "by_epoch1000x/"

# Dense peak FLOP/s per device by (name fragment, dtype); fragments are tried in order, so the more
# specific names come first. fp32 is the non-tensor-core rate (PyTorch does not use TF32 by default).
_GPU_PEAKS: list[tuple[str, dict[torch.dtype, float]]] = [
    ("H100 PCIe", {torch.bfloat16: 756e12, torch.float16: 756e12, torch.float32: 51e12}),
    ("H100", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
    ("H200", {torch.bfloat16: 989e12, torch.float16: 989e12, torch.float32: 67e12}),
    ("A100", {torch.bfloat16: 312e12, torch.float16: 312e12, torch.float32: 19.5e12}),
]


@dataclass
class MetricsConfig:
    log_every: int = 10          # console + TensorBoard scalars interval (steps)
    image_every: int = 500       # sample grid interval (steps); 0 = off
    tensorboard: bool = True

    def __post_init__(self) -> None:
        if self.log_every < 1:
            raise ValueError(f"log_every must be >= 1, got {self.log_every}")
        if self.image_every < 0:
            raise ValueError(f"image_every must be >= 0, got {self.image_every}")


def _gemm_flops(dtype: torch.dtype, device: torch.device, n: int | None, n_max: int, min_time: float) -> float:
    """Best FLOP/s of an n×n×n matmul in `dtype` over repeats lasting at least `min_time` seconds.

    With n None the size doubles from 256 until one matmul takes min_time/8 (or n reaches n_max), so a
    dtype without fast kernels on this CPU (bf16 without AVX512-BF16/AMX) costs seconds, not minutes.
    """
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(a: Tensor, b: Tensor) -> float:
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        return time.perf_counter() - t0

    size = n or 256
    while True:
        a = torch.randn(size, size, device=device).to(dtype)
        b = torch.randn(size, size, device=device).to(dtype)
        timed(a, b)  # warm-up
        best = spent = timed(a, b)
        if n is not None or best >= min_time / 8 or size * 2 > n_max:
            break
        size *= 2
    while spent < min_time:
        dt = timed(a, b)
        best, spent = min(best, dt), spent + dt
    return 2 * size ** 3 / best


def measure_peak_flops(dtype: torch.dtype, device: str | torch.device | None = None,
                       n: int | None = None, min_time: float = 0.5) -> float:
    """Peak dense FLOP/s of one device in `dtype`, the denominator of MFU.

    On a GPU listed in the table the vendor's dense figure is returned (H100/H200: 989e12 for bf16);
    otherwise — and always on CPU — it is measured: the best time of a square GEMM in that dtype (size n,
    or grown up to 2048 on CPU / 8192 on GPU), repeated for at least `min_time` seconds.
    """
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        for fragment, peaks in _GPU_PEAKS:
            if fragment in name and dtype in peaks:
                return peaks[dtype]
    return _gemm_flops(dtype, device, n, 8192 if device.type == "cuda" else 2048, min_time)


def peak_memory_bytes() -> int:
    """Peak memory of this process: CUDA allocator peak when CUDA is in use, else peak RSS."""
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        return int(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _default_world() -> int:
    dist = torch.distributed
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class MetricsLogger:
    """Collects per-step timings and scalars; every `log_every` steps writes their interval means to
    TensorBoard (both axes) and one console line. Only rank 0 writes; on other ranks every call is a
    no-op, so the training loop calls it unconditionally."""

    def __init__(self, cfg: MetricsConfig, run_dir: str, rank: int, flops_per_sample: float,
                 peak_flops: float | None, samples_per_epoch: int, global_batch: int, *,
                 tokens_per_sample: int | None = None, world: int | None = None,
                 clock: Callable[[], float] = time.perf_counter):
        self.cfg, self.run_dir, self.active = cfg, Path(run_dir), rank == 0
        self.flops_per_sample, self.peak_flops = flops_per_sample, peak_flops
        self.samples_per_epoch, self.global_batch = samples_per_epoch, global_batch
        self.tokens_per_sample = tokens_per_sample
        self.world = world if world is not None else _default_world()
        self.clock = clock
        self._writers: dict[str, object] = {}
        self._purge: dict[str, int] = {}   # axis -> first step of the events the next writer replaces
        self._closed = False
        self._t_start = self._t_data = None
        self._last = (0, 0)
        self._reset()

    def _writer(self, axis: str):
        """The SummaryWriter of one axis ("step" or "epoch"), opened on first use (with the purge step set
        by `load_state_dict`); None on ranks > 0, with tensorboard off, or after `close`."""
        if not (self.active and self.cfg.tensorboard) or self._closed:
            return None
        if axis not in self._writers:
            from torch.utils.tensorboard import SummaryWriter
            log_dir = self.run_dir / "tensorboard"
            if axis == "epoch":
                log_dir = log_dir / EPOCH_AXIS.rstrip("/")
            self._writers[axis] = SummaryWriter(log_dir=str(log_dir), purge_step=self._purge.get(axis))
        return self._writers[axis]

    @property
    def writer(self):
        """TensorBoard SummaryWriter for values by optimizer step (hooks log there too); None off rank 0."""
        return self._writer("step")

    def epoch_1000x(self, samples: int) -> int:
        return int(1000 * samples / self.samples_per_epoch)

    def state_dict(self) -> dict:
        """Where the curves end: the last closed step and its epoch_1000x."""
        step, samples = self._last
        return {"step": step, "epoch_1000x": self.epoch_1000x(samples)}

    def load_state_dict(self, sd: dict) -> None:
        """Continue the curves after `sd`: events past it (written by a run that was killed later) are
        purged when the next event files open. The partial logging interval is not carried over."""
        self._purge = {"step": int(sd["step"]) + 1, "epoch": int(sd["epoch_1000x"]) + 1}
        self._close_writers()

    def _reset(self) -> None:
        self._steps, self._time, self._wait = 0, 0.0, 0.0
        self._sums: dict[str, float] = {}

    def step_start(self) -> None:
        """Call before fetching the step's data."""
        self._t_start = self._t_data = self.clock()

    def data_ready(self) -> None:
        """Call once the step's batches are in hand (before the forward)."""
        self._t_data = self.clock()

    def step_end(self, step: int, samples: int, scalars: dict[str, float]) -> None:
        """Close step `step` (1-based count of optimizer steps done).

        samples: global samples seen since the start of training, this step included (sets epoch_1000x).
        scalars: this step's values, e.g. {"loss", "lr", "grad_norm", "ce/ch0", …}; logged as interval
        means under their own names.
        """
        if not self.active:
            return
        now = self.clock()
        self._steps += 1
        self._time += now - self._t_start
        self._wait += self._t_data - self._t_start
        for k, v in scalars.items():
            self._sums[k] = self._sums.get(k, 0.0) + float(v)
        self._last = (step, samples)
        if step % self.cfg.log_every == 0:
            self._emit(step, samples)
            self._reset()

    def interval_values(self) -> dict[str, float]:
        """Means of the scalars and the derived throughput/memory figures over the current interval."""
        values = {k: s / self._steps for k, s in self._sums.items()}
        step_time = self._time / self._steps
        sps = self.global_batch / step_time
        values["perf/step_time_s"] = step_time
        values["perf/samples_per_s"] = sps
        values["perf/data_wait_frac"] = self._wait / self._time
        if self.tokens_per_sample:
            values["perf/tokens_per_s"] = sps * self.tokens_per_sample
        device_flops = self.flops_per_sample * sps / self.world
        values["perf/model_tflops_per_device"] = device_flops / 1e12
        if self.peak_flops:
            values["perf/mfu"] = device_flops / self.peak_flops
        values["mem/peak_gib"] = peak_memory_bytes() / 2 ** 30
        return values

    def _emit(self, step: int, samples: int) -> None:
        values = self.interval_values()
        epoch_1000x = self.epoch_1000x(samples)
        by_step, by_epoch = self._writer("step"), self._writer("epoch")
        if by_step is not None:
            for tag, v in values.items():
                by_step.add_scalar(tag, v, step)
                by_epoch.add_scalar(EPOCH_AXIS + tag, v, epoch_1000x)
            by_step.add_scalar("progress/epoch_1000x", epoch_1000x, step)
            by_step.flush()
            by_epoch.flush()
        print(self._console_line(step, epoch_1000x, values), file=sys.stdout, flush=True)

    @staticmethod
    def _console_line(step: int, epoch_1000x: int, v: dict[str, float]) -> str:
        parts = [f"step {step}", f"epoch {epoch_1000x / 1000:.3f}"]
        parts += [f"{k} {x:.4g}" for k, x in v.items() if "/" not in k]
        parts.append(f"{v['perf/samples_per_s']:.2f} img/s")
        if "perf/tokens_per_s" in v:
            parts.append(f"{v['perf/tokens_per_s']:.3g} tok/s")
        if "perf/mfu" in v:
            parts.append(f"MFU {v['perf/mfu']:.1%}")
        parts.append(f"data {v['perf/data_wait_frac']:.1%}")
        parts.append(f"{v['perf/step_time_s']:.3f} s/step")
        parts.append(f"mem {v['mem/peak_gib']:.2f} GiB")
        return " | ".join(parts)

    def log_image_grid(self, tag: str, images: Tensor, step: int) -> None:
        """images [N, 3, H, W] in [-1, 1] -> one grid as TensorBoard image `tag` and as
        run_dir/samples/step_XXXXXXX.png (written atomically)."""
        if not self.active:
            return
        from torchvision.utils import make_grid, save_image
        images = ((images.detach().float().cpu() + 1) / 2).clamp(0, 1)
        grid = make_grid(images, nrow=math.ceil(math.sqrt(images.shape[0])), padding=2)
        writer = self.writer
        if writer is not None:
            writer.add_image(tag, grid, step)
            writer.flush()
        path = self.run_dir / "samples" / f"step_{step:07d}.png"
        atomic_write_with(path, lambda f: save_image(grid, f, format="png"))

    def close(self) -> None:
        """Write the last, partial interval (if any) and close the event file."""
        if self.active and self._steps:
            self._emit(*self._last)
            self._reset()
        self._close_writers()
        self._closed = True

    def _close_writers(self) -> None:
        for w in self._writers.values():
            w.close()
        self._writers = {}


__all__ = ["MetricsConfig", "MetricsLogger", "measure_peak_flops", "peak_memory_bytes"]
