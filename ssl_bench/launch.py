"""Where a command's work runs: in this process (``local``), or submitted through submitit.

Every command that does heavy work (pretrain, eval, bench) goes through :func:`run_job`, so adding a
launcher changes no command.
"""
from __future__ import annotations

import argparse
from typing import Any, Callable

LAUNCHERS = ("local",)


def add_launcher_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--launcher", default="local", choices=LAUNCHERS, help="where to run (default: this process)")


def run_job(args: argparse.Namespace, fn: Callable[..., Any], *fn_args: Any, name: str = "ssl-bench", log_dir: str | None = None, **fn_kwargs: Any) -> Any:
    """Run ``fn(*fn_args, **fn_kwargs)`` with the launcher ``args.launcher`` and return its result."""
    return fn(*fn_args, **fn_kwargs)
