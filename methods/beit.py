"""BEiT: BERT Pre-Training of Image Transformers (Bao, Dong, Piao & Wei, ICLR 2022).

One ViT sees all N patches; at the block-masked ~40% of positions the patch embedding is replaced by a
learned [MASK] embedding before the position embedding is added. A linear head over the encoder's final
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
* head: linear D -> vocab on the final (layer-normed) features, trunc-normal init std 0.02 like the
  [MASK] embedding.
* optimization: AdamW betas (0.9, 0.999), wd 0.05, lr 1.5e-3 at batch 2048, i.e. base lr 1.875e-4 per
  256 images (lr = blr x B / 256), 10 warmup epochs, drop path 0.1 (full preset). Like MAE's presets,
  smoke/quick raise the base lr 10x to learn something in a few hundred steps.
* left out: layer-scale 0.1 and relative position bias (the backbone is the shared timm ViT with
  sin-cos absolute positions, so every method's encoder is the same and exports to plain timm).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_bench.backbone import ViTBackbone
from ssl_bench.errors import UserError
from ssl_bench.masking import BlockMaskGenerator
from ssl_bench.method import DataSpec, Method
from ssl_bench.registry import register_method
from ssl_bench.tokenizer import Tokenizer, check_compatible, load_tokenizer
from ssl_bench.tokenizer_training import ensure_tokenizer

BLR = 1.5e-3 * 256 / 2048  # the paper's lr 1.5e-3 at batch 2048, per 256 images


@register_method
class BEiT(Method):
    name = "beit"
    description = "BEiT (Bao et al. 2022): [MASK] embeddings in a full-sequence ViT predict a tokenizer's codes at ~40% block-masked patches"
    family = "mim"
    recipes = {
        "smoke": {"train": {"blr": 10 * BLR, "betas": (0.9, 0.999)}},
        "quick": {"train": {"blr": 10 * BLR, "betas": (0.9, 0.999)}},
        "full": {
            "train": {"blr": BLR, "betas": (0.9, 0.999), "weight_decay": 0.05, "epochs": 100, "warmup_epochs": 10},
            "model": {"drop_path": 0.1, "layer_scale": 0.1},
        },
    }

    def __init__(self, backbone: ViTBackbone, tokenizer: str | Tokenizer = "auto", mask_ratio: float = 75 / 196):
        super().__init__(backbone)
        self.mask_ratio = mask_ratio
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
        nn.init.trunc_normal_(self.mask_token, std=0.02)
        nn.init.trunc_normal_(self.head.weight, std=0.02)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def prepare(cls, cfg: dict, run_dir) -> dict:
        # "auto" -> train (or, on resume, reuse) RUN_DIR/tokenizer; a path -> validated, made absolute
        return {**cfg, "method": {**cfg["method"], "tokenizer": ensure_tokenizer(cfg, run_dir)}}

    def data_spec(self) -> DataSpec:
        return DataSpec(augmentation="mim", mask=BlockMaskGenerator(self.backbone.grid_size, self.mask_ratio))

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
        logits = self.head(x[mask])  # (M, vocab): masked positions only, M = B * N_mask
        target = targets[mask]  # (M,)
        self.log("token_acc", (logits.detach().argmax(-1) == target).float().mean())
        return {"loss_mim": F.cross_entropy(logits.float(), target)}
