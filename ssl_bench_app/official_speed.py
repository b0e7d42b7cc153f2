"""The official code's training step beside ours: ``ssl-bench throughput --official-code DIR``.

DIR holds local copies of the official repositories (nothing is downloaded): ``DIR/mae``
(facebookresearch/mae) and ``DIR/moco-v3`` (facebookresearch/moco-v3). Their models are built at the sizes
of the method being measured and timed as ``ssl_bench.throughput.step_alone`` times ours: the same batch,
autocast, compile setting and optimizer (AdamW at the run's lr and betas), so both rates come from one run.
Importing them runs their code: the directory is the user's explicit choice, as a plug-in is.

The official code was written for timm 0.3-0.4; shims let today's timm run it, computing the same thing:

* MAE builds ``Block(..., qk_scale=None)``; today's Block has no qk_scale (None was its default); its
  position embedding asks numpy for ``np.float`` (float64; gone since numpy 1.24) while it is built;
* MoCo v3 imports ``timm.models.layers.helpers.to_2tuple`` (now in ``timm.layers``) and asserts
  ``num_tokens == 1`` (now ``num_prefix_tokens``); its loss gathers keys over the process group (a group
  of one process here) and puts its labels on the GPU with ``.cuda()`` (on a CPU they stay on the CPU).
"""
from __future__ import annotations

import contextlib
import importlib
import inspect
import sys
import types
from functools import partial
from pathlib import Path

import torch
from torch import nn

from ssl_bench.errors import UserError
from ssl_bench.registry import get_method

REPOS = {"mae": "mae", "mocov3": "moco-v3"}  # method -> its official repository's folder under DIR


def official_step_alone(cfg: dict, root: str | Path, steps: int = 8) -> dict:
    """The official implementation's training step for ``cfg``'s method, at its sizes, on one batch of its
    loader held in memory: {"images_per_s", "compiled" (``runtime.compiled_or_not``)}."""
    from ssl_bench.optim import build_optimizer, scaled_lr
    from ssl_bench.runtime import autocast, compiled_or_not, compiled_step
    from ssl_bench.throughput import build_on_device, held_batch, seconds_per_step

    name, train = cfg["method_name"], cfg["train"]
    check_official_code(root, [name])
    folder = Path(root) / REPOS[name]
    ours, device = build_on_device(cfg)
    batch = held_batch(cfg, ours, device)
    with _imports_from(folder):
        model, loss_of = (_mae if name == "mae" else _mocov3)(ours, _options(cfg))
    model = model.to(device).train()
    lr = scaled_lr(train, train["batch_size"])
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = build_optimizer([{"params": params, "weight_decay": train["weight_decay"]}], "adamw", lr, betas=train["betas"])
    run = compiled_step(model, cfg, device)

    def one_step(i: int) -> None:
        with autocast(device, train["amp"]):
            loss = loss_of(run, batch)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    with _process_group(device), _cuda_is(device):
        seconds = seconds_per_step(one_step, device, steps)
    return {"images_per_s": len(batch["views"][0]) / seconds, "compiled": compiled_or_not(run)}


def has_official(method: str) -> bool:
    return method in REPOS


def check_official_code(root: str | Path, methods: list[str]) -> None:
    """A one-line error unless ``root`` holds the official repository of every method of ``methods`` that has one."""
    wanted = [m for m in methods if has_official(m)]
    if not wanted:
        raise UserError(f"--official-code: none of {', '.join(methods)} has an official step to time; it covers {', '.join(REPOS)}")
    missing = [str(Path(root) / REPOS[m]) for m in wanted if not (Path(root) / REPOS[m]).is_dir()]
    if missing:
        raise UserError(f"--official-code: no official code at {', '.join(missing)}; put a copy of that repository there "
                        f"(git clone, no download at run time) or leave out --official-code")


def _options(cfg: dict) -> dict:
    """The method's constructor options: its defaults, then the run's ``method`` section."""
    params = inspect.signature(get_method(cfg["method_name"]).__init__).parameters
    return {k: p.default for k, p in params.items() if p.default is not inspect.Parameter.empty} | cfg["method"]


def _encoder_sizes(ours) -> dict:
    """Our encoder's sizes as timm's VisionTransformer arguments (the official codes build theirs with them)."""
    vit = ours.backbone.vit
    return {"img_size": vit.patch_embed.img_size[0], "patch_size": vit.patch_embed.patch_size[0],
            "in_chans": vit.patch_embed.proj.in_channels, "embed_dim": vit.embed_dim, "depth": len(vit.blocks),
            "num_heads": vit.blocks[0].attn.num_heads, "mlp_ratio": vit.blocks[0].mlp.fc1.out_features / vit.embed_dim}


def _mae(ours, options: dict):
    if ours.backbone.vit.patch_embed.proj.in_channels != 3:
        raise UserError("the official MAE code patchifies 3-channel images only; compare it on 3-channel data (--data synthetic or cifar10)")
    models_mae = importlib.import_module("models_mae")
    block = models_mae.Block
    models_mae.Block = lambda *args, qk_scale=None, **kwargs: block(*args, **kwargs)
    decoder = ours.decoder
    with _numpy_float():
        model = models_mae.MaskedAutoencoderViT(
            **_encoder_sizes(ours), decoder_embed_dim=decoder.embed.out_features, decoder_depth=len(decoder.blocks),
            decoder_num_heads=decoder.blocks[0].attn.num_heads, norm_layer=partial(nn.LayerNorm, eps=1e-6),
            norm_pix_loss=options["norm_pix_loss"],
        )
    ratio = options["mask_ratio"]
    return model, lambda m, batch: m(batch["views"][0], mask_ratio=ratio)[0]


def _mocov3(ours, options: dict):
    import timm.layers

    sys.modules.setdefault("timm.models.layers.helpers", types.SimpleNamespace(to_2tuple=timm.layers.to_2tuple))
    vits = importlib.import_module("vits")
    builder = importlib.import_module("moco.builder")
    vits.VisionTransformerMoCo.num_tokens = property(lambda self: self.num_prefix_tokens)
    encoder = partial(vits.VisionTransformerMoCo, **_encoder_sizes(ours), qkv_bias=True,
                      norm_layer=partial(nn.LayerNorm, eps=1e-6), stop_grad_conv1=options["freeze_patch_embed"])
    model = builder.MoCo_ViT(encoder, dim=options["out_dim"], mlp_dim=options["mlp_dim"], T=options["temperature"])
    momentum = options["base_momentum"]
    return model, lambda m, batch: m(batch["views"][0], batch["views"][1], momentum)


@contextlib.contextmanager
def _imports_from(folder: Path):
    """Import the official modules from ``folder`` (first on the path, and never a cached module of the same
    name from elsewhere)."""
    names = ("models_mae", "vits", "moco", "moco.builder", "util", "util.pos_embed")
    saved = {n: sys.modules.pop(n) for n in names if n in sys.modules}
    sys.path.insert(0, str(folder))
    try:
        yield
    finally:
        sys.path.remove(str(folder))
        for name in names:  # the official modules do not outlive the measurement
            sys.modules.pop(name, None)
        sys.modules.update(saved)


@contextlib.contextmanager
def _numpy_float():
    """``np.float`` (float64, removed in numpy 1.24) while the official code builds its position embedding."""
    import numpy as np

    added = not hasattr(np, "float")
    if added:
        np.float = float
    try:
        yield
    finally:
        if added:
            del np.float


@contextlib.contextmanager
def _cuda_is(device: torch.device):
    """On a CPU device, ``Tensor.cuda()`` leaves a tensor where it is while the official step runs (MoCo v3's
    loss makes its labels with ``.cuda()``)."""
    if device.type == "cuda":
        yield
        return
    cuda = torch.Tensor.cuda
    torch.Tensor.cuda = lambda self, *args, **kwargs: self
    try:
        yield
    finally:
        torch.Tensor.cuda = cuda


@contextlib.contextmanager
def _process_group(device: torch.device):
    """A process group of one for code that gathers over one (MoCo v3's keys), unless one exists."""
    dist = torch.distributed
    if dist.is_initialized():
        yield
        return
    store = dist.HashStore()
    dist.init_process_group("nccl" if device.type == "cuda" else "gloo", store=store, rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()
