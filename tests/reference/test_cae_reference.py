"""CAE against the official implementation (Atten4Vis/CAE, models/modeling_cae.py): the same tiny model (2
encoder blocks, width 32, 4x4 patches of 8 px, 2 regressor and 2 decoder blocks, 16 token classes), the
same weights, images, block masks and token targets, in float64. The official numbers are in
cae_official.json, measured outside this repository (see reference_case.py).

The case guards the deviations found before: the encoder's cls token as an extra key/value of the
regressor, LayerNorm eps 1e-5 in regressor/decoder, and anything else that moves the loss or a gradient.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import torch

from methods.cae import CAE
from ssl_bench.backbone import ViTBackbone
from ssl_bench.masking import BlockMaskGenerator
from tests.reference.reference_case import check_against_fixture, export, official_state, renamed, tiny_tokenizer, token_case
from tests.reference.tiny import TINY_VIT, fill_deterministic_, grad_norms

FIXTURE = Path(__file__).parent / "cae_official.json"
CONFIG = dict(**{k: v for k, v in TINY_VIT.items() if k != "arch"}, layer_scale=0.1,
              regressor_depth=2, decoder_depth=2, vocab_size=16, align_weight=2.0, batch=4)
# our parameter -> official parameter, for the reported gradient norms
GRADS = {
    "backbone.vit.patch_embed.proj.weight": "encoder.patch_embed.proj.weight",
    "backbone.vit.cls_token": "encoder.cls_token",
    "backbone.vit.blocks.0.attn.qkv.weight": "encoder.blocks.0.attn.qkv.weight",
    "backbone.vit.blocks.1.mlp.fc2.weight": "encoder.blocks.1.mlp.fc2.weight",
    "mask_token": "mask_token",
    "regressor.blocks.0.attn.q.weight": "regresser.regressor_blocks.0.cross_attn.q.weight",
    "regressor.blocks.1.attn.k.weight": "regresser.regressor_blocks.1.cross_attn.k.weight",
    "decoder.blocks.0.attn.qkv.weight": "decoder.decoder_blocks.0.attn.qkv.weight",
    "decoder.head.weight": "decoder.head.weight",
}
ENCODER_RULES = [(r"^backbone\.vit\.blocks\.(\d+)\.ls([12])\.gamma$", r"encoder.blocks.\1.gamma_\2"), (r"^backbone\.vit\.", "encoder.")]
REGRESSOR_RULES = [
    (r"^regressor\.blocks\.(\d+)\.", r"regresser.regressor_blocks.\1."), (r"^regressor\.norm\.", "regresser.norm."),
    (r"\.norm_q\.", ".norm1_q."), (r"\.norm_k\.", ".norm1_k."), (r"\.norm_v\.", ".norm1_v."), (r"\.norm_mlp\.", ".norm2_cross."),
    (r"\.attn\.(q|k|v|proj)\.weight$", r".cross_attn.\1.weight"), (r"\.attn\.proj\.bias$", ".cross_attn.proj.bias"),
    (r"\.attn\.(q|v)\.bias$", r".cross_attn.\1_bias"), (r"\.mlp\.", ".mlp_cross."), (r"\.gamma([12])$", r".gamma_\1_cross"),
]
DECODER_RULES = [(r"^decoder\.blocks\.(\d+)\.ls([12])\.gamma$", r"decoder.decoder_blocks.\1.gamma_\2"), (r"^decoder\.blocks\.", "decoder.decoder_blocks.")]


def official_name(key: str) -> str:
    return renamed(key, REGRESSOR_RULES if key.startswith("regressor.") else DECODER_RULES if key.startswith("decoder.") else ENCODER_RULES)


# the official cross-attention has no key bias; each side computes its own sin-cos table
SKIPPED = ("attn.k.bias", "pos_embed")


def build_case(tmp_dir: Path):
    c = CONFIG
    method = CAE(ViTBackbone(**TINY_VIT, layer_scale=c["layer_scale"]), regressor_depth=c["regressor_depth"], decoder_depth=c["decoder_depth"],
                 align_weight=c["align_weight"], target="tokens", tokenizer=tiny_tokenizer(c, tmp_dir))
    fill_deterministic_(method, seed=0)
    method.double().train()
    grid = c["img_size"] // c["patch_size"]
    batch, tokens = token_case(method, c, BlockMaskGenerator(grid, 0.5, exact=True), mask_seed=2)
    return method, batch, tokens


def our_numbers(method: CAE, batch: dict) -> dict:
    method.zero_grad()
    losses = method.training_step(batch)
    loss = sum(losses.values())
    loss.backward()
    numbers = {"loss": loss.item(), "loss_recon": losses["loss_recon"].item(),
               "align_mse": losses["loss_align"].item() / CONFIG["align_weight"]}
    return numbers | {f"grad_norm/{k}": v for k, v in grad_norms(method, list(GRADS)).items()}


def test_cae_matches_official_implementation(tmp_path):
    method, batch, _ = build_case(tmp_path)
    check_against_fixture(our_numbers(method, batch), FIXTURE)


if __name__ == "__main__":  # python -m tests.reference.test_cae_reference OUT.pt: the case for the official run
    with tempfile.TemporaryDirectory() as tmp:
        method, batch, tokens = build_case(Path(tmp))
        print(our_numbers(method, batch))
        inputs = {"images": batch["views"][0], "mask": batch["mask"], "tokens": tokens}
        export(sys.argv[1], official_state(method, official_name, skip=SKIPPED), inputs, CONFIG, GRADS)
