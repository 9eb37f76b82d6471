"""`engine.precision=amp_bf16`: fp32 weights and AdamW, the forward under bf16 autocast, norms and loss in fp32.

One 1-rank worker process (this file, `python tests/test_amp.py ARGS_JSON`, started through the fixtures'
`run_job`) builds tiny TokenBridge engines on the fixtures' synthetic micro-batches (micro-batch 4, lr 1e-2,
constant): fp32 and amp_bf16 at ZeRO 0 and 3 for 4 steps with a checkpoint after step 2, amp_bf16 resumed
from it, amp_bf16 at ZeRO 1 and 2, and amp_bf16 at ZeRO 0 with full activation checkpointing. During the
first step it records the dtypes of the parameters, the optimizer state, a Linear's output, LayerNorm
outputs, the logits, the cross-entropy's input and the loss.
Measured: amp_bf16's first loss is 1.3e-4 relative off fp32's (autocast ran; same initial weights), later
ones up to 4.9e-4; resumed losses, weights and EMA bit-identical to the uninterrupted run; checkpointing
on == off bit-identical (the recompute runs under the autocast state of the forward). Asserted: first loss
off by (0, 2%), resumed within 1e-6 relative. The 2-rank test (slow) runs amp_bf16 at ZeRO 1/2/3 against
one process with 2 accumulation micro-batches: first-step gradients identical (DeepSpeed's default bf16
reduction of Linear gradients: up to 1.2e-4 off, asserted <= 1e-6), losses within 1.1e-4 relative.
"""
from __future__ import annotations

import json
import math
import os
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from fixtures.engine import _full_fp32, _synthetic_micro, run_job, tiny_model
from tb_core.errors import ConfigError
from tb_train.engine.activation_ckpt import canonical_name
from tb_train.engine.engine import (EngineConfig, StepResult, TrainEngine, compute_dtype, deepspeed_config,
                                    validate_deepspeed_config, weight_dtype)
from tb_train.engine.optim import OptimConfig

MICRO_BATCH, STEPS, SAVE_AT = 4, 4, 2
OPTIM = dict(lr=1e-2, warmup_epochs=0, epochs=1, schedule="constant", grad_clip=1.0)
LINEAR, Q_NORM, RESIDUAL_NORM = "head.blocks.0.attn.qkv", "head.blocks.0.attn.q_norm", "head.norm"


# ----------------------------------------------------------------------------- the worker (1 or 2 ranks)

def _engine(stage: int, precision: str, accum: int = 1, policy: str = "none") -> TrainEngine:
    from tb_train.dist import init_distributed
    from tb_train.engine.engine import build_engine

    cfg = EngineConfig(deepspeed=f"zero{stage}", precision=precision, grad_accum=accum, ema_decay=0.9,
                       activation_checkpointing=policy,
                       ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}}
                       if stage == 3 else {})
    return build_engine(tiny_model, cfg, OptimConfig(**OPTIM), MICRO_BATCH, init_distributed())


def _step(eng: TrainEngine, step: int) -> StepResult:
    accum, rank = eng.cfg.grad_accum, eng.dist.rank
    return eng.step([_synthetic_micro(step, rank * accum + j, MICRO_BATCH) for j in range(accum)], OPTIM["lr"])


def _name(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


class DtypeProbe:
    """Records, during one forward, the output dtype of chosen modules, of the head (the logits), of the
    model (the loss) and the input dtype of every F.cross_entropy call."""

    def __init__(self, eng: TrainEngine) -> None:
        self.seen: dict[str, str] = {}
        modules = {canonical_name(n): m for n, m in eng.module.named_modules()}   # also through checkpointing
        watch = {"linear": LINEAR, "q_norm": Q_NORM, "residual_norm": RESIDUAL_NORM, "logits": "head"}
        self.handles = [modules[path].register_forward_hook(
            lambda m, a, out, key=key: self._record(key, out)) for key, path in watch.items()]
        self.handles.append(eng.module.register_forward_hook(lambda m, a, out: self._record("loss", out["loss"])))
        self.real_ce = torch.nn.functional.cross_entropy
        torch.nn.functional.cross_entropy = self._ce

    def _record(self, key: str, t: torch.Tensor) -> None:   # None: the hook leaves the output as it is
        self.seen.setdefault(key, _name(t))

    def _ce(self, logits: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        self._record("ce_input", logits)
        return self.real_ce(logits, *args, **kwargs)

    def close(self) -> dict[str, str]:
        torch.nn.functional.cross_entropy = self.real_ce
        for h in self.handles:
            h.remove()
        return self.seen


def _optimizer_dtypes(eng: TrainEngine) -> list[str]:
    """dtypes of what AdamW updates and keeps: its parameters (ZeRO: the flat fp32 partitions) and state."""
    inner = getattr(eng.ds.optimizer, "optimizer", eng.ds.optimizer)
    tensors = [p for g in inner.param_groups for p in g["params"]]
    tensors += [v for s in inner.state.values() for k, v in s.items() if k != "step" and torch.is_tensor(v)]
    return sorted({_name(t) for t in tensors})


def _checksum(eng: TrainEngine) -> float:
    return sum(float(v.double().sum()) for v in _full_fp32(eng).values())


def _ema_checksum(eng: TrainEngine) -> float:
    return sum(float(v.double().sum()) for v in eng.ema.gather(dst=None).values())


def _train(stage: int, precision: str, steps: int, ckpt: Path | None = None, policy: str = "none") -> dict:
    """`steps` steps from the initial weights; with `ckpt`, a checkpoint (model, optimizer, EMA) after SAVE_AT."""
    from tb_train.engine.checkpoint import CheckpointManager

    eng = _engine(stage, precision, policy=policy)
    params = sorted({_name(p) for p in eng.module.parameters()})
    bf16_comm = [n for n, p in eng.module.named_parameters() if hasattr(p, "comm_dtype")]
    probe = DtypeProbe(eng)
    losses = [_step(eng, 0).loss]
    forward = probe.close()
    manager = CheckpointManager(ckpt, 2, eng, rank_states={"ema": eng.ema}) if ckpt else None
    for step in range(1, steps):
        if manager and step == SAVE_AT:
            manager.save(step)
        losses.append(_step(eng, step).loss)
    return {"losses": losses, "params": params, "optimizer": _optimizer_dtypes(eng), "forward": forward,
            "bf16_comm": bf16_comm, "weights": _checksum(eng), "ema": _ema_checksum(eng)}


def _resume(stage: int, ckpt: Path) -> dict:
    """amp_bf16 rebuilt from scratch, loaded from `ckpt` by the job's own resume path, trained to STEPS."""
    from tb_train.engine.checkpoint import CheckpointManager, plan_resume

    eng = _engine(stage, "amp_bf16")
    plan = plan_resume(ckpt, world=1, stage=stage, precision="amp_bf16", warn=None)
    CheckpointManager(ckpt, 2, eng, rank_states={"ema": eng.ema}).load(plan)
    losses = [_step(eng, step).loss for step in range(SAVE_AT, STEPS)]
    return {"tag": plan.tag, "universal": plan.universal, "losses": losses, "weights": _checksum(eng),
            "ema": _ema_checksum(eng)}


def _one_rank(root: Path) -> dict:
    out = {}
    for stage in (0, 3):   # fp32 first: DeepSpeed keeps a process-global flag once autocast was initialised
        out[f"fp32/{stage}"] = _train(stage, "fp32", STEPS)
    for stage in (0, 3):
        out[f"amp/{stage}"] = _train(stage, "amp_bf16", STEPS, ckpt=root / f"ckpt{stage}")
        out[f"resumed/{stage}"] = _resume(stage, root / f"ckpt{stage}")
    for stage in (1, 2):
        out[f"amp/{stage}"] = _train(stage, "amp_bf16", STEPS)
    out["amp_ckpt/0"] = _train(0, "amp_bf16", STEPS, policy="full")
    return out


def _two_ranks(args: dict) -> dict:
    """Per stage in args["stages"]: amp_bf16 losses and the full gradients of the first step, with
    args["accum"] micro-batches per rank."""
    from deepspeed.utils import safe_get_full_grad

    out = {}
    for stage in args["stages"]:
        eng = _engine(stage, "amp_bf16", accum=args["accum"])
        grads: dict[str, list[float]] = {}
        real_step = eng.ds.step

        def capture_then_step(eng: TrainEngine = eng, grads: dict = grads,
                              real_step: Any = real_step) -> Any:
            if not grads and eng.ds.is_gradient_accumulation_boundary():
                grads.update({canonical_name(n): safe_get_full_grad(p).flatten().tolist()
                              for n, p in eng.module.named_parameters()})
            return real_step()

        eng.ds.step = capture_then_step
        out[str(stage)] = {"losses": [_step(eng, step).loss for step in range(STEPS)], "grads": grads}
    return out


def _worker() -> None:
    from tb_train.dist import shutdown

    args = json.loads(sys.argv[1])
    result = _one_rank(Path(args["root"])) if args["mode"] == "one_rank" else _two_ranks(args)
    if os.environ["RANK"] == "0":
        Path(args["out"]).write_text(json.dumps(result))
    shutdown()


def run_amp_worker(args: dict, world: int, root: Path) -> dict:
    out = root / f"{args['mode']}_{world}.json"
    run_job([__file__, json.dumps(dict(args, root=str(root), out=str(out)))], world, root / f"log{world}",
            timeout=300)
    return json.loads(out.read_text())


# ----------------------------------------------------------------------------- tests

@pytest.fixture(scope="module")
def runs(deepspeed_warm: None, tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("amp")
    return dict(run_amp_worker({"mode": "one_rank"}, 1, root), root=str(root))


def test_deepspeed_config_for_amp_bf16() -> None:
    """No DeepSpeed bf16/fp16 optimizer, DeepSpeed's own autocast in bf16, gradients reduced in fp32."""
    ds = deepspeed_config(EngineConfig(deepspeed="zero3", precision="amp_bf16"), OptimConfig(), 8, 2)
    assert ds["bf16"] == {"enabled": False} and "fp16" not in ds
    assert ds["torch_autocast"] == {"enabled": True, "dtype": "bfloat16", "lower_precision_safe_modules": []}
    validate_deepspeed_config(ds, "job.yaml")
    for precision in ("fp32", "bf16"):
        assert deepspeed_config(EngineConfig(precision=precision), OptimConfig(), 8, 1)["torch_autocast"] == \
            {"enabled": False}
    with pytest.raises(ConfigError, match="torch_autocast"):
        deepspeed_config(EngineConfig(ds_overrides={"torch_autocast": {"enabled": True}}), OptimConfig(), 8, 1)
    assert (weight_dtype("amp_bf16"), compute_dtype("amp_bf16")) == (torch.float32, torch.bfloat16)
    assert (weight_dtype("bf16"), compute_dtype("fp32")) == (torch.bfloat16, torch.float32)


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_amp_keeps_fp32_weights_and_optimizer(runs: dict, stage: int) -> None:
    run = runs[f"amp/{stage}"]
    assert run["params"] == ["float32"] and run["optimizer"] == ["float32"]
    assert run["bf16_comm"] == []   # no parameter marked for DeepSpeed's bf16 gradient communication


@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_amp_forward_runs_matmuls_in_bf16_norms_and_loss_in_fp32(runs: dict, stage: int) -> None:
    assert runs[f"amp/{stage}"]["forward"] == {
        "linear": "bfloat16", "q_norm": "float32", "residual_norm": "float32", "logits": "bfloat16",
        "ce_input": "float32", "loss": "float32"}


@pytest.mark.parametrize("stage", [0, 3])
def test_fp32_forward_has_no_bf16(runs: dict, stage: int) -> None:
    """The control: the same probes see fp32 everywhere without autocast."""
    assert set(runs[f"fp32/{stage}"]["forward"].values()) == {"float32"}


@pytest.mark.parametrize("stage", [0, 3])
def test_amp_trains_close_to_fp32_but_not_equal(runs: dict, stage: int) -> None:
    amp, fp32 = runs[f"amp/{stage}"]["losses"], runs[f"fp32/{stage}"]["losses"]
    assert len(amp) == STEPS and all(math.isfinite(x) for x in amp) and amp[-1] < amp[0]
    first = abs(amp[0] - fp32[0]) / fp32[0]
    assert 0 < first < 0.02, (amp, fp32)
    assert all(abs(a - f) / f < 0.05 for a, f in zip(amp, fp32))


@pytest.mark.parametrize("stage", [0, 3])
def test_amp_resume_equals_uninterrupted(runs: dict, stage: int) -> None:
    full, resumed = runs[f"amp/{stage}"], runs[f"resumed/{stage}"]
    assert resumed["tag"] == f"step_{SAVE_AT:08d}" and resumed["universal"] is False
    assert resumed["losses"] == pytest.approx(full["losses"][SAVE_AT:], rel=1e-6, abs=0)
    assert resumed["weights"] == pytest.approx(full["weights"], rel=1e-6, abs=0)
    assert resumed["ema"] == pytest.approx(full["ema"], rel=1e-6, abs=0)


def test_amp_checkpoints_export_their_fp32_weights(runs: dict) -> None:
    """tb-export's reader: a stage-0 amp_bf16 checkpoint holds the fp32 model in its module states (read
    directly, as for fp32), a stage-3 one in ZeRO partitions; both give the same fp32 weights."""
    from tb_train.engine.export import raw_state_dict

    tag = f"step_{SAVE_AT:08d}"
    sd = {stage: raw_state_dict(Path(runs["root"]) / f"ckpt{stage}", tag) for stage in (0, 3)}
    assert set(sd[0]) == set(sd[3]) and len(sd[0]) > 20
    assert all(v.dtype == torch.float32 for v in sd[0].values())
    for name, value in sd[0].items():
        torch.testing.assert_close(value, sd[3][name], rtol=0, atol=1e-3, msg=name)  # bf16 forwards differ by stage


def test_amp_activation_checkpointing_recomputes_under_autocast(runs: dict) -> None:
    """The recompute must run in bf16 like the forward did; in fp32 the gradients, hence weights, would differ."""
    plain, ckpt = runs["amp/0"], runs["amp_ckpt/0"]
    assert ckpt["losses"] == plain["losses"] and ckpt["weights"] == plain["weights"]


@pytest.mark.slow
@pytest.mark.distributed
def test_amp_two_ranks_match_one_process(deepspeed_warm: None, tmp_path: Path) -> None:
    """Each micro-batch's bf16 forward/backward is the same on 2 ranks as in one process, so the first
    gradients differ only by fp32 summation order (measured: equal; with DeepSpeed's default bf16 reduction
    of Linear gradients up to 1.2e-4 off). Later losses drift by bf16 roundings of slightly different weights."""
    ref = run_amp_worker({"mode": "two_ranks", "stages": [0], "accum": 2}, 1, tmp_path)["0"]
    runs = run_amp_worker({"mode": "two_ranks", "stages": [1, 2, 3], "accum": 1}, 2, tmp_path)
    for stage, run in runs.items():
        assert run["losses"][0] == pytest.approx(ref["losses"][0], rel=1e-6, abs=0), stage
        assert run["losses"] == pytest.approx(ref["losses"], rel=1e-3, abs=0), stage
        assert set(run["grads"]) == set(ref["grads"])
        for name, g in ref["grads"].items():
            np.testing.assert_allclose(run["grads"][name], g, rtol=0, atol=1e-6, err_msg=f"{stage} {name}")


if __name__ == "__main__":
    _worker()
