"""`tb-demo`: the whole pipeline on the embedded digits, on CPU, measured and written up as a report.

    tb-demo [--out runs/demo] [--smoke] [--ranks N] [--latent-channels 4|16] [--ablations
            [--ablation-rows a b c d e] [--ablation-seeds 0 1 ...]] [train.overrides ...]

It runs the real jobs one after the other — exactly what a user would type — so the demo exercises the
same code as a cluster run: `tb-precompute` (the digits' train split → demo VAE moments, 4×8×8),
`tb-train` (tiny model, DeepSpeed ZeRO-2, one CPU process or `--ranks N` processes), `tb-export` (EMA
weights → one safetensors file), then it samples every class with the exported model, measures the
samples with the demo's digit classifier (`tb_train.demo.digits`: class-consistency and digit-FID against
the real test split, with the floor real-train-vs-test and the ceiling of the untrained model), and
writes `<out>/report.md` with the sample grid, the training curves, the quantization histogram, the
metrics, the time of every stage and the machine. Every step is resumable: rerunning the same command
skips finished shards, resumes training from `latest`, re-exports and re-measures.

`--smoke` is the same pipeline on a tiny budget (tests); `--ablations` adds the paper's ablation
tables in miniature (tb_train/demo/ablations.py) to the report. `--latent-channels 16` runs the same chain
on the 16-channel demo VAE (`demo_vae16`, the miniature of KL-16's 16 channels) with the recipe
`configs/jobs/demo16.yaml`; the report then also measures how dependent the channels are
(tb_train/demo/dependency.py).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import yaml
from torchvision.utils import save_image

from tb_core.config import from_dict, load_config
from tb_core.errors import ConfigError, TBError
from tb_core.fileio import atomic_write_json
from tb_core.launcher import child_env
from tb_core.runlock import RunLock
from tb_core.measure import machine_info, markdown_table
from tb_model.quantizer import QuantizerConfig
from tb_model.registry import ModelConfig, create
from tb_model.tokenbridge import TokenBridge
from tb_model.vae import LatentVAE, VAEConfig, load_vae
from tb_train.demo import ablations as ab
from tb_train.data import precompute
from tb_train.demo import report
from tb_train.demo import dependency as dep
from tb_train.engine import export
from tb_train.cli import run_main
from tb_train.demo.data import demo_vae_path, ensure_demo_images, shard_latents
from tb_train.demo.digits import (DigitExtractor, digit_fid, digit_stats, load_digit_extractor, real_images,
                             score_images, split_accuracy)
from tb_train.recipes import config_path
from tb_train.engine.rng import init_seed
from tb_train.sample.job import Sampler, SamplingConfig, load_model
from tb_train.train.job import TrainJobConfig

SMOKE_OVERRIDES = ["run.max_steps=12", "checkpoint.every_steps=6", "metrics.log_every=2", "metrics.image_every=6",
                   "samples.num_images=10", "eval.every_steps=3", "eval.num_samples=20"]
EVAL_SPLITS = ("test", "heldout")   # the report's split first; heldout is the one recipes are tuned on


@dataclass(frozen=True)
class Recipe:
    """What a latent channel count changes in the chain: the shipped VAE, the precompute and training
    configs (packaged names), and the ablation arms' budget (epochs per arm and seed)."""

    channels: int
    precompute: str
    job: str
    ablation_epochs: int

    @property
    def vae(self) -> Path:
        return demo_vae_path(self.channels)


# 4 channels: 360 steps per arm (18 per epoch; ~2.5 min): 5 arms x 2 seeds + the demo fit 45 minutes (docs/demo.md).
# 16 channels: a step costs ~2.7x (0.66 s vs 0.25 s: the AR head runs 16 steps per token), so 10 epochs (180 steps,
# ~2.5 min) per arm: rows (b)+(c) x 3 seeds (9 runs) + the 16-channel demo fit 40 minutes on the shared 2-core machine.
RECIPES = {4: Recipe(4, "precompute_demo", "demo", 20), 16: Recipe(16, "precompute_demo16", "demo16", 10)}
DEFAULT_RECIPE = RECIPES[4]
ABLATION_ROWS = ("a", "b", "c", "d", "e")


@dataclass
class DemoEval:
    """How the final model is measured: `per_class` samples of every class with the run's `samples`
    settings (num_iter, cfg, temperature), seeds derived from `seed` and the sample index."""

    per_class: int = 30
    seed: int = 1000
    grid_per_class: int = 8


@dataclass
class Timer:
    """Wall time per named stage, in the order they ran."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        t0 = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = self.seconds.get(name, 0.0) + time.perf_counter() - t0


def _check(name: str, status: int) -> None:
    if status != 0:
        raise StageFailed(name, status)


class StageFailed(TBError):
    """A job of the chain exited non-zero; it printed its own error, the demo exits with its status."""

    def __init__(self, name: str, status: int) -> None:
        super().__init__(f"{name} failed with status {status}")
        self.exit_code = status


def run_precompute(out: Path, recipe: Recipe = DEFAULT_RECIPE) -> Path:
    """The train split as an ImageFolder tree, then tb-precompute -> <out>/latents."""
    images = ensure_demo_images(out / "images_train", split="train")
    _check("tb-precompute", precompute.main(["--config", str(config_path(recipe.precompute, "jobs")),
                                             f"input={images}", f"output={out / 'latents'}",
                                             f"vae.path={recipe.vae}"]))
    return out / "latents"


def train_args(out: Path, overrides: list[str], run_dir: Path | None = None, periodic_eval: bool = True,
               recipe: Recipe = DEFAULT_RECIPE) -> list[str]:
    """tb-train's command line for the demo; evaluation during training (when the job has an `eval`
    section) measures against the real held-out digits, written as an image folder once."""
    paths = [f"data.path={out / 'latents'}", f"run.dir={run_dir or out / 'run'}", f"samples.vae.path={recipe.vae}"]
    if "eval" in {f.name for f in dataclasses.fields(TrainJobConfig)}:
        if periodic_eval:
            paths.append(f"eval.reference={ensure_demo_images(out / 'images_heldout', split='heldout')}")
        else:
            paths.append("eval.every_steps=0")
    return ["--config", str(config_path(recipe.job, "jobs")), *paths, *overrides]


def train_subprocess(args: list[str], ranks: int = 1) -> None:
    """tb-train in child processes (`ranks` of them under torchrun): DeepSpeed keeps process-global
    groups, so a second training run in one process (the ablation arms) must get a fresh process."""
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={ranks}"] if ranks > 1 else []
    env = child_env()
    if not torch.cuda.is_available():
        env.setdefault("DS_ACCELERATOR", "cpu")
    name = f"tb-train ({ranks} ranks under torchrun)" if ranks > 1 else "tb-train"
    _check(name, subprocess.run([sys.executable, *launcher, "-m", "tb_train.train", *args], env=env).returncode)


def run_train(out: Path, overrides: list[str], ranks: int, recipe: Recipe = DEFAULT_RECIPE) -> None:
    """tb-train as one child process, or `ranks` of them with the same global batch (ZeRO-2 shards it)."""
    if ranks == 1:
        train_subprocess(train_args(out, overrides, recipe=recipe))
        return
    cfg = load_config(TrainJobConfig, config_path(recipe.job, "jobs"), overrides)
    global_batch = cfg.engine.global_batch or cfg.data.micro_batch * cfg.engine.grad_accum
    if global_batch % ranks:
        raise ConfigError(f"--ranks {ranks} does not divide the global batch {global_batch}")
    extra = [f"engine.global_batch={global_batch}", f"data.micro_batch={global_batch // ranks}", "engine.grad_accum=1"]
    train_subprocess(train_args(out, [*overrides, *extra], recipe=recipe), ranks)


def run_config(run_dir: Path) -> dict:
    return yaml.safe_load((run_dir / "config.yaml").read_text())


def step0_model(trained: TokenBridge, run_cfg: dict) -> TokenBridge:
    """The model as training initialized it (same seed stream as tb-train), with the trained quantizer
    table (an empirical table is calibrated data, not learned) — the ceiling of the digit-FID scale."""
    model_cfg = from_dict(ModelConfig, run_cfg["model"], source="run config.yaml", prefix="model")
    torch.manual_seed(init_seed(int(run_cfg["run"]["seed"])))
    model = create(model_cfg)
    model.quantizer.load_state_dict(trained.quantizer.state_dict())
    return model.eval()


def sampling_settings(run_cfg: dict, source: str) -> SamplingConfig:
    """The run's evaluation sampling settings (`eval.sampling` of its config.yaml)."""
    return from_dict(SamplingConfig, dict(run_cfg["eval"]["sampling"]), source=source, prefix="eval.sampling")


@torch.no_grad()
def sample_classes(model: TokenBridge, vae: LatentVAE, per_class: int, settings: SamplingConfig, seed: int,
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """`per_class` samples of every class -> (uint8 images [10·per_class, 3, H, W], labels [10·per_class]).

    Through the sampling component (tb_train.sample.job.Sampler): sample i is seeded by (seed, i) alone."""
    labels = torch.arange(model.config.num_classes).repeat_interleave(per_class)
    images = Sampler(model.eval(), vae, settings).images(labels, range(len(labels)), seed)
    return ab.nchw_uint8(images), labels


def grid_png(images: torch.Tensor, labels: torch.Tensor, per_row: int, path: Path) -> Path:
    """One row per class: the first `per_row` samples of each class, 2× nearest upscale."""
    rows = [images[labels == c][:per_row] for c in labels.unique()]
    picked = torch.cat(rows).float() / 255
    picked = torch.nn.functional.interpolate(picked, scale_factor=2, mode="nearest")
    save_image(picked, path, nrow=per_row, padding=2, pad_value=0.5)
    return path


def measure(out: Path, model_file: Path, ev: DemoEval, extractor: DigitExtractor, vae: LatentVAE,
            timer: Timer) -> dict:
    """Class-consistency and digit-FID of the trained and the step-0 model, floors, classifier accuracy."""
    cfg = run_config(out / "run")
    grid = sampling_settings(cfg, str(out / "run" / "config.yaml"))
    model, _ = load_model(model_file)
    refs = {s: digit_stats(extractor(real_images(s)[0])["pool"]) for s in EVAL_SPLITS}
    train_stats = digit_stats(extractor(real_images("train")[0])["pool"])
    with timer.stage("sample"):
        images, labels = sample_classes(model, vae, ev.per_class, grid, ev.seed)
    with timer.stage("measure"):
        result = {"settings": {"per_class": ev.per_class, "num_iter": grid.num_iter, "guidance": grid.guidance,
                               "temperature": grid.temperature, "seed": ev.seed},
                  "classifier_accuracy": {s: split_accuracy(extractor, s) for s in ("heldout", "test")},
                  "floor_fid": {s: digit_fid(train_stats, refs[s]) for s in EVAL_SPLITS}}
        result["model"] = {s: score_images(extractor, images, labels, refs[s]) for s in EVAL_SPLITS}
        step0_images, _ = sample_classes(step0_model(model, cfg), vae, ev.per_class, grid, ev.seed)
        result["step0"] = {s: score_images(extractor, step0_images, labels, refs[s]) for s in EVAL_SPLITS}
    grid_png(images, labels, ev.grid_per_class, out / "samples.png")
    return result


def quant_figure(out: Path) -> dict:
    """Figure 3 of the paper for the demo latents: scaled posterior samples of the train split."""
    cfg = run_config(out / "run")
    qcfg = from_dict(ModelConfig, cfg["model"], source="run config.yaml", prefix="model").quantizer
    latents = shard_latents(out / "latents")
    if qcfg.scheme == "empirical":
        qcfg = type(qcfg)(levels=qcfg.levels, qmin=qcfg.qmin, qmax=qcfg.qmax, scheme="gaussian")
    return report.quantization_png(latents, qcfg, out / "quantization.png")


def dependency_section(out: Path, gen: list[dict]) -> tuple[dict, str]:
    """How dependent this run's channels are (tb_train/demo/dependency.py) -> (figures for metrics.json,
    the report's markdown): mutual information between the quantized channels of the precomputed train
    tokens (identity and frequency order), and — when the ablations trained the default (AR) and the
    parallel-head arm — the per-channel CE gain of the AR head over the parallel head, seed by seed."""
    cfg = run_config(out / "run")
    q = from_dict(ModelConfig, cfg["model"], source="run config.yaml", prefix="model").quantizer
    q = QuantizerConfig(levels=q.levels, qmin=q.qmin, qmax=q.qmax)  # the gaussian table: no calibration needed
    order = json.loads((out / "latents" / "stats.json").read_text())["channel_order"]
    tokens = dep.latent_tokens(shard_latents(out / "latents"), q)
    summaries = [("identity order", dep.channel_dependency(tokens, q.levels)),
                 (f"frequency order {order}", dep.channel_dependency(tokens, q.levels, order))]
    figures: dict = {"tokens": {label: dataclasses.asdict(d) | {"explained_share": d.explained_share}
                                for label, d in summaries}}
    text = (f"Tokens of the precomputed train split (one posterior sample per image, every position), quantized "
            f"by the model's gaussian table (B={q.levels}, ±{q.qmax:g}). MI in bits per token; the last two "
            f"columns are a lower bound on what earlier channels tell about later ones in that generation "
            f"order, without the MAR context.\n\n" + markdown_table(*dep.dependency_table(summaries)))
    arms = {name: next((r for r in gen if name in r["name"]), None) for name in ("default", "parallel")}
    if all(arms.values()) and all(arms["default"]["runs"] + arms["parallel"]["runs"]):
        ar, par = ([dep.final_ce(report.read_scalars(Path(r) / "tensorboard")) for r in arms[n]["runs"]]
                   for n in ("default", "parallel"))
        gain = dep.ce_gain(ar, par)
        figures["ce_gain"] = gain | {"ar": ar, "parallel": par, "seeds": arms["default"]["seeds"]}
        rows = [[f"{k}", f"{sum(a[k] for a in ar) / len(ar):.4f}", f"{sum(p[k] for p in par) / len(par):.4f}",
                 f"{g:+.4f}"] for k, g in enumerate(gain["per_channel"])]
        text += (f"\n\nPer-channel cross-entropy at the end of training (nats; mean of the last "
                 f"{100 * dep.CE_TAIL:.0f}% of the logged steps, mean over seeds {arms['default']['seeds']}) of the "
                 f"AR head (default arm) and the parallel head (row (b)); gain = parallel − AR, what conditioning "
                 f"on the earlier channels bought given the same context:\n\n"
                 + markdown_table(["channel (generation order)", "AR head CE", "parallel head CE", "gain"], rows)
                 + f"\n\nTotal gain {gain['total']:+.4f} nats per token "
                 f"({100 * gain['relative']:+.2f}% of the parallel head's {sum(map(sum, par)) / len(par):.3f}); "
                 f"per seed: {', '.join(f'{g:+.4f}' for g in gain['per_seed_total'])}.")
    return figures, text


def _fmt(x: float) -> str:
    return f"{x:.3f}"


def demo_report(out: Path, m: dict, timer: Timer, quant: dict, curves: list[str], extra: list[tuple[str, str]],
                title: str, ranks: int) -> Path:
    """<out>/report.md from the measured dict `m` (see `measure`)."""
    s = m["settings"]
    rows = []
    for split in EVAL_SPLITS:
        trained, step0 = m["model"][split], m["step0"][split]
        rows.append([split, _fmt(trained["class_consistency"]), _fmt(trained["digit_fid"]),
                     _fmt(m["floor_fid"][split]), _fmt(step0["digit_fid"]), _fmt(step0["class_consistency"])])
    metrics = markdown_table(
        ["real split", "class-consistency", "digit-FID", "floor: real train vs split", "ceiling: step-0 model",
         "step-0 class-consistency"], rows)
    per_class = markdown_table(["class"] + [str(c) for c in range(10)],
                                      [["consistency"] + [f"{v:.2f}" for v in m["model"]["test"]["per_class"]]])
    acc = m["classifier_accuracy"]
    metrics += (f"\n\n{10 * s['per_class']} samples ({s['per_class']} per class), {s['num_iter']} generation steps, "
                f"guidance {s['guidance']}, temperature {s['temperature']}, seeds from {s['seed']}. The digit classifier "
                f"(`tb_train.demo.digits`, trained on the train split only) is right on {100 * acc['heldout']:.1f}% of "
                f"the real held-out digits and {100 * acc['test']:.1f}% of the real test digits. Recipes were "
                f"tuned on the held-out split; the test row is the one to quote. Class-consistency depends "
                f"on the samples only, so it is the same in both rows; the FIDs differ by reference.\n\n"
                f"Per-class consistency of the generated samples:\n\n"
                + per_class + "\n\n" + report.NOT_IMAGENET)
    times = markdown_table(["stage", "seconds"], [[k, f"{v:.1f}"] for k, v in timer.seconds.items()]
                                  + [["total", f"{sum(timer.seconds.values()):.1f}"]])
    machine = markdown_table(["", ""], [[k, v] for k, v in machine_info().items()]
                                    + [["training ranks", str(ranks)]])
    quant_text = (f"![quantization](quantization.png)\n\nDemo latents (train split, one posterior sample each) "
                  f"against the quantizer's bins: std of the normalized latents x_n = {quant['x_n_std']:.2f} "
                  f"(the Gaussian table assumes 1), bin entropy {quant['entropy_bits']:.2f} bits, "
                  f"{100 * quant['near_empty_bins']:.0f}% of the bins hold under a tenth of their equal share.")
    sections = [("Samples", "![samples](samples.png)\n\nOne row per class (0 at the top), first "
                 f"{min(8, s['per_class'])} samples of each class from the evaluation set."),
                ("Metrics", metrics),
                ("Training curves", "![curves](curves.png)\n\nRead back from the TensorBoard event files "
                 f"(`tensorboard --logdir {out / 'run'}`): " + ", ".join(curves) + "."
                 if curves else "No scalars were logged."),
                ("Quantization (the paper's Figure 3)", quant_text),
                *extra,
                ("Time per stage", times),
                ("Machine", machine)]
    return report.write_report(out / "report.md", title, sections)


def run_ablations(out: Path, extractor: DigitExtractor, vae: LatentVAE, timer: Timer, smoke: bool,
                  seeds: tuple[int, ...], rows: tuple[str, ...] = ABLATION_ROWS,
                  recipe: Recipe = DEFAULT_RECIPE) -> tuple[list[tuple[str, str]], list[dict]]:
    """The selected rows of (a)–(e) (tb_train/demo/ablations.py) -> (report sections, the generative rows
    with each arm's run folders, which the channel-dependency section reads)."""
    sections: list[tuple[str, str]] = []
    recon: list[ab.ReconRow] = []
    if {"a", "d"} & set(rows):
        with timer.stage("ablation (a)+(d) reconstruction"):
            test_images, _ = real_images("test")
            calibration = ab.encode_means(vae, real_images("train")[0])
            recon = ab.reconstruction_rows(vae, extractor, test_images, calibration)
        rh, rb = ab.recon_table(recon)
        sections.append(("Ablation (a)/(d): reconstruction through the quantizer",
                         f"{len(test_images)} real test digits through the demo VAE (posterior mean), quantized "
                         f"and decoded.\n\n" + markdown_table(rh, rb)))
    stats = json.loads((out / "latents" / "stats.json").read_text())
    variants = ab.select_variants(ab.generative_variants(stats["channel_order"]), rows)
    budget = ["run.max_steps=6", "checkpoint.every_steps=6"] if smoke else [f"optim.epochs={recipe.ablation_epochs}"]
    ev = DemoEval(per_class=5 if smoke else 20, seed=2000)
    test_stats = digit_stats(extractor(real_images("test")[0])["pool"])

    def train_and_score(v: "ab.Variant", seed: int) -> dict:
        run_out = out / "ablations" / f"{v.run_name}_seed{seed}"
        model_file = run_out / "model.safetensors"
        with timer.stage("ablation (b)-(e) training"):
            if not model_file.is_file():
                run_out.mkdir(parents=True, exist_ok=True)
                print(f"tb-demo ablation arm {v.run_name!r} seed {seed}", flush=True)
                train_subprocess(train_args(
                    out, [f"run.seed={seed}", f"data.seed={seed}", "metrics.image_every=0", *budget,
                          *v.train_overrides], run_dir=run_out / "run", periodic_eval=False, recipe=recipe))
                _check("tb-export", export.main([str(run_out / "run"), "--out", str(model_file)]))
        with timer.stage("ablation (b)-(e) sampling"):
            settings = sampling_settings(run_config(run_out / "run"), str(run_out / "run" / "config.yaml"))
            settings = dataclasses.replace(settings, **v.sample_options)
            model, _ = load_model(model_file)
            images, labels = sample_classes(model, vae, ev.per_class, settings, ev.seed + seed)
            return {**score_images(extractor, images, labels, test_stats), "run": str(run_out / "run")}

    gen = ab.generative_rows(variants, seeds, train_and_score)
    atomic_write_json(out / "ablations.json", {"reconstruction": [r.__dict__ for r in recon], "generative": gen})
    gh, gb = ab.generative_table(gen)
    scale = "6 steps" if smoke else f"{recipe.ablation_epochs} epochs"
    sections += [("Ablations (b)–(e): generation",
                  f"Each arm trained for {scale} per seed on the train split ({recipe.channels} latent channels), "
                  f"{10 * ev.per_class} samples scored against the test split; mean ± half the seed range.\n\n"
                  + markdown_table(gh, gb)),
                 ("Ablations: what reproduces", "\n".join(f"- {line}" for line in ab.verdicts(recon, gen)))]
    return sections, gen


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="tb-demo", description=__doc__.split("\n")[0])
    p.add_argument("--out", default="runs/demo", help="folder for images, latents, run, model, samples, report")
    p.add_argument("--smoke", action="store_true", help="a tiny budget (12 steps, 10 samples per class): tests")
    p.add_argument("--ranks", type=int, default=1, help="training processes (DeepSpeed ZeRO-2, same global batch)")
    p.add_argument("--ablations", action="store_true", help="also run the ablation rows (a)-(e) into the report")
    p.add_argument("--ablation-seeds", type=int, nargs="+", default=[0, 1], help="seeds of the generative rows")
    p.add_argument("--ablation-rows", nargs="+", choices=ABLATION_ROWS, default=list(ABLATION_ROWS),
                   help="which rows of (a)-(e) to run (the default arm is always trained)")
    p.add_argument("--ablation-epochs", type=int, default=None,
                   help="epochs per generative arm and seed (default: the recipe's, 20 for 4 channels, 10 for 16)")
    p.add_argument("--latent-channels", type=int, choices=sorted(RECIPES), default=DEFAULT_RECIPE.channels,
                   help="the demo VAE: 4 (demo_vae, configs/jobs/demo.yaml) or 16 (demo_vae16, demo16.yaml)")
    p.add_argument("overrides", nargs="*", help="dotted overrides for the training job, e.g. optim.epochs=40")
    args = p.parse_intermixed_args(sys.argv[1:] if argv is None else argv)  # options after overrides too

    def body() -> int:
        with RunLock(args.out, "tb-demo"):  # one demo per output folder (its stages lock their own folders)
            return run_demo(args)

    return run_main("tb-demo", body)


def run_demo(args: argparse.Namespace) -> int:
    """The five stages; -> 0 (a failing job raises StageFailed with its status)."""
    if args.ranks < 1:
        raise ConfigError(f"--ranks must be >= 1, got {args.ranks}")
    out = Path(args.out)
    recipe = RECIPES[args.latent_channels]
    if args.ablation_epochs is not None:
        if args.ablation_epochs < 1:
            raise ConfigError(f"--ablation-epochs must be >= 1, got {args.ablation_epochs}")
        recipe = dataclasses.replace(recipe, ablation_epochs=args.ablation_epochs)
    overrides = [*SMOKE_OVERRIDES, *args.overrides] if args.smoke else list(args.overrides)
    ev = DemoEval(per_class=10, grid_per_class=8) if args.smoke else DemoEval()
    extractor = load_digit_extractor()
    timer = Timer()
    print(f"tb-demo [1/5] precompute the train split of the embedded digits ({recipe.channels} latent channels)",
          flush=True)
    with timer.stage("precompute"):
        run_precompute(out, recipe)
    print(f"tb-demo [2/5] train the tiny model ({args.ranks} rank{'s' if args.ranks > 1 else ''})", flush=True)
    with timer.stage("train"):
        run_train(out, overrides, args.ranks, recipe)
    print("tb-demo [3/5] export the EMA weights", flush=True)
    model_file = out / "model.safetensors"
    with timer.stage("export"):
        _check("tb-export", export.main([str(out / "run"), "--out", str(model_file)]))
    print("tb-demo [4/5] sample every class and measure", flush=True)
    vae = load_vae(VAEConfig(path=str(recipe.vae)))
    m = measure(out, model_file, ev, extractor, vae, timer)
    extra: list[tuple[str, str]] = []
    gen: list[dict] = []
    if args.ablations:
        rows = tuple(sorted(set(args.ablation_rows)))
        print(f"tb-demo [4b/5] ablations ({', '.join(rows)})", flush=True)
        extra, gen = run_ablations(out, extractor, vae, timer, args.smoke, tuple(args.ablation_seeds), rows, recipe)
    if args.ablations or recipe.channels != DEFAULT_RECIPE.channels:
        with timer.stage("channel dependency"):
            m["channel_dependency"], text = dependency_section(out, gen)
        extra.append(("How dependent the channels are", text))
    for heading, body in extra:  # the measured tables on stdout too, as the report quotes them
        print(f"tb-demo: {heading}\n{body}\n", flush=True)
    print("tb-demo [5/5] write the report", flush=True)
    with timer.stage("report"):
        curves = report.curves_png(out / "run" / "tensorboard", out / "curves.png")
        quant = quant_figure(out)
        m["times"] = dict(timer.seconds)
        atomic_write_json(out / "metrics.json", m)
        path = demo_report(out, m, timer, quant, curves, extra, "tb-demo report" + (" (smoke)" if args.smoke else ""),
                           args.ranks)
    t = m["model"]["test"]
    print(f"tb-demo: done in {sum(timer.seconds.values()):.0f} s: class-consistency {t['class_consistency']:.3f}, "
          f"digit-FID {t['digit_fid']:.3f} (floor {m['floor_fid']['test']:.3f}, step-0 "
          f"{m['step0']['test']['digit_fid']:.3f}) on the test split; report {path}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
