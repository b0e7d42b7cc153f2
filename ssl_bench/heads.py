"""Pieces the Siamese methods share (SimSiam, MoCo v3): BatchNorm MLP heads, a frozen momentum copy
of a network, its EMA update and the half-cosine momentum schedule."""
from __future__ import annotations

import copy
import math

import torch
from torch import nn

from ssl_bench.distributed import world_size


def build_mlp(
    in_dim: int,
    hidden_dim: int,
    out_dim: int,
    num_layers: int,
    last_bn: bool = True,
    last_bn_affine: bool = True,
    last_bias: bool = True,
) -> nn.Sequential:
    """``num_layers`` Linear layers, each hidden one followed by BatchNorm + ReLU; the last one
    optionally followed by BatchNorm (no ReLU).

    A Linear that feeds a BatchNorm has no bias (the BN's mean subtraction would cancel it), so only
    a last layer without BN can have one (``last_bias``). Shapes: (B, in_dim) -> (B, out_dim).
    SimSiam projector: 3 layers, last BN without affine; predictor: 2 layers, no last BN, bias.
    MoCo v3 (ViT) projector: 3 layers, last BN without affine; predictor: 2 layers, last BN without affine.
    """
    if num_layers < 1:
        raise ValueError(f"an MLP needs at least one layer, got num_layers={num_layers}")
    layers: list[nn.Module] = []
    for i in range(num_layers):
        d_in = in_dim if i == 0 else hidden_dim
        if i < num_layers - 1:
            layers += [nn.Linear(d_in, hidden_dim, bias=False), nn.BatchNorm1d(hidden_dim), nn.ReLU(inplace=True)]
        elif last_bn:
            layers += [nn.Linear(d_in, out_dim, bias=False), nn.BatchNorm1d(out_dim, affine=last_bn_affine)]
        else:
            layers.append(nn.Linear(d_in, out_dim, bias=last_bias))
    return nn.Sequential(*layers)


def sync_batchnorm(module: nn.Module) -> nn.Module:
    """BatchNorm statistics over the global batch when training on several GPUs (as both papers do:
    the per-GPU batch is too small for the heads' BN); unchanged on one process or on CPU, where
    SyncBatchNorm cannot run."""
    if world_size() > 1 and torch.cuda.is_available():
        return nn.SyncBatchNorm.convert_sync_batchnorm(module)
    return module


def momentum_copy(module: nn.Module) -> nn.Module:
    """A copy of ``module`` that the optimizer never sees: no gradient, moved only by :func:`ema_update_`."""
    target = copy.deepcopy(module)
    target.requires_grad_(False)
    return target


@torch.no_grad()
def ema_update_(target: nn.Module, online: nn.Module, momentum: float) -> None:
    """target <- momentum * target + (1 - momentum) * online, every parameter (``lerp``).

    One multi-tensor op (``_foreach_lerp_``, as timm's ModelEmaV3): on a GPU a few kernel launches for
    all parameters instead of one each, host time that a small model's step waits for; each tensor's
    result is ``lerp_``'s (tests/test_heads.py). Buffers (BN running statistics) are left alone: the
    momentum network runs in train mode and normalises with its own batch statistics, as in the MoCo v3
    reference code."""
    pairs = list(zip(target.parameters(), online.parameters(), strict=True))
    torch._foreach_lerp_([t for t, _ in pairs], [o.detach() for _, o in pairs], 1.0 - momentum)


def cosine_momentum(step: int, total_steps: int, base: float) -> float:
    """Half-cosine ramp from ``base`` at step 0 to 1.0 at ``total_steps`` (MoCo v3, BYOL)."""
    progress = min(1.0, step / max(1, total_steps))
    return 1.0 - (1.0 - base) * 0.5 * (1.0 + math.cos(math.pi * progress))
