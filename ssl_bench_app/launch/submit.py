"""Submission: the requeue-safe :class:`Job`, submitit executors built from a profile, and :func:`run_job`, which
runs a command's work here (``local``), in submitit's debug executor (``debug``) or on SLURM (``slurm``)."""
from __future__ import annotations

import argparse
import contextlib
import io
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any, Callable

import submitit

from ssl_bench.atomic import make_folder
from ssl_bench.errors import UserError, one_line
from ssl_bench_app.launch.profiles import ClusterSettings, cluster_from_args, time_minutes
from ssl_bench_app.launch.slurm_state import INDEX_NAME, job_entry, job_failure_message, outcome_path, read_outcome, record_jobs, wait_for


# -- the submitted callable -----------------------------------------------------------------------
class Job(submitit.helpers.Checkpointable):
    """``fn(*args, **kwargs)`` as a SLURM job that survives preemption, time-outs and requeues.

    ``resume_dir`` declares the job resumable: ``fn`` takes ``resume=`` and works in that run directory,
    so a requeued job whose directory already holds a run is called with ``resume=True``. Without it a
    requeued job simply runs again.

    Each task ends by writing its outcome as JSON (``outcome_path``): the result, or the error as one
    line. The submitting side and ``ssl-bench status`` read only that, never submitit's result pickles."""

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
        try:
            result = self.fn(*self.args, **kwargs)
        except Exception as exc:  # not SystemExit: a preempted job exits to be requeued, with no outcome
            _record_outcome(env, {"outcome": "error", "error": one_line(exc), "type": type(exc).__name__})
            raise
        _record_outcome(env, {"outcome": "success", "result": result})
        return result

    def checkpoint(self, *args: Any, **kwargs: Any) -> submitit.helpers.DelayedSubmission:
        """Called by submitit on preemption / time-out: requeue the same work, marked as requeued. The
        state lives in the run directory's checkpoint (written every train.ckpt_every steps)."""
        return submitit.helpers.DelayedSubmission(Job(self.fn, self.args, self.kwargs, self.resume_dir, requeued=True))


def _record_outcome(env: submitit.JobEnvironment, record: dict) -> None:
    """Write this task's outcome record atomically (only in a submitted job: the debug executor and
    direct calls return in-process)."""
    from ssl_bench.records import write_json_atomic

    if "SUBMITIT_FOLDER" not in os.environ:
        return
    path = outcome_path(env.paths.folder, env.job_id, env.global_rank)
    try:
        write_json_atomic(path, record)
    except TypeError:  # a result JSON cannot hold: the outcome still counts, the value stays in the run directory
        write_json_atomic(path, {**record, "result": None, "result_type": type(record.get("result")).__name__})


# -- executors ------------------------------------------------------------------------------------
def make_executor(kind: str, folder: str | Path, cluster: ClusterSettings | None, name: str, sbatch: dict | None = None):
    """A submitit executor for ``kind`` ("slurm" or "debug") writing its files into ``folder``."""
    folder = make_folder(folder)
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
    return read_outcome(job.paths.folder, job.job_id)["result"]


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
