"""Machine-readable run records: written atomically, never overwriting an earlier result."""
from __future__ import annotations

import hashlib
import json
import math
import os
import platform
import subprocess
import time
from pathlib import Path
from typing import Any

CONTROL_FAMILY = "control"  # run.json "family" of baselines that are not trained (random_init); tables list them last

from ssl_bench.atomic import atomic_write
from ssl_bench.errors import UserError


def _jsonable(obj: Any) -> Any:
    if isinstance(obj, dict):
        return {str(k): _jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_jsonable(v) for v in obj]
    if isinstance(obj, float) and not math.isfinite(obj):
        return str(obj)  # JSON has no NaN/inf; keep the fact as text
    if isinstance(obj, Path):
        return str(obj)
    if hasattr(obj, "item") and callable(obj.item):  # numpy / torch scalars
        return _jsonable(obj.item())
    return obj


def json_bytes(obj: Any) -> bytes:
    """The JSON text records are written as (NaN/inf and numpy/torch scalars made JSON-safe)."""
    return (json.dumps(_jsonable(obj), indent=2, sort_keys=False) + "\n").encode()


def write_json_atomic(path: str | Path, obj: Any) -> Path:
    """Write (or replace) ``path`` atomically: readers see the old file or the new one, never half."""
    data = json_bytes(obj)
    return atomic_write(path, lambda f: f.write(data))


def write_json_new(directory: str | Path, stem: str, obj: Any) -> Path:
    """Write ``directory/stem.json`` atomically; if it exists, ``stem-1.json``, ``stem-2.json``, ...

    Never replaces an existing file (a hard link fails if the target exists), so two runs writing at
    once both keep their records.
    """
    directory = Path(directory)
    data = json_bytes(obj)
    names = (directory / (f"{stem}.json" if i == 0 else f"{stem}-{i}.json") for i in range(10_000))
    return atomic_write(directory / f"{stem}.json", lambda f: f.write(data), new_names=names)


def read_json(path: str | Path) -> dict:
    """A record (a JSON object) written by this suite; one line for a missing, unreadable or malformed file."""
    path = Path(path)
    try:
        with open(path) as f:
            record = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found; is this a run directory written by `ssl-bench pretrain`?") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise UserError(f"{path} is corrupt ({exc.__class__.__name__}: {exc}); rerun the step that wrote it") from None
    except OSError as exc:
        raise UserError(f"cannot read {path}: {exc.strerror}; is this a run directory written by `ssl-bench pretrain`?") from None
    if not isinstance(record, dict):
        raise UserError(f"{path} is corrupt (a JSON {type(record).__name__}, not a record); rerun the step that wrote it")
    return record


def git_commit() -> str | None:
    """The commit of the ssl-bench checkout in use (with '-dirty' if it has local changes), if any."""
    repo = Path(__file__).resolve().parent.parent
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=5)
        if sha.returncode != 0:
            return None
        dirty = subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=5)
        return sha.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        return None


def hardware() -> dict:
    """What the run ran on: CPU model and cores, GPUs, and the library versions that matter."""
    import timm
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu)
    except OSError:
        pass
    gpus = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())] if torch.cuda.is_available() else []
    return {
        "cpu": cpu,
        "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "gpus": gpus,
        "host": platform.node(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "summary": f"{len(gpus)}x {gpus[0]}" if gpus else f"CPU: {cpu} ({os.cpu_count()} cores)",
    }


def file_sha256(path: str | Path, chunk: int = 1 << 22) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            digest.update(block)
    return digest.hexdigest()


def now_iso() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S%z")
