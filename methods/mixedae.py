"""MixedAE: Mixed Autoencoder for Self-supervised Visual Representation Learning
(Chen, Liu, Hong, Xu, Li, Yeung; CVPR 2023; arXiv 2303.17152).

MAE with image mixing plus *homologous recognition*, the auxiliary task that makes mixing help:

1. Mixing. The batch is split into groups of G = 1/r images (r = mixing ratio, r = 0.5 mixes pairs).
   A random mixing mask M (one source index in [0, G) per patch position, each source owning N/G
   positions) builds one mixed image per group: its patch p is patch p of source M[p].
2. MAE masking of the mixed image, then the encoder sees its visible patches only.
3. Homologous attention: in every encoder self-attention, each query keeps only its TopK keys before
   the softmax, A = softmax(TopK(q k^T / sqrt(d))), with K = ceil(r * L) for a sequence of L tokens
   (the expected number of tokens from the query's own source), so a patch learns to attend to its
   homologous patches. Only during pretraining: outside ``training_step`` the same weights run dense
   attention, so the encoder is a plain ViT for evaluation and fine-tuning (its state dict loads into
   a ``ViTBackbone``).
4. Symmetric reconstruction: the decoder rebuilds *every* source of the group from the one mixed
   latent, one decoder pass per source; a learned segment embedding of that source, added to every
   decoder token with the position embedding, tells the decoder which source the patches it
   reconstructs belong to. The loss of source g covers every patch of g the encoder did not see
   (masked positions and positions showing another source), with MAE's normalized-pixel targets.
5. Homologous contrastive: InfoNCE over the visible patch features of one mixed image, cosine
   similarity / tau; positives of a patch = the other visible patches of its source, negatives = the
   patches of the other sources (multi-positive form of Khosla et al. 2020, averaged over positives).
   Added to the reconstruction loss with weight ``contrastive_weight``.

Ablation switches: ``homo_attention``, ``homo_contrastive``, ``segment_embed``. Without segment
embeddings the decoder has nothing that says which source to rebuild, so symmetric reconstruction is
ill-posed; then the method reconstructs the mixed image itself, i.e. it is exactly MAE trained on
mixed inputs (the naive-mixing baseline).

UNVERIFIED CHOICES. No official code is public and the paper's method section could not be read here
(only its abstract and introduction), so each value below is a choice, not a confirmed fact, and each is
a named option (``method.<name>``) whose default is the value used so far:
- ``mix_ratio`` r = 0.5 (groups of 2). r = 0.5 is the spec's example; the unofficial reimplementation
  github.com/Natyren/MixedAE mixes groups of 4 (r = 0.25). Any r with 1/r an integer works.
- ``topk_ratio`` (K): None = K = ceil(r * L) for a sequence of L tokens (spec: "K set by the expected
  number of same-source patches"; exact rule unverified); a number sets K = ceil(topk_ratio * L). TopK is
  applied in every encoder block (unverified).
- ``temperature`` tau = 0.25 of the homologous contrastive loss.
- ``contrastive_weight`` = 0.1, its weight beside the reconstruction loss (the unofficial code uses other,
  ad hoc values).
- ``segment_embed_place`` = "decoder": one learned embedding per source, added to every decoder token with
  the position embedding. "both" also adds a second set, in encoder width, to the encoder's input patches
  by their source, where the unofficial code puts them (it lets the encoder read a patch's source off its
  input, which may make homologous recognition trivial, so it is not the default).
- ``mask_ratio`` = 0.5, the MAE masking of the mixed image: each source then keeps 25% of its patches
  visible, MAE's share, and the encoder sees (B / G) * N / 2 = B * N / 4 tokens per batch, as MAE does,
  in line with the paper's "3% extra overhead over MAE" (abstract/intro figure). r = 0.25 with
  mask_ratio = 0 is the other configuration with the same budget.
Published (spec): 300 ep ViT-B fine-tune 83.1 vs MAE 82.7; ADE20K 47.0 vs 46.1.
Recipe: MAE's (AdamW betas (0.9, 0.95), wd 0.05, blr 1.5e-4, cosine with warmup); presets = MAE's.
"""
from __future__ import annotations

import contextlib
import math

import torch
import torch.nn.functional as F
from timm.models.vision_transformer import Attention
from torch import nn

from methods.mae import MAE, masked_mse
from ssl_bench.backbone import ViTBackbone, gather_tokens, patchify, unpatchify
from ssl_bench.config import Check
from ssl_bench.errors import UserError
from ssl_bench.masking import RandomMaskGenerator, split_by_mask
from ssl_bench.method import DataSpec
from ssl_bench.registry import register_method


SEGMENT_EMBED_PLACES = ("decoder", "both")


def group_size(mix_ratio: float) -> int:
    """G = 1/r images per mixed image; r must be in (0, 0.5] with 1/r an integer."""
    if not 0.0 < mix_ratio <= 0.5 or abs(round(1 / mix_ratio) * mix_ratio - 1) > 1e-6:
        raise UserError(f"method.mix_ratio={mix_ratio} is invalid; use 1/G for an integer G >= 2 (0.5, 0.25, ...)")
    return round(1 / mix_ratio)


def draw_sources(num_groups: int, num_patches: int, group: int) -> torch.Tensor:
    """Random mixing masks M, (num_groups, N) in [0, G): a random permutation of the positions dealt
    round-robin to the G sources, so each source owns floor or ceil(N / G) positions."""
    ranks = torch.rand(num_groups, num_patches).argsort(dim=1).argsort(dim=1)  # a random permutation
    return ranks % group


def mix_images(images: torch.Tensor, sources: torch.Tensor, patch_size: int) -> torch.Tensor:
    """images (B, C, H, W), consecutive groups of G = B / n_groups; sources (n_groups, N) -> mixed
    (n_groups, C, H, W) whose patch p is patch p of image sources[j, p] of group j."""
    n_groups, n = sources.shape
    patches = patchify(images, patch_size)  # (B, N, P)
    patches = patches.reshape(n_groups, -1, n, patches.shape[-1])  # (n_groups, G, N, P)
    index = sources[:, None, :, None].expand(-1, 1, -1, patches.shape[-1])  # (n_groups, 1, N, P)
    mixed = torch.gather(patches, 1, index).squeeze(1)  # (n_groups, N, P)
    return unpatchify(mixed, patch_size, images.shape[1])


def topk_attention_weights(q: torch.Tensor, k: torch.Tensor, topk: int, scale: float) -> torch.Tensor:
    """softmax(TopK(q k^T * scale)): (..., Lq, Lk) weights with exactly ``topk`` keys per query.

    The kept keys are chosen by index (not by a score threshold), so ties cannot keep more than K.
    """
    scores = (q * scale) @ k.transpose(-2, -1)  # (B, h, Lq, Lk)
    kept = scores.topk(topk, dim=-1).indices
    keep = torch.zeros_like(scores, dtype=torch.bool).scatter_(-1, kept, True)
    return scores.masked_fill(~keep, float("-inf")).softmax(dim=-1)


class HomologousAttention(nn.Module):
    """Takes the place of a timm ``Attention`` and reuses its submodules under the same names, so the
    block's parameters and state-dict keys are unchanged. ``topk`` None: dense attention (exactly
    timm's); an int K: each query attends to its K highest-scoring keys only."""

    def __init__(self, attn: Attention):
        super().__init__()
        if getattr(attn, "gate", None) is not None:
            raise UserError("homologous attention does not support gated timm attention; set method.homo_attention=false")
        self.num_heads, self.head_dim, self.scale = attn.num_heads, attn.head_dim, attn.scale
        self.qkv, self.q_norm, self.k_norm = attn.qkv, attn.q_norm, attn.k_norm
        self.attn_drop, self.norm, self.proj, self.proj_drop = attn.attn_drop, attn.norm, attn.proj, attn.proj_drop
        self.topk: int | None = None  # set by MixedAE for the duration of a training step

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False) -> torch.Tensor:
        if attn_mask is not None or is_causal:
            raise ValueError("HomologousAttention is a bidirectional encoder attention without masks")
        b, n, _ = x.shape
        qkv = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # each (B, h, L, d_head)
        q, k = self.q_norm(q), self.k_norm(k)
        if self.topk is None:
            x = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop.p if self.training else 0.0)
        else:
            x = self.attn_drop(topk_attention_weights(q, k, min(self.topk, n), self.scale)) @ v
        x = self.norm(x.transpose(1, 2).reshape(b, n, -1))
        return self.proj_drop(self.proj(x))


def homologous_positives(labels: torch.Tensor) -> torch.Tensor:
    """labels (M, n) source of each patch -> (M, n, n) bool: j is a positive of anchor i iff it comes
    from the same source and j != i."""
    same = labels.unsqueeze(-1) == labels.unsqueeze(-2)
    return same & ~torch.eye(labels.shape[-1], dtype=torch.bool, device=labels.device)


def homologous_contrastive_loss(features: torch.Tensor, labels: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cosine-similarity InfoNCE within each mixed image.

    features (M, n, D) patch features of M mixed images; labels (M, n) their sources. For anchor i:
    -mean_{p in P(i)} log( exp(s_ip / tau) / sum_{j != i} exp(s_ij / tau) ), s = cosine similarity;
    averaged over the anchors that have at least one positive.
    """
    with torch.autocast(features.device.type, enabled=False):  # similarities / tau in fp32, not bf16
        z = F.normalize(features.float(), dim=-1)
        logits = z @ z.transpose(-2, -1) / temperature  # (M, n, n)
    self_pair = torch.eye(logits.shape[-1], dtype=torch.bool, device=logits.device)
    log_prob = logits - logits.masked_fill(self_pair, float("-inf")).logsumexp(dim=-1, keepdim=True)
    positives = homologous_positives(labels)
    num_pos = positives.sum(dim=-1)  # (M, n)
    per_anchor = -(log_prob * positives).sum(dim=-1) / num_pos.clamp(min=1)
    has_pos = num_pos > 0
    return (per_anchor * has_pos).sum() / has_pos.sum().clamp(min=1)


@register_method
class MixedAE(MAE):
    name = "mixedae"
    description = "Mixed Autoencoder (Chen et al. 2023): MAE on mixed images + homologous attention/contrastive"
    family = "mim"
    recipes = MAE.recipes  # the paper trains with MAE's recipe
    option_checks = {**MAE.option_checks, "mask_ratio": Check(0, 1, hi_open=True)}  # 0: mixing only

    def __init__(
        self,
        backbone: ViTBackbone,
        mix_ratio: float = 0.5,
        mask_ratio: float = 0.5,
        decoder_dim: int = 512,
        decoder_depth: int = 8,
        decoder_heads: int = 16,
        norm_pix_loss: bool = True,
        homo_attention: bool = True,
        topk_ratio: float | None = None,
        homo_contrastive: bool = True,
        contrastive_weight: float = 0.1,
        temperature: float = 0.25,
        segment_embed: bool = True,
        segment_embed_place: str = "decoder",
    ):
        super().__init__(backbone, mask_ratio, decoder_dim, decoder_depth, decoder_heads, norm_pix_loss)
        self.group = group_size(mix_ratio)
        if not 0.0 <= mask_ratio < 1.0:
            raise UserError(f"method.mask_ratio={mask_ratio} must be in [0, 1) (0: mixing only, no extra masking)")
        self.topk_ratio = mix_ratio if topk_ratio is None else topk_ratio
        if not 0.0 < self.topk_ratio <= 1.0:
            raise UserError(f"method.topk_ratio={topk_ratio} must be in (0, 1], or none for the mixing ratio")
        if temperature <= 0:
            raise UserError(f"method.temperature={temperature} must be > 0")
        self.homo_contrastive, self.contrastive_weight, self.temperature = homo_contrastive, contrastive_weight, temperature
        self.homo_attention = homo_attention
        if homo_attention:  # this method's backbone only; other methods keep timm's attention
            for block in backbone.blocks:
                block.attn = HomologousAttention(block.attn)
        if segment_embed_place not in SEGMENT_EMBED_PLACES:
            raise UserError(f"unknown method.segment_embed_place '{segment_embed_place}'; choose one of: {', '.join(SEGMENT_EMBED_PLACES)}")
        # one learned embedding per source slot of a group, in decoder width (and in encoder width for "both")
        self.segment_embed = nn.Parameter(torch.randn(self.group, decoder_dim) * 0.02) if segment_embed else None
        with_encoder = segment_embed and segment_embed_place == "both"
        self.encoder_segment_embed = nn.Parameter(torch.randn(self.group, backbone.embed_dim) * 0.02) if with_encoder else None

    @classmethod
    def prepare(cls, cfg: dict, run_dir) -> dict:
        group = group_size(cfg["method"]["mix_ratio"])
        if cfg["train"]["batch_size"] % group:
            raise UserError(
                f"train.batch_size={cfg['train']['batch_size']} is not a multiple of the mixing group size "
                f"{group} (1/method.mix_ratio); choose a multiple"
            )
        return cfg

    def data_spec(self) -> DataSpec:
        return DataSpec(augmentation="mim", mask=self.mask_generator)

    def no_weight_decay(self) -> set[str]:
        return super().no_weight_decay() | {"segment_embed", "encoder_segment_embed"}

    @contextlib.contextmanager
    def homologous_attention(self, seq_len: int):
        """TopK attention with K = ceil(topk_ratio * L) in every encoder block, inside the with-block only."""
        modules = [m for m in self.backbone.modules() if isinstance(m, HomologousAttention)]
        k = max(1, math.ceil(self.topk_ratio * seq_len))
        for m in modules:
            m.topk = k
        try:
            yield
        finally:
            for m in modules:
                m.topk = None

    def encode(self, mixed: torch.Tensor, sources: torch.Tensor, ids_keep: torch.Tensor) -> torch.Tensor:
        """The encoder on the visible patches of the mixed images; with ``segment_embed_place="both"`` each
        patch first gets the encoder-width segment embedding of its source."""
        if self.encoder_segment_embed is None:
            return self.backbone.forward_visible(mixed, ids_keep)
        tokens = self.backbone.embed_patches(mixed) + self.encoder_segment_embed[sources]  # (B/G, N, D)
        return self.backbone.forward_tokens(gather_tokens(tokens, ids_keep), ids_keep)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        images = batch["views"][0]  # (B, C, H, W)
        b, g, n = images.shape[0], self.group, self.backbone.num_patches
        if b % g:
            raise UserError(f"batch of {b} images is not a multiple of the mixing group size {g}; change train.batch_size")
        sources = draw_sources(b // g, n, g)  # (B/G, N): mixing mask M, drawn on the CPU
        # through pinned memory: a copy from pageable memory would hold the CPU until the GPU caught up
        sources = (sources.pin_memory() if images.is_cuda else sources).to(images.device, non_blocking=True)
        mixed = mix_images(images, sources, self.backbone.patch_size)  # (B/G, C, H, W)
        # MAE masking of each mixed image (the mask drawn for the group's first image)
        mask = batch["mask"][::g] if "mask" in batch else torch.zeros(b // g, n, dtype=torch.bool, device=images.device)
        ids_keep, _, ids_restore = split_by_mask(mask, self.mask_generator.num_masked if self.mask_generator else 0)

        with self.homologous_attention(1 + ids_keep.shape[1]) if self.homo_attention else contextlib.nullcontext():
            latent = self.encode(mixed, sources, ids_keep)  # (B/G, 1 + N_vis, D)

        if self.segment_embed is None:  # naive mixing: MAE on the mixed image
            pred = self.decoder(latent, ids_restore)  # (B/G, N, P)
            losses = {"loss_recon": masked_mse(pred, self.reconstruction_target(mixed), mask)}
        else:
            # Symmetric: row j*G + s rebuilds source s of group j, i.e. image j*G + s of the batch.
            seg = self.segment_embed.repeat(b // g, 1).unsqueeze(1)  # (B, 1, d): row j*G + s gets segment s
            pred = self.decoder(latent.repeat_interleave(g, 0), ids_restore.repeat_interleave(g, 0), seg)  # (B, N, P)
            slot = torch.arange(g, device=images.device).repeat(b // g).unsqueeze(1)  # (B, 1): s of each row
            seen = (~mask).repeat_interleave(g, 0) & (sources.repeat_interleave(g, 0) == slot)  # (B, N)
            losses = {"loss_recon": masked_mse(pred, self.reconstruction_target(images), ~seen)}

        if self.homo_contrastive:
            labels = torch.gather(sources, 1, ids_keep)  # (B/G, N_vis): source of each visible patch
            con = homologous_contrastive_loss(latent[:, 1:], labels, self.temperature)
            self.log("homo_contrastive", con)
            losses["loss_homo_contrastive"] = self.contrastive_weight * con
        return losses
