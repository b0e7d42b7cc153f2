"""DINO: Emerging Properties in Self-Supervised Vision Transformers (Caron et al., ICCV 2021).

Self-distillation without labels. A student g_s (ViT cls token + DINOHead) sees every view of an image: two
global crops and N small local crops (multi-crop). A teacher g_t, the EMA of the student, sees the two global
crops only. The student's softmax at temperature tau_s must match the teacher's centred, sharpened softmax
of every *other* view:
    P_t = softmax((g_t(x) - c) / tau_t),  P_s = softmax(g_s(x') / tau_s)
    L = mean over pairs (t in globals, s in all views, s != t) of  sum_k -P_t[k] log P_s[k]
    c <- m_c c + (1 - m_c) mean_batch g_t(x)          (after the loss, over the global batch)
Centering keeps one dimension from dominating; sharpening (tau_t < tau_s) keeps the output from going
uniform; together they avoid collapse (logged: the teacher's entropy and KL to the student, and a flag).

Recipe (official main_dino.py, ViT-S/16 100 epochs): DINOHead = 3-layer MLP (GELU, hidden 2048, bottleneck
256), l2-normalised, then a weight-normalised Linear (no bias) to out_dim 65536 with its norm fixed at 1
(norm_last_layer) and its weights frozen during the first epoch; tau_s 0.1, tau_t warm-up 0.04 -> 0.07 over
the first 30 epochs, center momentum 0.9; teacher momentum 0.996 -> 1 by a half-cosine; AdamW (betas
(0.9, 0.999)) lr 0.0005 x B/256, 10 warm-up epochs, min lr 1e-6, drop path 0.1 (student only), clip 3.0;
multi-crop 2 x global (scale 0.4-1) + 8 x local (scale 0.05-0.4, 96 px for 224 px images). The teacher
(the network DINO evaluates) is ``encoder``.
Where this differs from the official code, and why:
* schedules are fractions of training (``teacher_temp_warmup`` 0.3 = 30 of 100 epochs, ``freeze_last_layer``
  0.01 = 1 of 100), so shorter presets scale them, and tau_t rises per step instead of per epoch;
* clipping is the trainer's, on the global gradient norm (official: each parameter's norm clipped to 3.0);
* the frozen last layer gets zero gradients (official: none), so AdamW's step count includes that epoch.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ssl_bench.backbone import ViTBackbone
from ssl_bench.data import views
from ssl_bench.distributed import world_size
from ssl_bench.errors import UserError
from ssl_bench.heads import cosine_momentum, ema_update_, momentum_copy
from ssl_bench.method import DataSpec, Method
from ssl_bench.registry import register_method

_ADAMW = {"optimizer": "adamw", "betas": (0.9, 0.999), "weight_decay": 0.04, "weight_decay_end": 0.4, "clip_grad": 3.0, "min_lr": 1e-6}


class DINOHead(nn.Module):
    """(B, in_dim) -> MLP (GELU) -> (B, bottleneck) -> l2-normalise -> weight-normalised Linear -> (B, out_dim)."""

    def __init__(self, in_dim: int, out_dim: int, hidden_dim: int = 2048, bottleneck_dim: int = 256, num_layers: int = 3,
                 norm_last_layer: bool = True):
        super().__init__()
        dims = [in_dim] + [hidden_dim] * (num_layers - 1) + [bottleneck_dim]
        layers: list[nn.Module] = []
        for i in range(num_layers):
            layers.append(nn.Linear(dims[i], dims[i + 1]))
            if i < num_layers - 1:
                layers.append(nn.GELU())
        self.mlp = nn.Sequential(*layers)
        for m in self.mlp:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                nn.init.zeros_(m.bias)
        # weight = g * v / ||v|| per output row; g fixed at 1 (norm_last_layer): a cosine-similarity layer
        self.last_layer = nn.utils.parametrizations.weight_norm(nn.Linear(bottleneck_dim, out_dim, bias=False))
        self.last_layer.parametrizations.weight.original0.data.fill_(1.0)
        if norm_last_layer:
            self.last_layer.parametrizations.weight.original0.requires_grad_(False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.normalize(self.mlp(x), dim=-1)  # (B, bottleneck), unit length
        return self.last_layer(x)  # (B, out_dim)


@register_method
class DINO(Method):
    name = "dino"
    description = "DINO (Caron et al. 2021): self-distillation with a multi-crop student and an EMA teacher"
    family = "distillation"
    recipes = {
        "smoke": {"method": {"out_dim": 256, "hidden_dim": 128, "bottleneck_dim": 32, "n_local": 2}, "train": {**_ADAMW, "blr": 5e-4}},
        "quick": {"method": {"out_dim": 4096, "hidden_dim": 512, "bottleneck_dim": 128, "n_local": 4}, "train": {**_ADAMW, "blr": 5e-4}},
        "full": {
            "method": {"out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "n_local": 8},
            "train": {**_ADAMW, "blr": 5e-4, "epochs": 100, "warmup_epochs": 10},
            "model": {"drop_path": 0.1},
        },
    }

    def __init__(
        self,
        backbone: ViTBackbone,
        out_dim: int = 65536,
        hidden_dim: int = 2048,
        bottleneck_dim: int = 256,
        norm_last_layer: bool = True,
        n_local: int = 8,
        local_size: int | None = None,  # None: DINO's 96/224 of the image side, rounded to whole patches
        global_scale: tuple = (0.4, 1.0),
        local_scale: tuple = (0.05, 0.4),
        student_temp: float = 0.1,
        warmup_teacher_temp: float = 0.04,
        teacher_temp: float = 0.07,
        teacher_temp_warmup: float = 0.3,  # fraction of training (30 of 100 epochs)
        center_momentum: float = 0.9,
        centering: bool = True,  # off: the ablation that collapses to one dimension
        base_momentum: float = 0.996,
        freeze_last_layer: float = 0.01,  # fraction of training (the first of 100 epochs)
    ):
        super().__init__(backbone)
        if n_local < 0 or min(out_dim, hidden_dim, bottleneck_dim) < 1 or min(student_temp, teacher_temp, warmup_teacher_temp) <= 0:
            raise UserError(f"dino needs method.n_local >= 0, positive widths and temperatures; got n_local={n_local}, "
                            f"out_dim={out_dim}, student_temp={student_temp}, teacher_temp={teacher_temp}")
        p = backbone.patch_size
        self.local_size = local_size or max(2 * p, round(backbone.img_size * 96 / 224 / p) * p)
        if self.local_size % p:
            raise UserError(f"method.local_size={self.local_size} must be a multiple of the patch size {p}")
        self.n_local, self.global_scale, self.local_scale = n_local, tuple(global_scale), tuple(local_scale)
        self.student_temp, self.center_momentum, self.centering = student_temp, center_momentum, centering
        self.temp_schedule = (warmup_teacher_temp, teacher_temp, teacher_temp_warmup)
        self.base_momentum, self.freeze_last_layer = base_momentum, freeze_last_layer
        self.head = DINOHead(backbone.embed_dim, out_dim, hidden_dim, bottleneck_dim, norm_last_layer=norm_last_layer)
        # the teacher starts as the student and then only follows it by EMA; no drop path (always eval mode)
        self.teacher_backbone, self.teacher_head = momentum_copy(backbone), momentum_copy(self.head)
        self.register_buffer("center", torch.zeros(1, out_dim))
        # a tensor, so a compiled step reads this step's value instead of recompiling for each new float
        self.register_buffer("_teacher_temp", torch.tensor(float(warmup_teacher_temp)), persistent=False)
        self.momentum, self.last_layer_frozen = base_momentum, False
        for p_ in (q for q in self.head.last_layer.parameters() if q.requires_grad):  # zero gradient while frozen (DDP-safe)
            p_.register_hook(lambda g: torch.zeros_like(g) if self.last_layer_frozen else g)

    @property
    def teacher_temp(self) -> float:
        return float(self._teacher_temp)

    @teacher_temp.setter
    def teacher_temp(self, value: float) -> None:
        self._teacher_temp.fill_(value)

    @property
    def encoder(self) -> ViTBackbone:
        return self.teacher_backbone  # DINO evaluates the teacher

    def data_spec(self) -> DataSpec:
        # global 1: blur 1.0; global 2: blur 0.1 + solarize 0.2; locals: blur 0.5 (views.multicrop)
        return DataSpec(augmentation=views.multicrop(n_local=self.n_local, local_size=self.local_size,
                                                     global_scale=self.global_scale, local_scale=self.local_scale))

    def train(self, mode: bool = True):
        super().train(mode)
        self.teacher_backbone.eval()
        self.teacher_head.eval()
        return self

    def on_step_start(self, step: int, total_steps: int) -> None:
        """This step's teacher temperature, EMA momentum and whether the last layer is frozen."""
        progress = step / max(1, total_steps)
        start, end, warmup = self.temp_schedule
        self.teacher_temp = end if warmup <= 0 else start + (end - start) * min(1.0, progress / warmup)
        self.momentum = cosine_momentum(step, total_steps, self.base_momentum)
        self.last_layer_frozen = progress < self.freeze_last_layer

    def after_optimizer_step(self) -> None:
        """Teacher <- momentum x teacher + (1 - momentum) x student, after the student's step (as official)."""
        ema_update_(self.teacher_backbone, self.backbone, self.momentum)
        ema_update_(self.teacher_head, self.head, self.momentum)

    @staticmethod
    def multicrop_forward(backbone: ViTBackbone, head: nn.Module, crops: list[torch.Tensor]) -> torch.Tensor:
        """Crops [(B, C, S_i, S_i)] -> (len(crops) * B, out_dim), in crop order; one backbone pass per run of
        equal-sized crops (as the official MultiCropWrapper)."""
        cls, start = [], 0
        while start < len(crops):
            end = start + 1
            while end < len(crops) and crops[end].shape[-1] == crops[start].shape[-1]:
                end += 1
            cls.append(backbone(torch.cat(crops[start:end]))[0])  # (k * B, D) cls tokens
            start = end
        return head(torch.cat(cls))

    def dino_loss(self, student_out: torch.Tensor, teacher_out: torch.Tensor, n_crops: int) -> tuple[torch.Tensor, dict]:
        """student_out (V * B, K), teacher_out (2 * B, K), crop-major -> loss, and the teacher's statistics."""
        student_logp = F.log_softmax(student_out.float() / self.student_temp, dim=-1).chunk(n_crops)  # V x (B, K)
        centred = teacher_out.float() - self.center if self.centering else teacher_out.float()
        teacher_p = F.softmax(centred / self._teacher_temp, dim=-1).detach()  # (2B, K)
        total, terms = 0.0, 0
        for t, p in enumerate(teacher_p.chunk(2)):
            for s, logq in enumerate(student_logp):
                if s == t:  # the student never matches the teacher on the same view
                    continue
                total = total + torch.sum(-p * logq, dim=-1).mean()
                terms += 1
        loss = total / terms
        def entropy(p):  # (n, K) -> (n,), nats
            return -(p * p.clamp_min(1e-12).log()).sum(-1)

        h = entropy(teacher_p).mean()  # per image
        return loss, {"entropy": h, "batch_entropy": entropy(teacher_p.mean(0, keepdim=True))[0],  # of the batch's mean P_t
                      "kl": loss.detach() - h}  # CE = H(P_t) + KL(P_t || P_s)

    @torch.no_grad()
    def update_center(self, teacher_out: torch.Tensor) -> None:
        """c <- m c + (1 - m) x the mean teacher output over the global batch."""
        batch_sum = teacher_out.float().sum(0, keepdim=True)  # (1, K)
        count = batch_sum.new_full((), float(len(teacher_out)))  # made on the device: no host copy each step
        if world_size() > 1:
            torch.distributed.all_reduce(batch_sum)
            torch.distributed.all_reduce(count)
        self.center.mul_(self.center_momentum).add_(batch_sum / count, alpha=1 - self.center_momentum)

    def collapse_stats(self, stats: dict) -> dict[str, torch.Tensor]:
        """The teacher's entropies as fractions of log K, its KL to the student, and a flag for either
        collapse of the paper's Fig. 7: one dimension dominates the whole batch (the entropy of the batch's
        mean teacher distribution < 10% of log K, about 3 dimensions at K = 65536; sharpening without
        centering) or the teacher is uniform and the student copies it (per-image entropy > 99% of log K
        and KL < 1e-3; centering without sharpening)."""
        log_k = torch.log(torch.tensor(float(self.center.shape[1])))
        ratio, batch_ratio = stats["entropy"] / log_k, stats["batch_entropy"] / log_k
        collapsed = (batch_ratio < 0.1) | ((ratio > 0.99) & (stats["kl"] < 1e-3))
        return {"teacher_entropy": ratio, "teacher_batch_entropy": batch_ratio, "teacher_kl": stats["kl"], "collapse": collapsed.float()}

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        crops = batch["views"]  # 2 global (B, C, G, G), then n_local local (B, C, L, L)
        with torch.no_grad():
            teacher_out = self.multicrop_forward(self.teacher_backbone, self.teacher_head, crops[:2])  # (2B, K): globals only
        student_out = self.multicrop_forward(self.backbone, self.head, crops)  # ((2 + n_local) B, K)
        loss, stats = self.dino_loss(student_out, teacher_out, len(crops))
        self.update_center(teacher_out)
        for name, value in self.collapse_stats(stats).items():
            self.log(name, value)
        self.log("teacher_temp", self._teacher_temp.clone())
        return {"loss_dino": loss}
