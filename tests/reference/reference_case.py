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
import re
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from ssl_bench.tokenizer import Tokenizer, save_tokenizer

REL_TOL = 1e-5


def split_qkv_bias(state: dict, key: str, value: torch.Tensor, dim: int) -> None:
    """timm's fused qkv bias -> the official q_bias and v_bias (the official attention has no key bias: a key
    bias adds the same q.b_k to all logits of one query, which the softmax removes)."""
    stem = key[: -len("qkv.bias")]
    state[stem + "q_bias"], state[stem + "v_bias"] = value[:dim], value[2 * dim :]


def renamed(key: str, rules: list[tuple[str, str]]) -> str:
    """``key`` with each (pattern, replacement) of ``rules`` applied in turn."""
    for pattern, repl in rules:
        key = re.sub(pattern, repl, key)
    return key


def official_state(method: torch.nn.Module, official_name: Callable[[str], str], skip: tuple[str, ...] = ()) -> dict:
    """Our weights under the official parameter names, fused qkv biases split. Left out: the tokenizer (the
    targets are given to both sides) and keys ending in one of ``skip``."""
    state = {}
    for key, value in method.state_dict().items():
        if key.startswith("tokenizer.") or (skip and key.endswith(skip)):
            continue
        if key.endswith("attn.qkv.bias"):
            split_qkv_bias(state, official_name(key), value, method.backbone.embed_dim)
        else:
            state[official_name(key)] = value
    return state


def tiny_tokenizer(config: dict, tmp_dir: Path) -> str:
    """A tiny tokenizer saved in ``tmp_dir`` (its codes are never used: ``token_targets`` fixes the targets)."""
    tokenizer = Tokenizer(img_size=config["img_size"], patch_size=config["patch_size"], in_chans=config["in_chans"],
                          vocab_size=config["vocab_size"], hidden_dim=8, code_dim=4, num_res_blocks=1)
    return str(save_tokenizer(tokenizer, tmp_dir / "tokenizer.pt"))


def token_case(method: torch.nn.Module, config: dict, masks: Callable, mask_seed: int) -> tuple[dict, torch.Tensor]:
    """The inputs of a token-target case: float64 images and random token targets (one generator, seed 1),
    a mask per image from ``masks`` (numpy generator ``mask_seed``); the method's tokenizer is made to return
    those targets, as the official code is given them. Returns (batch, tokens)."""
    c = config
    g = torch.Generator().manual_seed(1)
    images = torch.randn(c["batch"], c["in_chans"], c["img_size"], c["img_size"], generator=g, dtype=torch.float64)
    grid = c["img_size"] // c["patch_size"]
    rng = np.random.default_rng(mask_seed)
    mask = torch.from_numpy(np.stack([masks(rng) for _ in range(c["batch"])]))
    tokens = torch.randint(0, c["vocab_size"], (c["batch"], grid * grid), generator=g)
    method.tokenizer.tokenize = lambda _: tokens
    return {"views": [images], "mask": mask}, tokens


def check_against_fixture(numbers: dict, fixture_path: Path) -> None:
    official = json.loads(fixture_path.read_text())["numbers"]
    assert set(numbers) == set(official)
    for key, value in official.items():
        assert math.isclose(numbers[key], value, rel_tol=REL_TOL), f"{key}: ours {numbers[key]!r} vs official {value!r}"


def export(path: str, state: dict, inputs: dict, config: dict, grad_names: dict[str, str]) -> None:
    """Write a case for the official run: its weights (official names), inputs, model sizes, and which
    official parameter each reported gradient norm belongs to."""
    torch.save({"state": state, "inputs": inputs, "config": config, "grad_names": grad_names}, path)
