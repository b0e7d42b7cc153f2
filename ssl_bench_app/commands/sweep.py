"""``ssl-bench sweep``: pretrain methods x seeds and evaluate each run with several protocols, then write
the leaderboard. On SLURM (the default launcher) pretraining is one job array and each evaluation a job
that waits for its run; a rerun skips what already finished."""
from __future__ import annotations

from ssl_bench_app.launch import add_launcher_args


def register(sub) -> None:
    from ssl_bench_app.sweep import add_grid_args

    p = sub.add_parser("sweep", help="pretrain + evaluate methods x seeds (SLURM job array), then the leaderboard", description=__doc__)
    p.add_argument("--methods", required=True, help="comma-separated method names, e.g. mae,simsiam")
    p.add_argument("--protocols", default="knn,linear", help="comma-separated evaluation protocols (default: knn,linear)")
    p.add_argument("--out", default=None, metavar="DIR", help="sweep directory (default: results/sweep-<data>-<preset>)")
    add_grid_args(p)
    add_launcher_args(p, default="slurm")
    p.set_defaults(func=run)


def run(args) -> int:
    from ssl_bench_app.sweep import run_sweep

    return run_sweep(args)
