"""`tb-export`: one safetensors file (+ model config JSON) from a training checkpoint.

    tb-export RUN_DIR_OR_CKPT --out model.safetensors [--raw] [--tag step_00001000]

RUN_DIR_OR_CKPT is a run folder (uses checkpoints/latest), a checkpoint folder (uses its `latest`) or one
tag folder. The checkpoint is first verified as a resume verifies it (every recorded size and CRC-32,
`find_damage`, all files in this one process): a damaged one is a one-line CheckpointError naming the
file, without a fallback (the user named this checkpoint; `--tag` picks another). It runs as a single
process on CPU and reads the files directly, whatever the ZeRO stage and world size of the run: the raw
fp32 master weights come from DeepSpeed's ZeRO files
(`get_fp32_state_dict_from_zero_checkpoint`, or the module state of a stage-0 fp32 or amp_bf16 run), the EMA from the
per-rank EMA pieces (`tb_train.engine.ema.consolidate`); buffers (the quantizer table) come from the module state.

The output is the format of `tb_model.pretrained`: every tensor of the bare TokenBridge state dict in
fp32, the resolved ModelConfig as JSON in the safetensors metadata key "config" and in a sidecar
`<stem>.json`. `tb_model.TokenBridge.from_pretrained(path)` loads it without tb_train or DeepSpeed.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

import torch
import yaml

from tb_core.config import from_dict
from tb_core.errors import CheckpointError
from tb_model.config import ModelConfig, resolve
from tb_model.registry import create
from tb_train.engine.activation_ckpt import canonical_name
from tb_train.engine.checkpoint import (DS_MODEL_STATES, EMA_PART, RANK_FILE_GLOB, checksum_note, find_damage, locate,
                                       read_train_state)
from tb_train.cli import run_main
from tb_train.engine.ema import consolidate
from tb_train.engine.engine import weight_dtype

def model_config_of(run_dir: Path) -> ModelConfig:
    path = run_dir / "config.yaml"
    if not path.is_file():
        raise CheckpointError(f"{path}: not found (the run folder's resolved config names the model)")
    return resolve(from_dict(ModelConfig, yaml.safe_load(path.read_text())["model"], source=str(path),
                             prefix="model"))


def raw_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """fp32 master weights + buffers under the bare model's names."""
    state = read_train_state(ckpt_dir, tag)
    if state["zero_stage"] == 0 and weight_dtype(state["precision"]) == torch.float32:  # fp32 or amp_bf16
        sd = torch.load(ckpt_dir / tag / DS_MODEL_STATES, map_location="cpu",
                        weights_only=False)["module"]
    else:
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        sd = get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {canonical_name(k): v.float() for k, v in sd.items()}


def ema_state_dict(ckpt_dir: Path, tag: str) -> dict[str, torch.Tensor]:
    """The EMA weights, consolidated from every rank's piece (ZeRO partitions)."""
    files = sorted((ckpt_dir / tag).glob(RANK_FILE_GLOB))
    if not files:
        raise CheckpointError(f"{ckpt_dir / tag}: no EMA state ({RANK_FILE_GLOB}) in this checkpoint")
    pieces = []
    for f in files:
        state = torch.load(f, map_location="cpu", weights_only=False)
        if EMA_PART not in state:
            raise CheckpointError(f"{f}: holds no '{EMA_PART}' part (use --raw to export the raw weights)")
        pieces.append(state[EMA_PART])
    return consolidate(pieces)


def export(path: str | os.PathLike, out: str | os.PathLike, raw: bool = False, tag: str | None = None) -> Path:
    """Write `out` (.safetensors) and `<stem>.json`; returns the safetensors path."""
    ckpt_dir, latest, run_dir = locate(path)
    tag = tag or latest
    if not (ckpt_dir / tag).is_dir():
        raise CheckpointError(f"{ckpt_dir / tag}: no such checkpoint")
    problem = find_damage(ckpt_dir / tag)
    if problem is not None:
        raise CheckpointError(f"{problem} (checkpoint {ckpt_dir / tag}; --tag exports another one)")
    note = checksum_note(ckpt_dir / tag, read_train_state(ckpt_dir, tag))
    if note:
        print(f"tb-export: warning: {note}", file=sys.stderr, flush=True)
    cfg = model_config_of(run_dir)
    weights = raw_state_dict(ckpt_dir, tag)
    if not raw:
        ema = ema_state_dict(ckpt_dir, tag)
        unknown = sorted(set(ema) - set(weights))
        if unknown:
            raise CheckpointError(f"{ckpt_dir / tag}: EMA names not in the model: {', '.join(unknown[:3])}")
        weights.update(ema)
    with torch.device("meta"):
        model = create(cfg)
    try:
        model.load_state_dict(weights, strict=True, assign=True)  # validates names and shapes
    except RuntimeError as e:
        raise CheckpointError(f"{ckpt_dir / tag}: weights do not fit the run's model config: "
                              f"{' '.join(str(e).split())[:300]}") from None
    step = read_train_state(ckpt_dir, tag)["step"]
    return model.save_pretrained(out, metadata={"weights": "raw" if raw else "ema", "step": str(step),
                                                "source": str(ckpt_dir / tag)})


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tb-export", description="Export EMA (or raw) weights to safetensors.")
    p.add_argument("path", help="run folder, checkpoint folder, or step_* folder")
    p.add_argument("--out", required=True, help="output .safetensors file (a <stem>.json is written beside it)")
    p.add_argument("--raw", action="store_true", help="export the raw weights instead of the EMA")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: latest)")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)

    def body() -> int:
        out = export(args.path, args.out, raw=args.raw, tag=args.tag)
        print(f"wrote {out} and {out.with_suffix('.json')}")
        return 0

    return run_main("tb-export", body)


if __name__ == "__main__":
    sys.exit(main())
