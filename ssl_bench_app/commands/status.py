"""``ssl-bench status``: every job submitted under a directory (sweeps and single ``--launcher slurm``
jobs keep a jobs.json index), its SLURM state, its result and where its log is.

States come from squeue / scontrol (and sacct where SLURM keeps accounting); a job SLURM no longer
knows is COMPLETED or FAILED according to the JSON outcome file the job wrote in its folder (submitit's
result pickles there are never opened: unpickling a planted one would run its code)."""
from __future__ import annotations

from pathlib import Path


def register(sub) -> None:
    p = sub.add_parser("status", help="state and log path of submitted SLURM jobs", description=__doc__)
    p.add_argument("--results", default="results", metavar="DIR", help="directory searched (any depth) for jobs.json (default: results)")
    p.set_defaults(func=run)


def find_indexes(root: Path) -> list[Path]:
    from ssl_bench.errors import UserError
    from ssl_bench_app.launch import INDEX_NAME

    if root.is_file() and root.name == INDEX_NAME:
        return [root]
    if not root.is_dir():
        state = "is a file" if root.exists() else "does not exist"
        raise UserError(f"{root} {state}; pass --results DIR, the directory of a sweep or of submitted runs")
    found = sorted(root.rglob(INDEX_NAME))
    if not found:
        raise UserError(f"no {INDEX_NAME} under {root}: nothing was submitted there with `ssl-bench sweep` or `--launcher slurm`")
    return found


def _result(entry: dict) -> str:
    """What the job produced: the run's status and steps, or the evaluation's top-1."""
    from ssl_bench.errors import UserError
    from ssl_bench.records import read_json
    from ssl_bench.rundir import RECORD_NAME, eval_records, latest

    run_dir = Path(entry["run_dir"]) if entry.get("run_dir") else None
    if run_dir is None:
        return ""
    try:
        if entry.get("kind") == "eval":
            protocol = entry.get("protocol") or ""
            records = {p: read_json(p) for p in eval_records(run_dir)}
            found = latest({p: r for p, r in records.items() if r.get("protocol") == protocol})
            return f"top-1 {found[1]['top1']:.2f}%" if found else ""
        record = read_json(run_dir / RECORD_NAME)
        return f"{record.get('status')} ({record.get('steps', 0)}/{record.get('total_steps', '?')} steps)"
    except (UserError, KeyError, TypeError, ValueError):
        return ""


def collect_status(results: str | Path) -> list[dict]:
    from ssl_bench_app.launch import TERMINAL, job_outcome, read_index, slurm_states

    rows = []
    for index in find_indexes(Path(results)):
        for key, entry in read_index(index).items():
            rows.append({"index": index, "key": key, **entry})
    states = slurm_states([r["job_id"] for r in rows if r.get("job_id") and r.get("launcher") == "slurm"])
    for r in rows:
        jid = r.get("job_id")
        state = states.get(jid) if jid else None
        if jid and (state is None or state.split()[0] not in TERMINAL):
            # the job's outcome record is its last word (a requeued or preempted job leaves none), so it
            # wins over a SLURM state that has not caught up yet, or that SLURM no longer keeps
            outcome = job_outcome(Path(r["folder"]), jid)
            state = {"success": "COMPLETED", "error": "FAILED"}.get(outcome, state or "UNKNOWN")
        r["state"] = state or r.get("state", "-")
        r["result"] = _result(r)
    return rows


def format_status(rows: list[dict]) -> str:
    from tabulate import tabulate

    table = [[r["key"], r.get("job_id") or "-", r["state"], r["result"], r.get("log", "-")] for r in rows]
    counts: dict[str, int] = {}
    for r in rows:
        counts[r["state"]] = counts.get(r["state"], 0) + 1
    summary = ", ".join(f"{n} {s}" for s, n in sorted(counts.items()))
    return tabulate(table, headers=["job", "id", "state", "result", "log"], tablefmt="simple") + f"\n{len(rows)} jobs: {summary}"


def run(args) -> int:
    print(format_status(collect_status(args.results)))
    return 0
