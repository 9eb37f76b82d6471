"""`engine.compile` (torch.compile per transformer block) in training: same losses, same names, resumable.

Backend aot_eager on CPU (dynamo tracing + AOT autograd's forward/backward graphs run by eager kernels:
the part where graph breaks, hooks and checkpointing interact; inductor's C++ code generation costs
minutes per graph on 2 cores, see tests/test_compile.py). Dropout masks are then eager's own, so the
compiled and the uncompiled runs must agree to float rounding.

- in process: every block compiled, parameter and state-dict names unchanged (with and without the
  checkpointing wrapper), identical blocks share graphs, no graph breaks, loss and gradients equal;
- 2 CPU ranks, the real DeepSpeed engine: 10 steps under ZeRO-0 and ZeRO-3, activation checkpointing
  off and full, compiled vs uncompiled losses within 1e-5 relative (measured: identical), and no graph
  break inside a block under ZeRO-3 (its parameter hooks stay outside the compiled forward);
- the training job: a compiled run resumed from an uncompiled checkpoint, and an uncompiled run resumed
  from a compiled one, reproduce the uninterrupted uncompiled reference run (tests/fixtures/engine.py).
"""
from __future__ import annotations

import json
import os
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fixtures.engine import _synthetic_micro, run_job, tiny_model  # noqa: E402
from test_resume import _losses, _seed_run_from  # noqa: E402
from tb_core.errors import ConfigError  # noqa: E402
from tb_train.dist import DistInfo  # noqa: E402
from tb_train.engine.activation_ckpt import apply_activation_checkpointing  # noqa: E402
from tb_train.engine.compile import CompileConfig, compile_blocks, compile_clock  # noqa: E402

STEPS = 10
CPU_TESTS = CompileConfig(enabled=True, backend="aot_eager")
COMPILED = ["engine.compile.enabled=true", "engine.compile.backend=aot_eager"]
VARIANTS = {"plain": ("none", False), "compiled": ("none", True), "compiled_ckpt": ("full", True)}


def _loss_and_grads(model: torch.nn.Module, seed: int) -> tuple[float, list[torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    x, y = torch.randn(3, 4, 4, 4, generator=g), torch.randint(0, 10, (3,), generator=g)
    model.zero_grad()
    torch.manual_seed(seed)
    loss = model(x, y)["loss"]
    loss.backward()
    return float(loss.detach()), [p.grad.clone() for p in model.parameters()]


@pytest.mark.parametrize("policy", ["none", "full"])
def test_blocks_compile_in_place_names_unchanged_losses_equal(policy):
    torch._dynamo.reset()
    counters = torch._dynamo.utils.counters
    counters.clear()
    ref, model = tiny_model(), tiny_model()
    apply_activation_checkpointing(model, policy)
    names, keys = [n for n, _ in model.named_parameters()], list(model.state_dict())
    assert compile_blocks(model, CPU_TESTS, DistInfo.for_rank(0, 1, "cpu")) == 6  # 2 encoder, 2 decoder, 2 head
    assert [n for n, _ in model.named_parameters()] == names and list(model.state_dict()) == keys
    assert not any("_orig_mod" in k for k in keys)
    before = compile_clock().graphs
    for seed in range(3):   # the masked count changes: the encoder's length and the head's rows vary
        got, want = _loss_and_grads(model, seed), _loss_and_grads(ref, seed)
        assert got[0] == pytest.approx(want[0], rel=1e-6, abs=0)
        for a, b in zip(got[1], want[1], strict=True):
            torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert compile_clock().graphs > before, "nothing was compiled"
    # One graph per block class and shape regime, not one per block: 6 blocks, at most 4 graphs.
    assert 2 <= counters["stats"]["unique_graphs"] <= 4
    assert not counters["graph_break"]


def test_compile_off_is_a_no_op_and_bad_backend_is_a_config_error():
    model = tiny_model()
    forward = model.mar.encoder_blocks[0].forward
    assert compile_blocks(model, CompileConfig(), DistInfo.for_rank(0, 1, "cpu")) == 0
    assert model.mar.encoder_blocks[0].forward == forward
    with pytest.raises(ConfigError, match="engine.compile.backend: unknown torch.compile backend 'inductr'"):
        compile_blocks(model, CompileConfig(enabled=True, backend="inductr"), DistInfo.for_rank(0, 1, "cpu"))


# ----------------------------------------------------------------------------- 2 ranks, DeepSpeed

def _losses_worker(args: dict) -> dict:
    """Per (stage, variant): the losses of STEPS steps, compilations, graph breaks (rank 0's)."""
    from tb_train.dist import init_distributed
    from tb_train.engine.engine import EngineConfig, build_engine
    from tb_train.engine.optim import OptimConfig

    dist = init_distributed()
    optim = OptimConfig(lr=1e-2, warmup_epochs=0, epochs=1, schedule="constant", grad_clip=1.0)
    results = {}
    for stage in args["stages"]:
        for name, (policy, compiled) in VARIANTS.items():
            torch._dynamo.reset()
            torch._dynamo.utils.counters.clear()
            cfg = EngineConfig(deepspeed=f"zero{stage}", precision="fp32", activation_checkpointing=policy,
                               compile=CPU_TESTS if compiled else CompileConfig(),
                               ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}}
                               if stage == 3 else {})
            eng = build_engine(tiny_model, cfg, optim, 4, dist)
            before = compile_clock().graphs
            losses = [eng.step([_synthetic_micro(step, dist.rank, 4)], optim.lr).loss for step in range(STEPS)]
            results[f"{stage}/{name}"] = {"losses": losses, "compilations": compile_clock().graphs - before,
                                          "graph_breaks": sum(torch._dynamo.utils.counters["graph_break"].values())}
    return results


@pytest.fixture(scope="module")
def two_rank_losses(deepspeed_warm, tmp_path_factory) -> dict:
    d = tmp_path_factory.mktemp("compile_losses")
    out = d / "losses.json"
    run_job([__file__, "losses", json.dumps({"stages": [0, 3], "out": str(out)})], 2, d)
    return json.loads(out.read_text())


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 3])
@pytest.mark.parametrize("variant", ["compiled", "compiled_ckpt"])
def test_compiled_losses_match_uncompiled(two_rank_losses, stage, variant):
    plain, run = two_rank_losses[f"{stage}/plain"], two_rank_losses[f"{stage}/{variant}"]
    assert plain["compilations"] == 0 and run["compilations"] >= 2   # forward graphs and their backward
    assert run["graph_breaks"] == 0
    assert len(run["losses"]) == STEPS and run["losses"][-1] < run["losses"][0]
    np.testing.assert_allclose(run["losses"], plain["losses"], rtol=1e-5, atol=0)


# ----------------------------------------------------------------------------- the training job, resumed

@pytest.mark.slow
@pytest.mark.distributed
def test_compiled_resume_from_uncompiled_checkpoint_and_back(train_setup):
    """reference (uncompiled, 10 steps) step 5 -> compiled steps 6-10; compiled steps 1-5 -> uncompiled
    steps 6-10: both trajectories equal the reference's, and the compiled runs report compile time."""
    setup = train_setup
    ref = _losses(setup, "reference", range(1, 11))
    _seed_run_from(setup, "reference", "step_00000005", "compiled_resumed")
    job = setup.start("compiled_resumed", 2, *COMPILED)
    assert job.wait(300) == [0, 0], job.log_text()
    assert "engine.compile: " in job.logs[0].read_text() and "engine.compile: " not in job.logs[1].read_text()
    assert min(setup.steps("compiled_resumed")) == 6
    np.testing.assert_allclose(_losses(setup, "compiled_resumed", range(6, 11)), ref[5:], rtol=1e-5, atol=0)

    job = setup.start("compiled_first", 2, *COMPILED, "run.max_steps=5", name="compiled_first_a")
    assert job.wait(300) == [0, 0], job.log_text()
    job = setup.start("compiled_first", 2, name="compiled_first_b")
    assert job.wait(300) == [0, 0], job.log_text()
    assert "engine.compile: " not in job.logs[0].read_text()
    got = _losses(setup, "compiled_first_a", range(1, 6)) + _losses(setup, "compiled_first_b", range(6, 11))
    np.testing.assert_allclose(got, ref, rtol=1e-5, atol=0)


def _main() -> None:
    """Worker entry: `python tests/test_compile_train.py MODE ARGS_JSON` on every rank."""
    from tb_train.dist import shutdown

    mode, args = sys.argv[1], json.loads(sys.argv[2])
    result = {"losses": _losses_worker}[mode](args)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args["out"]).write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    _main()
