"""BEiT: BERT Pre-Training of Image Transformers (Bao, Dong, Piao & Wei, ICLR 2022).

One ViT sees all N patches; at the block-masked ~40% of positions the patch embedding is replaced by a
learned [MASK] embedding (positions come from a shared relative position bias). A linear head over the encoder's final
features at the masked positions predicts, by cross-entropy, the discrete token a frozen image tokenizer
gives that patch of the uncorrupted image. Only masked positions enter the loss.

Choices (the spec in /work/shared/specs/methods.md; the paper's recipe is ViT-B/16, ImageNet-1K):
* tokenizer: DALL-E's dVAE (8192 codes) cannot be downloaded, so ``method.tokenizer`` is a VQ-VAE from
  ``ssl_bench.tokenizer`` trained without labels on the run's own pretraining images ("auto": trained in
  ``prepare`` into ``RUN_DIR/tokenizer/`` with the run's preset, 64 / 512 / 8192 codes for smoke / quick /
  full) or the path of one trained with ``ssl-bench tokenizer train``; a user holding OpenAI's released
  encoder passes ``dalle:/path/to/encoder.pkl`` (``ssl_bench.dalle``). It reads the same augmented view
  as the ViT (DALL-E reads a half-resolution copy of the same crop).
* masking: BEiT's block-wise generator (``ssl_bench.masking.BlockMaskGenerator``), 75 of 196 patches (the
  official ``--num_mask_patches 75``; ``mask_ratio`` 75/196 keeps that share on other grids). A mask may end
  a few patches short of the target, as the official one does; the loss is a cross-entropy over the flat set
  of masked positions of the batch, so the count may differ from sample to sample.
* head: linear D -> vocab on the final (layer-normed) features.
* encoder: shared relative position bias and no absolute position embedding (the official default,
  ``model.rel_pos_bias=shared`` in every preset; ``model.rel_pos_bias=none`` gives the fixed sin-cos
  absolute embedding instead), layer scale 0.1 (``--layer_scale_init_value 0.1``).
* init (``init="beit"``): every Linear, the patch projection, cls and [MASK] embeddings normal(0.02)
  truncated at +-0.02, zero biases, then each block's attn.proj and mlp.fc2 weights divided by
  sqrt(2 * layer_id) (layer_id from 1); the relative position table starts at zero. ``init="timm"`` keeps
  timm's encoder init.
* augmentation: ColorJitter(0.4, 0.4, 0.4) on every image, RandomResizedCrop scale 0.08-1, flip
  (DataAugmentationForBEiT).
* optimization: AdamW betas (0.9, 0.999), wd 0.05 on every parameter except biases, norms and the cls
  token (the official skip list), gradient clipping 3.0, lr 1.5e-3 at batch 2048, i.e. base lr 1.875e-4
  per 256 images (lr = blr x B / 256), 10 warmup epochs, drop path 0.1 (full preset). Like MAE's presets,
  smoke/quick raise the base lr 10x to learn something in a few hundred steps.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_bench.backbone import ViTBackbone
from ssl_bench.config import Check
from ssl_bench.data import views
from ssl_bench.errors import UserError
from ssl_bench.layers import trunc_normal_within_std_
from ssl_bench.masking import BlockMaskGenerator
from ssl_bench.method import DataSpec, Method
from ssl_bench.registry import register_method
from ssl_bench.tokenizer import Tokenizer, check_compatible, load_tokenizer
from ssl_bench.tokenizer_training import ensure_tokenizer

BLR = 1.5e-3 * 256 / 2048  # the paper's lr 1.5e-3 at batch 2048, per 256 images
ENCODER = {"rel_pos_bias": "shared", "layer_scale": 0.1}  # the official pretraining defaults
INITS = ("beit", "timm")


def beit_init_(backbone: ViTBackbone, *extra: nn.Module) -> None:
    """BEiT's official init of the encoder (and ``extra`` modules, e.g. the head): Linear and patch
    projection weights normal(0.02) truncated at +-0.02, zero biases, LayerNorms 1 / 0, the cls token
    likewise; then each block's residual output projections (attn.proj, mlp.fc2) divided by
    sqrt(2 * layer_id), so deeper blocks start with smaller updates to the residual stream."""
    for module in (backbone.vit, *extra):
        for m in module.modules():
            if isinstance(m, (nn.Linear, nn.Conv2d)):
                trunc_normal_within_std_(m.weight)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
    trunc_normal_within_std_(backbone.vit.cls_token)
    for layer_id, block in enumerate(backbone.blocks, start=1):
        block.attn.proj.weight.data.div_(math.sqrt(2.0 * layer_id))
        block.mlp.fc2.weight.data.div_(math.sqrt(2.0 * layer_id))


@register_method
class BEiT(Method):
    name = "beit"
    description = "BEiT (Bao et al. 2022): [MASK] embeddings in a full-sequence ViT predict a tokenizer's codes at ~40% block-masked patches"
    family = "mim"
    option_checks = {"mask_ratio": Check(0, 1, lo_open=True, hi_open=True)}
    recipes = {
        "smoke": {"train": {"blr": 10 * BLR, "betas": (0.9, 0.999), "clip_grad": 3.0}, "model": ENCODER},
        "quick": {"train": {"blr": 10 * BLR, "betas": (0.9, 0.999), "clip_grad": 3.0}, "model": ENCODER},
        "full": {
            "train": {
                "blr": BLR, "betas": (0.9, 0.999), "weight_decay": 0.05, "clip_grad": 3.0, "epochs": 100, "warmup_epochs": 10,
            },
            "model": {**ENCODER, "drop_path": 0.1},
        },
    }
    prepare_rewrites = ("method.tokenizer",)  # prepare() trains or sets up the tokenizer "auto" / "dalle:" names

    def __init__(
        self, backbone: ViTBackbone, tokenizer: str | Tokenizer = "auto", mask_ratio: float = 75 / 196, init: str = "beit"
    ):
        super().__init__(backbone)
        if init not in INITS:
            raise UserError(f"unknown method.init '{init}'; choose one of: {', '.join(INITS)}")
        self.mask_generator = BlockMaskGenerator(backbone.grid_size, mask_ratio)
        if isinstance(tokenizer, str):
            if tokenizer == "auto":
                raise UserError(
                    "method.tokenizer=auto is resolved when pretraining starts (BEiT.prepare); "
                    "to build BEiT directly pass method.tokenizer=<path to a trained tokenizer>"
                )
            tokenizer = load_tokenizer(tokenizer)
        check_compatible(tokenizer, backbone)
        # frozen target network; a submodule only so that it follows the method's device
        self.tokenizer = tokenizer.eval().requires_grad_(False)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, backbone.embed_dim))
        self.head = nn.Linear(backbone.embed_dim, tokenizer.vocab_size)
        if init == "beit":
            beit_init_(backbone, self.head)
            trunc_normal_within_std_(self.mask_token)
        else:
            nn.init.trunc_normal_(self.mask_token, std=0.02)
            nn.init.trunc_normal_(self.head.weight, std=0.02)
            nn.init.zeros_(self.head.bias)

    @classmethod
    def prepare(cls, cfg: dict, run_dir) -> dict:
        # "auto" -> train (or, on resume, reuse) RUN_DIR/tokenizer; a path -> validated, made absolute
        return {**cfg, "method": {**cfg["method"], "tokenizer": ensure_tokenizer(cfg, run_dir)}}

    def data_spec(self) -> DataSpec:
        # DataAugmentationForBEiT: ColorJitter(0.4, 0.4, 0.4) on every image, RandomResizedCrop scale 0.08-1, flip
        return DataSpec(
            augmentation=views.mim(crop_scale=(0.08, 1.0), jitter=(0.4, 0.4, 0.4, 0.0), jitter_p=1.0),
            mask=self.mask_generator,
        )

    def no_weight_decay(self) -> set[str]:
        return {"backbone.vit.cls_token"}  # the official skip list (pos_embed, cls_token); the [MASK] embedding is decayed

    def train(self, mode: bool = True):
        super().train(mode)
        self.tokenizer.eval()  # fixed targets: never in training mode
        return self

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images, mask = batch["views"][0], batch["mask"]  # (B, C, H, W), (B, N) True = masked
        targets = self.tokenizer.tokenize(images)  # (B, N) codes of the uncorrupted image, no gradient
        tokens = self.backbone.embed_patches(images)  # (B, N, D)
        tokens = torch.where(mask.unsqueeze(-1), self.mask_token.to(tokens.dtype), tokens)  # [MASK] in, before pos-embed
        x = self.backbone.forward_tokens(tokens)[:, 1:]  # (B, N, D): all N positions, cls dropped
        # The head reads K = the generator's target count of positions per sample, masked ones first: a
        # BEiT mask never exceeds K, and one that ends short pads with visible positions the loss weights
        # out. Shapes stay fixed, so nothing is read back to the host (a boolean index would read the
        # count) and the step compiles to one graph; the loss is still the mean over the masked positions.
        K = self.mask_generator.num_masked
        torch._assert_async((mask.sum(1) <= K).all(), "BEiT: a mask holds more positions than its generator's target")
        picked = mask.to(torch.int8).argsort(dim=1, descending=True, stable=True)[:, :K]  # (B, K)
        masked = mask.gather(1, picked).flatten().float()  # (B K,) 1: a masked position, 0: padding
        logits = self.head(x.gather(1, picked.unsqueeze(-1).expand(-1, -1, x.shape[-1])))  # (B, K, vocab)
        logits, target = logits.flatten(0, 1), targets.gather(1, picked).flatten()  # (B K, vocab), (B K,)
        count = masked.sum()
        self.log("token_acc", ((logits.detach().argmax(-1) == target).float() * masked).sum() / count)
        return {"loss_mim": (F.cross_entropy(logits.float(), target, reduction="none") * masked).sum() / count}
