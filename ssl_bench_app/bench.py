"""The one-command benchmark: every registered method pretrained on one data set at one preset, each
run evaluated with every protocol, one leaderboard.

    RESULTS/<data>-<preset>/<method>-s<seed>/     run directories: run.json, checkpoint.pt, evals/*.json
    RESULTS/<data>-<preset>/leaderboard.{md,csv,tex,png}

The benchmark is a sweep (``ssl_bench_app.sweep``) with the benchmark's defaults: all registered methods, all
registered protocols (the eval preset of the same name), this process as the launcher, and a results
directory named by data set and preset. Like a sweep, a rerun skips what already finished (runs whose
run.json says finished, evaluations with a record under the same protocol settings), resumes interrupted runs from their
checkpoint, and never overwrites a record. At the end it prints the leaderboard and what each step cost.
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from ssl_bench.records import read_json
from ssl_bench.rundir import RECORD_NAME, eval_records


def bench_dir(results: str | Path, data: str, preset: str) -> Path:
    return Path(results) / f"{data}-{preset}"


def cost_table(out: Path) -> str:
    """Seconds spent per run: pretraining and each evaluation, from the records (all invocations)."""
    from tabulate import tabulate

    from evals.registry import protocol_order
    from ssl_bench.errors import UserError

    rows, protocols = [], set()
    for record_path in sorted(out.glob(f"*/{RECORD_NAME}")):
        try:
            record = read_json(record_path)
            evals: dict[str, float] = {}
            for path in eval_records(record_path.parent):
                ev = read_json(path)
                name = ev.get("protocol", path.stem)
                evals[name] = evals.get(name, 0.0) + float(ev.get("wall_time_s") or 0.0)
        except UserError:  # a torn record: the leaderboard notes it; costs are best effort
            continue
        protocols |= set(evals)
        rows.append((record_path.parent.name, record.get("status"), record.get("wall_time_s"), evals))
    if not rows:
        return "no runs yet"
    order = sorted(protocols, key=lambda p: (protocol_order(p), p))
    table = [
        [name, status, f"{pre:.0f}" if isinstance(pre, (int, float)) else "-"]
        + [f"{evals[p]:.0f}" if p in evals else "-" for p in order]
        + [f"{(pre or 0) + sum(evals.values()):.0f}"]
        for name, status, pre, evals in rows
    ]
    total = sum((pre or 0) + sum(evals.values()) for _, _, pre, evals in rows)
    return (
        tabulate(table, headers=["run", "status", "pretrain s", *[f"{p} s" for p in order], "total s"], tablefmt="github", disable_numparse=True)
        + f"\nsum over runs: {total / 60:.1f} min of pretraining and evaluation"
    )


def run_bench(args: argparse.Namespace) -> int:
    """``ssl-bench bench``: plan, run (or submit) through the sweep machinery, then report."""
    from evals.registry import protocol_names
    from ssl_bench.registry import available_methods
    from ssl_bench_app.sweep import DEFAULT_SEEDS, run_sweep

    out = bench_dir(args.results, args.data, args.preset)
    sweep_args = argparse.Namespace(**{
        **vars(args),
        "methods": args.methods or ",".join(available_methods()),
        "protocols": args.protocols or ",".join(protocol_names()),
        "out": str(out),
        "eval_override": list(args.eval_override),
        "overrides": list(args.overrides),
    })
    print(f"ssl-bench bench: preset {args.preset}, data {args.data}, methods {sweep_args.methods}, seeds {args.seeds or DEFAULT_SEEDS.get(args.preset, '0')}, "
          f"protocols {sweep_args.protocols} -> {out}", flush=True)
    start = time.perf_counter()
    code = run_sweep(sweep_args)
    elapsed = time.perf_counter() - start
    print("\ncost per run (seconds, from the run and eval records):")
    print(cost_table(out))
    print(f"this invocation: {elapsed / 60:.1f} min wall-clock (finished steps are skipped on a rerun)")
    return code
