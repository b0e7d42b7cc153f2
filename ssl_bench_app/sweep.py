"""Sweeps: methods x seeds pretrained and evaluated with several protocols, then one leaderboard.

    SWEEP_DIR/<method>-s<seed>/run.json, checkpoint.pt, evals/<protocol>-<data>-<preset>.json
    SWEEP_DIR/logs/          submitit's scripts, pickles and logs (<job id>_<task>_log.out / .err)
    SWEEP_DIR/jobs.json      key ("pretrain/mae-s0", "eval/mae-s0/knn") -> job id, log, ...
    SWEEP_DIR/leaderboard.*  written once every job has ended (when waiting)

On SLURM the pretraining runs are one job array (``executor.batch()``); each evaluation is a job that
starts only after its run's pretraining succeeded (``--dependency=afterok:<array task>``; it is
cancelled if that fails). A rerun skips what is done: runs whose run.json says finished, evaluations
with a record made under the same protocol settings, and jobs of an earlier submission still queued or running. An unfinished run
with a checkpoint is resumed.
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ssl_bench.errors import UserError
from ssl_bench.progress import StageClock

DEFAULT_SEEDS = {"standard": "0,1,2"}  # the reference study reports a spread over seeds
ACTIVE = {"PENDING", "RUNNING", "REQUEUED", "CONFIGURING", "COMPLETING", "RESIZING", "SUSPENDED", "REQUEUE_HOLD"}


@dataclass
class EvalSpec:
    protocol: str
    key: str
    done: bool


@dataclass
class RunSpec:
    method: str
    seed: int
    cfg: dict
    run_dir: Path
    state: str  # finished | resumable | fresh | partial
    evals: list[EvalSpec] = field(default_factory=list)

    @property
    def key(self) -> str:
        return f"pretrain/{self.run_dir.name}"


@dataclass
class Sweep:
    out: Path
    data: str
    data_root: str | None
    preset: str
    eval_overrides: list[str]
    runs: list[RunSpec]

    @property
    def logs(self) -> Path:
        return self.out / "logs"

    @property
    def index(self) -> Path:
        from ssl_bench_app.launch import INDEX_NAME

        return self.out / INDEX_NAME


def add_grid_args(parser: argparse.ArgumentParser) -> None:
    """The options `sweep` and `bench` share: which seeds, data, preset and overrides make the grid."""
    parser.add_argument("--seeds", default=None,
                        help="comma-separated pretraining seeds (default: 0,1,2 at the standard preset, else 0)")
    parser.add_argument("--data", default="fashion_mnist", help="data set for pretraining and evaluation (default: fashion_mnist)")
    parser.add_argument("--data-root", default=None, help="where the data set lives (default: its standard location)")
    parser.add_argument("--preset", default="quick", help="smoke | quick | standard | full, for pretraining and evaluation (default: quick)")
    parser.add_argument("--eval-override", action="append", default=[], metavar="protocol.key=value",
                        help="evaluation preset override, e.g. --eval-override finetune.epochs=2 (repeatable)")
    parser.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides for every run, e.g. train.epochs=1")


def split_list(text: str, what: str) -> list[str]:
    items = [t.strip() for t in text.split(",") if t.strip()]
    if not items:
        raise UserError(f"--{what} is empty; give a comma-separated list")
    if len(set(items)) != len(items):
        raise UserError(f"--{what} '{text}' names an item twice")
    return items


def refuse_partial(run: RunSpec) -> None:
    if run.state == "partial":
        raise UserError(f"{run.run_dir} holds files but no run (no run.json or checkpoint.pt) and no job of this sweep is on it; "
                        f"move it away and rerun the sweep")


def eval_done(run_dir: Path, protocol: str, data: str, preset: str, params: dict) -> bool:
    """An evaluation record made with the protocol settings ``params`` exists: a record from an older or
    overridden preset is not reused, it is kept and a new one is written beside it."""
    from ssl_bench.records import read_json
    from ssl_bench.rundir import eval_made_with, eval_records, eval_stem

    stem = eval_stem(protocol, data, preset, params.get("mode"))
    return any(eval_made_with(read_json(p), protocol, params) for p in eval_records(run_dir, stem))


def plan(methods: str, seeds: str, protocols: str, data: str, data_root: str | None, preset: str, out: str | Path,
         overrides: list[str] = (), eval_overrides: list[str] = ()) -> Sweep:
    """Validate everything (methods, seeds, protocols, configs) before anything is submitted."""
    from evals.presets import resolve_eval_config
    from evals.run import parse_protocols
    from ssl_bench.config import resolve_config
    from ssl_bench.data.datasets import DATASETS
    from ssl_bench.registry import get_method
    from ssl_bench.rundir import config_conflicts, run_state

    method_names = split_list(methods, "methods")
    seeds = seeds if seeds is not None else DEFAULT_SEEDS.get(preset, "0")
    try:
        seed_list = [int(s) for s in split_list(seeds, "seeds")]
    except ValueError:
        raise UserError(f"--seeds '{seeds}' must be comma-separated integers, e.g. 0,1,2") from None
    protocol_list = parse_protocols(protocols)
    if data not in DATASETS:
        raise UserError(f"unknown data set '{data}'; known data sets: {', '.join(DATASETS)}")
    eval_cfg = resolve_eval_config(preset, list(eval_overrides))
    out = Path(out)
    runs = []
    for name in method_names:
        cls = get_method(name)
        for seed in seed_list:
            base = [f"data.name={data}", *([f"data.root={data_root}"] if data_root else [])]
            cfg = resolve_config(cls, preset, [*base, *overrides, f"seed={seed}"])
            run_dir = out / f"{name}-s{seed}"
            spec = RunSpec(name, seed, cfg, run_dir, run_state(run_dir))
            conflicts = config_conflicts(run_dir, cfg, cls.prepare_rewrites) if spec.state in ("finished", "resumable") else []
            if conflicts:  # reusing it would put another configuration's numbers under this one's name
                shown = "; ".join(conflicts[:3]) + (f"; and {len(conflicts) - 3} more" if len(conflicts) > 3 else "")
                raise UserError(f"{run_dir} holds a run made with other settings ({shown}); pass a new --out, "
                                f"or the settings it was made with to reuse it")
            spec.evals = [
                EvalSpec(p, f"eval/{run_dir.name}/{p}", spec.state == "finished" and eval_done(run_dir, p, data, preset, eval_cfg[p]))
                for p in protocol_list if cls.protocols is None or p in cls.protocols
            ]
            runs.append(spec)
    return Sweep(out, data, data_root, preset, list(eval_overrides), runs)


# -- running --------------------------------------------------------------------------------------
def _eval_args(sweep: Sweep, run: RunSpec, ev: EvalSpec) -> tuple:
    return (run.run_dir, [ev.protocol], sweep.data, sweep.data_root, sweep.preset, sweep.eval_overrides)


def _stage_kind(ev: EvalSpec | None) -> str:
    return "pretrain" if ev is None else f"eval/{ev.protocol}"


def run_inline(sweep: Sweep, launcher: str) -> list[str]:
    """local / debug: every step in this process, in order; a run or evaluation that fails (bad input,
    divergence) is reported and the others go on. Returns one line per failure."""
    from evals.presets import resolve_eval_config
    from evals.run import evaluate
    from ssl_bench.errors import TrainingDiverged
    from ssl_bench_app.launch import Job, _run_debug
    from ssl_bench.rundir import FINISHED, RESUMABLE, eval_lock_name, eval_stem, locked, run_state
    from ssl_bench.trainer import pretrain

    def call(fn, args, kwargs, name, resume_dir=None):
        if launcher == "debug":
            return _run_debug(sweep.logs, Job(fn, args, kwargs, resume_dir), name)
        return fn(*args, **kwargs)

    eval_cfg = resolve_eval_config(sweep.preset, sweep.eval_overrides)
    steps = {id(run): ["pretrain"] * (run.state != "finished") + [_stage_kind(ev) for ev in run.evals if not ev.done]
             for run in sweep.runs}
    clock = StageClock([kind for run in sweep.runs for kind in steps[id(run)]])
    failed = []

    def report(key: str, exc: Exception) -> None:
        print(f"{key}: failed: {exc}", flush=True)
        failed.append(f"{key}: {exc}")
        clock.finish()

    for run in sweep.runs:
        left = steps[id(run)]  # this run's stages not started yet
        # Each step runs under its lock and re-checks what is done once it holds it, so a second
        # process on the same directory (two benches started by mistake) waits and then skips it.
        if run.state != "finished":
            clock.start(left.pop(0), f"{run.key}: pretraining")
            try:
                with locked(run.run_dir, "pretraining this run"):
                    run.state = state = run_state(run.run_dir)  # partial is refused here, under the lock
                    refuse_partial(run)
                    if state == FINISHED:
                        print(f"{run.key}: finished meanwhile by another process; skipped", flush=True)
                    else:
                        call(pretrain, (run.cfg, run.run_dir), {"resume": state == RESUMABLE}, run.key, resume_dir=run.run_dir)
            except (UserError, TrainingDiverged) as exc:
                report(run.key, exc)
                clock.skip(left)  # no evaluation without its pretraining
                continue
        for ev in run.evals:
            if ev.done:
                continue
            clock.start(left.pop(0), f"{ev.key}: evaluating")
            stem = eval_stem(ev.protocol, sweep.data, sweep.preset, eval_cfg[ev.protocol].get("mode"))
            try:
                with locked(run.run_dir, f"evaluating {ev.protocol}", eval_lock_name(stem)):
                    if eval_done(run.run_dir, ev.protocol, sweep.data, sweep.preset, eval_cfg[ev.protocol]):
                        print(f"{ev.key}: recorded meanwhile by another process; skipped", flush=True)
                    else:
                        call(evaluate, _eval_args(sweep, run, ev), {}, ev.key)
            except (UserError, TrainingDiverged) as exc:  # the run's other evaluations go on
                report(ev.key, exc)
    clock.finish()
    return failed


@dataclass
class Submitted:
    jobs: dict[str, Any]  # key -> submitit job (submitted now)
    reused: dict[str, Any]  # key -> submitit job of an earlier submission still queued/running
    skipped: list[str]


def submit(sweep: Sweep, cluster) -> Submitted:
    """Pretraining as one job array, each evaluation as a job after its run's pretraining."""
    from evals.run import evaluate
    import submitit

    from ssl_bench_app.launch import Job, job_entry, make_executor, read_index, record_jobs, sbatch_errors, slurm_states
    from ssl_bench.trainer import pretrain

    earlier = read_index(sweep.index)
    live = slurm_states([e["job_id"] for e in earlier.values() if e.get("job_id") and e.get("launcher") == "slurm"])

    def active(key: str):
        entry = earlier.get(key, {})
        jid = entry.get("job_id")
        if not jid or (live.get(jid) or "UNKNOWN").split()[0] not in ACTIVE:
            return None
        return submitit.SlurmJob(folder=entry["folder"], job_id=jid, tasks=tuple(range(entry.get("tasks", 1))))

    out = Submitted({}, {}, [])
    todo = []
    for run in sweep.runs:
        if run.state == "finished":
            out.skipped.append(run.key)
        elif active(run.key):
            out.reused[run.key] = active(run.key)
        else:
            refuse_partial(run)
            todo.append(run)
    if todo:
        executor = make_executor("slurm", sweep.logs, cluster, f"pretrain-{sweep.out.name}")
        with sbatch_errors(cluster):
            with executor.batch():
                pending = [executor.submit(Job(pretrain, (r.cfg, r.run_dir), {"resume": r.state == "resumable"}, resume_dir=r.run_dir)) for r in todo]
        out.jobs.update({r.key: j for r, j in zip(todo, pending)})
    entries = {r.key: job_entry(out.jobs[r.key], "pretrain", cluster, run_dir=str(r.run_dir), method=r.method, seed=r.seed) for r in todo}

    for run in sweep.runs:
        parent_job = out.jobs.get(run.key) or out.reused.get(run.key)
        parent = parent_job.job_id if parent_job else None
        for ev in run.evals:
            if ev.done:
                out.skipped.append(ev.key)
                continue
            if active(ev.key):
                out.reused[ev.key] = active(ev.key)
                continue
            dep = {"dependency": f"afterok:{parent}", "kill-on-invalid-dep": "yes"} if parent else None
            executor = make_executor("slurm", sweep.logs, cluster, f"eval-{run.run_dir.name}-{ev.protocol}", sbatch=dep)
            with sbatch_errors(cluster):
                job = executor.submit(Job(evaluate, _eval_args(sweep, run, ev)))
            out.jobs[ev.key] = job
            entries[ev.key] = job_entry(job, "eval", cluster, run_dir=str(run.run_dir), protocol=ev.protocol, depends_on=parent)
    record_jobs(sweep.index, entries)
    return out


def wait_all(submitted: Submitted) -> list[str]:
    """Wait for the jobs submitted now and those of an earlier submission still on the queue; print
    each as it ends; returns one failure line per failed job."""
    from ssl_bench_app.launch import job_failure_message, wait_for

    jobs = {**submitted.reused, **submitted.jobs}
    keys = {j.job_id: k for k, j in jobs.items()}

    def on_done(job, state: str) -> None:
        print(f"  {keys[job.job_id]:<28} job {job.job_id:<8} {state}", flush=True)

    final = wait_for(list(jobs.values()), on_done=on_done)
    return [f"{key}: {job_failure_message(job, final[job.job_id])}" for key, job in jobs.items() if final[job.job_id] != "COMPLETED"]


def write_leaderboard(sweep: Sweep) -> str | None:
    """The leaderboard of the sweep directory (markdown), or None while evals.leaderboard is missing."""
    try:
        from evals.leaderboard import to_markdown
        from evals.leaderboard import write_leaderboard as write
        from evals.presets import resolve_eval_config
    except ImportError:
        return None
    asked = {"data": sweep.data, "preset": sweep.preset, "protocols": resolve_eval_config(sweep.preset, sweep.eval_overrides)}
    lb, written = write(sweep.out, plot=True, asked=asked)
    return to_markdown(lb) + "\nwrote " + ", ".join(str(p) for p in written)


def run_sweep(args: argparse.Namespace) -> int:
    from ssl_bench_app.launch import cluster_from_args

    sweep = plan(args.methods, args.seeds, args.protocols, args.data, args.data_root, args.preset,
                 args.out or f"results/sweep-{args.data}-{args.preset}", args.overrides, args.eval_override)
    n_runs, n_evals = len(sweep.runs), sum(len(r.evals) for r in sweep.runs)
    print(f"sweep {sweep.out}: {n_runs} runs, {n_evals} evaluations; "
          f"{sum(r.state == 'finished' for r in sweep.runs)} runs and {sum(e.done for r in sweep.runs for e in r.evals)} evaluations already done")
    if args.launcher in ("local", "debug"):
        failed = run_inline(sweep, args.launcher)
        if failed:
            more = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
            raise UserError(f"{len(failed)} step(s) failed; first: {failed[0]}{more}; fix it and rerun the sweep: finished steps are skipped")
    else:
        cluster = cluster_from_args(args)
        submitted = submit(sweep, cluster)
        pre = [k for k in submitted.jobs if k.startswith("pretrain/")]
        if pre:
            print(f"submitted pretraining array {submitted.jobs[pre[0]].job_id.split('_')[0]} ({len(pre)} runs) and "
                  f"{len(submitted.jobs) - len(pre)} evaluation jobs ({cluster.describe()}); logs in {sweep.logs}")
        elif submitted.jobs:
            print(f"submitted {len(submitted.jobs)} evaluation jobs ({cluster.describe()}); logs in {sweep.logs}")
        elif not submitted.reused:
            print("nothing to submit: every run and evaluation is done")
        if submitted.reused:
            print(f"{len(submitted.reused)} job(s) of an earlier submission are still queued or running: "
                  f"{', '.join(j.job_id for j in submitted.reused.values())}")
        print(f"job index: {sweep.index}; `ssl-bench status --results {sweep.out}` shows each job's state and log")
        if args.no_wait:
            return 0
        failures = wait_all(submitted)
        if failures:
            more = f" (and {len(failures) - 1} more)" if len(failures) > 1 else ""
            raise UserError(f"{len(failures)} job(s) failed; first: {failures[0]}{more}; `ssl-bench status --results {sweep.out}` lists them")
    table = write_leaderboard(sweep)
    print(table if table is not None else "evals.leaderboard is not available: no leaderboard written")
    return 0
