"""Layers shared by methods and probes."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class CrossAttention(nn.Module):
    """Multi-head attention of queries over separate keys/values (CAE's regressor, the attentive probe).

    q: (B, Nq, D), k: (B, Nk, D), v: (B, Nk, D) -> (B, Nq, D). Uses PyTorch's scaled_dot_product_attention.
    """

    def __init__(self, dim: int, num_heads: int, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.k = nn.Linear(dim, dim, bias=qkv_bias)
        self.v = nn.Linear(dim, dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:  # (B, N, D) -> (B, H, N, D/H)
        b, n, d = x.shape
        return x.reshape(b, n, self.num_heads, d // self.num_heads).transpose(1, 2)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        out = F.scaled_dot_product_attention(self._heads(self.q(q)), self._heads(self.k(k)), self._heads(self.v(v)))
        b, _, nq, _ = out.shape
        return self.proj(out.transpose(1, 2).reshape(b, nq, -1))


def trunc_normal_within_std_(tensor: torch.Tensor, std: float = 0.02) -> torch.Tensor:
    """Normal(0, std) truncated at +-std (not timm's default +-2 absolute): the ``trunc_normal_`` of BEiT's
    and CAE's official code, whose weights are therefore about half as spread as an untruncated normal."""
    return nn.init.trunc_normal_(tensor, std=std, a=-std, b=std)
