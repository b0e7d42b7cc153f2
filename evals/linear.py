"""Linear probing of a frozen encoder: MAE's protocol (He et al., CVPR 2022, appendix A.2), run as a grid.

Head: BatchNorm1d without affine (eps 1e-6) then a linear layer (MAE: the BN whitens features whose scale
differs across methods, so one lr grid fits all). Recipe: LARS, base lr 0.1 x B/256 (batch 16384), 90
epochs, 10 warmup, cosine, wd 0 (the full preset; the short presets use SGD, see ``evals.presets``).
As in DINOv2, a grid of heads (one per learning rate) trains at once: every batch feeds every head and
the head with the best top-1 on the held-out part of the train split is chosen; its test top-1 is reported.

Two modes (the preset's ``mode``):
* ``official``: MAE's ``--cls_token`` probe on augmented images: each epoch every training image is
  cropped (RandomResizedCrop 0.08-1, bicubic) and flipped anew and encoded by the frozen encoder, one
  forward per batch for the whole grid (``evals.features.AugmentedImages``). Held-out and test images are
  un-augmented (cached features).
* ``fast``: cached features of the un-augmented training images, one grid per feature type in
  ``feature_types`` (cls, mean of patch tokens), the feature chosen on held-out too. Quick looks only.

``fit_and_select`` is the grid machinery; the attentive probe reuses it.
"""
from __future__ import annotations

import contextlib
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from evals.registry import register_protocol
from evals.selection import edge_warnings, standard_error
from ssl_bench.errors import UserError
from ssl_bench.optim import build_optimizer, cosine_with_warmup

FEATURE_TYPES = ("cls", "mean")
MODES = ("official", "fast")


class LinearHead(nn.Module):
    """BN(affine=False) + Linear on one feature type: (B, D) -> (B, C)."""

    def __init__(self, dim: int, num_classes: int, feature: str):
        super().__init__()
        self.feature = feature
        self.kinds = (feature,)  # the features this head reads
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)  # MAE's init
        nn.init.zeros_(self.linear.bias)

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(self.norm(feats[self.feature]))


@contextlib.contextmanager
def cpu_threads(n: int | None, device: torch.device):
    """Use ``n`` torch threads inside the block when training on the CPU (see the presets' cpu_threads)."""
    before = torch.get_num_threads()
    if n and device.type == "cpu":
        torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_heads(heads: Sequence[nn.Module], lrs: Sequence[float], data, p: dict, device: torch.device) -> list[float]:
    """Train every head on the same batches, in one pass over ``data`` per epoch.

    Each head has its own param group (its own peak lr) and reads ``feats[k]`` for k in ``head.kinds``; the summed
    loss gives each head exactly the gradient of its own loss, as heads share no parameters. Returns
    each head's mean loss over the last epoch.
    """
    kinds = sorted({k for h in heads for k in h.kinds})
    n = len(data)
    batch = min(p["batch_size"], n)
    steps_per_epoch = n // batch  # drop the ragged tail (BatchNorm needs > 1 sample)
    total, warmup = p["epochs"] * steps_per_epoch, round(p["warmup_epochs"] * steps_per_epoch)
    model = nn.ModuleList(heads).to(device).train()
    groups = [{"params": list(h.parameters()), "weight_decay": p["weight_decay"], "peak_lr": lr} for h, lr in zip(heads, lrs)]
    optimizer = build_optimizer(groups, p["optimizer"], lr=0.0, momentum=p["momentum"], nesterov=p.get("nesterov", False))
    generator = torch.Generator().manual_seed(p["seed"])
    last_epoch = torch.zeros(len(heads))
    with cpu_threads(p.get("cpu_threads"), device):
        for epoch in range(p["epochs"]):
            order = torch.randperm(n, generator=generator)[: steps_per_epoch * batch].numpy()
            last_epoch.zero_()
            for i, (feats, labels) in enumerate(data.batches(kinds, order, batch, epoch=epoch)):
                factor = cosine_with_warmup(epoch * steps_per_epoch + i, total, warmup, 1.0)
                for g in optimizer.param_groups:
                    g["lr"] = g["peak_lr"] * factor
                feats = {k: v.to(device, non_blocking=True) for k, v in feats.items()}
                labels = labels.to(device, non_blocking=True)
                losses = torch.stack([F.cross_entropy(h(feats), labels) for h in model])  # (H,)
                optimizer.zero_grad(set_to_none=True)
                losses.sum().backward()
                optimizer.step()
                last_epoch += losses.detach().cpu()
    return (last_epoch / max(1, steps_per_epoch)).tolist()


@torch.no_grad()
def top1(heads: Sequence[nn.Module], data, batch_size: int, device: torch.device) -> list[float]:
    """Top-1 (%) of every head on ``data``."""
    kinds = sorted({k for h in heads for k in h.kinds})
    for h in heads:
        h.eval()
    correct = torch.zeros(len(heads), dtype=torch.int64)
    for feats, labels in data.batches(kinds, np.arange(len(data)), batch_size):
        feats = {k: v.to(device, non_blocking=True) for k, v in feats.items()}
        correct += torch.stack([(h(feats).argmax(dim=1).cpu() == labels).sum() for h in heads])
    return (100.0 * correct / len(data)).tolist()


def fit_and_select(heads: Sequence[nn.Module], specs: list[dict], train, heldout, test, p: dict, device: torch.device) -> dict:
    """Train the grid (``specs[i]`` describes ``heads[i]`` and holds its ``lr``), choose the head on the
    held-out split, report its test top-1, the whole grid and a warning when the chosen base lr is on
    the edge of its grid."""
    losses = train_heads(heads, [s["lr"] for s in specs], train, p, device)
    with cpu_threads(p.get("cpu_threads"), device):
        held = top1(heads, heldout, p["batch_size"], device)
        tested = top1(heads, test, p["batch_size"], device)
    grid = [{**s, "heldout_top1": h, "test_top1": t, "train_loss": loss} for s, h, t, loss in zip(specs, held, tested, losses)]
    best = max(grid, key=lambda row: row["heldout_top1"])  # the first on ties (grid order)
    selected = {k: v for k, v in best.items() if k not in ("heldout_top1", "test_top1", "train_loss")}
    return {
        "top1": best["test_top1"],
        "selected": selected,
        "warnings": edge_warnings(selected, {"blr": [s["blr"] for s in specs]}),
        "details": {
            "grid": grid, "heldout_top1": best["heldout_top1"], "heldout_se": standard_error(best["heldout_top1"], len(heldout)),
            "optimizer": p["optimizer"], "nesterov": p.get("nesterov", False), "epochs": p["epochs"],
            "train_forwards": getattr(train, "forwards", None),  # encoder forwards (augmented training images)
            "batch_size": min(p["batch_size"], len(train)), "n_train": len(train), "n_heldout": len(heldout), "n_test": len(test),
        },
    }


def feature_types(p: dict) -> tuple[str, ...]:
    """The features probed: the cls token in official mode (MAE ``--cls_token``), else ``feature_types``."""
    if p["mode"] not in MODES:
        raise UserError(f"linear.mode={p['mode']!r}; choose from {', '.join(MODES)}")
    if p["mode"] == "official":
        return ("cls",)
    bad = [f for f in p["feature_types"] if f not in FEATURE_TYPES]
    if bad:
        raise UserError(f"linear.feature_types has {bad}; choose from {', '.join(FEATURE_TYPES)}")
    return tuple(p["feature_types"])


def mode_params(p: dict) -> dict:
    """``p`` with the fast mode's epochs in place of the official mode's (a fast epoch costs far less)."""
    if p["mode"] not in MODES:
        raise UserError(f"mode={p['mode']!r}; choose from {', '.join(MODES)}")
    return {**p, "epochs": p["fast_epochs"], "warmup_epochs": p["fast_warmup_epochs"]} if p["mode"] == "fast" else p


def feature_kinds(p: dict) -> dict[str, tuple[str, ...]]:
    """Cached features this protocol reads, per split (official mode encodes its training images itself)."""
    kinds = feature_types(p)
    return {"heldout": kinds, "test": kinds, **({"train": kinds} if p["mode"] == "fast" else {})}


def linear_probe(train, heldout, test, num_classes: int, p: dict, device: torch.device, features: Sequence[str] = ("cls",)) -> dict:
    scale = min(p["batch_size"], len(train)) / 256  # lr = blr x B / 256
    specs = [{"blr": blr, "lr": blr * scale, "feature": f} for blr in p["blrs"] for f in features]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p["seed"])
        heads = [LinearHead(train.dim(s["feature"]), num_classes, s["feature"]) for s in specs]
    return fit_and_select(heads, specs, train, heldout, test, p, device)


@register_protocol("linear", feature_kinds=feature_kinds, description="linear probe of a frozen encoder (MAE)")
def evaluate(ctx) -> dict:
    p = mode_params(ctx.params)
    features = feature_types(p)
    heldout, test = ctx.features("heldout", features), ctx.features("test", features)
    train = ctx.augmented_train() if p["mode"] == "official" else ctx.features("train", features)
    return linear_probe(train, heldout, test, ctx.num_classes, p, ctx.device, features)
