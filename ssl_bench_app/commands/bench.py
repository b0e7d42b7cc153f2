"""``ssl-bench bench``: the main job. Pretrain every registered method on one data set, evaluate each run
with every protocol, and write the leaderboard under RESULTS/<data>-<preset>/. A rerun skips what finished."""
from __future__ import annotations

from ssl_bench_app.launch import add_launcher_args


def register(sub) -> None:
    from ssl_bench_app.sweep import add_grid_args

    p = sub.add_parser("bench", help="pretrain + evaluate every method, then the leaderboard (the main job)", description=__doc__)
    p.add_argument("--methods", default=None, help="comma-separated method names (default: every registered method)")
    p.add_argument("--protocols", default=None, help="comma-separated evaluation protocols (default: every registered protocol, plug-ins included)")
    p.add_argument("--results", default="results", metavar="DIR", help="results root; the benchmark writes DIR/<data>-<preset>/ (default: results)")
    add_grid_args(p)
    add_launcher_args(p, default="local")
    p.set_defaults(func=run)


def run(args) -> int:
    from ssl_bench_app.bench import run_bench

    return run_bench(args)
