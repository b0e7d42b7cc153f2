"""Cluster profiles: ``slurm/profiles/<cluster>.toml`` (keys in :data:`PROFILE_KEYS`), overridden with
``--slurm key=value`` and the explicit flags, validated into :class:`ClusterSettings`; and the launcher's
command-line options."""
from __future__ import annotations

import argparse
import os
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from ssl_bench.errors import UserError


LAUNCHERS = ("local", "slurm", "debug")
REPO_ROOT = Path(__file__).resolve().parents[2]
DEFAULT_CLUSTER = "local"

# profile key -> (type, default, help). Every key may be set in a profile, with --slurm key=value, and the
# common ones with a flag of their own (FLAG_KEYS).
PROFILE_KEYS: dict[str, tuple[type, Any, str]] = {
    "description": (str, "", "one line shown by `ssl-bench status`"),
    "partition": (str, "", "SLURM partition (empty: the cluster's default)"),
    "nodes": (int, 1, "nodes per job"),
    "gpus_per_node": (int, 0, "GPUs per node; one DDP process per GPU"),
    "tasks_per_node": (int, 0, "processes per node (0: one per GPU, at least 1)"),
    "cpus_per_task": (int, 1, "CPU cores per process"),
    "mem_gb": (float, 0.0, "memory per node in GB (0: the partition's default)"),
    "time": (str, "60", "time limit: minutes, HH:MM:SS or D-HH:MM:SS"),
    "account": (str, "", "SLURM account"),
    "constraint": (str, "", "node features, e.g. h100"),
    "qos": (str, "", "quality of service"),
    "max_requeue": (int, 3, "requeues after time-outs before giving up (preemptions are not counted)"),
    "signal_delay_s": (int, 90, "seconds between the time-out/preemption signal and the kill"),
    "setup": (list, [], "shell lines run before the job, e.g. ['module load cuda']"),
    "sbatch": (dict, {}, "any other sbatch option, e.g. {reservation = 'x', exclusive = true}"),
}
FLAG_KEYS = ("partition", "nodes", "gpus_per_node", "cpus_per_task", "mem_gb", "time", "account", "constraint", "qos")
PROFILE_SUFFIX = ".toml"


# -- command-line arguments -----------------------------------------------------------------------
def add_launcher_args(parser: argparse.ArgumentParser, default: str = "local") -> None:
    g = parser.add_argument_group("launcher", "where the work runs; SLURM settings come from slurm/profiles/<cluster>.toml")
    g.add_argument("--launcher", default=default, choices=LAUNCHERS,
                   help=f"local: this process; slurm: submit with submitit and wait; debug: submitit's in-process debug executor (default: {default})")
    g.add_argument("--cluster", default=None, metavar="NAME",
                   help=f"SLURM profile: slurm/profiles/NAME.toml, or a path to a .toml (default: $SSL_BENCH_CLUSTER or {DEFAULT_CLUSTER})")
    g.add_argument("--slurm", action="append", default=[], metavar="key=value",
                   help="override a profile key, e.g. --slurm time=120 --slurm sbatch.reservation=x (repeatable)")
    for key in FLAG_KEYS:
        typ, _, help_ = PROFILE_KEYS[key]
        g.add_argument(f"--{key.replace('_', '-')}", dest=f"slurm_{key}", type=typ, default=None, help=f"{help_} (overrides the profile)")
    g.add_argument("--no-wait", action="store_true", help="slurm: print the job id and log path and return at once")


# -- cluster profiles -----------------------------------------------------------------------------
def profile_dirs() -> list[Path]:
    """Where profiles are looked up: $SSL_BENCH_PROFILES (os.pathsep-separated), then the repo's slurm/profiles."""
    extra = [Path(p) for p in os.environ.get("SSL_BENCH_PROFILES", "").split(os.pathsep) if p]
    return [*extra, REPO_ROOT / "slurm" / "profiles"]


def available_profiles() -> list[str]:
    names = {p.stem for d in profile_dirs() if d.is_dir() for p in d.glob(f"*{PROFILE_SUFFIX}")}
    return sorted(names)


def find_profile(name: str) -> Path:
    if name.endswith(PROFILE_SUFFIX) or os.sep in name:
        path = Path(name)
        if not path.is_file():
            raise UserError(f"cluster profile file {path} not found; pass an existing .toml or a name from: {', '.join(available_profiles())}")
        return path
    for d in profile_dirs():
        if (d / f"{name}{PROFILE_SUFFIX}").is_file():
            return d / f"{name}{PROFILE_SUFFIX}"
    raise UserError(
        f"unknown cluster profile '{name}'; known profiles: {', '.join(available_profiles()) or 'none'} "
        f"(add slurm/profiles/{name}{PROFILE_SUFFIX}, or pass --cluster path/to/profile.toml)"
    )


def _coerce(key: str, value: Any, where: str) -> Any:
    if key.startswith("sbatch."):
        return value
    if key not in PROFILE_KEYS:
        raise UserError(f"unknown cluster setting '{key}' in {where}; valid keys: {', '.join(PROFILE_KEYS)} (or sbatch.<option>)")
    typ = PROFILE_KEYS[key][0]
    if typ is str and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if typ is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if not isinstance(value, typ) or isinstance(value, bool) and typ is not bool:
        raise UserError(f"cluster setting '{key}' in {where} must be {typ.__name__}, got {value!r}")
    if typ in (int, float) and value < 0:
        raise UserError(f"cluster setting '{key}' in {where} must be >= 0, got {value}")
    return value


def time_minutes(text: str) -> int:
    """'90' -> 90; '02:30:00' -> 150; '1-00:00:00' -> 1440 (SLURM's formats, rounded up to a minute)."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", str(text).strip())
    if not m:
        raise UserError(f"cluster setting time='{text}' is not minutes, HH:MM:SS or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if b is None and c is None and days is None:
        minutes = a
    elif c is None and days is None:  # MM:SS
        minutes, seconds = a, b
        minutes += seconds > 0
    else:  # [D-]HH[:MM[:SS]]
        minutes = (days or 0) * 1440 + a * 60 + (b or 0) + ((c or 0) > 0)
    if minutes <= 0:
        raise UserError(f"cluster setting time='{text}' must be at least one minute")
    return minutes


@dataclass
class ClusterSettings:
    name: str
    path: Path
    values: dict

    def __getitem__(self, key: str) -> Any:
        return self.values[key]

    @property
    def tasks_per_node(self) -> int:
        return self.values["tasks_per_node"] or max(1, self.values["gpus_per_node"])

    def describe(self) -> str:
        v = self.values
        parts = [f"cluster {self.name}", f"partition {v['partition'] or '(default)'}", f"{v['nodes']} node(s) x {self.tasks_per_node} task(s)"]
        if v["gpus_per_node"]:
            parts.append(f"{v['gpus_per_node']} GPU(s)/node")
        return ", ".join(parts)


def load_cluster(name: str | None = None, overrides: list[str] | tuple[str, ...] = (), flags: dict | None = None) -> ClusterSettings:
    """A profile with ``--slurm key=value`` overrides and then explicit flags applied, validated."""
    from ssl_bench.config import parse_value

    name = name or os.environ.get("SSL_BENCH_CLUSTER") or DEFAULT_CLUSTER
    path = find_profile(name)
    try:
        raw = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise UserError(f"cluster profile {path} is not valid TOML ({exc}); fix the file") from None
    except UnicodeDecodeError:
        raise UserError(f"cluster profile {path} is not UTF-8 text; save it as UTF-8 TOML") from None
    values = {k: (list(d) if isinstance(d, list) else dict(d) if isinstance(d, dict) else d) for k, (_, d, _) in PROFILE_KEYS.items()}
    for key, value in raw.items():
        values[key] = _coerce(key, value, str(path))
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--slurm '{item}' is not key=value (e.g. --slurm time=120 or --slurm sbatch.reservation=x)")
        key, text = (s.strip() for s in item.split("=", 1))
        value = _coerce(key, parse_value(text), "--slurm")
        if key.startswith("sbatch."):
            values["sbatch"] = {**values["sbatch"], key[len("sbatch."):]: value}
        else:
            values[key] = value
    for key, value in (flags or {}).items():
        if value is not None:
            values[key] = _coerce(key, value, f"--{key.replace('_', '-')}")
    time_minutes(values["time"])  # validate now, not at submission
    if values["nodes"] < 1:
        raise UserError(f"cluster setting nodes must be at least 1, got {values['nodes']}")
    return ClusterSettings(Path(name).stem if name.endswith(PROFILE_SUFFIX) else name, path, values)


def cluster_from_args(args: argparse.Namespace) -> ClusterSettings:
    flags = {k: getattr(args, f"slurm_{k}", None) for k in FLAG_KEYS}
    return load_cluster(getattr(args, "cluster", None), getattr(args, "slurm", []) or [], flags)
