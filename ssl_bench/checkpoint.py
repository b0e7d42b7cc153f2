"""Checkpoints: written atomically, checked against the architecture they are loaded into."""
from __future__ import annotations

from pathlib import Path

import torch

from ssl_bench.atomic import atomic_write
from ssl_bench.backbone import ViTBackbone, build_encoder
from ssl_bench.errors import UserError
from ssl_bench.records import read_json

CHECKPOINT_NAME = "checkpoint.pt"
RECORD_NAME = "run.json"


def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomic (ssl_bench.atomic): a failed write (full disk) keeps the previous checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; has the run saved one yet (train.ckpt_every)?")
    try:
        return torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # torch raises many types for truncated/garbled files
        raise UserError(f"checkpoint {path} is corrupt or unreadable ({exc.__class__.__name__}); rerun or resume from an intact copy") from None


def check_signature(saved: dict, expected: dict, path: str | Path) -> None:
    """A checkpoint of another architecture must not be loaded (nor silently half-loaded)."""
    diff = {k: (saved.get(k), expected.get(k)) for k in {**saved, **expected} if saved.get(k) != expected.get(k)}
    if diff:
        parts = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
        raise UserError(f"checkpoint {path} is from another architecture ({parts}); use a matching config or another checkpoint")


def read_run(run_dir: str | Path) -> dict:
    """The run record of a finished run directory; one clear error for anything else."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise UserError(f"run directory {run_dir} does not exist; pass the --out directory of `ssl-bench pretrain`")
    record = read_json(run_dir / RECORD_NAME)
    if record.get("status") != "finished":
        raise UserError(f"run {run_dir} has status '{record.get('status')}', not finished; resume it with `ssl-bench pretrain --resume --out {run_dir}`")
    return record


def load_encoder(run_dir: str | Path) -> tuple[ViTBackbone, dict]:
    """The pretrained encoder of a finished run, in eval mode, and the run record."""
    record = read_run(run_dir)
    path = Path(run_dir) / CHECKPOINT_NAME
    ckpt = load_checkpoint(path)
    sig = ckpt.get("signature")
    if not sig or "encoder" not in ckpt:
        raise UserError(f"checkpoint {path} has no encoder weights; it was not written by ssl-bench pretrain")
    encoder = build_encoder(sig)
    encoder.load_state_dict(ckpt["encoder"])
    return encoder.eval(), record


def load_method(run_dir: str | Path):
    """The whole pretrained method (encoder, heads, decoders) of a finished run, and the run record."""
    from ssl_bench.build import build_method
    from ssl_bench.data.datasets import DatasetInfo

    record = read_run(run_dir)
    path = Path(run_dir) / CHECKPOINT_NAME
    ckpt = load_checkpoint(path)
    method = build_method(record["config"], DatasetInfo(**record["data_info"]))
    check_signature(ckpt["signature"], method.encoder.signature(), path)
    method.load_state_dict(ckpt["model"])
    return method.eval(), record
