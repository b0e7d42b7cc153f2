"""End-to-end fine-tuning: the BEiT / MAE recipe (Bao et al., ICLR 2022; He et al., CVPR 2022, appendix A.3).

The whole pretrained encoder is trained with a new head:

    images -> encoder blocks (drop path) -> mean of patch tokens -> LayerNorm -> Linear   (MAE "global_pool")

MAE moves the encoder's final norm after the pooling (fc_norm); we do the same by replacing it with
the identity. Optimisation: AdamW (betas 0.9, 0.999), lr = blr x batch / 256, linear warmup then cosine
per step, weight decay on matrices only, and layer-wise lr decay: block i (0-based) of a depth-L encoder
trains at lr x decay^(L - i), the patch embedding / cls token at lr x decay^(L + 1), the new norm and
head at lr (BEiT's ``get_layer_id``). Regularisation: stochastic depth rising linearly to ``drop_path``
over the blocks, timm's Mixup/CutMix with label smoothing (SoftTargetCrossEntropy), and the training
transform RandomResizedCrop + flip (+ RandAugment and random erasing when the preset asks for them).

MAE's recipes (FINETUNE.md; ``evals.presets.FINETUNE_RECIPES``, chosen by the encoder's architecture in
the full preset): wd 0.05, 5 warmup, mixup 0.8, cutmix 1.0, label smoothing 0.1, RandAugment
rand-m9-mstd0.5-inc1, reprob 0.25; ViT-B blr 5e-4, layer decay 0.65, drop path 0.1, 100 epochs; ViT-L/H
blr 1e-3, layer decay 0.75, drop path 0.2/0.3, 50 epochs.

Optional LP-FT (Kumar et al., ICLR 2022; ``probe_epochs`` > 0): before fine-tuning, the new norm + head are
fitted on the frozen encoder's features of the un-augmented training images (AdamW, cosine, ``probe_lr``).
Short budgets need it: the un-normed mean token of a briefly pretrained encoder is dominated by a few
large dimensions, so a LayerNorm head starting near zero learns slowly, and a few hundred fine-tuning
steps are spent fitting the head while the near-chance gradients it sends back disturb the encoder.
Off in the full preset (the published recipe).

Model selection: after every epoch the model is scored on a held-out part of the TRAIN split; the
epoch with the best held-out top-1 is kept and only that model is scored on the test split (a warning
when that is the first or the last epoch).
"""
from __future__ import annotations

import contextlib
import math
import random
import time

import numpy as np
import torch
from timm.data import Mixup
from timm.loss import SoftTargetCrossEntropy
import torch.nn.functional as F
from torch import nn
from torch.utils.data import DataLoader, Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from evals.selection import edge_warnings, standard_error
from evals.registry import register_protocol
from ssl_bench.backbone import ViTBackbone
from ssl_bench.data.datasets import TransformedSubset
from ssl_bench.errors import UserError
from ssl_bench.optim import build_optimizer, cosine_with_warmup, set_lr
from ssl_bench.runtime import autocast as runtime_autocast, seed_everything

# Light augmentation for small images; timm's default crop scale (0.08, 1) is MAE's.
DEFAULT_CROP_SCALE = (0.08, 1.0)


class FineTuneModel(nn.Module):
    """Encoder + mean-pooled patch tokens + LayerNorm + linear head: (B, C, H, W) -> (B, classes)."""

    def __init__(self, encoder: ViTBackbone, num_classes: int):
        super().__init__()
        self.encoder = encoder
        encoder.vit.norm = nn.Identity()  # MAE global_pool: the final norm moves after the pooling (fc_norm)
        self.fc_norm = nn.LayerNorm(encoder.embed_dim, eps=1e-6)
        self.head = nn.Linear(encoder.embed_dim, num_classes)
        nn.init.trunc_normal_(self.head.weight, std=2e-5)  # MAE: a near-zero head keeps early gradients small
        nn.init.zeros_(self.head.bias)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        _, patches = self.encoder(images)  # (B, N, D), no final norm
        return self.head(self.fc_norm(patches.mean(dim=1)))  # (B, classes)


def layer_id(name: str, depth: int) -> int:
    """0 for the embeddings, i + 1 for block i, depth + 1 for everything after the blocks (norm, head)."""
    if name.startswith("encoder.vit.blocks."):
        return int(name.split(".")[3]) + 1
    if name.startswith(("encoder.vit.cls_token", "encoder.vit.pos_embed", "encoder.vit.patch_embed")):
        return 0
    return depth + 1


def layer_decay_groups(model: FineTuneModel, weight_decay: float, layer_decay: float) -> list[dict]:
    """Optimizer groups by (layer, decayed or not); each carries ``lr_scale`` = layer_decay^(depth + 1 - layer),
    which ``ssl_bench.optim.set_lr`` multiplies into the scheduled lr."""
    depth = model.encoder.depth
    groups: dict[tuple[int, bool], dict] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:  # the fixed sin-cos position table
            continue
        layer = layer_id(name, depth)
        decay = param.ndim > 1 and not name.endswith(("cls_token", "pos_embed"))
        group = groups.setdefault((layer, decay), {
            "params": [], "names": [], "layer": layer,
            "weight_decay": weight_decay if decay else 0.0, "lr_scale": layer_decay ** (depth + 1 - layer),
        })
        group["params"].append(param)
        group["names"].append(name)
    return [groups[k] for k in sorted(groups)]


# -- data ---------------------------------------------------------------------------------------------
def _posterize(img, bits_to_keep, **_):
    """timm's posterize, keeping 0 bits as a black image: at the top magnitude (10) RandAugment's increasing
    posterize asks for 0 bits, which old Pillow turned black and Pillow >= 10 rejects with a ValueError."""
    from PIL import ImageOps

    if bits_to_keep >= 8:
        return img
    if bits_to_keep <= 0:
        return img.point(lambda _: 0)
    return ImageOps.posterize(img, bits_to_keep)


def train_transform(img_size: int, mean, std, p: dict):
    """uint8 (C, H, W) -> float (C, img, img): RandomResizedCrop (``crop_scale`` None: a plain resize)
    [+ flip] [+ RandAugment] [+ random erasing]."""
    ops = []
    crop_scale = p.get("crop_scale", DEFAULT_CROP_SCALE)
    if crop_scale is not None:
        ops.append(T.RandomResizedCrop(img_size, scale=tuple(crop_scale), interpolation=InterpolationMode.BICUBIC, antialias=True))
    else:
        ops += [T.Resize(img_size, interpolation=InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(img_size)]
    if p.get("hflip", True):
        ops.append(T.RandomHorizontalFlip())
    randaug = p.get("randaug")
    if randaug and str(randaug).lower() != "none":
        from timm.data.auto_augment import rand_augment_transform

        fill = tuple(int(round(255 * m)) for m in mean)
        randaugment = rand_augment_transform(str(randaug), {"img_mean": fill if len(fill) > 1 else fill[0]})
        for op in randaugment.ops:
            if op.name.startswith("Posterize"):
                op.aug_fn = _posterize
        ops += [T.ToPILImage(), randaugment, T.PILToTensor()]
    ops += [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]
    if p.get("reprob", 0) > 0:
        from timm.data.random_erasing import RandomErasing

        ops.append(RandomErasing(p["reprob"], mode="pixel", device="cpu"))  # MAE: per-pixel normal noise
    return T.Compose(ops)


# -- training ------------------------------------------------------------------------------------------
def fit_head(model: FineTuneModel, data: Dataset, epochs: float, lr: float, device: torch.device, autocast,
             batch_size: int = 128, heldout: Dataset | None = None) -> dict:
    """LP-FT's first stage: train ``model.fc_norm`` + ``model.head`` on the frozen encoder's mean patch
    tokens of ``data`` (extracted once, in eval mode), AdamW with a cosine schedule, no weight decay."""
    def pooled(dataset: Dataset) -> tuple[torch.Tensor, torch.Tensor]:
        feats, labels = [], []
        model.eval()
        with torch.no_grad():
            for images, y in DataLoader(dataset, batch_size=256):
                with autocast():
                    _, patches = model.encoder(images.to(device))  # (B, N, D), no final norm
                feats.append(patches.float().mean(dim=1))
                labels.append(y.to(device))
        return torch.cat(feats), torch.cat(labels)

    feats, labels = pooled(data)
    head = nn.Sequential(model.fc_norm, model.head)
    optimizer = torch.optim.AdamW(head.parameters(), lr=lr, weight_decay=0.0)
    batch = min(batch_size, len(feats))
    total = max(1, int(round(epochs * len(feats) / batch)))
    for step in range(total):
        set_lr(optimizer, cosine_with_warmup(step, total, 0, lr))
        idx = torch.randint(0, len(feats), (batch,)).to(device)  # the caller's seeded RNG
        loss = F.cross_entropy(head(feats[idx]), labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    out = {"epochs": epochs, "lr": lr, "steps": total, "train_loss": loss.item()}
    if heldout is not None:
        held_feats, held_labels = pooled(heldout)
        with torch.no_grad():
            out["heldout_top1"] = 100.0 * (head(held_feats).argmax(dim=1) == held_labels).float().mean().item()
    return out


@torch.no_grad()
def accuracy(model: nn.Module, loader: DataLoader, device: torch.device, autocast) -> float:
    model.eval()
    correct = total = 0
    for images, labels in loader:
        with autocast():
            logits = model(images.to(device, non_blocking=True))
        correct += (logits.argmax(dim=1).cpu() == labels).sum().item()
        total += len(labels)
    return 100.0 * correct / max(1, total)


@contextlib.contextmanager
def _seeded(seed: int):
    """Seed torch / numpy / random (RandAugment draws from ``random``) and restore them afterwards."""
    py, npy = random.getstate(), np.random.get_state()
    with torch.random.fork_rng(devices=list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []):
        seed_everything(seed)
        try:
            yield
        finally:
            random.setstate(py)
            np.random.set_state(npy)


def finetune(encoder: ViTBackbone, train: Dataset, heldout: Dataset, test: Dataset, num_classes: int, p: dict,
             device: torch.device, seed: int = 0, num_workers: int = 0, train_plain: Dataset | None = None) -> dict:
    """Fine-tune ``encoder`` (built with its drop path rate) on ``train``, select the epoch on ``heldout``,
    report ``test``. ``train`` yields augmented float images, ``heldout`` / ``test`` un-augmented ones;
    ``train_plain`` (the same images un-augmented) is needed when ``p["probe_epochs"]`` > 0 (LP-FT)."""
    batch = min(p["batch_size"], len(train)) // 2 * 2  # Mixup pairs samples within a batch: even size
    if batch < 2:
        raise UserError(f"fine-tuning needs at least 2 training images, got {len(train)}; raise finetune.train_size")
    steps_per_epoch = len(train) // batch
    total_steps = steps_per_epoch * p["epochs"]
    warmup_steps = int(round(p["warmup_epochs"] * steps_per_epoch))
    lr = p["blr"] * batch / 256
    cuda = device.type == "cuda"

    def autocast():
        return runtime_autocast(device)

    with _seeded(seed):
        model = FineTuneModel(encoder, num_classes).to(device)
        probe = None
        if p.get("probe_epochs", 0) > 0:
            if train_plain is None:
                raise UserError("finetune.probe_epochs > 0 needs the un-augmented training images (train_plain)")
            probe = fit_head(model, train_plain, p["probe_epochs"], p["probe_lr"], device, autocast, heldout=heldout)
            print(f"  finetune head fitted on frozen features: held-out top-1 {probe['heldout_top1']:.2f}%", flush=True)
        groups = layer_decay_groups(model, p["weight_decay"], p["layer_decay"])
        for g in groups:
            g.pop("names")
        if p.get("optimizer", "adamw") != "adamw":
            raise UserError(f"finetune.optimizer must be adamw (the BEiT/MAE recipe), got '{p['optimizer']}'")
        optimizer = build_optimizer(groups, "adamw", lr, betas=(0.9, 0.999))
        mixup = None
        if p["mixup"] > 0 or p["cutmix"] > 0:
            mixup = Mixup(mixup_alpha=p["mixup"], cutmix_alpha=p["cutmix"], label_smoothing=p["label_smoothing"], num_classes=num_classes)
        criterion = SoftTargetCrossEntropy() if mixup else nn.CrossEntropyLoss(label_smoothing=p["label_smoothing"])

        order = torch.Generator().manual_seed(seed)
        loader = DataLoader(train, batch_size=batch, shuffle=True, drop_last=True, generator=order, num_workers=num_workers, pin_memory=cuda)
        eval_batch = max(batch, 256)
        held_loader = DataLoader(heldout, batch_size=eval_batch, num_workers=num_workers)
        test_loader = DataLoader(test, batch_size=eval_batch, num_workers=num_workers)

        best = {"epoch": -1, "heldout_top1": -math.inf, "state": None}
        curve, step, t_train, seen = [], 0, 0.0, 0
        start = time.perf_counter()
        for epoch in range(p["epochs"]):
            model.train()
            losses = []
            t0 = time.perf_counter()
            for images, labels in loader:
                set_lr(optimizer, cosine_with_warmup(step, total_steps, warmup_steps, lr, p["min_lr"]))
                images, labels = images.to(device, non_blocking=True), labels.to(device, non_blocking=True)
                targets = labels
                if mixup:
                    images, targets = mixup(images, labels)  # (B, C, H, W), soft targets (B, classes)
                with autocast():
                    loss = criterion(model(images).float(), targets)
                if not torch.isfinite(loss):
                    raise UserError(f"fine-tuning loss became {loss.item()} at step {step}; lower finetune.blr")
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
                step += 1
                seen += len(labels)
            t_train += time.perf_counter() - t0
            held = accuracy(model, held_loader, device, autocast)
            curve.append({"epoch": epoch + 1, "train_loss": float(np.mean(losses)), "heldout_top1": held})
            print(f"  finetune epoch {epoch + 1}/{p['epochs']}: train loss {curve[-1]['train_loss']:.4f}, held-out top-1 {held:.2f}% "
                  f"({seen / t_train:.0f} img/s)", flush=True)
            if held > best["heldout_top1"]:  # the earliest epoch on ties
                best = {"epoch": epoch + 1, "heldout_top1": held, "state": {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items()}}

        model.load_state_dict(best["state"])
        test_top1 = accuracy(model, test_loader, device, autocast)

    return {
        "top1": test_top1,
        "selected": {"epoch": best["epoch"], "heldout_top1": best["heldout_top1"]},
        # the last epoch chosen: held-out was still rising, more epochs may help; the first: later ones hurt
        # the last epoch is the schedule's end (its lr has decayed to min_lr), not a grid to widen
        "warnings": edge_warnings({"epoch": best["epoch"]}, {"epoch": range(1, p["epochs"] + 1)}, limits={"epoch": (None, p["epochs"])}),
        "details": {
            "heldout_se": standard_error(best["heldout_top1"], len(heldout)),
            "curve": curve, "epochs": p["epochs"], "steps": step, "batch_size": batch, "lr": lr, "blr": p["blr"],
            "layer_decay": p["layer_decay"], "weight_decay": p["weight_decay"], "drop_path": p["drop_path"],
            "probe": probe, "mixup": p["mixup"], "cutmix": p["cutmix"], "label_smoothing": p["label_smoothing"],
            "randaug": p.get("randaug"), "reprob": p.get("reprob", 0), "crop_scale": p.get("crop_scale", DEFAULT_CROP_SCALE), "hflip": p.get("hflip", True),
            "pooling": "mean of patch tokens + LayerNorm (encoder's final norm removed)",
            "n_train": len(train), "n_heldout": len(heldout), "n_test": len(test),
            "train_images_per_s": seen / t_train if t_train > 0 else None, "wall_time_s": time.perf_counter() - start,
        },
    }


@register_protocol("finetune", description="end-to-end fine-tuning")
def evaluate(ctx) -> dict:
    """The ``finetune`` protocol on ``ctx.data``: the pretraining data set, or another one (transfer)."""
    p = ctx.params
    mean, std = ctx.normalization()
    train_images, _ = ctx.dataset("train")
    test_images, _ = ctx.dataset("test")
    train = TransformedSubset(train_images, ctx.split_indices("train"), train_transform(ctx.img_size, mean, std, p))
    train_plain = TransformedSubset(train_images, ctx.split_indices("train"), ctx.transform())
    heldout = TransformedSubset(train_images, ctx.split_indices("heldout"), ctx.transform())
    test = TransformedSubset(test_images, ctx.split_indices("test"), ctx.transform())
    # the preset's seed plus the run's, so repeated pretraining seeds also vary the fine-tuning noise
    seed = int(p["seed"]) + int(ctx.record.get("seed", 0))
    result = finetune(
        ctx.load_encoder(drop_path=p["drop_path"]), train, heldout, test, ctx.num_classes, p, ctx.device,
        seed=seed, num_workers=ctx.feature_cfg["num_workers"], train_plain=train_plain,
    )
    result["details"]["seed"] = seed
    return result
