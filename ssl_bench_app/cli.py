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


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
