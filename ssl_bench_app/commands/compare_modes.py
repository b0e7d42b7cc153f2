"""``ssl-bench compare-modes --results DIR``: how the ranking of methods moves between two modes of the
probes (default: fast -> official), per protocol, from the eval records under DIR."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("compare-modes", help="ranking shift of methods between two probe modes (fast vs official)", description=__doc__)
    parser.add_argument("--results", required=True, metavar="DIR", help="directory searched (any depth) for run directories")
    parser.add_argument("--modes", default="fast,official", help="two modes, before,after (default: fast,official)")
    parser.set_defaults(func=run)


def run(args) -> int:
    from evals.leaderboard import collect
    from evals.modes import format_shift, ranking_shift
    from evals.run import parse_modes
    from ssl_bench.config import comma_list
    from ssl_bench.errors import UserError

    modes = comma_list(args.modes)
    if len(modes) != 2:
        raise UserError(f"--modes takes two different modes, before,after (e.g. fast,official); got {args.modes!r}")
    modes = parse_modes(modes)
    lb = collect(args.results)
    print(format_shift(ranking_shift(lb, *modes), *modes))
    for note in lb.notes:  # records left out (unreadable, stale, superseded), as the leaderboard lists them
        print(f"note: {note}")
    return 0
