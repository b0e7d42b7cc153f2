"""SimSiam: Exploring Simple Siamese Representation Learning (Chen & He, CVPR 2021).

Two augmented views go through the same encoder f (ViT cls token + 3-layer projector); a predictor h
maps one view's projection onto the other's, and the target side is a stop-gradient:
    L = D(p1, sg(z2)) / 2 + D(p2, sg(z1)) / 2,   D(p, z) = -cos(p, z).
No negatives and no momentum encoder: the stop-gradient alone prevents collapse (without it the paper
gets 0.1% top-1); ``method.stop_gradient=false`` removes it, as the paper's ablation. ``self.log("z_std",
...)`` is the paper's collapse monitor: the per-channel std of l2-normalised z over the batch, about
1/sqrt(d) when healthy and 0 when every image maps to one point (the trainer keeps it in metrics.jsonl
and summarises it in run.json under "metrics").

Heads as in the official code: projector Linear-BN-ReLU, Linear-BN-ReLU, Linear-BN (the last BN without
affine, Linears before a BN without bias), hidden width the backbone's width (``proj_hidden_dim``, None)
and output ``proj_dim`` (2048); predictor Linear(d, pred_dim)-BN-ReLU-Linear(pred_dim, d) with
pred_dim = d/4 (512). The predictor's lr is not scheduled (fixed_lr; the paper: 68.1 vs 67.7).
Recipe (ResNet-50, ImageNet): SGD momentum 0.9, lr 0.05 x B/256, wd 1e-4 on every parameter (biases and
BN too, as the official optimizer), cosine, batch 512, 100 epochs; MoCo v2 augmentations (jitter
saturation 0.4). Here on a ViT the same optimiser is kept at every preset; only widths shrink. The
official code has no ViT: the backbone keeps timm's ViT init.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from ssl_bench.backbone import ViTBackbone
from ssl_bench.config import SWITCH, Check
from ssl_bench.errors import UserError
from ssl_bench.heads import build_mlp, sync_batchnorm
from ssl_bench.method import DataSpec, Method
from ssl_bench.registry import register_method

_SGD = {"optimizer": "sgd", "momentum": 0.9, "blr": 0.05, "weight_decay": 1e-4}


def negative_cosine(p: torch.Tensor, z: torch.Tensor) -> torch.Tensor:
    """D(p, z) = -mean_i cos(p_i, z_i); p, z: (B, d)."""
    return -F.cosine_similarity(p.float(), z.float(), dim=-1).mean()


@register_method
class SimSiam(Method):
    name = "simsiam"
    description = "SimSiam (Chen & He 2021): two views, predictor, stop-gradient on the target; no negatives"
    family = "siamese"
    weight_decay_all = True  # the official SGD gets every parameter
    option_checks = {
        "stop_gradient": SWITCH, "proj_hidden_dim": Check(1, integer=True, none_ok=True),
        "proj_dim": Check(1, integer=True), "pred_dim": Check(1, integer=True),
    }
    recipes = {
        "smoke": {"method": {"proj_dim": 64, "pred_dim": 16}, "train": dict(_SGD)},
        "quick": {"method": {"proj_dim": 512, "pred_dim": 128}, "train": dict(_SGD)},
        "full": {
            "method": {"proj_dim": 2048, "pred_dim": 512},
            "train": {**_SGD, "warmup_epochs": 0},
            "model": {"drop_path": 0.0},
        },
    }

    def __init__(
        self,
        backbone: ViTBackbone,
        proj_dim: int = 2048,
        pred_dim: int = 512,
        stop_gradient: bool = True,
        proj_hidden_dim: int | None = None,
    ):
        super().__init__(backbone)
        hidden = proj_hidden_dim or backbone.embed_dim  # official: the encoder's feature width
        if min(proj_dim, pred_dim, hidden) < 1:
            raise UserError(
                f"simsiam needs positive widths; got method.proj_dim={proj_dim}, method.pred_dim={pred_dim}, "
                f"method.proj_hidden_dim={proj_hidden_dim}"
            )
        self.stop_gradient = stop_gradient
        self.projector = sync_batchnorm(build_mlp(backbone.embed_dim, hidden, proj_dim, 3, last_bn_affine=False))
        self.predictor = sync_batchnorm(build_mlp(proj_dim, pred_dim, proj_dim, 2, last_bn=False))

    def data_spec(self) -> DataSpec:
        return DataSpec(augmentation="simsiam", mask=None)

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        x1, x2 = batch["views"]  # (B, C, H, W) each
        # The ViT has no batch statistics, so both views share one pass; the heads' BatchNorm
        # normalises each view's batch on its own, as with two separate passes.
        f1, f2 = self.backbone(torch.cat([x1, x2]))[0].chunk(2)  # cls tokens, (B, D) each
        z1, z2 = self.projector(f1), self.projector(f2)  # (B, d)
        p1, p2 = self.predictor(z1), self.predictor(z2)  # (B, d)
        if self.stop_gradient:
            z1, z2 = z1.detach(), z2.detach()
        loss = negative_cosine(p1, z2) / 2 + negative_cosine(p2, z1) / 2
        self.log("z_std", F.normalize(z1.detach().float(), dim=1).std(dim=0).mean())
        return {"loss_simsiam": loss}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The base groups, each split in two: predictor parameters get ``fixed_lr``."""
        predictor = {id(p) for p in self.predictor.parameters()}
        groups = []
        for group in super().param_groups(weight_decay):
            for fixed in (False, True):
                params = [p for p in group["params"] if (id(p) in predictor) == fixed]
                if params:
                    groups.append({**group, "params": params, **({"fixed_lr": True} if fixed else {})})
        return groups
