"""Attentive probing of frozen patch tokens (CAE, Chen et al., IJCV 2023, section 4.1 and appendix).

A cross-attention unit pools the patch tokens: one learned query token (not the encoder's cls token)
attends over keys / values = the patch tokens (each layer-normed, as in CAE's AttentiveBlock); no MLP and
no skip connection, so the pooled vector is purely an attention-weighted mix of patch values. Then
BatchNorm1d(affine=False) and a linear classifier. CAE's recipe: SGD momentum 0.9, lr 0.4 at batch 8192
(base lr 0.0125 x B/256), 90 epochs, 10 warmup, cosine, wd 0, no augmentation.

Why (CAE): an MIM encoder represents every patch, so a label carried by part of the image needs
attention over patches; a linear probe on an average undersells it.

Probes for a small lr grid train together on the same batches; the choice is made on the held-out
part of the train split (``evals.linear.fit_and_select``).
"""
from __future__ import annotations

import torch
from torch import nn

from evals.linear import fit_and_select
from evals.registry import register_protocol
from ssl_bench.errors import UserError
from ssl_bench.layers import CrossAttention


FEATURE_KINDS = ("patches",)  # what evals.run extracts for this protocol


class AttentiveProbe(nn.Module):
    """Patch tokens (B, N, D) -> logits (B, C) through one learned query's cross-attention."""

    feature = "patches"

    def __init__(self, dim: int, num_heads: int, num_classes: int):
        super().__init__()
        if dim % num_heads:
            raise UserError(f"attentive.num_heads={num_heads} does not divide the feature width {dim}; pick a divisor")
        self.query = nn.Parameter(torch.zeros(1, 1, dim))
        self.norm_k = nn.LayerNorm(dim)
        self.norm_v = nn.LayerNorm(dim)
        self.attn = CrossAttention(dim, num_heads)
        self.norm = nn.BatchNorm1d(dim, affine=False, eps=1e-6)
        self.linear = nn.Linear(dim, num_classes)
        nn.init.trunc_normal_(self.query, std=0.02)
        nn.init.trunc_normal_(self.linear.weight, std=0.01)
        nn.init.zeros_(self.linear.bias)

    def pool(self, patches: torch.Tensor) -> torch.Tensor:
        """(B, N, D) -> (B, D): the query's attention-weighted sum of the patch values (no skip, no MLP)."""
        q = self.query.expand(patches.shape[0], -1, -1)  # (B, 1, D)
        return self.attn(q, self.norm_k(patches), self.norm_v(patches))[:, 0]

    def forward(self, feats: dict[str, torch.Tensor]) -> torch.Tensor:
        return self.linear(self.norm(self.pool(feats["patches"])))


def attentive_probe(train, heldout, test, num_classes: int, num_heads: int, p: dict, device: torch.device) -> dict:
    scale = min(p["batch_size"], len(train)) / 256  # lr = blr x B / 256
    specs = [{"blr": blr, "lr": blr * scale} for blr in p["blrs"]]
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(p["seed"])
        probes = [AttentiveProbe(train.dim("patches"), num_heads, num_classes) for _ in specs]
    result = fit_and_select(probes, specs, train, heldout, test, p, device)
    result["details"]["num_heads"] = num_heads
    return result


@register_protocol("attentive", feature_kinds=FEATURE_KINDS, description="attentive probe on frozen patch tokens")
def evaluate(ctx) -> dict:
    p = ctx.params
    train, heldout, test = (ctx.features(split, ("patches",)) for split in ("train", "heldout", "test"))
    num_heads = p["num_heads"] or ctx.frozen_encoder().num_heads
    return attentive_probe(train, heldout, test, ctx.num_classes, num_heads, p, ctx.device)
