"""Shared pieces of the reference tests: a tiny method with fixed weights and inputs, its loss and gradient
norms, and the export of both (weights under the official code's parameter names) for a run of the official
implementation outside this repository.

Each ``test_*_reference.py`` builds its case, computes the same numbers here, and compares them with the
numbers the official code gave on the exported case (a JSON fixture naming the official repository and
commit). To remeasure: ``python -m tests.reference.test_cae_reference /tmp/case.pt`` writes the case; the
official model is then built at the sizes in ``case["config"]``, loaded from ``case["state"]`` and run on
``case["inputs"]`` in float64.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn

REL_TOL = 1e-5


def fill_deterministic_(module: nn.Module, seed: int) -> None:
    """Every trainable parameter from a seeded generator, independent of how the module initialised itself:
    LayerNorm weights 1 + 0.1 N(0, 1), layer scales 0.5 + 0.1 N(0, 1), everything else 0.1 N(0, 1) (biases
    included, so a bias the official code lacks must be one that cannot matter)."""
    g = torch.Generator().manual_seed(seed)
    norms = {f"{n}.weight" for n, m in module.named_modules() if isinstance(m, nn.LayerNorm)}
    with torch.no_grad():
        for name, p in sorted(module.named_parameters()):
            if not p.requires_grad:
                continue
            noise = 0.1 * torch.randn(p.shape, generator=g, dtype=torch.float64)
            base = 1.0 if name in norms else 0.5 if name.endswith(("gamma", "gamma1", "gamma2")) else 0.0
            p.copy_(base + noise)


def grad_norms(module: nn.Module, names: list[str]) -> dict[str, float]:
    params = dict(module.named_parameters())
    return {n: float(params[n].grad.norm()) for n in names}


def split_qkv_bias(state: dict, key: str, value: torch.Tensor, dim: int) -> None:
    """timm's fused qkv bias -> the official q_bias and v_bias (the official attention has no key bias: a key
    bias adds the same q.b_k to all logits of one query, which the softmax removes)."""
    stem = key[: -len("qkv.bias")]
    state[stem + "q_bias"], state[stem + "v_bias"] = value[:dim], value[2 * dim :]


def check_against_fixture(numbers: dict, fixture_path: Path) -> None:
    official = json.loads(fixture_path.read_text())["numbers"]
    assert set(numbers) == set(official)
    for key, value in official.items():
        assert math.isclose(numbers[key], value, rel_tol=REL_TOL), f"{key}: ours {numbers[key]!r} vs official {value!r}"


def export(path: str, state: dict, inputs: dict, config: dict, grad_names: dict[str, str]) -> None:
    """Write a case for the official run: its weights (official names), inputs, model sizes, and which
    official parameter each reported gradient norm belongs to."""
    torch.save({"state": state, "inputs": inputs, "config": config, "grad_names": grad_names}, path)
