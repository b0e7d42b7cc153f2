"""``ssl-bench eval``: evaluate a pretrained run with kNN, linear and attentive probes and fine-tuning;
one record per protocol in RUN_DIR/evals/<protocol>-<data>-<preset>.json (never overwritten)."""
from __future__ import annotations

from pathlib import Path

from ssl_bench_app.launch import add_launcher_args, run_job


def register(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a pretrained run (knn, linear, attentive, finetune)", description=__doc__)
    p.add_argument("--run", required=True, metavar="RUN_DIR", help="the --out directory of `ssl-bench pretrain`")
    p.add_argument("--protocol", default="knn,linear,attentive", help="comma-separated protocols: knn,linear,attentive,finetune or a plug-in's (default: knn,linear,attentive)")
    p.add_argument("--data", default=None, help="evaluation data set (default: the one the run was pretrained on)")
    p.add_argument("--data-root", default=None, help="where the data set lives (default: its standard location)")
    p.add_argument("--preset", default="quick", help="smoke | quick | standard | full (default: quick)")
    p.add_argument("--mode", default=None, help="official | fast | fast,official: the probes' mode(s), one record each "
                   "(default: the preset's, official); fine-tuning runs once whatever the mode")
    p.add_argument("overrides", nargs="*", metavar="protocol.key=value", help="eval preset overrides, e.g. linear.epochs=50 features.cache_mb=0")
    add_launcher_args(p)
    p.set_defaults(func=run)


def summary(record: dict, path: Path) -> str:
    chosen = ", ".join(f"{k}={v}" for k, v in record["selected"].items())
    ci = record.get("ci95") or []
    interval = f" [{ci[0]:.2f}, {ci[1]:.2f}]" if len(ci) == 2 and all(isinstance(x, (int, float)) for x in ci) else ""
    warned = f"  WARNING: {'; '.join(record['warnings'])}" if record.get("warnings") else ""
    return (f"{record['protocol']:<9} {record.get('mode') or '-':<8} {record['data']} ({record['preset']}): top-1 {record['top1']:.2f}%{interval}  "
            f"[{chosen}]  {record['wall_time_s']:.0f}s  -> {path}{warned}")


def run(args) -> int:
    from evals.presets import resolve_eval_config
    from evals.run import evaluate, parse_modes, parse_protocols
    from ssl_bench.rundir import LOGS_DIR, read_run
    from ssl_bench.records import read_json

    # Fail fast on bad input, before anything is submitted or computed.
    protocols = parse_protocols(args.protocol)
    modes = parse_modes(args.mode)
    resolve_eval_config(args.preset, args.overrides)
    read_run(args.run)
    paths = run_job(
        args, evaluate, args.run, protocols, args.data, args.data_root, args.preset, args.overrides, modes,
        name=f"eval-{Path(args.run).name}", log_dir=str(Path(args.run) / LOGS_DIR), run_dir=args.run,
    )
    for path in paths or []:
        print(summary(read_json(path), Path(path)))
    return 0
