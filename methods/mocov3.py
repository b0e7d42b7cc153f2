"""MoCo v3: An Empirical Study of Training Self-Supervised Vision Transformers (Chen, Xie & He, ICCV 2021).

Query encoder f_q = ViT (cls token) + projector + predictor; key encoder f_k = momentum (EMA) copy of
ViT + projector, no predictor, no gradient. Each view's query must pick out the other view's key of
the same image among all keys of the global batch (InfoNCE, keys gathered over processes):
    L = ctr(q1, k2) + ctr(q2, k1),  ctr(q, k) = CE(q k^T / tau, own index) * 2 tau,  q, k l2-normalised.
Stability trick of the paper: the patch projection stays at its random initialisation (frozen).

Recipe (ViT-B/16, ImageNet, official code): projector 3 layers (hidden 4096, out 256, BN + ReLU after
hidden layers, BN without affine at the end), predictor 2 layers (hidden 4096, out 256, BN + ReLU after
the hidden layer and a last BN without affine: the official ViT builder keeps it, only its ResNet variant
drops it), Linears without bias; tau 0.2; momentum 0.99 -> 1 by a half-cosine over training; AdamW
lr 1.5e-4 x B/256, wd 0.1 on every parameter (biases, norms and cls token too), batch 4096, 40 warmup
of 300 epochs; BYOL asymmetric augmentations with RandomResizedCrop scale 0.08-1.
ViT init as the official vits.py (``init="moco"``; ``"timm"`` keeps timm's): xavier_uniform Linears with
qkv as three blocks, patch projection xavier-uniform as a Linear, then frozen, cls token normal(1e-6),
sin-cos table with the row half first. As the official forward, the momentum encoder takes its EMA step
at the start of each step (with that step's momentum), before the keys are computed.
AdamW betas are PyTorch's defaults (0.9, 0.999), as in the official code (the paper does not state
them). The momentum copy sits in ``state_dict`` (exact resume) but has ``requires_grad=False``, so the
optimiser, weight decay and DDP never see it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_bench.backbone import INIT_SCHEMES, ViTBackbone
from ssl_bench.config import SWITCH, Check
from ssl_bench.data import views
from ssl_bench.distributed import concat_all_gather, rank
from ssl_bench.errors import UserError
from ssl_bench.heads import build_mlp, cosine_momentum, ema_update_, momentum_copy, sync_batchnorm
from ssl_bench.method import DataSpec, Method
from ssl_bench.registry import register_method

_ADAMW = {"optimizer": "adamw", "betas": (0.9, 0.999), "weight_decay": 0.1}


@register_method
class MoCoV3(Method):
    name = "mocov3"
    description = "MoCo v3 (Chen et al. 2021): InfoNCE between a ViT query encoder and its momentum copy"
    family = "siamese"
    weight_decay_all = True  # the official AdamW gets model.parameters(): biases, norms, cls token decayed too
    option_checks = {
        "init": Check(choices=INIT_SCHEMES), "freeze_patch_embed": SWITCH, "mlp_dim": Check(1, integer=True),
        "out_dim": Check(1, integer=True), "temperature": Check(0, lo_open=True), "base_momentum": Check(0, 1),
    }
    recipes = {
        "smoke": {"method": {"mlp_dim": 256, "out_dim": 64}, "train": {**_ADAMW, "blr": 1.5e-3}},
        "quick": {"method": {"mlp_dim": 1024, "out_dim": 256}, "train": {**_ADAMW, "blr": 1.5e-3}},
        "full": {
            "method": {"mlp_dim": 4096, "out_dim": 256},
            "train": {**_ADAMW, "blr": 1.5e-4, "epochs": 100, "warmup_epochs": 10},
            "model": {"drop_path": 0.0},  # the key encoder must not drop paths; the reference code uses none
        },
    }

    def __init__(
        self,
        backbone: ViTBackbone,
        mlp_dim: int = 4096,
        out_dim: int = 256,
        temperature: float = 0.2,
        base_momentum: float = 0.99,
        freeze_patch_embed: bool = True,
        init: str = "moco",
    ):
        super().__init__(backbone)
        if temperature <= 0 or not 0.0 <= base_momentum <= 1.0 or min(mlp_dim, out_dim) < 1:
            raise UserError(
                f"mocov3 needs method.temperature > 0, 0 <= method.base_momentum <= 1 and positive widths; got "
                f"temperature={temperature}, base_momentum={base_momentum}, mlp_dim={mlp_dim}, out_dim={out_dim}"
            )
        self.temperature, self.base_momentum = temperature, base_momentum
        self.momentum = base_momentum  # set each step by on_step_start
        backbone.init_weights(init)
        if freeze_patch_embed:
            backbone.vit.patch_embed.requires_grad_(False)  # stays at its random init
        self.projector = sync_batchnorm(build_mlp(backbone.embed_dim, mlp_dim, out_dim, 3, last_bn_affine=False))
        self.predictor = sync_batchnorm(build_mlp(out_dim, mlp_dim, out_dim, 2, last_bn_affine=False))
        # f_k starts equal to f_q's backbone + projector and then only follows it by EMA.
        self.momentum_backbone = momentum_copy(backbone)
        self.momentum_projector = momentum_copy(self.projector)

    def data_spec(self) -> DataSpec:
        return DataSpec(augmentation=views.byol(crop_scale=(0.08, 1.0)), mask=None)  # main_moco.py's --crop-min

    def on_step_start(self, step: int, total_steps: int) -> None:
        """This step's momentum, and the EMA step of f_k towards f_q's current weights (the official
        forward updates the momentum encoder before computing the keys)."""
        self.momentum = cosine_momentum(step, total_steps, self.base_momentum)
        ema_update_(self.momentum_backbone, self.backbone, self.momentum)
        ema_update_(self.momentum_projector, self.projector, self.momentum)
        self.log("moco_momentum", self.momentum)  # here, not in the step: a float read there recompiles it each step

    def contrastive_loss(self, q: torch.Tensor, k: torch.Tensor) -> torch.Tensor:
        """q (B, d) queries of this process, k (B, d) keys of this process -> InfoNCE x 2 tau."""
        q, k = F.normalize(q.float(), dim=1), F.normalize(k.float(), dim=1)
        k = concat_all_gather(k)  # (world * B, d): every process's keys are negatives
        logits = q @ k.T / self.temperature  # (B, world * B)
        labels = torch.arange(len(q), device=q.device) + rank() * len(q)  # own key in the gathered batch
        return F.cross_entropy(logits, labels) * (2 * self.temperature)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        x1, x2 = batch["views"]  # (B, C, H, W) each
        x = torch.cat([x1, x2])  # the ViT has no batch statistics: one pass for both views
        q1, q2 = (self.predictor(self.projector(f)) for f in self.backbone(x)[0].chunk(2))  # (B, d); BN per view
        with torch.no_grad():
            k1, k2 = (self.momentum_projector(f) for f in self.momentum_backbone(x)[0].chunk(2))  # (B, d)
        loss = self.contrastive_loss(q1, k2) + self.contrastive_loss(q2, k1)
        return {"loss_contrastive": loss}
