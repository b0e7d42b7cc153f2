"""Where a command's work runs: in this process (``local``), on SLURM through submitit (``slurm``), or
through submitit's in-process debug executor (``debug``).

Every command that does heavy work (pretrain, eval, bench) goes through :func:`run_job`, so adding a
launcher changes no command.

SLURM settings come from a small profile, ``slurm/profiles/<cluster>.toml`` (see :data:`PROFILE_KEYS`),
chosen with ``--cluster`` and overridden with ``--slurm key=value`` or the explicit flags.

Requeue: the submitted callable is a :class:`Job`, a ``submitit.helpers.Checkpointable``. On preemption
or time-out submitit calls its ``checkpoint()``, which requeues the same work; a job requeued from
outside (``scontrol requeue``) runs its original submission again. Either way, a job declared
resumable (``Job(..., resume_dir=RUN_DIR)``, ``run_job(..., resumable=True)``) is called with ``resume=True``
when its run directory already holds a run, so it continues from its last ``checkpoint.pt``.

Multi-GPU / multi-node: ``gpus_per_node`` starts one task per GPU (``tasks_per_node``); each task exports
RANK / WORLD_SIZE / MASTER_ADDR / MASTER_PORT / LOCAL_RANK, which ``ssl_bench.distributed`` reads.

    profiles.py      cluster profiles (slurm/profiles/<cluster>.toml) and the launcher's command-line options
    slurm_state.py   job state from SLURM and the jobs' JSON outcome files (never a pickle), waiting, failure messages, the jobs index
    submit.py        the requeue-safe Job, executors, run_job (local / debug / slurm)
"""
from __future__ import annotations

from ssl_bench_app.launch.profiles import (
    DEFAULT_CLUSTER, FLAG_KEYS, LAUNCHERS, PROFILE_KEYS, REPO_ROOT, ClusterSettings, add_launcher_args, available_profiles,
    cluster_from_args, find_profile, load_cluster, profile_dirs, time_minutes,
)
from ssl_bench_app.launch.slurm_state import (
    INDEX_NAME, TERMINAL, job_entry, job_failure_message, job_outcome, log_paths, outcome_path, read_index, read_outcome,
    record_jobs, slurm_states, wait_for,
)
from ssl_bench_app.launch.submit import Job, _run_debug, job_folder, make_executor, run_job, sbatch_errors, wait_result

__all__ = [
    "DEFAULT_CLUSTER", "FLAG_KEYS", "LAUNCHERS", "PROFILE_KEYS", "REPO_ROOT", "ClusterSettings", "add_launcher_args",
    "available_profiles", "cluster_from_args", "find_profile", "load_cluster", "profile_dirs", "time_minutes",
    "INDEX_NAME", "TERMINAL", "job_entry", "job_failure_message", "job_outcome", "log_paths", "outcome_path", "read_index",
    "read_outcome", "record_jobs",
    "slurm_states", "wait_for", "Job", "_run_debug", "job_folder", "make_executor", "run_job", "sbatch_errors", "wait_result",
]
