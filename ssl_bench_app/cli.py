"""``ssl-bench``: one entry point; each sub-command lives in ``ssl_bench_app/commands/<name>.py`` and
exposes ``register(subparsers)``, which adds its parser and sets ``func`` (args -> exit code)."""
from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ssl_bench.errors import TrainingDiverged, UserError, one_line


def build_parser() -> argparse.ArgumentParser:
    import ssl_bench_app.commands as commands

    parser = argparse.ArgumentParser(prog="ssl-bench", description="Unified benchmark for self-supervised ViT pretraining.")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for info in sorted(pkgutil.iter_modules(commands.__path__), key=lambda i: i.name):
        importlib.import_module(f"ssl_bench_app.commands.{info.name}").register(sub)
    return parser


def parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """``parser.parse_args``, except that a command's ``key=value`` overrides may also come after its options
    (``--out DIR a=1 --seed 0 b=2``: argparse alone stops at the first option), and an option given an empty
    value is refused rather than taken as "not given"."""
    args, extra = parser.parse_known_args(argv)
    if extra:
        if not hasattr(args, "overrides") or any(e.startswith("-") or "=" not in e for e in extra):
            parser.error(f"unrecognized arguments: {' '.join(extra)}")
        args.overrides = [*args.overrides, *extra]
    for name, value in vars(args).items():
        if value == "" or isinstance(value, list) and "" in value:
            what = "an override" if name == "overrides" else f"--{name.replace('_', '-')}"
            parser.error(f"{what} is empty; give it a value or leave it out")
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parse(parser, argv)
    try:
        return int(args.func(args) or 0)
    except (UserError, TrainingDiverged) as exc:
        print(f"ssl-bench: error: {one_line(exc)}", file=sys.stderr)
        return 2 if isinstance(exc, UserError) else 3
    except KeyboardInterrupt:
        print("ssl-bench: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
