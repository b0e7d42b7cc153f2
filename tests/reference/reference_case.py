"""Pieces of the CAE and BEiT reference tests on top of ``tests/reference/tiny.py`` (its tiny ViT and
name-seeded weights): the export of a case (weights under the official code's parameter names, inputs,
sizes) for a run of the official implementation outside this repository, and the comparison.

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

REL_TOL = 1e-5


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
