"""The plug-in contract every SSL method follows.

A method is an ``nn.Module`` built as ``MethodClass(backbone, **options)``: its options are the
keyword arguments of ``__init__`` and their defaults are the config's ``method.*`` keys, so there is
no second list to keep in sync. It declares what its batches need (``data_spec``), returns named
losses from ``training_step`` (the trainer sums them), and exposes ``encoder`` for evaluation.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ssl_bench.backbone import ViTBackbone


@dataclass
class DataSpec:
    """What a method's batches must hold.

    augmentation: the views (``ssl_bench.data.views``): a registered policy name ("mim", "simsiam", "byol",
        "multicrop" or a plug-in's), a policy (a tuple of ``View``, one per view, e.g.
        ``views.multicrop(n_local=4, local_size=12)``), or a function returning one.
    mask: a mask generator, or None: one of ``ssl_bench.masking`` (drawn several batches at a time on the
        batched path, ``batch``), or any callable ``gen(rng) -> (N,) bool array`` called once per sample with a
        numpy Generator seeded by (seed, epoch, index).
    ``batch["views"]`` holds one tensor (B, C, size, size) per view of the policy, in its order.
    """

    augmentation: Any = "mim"
    mask: Any = None
    extras: dict = field(default_factory=dict)


class Method(nn.Module):
    """Base class for SSL methods; subclass it and decorate with ``@register_method``."""

    name: ClassVar[str]
    description: ClassVar[str]  # one line, shown by `ssl-bench methods`
    family: ClassVar[str] = "mim"  # "mim", "siamese" or "control" (ssl_bench.records.CONTROL_FAMILY): for tables
    pretrains: ClassVar[bool] = True  # False for controls (random_init) that have no training step
    # the evaluation protocols that apply to its encoder; None: all (raw_pixels has nothing to fine-tune)
    protocols: ClassVar[tuple[str, ...] | None] = None
    # preset name -> partial config merged over the common preset ({"train": {...}, "model": {...}, ...})
    recipes: ClassVar[dict[str, dict]] = {}
    weight_decay_all: ClassVar[bool] = False  # True: decay every trainable parameter, biases and norms too
    # option name -> allowed values, checked where the config is resolved: ``(lo, hi)`` for a number in
    # [lo, hi], or a ``ssl_bench.config.Check`` (open ends, integers, choices), e.g. {"mask_ratio": (0.0, 1.0)}
    option_checks: ClassVar[dict[str, Any]] = {}
    # config keys ("section.key") that ``prepare`` may rewrite (a tokenizer path for "auto"): compared with an
    # earlier run's requested config, not with the config it ran (``ssl_bench.rundir.config_conflicts``)
    prepare_rewrites: ClassVar[tuple[str, ...]] = ()

    def __init__(self, backbone: ViTBackbone):
        super().__init__()
        self.backbone = backbone
        self._logged: dict[str, float] = {}

    # -- declared options -------------------------------------------------------------------------------
    @classmethod
    def option_defaults(cls) -> dict[str, Any]:
        """``method.*`` config keys and defaults, read off ``__init__``'s keyword arguments."""
        params = inspect.signature(cls.__init__).parameters
        return {
            k: p.default
            for k, p in params.items()
            if k not in ("self", "backbone") and p.default is not inspect.Parameter.empty
        }

    @classmethod
    def prepare(cls, cfg: dict, run_dir) -> dict:
        """Called by the trainer before the method is built, on the main process; may do one-off
        work the method needs (e.g. train a tokenizer into ``run_dir``) and return an updated config.
        Must be idempotent: a resumed run calls it again."""
        return cfg

    # -- what the trainer calls -----------------------------------------------------------------------
    def data_spec(self) -> DataSpec:
        raise NotImplementedError

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        """batch: {"views": [ (B, C, H, W), ... ], "mask": (B, N) bool or absent}. Returns named losses."""
        raise NotImplementedError

    def forward(self, batch: dict) -> dict[str, torch.Tensor]:
        # DDP hooks gradients through forward(), so the training step is the forward.
        return self.training_step(batch)

    def on_step_start(self, step: int, total_steps: int) -> None:
        """Per-step schedules (e.g. MoCo v3's momentum). Called before the forward of each step."""

    def after_optimizer_step(self) -> None:
        """Per-step updates outside the optimizer (e.g. EMA of a momentum encoder)."""

    def no_weight_decay(self) -> set[str]:
        """Parameter names exempt from weight decay, on top of all biases and norm weights."""
        return {n for n, _ in self.named_parameters() if n.endswith(("cls_token", "pos_embed", "mask_token"))}

    def param_groups(self, weight_decay: float) -> list[dict]:
        """Optimizer groups: decayed vs not (only the first with ``weight_decay_all``). A group may set
        ``fixed_lr=True`` to skip the schedule."""
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for n, p in self.named_parameters():
            if not p.requires_grad:
                continue
            exempt = not self.weight_decay_all and (p.ndim <= 1 or n in skip)
            (no_decay if exempt else decay).append(p)
        groups = [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
        return [g for g in groups if g["params"]]

    @property
    def encoder(self) -> ViTBackbone:
        """The network to evaluate: a ViTBackbone whose forward gives (cls, patch tokens)."""
        return self.backbone

    # -- metrics that are not losses --------------------------------------------------------------
    def log(self, name: str, value: torch.Tensor | float) -> None:
        """Record a metric for this step; tensors stay on their device until the trainer logs them."""
        self._logged[name] = value.detach() if isinstance(value, torch.Tensor) else float(value)

    def pop_logged(self, as_float: bool = True) -> dict[str, float | torch.Tensor]:
        logged, self._logged = self._logged, {}
        return {k: float(v) for k, v in logged.items()} if as_float else logged
