"""SLURM job state without an accounting database (squeue, scontrol, sacct where kept, and the JSON outcome
file our :class:`~ssl_bench_app.launch.submit.Job` writes), waiting for jobs, one-line failure messages, and
the jobs index (jobs.json) of a directory.

Nothing here unpickles: submitit's ``*_result.pkl`` files sit in a folder anyone with write access to the
results can plant files in, and unpickling one runs whatever code it names. A job's outcome, result and
error line are read from ``<job id>_<task>_outcome.json`` instead."""
from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path
from typing import Any, Callable

from ssl_bench.errors import UserError, one_line
from ssl_bench_app.launch.profiles import ClusterSettings


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


OUTCOMES = ("success", "error")


def outcome_path(folder: str | Path, job_id: str, task: int = 0) -> Path:
    """Where task ``task`` of job ``job_id`` records how it ended (written by ``Job``, beside submitit's files)."""
    from submitit.core.utils import JobPaths

    return JobPaths(folder, job_id=job_id, task_id=task).folder / f"{job_id}_{task}_outcome.json"


def read_outcome(folder: str | Path, job_id: str, task: int = 0) -> dict | None:
    """The task's outcome record, ``{"outcome": "success", "result": ...}`` or ``{"outcome": "error",
    "error": one line}``; None while there is none. It is written atomically, so a file that does not
    parse as one is not ours and is ignored."""
    try:
        data = json.loads(outcome_path(folder, job_id, task).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and data.get("outcome") in OUTCOMES else None


def job_outcome(folder: str | Path, job_id: str, task: int = 0) -> str | None:
    """'success' / 'error' from the task's outcome record, None while there is none."""
    record = read_outcome(folder, job_id, task)
    return record["outcome"] if record else None


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
    record = read_outcome(job.paths.folder, job.job_id)
    if record and record["outcome"] == "error":
        reason = one_line(Exception(str(record.get("error") or "an error")))
    else:
        reason = f"ended {state or 'without a result'}" + (f" ({_last_log_line(err)})" if _last_log_line(err) else "")
    return f"SLURM job {job.job_id} failed: {reason}; log: {err if err.exists() else out}"


def wait_for(jobs: list, poll_s: float = 1.0, on_change: Callable[[Any, str], None] | None = None,
             on_done: Callable[[Any, str], None] | None = None) -> dict[str, str]:
    """Wait until every job has ended; job id -> final state ('COMPLETED' only with a success result).

    Done means: every task's outcome record exists, or SLURM says the job ended and (after a grace
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
    """``key -> entry`` of the index (``job_entry``'s fields); one line for a file not of that shape."""
    try:
        jobs = json.loads(Path(index).read_text()).get("jobs", {})
    except FileNotFoundError:
        return {}
    except (json.JSONDecodeError, UnicodeDecodeError, AttributeError):
        jobs = None
    if not isinstance(jobs, dict) or not all(_entry_ok(entry) for entry in jobs.values()):
        raise UserError(f"{index} is corrupt; delete it (the jobs themselves are unaffected) and resubmit")
    return jobs


def _entry_ok(entry) -> bool:
    texts = ("kind", "job_id", "launcher", "folder", "log", "err", "run_dir", "cluster", "submitted")
    return (isinstance(entry, dict) and all(isinstance(entry.get(k), (str, type(None))) for k in texts)
            and (entry.get("job_id") is None or isinstance(entry.get("folder"), str))
            and all(isinstance(j, str) for j in entry.get("previous", [])))


def job_entry(job, kind: str, cluster: ClusterSettings | None, **extra: Any) -> dict:
    from ssl_bench.records import now_iso

    return {
        "kind": kind, "job_id": job.job_id, "launcher": "slurm", "folder": str(job.paths.folder),
        "log": str(job.paths.stdout), "err": str(job.paths.stderr), "tasks": job.num_tasks, "submitted": now_iso(),
        "cluster": cluster.name if cluster else None, **extra,
    }
