"""Optimizers and per-step schedules shared by pretraining and the probes."""
from __future__ import annotations

import math

import torch

from ssl_bench.errors import UserError


class LARS(torch.optim.Optimizer):
    """SGD with momentum and layer-wise trust ratio (You et al. 2017), as MAE's linear probe uses.

    Parameters with ndim <= 1 (biases, norms) skip both weight decay and the trust ratio.
    """

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9, trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum, trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for group in self.param_groups:
            for p in group["params"]:
                if p.grad is None:
                    continue
                d_p = p.grad
                if p.ndim > 1:
                    d_p = d_p.add(p, alpha=group["weight_decay"])
                    param_norm, update_norm = torch.norm(p), torch.norm(d_p)
                    ratio = torch.where(
                        (param_norm > 0) & (update_norm > 0),
                        group["trust_coefficient"] * param_norm / update_norm,
                        torch.ones_like(param_norm),
                    )
                    d_p = d_p.mul(ratio)
                state = self.state[p]
                if "mu" not in state:
                    state["mu"] = torch.zeros_like(p)
                mu = state["mu"]
                mu.mul_(group["momentum"]).add_(d_p)
                p.add_(mu, alpha=-group["lr"])


def build_optimizer(groups: list[dict], name: str, lr: float, betas=(0.9, 0.999), momentum: float = 0.9, nesterov: bool = False) -> torch.optim.Optimizer:
    """``groups`` carry their own weight_decay; every group starts at ``lr`` (the schedule sets it each step).
    ``nesterov``: SGD with Nesterov momentum (CAE's ``sgd``)."""
    for g in groups:
        g.setdefault("lr", lr)
        g["base_lr"] = lr
    if name == "adamw":
        # fused: one kernel for every parameter on CUDA (same update as the for-each implementation)
        on_cuda = all(p.is_cuda for g in groups for p in g["params"]) and any(g["params"] for g in groups)
        return torch.optim.AdamW(groups, lr=lr, betas=tuple(betas), fused=on_cuda or None)
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, nesterov=nesterov)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum)
    raise UserError(f"unknown optimizer '{name}'; choose one of: adamw, sgd, lars")


def scaled_lr(train: dict, batch: int) -> float:
    """The peak learning rate of a run's ``train`` section: ``lr`` if set, else ``blr`` scaled to the batch
    (the linear scaling rule: blr x batch / 256)."""
    return train["lr"] if train["lr"] is not None else train["blr"] * batch / 256


def cosine_with_warmup(step: int, total_steps: int, warmup_steps: int, base: float, final: float = 0.0) -> float:
    """Linear warmup from 0 to ``base`` over ``warmup_steps``, then half-cosine down to ``final`` at ``total_steps``."""
    if step < warmup_steps:
        return base * step / max(1, warmup_steps)
    progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
    return final + (base - final) * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Scheduled lr for every group, except groups marked ``fixed_lr`` (e.g. SimSiam's predictor) and
    groups with an ``lr_scale`` (layer-wise decay), which get lr * scale."""
    for g in optimizer.param_groups:
        if g.get("fixed_lr"):
            g["lr"] = g["base_lr"]
        else:
            g["lr"] = lr * g.get("lr_scale", 1.0)


def set_weight_decay(optimizer: torch.optim.Optimizer, weight_decay: float) -> None:
    """Scheduled weight decay for every decayed group; groups exempt from decay (weight_decay 0) stay so."""
    for g in optimizer.param_groups:
        if g["weight_decay"] > 0:
            g["weight_decay"] = weight_decay
