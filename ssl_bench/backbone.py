"""timm Vision Transformers with the two forwards every method needs.

* ``forward_tokens(tokens, ids)``: the encoder over a chosen subset of patch tokens (MAE, CAE,
  MixedAE run it on visible patches only; BEiT passes all tokens with [MASK] embeddings swapped in).
* ``forward(images)``: the full sequence, returning the cls token and the patch tokens (evaluation).

Position embeddings are the fixed 2-D sin-cos table of MAE/CAE/MoCo v3; attention is timm's, which
calls PyTorch's ``scaled_dot_product_attention``.
"""
from __future__ import annotations

import math

import timm
import torch
from timm.models.beit import RelativePositionBias
from torch import nn

from ssl_bench.errors import UserError

# name -> (timm model name, width, depth, heads). Width/depth/heads can be overridden per run.
ARCHS = {
    "vit_tiny": ("vit_tiny_patch16_224", 192, 12, 3),
    "vit_small": ("vit_small_patch16_224", 384, 12, 6),
    "vit_base": ("vit_base_patch16_224", 768, 12, 12),
    "vit_large": ("vit_large_patch16_224", 1024, 24, 16),
}


def sincos_pos_embed(embed_dim: int, grid_size: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position embedding, (grid_size**2, embed_dim); half the channels encode
    the row, half the column, each as sin/cos of geometrically spaced frequencies."""
    if embed_dim % 4:
        raise UserError(f"embed_dim {embed_dim} must be divisible by 4 for 2-D sin-cos position embeddings")
    coords = torch.arange(grid_size, dtype=torch.float64)
    rows, cols = torch.meshgrid(coords, coords, indexing="ij")
    quarter = embed_dim // 4
    omega = 1.0 / 10000 ** (torch.arange(quarter, dtype=torch.float64) / quarter)

    def encode(pos: torch.Tensor) -> torch.Tensor:  # (G*G,) -> (G*G, D/2)
        angles = pos.reshape(-1, 1) * omega.reshape(1, -1)
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    return torch.cat([encode(cols), encode(rows)], dim=1).float()


INIT_SCHEMES = ("timm", "mae", "moco")


def init_linears_(module: nn.Module, scheme: str) -> None:
    """Re-initialise every Linear in ``module`` by a named scheme (zero biases) and its LayerNorms to 1 / 0.

    timm: trunc-normal(0.02), timm's ViT default. mae: xavier_uniform (MAE's models_mae.py, after JAX ViT).
    moco: xavier_uniform, with a ``qkv`` weight treated as three (D, D) blocks (MoCo v3's vits.py, timm's
    ``weight_init='moco'``).
    """
    if scheme not in INIT_SCHEMES:
        raise UserError(f"unknown init scheme '{scheme}'; choose one of: {', '.join(INIT_SCHEMES)}")
    for name, m in module.named_modules():
        if isinstance(m, nn.Linear):
            if scheme == "timm":
                nn.init.trunc_normal_(m.weight, std=0.02)
            elif scheme == "moco" and name.endswith("qkv"):
                bound = math.sqrt(6.0 / (m.weight.shape[0] // 3 + m.weight.shape[1]))
                nn.init.uniform_(m.weight, -bound, bound)
            else:
                nn.init.xavier_uniform_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm) and m.elementwise_affine:
            nn.init.ones_(m.weight)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


REL_POS_BIAS = ("none", "shared")


class ViTBackbone(nn.Module):
    """A timm ViT with fixed sin-cos position embeddings and a cls token.

    ``rel_pos_bias="shared"`` (BEiT's default) replaces the absolute position embedding by one learned
    relative position bias shared by all blocks (BEiT's ``RelativePositionBias``, timm's
    ``timm.models.beit``: a table of (2G-1)^2 + 3 entries per head, zero at init, added to the attention
    logits); a subset of positions (``forward_visible``) gets the rows and columns of its positions.

    Shapes: images (B, C, H, W) -> N = (H/p)*(W/p) patch tokens of width D.
    """

    def __init__(
        self,
        arch: str = "vit_tiny",
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        drop_path: float = 0.0,
        embed_dim: int | None = None,
        depth: int | None = None,
        num_heads: int | None = None,
        layer_scale: float | None = None,
        rel_pos_bias: str = "none",
    ):
        super().__init__()
        if rel_pos_bias not in REL_POS_BIAS:
            raise UserError(f"unknown model.rel_pos_bias '{rel_pos_bias}'; choose one of: {', '.join(REL_POS_BIAS)}")
        if arch not in ARCHS:
            raise UserError(f"unknown arch '{arch}'; choose one of: {', '.join(ARCHS)}")
        if img_size % patch_size:
            raise UserError(f"img_size {img_size} is not divisible by patch_size {patch_size}; change model.patch_size")
        timm_name, width, n_layers, heads = ARCHS[arch]
        self.arch = arch
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.embed_dim = embed_dim or width
        self.depth = depth or n_layers
        self.num_heads = num_heads or heads
        if self.embed_dim % self.num_heads:
            raise UserError(f"model.embed_dim={self.embed_dim} is not divisible by model.num_heads={self.num_heads}; change one of them")
        self.vit = timm.create_model(
            timm_name,
            pretrained=False,
            num_classes=0,
            img_size=img_size,
            patch_size=patch_size,
            in_chans=in_chans,
            embed_dim=self.embed_dim,
            depth=self.depth,
            num_heads=self.num_heads,
            drop_path_rate=drop_path,
            init_values=layer_scale,  # LayerScale (CaiT), used by BEiT and CAE: residual branches start at x layer_scale
            pos_embed="none" if rel_pos_bias == "shared" else "learn",
        )
        self.layer_scale = layer_scale
        self.drop_path_rate = drop_path  # a method's own blocks may follow it (CAE's regressor and decoder)
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.rel_pos_bias = RelativePositionBias((self.grid_size,) * 2, self.num_heads) if rel_pos_bias == "shared" else None
        if self.vit.pos_embed is not None:
            pos = sincos_pos_embed(self.embed_dim, self.grid_size)
            # timm keeps the cls slot in pos_embed; ours is zero there (as in MAE) and frozen.
            self.vit.pos_embed.data.copy_(torch.cat([torch.zeros(1, self.embed_dim), pos]).unsqueeze(0))
            self.vit.pos_embed.requires_grad_(False)
        self.vit.patch_embed.strict_img_size = False  # smaller square views (multi-crop) get an interpolated table
        nn.init.normal_(self.vit.cls_token, std=0.02)

    def init_weights(self, scheme: str = "timm") -> None:
        """Re-initialise the weights as a method's official code does (see :func:`init_linears_`).

        timm: timm's Linears, PyTorch's default Conv2d patch projection, cls token normal(0.02) (the
        constructor's init). mae: patch projection initialised as a Linear with xavier_uniform, cls
        normal(0.02). moco: the same patch projection (MoCo v3's uniform(+-sqrt(6 / (C*p*p + D))) for
        C = 3), cls normal(1e-6), and MoCo v3's sin-cos table, whose first half encodes the row (MAE's,
        the default, encodes the column first: the same table with its two halves swapped).
        """
        init_linears_(self.vit, scheme)
        proj = self.vit.patch_embed.proj  # Conv2d (D, C, p, p): a linear map of each flattened patch
        if scheme == "timm":
            proj.reset_parameters()
        else:
            nn.init.xavier_uniform_(proj.weight.data.view(proj.weight.shape[0], -1))
            nn.init.zeros_(proj.bias)
        nn.init.normal_(self.vit.cls_token, std=1e-6 if scheme == "moco" else 0.02)
        if self.vit.pos_embed is None:  # rel_pos_bias="shared": no absolute table
            return
        pos = sincos_pos_embed(self.embed_dim, self.grid_size)  # (N, D): column half, row half
        if scheme == "moco":
            pos = pos.roll(self.embed_dim // 2, dims=1)  # row half first
        self.vit.pos_embed.data.copy_(torch.cat([torch.zeros(1, self.embed_dim), pos]).unsqueeze(0))

    # -- metadata -----------------------------------------------------------------------------------
    def signature(self) -> dict:
        """What must match for a checkpoint to load into this backbone (``layer_scale`` only when used,
        so signatures of encoders without it read as before)."""
        sig = {
            "arch": self.arch, "img_size": self.img_size, "patch_size": self.patch_size,
            "in_chans": self.in_chans, "embed_dim": self.embed_dim, "depth": self.depth,
            "num_heads": self.num_heads,
        }
        if self.layer_scale is not None:
            sig["layer_scale"] = self.layer_scale
        if self.rel_pos_bias is not None:
            sig["rel_pos_bias"] = "shared"
        return sig

    @property
    def blocks(self) -> nn.Sequential:
        return self.vit.blocks

    @property
    def patch_pos_embed(self) -> torch.Tensor:  # (1, N, D), frozen
        if self.vit.pos_embed is None:
            raise UserError("this encoder has no absolute position embedding (model.rel_pos_bias=shared); "
                            "this method needs one: set model.rel_pos_bias=none")
        return self.vit.pos_embed[:, 1:]

    def pos_embed_for(self, n: int) -> torch.Tensor:
        """(1, n, D) position embeddings for a square grid of ``n`` patches: the table at the native grid,
        otherwise the table resized bicubically (DINO's interpolate_pos_encoding, for multi-crop views)."""
        if n == self.num_patches:
            return self.patch_pos_embed
        side = math.isqrt(n)
        if side * side != n:
            raise UserError(f"views must be square: {n} patches is not a square grid")
        grid = self.patch_pos_embed.reshape(1, self.grid_size, self.grid_size, -1).permute(0, 3, 1, 2)
        grid = nn.functional.interpolate(grid, size=(side, side), mode="bicubic", align_corners=False)
        return grid.permute(0, 2, 3, 1).reshape(1, n, -1)

    # -- forwards ---------------------------------------------------------------------------------------
    def embed_patches(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, D) patch embeddings, without position embeddings."""
        return self.vit.patch_embed(images)

    def forward_tokens(self, tokens: torch.Tensor, ids: torch.Tensor | None = None) -> torch.Tensor:
        """Run the encoder on patch embeddings at positions ``ids``.

        tokens: (B, n, D) patch embeddings (no position embedding yet), one per entry of ids.
        ids:    (B, n) patch indices in [0, N); None means all N patches in order.
        Returns (B, 1 + n, D): the cls token then the n patch tokens, after the final norm.
        """
        if self.rel_pos_bias is not None:
            return self._forward_rel_pos(tokens, ids)
        pos = (self.patch_pos_embed if ids is not None else self.pos_embed_for(tokens.shape[1])).expand(tokens.shape[0], -1, -1)
        if ids is not None:
            pos = torch.gather(pos, 1, ids.unsqueeze(-1).expand(-1, -1, pos.shape[-1]))
        x = tokens + pos
        cls = (self.vit.cls_token + self.vit.pos_embed[:, :1]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        x = self.vit.blocks(x)
        return self.vit.norm(x)

    def _forward_rel_pos(self, tokens: torch.Tensor, ids: torch.Tensor | None) -> torch.Tensor:
        """``forward_tokens`` with the shared relative position bias and no absolute position embedding."""
        bias = self.rel_pos_bias()  # (H, 1 + N, 1 + N), slot 0: the cls token
        if ids is None and tokens.shape[1] != self.num_patches:
            raise UserError("model.rel_pos_bias=shared has a bias table for the native grid only; use views at the data's image size")
        if ids is None:
            bias = bias.unsqueeze(0)  # (1, H, 1 + N, 1 + N)
        else:  # the rows and columns of the cls token and the chosen positions: (B, H, 1 + n, 1 + n)
            slots = torch.cat([ids.new_zeros(ids.shape[0], 1), ids + 1], dim=1)
            bias = bias[:, slots.unsqueeze(-1), slots.unsqueeze(-2)].transpose(0, 1)
        x = torch.cat([self.vit.cls_token.expand(tokens.shape[0], -1, -1), tokens], dim=1)
        for block in self.vit.blocks:
            x = block(x, attn_mask=bias.to(x.dtype))
        return self.vit.norm(x)

    def forward_visible(self, images: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """Encode only the patches at ``ids_keep`` (B, n): (B, 1 + n, D). The other patches never
        enter the encoder, so nothing of them can leak into its output."""
        tokens = self.embed_patches(images)
        tokens = torch.gather(tokens, 1, ids_keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        return self.forward_tokens(tokens, ids_keep)

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Full sequence: cls (B, D) and patch tokens (B, N, D)."""
        x = self.forward_tokens(self.embed_patches(images))
        return x[:, 0], x[:, 1:]


def gather_tokens(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """x (B, N, D), ids (B, n) -> (B, n, D)."""
    return torch.gather(x, 1, ids.unsqueeze(-1).expand(-1, -1, x.shape[-1]))


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, N, p*p*C), patches in row-major order, pixels (p, p, C) inside."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    x = torch.einsum("bchpwq->bhwpqc", x)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: torch.Tensor, patch_size: int, channels: int) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, N, p*p*C) -> (B, C, H, W)."""
    b, n, _ = patches.shape
    g = int(math.isqrt(n))
    p = patch_size
    x = patches.reshape(b, g, g, p, p, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(b, channels, g * p, g * p)


def normalized_pixel_targets(images: torch.Tensor, patch_size: int, eps: float = 1e-6) -> torch.Tensor:
    """Per-patch normalized pixels (MAE's norm_pix_loss): (B, N, p*p*C)."""
    target = patchify(images, patch_size)
    mean = target.mean(dim=-1, keepdim=True)
    var = target.var(dim=-1, keepdim=True)
    return (target - mean) / (var + eps).sqrt()


class PixelEncoder(nn.Module):
    """The raw-pixels control: no encoder at all. Every probe sees the (normalised) input pixels.

    Shapes: images (B, C, H, W) -> cls = the flattened image (B, C*H*W) and one "patch token", the same
    vector (B, 1, C*H*W), so the kNN and linear probes (cls), the mean feature and the attentive probe
    (over the whole sequence) all read the pixels themselves. It has no weights, so nothing to fine-tune.
    """

    kind = "pixels"

    def __init__(self, img_size: int, in_chans: int):
        super().__init__()
        self.img_size, self.in_chans = img_size, in_chans
        self.patch_size, self.grid_size, self.num_patches = img_size, 1, 1
        self.embed_dim = in_chans * img_size * img_size
        self.num_heads, self.depth = 1, 0

    def signature(self) -> dict:
        return {"kind": self.kind, "img_size": self.img_size, "in_chans": self.in_chans}

    def forward(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        flat = images.flatten(1)
        return flat, flat.unsqueeze(1)


def build_encoder(signature: dict) -> nn.Module:
    """The encoder a checkpoint's signature describes: a ViTBackbone, or the raw-pixels control."""
    signature = dict(signature)
    if signature.pop("kind", "vit") == PixelEncoder.kind:
        return PixelEncoder(**signature)
    return ViTBackbone(**signature)
