"""A CPU kernel for the AR head's cached sampling loop at one or two rows: every step in one call.

Why they exist: the head samples one position per call at N=1 (and a few at the first iterations of
`generate`); a step is then matrix-vector products whose cost is reading the weights (L: 201 MB per
step, 4 blocks x 12 w^2 x 4 bytes), plus ~90 small torch ops around them. Measured on the 2-core AMD
EPYC (fp32, 2 threads, L's 16 trunk products alone, against the time to read the same bytes once):
MKL's sgemv ~2.0x, oneDNN on weights packed for M = 1 1.19-1.41x, this file's product 1.03-1.22x; the
torch ops around them added ~1 ms to a ~7 ms step: streaming 200 MB of weights evicts the caches, and
each small torch op after it ran ~10x slower than warm (the pick: 43 us warm, 380-400 us after a 200 MB
read). `HeadLoop` therefore runs the whole loop over steps in one call and one OpenMP region: per step
the token embedding, every block (both LayerNorms with their modulation, QKV, the q/k norms, the cache
write, attention over the cached steps, the projection, the MLP, both gated residuals), the final norm,
modulation and the step's classifier, and the pick, each product reading its weight once in its own
row-major layout (no packed copy).

The C source (rowkernels.c, beside this file) is compiled on first use with the system C compiler (the
one tools/setup_env.sh already installs for DeepSpeed) into a per-user cache, under a name keyed by the
hash of the source, the flags and the compiler's version; the build goes to a temporary file renamed
into place, so concurrent ranks never load half a library. Where it cannot be built or run (not
x86-64, no AVX2/FMA, no compiler, a failed build) `available()` is False, `unavailable_reason()` says why
in one line, and the head keeps oneDNN; nothing else changes.

Arithmetic: the same as the torch step in another summation order (LayerNorm statistics in double),
so results differ by rounding (~1e-6 relative); tests/test_head.py checks the tokens against the
prefix-recompute loop.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
from pathlib import Path
from typing import Sequence

import torch
from torch import Tensor

from tb_core.fileio import atomic_write_bytes

SOURCE = Path(__file__).with_name("rowkernels.c")
FLAGS = ("-O3", "-mavx2", "-mfma", "-fopenmp", "-shared", "-fPIC")
CACHE_ENV = "TB_KERNEL_CACHE"  # where built kernels are kept; default ~/.cache/tokenbridge/kernels
MAX_ROWS = 2  # L head shapes, 2 threads: 2 rows 1.29x the read time (oneDNN 1.68x), 4 rows 1.62x (oneDNN 1.41x)

_state: dict[str, object] = {}


def cache_dir() -> Path:
    """The folder of built kernels: $TB_KERNEL_CACHE, else ($XDG_CACHE_HOME or ~/.cache)/tokenbridge/kernels."""
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "tokenbridge" / "kernels"


def _cpu_supported() -> str | None:
    """None if this CPU runs the kernels, else why not."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        return f"CPU architecture {platform.machine()} (the kernels are x86-64 AVX2)"
    try:
        flags = next((line.split(":", 1)[1].split() for line in Path("/proc/cpuinfo").read_text().splitlines()
                      if line.startswith("flags")), [])
    except OSError as exc:
        return f"cannot read /proc/cpuinfo ({exc})"
    missing = [f for f in ("avx2", "fma") if f not in flags]
    return f"CPU lacks {', '.join(missing)}" if missing else None


def _build() -> Path:
    """The built library's path, compiling it first if the cache lacks this version."""
    compiler = os.environ.get("CC", "cc")
    try:
        version = subprocess.run([compiler, "--version"], capture_output=True, text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError) as exc:
        raise RuntimeError(f"no C compiler {compiler!r} ({exc})") from None
    key = hashlib.sha256(SOURCE.read_bytes() + " ".join(FLAGS).encode() + version.encode()).hexdigest()[:16]
    target = cache_dir() / f"tb_rowkernels_{key}.so"
    if target.exists():
        return target
    with tempfile.TemporaryDirectory() as tmp:
        built = Path(tmp) / target.name
        done = subprocess.run([compiler, *FLAGS, str(SOURCE), "-o", str(built), "-lm"], capture_output=True,
                              text=True)
        if done.returncode:
            first = (done.stderr.strip().splitlines() or ["(no output)"])[0]
            raise RuntimeError(f"building {SOURCE.name} with {compiler} failed: {first}")
        atomic_write_bytes(target, built.read_bytes())
    return target


def _load() -> ctypes.CDLL | None:
    if "lib" not in _state:
        _state["lib"], _state["reason"] = None, _cpu_supported()
        if _state["reason"] is None:
            try:
                lib = ctypes.CDLL(str(_build()))
            except (RuntimeError, OSError) as exc:
                _state["reason"] = str(exc)
            else:
                i64, ptr, i32 = ctypes.c_int64, ctypes.c_void_p, ctypes.c_int
                lib.tb_head_sample.argtypes = [ptr, i64, i64, i64, i64, i64, i64, i64, i64, ptr, i64, ptr, ptr, i64,
                                               ptr, ptr, ptr, ctypes.c_float, ptr, ptr, ctypes.c_float, i32]
                lib.tb_head_sample.restype = i32
                _state["lib"] = lib
    return _state["lib"]  # type: ignore[return-value]


def available() -> bool:
    """Whether the kernel is built and run on this CPU (built on the first call)."""
    return _load() is not None


def unavailable_reason() -> str | None:
    """Why `available()` is False, in one line (None when it is True)."""
    _load()
    return _state["reason"]  # type: ignore[return-value]


def usable(x: Tensor) -> bool:
    """Whether activations like x [rows, w] run here: CPU float32, at most MAX_ROWS rows, kernels available."""
    return (x.device.type == "cpu" and x.dtype == torch.float32 and x.dim() == 2 and x.shape[0] <= MAX_ROWS
            and available())


def _library() -> ctypes.CDLL:
    lib = _load()
    if lib is None:
        raise RuntimeError(f"tb_model.rowkernels unavailable: {unavailable_reason()}")
    return lib


def _check(name: str, t: Tensor, shape: tuple[int, ...]) -> None:
    if tuple(t.shape) != shape or t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous():
        raise ValueError(f"rowkernels: {name} must be a contiguous CPU float32 {list(shape)}, "
                         f"got {list(t.shape)} {t.dtype} on {t.device}{'' if t.is_contiguous() else ' (strided)'}")


class HeadLoop:
    """The AR head's cached sampling loop prepared for `tb_head_sample`: every block's 16 tensors (norm1,
    qkv, q_norm, k_norm, proj, norm2, fc1, fc2; weight then bias; Linear weights [out, in] as in
    nn.Linear), the final norm's weight and bias, every step's classifier (stacked [S, classes, w] and
    [S, classes]), the token embeddings (stacked [S - 1, classes, w]) and the step position embedding
    [S, w], checked once and their addresses in one table. Holds the tensors, so the addresses stay
    valid; in-place updates of them are seen (values are read at every call)."""

    def __init__(self, blocks: Sequence[Sequence[Tensor]], norm: Sequence[Tensor], classifiers: Sequence[Tensor],
                 embeds: Tensor, pos_embed: Tensor, heads: int) -> None:
        self._lib = _library()
        self.tensors = [list(tensors) for tensors in blocks]
        self.depth, self.heads = len(self.tensors), heads
        self.width, self.hidden = self.tensors[0][0].shape[0], self.tensors[0][12].shape[0]
        self.steps, self.classes = classifiers[1].shape
        w, hidden, D, S = self.width, self.hidden, self.width // heads, self.steps
        if w % heads:
            raise ValueError(f"rowkernels: {heads} heads do not divide the width {w}")
        shapes = [(w,), (w,), (3 * w, w), (3 * w,), (D,), (D,), (D,), (D,), (w, w), (w,), (w,), (w,),
                  (hidden, w), (hidden,), (w, hidden), (w,)]
        for i, tensors in enumerate(self.tensors):
            if len(tensors) != len(shapes):
                raise ValueError(f"rowkernels: block {i} has {len(tensors)} tensors, want {len(shapes)}")
            for j, (t, shape) in enumerate(zip(tensors, shapes)):
                _check(f"block {i} tensor {j}", t, shape)
        self.tensors.append([*norm, *classifiers])
        self.embeds, self.pos_embed = embeds, pos_embed
        for name, t, shape in zip(("norm weight", "norm bias", "classifier weights", "classifier biases",
                                   "token embeddings", "position embedding"),
                                  [*self.tensors[-1], embeds, pos_embed],
                                  [(w,), (w,), (S, self.classes, w), (S, self.classes), (S - 1, self.classes, w),
                                   (S, w)]):
            _check(name, t, shape)
        self.table = (ctypes.c_void_p * (16 * self.depth + 4))(*(t.data_ptr() for ts in self.tensors for t in ts))

    def __call__(self, x: Tensor, first: int, last: int, mods: Tensor, caches: Tensor, uniforms: Tensor,
                 temperature: float, picked: Tensor, logp: Tensor, eps: float) -> None:
        """Steps first..last-1 for rows = x.shape[0]: x [rows, w] is step `first`'s input (not changed),
        later inputs are the picked classes' embeddings; writes the classes into picked [rows, S] (int64),
        adds their log-probs to logp [rows] and fills rows first..last-1 of caches [depth, 2, rows, heads,
        S, w / heads]. mods [S, rows, (6 depth + 2) w]: block i's shift1, 1 + scale1, gate1, shift2,
        1 + scale2, gate2 at 6 i w, then the final 1 + scale and shift; uniforms [rows, S]."""
        rows, w, S, L = x.shape[0], self.width, self.steps, (6 * self.depth + 2) * self.width
        x = x.contiguous().clone()  # the steps work in place
        for name, t, shape in (("x", x, (rows, w)), ("mods", mods, (S, rows, L)), ("uniforms", uniforms, (rows, S)),
                               ("caches", caches, (self.depth, 2, rows, self.heads, S, w // self.heads)),
                               ("logp", logp, (rows,))):
            _check(name, t, shape)
        if not 0 <= first < last <= S or tuple(picked.shape) != (rows, S) or picked.dtype != torch.int64 \
                or not picked.is_contiguous():
            raise ValueError(f"rowkernels: steps {first}..{last - 1} of {S}, picked {list(picked.shape)} "
                             f"{picked.dtype}: want 0 <= first < last <= steps and picked [{rows}, {S}] int64")
        if self._lib.tb_head_sample(x.data_ptr(), rows, self.depth, w, self.hidden, self.heads, first, last, S,
                                    mods.data_ptr(), L, self.table, caches.data_ptr(), self.classes,
                                    self.embeds.data_ptr(), self.pos_embed.data_ptr(), uniforms.data_ptr(),
                                    temperature, picked.data_ptr(), logp.data_ptr(), eps, torch.get_num_threads()):
            raise MemoryError("rowkernels: no memory for the loop's scratch buffers")


__all__ = ["CACHE_ENV", "MAX_ROWS", "HeadLoop", "available", "cache_dir", "unavailable_reason", "usable"]
