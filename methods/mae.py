"""MAE: Masked Autoencoders Are Scalable Vision Learners (He et al., CVPR 2022).

The encoder sees only the visible patches (no mask tokens); a light decoder gets the visible latents
plus one shared mask token per masked patch, in original order with fixed sin-cos position
embeddings, and regresses the per-patch normalized pixels; the loss is the MSE on masked patches only.

Recipe (ViT-B, ImageNet-1K): mask ratio 0.75, decoder 512 wide x 8 blocks (16 heads), AdamW
betas (0.9, 0.95), wd 0.05, base lr 1.5e-4 x B/256, 40 warmup epochs, cosine, RandomResizedCrop + flip.
As the official models_mae.py: every LayerNorm has eps 1e-6; xavier_uniform init of every Linear
(encoder and decoder, zero biases) and of the patch projection seen as a Linear, cls and mask token
normal(0.02) (``init="mae"``; ``"timm"`` keeps timm's ViT init); weight decay on every weight with
more than one dimension, cls and mask token included; int(N * (1 - mask_ratio)) patches kept.
"""
from __future__ import annotations

import torch
from timm.models.vision_transformer import Block
from torch import nn

from ssl_bench.backbone import INIT_SCHEMES, ViTBackbone, gather_tokens, init_linears_, normalized_pixel_targets, patchify, sincos_pos_embed
from ssl_bench.config import SWITCH, Check
from ssl_bench.masking import RandomMaskGenerator, split_by_mask
from ssl_bench.method import DataSpec, Method
from ssl_bench.registry import register_method


class MAEDecoder(nn.Module):
    """Visible latents + mask tokens -> per-patch pixel predictions, (B, N, p*p*C)."""

    def __init__(self, encoder_dim: int, num_patches: int, grid_size: int, out_dim: int, dim: int, depth: int, heads: int):
        super().__init__()
        self.embed = nn.Linear(encoder_dim, dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))
        pos = torch.cat([torch.zeros(1, dim), sincos_pos_embed(dim, grid_size)])  # slot 0: cls
        self.register_buffer("pos_embed", pos.unsqueeze(0), persistent=False)
        self.blocks = nn.Sequential(*[Block(dim, heads, mlp_ratio=4.0, qkv_bias=True) for _ in range(depth)])
        self.norm = nn.LayerNorm(dim, eps=1e-6)  # as the blocks' norms (official: eps 1e-6 everywhere)
        self.head = nn.Linear(dim, out_dim)
        nn.init.normal_(self.mask_token, std=0.02)

    def forward(self, latent: torch.Tensor, ids_restore: torch.Tensor, extra_embed: torch.Tensor | None = None) -> torch.Tensor:
        # latent: (B, 1 + N_vis, D_enc); ids_restore: (B, N); extra_embed: broadcastable to (B, 1 + N, d),
        # added with the position embedding (MixedAE's segment embeddings); None for MAE.
        x = self.embed(latent)  # (B, 1 + N_vis, d)
        b, n = ids_restore.shape
        mask_tokens = self.mask_token.expand(b, n - (x.shape[1] - 1), -1)  # (B, N_mask, d)
        patches = torch.cat([x[:, 1:], mask_tokens], dim=1)  # visible first, then masked
        patches = gather_tokens(patches, ids_restore)  # (B, N, d), original patch order
        x = torch.cat([x[:, :1], patches], dim=1) + self.pos_embed
        if extra_embed is not None:
            x = x + extra_embed
        x = self.norm(self.blocks(x))
        return self.head(x[:, 1:])  # (B, N, p*p*C), cls dropped


def masked_mse(pred: torch.Tensor, target: torch.Tensor, where: torch.Tensor) -> torch.Tensor:
    """Mean over the patches flagged in ``where`` (B, N) of the per-patch MSE of (B, N, P) tensors."""
    per_patch = (pred.float() - target).pow(2).mean(dim=-1)  # (B, N)
    return (per_patch * where).sum() / where.sum()


@register_method
class MAE(Method):
    name = "mae"
    description = "Masked Autoencoder (He et al. 2022): encoder on the visible 25%, decoder regresses masked pixels"
    family = "mim"
    recipes = {
        "smoke": {"method": {"decoder_dim": 64, "decoder_depth": 1, "decoder_heads": 2}, "train": {"blr": 1.5e-3}},
        "quick": {"method": {"decoder_dim": 128, "decoder_depth": 2, "decoder_heads": 4}, "train": {"blr": 1.5e-3}},
        "full": {
            "method": {"decoder_dim": 256, "decoder_depth": 4, "decoder_heads": 8},
            "train": {"blr": 1.5e-4, "betas": (0.9, 0.95), "weight_decay": 0.05, "epochs": 100, "warmup_epochs": 10},
            "model": {"drop_path": 0.0},
        },
    }

    option_checks = {
        "mask_ratio": Check(0, 1, lo_open=True, hi_open=True),  # something to reconstruct, and one patch visible
        "decoder_dim": Check(1, integer=True), "decoder_depth": Check(1, integer=True), "decoder_heads": Check(1, integer=True),
        "norm_pix_loss": SWITCH, "init": Check(choices=INIT_SCHEMES),
    }

    def __init__(
        self,
        backbone: ViTBackbone,
        mask_ratio: float = 0.75,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        init: str = "mae",
    ):
        super().__init__(backbone)
        backbone.init_weights(init)  # first, so the encoder's start depends on the seed alone (= random_init's)
        self.mask_ratio, self.norm_pix_loss = mask_ratio, norm_pix_loss
        # None at ratio 0: no masking (MixedAE's mixing-only configuration)
        self.mask_generator = RandomMaskGenerator(self.backbone.grid_size, mask_ratio) if mask_ratio > 0 else None
        p, c = backbone.patch_size, backbone.in_chans
        self.decoder = MAEDecoder(
            backbone.embed_dim, backbone.num_patches, backbone.grid_size, p * p * c, decoder_dim, decoder_depth, decoder_heads
        )
        init_linears_(self.decoder, init)
        nn.init.normal_(self.decoder.mask_token, std=0.02)

    def data_spec(self) -> DataSpec:
        return DataSpec(augmentation="mim", mask=self.mask_generator)

    def no_weight_decay(self) -> set[str]:
        """None by name: the official optimizer decays cls and mask token too (only biases and norm
        weights are exempt; the position embeddings are fixed)."""
        return set()

    def reconstruction_target(self, images: torch.Tensor) -> torch.Tensor:
        p = self.backbone.patch_size
        return normalized_pixel_targets(images, p) if self.norm_pix_loss else patchify(images, p)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images, mask = batch["views"][0], batch["mask"]  # (B, C, H, W), (B, N) True = masked
        ids_keep, _, ids_restore = split_by_mask(mask, self.mask_generator.num_masked)
        latent = self.backbone.forward_visible(images, ids_keep)  # (B, 1 + N_vis, D): visible patches only
        pred = self.decoder(latent, ids_restore)  # (B, N, p*p*C)
        return {"loss_recon": masked_mse(pred, self.reconstruction_target(images), mask)}  # masked patches only
