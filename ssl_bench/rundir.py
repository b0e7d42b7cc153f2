"""The run directory contract: file names, record naming, the one latest-record rule, and run state.

    RUN_DIR/run.json            the run record (status running | interrupted | failed | diverged | finished)
    RUN_DIR/checkpoint.pt       the last checkpoint (model, optimizer, step, RNG states, config)
    RUN_DIR/evals/<protocol>-<data>-<preset>[-k].json   one record per evaluation; a rerun adds -1, -2, ...
    RUN_DIR/features/           the frozen-encoder feature cache
    RUN_DIR/logs/               submitit files of evaluation jobs
    RUN_DIR.slurm/              submitit files of its pretraining job (the run directory must start empty)
    RUN_DIR/.lock               held (flock) by the process working on the run or one of its evaluations

Every command that reads or writes these names or decides "which record is the latest" or "is this run
done" asks this module. It imports nothing heavy (no torch), so the leaderboard stays light.
"""
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import sys
from collections.abc import Iterator
from pathlib import Path

from ssl_bench.atomic import make_folder
from ssl_bench.errors import UserError
from ssl_bench.records import read_json

RECORD_NAME = "run.json"
CHECKPOINT_NAME = "checkpoint.pt"
EVALS_DIR = "evals"
FEATURES_DIR = "features"
LOGS_DIR = "logs"
SLURM_SUFFIX = ".slurm"
LOCK_PREFIX = ".lock"  # RUN_DIR/.lock (the run), RUN_DIR/.lock-eval-<stem> (one evaluation); not part of the run

# run states
FRESH = "fresh"  # nothing there yet
PARTIAL = "partial"  # files but no run: a job may be setting it up, or one died before its first record
RESUMABLE = "resumable"  # a checkpoint or record of an unfinished run to continue from
FINISHED = "finished"


# -- state ----------------------------------------------------------------------------------------
def holds_run(run_dir: str | Path) -> bool:
    run_dir = Path(run_dir)
    return (run_dir / CHECKPOINT_NAME).exists() or (run_dir / RECORD_NAME).exists()


def run_state(run_dir: str | Path) -> str:
    """FINISHED | RESUMABLE | FRESH | PARTIAL (see the constants)."""
    run_dir = Path(run_dir)
    if (run_dir / RECORD_NAME).exists() and read_json(run_dir / RECORD_NAME).get("status") == "finished":
        return FINISHED
    if holds_run(run_dir):
        return RESUMABLE
    return PARTIAL if _contents(run_dir) else FRESH


def _contents(run_dir: Path) -> list[Path]:
    """What a directory holds, lock files aside."""
    return [p for p in run_dir.iterdir() if not p.name.startswith(LOCK_PREFIX)] if run_dir.is_dir() else []


def prepare_run_dir(out_dir: str | Path, resume: bool) -> Path:
    """A fresh directory, or (resume) one holding an unfinished run. Never reuses a finished run."""
    out = Path(out_dir)
    if resume:
        if not holds_run(out):
            raise UserError(f"nothing to resume in {out}: no {CHECKPOINT_NAME}; drop --resume to start a new run")
        return out
    if _contents(out):
        raise UserError(
            f"{out} already holds {'a run' if holds_run(out) else 'files'}; choose a new --out, "
            f"or pass --resume to continue an interrupted run there"
        )
    return make_folder(out, "--out")


def read_run(run_dir: str | Path) -> dict:
    """The run record of a finished run directory; one clear error for anything else."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        state = "is a file, not a directory" if run_dir.exists() else "does not exist"
        raise UserError(f"run directory {run_dir} {state}; pass the --out directory of `ssl-bench pretrain`")
    record = read_json(run_dir / RECORD_NAME)
    for key, kind in (("method", str), ("arch", dict), ("data_info", dict), ("config", dict)):
        if key in record and not isinstance(record[key], kind):
            raise UserError(f"{run_dir / RECORD_NAME} is corrupt: its '{key}' is a {type(record[key]).__name__}, not a "
                            f"{'string' if kind is str else 'table'}; restore the run's own record or rerun it")
    if record.get("status") != "finished":
        raise UserError(f"run {run_dir} has status '{record.get('status')}', not finished; resume it with `ssl-bench pretrain --resume --out {run_dir}`")
    return record


def checked_config(cfg, source: str | Path) -> dict:
    """A config read back from a run (run.json or checkpoint) that a run can continue with: its sections and
    method name present and every value one the config checks allow; else one line naming ``source``."""
    from ssl_bench.config import CHECKS, check_config

    sections = ("data", "model", "train", "method")
    if not isinstance(cfg, dict) or not isinstance(cfg.get("method_name"), str) or not all(isinstance(cfg.get(k), dict) for k in sections):
        raise UserError(f"{source} holds no usable config (a method_name and the {', '.join(sections)} sections); "
                        f"restore the run's own files, or start a new run with a new --out")
    try:
        check_config(cfg, CHECKS)
    except UserError as exc:
        raise UserError(f"{source} is corrupt: {exc}; restore the run's own files, or start a new run with a new --out") from None
    return cfg


def saved_config(run_dir: str | Path) -> dict:
    """The config a run started with (its run.json, else its checkpoint): what ``--resume`` continues."""
    run_dir = Path(run_dir)
    if (run_dir / RECORD_NAME).exists():
        cfg = read_json(run_dir / RECORD_NAME).get("config")
        if cfg is not None:
            return checked_config(cfg, run_dir / RECORD_NAME)
    if (run_dir / CHECKPOINT_NAME).exists():
        from ssl_bench.checkpoint import load_checkpoint

        cfg = load_checkpoint(run_dir / CHECKPOINT_NAME).get("config")
        if cfg is not None:
            return checked_config(cfg, run_dir / CHECKPOINT_NAME)
    raise UserError(f"nothing to resume in {run_dir}: no {RECORD_NAME} or {CHECKPOINT_NAME} with the run's config; "
                    f"pass the --out directory of an interrupted `ssl-bench pretrain`")


# Keys that change how a run is watched or where it reads from, not what it computes.
NOT_COMPARED = ("data.root", "data.num_workers", "train.progress", "train.log_every", "train.ckpt_every", "train.device",
                "train.wandb", "train.wandb_project")


def config_conflicts(run_dir: str | Path, cfg: dict, prepare_rewrites=()) -> list[str]:
    """How the run in ``run_dir`` was configured otherwise than ``cfg`` asks: "key: run value -> asked value"
    for each difference, compared with the run's requested config (before ``prepare``; for runs from before that
    record, its resolved config without the keys in ``prepare_rewrites``). Keys one of the two configs lacks (a
    key added since) and ``NOT_COMPARED`` are left out. Empty when nothing is recorded yet."""
    record = read_json(Path(run_dir) / RECORD_NAME) if (Path(run_dir) / RECORD_NAME).exists() else {}
    saved = record.get("requested_config") or record.get("config")
    if not isinstance(saved, dict):
        return []
    skip = set(NOT_COMPARED) | (set() if record.get("requested_config") else set(prepare_rewrites))
    ran, asked = _flat(saved), _flat(_as_stored(cfg))
    keys = sorted(asked, key=lambda k: "." in k)  # top-level ones first (the preset, the seed), then in config order
    return [f"{key}: {ran[key]!r} -> {asked[key]!r}" for key in keys if key in ran and key not in skip and ran[key] != asked[key]]


def _flat(cfg: dict, prefix: str = "") -> dict:
    out = {}
    for key, value in cfg.items():
        out.update(_flat(value, f"{prefix}{key}.") if isinstance(value, dict) else {f"{prefix}{key}": value})
    return out


# -- evaluation records ---------------------------------------------------------------------------
def eval_stem(protocol: str, data: str, preset: str, mode: str | None = None) -> str:
    """``<protocol>-<data>-<preset>``, plus ``-fast`` for a fast-mode probe (modes never share a record name):
    an evaluation record is ``evals/<stem>.json``, then ``<stem>-k.json``."""
    return f"{protocol}-{data}-{preset}" + ("-fast" if mode == "fast" else "")


def eval_records(run_dir: str | Path, stem: str | None = None) -> list[Path]:
    """The evaluation records of a run (of one ``stem``, or all), by stem and then in the order written."""
    evals = Path(run_dir) / EVALS_DIR
    paths = sorted(evals.glob(f"{stem or ''}*.json"), key=_name_order)
    return paths if stem is None else [p for p in paths if has_stem(p, stem)]


def has_stem(path: str | Path, stem: str) -> bool:
    """Whether an evaluation record's file is ``<stem>.json`` or a later ``<stem>-k.json``."""
    name = Path(path).stem
    return name == stem or name.removeprefix(stem + "-").isdigit()


def eval_made_with(record: dict, protocol: str, params: dict) -> bool:
    """Whether an evaluation record was made with the protocol settings ``params`` (as resolved for it)."""
    config = record.get("config")
    return isinstance(config, dict) and config.get(protocol) == _as_stored(params)


def _as_stored(obj):
    """``obj`` as a JSON record holds it (tuples as lists), to compare with what a record read back holds."""
    return json.loads(json.dumps(obj))


def _suffix(path: Path) -> tuple[str, int]:
    """'knn-x-smoke-2' -> ('knn-x-smoke', 2); 'knn-x-smoke' -> ('knn-x-smoke', 0)."""
    m = re.fullmatch(r"(.*)-(\d+)", path.stem)
    return (m.group(1), int(m.group(2))) if m else (path.stem, 0)


def _name_order(path: Path) -> tuple:
    return (*_suffix(path), path.name)


def record_rank(path: str | Path, record: dict) -> tuple:
    """The latest-record rule: the later ``created`` stamp wins; for equal stamps the higher ``-k``
    suffix (written later) wins. Sort by it; the maximum is the latest."""
    return (str(record.get("created", "")), _suffix(Path(path))[1], Path(path).name)


def latest(records: dict[Path, dict]) -> tuple[Path, dict] | None:
    """The latest of ``path -> record`` by :func:`record_rank`, or None."""
    if not records:
        return None
    return max(records.items(), key=lambda item: record_rank(*item))


# -- locks ----------------------------------------------------------------------------------------
_HELD: set[str] = set()  # lock files this process holds: taking one again (a sweep, then its trainer) is a no-op


@contextlib.contextmanager
def locked(run_dir: str | Path, what: str, name: str = LOCK_PREFIX) -> Iterator[None]:
    """Hold ``RUN_DIR/<name>`` (fcntl.flock) while working on ``what`` ("pretraining", "evaluation knn...").
    A second process waits for the first, saying so on stderr; the lock goes with the process, so a
    killed holder never leaves it stale. Callers re-check what is done once they hold it."""
    path = Path(run_dir) / name
    key = str(path.resolve())
    if key in _HELD:
        yield
        return
    make_folder(path.parent)
    fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            print(f"{run_dir}: another process (pid {holder}) is {what}; waiting for it to finish", file=sys.stderr, flush=True)
            fcntl.flock(fd, fcntl.LOCK_EX)
        os.ftruncate(fd, 0)
        os.pwrite(fd, str(os.getpid()).encode(), 0)
        _HELD.add(key)
        try:
            yield
        finally:
            _HELD.discard(key)
    finally:
        os.close(fd)  # releases the lock


def eval_lock_name(stem: str) -> str:
    return f"{LOCK_PREFIX}-eval-{stem}"
