"""How the suite runs numerically, in one place: the mixed-precision (autocast) policy and the seeding of
every random number generator. Used by pretraining, feature extraction, fine-tuning, the monitor and the
tokenizer's training, so they all follow the same rules."""
from __future__ import annotations

import contextlib
import random

import numpy as np
import torch

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
