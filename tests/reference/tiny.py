"""Tiny models with fixed weights and fixed inputs, shared by the reference tests and by the script that
ran the official code on the same weights (see docs/fidelity.md).

The weights are not any method's init: every parameter is filled from a generator seeded by its own
name, so the values depend neither on the order of construction nor on an init scheme, and the official
model can be given exactly the same numbers by a name map. Fixed position embeddings are left to each
implementation (comparing them is part of the check).
"""
from __future__ import annotations

import json
import math
import zlib
from pathlib import Path

import torch
from torch import nn

from ssl_bench.backbone import ViTBackbone
from ssl_bench.registry import get_method

OFFICIAL_NUMBERS = Path(__file__).with_name("official_numbers.json")
# 32x32 RGB (the official patchify and MoCo's patch init assume 3 channels), 8x8 patches: 16 patches.
TINY_VIT = {"arch": "vit_tiny", "img_size": 32, "patch_size": 8, "in_chans": 3, "embed_dim": 32, "depth": 2, "num_heads": 2}
BATCH = 8


def _generator(name: str, seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))


def fill_deterministic_(module: nn.Module, seed: int = 0) -> None:
    """Every parameter (but fixed position embeddings) from its own seeded uniform: matrices in the
    xavier range, norm weights near 1, biases and tokens near 0."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("pos_embed"):
                continue
            u = torch.rand(p.shape, generator=_generator(name, seed)) * 2 - 1  # U(-1, 1)
            if p.ndim >= 2 and not name.endswith("_token"):
                fan_out, fan_in = p.shape[0], p[0].numel()
                p.copy_(u * math.sqrt(6.0 / (fan_in + fan_out)))
            elif p.ndim == 1 and name.endswith("weight"):
                p.copy_(1.0 + 0.2 * u)
            else:
                p.copy_(0.1 * u)


def tiny_method(name: str, seed: int = 0, **options) -> nn.Module:
    """Method ``name`` on the tiny ViT, every parameter filled by :func:`fill_deterministic_`; a momentum
    copy (MoCo v3) starts equal to its online network, as in the official code."""
    method = get_method(name)(ViTBackbone(**TINY_VIT), **options)
    fill_deterministic_(method, seed)
    with torch.no_grad():
        for online, target in (("backbone", "momentum_backbone"), ("projector", "momentum_projector")):
            if hasattr(method, target):
                getattr(method, target).load_state_dict(getattr(method, online).state_dict())
    return method.train()


def tiny_images(seed: int, n_views: int = 1) -> list[torch.Tensor]:
    """``n_views`` fixed batches of images, (BATCH, 3, 32, 32), roughly normalised."""
    g = torch.Generator().manual_seed(seed)
    size = TINY_VIT["img_size"]
    return [(torch.rand(BATCH, 3, size, size, generator=g) - 0.5) / 0.25 for _ in range(n_views)]


def tiny_noise(seed: int) -> torch.Tensor:
    """Per-sample uniform noise (BATCH, N) whose argsort orders the patches (MAE's random masking)."""
    n = (TINY_VIT["img_size"] // TINY_VIT["patch_size"]) ** 2
    return torch.rand(BATCH, n, generator=torch.Generator().manual_seed(seed))


def mask_from_noise(noise: torch.Tensor, num_masked: int) -> torch.Tensor:
    """(B, N) bool, True = masked: the ``num_masked`` patches of largest noise, as MAE's argsort does."""
    ids_shuffle = torch.argsort(noise, dim=1)
    mask = torch.zeros_like(noise, dtype=torch.bool)
    keep = noise.shape[1] - num_masked
    mask.scatter_(1, ids_shuffle[:, keep:], True)
    return mask


def grad_norms(method: nn.Module, names: list[str]) -> dict[str, float]:
    params = dict(method.named_parameters())
    return {n: float(params[n].grad.norm()) for n in names}


def official(method: str) -> dict:
    """The committed numbers measured with the official code (with their source repository and commit)."""
    return json.loads(OFFICIAL_NUMBERS.read_text())[method]


def assert_matches_official(method_name: str, loss: torch.Tensor, method: nn.Module) -> None:
    """Loss and gradient norms (after ``loss.backward()``) equal the official code's to 1e-5 relative
    (plus 1e-7 absolute, for losses near 0)."""
    ref = official(method_name)
    assert ref["source"]["repo"].startswith("facebookresearch/") and len(ref["source"]["commit"]) == 40
    ours = {"loss": loss.item(), **{f"|grad {k}|": v for k, v in grad_norms(method, list(ref["grad_norm"])).items()}}
    theirs = {"loss": ref["loss"], **{f"|grad {k}|": v for k, v in ref["grad_norm"].items()}}
    for key, value in theirs.items():
        assert math.isclose(ours[key], value, rel_tol=1e-5, abs_tol=1e-7), f"{key}: ours {ours[key]!r}, official {value!r}"
