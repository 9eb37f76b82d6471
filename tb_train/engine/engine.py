"""The DeepSpeed training engine: the ZeRO config, the engine build, and one optimizer step.

`build_engine` turns an `EngineConfig` + `OptimConfig` into a `TrainEngine`:
- the ZeRO stage and its tuning come from a JSON file (`configs/deepspeed/zero{0,1,2,3}.json`); batch,
  precision, clipping and optimizer fields are filled from the job config, so there is one source of truth,
  and the merged dict is validated against DeepSpeed's own config model before anything is written;
- under ZeRO-3 the model is built inside `deepspeed.zero.Init` (no rank holds a whole copy, see `build_engine`);
- activation checkpointing (`tb_train.engine.activation_ckpt`) wraps blocks from outside the model;
- `precision` picks one of three schemes (`PRECISION_DTYPES`): fp32; bf16 (DeepSpeed's bf16 optimizer: bf16
  weights and activations, fp32 masters); amp_bf16, the authors' scheme (fp32 weights and optimizer, the
  forward under DeepSpeed's `torch_autocast` in bf16, LayerNorms and the loss in fp32, see `keep_norms_fp32`);
- AdamW groups and the LR schedule come from `tb_train.engine.optim`.

`TrainEngine.step` runs one optimizer step over a rank's micro-batches, seeding the model's randomness per
micro-batch (`MicroInput.seed`, see `tb_train.engine.rng`) and skipping the update when any loss is not finite.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Literal

import torch
import torch.nn as nn

from tb_core.config import deep_merge
from tb_core.errors import ConfigError
from tb_train.engine.activation_ckpt import apply_activation_checkpointing
from tb_train.engine.compile import CompileConfig, compile_blocks
from tb_train.dist import DistInfo, mean_over_ranks
from tb_train.engine.ema import ShardedEMA
from tb_train.engine.optim import OptimConfig, param_groups
from tb_train.recipes import config_path

# Fields of the DeepSpeed JSON that the job config owns; a JSON that sets them is rejected, not overridden.
JOB_OWNED_DS_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps",
                     "gradient_clipping", "optimizer", "scheduler", "bf16", "fp16", "torch_autocast")

Precision = Literal["bf16", "fp32", "amp_bf16"]

# (dtype of the module's weights, dtype of the forward's matmuls) for each `EngineConfig.precision`.
PRECISION_DTYPES: dict[str, tuple[torch.dtype, torch.dtype]] = {
    "fp32": (torch.float32, torch.float32),
    "bf16": (torch.bfloat16, torch.bfloat16),
    "amp_bf16": (torch.float32, torch.bfloat16),
}


def weight_dtype(precision: str) -> torch.dtype:
    """dtype of the module's own parameters under `precision`.

    fp32 (fp32 and amp_bf16) means DeepSpeed runs no bf16/fp16 optimizer: the module's parameters are the
    fp32 masters, so a ZeRO stage-0 checkpoint holds the whole fp32 model in its module states and the whole
    torch AdamW state, and both precisions share one checkpoint layout. Code that decides how to read or
    resume a checkpoint must branch on this, not on `precision == "fp32"`."""
    return PRECISION_DTYPES[precision][0]


def compute_dtype(precision: str) -> torch.dtype:
    """dtype the forward's matmuls run in under `precision` (bf16 for amp_bf16): the dtype whose peak
    GEMM rate is the denominator of MFU."""
    return PRECISION_DTYPES[precision][1]


@dataclass
class EngineConfig:
    """How the model is trained on the machines: ZeRO stage, precision, accumulation, checkpointing."""
    deepspeed: str = "zero2"                    # name in configs/deepspeed/ or a path to a JSON file
    ds_overrides: dict[str, Any] = field(default_factory=dict)  # deep-merged into that JSON
    precision: Precision = "bf16"               # fp32 | bf16 (DeepSpeed bf16) | amp_bf16 (fp32 weights + autocast)
    grad_accum: int = 1                         # micro-batches per rank per optimizer step
    global_batch: int | None = None             # if set: grad_accum = global_batch / (micro_batch * world)
    activation_checkpointing: Literal["none", "full", "every_k"] = "none"
    checkpoint_k: int = 2                       # every_k: blocks 0, k, 2k, ... of each list
    ema_decay: float = 0.9999
    nonfinite_patience: int = 5                 # stop after more than this many non-finite steps in a row
    compile: CompileConfig = field(default_factory=CompileConfig)  # torch.compile per block (engine/compile.py)
    # every host allocation >= this many MiB gets its own mapping, returned on free (tb_core/hostmem.py:
    # without it a ZeRO-3 rank's resident memory grows with heap fragmentation); 0 = glibc's default
    host_mmap_threshold_mb: float = 4.0

    def __post_init__(self) -> None:
        if self.grad_accum < 1 or self.checkpoint_k < 1:
            raise ValueError("grad_accum and checkpoint_k must be >= 1")
        if not 0.0 <= self.host_mmap_threshold_mb <= 32.0:
            raise ValueError(f"host_mmap_threshold_mb must be in [0, 32] (glibc's limit), got {self.host_mmap_threshold_mb}")
        if not 0.0 <= self.ema_decay < 1.0:
            raise ValueError(f"ema_decay must be in [0, 1), got {self.ema_decay}")


def resolve_grad_accum(cfg: EngineConfig, micro_batch: int, world: int) -> int:
    """Accumulation steps that make micro_batch × accum × world = engine.global_batch (when set), so a
    job file states the recipe's global batch and runs unchanged on any number of GPUs."""
    if cfg.global_batch is None:
        return cfg.grad_accum
    per_step = micro_batch * world
    if cfg.global_batch % per_step:
        raise ConfigError(f"engine.global_batch {cfg.global_batch} is not a multiple of data.micro_batch "
                          f"{micro_batch} x world {world}")
    accum = cfg.global_batch // per_step
    if cfg.grad_accum not in (1, accum):
        raise ConfigError(f"engine.grad_accum {cfg.grad_accum} contradicts engine.global_batch "
                          f"{cfg.global_batch} (= {micro_batch} x {world} x {accum})")
    return accum


# ----------------------------------------------------------------------------- DeepSpeed config


def resolve_deepspeed_file(spec: str) -> Path:
    """`zero2` → the packaged tb_train/configs/deepspeed/zero2.json; a path is used as it is."""
    try:
        return config_path(spec, "deepspeed")
    except ConfigError as e:
        raise ConfigError(f"engine.deepspeed: {e}") from None


def deepspeed_config(cfg: EngineConfig, optim: OptimConfig, micro_batch: int, world: int,
                     load_universal: bool = False) -> dict:
    """The dict passed to deepspeed.initialize: the JSON file + overrides + the job-owned fields."""
    path = resolve_deepspeed_file(cfg.deepspeed)
    try:
        base = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"{path}: invalid JSON: {e}") from None
    for key in JOB_OWNED_DS_KEYS:
        if key in base or key in cfg.ds_overrides:
            raise ConfigError(f"{path}: key '{key}' is set by the job config (data/optim/engine), remove it")
    ds = deep_merge(base, copy.deepcopy(cfg.ds_overrides))
    if "stage" not in ds.get("zero_optimization", {}):
        raise ConfigError(f"{path}: missing 'zero_optimization.stage'")
    ds.update({
        "train_micro_batch_size_per_gpu": micro_batch,
        "gradient_accumulation_steps": cfg.grad_accum,
        "train_batch_size": micro_batch * cfg.grad_accum * world,
        "gradient_clipping": optim.grad_clip,
        "bf16": {"enabled": cfg.precision == "bf16"},
        # amp_bf16 uses DeepSpeed's own autocast around its forward: an autocast opened outside it is
        # switched off inside on CUDA when this section is disabled. lower_precision_safe_modules [] keeps
        # every gradient reduction in fp32, as DDP does under the authors' autocast (DeepSpeed's default
        # would reduce nn.Linear gradients in bf16).
        "torch_autocast": {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
        if cfg.precision == "amp_bf16" else {"enabled": False},
        "optimizer": {"type": "AdamW", "params": {
            "lr": optim.lr, "betas": list(optim.betas), "eps": optim.eps,
            "weight_decay": optim.weight_decay, "torch_adam": True}},
    })
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("checkpoint", {})["load_universal"] = load_universal
    return ds


def validate_deepspeed_config(ds: dict, source: str) -> None:
    """Check the merged dict with DeepSpeed's own config parser (its pydantic models), without building
    an engine, so a bad `engine.ds_overrides` value fails as one line before the run folder is written.

    source: what the dict came from, e.g. "engine.deepspeed=zero2 + engine.ds_overrides".
    """
    from deepspeed.runtime.config import DeepSpeedConfig
    from pydantic import ValidationError

    checked = copy.deepcopy(ds)
    checked.pop("train_batch_size")  # DeepSpeed derives it from the world size it sees; ours is consistent
    try:
        DeepSpeedConfig(checked)
    except ValidationError as e:
        first = e.errors()[0]
        where = ".".join(str(x) for x in first["loc"]) or "<top>"
        raise ConfigError(f"{source}: DeepSpeed rejects {e.title}.{where} = {first.get('input')!r}: "
                          f"{first['msg']}") from None
    except (AssertionError, ValueError, KeyError, TypeError) as e:
        msg = " ".join(str(e).split()) or type(e).__name__
        raise ConfigError(f"{source}: DeepSpeed rejects the config: {msg}") from None


# ----------------------------------------------------------------------------- the engine

@dataclass
class StepResult:
    loss: float                  # mean over micro-batches and ranks (nan when skipped)
    ce_per_channel: torch.Tensor  # [C] mean over micro-batches and ranks
    grad_norm: float | None
    lr: float
    skipped: bool                # non-finite loss or input somewhere: no optimizer/EMA update


@dataclass
class MicroInput:
    """One micro-batch ready for the model: scaled latents [b, C, h, w], labels [b], and the seed of the
    model's own randomness (masks, label drop, dropout) for this (step, micro_id)."""
    latents: torch.Tensor
    labels: torch.Tensor
    seed: int


class TrainEngine:
    """A DeepSpeed engine with our step (seeding, non-finite skip, LR by step) and the per-partition EMA."""

    def __init__(self, engine: Any, cfg: EngineConfig, optim: OptimConfig, dist: DistInfo):
        self.ds = engine
        self.cfg, self.optim, self.dist = cfg, optim, dist
        self.stage = engine.zero_optimization_stage()
        self.dtype = compute_dtype(cfg.precision)  # of the matmuls: the MFU peak is measured in it
        self.ema = ShardedEMA(engine.module, cfg.ema_decay, dist)
        self._group_hparams = [{k: g[k] for k in ("name", "weight_decay", "betas", "eps") if k in g}
                               for g in engine.optimizer.param_groups]

    @property
    def module(self) -> nn.Module:
        return self.ds.module

    def repair_after_load(self) -> None:
        """Undo two side effects of DeepSpeed's universal-checkpoint load (both measured, ZeRO-3):
        every AdamW group gets the first group's hyperparameters (the no-decay group came back with
        weight_decay 0.02), and all sub-groups share ONE `step` tensor, which AdamW then increments once
        per group per step (wrong bias correction from the second group on). Harmless after a normal load.
        """
        for group, hp in zip(self.ds.optimizer.param_groups, self._group_hparams, strict=True):
            group.update(hp)
        inner = getattr(self.ds.optimizer, "optimizer", self.ds.optimizer)
        for state in inner.state.values():
            if torch.is_tensor(state.get("step")):
                state["step"] = state["step"].clone()

    def set_lr(self, lr: float) -> None:
        for group in self.ds.optimizer.param_groups:
            group["lr"] = lr

    def _discard_grads_if_unguarded(self) -> None:
        """DeepSpeed's ZeRO and bf16 optimizers skip a step whose gradient norm is not finite; plain
        stage 0 with fp32 weights (fp32, amp_bf16) does not, so there the gradients are dropped and torch's
        AdamW skips every param."""
        if not hasattr(self.ds.optimizer, "overflow"):
            for p in self.ds.module.parameters():
                p.grad = None

    def step(self, micro: list[MicroInput], lr: float) -> StepResult:
        """Forward/backward every micro-batch of this rank, then one optimizer step (or a skipped one).

        A skipped step changes neither the weights nor the EMA; counting skipped steps is the caller's
        business (`tb_train.engine.state.TrainState`)."""
        assert len(micro) == self.cfg.grad_accum, "one MicroInput per accumulation step"
        self.set_lr(lr)
        self.ds.train()
        stats = None
        for j, mb in enumerate(micro):
            torch.manual_seed(mb.seed)
            # fp32 latents also in bf16 runs: the model quantizes them before its first layer.
            latents = mb.latents.to(self.dist.device, torch.float32)
            out = self.ds(latents, mb.labels.to(self.dist.device))
            loss = out["loss"]
            # Corrupt inputs count too: the quantizer would map a NaN latent to a finite token silently.
            finite = torch.isfinite(loss.detach()) & torch.isfinite(latents).all()
            # A non-finite step poisons every gradient with NaN (x 1.0 otherwise, exact; no host sync), so
            # the all-reduced gradient norm is NaN on all ranks and the optimizer skips the update together.
            self.ds.backward(loss * torch.where(finite, 1.0, float("nan")))
            row = torch.cat([loss.detach().float().reshape(1), out["ce_per_channel"].detach().float(),
                             (~finite).float().reshape(1)])
            stats = row if stats is None else stats + row
            if j == len(micro) - 1:
                stats = mean_over_ranks(stats / len(micro))
                skipped = bool(stats[-1].item() > 0)
                if skipped:
                    self._discard_grads_if_unguarded()
            self.ds.step()
        if skipped:
            if getattr(self.ds.optimizer, "overflow", True) is not True:
                raise RuntimeError("non-finite loss but DeepSpeed applied the update; refusing to continue")
        else:
            self.ema.update()
        grad_norm = self.ds.get_global_grad_norm()
        grad_norm = None if grad_norm is None else float(grad_norm)
        loss_value = float("nan") if skipped else float(stats[0].item())
        return StepResult(loss_value, stats[1:-1].cpu(), grad_norm, lr, skipped)


def _norm_input_to_fp32(module: nn.Module, args: tuple) -> tuple:
    return (args[0].float(), *args[1:])


def keep_norms_fp32(model: nn.Module) -> None:
    """Make every nn.LayerNorm of `model` normalize in fp32 under autocast.

    CUDA autocast runs layer_norm in fp32 itself, CPU autocast does not (its fp32 list lacks layer_norm: a
    LayerNorm fed a bf16 Linear output, e.g. the attention's q/k norms, would normalize in bf16). Casting
    the input to fp32 in a forward pre-hook gives the fp32 norm on every device, numerically what CUDA
    autocast does; the hooks live on the modules, so they also run in activation-checkpointing recomputes."""
    for m in model.modules():
        if isinstance(m, nn.LayerNorm):
            m.register_forward_pre_hook(_norm_input_to_fp32)


@torch.no_grad()
def _round_to(model: nn.Module, dtype: torch.dtype) -> None:
    """Round the fp32 parameters to `dtype` and back (a no-op for fp32): the values a zero.Init build in
    `dtype` starts from, so every ZeRO stage's fp32 masters start equal."""
    if dtype != torch.float32:
        for p in model.parameters():
            p.copy_(p.to(dtype))


def build_engine(model_fn: Callable[[], nn.Module], cfg: EngineConfig, optim: OptimConfig, micro_batch: int,
                 dist: DistInfo, load_universal: bool = False) -> TrainEngine:
    """Build the model, wrap its blocks for activation checkpointing (and its norms for amp_bf16), and
    initialise DeepSpeed.

    Under ZeRO-3 the model is built inside `deepspeed.zero.Init`: every submodule is partitioned as soon
    as it exists, so no rank ever holds more than its 1/world share plus the one module being built or
    initialised (the init rules write through `tb_model.partitioned.full_tensors`, one module at a time).
    Stages 0-2 keep whole weights on every rank anyway and build the model plainly. Both ways draw the
    same random numbers in the same order, so the initial weights are bit-identical for every stage and
    world size (tests/test_zero_init.py). Under bf16 DeepSpeed makes the fp32 masters from the bf16
    weights at ZeRO-3 (zero.Init creates bf16 parameters); the other stages get the same rounding here
    (`_round_to`), so the masters too start identical everywhere.
    """
    import deepspeed

    ds_config = deepspeed_config(cfg, optim, micro_batch, dist.world, load_universal)
    if int(ds_config["zero_optimization"]["stage"]) == 3:
        # dtype from the config (bf16 or fp32); zero.Init's own dtype argument is ignored on CPU accelerators
        with deepspeed.zero.Init(config_dict_or_path=ds_config):
            model = model_fn()
    else:
        model = model_fn()
        _round_to(model, weight_dtype(cfg.precision))
    apply_activation_checkpointing(model, cfg.activation_checkpointing, cfg.checkpoint_k)
    compile_blocks(model, cfg.compile, dist)
    if cfg.precision == "amp_bf16":
        keep_norms_fp32(model)
    groups = param_groups(model, optim)
    engine, _, _, _ = deepspeed.initialize(model=model, model_parameters=groups, config=ds_config)
    return TrainEngine(engine, cfg, optim, dist)
