"""``ssl-bench leaderboard --results DIR [--format md,csv,latex]``: tables + bar plot of every finished run under DIR."""
from __future__ import annotations


def register(sub) -> None:
    parser = sub.add_parser("leaderboard", help="aggregate run and eval records under a directory into tables and a plot")
    parser.add_argument("--results", required=True, metavar="DIR", help="directory searched (any depth) for run directories")
    parser.add_argument("--format", default="md,csv,latex", help="comma-separated: md, csv, latex (default: all)")
    parser.add_argument("--out", default=None, metavar="DIR", help="where to write leaderboard.* (default: --results)")
    parser.add_argument("--no-plot", action="store_true", help="skip leaderboard.png")
    parser.set_defaults(func=run)


def run(args) -> int:
    from evals.leaderboard import parse_formats, to_markdown, write_leaderboard

    formats = parse_formats(args.format)
    lb, written = write_leaderboard(args.results, formats, out_dir=args.out, plot=not args.no_plot)
    print(to_markdown(lb))
    print("wrote " + ", ".join(str(p) for p in written))
    return 0
