"""BEiT against the official implementation (microsoft/unilm beit/modeling_pretrain.py): the same tiny model (2
blocks, width 32, 4x4 patches of 8 px, layer scale 0.1, shared relative position bias, 16 token classes), the
same weights, images, block masks (BEiT's generator: counts may differ between samples) and token targets, in
float64. The official numbers are in beit_official.json, measured outside this repository (see reference_case.py).

The case guards the deviations found before: the absolute sin-cos position embedding instead of the shared
relative position bias, and anything else that moves the loss or a gradient.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from methods.beit import BEiT
from ssl_bench.backbone import ViTBackbone
from tests.reference.reference_case import check_against_fixture, export, official_state, renamed, tiny_tokenizer, token_case
from tests.reference.tiny import TINY_VIT, fill_deterministic_, grad_norms

FIXTURE = Path(__file__).parent / "beit_official.json"
CONFIG = dict(**{k: v for k, v in TINY_VIT.items() if k != "arch"}, layer_scale=0.1, vocab_size=16, batch=4)
GRADS = {  # our parameter -> official parameter, for the reported gradient norms
    "backbone.vit.patch_embed.proj.weight": "patch_embed.proj.weight",
    "backbone.vit.cls_token": "cls_token",
    "backbone.vit.blocks.0.attn.qkv.weight": "blocks.0.attn.qkv.weight",
    "backbone.vit.blocks.1.mlp.fc2.weight": "blocks.1.mlp.fc2.weight",
    "backbone.rel_pos_bias.relative_position_bias_table": "rel_pos_bias.relative_position_bias_table",
    "mask_token": "mask_token",
    "head.weight": "lm_head.weight",
}
RULES = [(r"^backbone\.vit\.blocks\.(\d+)\.ls([12])\.gamma$", r"blocks.\1.gamma_\2"), (r"^backbone\.(vit\.)?", ""), (r"^head\.", "lm_head.")]


def official_name(key: str) -> str:
    return renamed(key, RULES)


def build_case(tmp_dir: Path):
    backbone = ViTBackbone(**TINY_VIT, layer_scale=CONFIG["layer_scale"], rel_pos_bias="shared")
    method = BEiT(backbone, tokenizer=tiny_tokenizer(CONFIG, tmp_dir), mask_ratio=0.6)
    fill_deterministic_(method, seed=0)
    method.double().train()
    batch, tokens = token_case(method, CONFIG, method.mask_generator, mask_seed=7)  # BEiT's generator, 10 of 16: one mask ends short (9)
    return method, batch, tokens


def our_numbers(method: BEiT, batch: dict) -> dict:
    method.zero_grad()
    loss = method.training_step(batch)["loss_mim"]
    loss.backward()
    return {"loss": loss.item()} | {f"grad_norm/{k}": v for k, v in grad_norms(method, list(GRADS)).items()}


def test_case_has_masks_of_different_sizes(tmp_path):
    _, batch, _ = build_case(tmp_path)
    assert len(set(batch["mask"].sum(1).tolist())) > 1  # the loss must not assume one count per sample


def test_beit_matches_official_implementation(tmp_path):
    method, batch, _ = build_case(tmp_path)
    check_against_fixture(our_numbers(method, batch), FIXTURE)


if __name__ == "__main__":  # python -m tests.reference.test_beit_reference OUT.pt: the case for the official run
    with tempfile.TemporaryDirectory() as tmp:
        method, batch, tokens = build_case(Path(tmp))
        print(batch["mask"].sum(1).tolist(), our_numbers(method, batch))
        inputs = {"images": batch["views"][0], "mask": batch["mask"], "tokens": tokens}
        export(sys.argv[1], official_state(method, official_name), inputs, CONFIG, GRADS)
