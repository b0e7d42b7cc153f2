"""How the suite runs numerically, in one place: the mixed-precision (autocast) policy, the seeding and
saving of every random number generator, and when and how code is compiled. Used by pretraining, feature
extraction, fine-tuning, the monitor, the data path and the tokenizer's training, so they all follow the
same rules."""
from __future__ import annotations

import contextlib
import random
import sys

import numpy as np
import torch

from ssl_bench.checkpoint import numpy_state_from_plain, python_state_from_plain, rng_state_to_plain
from ssl_bench.config import AMP_CHOICES



def autocast(device: torch.device, amp: str = "auto"):
    """bf16 autocast on CUDA (``auto``) or wherever asked (``bf16``); full precision otherwise (``none``,
    or ``auto`` on a CPU, where bf16 is slower and less accurate). A fresh context manager per call."""
    if amp not in AMP_CHOICES:
        raise ValueError(f"amp must be one of {AMP_CHOICES}, got {amp!r}")  # configs are checked before this
    if amp == "bf16" or (amp == "auto" and device.type == "cuda"):
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def seed_everything(seed: int) -> None:
    """Seed Python's, numpy's and torch's global generators (CUDA's too, through torch.manual_seed)."""
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def rng_state() -> dict:
    """Every RNG state, as tensors and plain values (a checkpoint loads with weights_only=True)."""
    return rng_state_to_plain({
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None,
        "numpy": np.random.get_state(),
        "python": random.getstate(),
    })


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if state.get("cuda") is not None and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np.random.set_state(numpy_state_from_plain(state["numpy"]))
    random.setstate(python_state_from_plain(state["python"]))


def use_compile(setting, preset: str | None, device: torch.device) -> bool:
    """``train.compile``: true, false, or auto (GPU runs of the full preset)."""
    return setting is True or (setting == "auto" and preset == "full" and device.type == "cuda")


def compiled_step(model, cfg: dict, device: torch.device):
    """``model`` as the run's config says to run a training step: through ``CompiledOrEager`` with
    ``train.compile_mode`` where ``train.compile`` is on (``use_compile``), else as it is."""
    train = cfg["train"]
    if not use_compile(train["compile"], cfg.get("preset"), device):
        return model
    mode = train.get("compile_mode", "default")  # (runs from before the key: default)
    return CompiledOrEager(model, **({} if mode == "default" else {"mode": mode}))


class CompiledOrEager:
    """``torch.compile(fn)``; if compiling fails at the first call, says so in one line and runs the eager
    ``fn`` instead (with the RNG state it had before the attempt, so the run stays reproducible).
    ``what``: what the fallback does, for that line (e.g. "training", "making views")."""

    def __init__(self, fn, what: str = "training", **compile_kwargs):
        self.eager, self.compiled, self.proven, self.what = fn, torch.compile(fn, **compile_kwargs), False, what

    def __call__(self, *args, **kwargs):
        if self.compiled is None or self.proven:
            return (self.eager if self.compiled is None else self.compiled)(*args, **kwargs)  # no `or`: a compiled module has no bool()
        state = rng_state()
        try:
            out = self.compiled(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - any compiler failure falls back to eager
            detail = (str(exc).strip().splitlines() or [""])[0][:200]
            print(f"ssl-bench: torch.compile failed ({exc.__class__.__name__}: {detail}); {self.what} without compilation "
                  f"(train.compile=false skips the attempt)", file=sys.stderr, flush=True)
            self.compiled = None
            set_rng_state(state)
            return self.eager(*args, **kwargs)
        self.proven = True
        return out

    def no_sync(self):
        return self.eager.no_sync()

    @property
    def fell_back(self) -> bool:
        """Whether compiling failed and the eager ``fn`` runs instead."""
        return self.compiled is None


def compiled_or_not(step) -> bool | None:
    """What ``compiled_step`` gave: True for a compiled step, False for one whose compilation failed (it runs
    eagerly), None where compiling was not asked for."""
    return (not step.fell_back) if isinstance(step, CompiledOrEager) else None
