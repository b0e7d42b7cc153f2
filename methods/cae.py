"""CAE: Context Autoencoder for Self-Supervised Representation Learning (Chen et al., IJCV 2023, arXiv 2202.03026).

Four parts, with the encoder the only one kept after pretraining:

* Encoder F: the ViT on the visible patches only (cls token kept) -> Zv.
* Latent contextual regressor H: cross-attention blocks whose queries are one shared learned mask token
  plus each masked patch's position embedding; keys/values are cat(Zv, current queries), keys with their
  position embeddings, values without. Zv itself is never updated, so the prediction of the masked
  latents happens in the encoder's representation space instead of inside the encoder.
* Alignment: the target for H's output is F run on the MASKED patches only, with the encoder's current
  weights under no_grad (the official code copies the weights every step: a stop-gradient, not an EMA),
  cls removed. Loss MSE(H(Zv), sg F(Xm)).
* Decoder G: self-attention blocks over the predicted masked latents + their position embeddings ONLY
  (never Zv), LN, linear head -> per-patch targets: normalized pixels (MSE) or a discrete tokenizer's
  codes (cross-entropy). The paper reports pixels and tokens perform similarly (Table 8).

L = L_recon + lambda * L_align, lambda = 2. Block-wise masking of 50%.

As the official code (github.com/Atten4Vis/CAE, a7fd162; tests/reference/test_cae_reference.py checks the
loss and gradients against it on the same weights and inputs):
* Regressor block: x = q + g1 * CrossAttn(LN(q + pos_q), LN(kv + pos_kv), LN(kv)); x = LN(x);
  x = x + g2 * MLP(x) (the second LN normalizes the residual stream, not only the MLP input); layer scale
  g init 0.1; one final LN after the last block. Keys/values are cat(Zv, queries) with Zv the visible
  patch latents only: the encoder's cls token is dropped before the regressor (official code and paper).
* Stochastic depth in the regressor and the decoder rising linearly to the encoder's rate (model.drop_path:
  0.1 in the full recipe); LayerNorm eps 1e-6 everywhere.
* Init (``init="cae"``): xavier_uniform for every Linear of encoder, regressor and decoder (the official
  model re-initialises them all after building), zero biases; the patch projection, cls token and mask
  token normal(0.02) truncated at +-0.02; the fixed sin-cos table with the row in its first half, as the
  official table (the same table as MAE's with its halves swapped). ``init="timm"`` keeps timm's encoder init.
* Targets: the official ones are the visual tokens of DALL-E's 8192-code dVAE (cross-entropy on the masked
  patches). DALL-E's weights cannot be downloaded here, so ``target="tokens"`` (the default) reads a VQ-VAE
  from ``ssl_bench.tokenizer`` trained without labels on the run's own images (``tokenizer="auto"``, trained
  in ``prepare``; the paper's d-VAE trained on ImageNet-1K is the precedent), one at a given path, or
  OpenAI's released encoder as ``dalle:/path/to/encoder.pkl`` (``ssl_bench.dalle``). It reads the same
  augmented view as the encoder, uncorrupted. ``target="pixels"`` (normalized pixels, MSE) is the paper's
  Table 8 alternative, which it reports performs similarly.
* Augmentation: RandomResizedCrop scale 0.08-1 + flip, no colour jitter (run_pretraining.py defaults).
* Masking: CAE's block-wise generator, exactly 98 of 196 patches (``BlockMaskGenerator(exact=True)``).
* The alignment target runs the encoder in whatever mode the method is in, as the official copied
  encoder does (so drop path also applies to the target while training).
* Weight decay: every parameter except biases and norms (the official model declares no exemptions).

Our own choices:
* No decoder (``use_decoder=False``, the paper's ablation: attentive 71.2 vs 73.8): the decoder's blocks
  are dropped and the targets are predicted from H's output by the decoder's LN + linear head alone.
* The regressor and decoder are as wide as the encoder and use its head count (the official ViT-B
  setting: decoder_embed_dim 768, 12 heads).

Recipe (ViT-B, ImageNet-1K): AdamW betas (0.9, 0.999) (the official script keeps PyTorch's default), lr
1.5e-3 at batch 2048 (blr 1.875e-4), wd 0.05, drop path 0.1, grad clip 3.0, layer scale 0.1, warmup
10/20/40 epochs for 300/800/1600, regressor and decoder depth 4 (1: attentive 67.5, 2: 71.1, 4: 73.8,
5: 73.7), 98 of 196 patches masked block-wise.
"""
from __future__ import annotations

from functools import partial

import torch
import torch.nn.functional as F
from timm.layers import DropPath, Mlp
from timm.models.vision_transformer import Block
from torch import nn

from ssl_bench.backbone import ViTBackbone, gather_tokens, init_linears_, normalized_pixel_targets
from ssl_bench.data import views
from ssl_bench.errors import UserError
from ssl_bench.layers import CrossAttention, trunc_normal_within_std_
from ssl_bench.masking import BlockMaskGenerator, split_by_mask
from ssl_bench.method import DataSpec, Method
from ssl_bench.registry import register_method
from ssl_bench.tokenizer import check_compatible, load_tokenizer
from ssl_bench.tokenizer_training import ensure_tokenizer

LAYER_SCALE_INIT = 0.1  # CAE's regressor and decoder layer scale
TARGETS = ("tokens", "pixels")
INITS = ("cae", "timm")
LayerNorm = partial(nn.LayerNorm, eps=1e-6)  # the official norm layer


def drop_path_rates(rate: float, depth: int) -> list[float]:
    """Stochastic depth rising linearly from 0 at the first block to ``rate`` at the last (timm, BEiT, CAE)."""
    return torch.linspace(0, rate, depth).tolist() if depth else []


class RegressorBlock(nn.Module):
    """Queries (masked positions) attend to cat(Zv, queries); only the queries are updated."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0, drop_path: float = 0.0):
        super().__init__()
        self.norm_q, self.norm_k, self.norm_v = LayerNorm(dim), LayerNorm(dim), LayerNorm(dim)
        self.attn = CrossAttention(dim, heads)
        self.norm_mlp = LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio))
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.gamma1 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))
        self.gamma2 = nn.Parameter(torch.full((dim,), LAYER_SCALE_INIT))

    def forward(self, q: torch.Tensor, kv: torch.Tensor, pos_q: torch.Tensor, pos_kv: torch.Tensor) -> torch.Tensor:
        # q: (B, Nm, D) queries; kv: (B, Nv + Nm, D) = cat(Zv, q); keys get positions, values do not
        x = q + self.drop_path(self.gamma1 * self.attn(self.norm_q(q + pos_q), self.norm_k(kv + pos_kv), self.norm_v(kv)))
        x = self.norm_mlp(x)
        return x + self.drop_path(self.gamma2 * self.mlp(x))


class LatentRegressor(nn.Module):
    """H: (Zv, mask-token queries) -> predicted masked latents (B, Nm, D), in the encoder's space."""

    def __init__(self, dim: int, depth: int, heads: int, drop_path: float = 0.0):
        super().__init__()
        self.blocks = nn.ModuleList([RegressorBlock(dim, heads, drop_path=r) for r in drop_path_rates(drop_path, depth)])
        self.norm = LayerNorm(dim)

    def forward(self, queries: torch.Tensor, z_vis: torch.Tensor, pos_q: torch.Tensor, pos_vis: torch.Tensor) -> torch.Tensor:
        # queries (B, Nm, D), z_vis (B, Nv, D) visible patch latents (no cls), pos_q (B, Nm, D), pos_vis (B, Nv, D)
        pos_kv = torch.cat([pos_vis, pos_q], dim=1)
        for block in self.blocks:
            # Zv enters every block as it left the encoder; only the queries change from block to block
            queries = block(queries, torch.cat([z_vis, queries], dim=1), pos_q, pos_kv)
        return self.norm(queries)


class CAEDecoder(nn.Module):
    """G: predicted masked latents (+ their positions) -> per-patch targets (B, Nm, out_dim).

    It never sees the visible latents. With depth 0 it is the LN + linear head alone (no-decoder ablation).
    """

    def __init__(self, dim: int, depth: int, heads: int, out_dim: int, drop_path: float = 0.0):
        super().__init__()
        self.blocks = nn.Sequential(*[
            Block(dim, heads, mlp_ratio=4.0, qkv_bias=True, init_values=LAYER_SCALE_INIT, drop_path=r, norm_layer=LayerNorm)
            for r in drop_path_rates(drop_path, depth)
        ])
        self.norm = LayerNorm(dim)
        self.head = nn.Linear(dim, out_dim)

    def forward(self, z_masked: torch.Tensor, pos_masked: torch.Tensor) -> torch.Tensor:
        x = self.blocks(z_masked + pos_masked) if len(self.blocks) else z_masked  # (B, Nm, D)
        return self.head(self.norm(x))


@register_method
class CAE(Method):
    name = "cae"
    description = "Context Autoencoder (Chen et al. 2022): regress masked latents from visible ones, align, decode"
    family = "mim"
    recipes = {
        "smoke": {
            "method": {"regressor_depth": 1, "decoder_depth": 1},
            "train": {"blr": 1.5e-3, "betas": (0.9, 0.999), "clip_grad": 3.0},
            "model": {"layer_scale": 0.1},
        },
        "quick": {
            "method": {"regressor_depth": 2, "decoder_depth": 2},
            "train": {"blr": 1.5e-3, "betas": (0.9, 0.999), "clip_grad": 3.0},
            "model": {"layer_scale": 0.1},
        },
        "full": {
            "method": {"regressor_depth": 4, "decoder_depth": 4},
            "train": {
                "blr": 1.5e-3 * 256 / 2048, "betas": (0.9, 0.999), "weight_decay": 0.05, "clip_grad": 3.0,
                "epochs": 100, "warmup_epochs": 10,
            },
            "model": {"drop_path": 0.1, "layer_scale": 0.1},
        },
    }
    prepare_rewrites = ("method.tokenizer",)  # prepare() trains or sets up the tokenizer "auto" / "dalle:" names

    def __init__(
        self,
        backbone: ViTBackbone,
        mask_ratio: float = 0.5,
        regressor_depth: int = 4,
        decoder_depth: int = 4,
        align_weight: float = 2.0,
        use_alignment: bool = True,
        use_decoder: bool = True,
        target: str = "tokens",
        tokenizer: str = "auto",
        init: str = "cae",
    ):
        super().__init__(backbone)
        if target not in TARGETS:
            raise UserError(f"unknown method.target '{target}'; choose one of: {', '.join(TARGETS)}")
        if init not in INITS:
            raise UserError(f"unknown method.init '{init}'; choose one of: {', '.join(INITS)}")
        if not 0.0 < mask_ratio < 1.0:
            raise UserError(f"method.mask_ratio={mask_ratio} must be in (0, 1); CAE masks 0.5")
        if regressor_depth < 1:
            raise UserError(f"method.regressor_depth={regressor_depth} must be at least 1; CAE uses 4")
        if use_decoder and decoder_depth < 1:
            raise UserError(f"method.decoder_depth={decoder_depth} must be at least 1; to drop the decoder set method.use_decoder=false")
        if align_weight < 0:
            raise UserError(f"method.align_weight={align_weight} must be >= 0 (0 switches the alignment off)")
        self.mask_ratio, self.target = mask_ratio, target
        self.mask_generator = BlockMaskGenerator(backbone.grid_size, mask_ratio, exact=True)
        self.align_weight = align_weight
        self.use_alignment = use_alignment and align_weight > 0
        dim, heads, drop_path = backbone.embed_dim, backbone.num_heads, backbone.drop_path_rate

        self.tokenizer = None
        if target == "tokens":
            self.tokenizer = self._load_tokenizer(tokenizer, backbone)
            out_dim = self.tokenizer.vocab_size
        else:
            out_dim = backbone.patch_size**2 * backbone.in_chans

        self.mask_token = nn.Parameter(torch.zeros(1, 1, dim))  # one query for every masked position
        self.regressor = LatentRegressor(dim, regressor_depth, heads, drop_path)
        self.decoder = CAEDecoder(dim, decoder_depth if use_decoder else 0, heads, out_dim, drop_path)
        if init == "cae":
            for part in (backbone.vit, self.regressor, self.decoder):  # never the frozen tokenizer
                init_linears_(part, "mae")  # xavier_uniform, zero biases; LayerNorms 1 / 0
            for tensor in (backbone.vit.patch_embed.proj.weight, backbone.vit.cls_token, self.mask_token):
                trunc_normal_within_std_(tensor)
            nn.init.zeros_(backbone.vit.patch_embed.proj.bias)
            with torch.no_grad():  # the official sin-cos table encodes the row in its first half (ours: the column)
                backbone.vit.pos_embed[:, 1:] = backbone.vit.pos_embed[:, 1:].roll(dim // 2, dims=-1)
        else:
            for part in (self.regressor, self.decoder):
                init_linears_(part, "timm")
            nn.init.trunc_normal_(self.mask_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return set()  # the official optimizer exempts biases and norms only (1-D parameters)

    # -- targets -----------------------------------------------------------------------------------
    @classmethod
    def prepare(cls, cfg: dict, run_dir) -> dict:
        """Token targets need a tokenizer: ``method.tokenizer="auto"`` trains one into ``run_dir/tokenizer/``
        (reused on resume), a path is validated; the resolved path goes back into the config."""
        if cfg["method"]["target"] == "tokens":
            cfg = {**cfg, "method": {**cfg["method"], "tokenizer": ensure_tokenizer(cfg, run_dir)}}
        return cfg

    @staticmethod
    def _load_tokenizer(path: str, backbone: ViTBackbone) -> nn.Module:
        if path == "auto":
            raise UserError(
                "method.tokenizer=auto is resolved when pretraining starts (CAE.prepare); "
                "to build CAE directly pass method.tokenizer=<path to a trained tokenizer>"
            )
        tokenizer = load_tokenizer(path)  # frozen, eval mode
        check_compatible(tokenizer, backbone)
        return tokenizer  # a submodule only so that it follows the method's device

    def train(self, mode: bool = True):
        super().train(mode)
        if self.tokenizer is not None:
            self.tokenizer.eval()  # the tokenizer is fixed; it never switches to training mode
        return self

    def reconstruction_loss(self, pred: torch.Tensor, images: torch.Tensor, ids_masked: torch.Tensor) -> torch.Tensor:
        """pred (B, Nm, out_dim) against the masked patches' targets."""
        if self.target == "tokens":
            with torch.no_grad():  # codes of the uncorrupted view at the masked positions, (B, Nm)
                codes = gather_tokens(self.tokenizer.tokenize(images).unsqueeze(-1), ids_masked).squeeze(-1)
            self.log("token_acc", (pred.detach().argmax(-1) == codes).float().mean())
            return F.cross_entropy(pred.float().flatten(0, 1), codes.flatten())
        target = gather_tokens(normalized_pixel_targets(images, self.backbone.patch_size), ids_masked)  # (B, Nm, p*p*C)
        return F.mse_loss(pred.float(), target)

    # -- the algorithm -----------------------------------------------------------------------------
    def data_spec(self) -> DataSpec:
        # RandomResizedCrop scale 0.08-1 + flip, no colour jitter (run_pretraining.py's defaults)
        return DataSpec(
            augmentation=views.mim(crop_scale=(0.08, 1.0)),
            mask=self.mask_generator,
        )

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images, mask = batch["views"][0], batch["mask"]  # (B, C, H, W), (B, N) True = masked
        ids_keep, ids_masked, _ = split_by_mask(mask, self.mask_generator.num_masked)  # (B, Nv), (B, Nm)
        b = images.shape[0]

        # F: encoder on the visible patches only -> Zv (B, Nv, D); its cls token is not part of the context
        z_vis = self.backbone.forward_visible(images, ids_keep)[:, 1:]
        pos = self.backbone.patch_pos_embed.expand(b, -1, -1)  # (B, N, D), fixed sin-cos
        pos_vis, pos_masked = gather_tokens(pos, ids_keep), gather_tokens(pos, ids_masked)  # (B, Nv, D), (B, Nm, D)

        # H: the shared mask token queries every masked position -> predicted latents (B, Nm, D)
        queries = self.mask_token.expand(b, ids_masked.shape[1], -1)
        z_pred = self.regressor(queries, z_vis, pos_masked, pos_vis)

        # G: decode from the predicted latents only (never Zv) -> (B, Nm, out_dim)
        pred = self.decoder(z_pred, pos_masked)
        losses = {"loss_recon": self.reconstruction_loss(pred, images, ids_masked)}

        if self.use_alignment:
            with torch.no_grad():  # stop-gradient: the current encoder on the masked patches, cls dropped
                z_target = self.backbone.forward_visible(images, ids_masked)[:, 1:]  # (B, Nm, D)
            align = F.mse_loss(z_pred.float(), z_target.float())
            self.log("align_mse", align)
            losses["loss_align"] = self.align_weight * align
        return losses
