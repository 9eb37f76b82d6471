"""DeepSpeed engine: ZeRO 0-3 × activation checkpointing on 2 CPU ranks against one process.

One 2-rank job runs every (stage, policy) pair for 5 steps (tiny TokenBridge, fp32, lr 1e-2) on the same
synthetic global batches as a single process with 2 accumulation micro-batches (stage 0, no
checkpointing). Measured: first-step gradients identical everywhere; losses identical at stage 0 and
within 1.2e-7 relative at stages 1-3 (reduction order; Adam then amplifies the difference in the weights,
so the weights/EMA of different stages are not compared elementwise). Asserted: losses within 1e-5
relative, gradients within 1e-6 absolute, checkpointing on == off, and the sharded EMA equal to an EMA
of the same run's gathered full fp32 weights (measured: exactly, every stage).
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from fixtures.engine import run_worker, tiny_model
from tb_core.errors import ConfigError
from tb_train.engine.activation_ckpt import CheckpointedBlock, apply_activation_checkpointing, canonical_name
from tb_train.engine.engine import EngineConfig, deepspeed_config, validate_deepspeed_config
from tb_train.engine.optim import OptimConfig, lr_at, param_groups

STEPS = 5


@pytest.fixture(scope="module")
def matrix(deepspeed_warm, tmp_path_factory):
    d = tmp_path_factory.mktemp("engine_matrix")
    common = {"micro_batch": 4, "steps": STEPS, "ema_decay": 0.9}
    ref = run_worker("engine_matrix", dict(common, accum=2, stages=[0], policies=["none"]), 1, d / "w1")
    dist = run_worker("engine_matrix", dict(common, accum=1, stages=[0, 1, 2, 3], policies=["none", "full"]),
                      2, d / "w2")
    return ref["0/none"], dist


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
@pytest.mark.parametrize("policy", ["none", "full"])
def test_two_ranks_match_one_process(matrix, stage, policy):
    ref, runs = matrix
    run = runs[f"{stage}/{policy}"]
    assert len(run["losses"]) == STEPS and run["losses"][-1] < run["losses"][0]
    np.testing.assert_allclose(run["losses"], ref["losses"], rtol=1e-5, atol=0)
    assert set(run["grads"]) == set(ref["grads"])
    for name, g in ref["grads"].items():
        np.testing.assert_allclose(run["grads"][name], g, rtol=0, atol=1e-6, err_msg=name)


@pytest.mark.slow
@pytest.mark.distributed
@pytest.mark.parametrize("stage", [0, 1, 2, 3])
def test_sharded_ema_equals_ema_of_full_weights(matrix, stage):
    ref, runs = matrix
    assert ref["ema_vs_full"] == 0.0
    assert runs[f"{stage}/none"]["ema_vs_full"] == 0.0 and runs[f"{stage}/full"]["ema_vs_full"] == 0.0


@pytest.mark.slow
@pytest.mark.distributed
def test_checkpointing_keeps_losses_and_gradients(matrix):
    _, runs = matrix
    for stage in (0, 1, 2, 3):
        plain, ckpt = runs[f"{stage}/none"], runs[f"{stage}/full"]
        assert ckpt["losses"] == plain["losses"]
        assert any(np.abs(g).max() > 0 for g in plain["grads"].values())
        for name in plain["grads"]:
            np.testing.assert_allclose(ckpt["grads"][name], plain["grads"][name], rtol=0, atol=1e-6)


@pytest.mark.slow
@pytest.mark.distributed
def test_ema_moves_with_training(matrix):
    """The EMA must differ from the initial weights (a lost update under ZeRO-3 would leave them)."""
    _, runs = matrix
    init = {n: p.detach().flatten().numpy() for n, p in tiny_model().named_parameters()}
    ema = runs["3/full"]["ema"]
    assert max(np.abs(np.array(ema[n]) - init[n]).max() for n in init) > 1e-4


def test_wrapper_keeps_state_dict_keys_and_policies():
    model = tiny_model()
    keys = list(model.state_dict())
    assert apply_activation_checkpointing(model, "every_k", k=2) == 3   # block 0 of each 2-block list
    enc = model.mar.encoder_blocks
    assert isinstance(enc[0], CheckpointedBlock) and not isinstance(enc[1], CheckpointedBlock)
    assert apply_activation_checkpointing(model, "full") == 3           # the rest
    assert list(model.state_dict()) == keys
    wrapped = [n for n, _ in model.named_parameters() if "ckpt_inner" in n]
    assert wrapped and all(canonical_name(n) in keys for n, _ in model.named_parameters())
    fresh = tiny_model(seed=1)
    model.load_state_dict(fresh.state_dict())                           # strict, bare keys in
    torch.testing.assert_close(enc[0].ckpt_inner.attn.qkv.weight, fresh.mar.encoder_blocks[0].attn.qkv.weight)


def _exempt_names(model, cfg: OptimConfig) -> set[str]:
    groups = {g["name"]: g for g in param_groups(model, cfg)}
    assert groups["decay"]["weight_decay"] == 0.02 and groups["no_decay"]["weight_decay"] == 0.0
    no_decay = {id(p) for p in groups["no_decay"]["params"]}
    return {n for n, p in model.named_parameters() if id(p) in no_decay}


def test_param_groups_default_is_the_released_rule_biases_and_1d_only():
    """The released code (MAR's add_weight_decay) exempts 1-D tensors and biases; every embedding,
    position embedding and learned token (2-D or more) decays."""
    model = tiny_model()
    names = _exempt_names(model, OptimConfig())
    expected = {n for n, p in model.named_parameters() if p.dim() <= 1 or n.endswith(".bias")}
    assert names == expected
    assert {"mar.z_proj.bias", "mar.encoder_blocks.0.norm1.weight"} <= names
    assert not names & {"mar.class_emb.weight", "mar.encoder_pos_embed_learned", "head.token_embed.0.weight",
                        "mar.mask_token", "mar.z_proj.weight"}


def test_param_groups_can_exempt_embeddings():
    model = tiny_model()
    names = _exempt_names(model, OptimConfig(no_decay_embeddings=True))
    assert {"mar.class_emb.weight", "mar.encoder_pos_embed_learned", "mar.z_proj.bias",
            "mar.encoder_blocks.0.norm1.weight", "head.token_embed.0.weight"} <= names
    assert "mar.z_proj.weight" not in names


def test_lr_schedule_warmup_then_cosine():
    cfg = OptimConfig(lr=1.0, warmup_epochs=2, epochs=10, min_lr=0.0)
    assert lr_at(cfg, 0, 10) == 0.0 and lr_at(cfg, 10, 10) == 0.5 and lr_at(cfg, 20, 10) == 1.0
    assert abs(lr_at(cfg, 60, 10) - 0.5) < 1e-12 and lr_at(cfg, 100, 10) == 0.0


def test_deepspeed_config_fills_job_fields_and_rejects_conflicts(tmp_path):
    ds = deepspeed_config(EngineConfig(deepspeed="zero3", precision="fp32", grad_accum=4), OptimConfig(), 8, 2)
    assert ds["train_batch_size"] == 64 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["reduce_bucket_size"] == 50_000_000 and ds["bf16"] == {"enabled": False}
    bad = tmp_path / "bad.json"
    bad.write_text('{"zero_optimization": {"stage": 2}, "train_batch_size": 8}')
    with pytest.raises(ConfigError, match="train_batch_size"):
        deepspeed_config(EngineConfig(deepspeed=str(bad)), OptimConfig(), 8, 1)
    with pytest.raises(ConfigError, match="no such file"):
        deepspeed_config(EngineConfig(deepspeed="zero9"), OptimConfig(), 8, 1)


def test_merged_deepspeed_config_is_validated_by_deepspeed():
    """A value DeepSpeed's own config model rejects fails as one ConfigError line naming the field."""
    engine = EngineConfig(deepspeed="zero2", precision="fp32", ds_overrides={"zero_optimization": {"stage": 7}})
    ds = deepspeed_config(engine, OptimConfig(), 8, 1)
    with pytest.raises(ConfigError, match=r"job.yaml: DeepSpeed rejects DeepSpeedZeroConfig.stage = 7") as e:
        validate_deepspeed_config(ds, "job.yaml")
    assert "\n" not in str(e.value)
    typo = deepspeed_config(EngineConfig(deepspeed="zero2", ds_overrides={"zero_optimization": {"stag": 2}}),
                            OptimConfig(), 8, 1)
    with pytest.raises(ConfigError, match="zero_optimization|stag"):
        validate_deepspeed_config(typo, "job.yaml")
    validate_deepspeed_config(deepspeed_config(EngineConfig(deepspeed="zero3"), OptimConfig(), 8, 2), "job.yaml")
