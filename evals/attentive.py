"""Attentive probing of a frozen encoder (CAE, Chen et al., IJCV 2023, section 4.1; tools/run_attentive.py).

A cross-attention unit pools the encoder's output sequence, as CAE's ``AttentiveBlock``: one learned query
token (not the encoder's cls token), layer-normed (``norm_q``), attends over keys / values = the whole
output sequence, cls token included, each layer-normed (``norm_k``, ``norm_v``); no MLP and no skip
connection, so the pooled vector is purely an attention-weighted mix of the tokens' values. Then
BatchNorm1d(affine=False) and a linear classifier. CAE's recipe: SGD with Nesterov momentum 0.9, lr 0.4 at
batch 8192 (base lr 0.0125 x B/256), 90 epochs, 10 warmup, cosine, wd 0, RandomResizedCrop + flip.

Why (CAE): an MIM encoder represents every patch, so a label carried by part of the image needs
attention over patches; a linear probe on an average undersells it.

Probes for an lr grid train together on the same batches, one encoder forward per batch in ``official``
mode (augmented training images) or cached un-augmented tokens in ``fast`` mode; the choice is made on
the held-out part of the train split (``evals.linear.fit_and_select``).
"""
from __future__ import annotations

import torch
from torch import nn

from evals.linear import MODES, fit_and_select, mode_params
from evals.registry import register_protocol
from ssl_bench.errors import UserError
from ssl_bench.layers import CrossAttention

KINDS = ("cls", "patches")  # the encoder's output sequence, read from the features as its two parts


class AttentiveProbe(nn.Module):
    """Output sequence (cls (B, D) + patch tokens (B, N, D)) -> logits (B, C) through one learned query's
    cross-attention."""

    kinds = KINDS

    def __init__(self, dim: int, num_heads: int, num_classes: int):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"attentive.num_heads={num_heads} does not divide the feature width {dim}; pick a divisor")
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_q = nn.LayerNorm(dim)
        self.norm_k = nn.LayerNorm(dim)
        self.norm_v = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def pool(self, tokens: torch.Tensor) -> torch.Tensor:
        """(B, 1 + N, D) -> (B, D): the query's attention-weighted sum of the token values (no skip, no MLP)."""
        q = self.norm_q(self.query).expand(tokens.shape[0], -1, -1)  # (B, 1, D)
        return self.attn(q, self.norm_k(tokens), self.norm_v(tokens))[:, 0]

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        tokens = torch.cat([feats["cls"][:, None], feats["patches"]], dim=1)  # (B, 1 + N, D)
        return self.linear(self.norm(self.pool(tokens)))


def feature_kinds(p: dict) -> dict[str, tuple[str, ...]]:
    """Cached features this protocol reads, per split (official mode encodes its training images itself)."""
    if p["mode"] not in MODES:
        raise UserError(f"attentive.mode={p['mode']!r}; choose from {', '.join(MODES)}")
    return {"heldout": KINDS, "test": KINDS, **({"train": KINDS} if p["mode"] == "fast" else {})}


def attentive_probe(train, heldout, test, num_classes: int, num_heads: int, p: dict, device: torch.device) -> dict:
    scale = min(p["batch_size"], len(train)) / 256  # lr = blr x B / 256
    specs = [{"blr": blr, "lr": blr * scale} for blr in p["blrs"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p["seed"])
        probes = [AttentiveProbe(train.dim("patches"), num_heads, num_classes) for _ in specs]
    result = fit_and_select(probes, specs, train, heldout, test, p, device)
    result["details"]["num_heads"] = num_heads
    return result


@register_protocol("attentive", feature_kinds=feature_kinds, description="attentive probe (CAE) on the frozen output sequence")
def evaluate(ctx) -> dict:
    p = mode_params(ctx.params)
    heldout, test = ctx.features("heldout", KINDS), ctx.features("test", KINDS)
    train = ctx.augmented_train() if p["mode"] == "official" else ctx.features("train", KINDS)
    num_heads = p["num_heads"] or ctx.frozen_encoder().num_heads
    return attentive_probe(train, heldout, test, ctx.num_classes, num_heads, p, ctx.device)
