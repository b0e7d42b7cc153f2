"""Random initialization: the control row of every benchmark table.

The backbone is evaluated exactly as the other methods' encoders are, but it was never trained: its
weights are the initialization every method starts from (same architecture, same seed). A method that
does not beat this row on a protocol has learnt nothing that protocol can see; at short budgets that
happens, and the table should say so.

The methods' official codes initialise differently (``ssl_bench.backbone.INIT_SCHEMES``); ``method.init``
picks which initialization this row shows, MAE's by default (the same weights MAE starts from).

It runs through the common trainer with ``train.max_steps`` forced to 0 in ``prepare`` (whatever a sweep's
overrides say), which writes the run record and a checkpoint of the initial weights.
"""
from __future__ import annotations

import torch

from ssl_bench.backbone import INIT_SCHEMES, ViTBackbone
from ssl_bench.config import Check
from ssl_bench.errors import UserError
from ssl_bench.records import CONTROL_FAMILY
from ssl_bench.method import DataSpec, Method
from ssl_bench.registry import register_method


@register_method
class RandomInit(Method):
    name = "random_init"
    description = "Control: the backbone at its initialization, never trained (0 steps)"
    family = CONTROL_FAMILY
    pretrains = False
    option_checks = {"init": Check(choices=INIT_SCHEMES)}
    prepare_rewrites = ("train.max_steps",)  # prepare() sets no training steps

    def __init__(self, backbone: ViTBackbone, init: str = "mae"):
        super().__init__(backbone)
        backbone.init_weights(init)

    @classmethod
    def prepare(cls, cfg: dict, run_dir) -> dict:
        return {**cfg, "train": {**cfg["train"], "max_steps": 0}}

    def data_spec(self) -> DataSpec:
        return DataSpec(augmentation="mim")

    def training_step(self, batch: dict) -> dict[str, torch.Tensor]:
        raise UserError("random_init is the untrained control and has no training step")  # prepare() makes it unreachable
