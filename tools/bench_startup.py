"""Training start-up and requeue cost against the size of the data: bytes hashed per rank, launch to
first batch, and DataLoader worker memory, on synthetic latent sets of ImageNet's shape.

    python tools/bench_startup.py --out /tmp/tb_startup [--entries 1281167] [--shards 2503]
        [--small-entries 80000] [--big-entries 40000] [--steps 700] [--delete]

Three folders are written under `--out` (and reused when a complete one is there) by tb-precompute's own
shard writer and assembler (`_write_shard_files`, `_assemble`: tars, member indexes, sidecars, manifest,
stats): `tiny_<entries>` (ImageNet's 1,281,167 entries in 2,503 shards of 512, each sample a
16-channel 1x1 latent: ~2 KB of tar), `tiny_<small-entries>` (the same per-sample bytes, 16x fewer
entries) and `kl16_<big-entries>` (the real KL-16 payload, [2, 32, 16, 16] float16 = 32 KB, to show the
term that grows with bytes).

For each set, two ranks start as two processes in one gloo process group and do what tb-train's
`prepare` and first step do with the data: `LatentLoader` inside `agreed` (each rank hashes its share,
errors combined), then `next_step()` with 2 reader workers (micro-batch 64). "first start" uses a fresh
run folder, "restart" the same run folder again (its `data_verified.json` is there). After the restart's
first batch each rank trains on `--steps` more steps of data (no model), then reads the RSS and the
private memory (USS: what it does not share with the loader's forkserver it was forked from) of its 2
worker processes from /proc: a worker by then has read every shard (2,503 shards, ~22k random reads each at the default).
The previous reader's per-worker tar-header scan is measured beside it on the small set (`index_tar` over
every shard, entries kept as it kept them).

Every figure is measured with the data in the page cache (it was just written, or read by the first
start): hashing runs at sha256 speed, not disk speed. One thread per rank (2 ranks = the 2 cores).
"""
from __future__ import annotations

import argparse
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

PER_SHARD = 512            # 1,281,167 / 512 -> 2,503 shards, ImageNet's count at the default size
MICRO_BATCH, WORKERS = 64, 2


def _mib(nbytes: float) -> str:
    return f"{nbytes / 2**20:,.1f} MiB"


def _folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file())


# ----------------------------------------------------------------------------- writing the sets

def build_set(folder: Path, entries: int, channels: int, hw: int) -> None:
    """A complete precomputed folder of `entries` synthetic samples written by precompute's own writer,
    unless `folder` already holds one of that size."""
    from tb_train.data.images import ImageList
    from tb_train.data.precompute import _assemble, _ShardAccumulator, _write_shard_files
    from tb_train.data.shards import MANIFEST, FORMAT, sample_key

    manifest = folder / MANIFEST
    if manifest.is_file() and json.loads(manifest.read_text())["num_samples"] == entries:
        print(f"reusing {folder}", flush=True)
        return
    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    started = time.time()
    # no input is rejected, so the writer never looks up an input name
    images = ImageList(root=f"synthetic:{entries}", names=[], classes=[f"c{k}" for k in range(1000)])
    num_shards = math.ceil(entries / PER_SHARD)
    base = np.random.default_rng(0).standard_normal((2, 2 * channels, hw, hw)).astype(np.float16)
    for s in range(num_shards):
        keys = range(s * PER_SHARD, min(entries, (s + 1) * PER_SHARD))
        acc = _ShardAccumulator(s, len(keys), seen=len(keys))
        acc.keys = [sample_key(i) for i in keys]
        acc.moments = [base + np.float16(i % 997 / 997) for i in keys]
        acc.labels = [i % 1000 for i in keys]
        means = np.stack(acc.moments)[:, :, :channels].astype(np.float64)
        acc.sums = np.stack([means.sum(axis=(0, 1, 3, 4)), (means ** 2).sum(axis=(0, 1, 3, 4))])
        acc.elements = means.size // channels
        _write_shard_files(folder, acc, images, store_indices=False)
        if s % 250 == 0:
            print(f"  {folder.name}: shard {s}/{num_shards} ({time.time() - started:.0f} s)", flush=True)
    ident = {"format": FORMAT, "samples_per_shard": PER_SHARD, "resolution": hw * 16, "quantizer": None,
             "vae": {"identity": "synthetic", "scale": 0.2325, "latent_channels": channels, "downsample": 16}}
    _assemble(folder, ident, images, num_shards, order_samples=256, started=started)
    print(f"wrote {folder}: {entries:,} entries, {num_shards:,} shards, {_mib(_folder_bytes(folder))} "
          f"in {time.time() - started:.0f} s", flush=True)


# ----------------------------------------------------------------------------- one rank of a start

def _uss_and_rss(pid: int) -> tuple[int, int]:
    """(private bytes, resident bytes) of a process, from /proc."""
    private = 0
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        if line.startswith(("Private_Clean:", "Private_Dirty:")):
            private += int(line.split()[1]) * 1024
    rss = next(int(line.split()[1]) * 1024 for line in Path(f"/proc/{pid}/status").read_text().splitlines()
               if line.startswith("VmRSS:"))
    return private, rss


def rank_main(args: dict) -> None:
    """One rank: process group, the loader as `prepare` makes it, first batch, then (restart) the data of
    `steps` more steps and the workers' memory. Writes its figures as JSON."""
    import torch
    import torch.distributed as tdist

    from tb_train.data.loader import DataConfig, LatentLoader
    from tb_train.dist import DistInfo, agreed

    torch.set_num_threads(1)
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    tdist.init_process_group("gloo", rank=rank, world_size=world)
    dist = DistInfo.for_rank(rank, world, "cpu")
    ready = time.time()
    cfg = DataConfig(path=args["data"], micro_batch=MICRO_BATCH, num_workers=WORKERS)
    loader = agreed(dist, lambda: LatentLoader(cfg, rank, world, 1, run_dir=args["run"]))
    opened = time.time()
    loader.next_step()
    first = time.time()
    out = {"rank": rank, "launch_to_first_batch_s": first - args["launched"],
           "process_start_s": ready - args["launched"], "open_and_verify_s": opened - ready,
           "first_batch_s": first - opened, "hashed_bytes": loader.verified_bytes}
    if args["steps"]:
        for _ in range(args["steps"]):
            loader.next_step()
        workers = [int(p) for t in Path(f"/proc/{os.getpid()}/task").iterdir()
                   for p in (t / "children").read_text().split()]
        out["workers"] = [_uss_and_rss(pid) for pid in workers]
        out["reads_per_worker"] = (args["steps"] + 1) * MICRO_BATCH // WORKERS
        out["rank_rss"] = _uss_and_rss(os.getpid())[1]
    loader.close()
    tdist.barrier()
    tdist.destroy_process_group()
    Path(args["result"]).write_text(json.dumps(out))


def start(data: Path, run: Path, steps: int, scratch: Path) -> list[dict]:
    """Launch 2 ranks (one thread each) and wait -> each rank's figures."""
    from tb_train.dist import free_port

    port = free_port()
    procs, results = [], []
    launched = time.time()
    for rank in range(2):
        result = scratch / f"rank{rank}.json"
        result.unlink(missing_ok=True)
        results.append(result)
        env = {**os.environ, "RANK": str(rank), "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1",
               "MASTER_PORT": str(port), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
        args = {"data": str(data), "run": str(run), "steps": steps, "launched": launched, "result": str(result)}
        procs.append(subprocess.Popen([sys.executable, __file__, "--rank-worker", json.dumps(args)], env=env))
    codes = [p.wait(timeout=1800) for p in procs]
    if codes != [0, 0]:
        raise SystemExit(f"rank processes exited with {codes}")
    return [json.loads(r.read_text()) for r in results]


# ----------------------------------------------------------------------------- the previous reader

def old_scan_main(args: dict) -> None:
    """What every worker of the previous reader did over an epoch: scan every shard's tar headers once
    and keep the entries. Writes CPU seconds and the growth of private memory as JSON."""
    from tb_train.data.shards import LatentShards, index_tar

    shards = LatentShards(args["data"], verify=False)
    before = _uss_and_rss(os.getpid())[0]
    cpu0 = time.process_time()
    kept = {s: index_tar(shards.folder / entry["name"]) for s, entry in enumerate(shards.shards)}
    out = {"cpu_s": time.process_time() - cpu0, "private_growth": _uss_and_rss(os.getpid())[0] - before,
           "entries": sum(map(len, kept.values()))}
    Path(args["result"]).write_text(json.dumps(out))


def old_scan(data: Path, scratch: Path) -> dict:
    result = scratch / "old_scan.json"
    job = json.dumps({"data": str(data), "result": str(result)})
    subprocess.run([sys.executable, __file__, "--old-scan", job], check=True,
                   env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)})
    return json.loads(result.read_text())


# ----------------------------------------------------------------------------- the table

def measure(data: Path, scratch: Path, steps: int) -> tuple[list[tuple[str, str, str]], int]:
    """First start and restart of one run on `data` -> (table rows (set, figure, value), the largest
    worker RSS after the restart's reads)."""
    manifest = json.loads((data / "manifest.json").read_text())
    name = f"{manifest['num_samples']:,} entries, {len(manifest['shards']):,} shards, {_mib(_folder_bytes(data))}"
    hashable = sum(s["size"] + s["index_size"] for s in manifest["shards"])  # tars + indexes
    run = scratch / f"run_{data.name}"
    shutil.rmtree(run, ignore_errors=True)
    rows, worker_rss = [], 0
    for label, n_steps in (("first start", 0), ("restart", steps)):
        ranks = start(data, run, n_steps, scratch)
        hashed = [r["hashed_bytes"] for r in ranks]
        rows.append((name, f"{label}: bytes hashed, rank 0 / rank 1",
                     f"{_mib(hashed[0])} / {_mib(hashed[1])} "
                     f"({sum(hashed) / hashable:.1%} of tars + indexes in all)"))
        rows.append((name, f"{label}: launch → first batch, rank 0 / rank 1",
                     " / ".join(f"{r['launch_to_first_batch_s']:.2f} s" for r in ranks)
                     + f" (process start: imports + gloo group {max(r['process_start_s'] for r in ranks):.2f} s; "
                       f"open + verify {max(r['open_and_verify_s'] for r in ranks):.2f} s; "
                       f"first batch {max(r['first_batch_s'] for r in ranks):.2f} s)"))
        if n_steps:
            workers = [w for r in ranks for w in r["workers"]]
            rows.append((name, f"worker memory after {ranks[0]['reads_per_worker']:,} random reads each "
                               f"({len(workers)} workers): RSS / private (max)",
                         f"{_mib(max(w[1] for w in workers))} / {_mib(max(w[0] for w in workers))}"))
            worker_rss = max(w[1] for w in workers)
    return rows, worker_rss


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, help="folder for the synthetic sets (reused); required")
    parser.add_argument("--entries", type=int, default=1_281_167)
    parser.add_argument("--small-entries", type=int, default=80_000)
    parser.add_argument("--big-entries", type=int, default=40_000)
    parser.add_argument("--steps", type=int, default=700,
                        help="steps of data read after the restart's first batch")
    parser.add_argument("--delete", action="store_true", help="remove the sets at the end")
    parser.add_argument("--rank-worker", help=argparse.SUPPRESS)
    parser.add_argument("--old-scan", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rank_worker:
        return rank_main(json.loads(args.rank_worker))
    if args.old_scan:
        return old_scan_main(json.loads(args.old_scan))
    if args.out is None:
        parser.error("--out is required")

    sets = [(args.out / f"tiny_{args.entries}", args.entries, 16, 1),
            (args.out / f"tiny_{args.small_entries}", args.small_entries, 16, 1),
            (args.out / f"kl16_{args.big_entries}", args.big_entries, 16, 16)]
    need = sum(n * (2048 if hw == 1 else 35 * 1024) for _, n, _, hw in sets)
    args.out.mkdir(parents=True, exist_ok=True)
    free = shutil.disk_usage(args.out).free
    if free < need + 2**30 and not all((f / "manifest.json").is_file() for f, *_ in sets):
        raise SystemExit(f"{args.out}: {free / 2**30:.1f} GiB free, the sets need ~{need / 2**30:.1f} GiB")
    load_start = os.getloadavg()
    for folder, n, c, hw in sets:
        build_set(folder, n, c, hw)
    scratch = args.out / "scratch"
    scratch.mkdir(exist_ok=True)
    load_measure = os.getloadavg()
    rows, worker_rss = [], []
    for folder, *_ in sets:
        set_rows, rss = measure(folder, scratch, args.steps)
        rows += set_rows
        worker_rss.append(rss)
    rows.append((f"{args.entries:,} vs {args.small_entries:,} entries", "worker RSS ratio (max over workers)",
                 f"{worker_rss[0] / worker_rss[1]:.3f}"))
    scan = old_scan(sets[1][0], scratch)
    rows.append((f"{args.small_entries:,} entries", "previous reader: tar-header scan of every shard, per worker",
                 f"{scan['cpu_s']:.1f} s CPU, +{_mib(scan['private_growth'])} private "
                 f"({scan['entries']:,} entries kept)"))
    load_end = os.getloadavg()

    import torch
    print(f"\nCPU: {platform.processor() or platform.machine()}, {os.cpu_count()} cores, one thread per rank; "
          f"python {platform.python_version()}, torch {torch.__version__}; load average (1 min) "
          f"{load_start[0]:.2f} at the start, {load_measure[0]:.2f} when measuring began, "
          f"{load_end[0]:.2f} at the end; {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}\n")
    print("| set | figure | value |\n|---|---|---|")
    for row in rows:
        print("| " + " | ".join(row) + " |")
    shutil.rmtree(scratch, ignore_errors=True)
    if args.delete:
        for folder, *_ in sets:
            shutil.rmtree(folder, ignore_errors=True)


if __name__ == "__main__":
    main()
