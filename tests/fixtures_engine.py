"""Shared pieces of the engine/resume/export tests: rank launcher, synthetic shards, a small model.

Distributed tests start `world` plain Python processes (one per rank, env:// rendezvous on a free port,
gloo) in ONE process group, so a test can SIGKILL or SIGTERM the whole job like a scheduler would. This
file is also the worker script those processes run: `python tests/fixtures_engine.py MODE ARGS_JSON`.
"""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tb_train.dist import free_port  # noqa: E402  (after the sys.path line above)

LATENT_C, LATENT_HW, NUM_CLASSES = 4, 4, 10


# ----------------------------------------------------------------------------- processes

def worker_env(rank: int, world: int, port: int) -> dict:
    env = dict(os.environ)
    env.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               PYTHONPATH=str(REPO) + os.pathsep + env.get("PYTHONPATH", ""))
    return env


class Job:
    """`world` rank processes in one process group (rank 0 leads it)."""

    def __init__(self, argv: list[str], world: int, log_dir: Path):
        port = free_port()
        log_dir.mkdir(parents=True, exist_ok=True)
        self.procs: list[subprocess.Popen] = []
        self.logs = [log_dir / f"rank{r}.log" for r in range(world)]
        for r in range(world):
            kwargs = {"process_group": 0} if r == 0 else {"process_group": self.procs[0].pid}
            self.procs.append(subprocess.Popen([sys.executable, *argv], env=worker_env(r, world, port),
                                               stdout=open(self.logs[r], "w"), stderr=subprocess.STDOUT,
                                               cwd=REPO, **kwargs))
        self.pgid = self.procs[0].pid

    def signal(self, sig: int) -> None:
        os.killpg(self.pgid, sig)

    def wait(self, timeout: float = 300) -> list[int]:
        deadline = time.monotonic() + timeout
        codes = []
        for p in self.procs:
            try:
                codes.append(p.wait(timeout=max(1.0, deadline - time.monotonic())))
            except subprocess.TimeoutExpired:
                self.signal(signal.SIGKILL)
                raise AssertionError(f"job timed out; rank logs:\n{self.log_text()}") from None
        return codes

    def log_text(self, tail: int = 4000) -> str:
        return "\n".join(f"--- {p.name}\n{p.read_text()[-tail:]}" for p in self.logs if p.exists())


def run_job(argv: list[str], world: int, log_dir: Path, timeout: float = 300, expect: int = 0) -> Job:
    job = Job(argv, world, log_dir)
    codes = job.wait(timeout)
    assert codes == [expect] * world, f"exit codes {codes}\n{job.log_text()}"
    return job


def train_job(argv: list[str], world: int, log_dir: Path, record: Path | None = None, **hooks) -> Job:
    """Start tb_train.train.run on `world` ranks with the test hooks of `_train` (not waited for)."""
    args = dict(hooks, argv=argv, record=str(record) if record else None)
    return Job([__file__, "train", json.dumps(args)], world, log_dir)


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def run_worker(mode: str, args: dict, world: int, log_dir: Path, timeout: float = 300) -> dict:
    """Run this file's `mode` on `world` ranks; returns the JSON that rank 0 wrote."""
    out = log_dir / f"{mode}.json"
    run_job([__file__, mode, json.dumps(dict(args, out=str(out)))], world, log_dir, timeout)
    return json.loads(out.read_text())


# Test modules import these session fixtures, and pytest then keeps one instance per importing module;
# the module-level cache makes the work happen once per session anyway.
_SESSION: dict[str, object] = {}


@pytest.fixture(scope="session")
def deepspeed_warm(tmp_path_factory) -> None:
    """Compile DeepSpeed's CPU comm op once (20-30 s cold), before ranks would race to build it."""
    if "warm" not in _SESSION:
        run_job([__file__, "warm", "{}"], 1, tmp_path_factory.mktemp("ds_warm"), timeout=600)
        _SESSION["warm"] = True


# ----------------------------------------------------------------------------- synthetic shards

def write_latent_folder(folder: Path, num_samples: int = 64, per_shard: int = 16, seed: int = 0,
                        channels: int = LATENT_C, hw: int = LATENT_HW) -> Path:
    """A precomputed-latents folder in the tb_train.shards format with random moments."""
    from tb_train.shards import FORMAT, sample_key, shard_name, write_shard

    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    shards = []
    for s in range(0, num_samples, per_shard):
        samples = []
        for i in range(s, min(s + per_shard, num_samples)):
            mean = rng.normal(0, 3, (2, channels, hw, hw))
            logvar = rng.normal(-4, 0.5, (2, channels, hw, hw))
            moments = np.concatenate([mean, logvar], axis=1).astype(np.float16)
            samples.append((sample_key(i), moments, int(rng.integers(0, NUM_CLASSES))))
        name = shard_name(len(shards))
        shards.append({"name": name, "count": len(samples), "sha256": write_shard(folder / name, samples)})
    manifest = {"format": FORMAT, "num_samples": num_samples, "samples_per_shard": per_shard, "shards": shards,
                "vae": {"identity": "synthetic", "scale": 0.2325, "latent_channels": channels, "downsample": 16},
                "resolution": hw * 16, "classes": [f"c{i}" for i in range(NUM_CLASSES)], "num_rejected": 0,
                "quantizer": None}
    (folder / "manifest.json").write_text(json.dumps(manifest))
    (folder / "stats.json").write_text(json.dumps({"num_samples": num_samples, "mean": [0.0] * channels,
                                                   "std": [1.0] * channels,
                                                   "channel_order": list(range(channels))}))
    return folder


# ----------------------------------------------------------------------------- a reference training run

JOB_YAML = """\
data: {{path: {data}, micro_batch: 4, num_workers: 0}}
model: {{size: tiny, latent_size: {hw}, latent_channels: {c}, num_classes: {classes}}}
optim: {{lr: 1.0e-3, warmup_epochs: 0.2, epochs: 2}}
engine:
  deepspeed: zero3
  precision: fp32
  ds_overrides: {{zero_optimization: {{stage3_param_persistence_threshold: 0}}}}
checkpoint: {{every_steps: 5, keep_last: 2}}
metrics: {{log_every: 1, image_every: 5}}
samples: {{num_images: 4, num_iter: 4}}
run: {{dir: {run}, max_steps: 10}}
"""
SAMPLES, STEPS_PER_EPOCH = 80, 10   # global batch 8 (micro 4 x 2 ranks, or x accum 2 on one rank)


class TrainSetup:
    """Synthetic latents + a job file; `reference` is an uninterrupted 2-rank ZeRO-3 run of 10 steps
    (checkpoints at 5 and 10, TensorBoard every step, an EMA sample grid at 5 and 10)."""

    def __init__(self, root: Path):
        self.root = root
        self.data = write_latent_folder(root / "data", num_samples=SAMPLES, per_shard=20)
        self.job = root / "job.yaml"
        self.job.write_text(JOB_YAML.format(data=self.data, hw=LATENT_HW, c=LATENT_C, classes=NUM_CLASSES,
                                            run=root / "default_run"))
        self.reference = root / "reference"
        job = self.start("reference", 2)
        assert job.wait(600) == [0, 0], job.log_text()

    def argv(self, run: str, *overrides: str) -> list[str]:
        return ["--config", str(self.job), f"run.dir={self.root / run}", *overrides]

    def record(self, name: str) -> Path:
        return self.root / f"{name}.rec"

    def start(self, run: str, world: int, *overrides: str, name: str | None = None, **hooks) -> Job:
        name = name or run
        return train_job(self.argv(run, *overrides), world, self.root / f"log_{name}", self.record(name), **hooks)

    def steps(self, name: str, rank: int = 0) -> dict[int, dict]:
        return {r["step"]: r for r in read_jsonl(Path(f"{self.record(name)}.steps{rank}"))}

    def sample_ids(self, name: str, world: int) -> dict[int, list[float]]:
        """0-based step index -> ids of the global batch in micro_id order (all ranks merged)."""
        rows = [r for k in range(world) for r in read_jsonl(Path(f"{self.record(name)}.samples{k}"))]
        out: dict[int, list[float]] = {}
        for r in sorted(rows, key=lambda r: (r["step"], r["micro_id"])):
            out.setdefault(r["step"], []).extend(r["ids"])
        return out


@pytest.fixture(scope="session")
def train_setup(deepspeed_warm, tmp_path_factory) -> TrainSetup:
    if "train" not in _SESSION:
        _SESSION["train"] = TrainSetup(tmp_path_factory.mktemp("train"))
    return _SESSION["train"]


# ----------------------------------------------------------------------------- the tiny model

def tiny_model(seed: int = 0):
    """The real TokenBridge `tiny` preset on the synthetic 4x4x4 latents (402,752 parameters)."""
    from tb_model.registry import ModelConfig, create

    torch.manual_seed(seed)
    return create(ModelConfig(size="tiny", latent_size=LATENT_HW, latent_channels=LATENT_C,
                              num_classes=NUM_CLASSES))


# ----------------------------------------------------------------------------- worker modes

def _synthetic_micro(step: int, micro_id: int, micro_batch: int, seed: int = 0):
    g = torch.Generator().manual_seed(1000 * step + micro_id)
    latents = torch.randn(micro_batch, LATENT_C, LATENT_HW, LATENT_HW, generator=g)
    labels = torch.randint(0, NUM_CLASSES, (micro_batch,), generator=g)
    from tb_train.engine import MicroInput, derive_seed
    return MicroInput(latents, labels, derive_seed(seed, step, micro_id, 0))


def _full_fp32(eng) -> dict[str, torch.Tensor]:
    """Every parameter's full fp32 master value (a collective under ZeRO), by bare-model name."""
    from deepspeed.utils import safe_get_full_fp32_param
    from tb_train.engine import canonical_name

    out = {}
    for n, p in eng.module.named_parameters():
        full = safe_get_full_fp32_param(p)
        out[canonical_name(n)] = (p.detach() if full is None else full).float().clone()
    return out


def _engine_matrix(args: dict) -> dict:
    """Per (stage, policy): losses of `steps` steps, the full gradients of the first step, the sharded EMA
    gathered at the end, and its max difference from an EMA of the gathered full weights of the same run."""
    from deepspeed.utils import safe_get_full_grad
    from tb_train.dist import init_distributed
    from tb_train.engine import EngineConfig, OptimConfig, build_engine, canonical_name

    dist = init_distributed()
    world, accum, mb = dist.world, args["accum"], args["micro_batch"]
    optim = OptimConfig(lr=1e-2, warmup_epochs=0, epochs=1, schedule="constant", grad_clip=1.0)
    decay = args.get("ema_decay", 0.9)
    results = {}
    for stage in args["stages"]:
        for policy in args["policies"]:
            cfg = EngineConfig(deepspeed=f"zero{stage}", precision="fp32", grad_accum=accum,
                               activation_checkpointing=policy, ema_decay=decay,
                               ds_overrides={"zero_optimization": {"stage3_param_persistence_threshold": 0}}
                               if stage == 3 else {})
            eng = build_engine(tiny_model, cfg, optim, mb, dist)
            grads: dict[str, list] = {}
            real_step = eng.ds.step

            def capture_then_step(real_step=real_step, eng=eng, grads=grads):
                if not grads and eng.ds.is_gradient_accumulation_boundary():
                    for n, p in eng.module.named_parameters():
                        grads[canonical_name(n)] = safe_get_full_grad(p).flatten().tolist()
                return real_step()

            eng.ds.step = capture_then_step
            full_ema = _full_fp32(eng)
            losses = []
            for step in range(args["steps"]):
                micro = [_synthetic_micro(step, dist.rank * accum + j, mb) for j in range(accum)]
                losses.append(eng.step(micro, optim.lr).loss)
                for name, value in _full_fp32(eng).items():
                    full_ema[name].lerp_(value, 1.0 - decay)
            ema = eng.ema.gather(dst=0)
            if dist.rank == 0:
                diff = max(float((ema[n] - full_ema[n]).abs().max()) for n in full_ema)
                results[f"{stage}/{policy}"] = {"losses": losses, "grads": grads, "ema_vs_full": diff,
                                                "ema": {k: v.flatten().tolist() for k, v in ema.items()}}
    return results


def _train(args: dict) -> int:
    """tb_train.train.run with test hooks: record losses / sample ids / fp32 checksums per step, inject
    NaN moments, or block after a step until the test signals the job."""
    import time as _time

    from tb_train import train as tr
    from tb_train.data import LatentLoader

    rank = int(os.environ["RANK"])
    record = Path(args["record"]) if args.get("record") else None
    nan_steps = {int(k): v for k, v in args.get("nan", {}).items()}   # step index -> rank to poison
    real_next = LatentLoader.next_step
    state = {"step": None}

    def next_step(self):
        batches = real_next(self)
        step = state["step"]
        if record is not None:
            with open(f"{record}.samples{rank}", "a") as f:
                for mb in batches:
                    ids = [float(m.double().sum()) for m in mb.moments]
                    f.write(json.dumps({"step": step, "micro_id": mb.micro_id, "ids": ids}) + "\n")
        if nan_steps.get(step) == rank:
            batches[0].moments[0, 0, 0, 0] = float("nan")
        return batches

    LatentLoader.next_step = next_step
    real_inputs = tr.Trainer.micro_inputs

    def micro_inputs(self, step):
        state["step"] = step
        return real_inputs(self, step)

    tr.Trainer.micro_inputs = micro_inputs

    def on_step(trainer, result):
        if record is not None:
            local = sum(float(s.view()[: s.valid].detach().double().sum()) for s in trainer.engine.ema.slots
                        if s.ema is not None)
            line = {"step": trainer.step, "loss": result.loss, "skipped": result.skipped, "fp32_sum": local}
            with open(f"{record}.steps{rank}", "a") as f:
                f.write(json.dumps(line) + "\n")
        if args.get("block_after") == trainer.step:
            Path(f"{record}.blocked{rank}").write_text("1")
            while args["block_mode"] == "kill" or trainer.preempt.received is None:
                _time.sleep(0.05)

    cfg, source = tr.load_job_config(args["argv"])
    return tr.run(cfg, source, callbacks=[on_step])


def _main() -> None:
    mode, args = sys.argv[1], json.loads(sys.argv[2])
    if mode == "warm":
        from tb_train.dist import init_distributed, shutdown
        from tb_train.engine import EngineConfig, OptimConfig, build_engine
        dist = init_distributed()
        build_engine(tiny_model, EngineConfig(deepspeed="zero0", precision="fp32"), OptimConfig(), 2, dist)
        shutdown()
        return
    if mode == "train":
        sys.exit(_train(args))
    from tb_train.dist import shutdown
    result = {"engine_matrix": _engine_matrix}[mode](args)
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args["out"]).write_text(json.dumps(result))
    shutdown()


if __name__ == "__main__":
    _main()
