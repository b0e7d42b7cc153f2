"""Checkpoints: written atomically, read without running code (``ssl_bench.safe_load``), checked against
the architecture they are loaded into.

A checkpoint holds only tensors and plain values: the RNG states are stored as tensors, ints, floats and
lists (``rng_state_to_plain``), so ``torch.load(weights_only=True)`` reads every part of it. Checkpoints of
earlier versions of the suite stored numpy's RNG state as a pickled numpy array; they still load (numpy's
array constructor is the only object they may name) and ``ssl-bench convert-checkpoint`` rewrites them.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from ssl_bench.atomic import atomic_write
from ssl_bench.backbone import ViTBackbone, build_encoder
from ssl_bench.errors import UserError
from ssl_bench.rundir import CHECKPOINT_NAME, RECORD_NAME, read_run  # noqa: F401 (names used by callers)
from ssl_bench.safe_load import UnsafeFileError, load_torch_file



def save_checkpoint(path: str | Path, state: dict) -> None:
    """Atomic (ssl_bench.atomic): a failed write (full disk) keeps the previous checkpoint."""
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; has the run saved one yet (train.ckpt_every)?")
    ckpt = load_torch_file(path, "checkpoint", "rerun or resume from an intact copy", allow=LEGACY_NUMPY_GLOBALS,
                           unsafe_hint=f"; if it is an ssl-bench checkpoint you trust: ssl-bench convert-checkpoint --trust {path}")
    if not isinstance(ckpt, dict):
        raise UserError(f"checkpoint {path} holds a {type(ckpt).__name__}, not an ssl-bench checkpoint; rerun or resume from an intact copy")
    if ckpt.get("rng") is not None:
        ckpt["rng"] = rng_state_to_plain(ckpt["rng"])  # an earlier version's numpy/python tuples
    return ckpt


# Checkpoints of earlier versions hold numpy's RNG key as a pickled uint32 array: allowing numpy's array
# and dtype constructors (under their numpy 2 and numpy 1 names) reads them and nothing else.
LEGACY_NUMPY_GLOBALS = (
    np._core.multiarray._reconstruct,
    (np._core.multiarray._reconstruct, "numpy.core.multiarray._reconstruct"),
    np.ndarray,
    np.dtype,
    type(np.dtype(np.uint32)),  # numpy.dtypes.UInt32DType: the key's dtype, rebuilt by its __setstate__
)


def rng_state_to_plain(state):
    """A trainer RNG state (or a list of them, one per rank) with numpy's and Python's states as plain
    values; states already plain pass through unchanged."""
    if isinstance(state, list):
        return [rng_state_to_plain(s) for s in state]
    state = dict(state)
    if isinstance(state.get("numpy"), tuple):  # np.random.get_state()
        bit_generator, key, pos, has_gauss, cached_gaussian = state["numpy"]
        state["numpy"] = {"bit_generator": str(bit_generator), "key": torch.from_numpy(np.asarray(key, dtype=np.int64)),
                          "pos": int(pos), "has_gauss": int(has_gauss), "cached_gaussian": float(cached_gaussian)}
    if isinstance(state.get("python"), tuple):  # random.getstate()
        version, internal, gauss_next = state["python"]
        state["python"] = {"version": int(version), "state": [int(v) for v in internal], "gauss_next": gauss_next}
    return state


def numpy_state_from_plain(state: dict) -> tuple:
    """The argument of ``np.random.set_state`` from ``rng_state_to_plain``'s form."""
    key = state["key"].numpy() if isinstance(state["key"], torch.Tensor) else np.asarray(state["key"])
    return (state["bit_generator"], key.astype(np.uint32), state["pos"], state["has_gauss"], state["cached_gaussian"])


def python_state_from_plain(state: dict) -> tuple:
    """The argument of ``random.setstate`` from ``rng_state_to_plain``'s form."""
    return (state["version"], tuple(state["state"]), state["gauss_next"])


def convert_checkpoint(path: str | Path, trust: bool = False, say=print) -> Path | None:
    """Rewrite a checkpoint of an earlier version in the current format (tensors and plain values only),
    keeping the original beside it as ``checkpoint.pt.bak`` (or ``.bak-1``, ...); returns the backup, or None
    when the file is current already. A file that names Python objects beyond the legacy numpy RNG array is
    unpickled (which runs whatever code it holds) only with ``trust``."""
    path = Path(path)
    if path.is_dir():
        path = path / CHECKPOINT_NAME
    if not path.is_file():
        raise UserError(f"checkpoint {path} not found; pass a checkpoint.pt or the run directory holding one")
    try:
        ckpt = load_torch_file(path, "checkpoint", "it cannot be converted")
        if not isinstance(ckpt, dict) or not _legacy_rng(ckpt.get("rng")):
            say(f"{path} is in the current format already; nothing to convert")
            return None
    except UnsafeFileError as exc:
        legacy = {name for g in LEGACY_NUMPY_GLOBALS for name in ([g[1]] if isinstance(g, tuple) else [f"{g.__module__}.{g.__qualname__}"])}
        if set(exc.names) <= legacy:
            ckpt = load_checkpoint(path)
        elif not trust:
            raise UserError(f"checkpoint {path} names Python objects ({', '.join(exc.names[:5])}) that loading it would run; "
                            f"if you trust where it came from: ssl-bench convert-checkpoint --trust {path}") from None
        else:
            say(f"unpickling {path} because --trust was given: this runs any code the file holds")
            ckpt = torch.load(path, map_location="cpu", weights_only=False)  # the one unpickling, asked for by name
    ckpt = _plain(ckpt, str(path))
    ckpt["rng"] = rng_state_to_plain(ckpt["rng"]) if ckpt.get("rng") is not None else None
    backup = next(p for p in (path.with_name(f"{path.name}.bak{f'-{i}' if i else ''}") for i in range(1000)) if not p.exists())
    shutil.copy2(path, backup)
    save_checkpoint(path, ckpt)
    load_torch_file(path, "converted checkpoint", f"restore it from {backup}")  # it now loads with weights_only=True
    say(f"converted {path} to the safe format; the original is kept as {backup}")
    return backup


def _legacy_rng(state) -> bool:
    """Whether a trainer RNG state (or a list of them) holds an earlier version's numpy / python tuples."""
    states = state if isinstance(state, list) else [state]
    return any(isinstance(s, dict) and (isinstance(s.get("numpy"), tuple) or isinstance(s.get("python"), tuple)) for s in states)


def _plain(obj, where: str):
    """``obj`` with numpy values as tensors / Python numbers, paths as strings; anything else that is not a
    tensor or a plain value cannot be stored safely and is refused."""
    if isinstance(obj, (torch.Tensor, str, bytes, int, float, bool, type(None))):
        return obj
    if isinstance(obj, dict):
        return {k: _plain(v, where) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        items = [_plain(v, where) for v in obj]
        return items if isinstance(obj, list) else tuple(items)
    if isinstance(obj, np.ndarray) and obj.dtype != object:
        return torch.from_numpy(np.array(obj))
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, os.PathLike):
        return os.fspath(obj)
    raise UserError(f"checkpoint {where} holds a {type(obj).__module__}.{type(obj).__qualname__}, which is not weights nor a plain value; "
                    f"it cannot be converted")


def check_signature(saved: dict, expected: dict, path: str | Path) -> None:
    """A checkpoint of another architecture must not be loaded (nor silently half-loaded)."""
    diff = {k: (saved.get(k), expected.get(k)) for k in {**saved, **expected} if saved.get(k) != expected.get(k)}
    if diff:
        parts = ", ".join(f"{k}: checkpoint {a!r} vs this run {b!r}" for k, (a, b) in diff.items())
        raise UserError(f"checkpoint {path} is from another architecture ({parts}); use a matching config or another checkpoint")


def load_encoder(run_dir: str | Path) -> tuple[ViTBackbone, dict]:
    """The pretrained encoder of a finished run, in eval mode, and the run record."""
    record = read_run(run_dir)
    path = Path(run_dir) / CHECKPOINT_NAME
    ckpt = load_checkpoint(path)
    if not isinstance(ckpt.get("signature"), dict) or not isinstance(ckpt.get("encoder"), dict):
        raise UserError(f"checkpoint {path} has no encoder weights; it was not written by ssl-bench pretrain")
    if ckpt.get("method") != record.get("method"):
        raise UserError(f"checkpoint {path} is of a {ckpt.get('method')} run, but {RECORD_NAME} beside it records {record.get('method')}; "
                        f"the run directory mixes two runs: put back its own checkpoint")
    if isinstance(record.get("arch"), dict):
        check_signature(ckpt["signature"], record["arch"], path)
    broken = [k for k, v in ckpt["encoder"].items() if isinstance(v, torch.Tensor) and v.is_floating_point() and not torch.isfinite(v).all()]
    if broken:  # its features would be NaN: any score of them means nothing
        raise UserError(f"checkpoint {path} holds non-finite encoder weights ({broken[0]}{' and more' if len(broken) > 1 else ''}); "
                        f"the run diverged: rerun it (a lower train.blr, or train.clip_grad)")
    try:
        encoder = build_encoder(ckpt["signature"])
        encoder.load_state_dict(ckpt["encoder"])
    except UserError:
        raise
    except (TypeError, ValueError, KeyError, RuntimeError) as exc:  # a signature or weights that do not describe an encoder
        raise UserError(f"checkpoint {path} is corrupt: its encoder weights do not fit its own description ({exc.__class__.__name__}); "
                        f"rerun or resume from an intact copy") from None
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
