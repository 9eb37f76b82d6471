"""Checkpoints: DeepSpeed's own files + the registered stateful parts + an atomic `latest`.

A checkpoint is the set of the training job's stateful parts, each with `state_dict()` /
`load_state_dict(sd)` (torchtitan's `CheckpointManager(states=...)`, lingua's `TrainState`):
- the model and optimizer: DeepSpeed's files (ZeRO partitions), written and read by DeepSpeed;
- global parts (the same on every rank: train counters, data cursor, metrics position, hooks' state),
  written once by rank 0 into `train_state.json` under their names — their state must be JSON-able;
- per-rank parts (the EMA slices, the process RNG), written by every rank into its own
  `train_state_rankNNNNN.pt` under their names. A per-rank part with `load_state_dicts(list)` (the EMA)
  is reshardable: when the ZeRO layout changed it receives every saved rank's state, otherwise its own.

Layout of a checkpoint folder (default `<run_dir>/checkpoints`):

    latest                               the tag of the newest COMPLETE checkpoint (atomic rename)
    step_00001000/                       DeepSpeed's files (module, ZeRO partitions, optimizer state)
        train_state_rank00000.pt         per-rank parts (each rank)
        train_state.json                 step, world, ZeRO stage, precision, global parts, and the size
                                         of every other file of the folder (rank 0, last)
    step_00001000_universal/             made on demand when resuming at another world size or stage

Every rank calls `CheckpointManager.save` (DeepSpeed needs all ranks); rank 0 lists the files and moves
`latest` only after every rank's writes, so a kill at any moment leaves `latest` on a complete checkpoint.

Checksums. Each rank computes the CRC-32 of the files IT wrote (the DeepSpeed files its
`checkpoint_engine.save` calls produced — under ZeRO its `zero_pp_rank_R_mp_rank_00_optim_states.pt`
(and at stage 3 its `zero_pp_rank_R_..._model_states.pt`), on rank 0 also `mp_rank_00_model_states.pt` —
and its `train_state_rankNNNNN.pt`), reading them back once written. The digests travel to rank 0 with
`all_gather_object` (one small collective; per-rank sidecar files would be more files to list, verify
and prune) and are recorded in `train_state.json` under `checksums` ({file: {crc32, rank}}), next to the
sizes, before `latest` moves. Before resuming, every file's size is checked by every rank (a stat each),
and each rank hashes the files its own rank number wrote (rank r's files by rank r % world when the world
changed), so the ranks verify in parallel and nobody reads another rank's multi-GB shard; the shared
model-states file is rank 0's and is hashed once, by rank 0. The verdicts are gathered, so every rank
picks the same checkpoint. A missing, truncated or changed file (or no train_state.json) is reported in
one line naming it and the newest complete earlier checkpoint is used; only when none is usable does the
job stop (`CheckpointError`). A checkpoint written before checksums existed is checked by sizes only,
with a one-line warning.

Why CRC-32 (zlib.crc32) and not blake2b: measured on the 2-core project machine on a 1 GB file, crc32
hashes 2.7 GB/s from the page cache (3.3-3.6 GB/s in memory), blake2b 0.8 GB/s; from disk (cache dropped)
0.9-1.2 vs 0.26-0.32 GB/s. The threat is accidental damage (a flipped bit, a torn or overwritten
block), which a CRC-32 detects with certainty for bursts up to 32 bits and otherwise misses with
probability 2^-32; a cryptographic hash would only add resistance to deliberate forgery, at 3-4x the
time on every save and every resume. Figures per model size: docs/training.md.

A save that fails to write (ENOSPC, EIO, any OSError, on any rank) does not move `latest`: every rank's
writes are wrapped (DeepSpeed's included, so no rank leaves DeepSpeed's collectives early), the ranks
agree, rank 0 deletes the partial folder and the job stops with one line naming the folder and the
errno (exit 2). It stops rather than retries: a full disk does not free itself within a step, and a job
that trains on without checkpoints only risks more lost work; the previous checkpoint is intact.

Resuming at the same world size and ZeRO stage loads the DeepSpeed checkpoint directly. Otherwise rank 0
converts it once into a DeepSpeed universal checkpoint (`ds_to_universal --inject_missing_state`), all
ranks wait, and DeepSpeed loads that (`checkpoint.load_universal`); the EMA pieces and the data cursor
are world-size independent by construction (see ema.py, data.py). The activation-checkpointing policy
may change across any resume (parameter names differ only by the wrapper, see `canonical_name`).
"""
from __future__ import annotations

import errno
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator, Protocol

import torch
import torch.distributed as tdist

from tb_core.errors import CheckpointError, ConfigError, TBError
from tb_core.fileio import atomic_write_json, atomic_write_stream, atomic_write_text, crc32_file
from tb_train.engine.activation_ckpt import canonical_name
from tb_train.engine.engine import weight_dtype
from tb_train.dist import DistInfo, agree, barrier

CHECKPOINTS = "checkpoints"             # <run dir>/checkpoints unless checkpoint.dir says otherwise
LATEST = "latest"
STATE_JSON = "train_state.json"
TAG_RE = re.compile(r"^step_(\d{8})$")
RANK_FILE_GLOB = "train_state_rank*.pt"
DS_MODEL_STATES = "mp_rank_00_model_states.pt"  # DeepSpeed's module state (stage 0 holds the weights here)
EMA_PART = "ema"                        # the EMA's name among each rank's stateful parts
UNIVERSAL_SUFFIX = "_universal"
CHECKSUMS = "checksums"                 # train_state.json: {file: {"crc32": 8 hex digits, "rank": writer}}
VERIFY_THREADS = 4                      # files one process hashes at once (zlib releases the GIL)
# Errors that reading a damaged file raises (torch.load, DeepSpeed's loader, the conversion script).
LOAD_ERRORS = (OSError, EOFError, RuntimeError, ValueError, KeyError, AssertionError, pickle.UnpicklingError)


class Stateful(Protocol):
    def state_dict(self) -> Any: ...

    def load_state_dict(self, sd: Any) -> None: ...


@dataclass
class CheckpointConfig:
    every_steps: int = 1000       # save every N optimizer steps (0: only at the end and on preemption)
    keep_last: int = 3            # complete checkpoints kept (older ones are deleted)
    dir: str | None = None        # default <run_dir>/checkpoints
    resume: bool = True           # continue from <dir>/latest when it exists

    def __post_init__(self) -> None:
        if self.every_steps < 0 or self.keep_last < 1:
            raise ValueError("every_steps must be >= 0 and keep_last >= 1")


def tag_for(step: int) -> str:
    return f"step_{step:08d}"


def rank_file(tag_dir: Path, rank: int) -> Path:
    return tag_dir / RANK_FILE_GLOB.replace("*", f"{rank:05d}")


def locate(path: str | os.PathLike) -> tuple[Path, str, Path]:
    """A run folder, a checkpoint folder (with `latest`) or one tag folder → (checkpoint folder, tag, run
    folder holding config.yaml)."""
    p = Path(path)
    if (p / CHECKPOINTS / LATEST).is_file():
        return p / CHECKPOINTS, read_latest(p / CHECKPOINTS), p
    if (p / LATEST).is_file():
        return p, read_latest(p), p.parent
    if (p / STATE_JSON).is_file():
        return p.parent, p.name, p.parent.parent
    raise CheckpointError(f"{p}: no checkpoint found (expected a run folder, a checkpoint folder with "
                          f"'{LATEST}', or a step_* folder)")


def read_latest(ckpt_dir: str | os.PathLike) -> str | None:
    """Tag named by `latest`, or None when the folder holds no complete checkpoint yet."""
    path = Path(ckpt_dir) / LATEST
    return path.read_text().strip() if path.is_file() else None


def read_train_state(ckpt_dir: str | os.PathLike, tag: str) -> dict:
    """train_state.json of one checkpoint (step, world, zero_stage, precision, states, files)."""
    path = Path(ckpt_dir) / tag / STATE_JSON
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is missing (checkpoint incomplete or damaged)") from None
    except (OSError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path} is unreadable ({e})") from None


def list_tags(ckpt_dir: Path) -> list[str]:
    """step_* folders of a checkpoint folder, oldest first."""
    if not ckpt_dir.is_dir():
        return []
    return sorted(p.name for p in ckpt_dir.iterdir() if p.is_dir() and TAG_RE.match(p.name))


def file_sizes(tag_dir: Path) -> dict[str, int]:
    """{path relative to tag_dir: bytes} of every file in a checkpoint folder except train_state.json."""
    return {str(p.relative_to(tag_dir)): p.stat().st_size for p in sorted(tag_dir.rglob("*"))
            if p.is_file() and p.name != STATE_JSON and not p.name.startswith(".")}


def find_damage(tag_dir: Path, share: tuple[int, int] = (0, 1)) -> str | None:
    """What is wrong with a checkpoint folder, naming the file (None: nothing found).

    Every recorded file must be there with its recorded size (all files: a stat each). Then the files of
    this process's share are hashed and compared with their recorded CRC-32: share = (index, count) takes
    the files written by ranks r with r % count == index, so the ranks of a job each verify their own
    files in parallel (`plan_resume` gathers the verdicts) and (0, 1), the default, verifies them all. A
    checkpoint written before checksums existed has sizes only (see `checksum_note`).
    """
    try:
        meta = read_train_state(tag_dir.parent, tag_dir.name)
    except CheckpointError as e:
        return str(e)
    if not isinstance(meta.get("files"), dict):
        return f"{tag_dir / STATE_JSON} lists no files (written by an older version)"
    for rel, size in meta["files"].items():
        path = tag_dir / rel
        if not path.is_file():
            return f"{path} is missing"
        actual = path.stat().st_size
        if actual != size:
            return f"{path} has {actual} bytes, {size} were written (truncated or overwritten)"
    index, count = share
    mine = sorted(rel for rel, rec in meta.get(CHECKSUMS, {}).items() if rec["rank"] % count == index)
    if not mine:
        return None
    with ThreadPoolExecutor(max_workers=min(VERIFY_THREADS, len(mine))) as pool:
        found = pool.map(lambda rel: _checksum_problem(tag_dir / rel, meta[CHECKSUMS][rel]["crc32"]), mine)
        return next((p for p in found if p is not None), None)


def _checksum_problem(path: Path, recorded: str) -> str | None:
    try:
        now = crc32_file(path)
    except OSError as e:
        return f"{path} is unreadable ({_describe(e)})"
    if now != recorded:
        return f"{path}: checksum mismatch (crc32 recorded {recorded}, now {now}): damaged after it was written"
    return None


def checksum_note(tag_dir: Path, meta: dict) -> str | None:
    """The one-line warning for a checkpoint whose train_state.json records no checksums (written by an
    older version: only its file sizes could be checked); None when it has them."""
    if CHECKSUMS in meta:
        return None
    return (f"checkpoint {tag_dir} records no checksums (written by an older version): only file sizes were "
            f"checked, changed bytes would go unnoticed")


def _process_share() -> tuple[int, int]:
    """(this process's index, number of processes) among those verifying a checkpoint together: the
    default process group when one is initialised (a job's ranks), else this process alone."""
    if tdist.is_available() and tdist.is_initialized():
        return tdist.get_rank(), tdist.get_world_size()
    return 0, 1


def _gather(obj: Any) -> list[Any]:
    """`obj` of every process of the default group, by rank (just [obj] without a group)."""
    _, count = _process_share()
    if count == 1:
        return [obj]
    out: list[Any] = [None] * count
    tdist.all_gather_object(out, obj)
    return out


def agreed_damage(tag_dir: Path) -> str | None:
    """Collective when a process group is initialised: each rank verifies its share of the folder
    (`find_damage`), all verdicts are gathered and every rank returns the same one (the lowest rank's)."""
    problems = _gather(find_damage(tag_dir, _process_share()))
    return next((p for p in problems if p is not None), None)


def prune(ckpt_dir: Path, keep_last: int) -> None:
    """Keep the newest `keep_last` tags up to the one `latest` names; delete older ones and any newer
    (incomplete or damaged) ones, with their universal copies."""
    latest = read_latest(ckpt_dir)
    tags = list_tags(ckpt_dir)
    kept = [t for t in tags if latest is None or t <= latest][-keep_last:]
    for tag in tags:
        if tag not in kept:
            shutil.rmtree(ckpt_dir / tag, ignore_errors=True)
            shutil.rmtree(ckpt_dir / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)


@dataclass
class ResumePlan:
    ckpt_dir: Path
    tag: str
    meta: dict           # train_state.json of that checkpoint
    universal: bool      # load through a universal checkpoint (other world size or ZeRO stage)


def _warn(msg: str) -> None:
    print(f"tb-train: warning: {msg}", file=sys.stderr, flush=True)


def plan_resume(ckpt_dir: str | os.PathLike, world: int, stage: int, precision: str,
                warn: Callable[[str], None] | None = _warn) -> ResumePlan | None:
    """Pick the checkpoint to resume from and how (None: nothing to resume). Must run before the engine is
    built, because DeepSpeed reads `checkpoint.load_universal` at initialisation. Collective when a process
    group is initialised: the ranks verify the files in parallel and agree (`agreed_damage`), so every
    rank must reach it — call it on its own inside `agreed(...)`, not after per-rank checks that may raise
    on one rank only (that rank would be in `agree` while the others wait here).

    The candidate is the tag `latest` names; if it is damaged, one line naming the file goes to `warn` and
    the next older tag is tried. Without `latest`, only tags whose train_state.json exists (written after
    every rank's files) are candidates, so a run killed during its first save starts over. Raises
    CheckpointError when checkpoints exist but none is usable.
    warn: None on ranks that should not print.
    """
    ckpt_dir = Path(ckpt_dir)
    latest = read_latest(ckpt_dir)
    tags = list_tags(ckpt_dir)
    if latest is not None:
        candidates = [t for t in tags if t <= latest]
        if latest not in tags and warn:
            warn(f"{ckpt_dir / LATEST} names {latest}, which does not exist")
    else:
        candidates = [t for t in tags if (ckpt_dir / t / STATE_JSON).is_file()]
    problems = []
    for tag in reversed(candidates):
        problem = agreed_damage(ckpt_dir / tag)
        if problem is None:
            meta = read_train_state(ckpt_dir, tag)
            note = checksum_note(ckpt_dir / tag, meta)
            if note and warn:
                warn(note)
            if problems and warn:
                warn(f"resuming from the earlier checkpoint {ckpt_dir / tag} instead")
            return ResumePlan(ckpt_dir, tag, meta, universal=_needs_universal(meta, world, stage, precision,
                                                                             ckpt_dir / tag))
        if warn:
            warn(f"checkpoint {ckpt_dir / tag} is unusable: {problem}")
        problems.append(problem)
    if problems or (latest is not None and latest not in tags):
        first = problems[0] if problems else f"{latest} does not exist"
        raise CheckpointError(f"{ckpt_dir}: no usable checkpoint ({first}); move it away or set "
                              f"checkpoint.resume=false to start over")
    return None


def _needs_universal(meta: dict, world: int, stage: int, precision: str, where: Path) -> bool:
    fp32_weights = weight_dtype(precision) == torch.float32        # fp32 and amp_bf16 share one layout
    same = (meta["world"] == world and meta["zero_stage"] == stage
            and weight_dtype(meta["precision"]) == weight_dtype(precision))
    replicated = meta["zero_stage"] == 0 and weight_dtype(meta["precision"]) == torch.float32
    if replicated and stage == 0 and fp32_weights:
        return False  # full model+optimizer in rank 0's file, loadable at any world size
    if not same and replicated:
        raise ConfigError(f"{where}: a ZeRO stage 0 fp32/amp_bf16 checkpoint can only be resumed by stage 0 "
                          f"fp32/amp_bf16 (this run: stage {stage} {precision})")
    return not same


def make_universal(plan: ResumePlan, is_main: bool, param_names: list[str]) -> str:
    """Collective: rank 0 converts the checkpoint into `<tag>_universal` (once) and names its per-parameter
    folders as the current model does (`param_names`: the engine module's `named_parameters()` names,
    which differ from the saved ones when the activation-checkpointing policy changed); everyone waits."""
    out = plan.ckpt_dir / (plan.tag + UNIVERSAL_SUFFIX)
    if is_main:
        if not out.is_dir():
            tmp = plan.ckpt_dir / f".{out.name}.tmp"
            shutil.rmtree(tmp, ignore_errors=True)
            cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--inject_missing_state",
                   "--input_folder", str(plan.ckpt_dir / plan.tag), "--output_folder", str(tmp)]
            proc = subprocess.run(cmd, capture_output=True, text=True)
            if proc.returncode != 0:
                tail = " ".join(proc.stderr.strip().splitlines()[-1:])
                raise CheckpointError(f"universal conversion of {plan.ckpt_dir / plan.tag} failed: {tail}")
            os.replace(tmp, out)
        current = {canonical_name(n): n for n in param_names}
        for folder in sorted((out / "zero").iterdir()):
            want = current.get(canonical_name(folder.name))
            if folder.is_dir() and want is not None and want != folder.name:
                os.replace(folder, folder.with_name(want))
    barrier()
    return out.name


def _load_file(path: Path) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except LOAD_ERRORS as e:
        raise CheckpointError(f"{path} is unreadable ({type(e).__name__}: {_first_line(e)})") from None


def _first_line(e: BaseException) -> str:
    return (str(e).strip().splitlines() or [""])[0][:200]


def _describe(e: OSError) -> str:
    """The errno by number, text and name, e.g. `[Errno 28] No space left on device (ENOSPC)`."""
    if e.errno is None:
        return _first_line(e)
    return f"[Errno {e.errno}] {e.strerror or os.strerror(e.errno)} ({errno.errorcode.get(e.errno, '?')})"


class RankWrites:
    """The files one rank writes into one checkpoint, and the first write that failed.

    Every write of a save goes through `write`, which turns an OSError (a full disk, an I/O error) into
    a recorded `CheckpointError` instead of an exception: a rank whose write raised would leave the
    collectives of the save (DeepSpeed's barriers, then ours) while the other ranks wait in them. After
    the first failure the rank's remaining writes are skipped; the ranks then agree (`agree`).
    """

    def __init__(self, ckpt_dir: Path, tag: str, rank: int):
        self.ckpt_dir, self.tag, self.rank = ckpt_dir, tag, rank
        self.files: list[Path] = []          # written and to be checksummed
        self.error: CheckpointError | None = None

    def write(self, path: Path, write: Callable[[Path], object], checksummed: bool = True) -> None:
        """`write(path)` unless an earlier write failed; an OSError is recorded, not raised."""
        if self.error is not None:
            return
        try:
            write(path)
        except OSError as e:
            self.fail(path, e)
            return
        if checksummed:
            self.files.append(path)

    def fail(self, path: Path, e: OSError) -> None:
        """Record the first failure as the job's one-line error (folder, file, errno, what is kept)."""
        if self.error is not None:
            return
        previous = read_latest(self.ckpt_dir)
        kept = f"{LATEST} still names {previous}" if previous else f"there is no {LATEST}"
        self.error = CheckpointError(
            f"{self.ckpt_dir / self.tag}: checkpoint not saved: writing {path.name} failed ({_describe(e)}); "
            f"the partial folder is removed and the earlier checkpoints kept ({kept}); free space (or repair "
            f"the file system) and rerun to resume")

    def checksums(self) -> dict[str, dict]:
        """{file relative to the tag folder: {"crc32", "rank"}} of the files written (read back); nothing
        after a failed write (the checkpoint will not be kept)."""
        if self.error is not None:
            return {}
        out = {}
        for path in self.files:
            try:
                out[str(path.relative_to(self.ckpt_dir / self.tag))] = {"crc32": crc32_file(path),
                                                                          "rank": self.rank}
            except OSError as e:
                self.fail(path, e)
        return out

    @contextmanager
    def through(self, ds: Any) -> Iterator[None]:
        """Route DeepSpeed's file writes during `ds.save_checkpoint` through `write`: its checkpoint
        engine's `makedirs` and `save` (every model/optimizer file) and `_copy_recovery_script` (rank 0's
        zero_to_fp32.py copy) — DeepSpeed 0.19.8's only writes there. Any of them raising on one rank would
        skip DeepSpeed's closing barrier on that rank alone. The model/optimizer files are written like the
        rank files, atomically through `atomic_write_stream` (a full disk is an OSError with its errno, not
        torch's errno-less RuntimeError); this hands the checkpoint engine a file object, which DeepSpeed's
        default torch engine (the only one these configs select) passes on to torch.save."""
        engine = ds.checkpoint_engine
        save, makedirs, copy = engine.save, engine.makedirs, ds._copy_recovery_script

        def ds_save(state_dict: dict, path: str) -> None:
            self.write(Path(path), lambda p: atomic_write_stream(p, lambda f: save(state_dict, f)))

        def ds_makedirs(path: str, exist_ok: bool = False) -> None:
            self.write(Path(path), lambda p: makedirs(str(p), exist_ok=exist_ok), checksummed=False)

        def ds_copy(folder: str) -> None:  # named by its first file in a message
            self.write(Path(folder) / "zero_to_fp32.py", lambda p: copy(str(p.parent)), checksummed=False)

        with (_overriding(engine, "save", ds_save), _overriding(engine, "makedirs", ds_makedirs),
              _overriding(ds, "_copy_recovery_script", ds_copy)):
            yield


@contextmanager
def _overriding(obj: Any, name: str, replacement: Callable[..., Any]) -> Iterator[None]:
    """`obj.name` is `replacement` (an instance attribute shadowing the class's method) inside the block."""
    setattr(obj, name, replacement)
    try:
        yield
    finally:
        delattr(obj, name)


class CheckpointManager:
    """Saves and restores a training job: the DeepSpeed engine plus the registered stateful parts.

    engine: a tb_train.engine.engine.TrainEngine. states: global parts by name (JSON-able state, rank 0 writes
    it). rank_states: per-rank parts by name. Register every part before `load`.
    """

    def __init__(self, ckpt_dir: str | os.PathLike, keep_last: int, engine, states: dict[str, Stateful] | None = None,
                 rank_states: dict[str, Stateful] | None = None):
        self.dir, self.keep_last, self.engine = Path(ckpt_dir), keep_last, engine
        self.states: dict[str, Stateful] = dict(states or {})
        self.rank_states: dict[str, Stateful] = dict(rank_states or {})

    def register(self, name: str, part: Stateful, per_rank: bool = False) -> None:
        table = self.rank_states if per_rank else self.states
        if name in self.states or name in self.rank_states:
            raise ValueError(f"a stateful part named {name!r} is already registered")
        table[name] = part

    def _meta(self, step: int) -> dict:
        eng = self.engine
        return {"tag": tag_for(step), "step": step, "world": eng.dist.world, "zero_stage": eng.stage,
                "precision": eng.cfg.precision}

    def save(self, step: int) -> str:
        """Collective: DeepSpeed's files and every rank's parts, each rank's checksums of its files, then
        rank 0's global parts, file list and checksums, then `latest`, then pruning. A folder of the same
        step (left by an incomplete save, or the damaged checkpoint this run fell back from) is deleted
        first; if `latest` names it, `latest` is removed before, so that it never names a folder being
        written (resuming then takes the newest verified folder). A failed write on any rank: the partial
        folder is removed, `latest` stays, and every rank raises (rank 0 the CheckpointError naming the
        folder and errno, the others FollowerExit)."""
        tag = tag_for(step)
        tag_dir, dist = self.dir / tag, self.engine.dist
        if dist.is_main and tag_dir.exists():
            if read_latest(self.dir) == tag:
                (self.dir / LATEST).unlink()
            shutil.rmtree(tag_dir)
            shutil.rmtree(self.dir / (tag + UNIVERSAL_SUFFIX), ignore_errors=True)
        barrier()
        writes = RankWrites(self.dir, tag, dist.rank)
        with writes.through(self.engine.ds):
            self.engine.ds.save_checkpoint(str(self.dir), tag=tag, client_state={"tb_meta": self._meta(step)},
                                           save_latest=False)
        parts = {name: part.state_dict() for name, part in self.rank_states.items()}
        writes.write(rank_file(tag_dir, dist.rank), lambda p: atomic_write_stream(p, lambda f: torch.save(parts, f)))
        checksums = writes.checksums()
        self._agree(dist, tag_dir, writes.error)          # every rank's files are written (or none is kept)
        gathered = _gather(checksums)
        if dist.is_main:
            meta = dict(self._meta(step), states={name: part.state_dict() for name, part in self.states.items()},
                        files=file_sizes(tag_dir))
            meta[CHECKSUMS] = {rel: rec for part in gathered for rel, rec in part.items()}
            writes.write(tag_dir / STATE_JSON, lambda p: atomic_write_json(p, meta), checksummed=False)
            writes.write(self.dir / LATEST, lambda p: atomic_write_text(p, tag + "\n"), checksummed=False)
            if writes.error is None:
                prune(self.dir, self.keep_last)
        self._agree(dist, tag_dir, writes.error)
        return tag

    @staticmethod
    def _agree(dist: DistInfo, tag_dir: Path, error: CheckpointError | None) -> None:
        """Collective: raise on every rank if a write failed on any; rank 0 first deletes the partial folder
        (every rank is past its writes here, and `latest` does not name a folder being saved)."""
        try:
            agree(dist, error)
        except TBError:
            if dist.is_main:
                shutil.rmtree(tag_dir, ignore_errors=True)
            raise

    def load(self, plan: ResumePlan) -> None:
        """Collective: restore DeepSpeed's state, then every registered part from `plan`'s checkpoint.
        A global part that the checkpoint does not hold (e.g. a hook added since) keeps its fresh state."""
        eng, dist = self.engine, self.engine.dist
        names = [n for n, _ in eng.module.named_parameters()]
        tag = make_universal(plan, dist.is_main, names) if plan.universal else plan.tag
        try:
            path, _ = eng.ds.load_checkpoint(str(plan.ckpt_dir), tag=tag, load_optimizer_states=True,
                                             load_lr_scheduler_states=False, load_module_strict=True)
        except LOAD_ERRORS as e:
            raise CheckpointError(f"{plan.ckpt_dir / tag}: DeepSpeed cannot load it "
                                  f"({type(e).__name__}: {_first_line(e)})") from None
        if path is None:
            raise CheckpointError(f"{plan.ckpt_dir / tag}: DeepSpeed found no checkpoint to load")
        eng.repair_after_load()
        saved = plan.meta.get("states", {})
        for name, part in self.states.items():
            if name in saved:
                part.load_state_dict(saved[name])
        self._load_rank_states(plan)

    def _load_rank_states(self, plan: ResumePlan) -> None:
        eng, dist = self.engine, self.engine.dist
        tag_dir, meta = plan.ckpt_dir / plan.tag, plan.meta
        same_layout = (meta["world"], meta["zero_stage"], weight_dtype(meta["precision"])) == \
            (dist.world, eng.stage, weight_dtype(eng.cfg.precision))
        ranks = [dist.rank] if same_layout else list(range(meta["world"]))
        files = {r: _load_file(rank_file(tag_dir, r)) for r in ranks}
        for name, part in self.rank_states.items():
            try:
                if not same_layout and hasattr(part, "load_state_dicts"):
                    part.load_state_dicts([files[r][name] for r in ranks])
                elif dist.rank in files:
                    part.load_state_dict(files[dist.rank][name])
            except (KeyError, ValueError) as e:
                raise CheckpointError(f"{tag_dir}: per-rank part {name!r} cannot be restored ({_first_line(e)})") \
                    from None


__all__ = ["CheckpointConfig", "CheckpointManager", "ResumePlan", "RankWrites", "Stateful", "plan_resume",
           "find_damage", "agreed_damage", "checksum_note", "read_latest", "read_train_state", "list_tags",
           "tag_for", "rank_file", "prune", "make_universal"]
