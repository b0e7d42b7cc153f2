"""``ssl-bench bench``: the main job. Pretrain every registered method on one data set, evaluate each run
with every protocol, and write the leaderboard under RESULTS/<data>-<preset>/. A rerun skips what finished."""
from __future__ import annotations

from ssl_bench.launch import add_launcher_args


def register(sub) -> None:
    from ssl_bench.bench import DEFAULT_PROTOCOLS

    p = sub.add_parser("bench", help="pretrain + evaluate every method, then the leaderboard (the main job)", description=__doc__)
    p.add_argument("--preset", default="quick", help="smoke | quick | full, for pretraining and evaluation (default: quick)")
    p.add_argument("--data", default="fashion_mnist", help="data set for pretraining and evaluation (default: fashion_mnist)")
    p.add_argument("--data-root", default=None, help="where the data set lives (default: its standard location)")
    p.add_argument("--methods", default=None, help="comma-separated method names (default: every registered method)")
    p.add_argument("--seeds", default="0", help="comma-separated pretraining seeds (default: 0)")
    p.add_argument("--protocols", default=DEFAULT_PROTOCOLS, help=f"comma-separated evaluation protocols (default: {DEFAULT_PROTOCOLS})")
    p.add_argument("--results", default="results", metavar="DIR", help="results root; the benchmark writes DIR/<data>-<preset>/ (default: results)")
    p.add_argument("--eval-override", action="append", default=[], metavar="protocol.key=value",
                   help="evaluation preset override, e.g. --eval-override finetune.epochs=2 (repeatable)")
    p.add_argument("overrides", nargs="*", metavar="key=value", help="pretraining config overrides for every run, e.g. train.epochs=1")
    add_launcher_args(p, default="local")
    p.set_defaults(func=run)


def run(args) -> int:
    from ssl_bench.bench import run_bench

    return run_bench(args)
