"""Where a command's work runs: in this process (``local``), on SLURM through submitit (``slurm``), or
through submitit's in-process debug executor (``debug``).

Every command that does heavy work (pretrain, eval, bench) goes through :func:`run_job`, so adding a
launcher changes no command.

SLURM settings come from a small profile, ``slurm/profiles/<cluster>.toml`` (see :data:`PROFILE_KEYS`),
chosen with ``--cluster`` and overridden with ``--slurm key=value`` or the explicit flags.

Requeue: the submitted callable is a :class:`Job`, a ``submitit.helpers.Checkpointable``. On preemption
or time-out submitit calls its ``checkpoint()``, which requeues the same work; a job requeued from
outside (``scontrol requeue``) runs its original submission again. Either way, a function that takes
job declared resumable (``Job(..., resume_dir=RUN_DIR)``, ``run_job(..., resumable=True)``) is called
with ``resume=True`` when its run directory already holds a run, so it continues from its last ``checkpoint.pt``.

Multi-GPU / multi-node: ``gpus_per_node`` starts one task per GPU (``tasks_per_node``); each task exports
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK, which ``ssl_bench.distributed`` reads.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys
import time
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import submitit

from ssl_bench.errors import UserError, one_line

LAUNCHERS = ("local", "slurm", "debug")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_CLUSTER = "local"

# profile key -> (type, default, help). Every key may be set in a profile, with --slurm key=value, and the
# common ones with a flag of their own (FLAG_KEYS).
PROFILE_KEYS: dict[str, tuple[type, Any, str]] = {
    "description": (str, "", "one line shown by `ssl-bench status`"),
    "partition": (str, "", "SLURM partition (empty: the cluster's default)"),
    "nodes": (int, 1, "nodes per job"),
    "gpus_per_node": (int, 0, "GPUs per node; one DDP process per GPU"),
    "tasks_per_node": (int, 0, "processes per node (0: one per GPU, at least 1)"),
    "cpus_per_task": (int, 1, "CPU cores per process"),
    "mem_gb": (float, 0.0, "memory per node in GB (0: the partition's default)"),
    "time": (str, "60", "time limit: minutes, HH:MM:SS or D-HH:MM:SS"),
    "account": (str, "", "SLURM account"),
    "constraint": (str, "", "node features, e.g. h100"),
    "qos": (str, "", "quality of service"),
    "max_requeue": (int, 3, "requeues after time-outs before giving up (preemptions are not counted)"),
    "signal_delay_s": (int, 90, "seconds between the time-out/preemption signal and the kill"),
    "setup": (list, [], "shell lines run before the job, e.g. ['module load cuda']"),
    "sbatch": (dict, {}, "any other sbatch option, e.g. {reservation = 'x', exclusive = true}"),
}
FLAG_KEYS = ("partition", "nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "time", "account", "constraint", "qos")
PROFILE_SUFFIX = ".toml"


# -- command-line arguments -----------------------------------------------------------------------
def add_launcher_args(parser: argparse.ArgumentParser, default: str = "local") -> None:
    g = parser.add_argument_group("launcher", "where the work runs; SLURM settings come from slurm/profiles/<cluster>.toml")
    g.add_argument("--launcher", default=default, choices=LAUNCHERS,
                   help=f"local: this process; slurm: submit with submitit and wait; debug: submitit's in-process debug executor (default: {default})")
    g.add_argument("--cluster", default=None, metavar="NAME",
                   help=f"SLURM profile: slurm/profiles/NAME.toml, or a path to a .toml (default: $SSL_BENCH_CLUSTER or {DEFAULT_CLUSTER})")
    g.add_argument("--slurm", action="append", default=[], metavar="key=value",
                   help="override a profile key, e.g. --slurm time=120 --slurm sbatch.reservation=x (repeatable)")
    for key in FLAG_KEYS:
        typ, _, help_ = PROFILE_KEYS[key]
        g.add_argument(f"--{key.replace('_', '-')}", dest=f"slurm_{key}", type=typ, default=None, help=f"{help_} (overrides the profile)")
    g.add_argument("--no-wait", action="store_true", help="slurm: print the job id and log path and return at once")


# -- cluster profiles -----------------------------------------------------------------------------
def profile_dirs() -> list[Path]:
    """Where profiles are looked up: $SSL_BENCH_PROFILES (os.pathsep-separated), then the repo's slurm/profiles."""
    extra = [Path(p) for p in os.environ.get("SSL_BENCH_PROFILES", "").split(os.pathsep) if p]
    return [*extra, REPO_ROOT / "slurm" / "profiles"]


def available_profiles() -> list[str]:
    names = {p.stem for d in profile_dirs() if d.is_dir() for p in d.glob(f"*{PROFILE_SUFFIX}")}
    return sorted(names)


def find_profile(name: str) -> Path:
    if name.endswith(PROFILE_SUFFIX) or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"cluster profile file {path} not found; pass an existing .toml or a name from: {', '.join(available_profiles())}")
        return path
    for d in profile_dirs():
        if (d / f"{name}{PROFILE_SUFFIX}").is_file():
            return d / f"{name}{PROFILE_SUFFIX}"
    raise UserError(
        f"unknown cluster profile '{name}'; known profiles: {', '.join(available_profiles()) or 'none'} "
        f"(add slurm/profiles/{name}{PROFILE_SUFFIX}, or pass --cluster path/to/profile.toml)"
    )


def _coerce(key: str, value: Any, where: str) -> Any:
    if key.startswith("sbatch."):
        return value
    if key not in PROFILE_KEYS:
        raise UserError(f"unknown cluster setting '{key}' in {where}; valid keys: {', '.join(PROFILE_KEYS)} (or sbatch.<option>)")
    typ = PROFILE_KEYS[key][0]
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise UserError(f"cluster setting '{key}' in {where} must be {typ.__name__}, got {value!r}")
    if typ in (int, float) and value < 0:
        raise UserError(f"cluster setting '{key}' in {where} must be >= 0, got {value}")
    return value


def time_minutes(text: str) -> int:
    """'90' -> 90; '02:30:00' -> 150; '1-00:00:00' -> 1440 (SLURM's formats, rounded up to a minute)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise UserError(f"cluster setting time='{text}' is not minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if b is None and c is None and days is None:
        minutes = a
    elif c is None and days is None:  # MM:SS
        minutes, seconds = a, b
        minutes += seconds > 0
    else:  # [D-]HH[:MM[:SS]]
        minutes = (days or 0) * 1440 + a * 60 + (b or 0) + ((c or 0) > 0)
    if minutes <= 0:
        raise UserError(f"cluster setting time='{text}' must be at least one minute")
    return minutes


@dataclass
class ClusterSettings:
    name: str
    path: Path
    values: dict

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def tasks_per_node(self) -> int:
        return self.values["tasks_per_node"] or max(1, self.values["gpus_per_node"])

    def describe(self) -> str:
        v = self.values
        parts = [f"cluster {self.name}", f"partition {v['partition'] or '(default)'}", f"{v['nodes']} node(s) x {self.tasks_per_node} task(s)"]
        if v["gpus_per_node"]:
            parts.append(f"{v['gpus_per_node']} GPU(s)/node")
        return ", ".join(parts)


def load_cluster(name: str | None = None, overrides: list[str] | tuple[str, ...] = (), flags: dict | None = None) -> ClusterSettings:
    """A profile with ``--slurm key=value`` overrides and then explicit flags applied, validated."""
    from ssl_bench.config import parse_value

    name = name or os.environ.get("SSL_BENCH_CLUSTER") or DEFAULT_CLUSTER
    path = find_profile(name)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"cluster profile {path} is not valid TOML ({exc}); fix the file") from None
    values = {k: (list(d) if isinstance(d, list) else dict(d) if isinstance(d, dict) else d) for k, (_, d, _) in PROFILE_KEYS.items()}
    for key, value in raw.items():
        values[key] = _coerce(key, value, str(path))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--slurm '{item}' is not key=value (e.g. --slurm time=120 or --slurm sbatch.reservation=x)")
        key, text = (s.strip() for s in item.split("=", 1))
        value = _coerce(key, parse_value(text), "--slurm")
        if key.startswith("sbatch."):
            values["sbatch"] = {**values["sbatch"], key[len("sbatch."):]: value}
        else:
            values[key] = value
    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    time_minutes(values["time"])  # validate now, not at submission
    if values["nodes"] < 1:
        raise UserError(f"cluster setting nodes must be at least 1, got {values['nodes']}")
    return ClusterSettings(Path(name).stem if name.endswith(PROFILE_SUFFIX) else name, path, values)


def cluster_from_args(args: argparse.Namespace) -> ClusterSettings:
    flags = {k: getattr(args, f"slurm_{k}", None) for k in FLAG_KEYS}
    return load_cluster(getattr(args, "cluster", None), getattr(args, "slurm", []) or [], flags)


# -- the submitted callable -----------------------------------------------------------------------
class Job(submitit.helpers.Checkpointable):
    """``fn(*args, **kwargs)`` as a SLURM job that survives preemption, time-outs and requeues.

    ``resume_dir`` declares the job resumable: ``fn`` takes ``resume=`` and works in that run directory,
    so a requeued job whose directory already holds a run is called with ``resume=True``. Without it a
    requeued job simply runs again."""

    def __init__(self, fn: Callable, args: tuple = (), kwargs: dict | None = None, resume_dir: str | Path | None = None,
                 requeued: bool = False):
        self.fn, self.args, self.kwargs, self.requeued = fn, tuple(args), dict(kwargs or {}), requeued
        self.resume_dir = Path(resume_dir) if resume_dir is not None else None

    def __call__(self) -> Any:
        env = submitit.JobEnvironment()
        if env.num_tasks > 1:
            # RANK/WORLD_SIZE/MASTER_ADDR/PORT for init_distributed; every task sees all of the node's
            # GPUs and picks its own by LOCAL_RANK.
            submitit.helpers.TorchDistributedEnvironment().export(set_cuda_visible_devices=False)
        cpus = os.environ.get("SLURM_CPUS_PER_TASK")
        if cpus:
            import torch

            torch.set_num_threads(int(cpus))
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        kwargs = dict(self.kwargs)
        from ssl_bench.rundir import holds_run

        if (self.requeued or restarts > 0) and self.resume_dir is not None and holds_run(self.resume_dir):
            kwargs["resume"] = True  # continue from the last checkpoint instead of refusing the directory
            print(f"ssl-bench: requeued (restart {restarts}); resuming {self.resume_dir}", flush=True)
        return self.fn(*self.args, **kwargs)

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption / time-out: requeue the same work, marked as requeued. The
        state lives in the run directory's checkpoint (written every train.ckpt_every steps)."""
        return submitit.helpers.DelayedSubmission(Job(self.fn, self.args, self.kwargs, self.resume_dir, requeued=True))


# -- executors ------------------------------------------------------------------------------------
def make_executor(kind: str, folder: str | Path, cluster: ClusterSettings | None, name: str, sbatch: dict | None = None):
    """A submitit executor for ``kind`` ("slurm" or "debug") writing its files into ``folder``."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    if kind == "slurm":
        try:
            executor = submitit.AutoExecutor(folder=folder, cluster="slurm", slurm_max_num_timeout=cluster["max_requeue"] if cluster else 3)
        except RuntimeError:
            raise UserError(
                "--launcher slurm needs SLURM's sbatch/srun on PATH; start a local one with `slurm/local-cluster.sh up`, "
                "or use --launcher local"
            ) from None
    else:
        executor = submitit.AutoExecutor(folder=folder, cluster="debug")
    params: dict[str, Any] = {"name": name}
    if cluster is not None:
        v = cluster.values
        params.update(timeout_min=time_minutes(v["time"]), nodes=v["nodes"], tasks_per_node=cluster.tasks_per_node, cpus_per_task=v["cpus_per_task"])
        if v["gpus_per_node"]:
            params["gpus_per_node"] = v["gpus_per_node"]
        if v["mem_gb"]:
            params["mem_gb"] = v["mem_gb"]
        for key in ("partition", "account", "constraint", "qos"):
            if v[key]:
                params[f"slurm_{key}"] = v[key]
        if v["setup"]:
            params["slurm_setup"] = list(v["setup"])
        params["slurm_signal_delay_s"] = v["signal_delay_s"]
        extra = {k.replace("_", "-"): val for k, val in v["sbatch"].items()}
        extra.update(sbatch or {})
        if extra:
            params["slurm_additional_parameters"] = extra
    executor.update_parameters(**params)
    return executor


def _sbatch_message(exc: BaseException) -> str:
    """sbatch's own error lines, joined: 'invalid partition specified: x; Batch job submission failed: ...'."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip()]
    errors = [re.sub(r"^sbatch: error: ", "", ln) for ln in lines if ln.startswith("sbatch:")]
    return "; ".join(errors) if errors else one_line(exc)


@contextlib.contextmanager
def sbatch_errors(cluster: ClusterSettings | None):
    """sbatch refusing a job becomes one line naming its message and where the settings came from."""
    from submitit.core.utils import FailedJobError

    captured = io.StringIO()  # submitit echoes sbatch's stderr; the UserError carries it instead
    try:
        with contextlib.redirect_stderr(captured):
            yield
    except (FailedJobError, subprocess.CalledProcessError) as exc:
        where = f"the profile {cluster.path} or the --slurm/flag overrides" if cluster else "the cluster settings"
        raise UserError(f"SLURM refused the job: {_sbatch_message(exc)}; fix {where}") from None


# -- job state, without an accounting database ---------------------------------------------------
TERMINAL = {"COMPLETED", "FAILED", "CANCELLED", "TIMEOUT", "NODE_FAIL", "OUT_OF_MEMORY", "BOOT_FAIL", "DEADLINE", "PREEMPTED", "REVOKED", "SPECIAL_EXIT"}


def _run(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout if out.returncode == 0 else ""


def _expand_tasks(spec: str) -> list[str]:
    out = []
    for part in spec.split("%")[0].strip("[]").split(","):
        if "-" in part:
            lo, hi = part.split("-")
            out += [str(i) for i in range(int(lo), int(hi) + 1)]
        elif part:
            out.append(part)
    return out


def slurm_states(job_ids: list[str]) -> dict[str, str]:
    """job id ('123' or array task '123_4') -> SLURM state, from squeue (queued/running), scontrol
    (finished within MinJobAge) and sacct (where an accounting database exists). Unknown ids are absent."""
    ids = sorted({str(j) for j in job_ids})
    if not ids:
        return {}
    mains = sorted({j.split("_")[0] for j in ids})
    states: dict[str, str] = {}
    for line in _run(["sacct", "-n", "-P", "-X", "-o", "JobID,State", "-j", ",".join(mains)]).splitlines():
        jid, _, state = line.partition("|")
        if "[" in jid:
            base = jid.split("_")[0]
            for t in _expand_tasks(jid.split("_", 1)[1]):
                states[f"{base}_{t}"] = state.split()[0]
        elif jid:
            states[jid] = state.split()[0] if state else "UNKNOWN"
    for main in mains:  # scontrol knows finished jobs for MinJobAge seconds, and is more current than sacct
        for line in _run(["scontrol", "-o", "show", "job", main]).splitlines():
            fields = dict(tok.split("=", 1) for tok in line.split() if "=" in tok)
            state = fields.get("JobState")
            if not state:
                continue
            if fields.get("ArrayJobId") and fields.get("ArrayTaskId"):
                for t in _expand_tasks(fields["ArrayTaskId"]):
                    states[f"{fields['ArrayJobId']}_{t}"] = state
            else:
                states[fields.get("JobId", main)] = state
    for line in _run(["squeue", "-h", "-r", "-o", "%i|%T", "-j", ",".join(mains)]).splitlines():
        jid, _, state = line.partition("|")
        if jid:
            states[jid.strip()] = state.strip()
    return {j: states[j] for j in ids if j in states}


def job_outcome(folder: Path, job_id: str, task: int = 0) -> str | None:
    """'success' / 'error' from submitit's result pickle, None while there is none."""
    from submitit.core.utils import JobPaths, pickle_load

    path = JobPaths(folder, job_id=job_id, task_id=task).result_pickle
    if not path.exists():
        return None
    try:
        return pickle_load(path)[0]
    except Exception:  # half-written: treat as not yet there
        return None


def log_paths(folder: str | Path, job_id: str, task: int = 0) -> tuple[Path, Path]:
    from submitit.core.utils import JobPaths

    p = JobPaths(folder, job_id=job_id, task_id=task)
    return p.stdout, p.stderr


def _last_log_line(path: Path) -> str:
    try:
        lines = [ln.strip() for ln in path.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return ""
    skip = ("submitit WARNING", "submitit INFO", "submitit ERROR", "srun: error", "slurmstepd", "Traceback", "File ", "raise ", "^")
    for ln in reversed(lines):
        if not ln.startswith(skip):
            return ln
    return lines[-1] if lines else ""


def job_failure_message(job, state: str | None = None) -> str:
    """One line: why the job failed, and where its log is."""
    out, err = job.paths.stdout, job.paths.stderr
    outcome = job_outcome(job.paths.folder, job.job_id)
    if outcome == "error":
        from submitit.core.utils import pickle_load

        _, trace = pickle_load(job.paths.result_pickle)
        reason = one_line(Exception(trace))
    else:
        reason = f"ended {state or 'without a result'}" + (f" ({_last_log_line(err)})" if _last_log_line(err) else "")
    return f"SLURM job {job.job_id} failed: {reason}; log: {err if err.exists() else out}"


def wait_for(jobs: list, poll_s: float = 1.0, on_change: Callable[[Any, str], None] | None = None,
             on_done: Callable[[Any, str], None] | None = None) -> dict[str, str]:
    """Wait until every job has ended; job id -> final state ('COMPLETED' only with a success result).

    Done means: every task's result pickle exists, or SLURM says the job ended and (after a grace
    period for slow file systems) no result came. A requeued job goes back to PENDING and is waited for.
    ``on_change(job, state)`` sees each new SLURM state, ``on_done(job, final_state)`` each end.
    """
    pending = {j.job_id: j for j in jobs}
    final: dict[str, str] = {}
    seen: dict[str, str] = {}
    ended_at: dict[str, float] = {}
    while pending:
        states = slurm_states(list(pending))
        for jid, job in list(pending.items()):
            state = states.get(jid, "UNKNOWN")
            if on_change and seen.get(jid) != state:
                on_change(job, state)
            seen[jid] = state
            outcomes = [job_outcome(job.paths.folder, jid, t) for t in range(job.num_tasks)]
            if all(o is not None for o in outcomes) and state not in ("PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"):
                final[jid] = "COMPLETED" if all(o == "success" for o in outcomes) else "FAILED"
            elif state.split()[0] in TERMINAL or state == "UNKNOWN":
                # ended, yet no result (after a grace period for slow file systems); a job SLURM no
                # longer knows at all (purged, no accounting) is given longer before giving up on it
                ended_at.setdefault(jid, time.time())
                if time.time() - ended_at[jid] > (10 if state != "UNKNOWN" else 300):
                    final[jid] = state if state != "COMPLETED" else "FAILED"
            else:
                ended_at.pop(jid, None)
            if jid in final:
                del pending[jid]
                if on_done:
                    on_done(job, final[jid])
        if pending:
            time.sleep(poll_s)
    return final


# -- the job index (jobs.json) --------------------------------------------------------------------
INDEX_NAME = "jobs.json"


def record_jobs(index: Path, entries: dict[str, dict]) -> None:
    """Merge ``key -> entry`` into the index; a resubmitted key keeps its earlier job ids in ``previous``."""
    from ssl_bench.records import write_json_atomic

    jobs = read_index(index)
    for key, entry in entries.items():
        old = jobs.get(key)
        if old and old.get("job_id") and old.get("job_id") != entry.get("job_id"):
            entry = {**entry, "previous": [*old.get("previous", []), old["job_id"]]}
        jobs[key] = entry
    write_json_atomic(index, {"jobs": jobs})


def read_index(index: Path) -> dict[str, dict]:
    try:
        return json.loads(Path(index).read_text()).get("jobs", {})
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        raise UserError(f"{index} is corrupt; delete it (the jobs themselves are unaffected) and resubmit") from None


def job_entry(job, kind: str, cluster: ClusterSettings | None, **extra: Any) -> dict:
    from ssl_bench.records import now_iso

    return {
        "kind": kind, "job_id": job.job_id, "launcher": "slurm", "folder": str(job.paths.folder),
        "log": str(job.paths.stdout), "err": str(job.paths.stderr), "tasks": job.num_tasks, "submitted": now_iso(),
        "cluster": cluster.name if cluster else None, **extra,
    }


# -- running one job ------------------------------------------------------------------------------
def job_folder(log_dir: str | None, name: str, resume_dir: Path | None = None) -> Path:
    """submitit's folder (submission script, pickles, logs). A run directory that the job must find
    empty (a fresh ``pretrain``) cannot hold it, so then it goes beside it: ``<run_dir>.slurm``."""
    from ssl_bench.rundir import SLURM_SUFFIX

    folder = Path(log_dir) if log_dir else Path("slurm-logs") / name
    if resume_dir is not None:
        t, f = resume_dir.resolve(), folder.resolve()
        if f == t or t in f.parents:
            folder = t.parent / f"{t.name}{SLURM_SUFFIX}"
    return folder


def run_job(args: argparse.Namespace, fn: Callable[..., Any], *fn_args: Any, name: str = "ssl-bench", log_dir: str | None = None,
            run_dir: str | Path | None = None, resumable: bool = False, **fn_kwargs: Any) -> Any:
    """Run ``fn(*fn_args, **fn_kwargs)`` with the launcher ``args.launcher`` and return its result.

    ``run_dir``: the run directory the job works on (named in the jobs index for ``ssl-bench status``);
    ``resumable``: ``fn`` takes ``resume=`` and continues ``run_dir`` when a requeued job finds a run there.

    slurm: submits, prints the job id and log path, waits (requeues included) and returns the result;
    a failed job is one UserError line with its log path. With ``--no-wait`` it exits the command
    (status 0) once the job is submitted.
    """
    launcher = getattr(args, "launcher", "local")
    if launcher == "local":
        return fn(*fn_args, **fn_kwargs)
    run_dir = Path(run_dir) if run_dir is not None else None
    resume_dir = run_dir if resumable else None
    folder = job_folder(log_dir, name, resume_dir)
    job_fn = Job(fn, fn_args, fn_kwargs, resume_dir)
    if launcher == "debug":
        return _run_debug(folder, job_fn, name)

    cluster = cluster_from_args(args)
    executor = make_executor("slurm", folder, cluster, name)
    with sbatch_errors(cluster):
        job = executor.submit(job_fn)
    extra = {"run_dir": str(run_dir)} if run_dir is not None else {}
    record_jobs(folder / INDEX_NAME, {name: job_entry(job, name.split("-")[0], cluster, **extra)})
    print(f"submitted SLURM job {job.job_id} ({name}; {cluster.describe()}); log: {job.paths.stdout}", flush=True)
    if getattr(args, "no_wait", False):
        print(f"not waiting (--no-wait): follow it with `squeue -j {job.job_id}` or `ssl-bench status --results {folder}`", flush=True)
        raise SystemExit(0)
    return wait_result(job)


def _announce(job, state: str) -> None:
    if state in ("PENDING", "REQUEUED") and getattr(job, "_was_running", False):
        print(f"SLURM job {job.job_id} was requeued; waiting for it to resume", flush=True)
    if state == "RUNNING":
        job._was_running = True


def wait_result(job) -> Any:
    """Wait for one job (a KeyboardInterrupt leaves it running) and return its result, or raise one line."""
    try:
        state = wait_for([job], on_change=_announce)[job.job_id]
    except KeyboardInterrupt:
        print(f"\nstopped waiting; SLURM job {job.job_id} keeps running (scancel {job.job_id} to stop it); log: {job.paths.stdout}", file=sys.stderr)
        raise
    if state != "COMPLETED":
        raise UserError(job_failure_message(job, state))
    from submitit.core.utils import pickle_load

    return pickle_load(job.paths.result_pickle)[1]


def _run_debug(folder: Path, job_fn: Job, name: str) -> Any:
    """submitit's debug executor: the same job object, run in this process. A crash that is not bad
    input opens pdb when stdin is a terminal (submitit's debug behaviour); otherwise it is raised."""
    executor = make_executor("debug", folder, None, name)
    job = executor.submit(job_fn)
    submission = job.submission()
    saved = dict(os.environ)
    os.environ.update(job.environ)  # SUBMITIT_DEBUG_JOB_ID: the job sees a debug JobEnvironment
    try:
        return submission.result()
    except Exception:
        from ssl_bench.errors import TrainingDiverged

        exc = sys.exc_info()[1]
        if not isinstance(exc, (UserError, TrainingDiverged)) and sys.stdin is not None and sys.stdin.isatty():
            import pdb

            pdb.post_mortem()
        raise
    finally:
        os.environ.clear()
        os.environ.update(saved)
