"""Export a pretrained encoder as a plain timm ViT state dict, loadable without ssl-bench.

    import json, timm, torch
    spec = json.load(open("encoder.json"))
    model = timm.create_model(spec["model_name"], **spec["create_kwargs"])
    model.load_state_dict(torch.load("encoder.pth"), strict=True)
    tokens = model.forward_features(x)   # (B, 1 + N, D): cls token, then patch tokens, after the final norm

``ViTBackbone`` wraps a timm ``VisionTransformer`` (``backbone.vit``) whose ``pos_embed`` holds the fixed
sin-cos table with a zero cls slot, so ``backbone.vit.state_dict()`` already has timm's keys and
``forward_features`` computes exactly ``ViTBackbone.forward``. The sidecar JSON holds the
``timm.create_model`` arguments plus what a user needs to feed the model (input size, channels, mean/std).
"""
from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ssl_bench.backbone import ARCHS, ViTBackbone
from ssl_bench.atomic import atomic_write
from ssl_bench.errors import UserError
from ssl_bench.records import json_bytes, now_iso
from ssl_bench.safe_load import load_torch_file

WEIGHT_SUFFIXES = (".pth", ".pt", ".bin", ".safetensors")


def timm_create_kwargs(backbone: ViTBackbone) -> tuple[str, dict]:
    """(timm model name, kwargs) that build a ``timm.create_model`` ViT with the encoder's exact keys/shapes."""
    sig = backbone.signature()
    kwargs = {k: sig[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")}
    if "layer_scale" in sig:
        kwargs["init_values"] = sig["layer_scale"]
    kwargs["num_classes"] = 0  # no head: forward() returns the cls token, forward_features() all tokens
    return ARCHS[sig["arch"]][0], kwargs


def sidecar_path(out: str | Path) -> Path:
    """encoder.pth -> encoder.json"""
    return Path(out).with_suffix(".json")


def _write_new(out: Path, write) -> None:
    """Write ``out`` atomically, failing (not replacing) if it appeared meanwhile."""
    try:
        atomic_write(out, write, new_names=[out])
    except FileExistsError:
        raise UserError(f"{out} already exists; exports are never overwritten, choose another --out") from None


def _save_weights(state: dict, out: Path) -> None:
    if out.suffix == ".safetensors":
        from safetensors.torch import save

        data = save(state)
        _write_new(out, lambda f: f.write(data))
    else:
        _write_new(out, lambda f: torch.save(state, f))


def _save_json(obj: dict, out: Path) -> None:
    data = json_bytes(obj)
    _write_new(out, lambda f: f.write(data))


def load_exported(path: str | Path) -> dict:
    """The state dict of an exported file (either format)."""
    path = Path(path)
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_torch_file(path, "exported weights", "export the run again")


def export_encoder(run_dir: str | Path, out: str | Path) -> tuple[Path, Path]:
    """Write the encoder of the finished run in ``run_dir`` to ``out`` (+ sidecar JSON). Returns both paths."""
    import timm

    from ssl_bench.checkpoint import load_encoder

    out = Path(out)
    if out.suffix not in WEIGHT_SUFFIXES:
        raise UserError(f"--out {out} must end in one of {', '.join(WEIGHT_SUFFIXES)} (.safetensors writes safetensors, the others torch.save)")
    side = sidecar_path(out)
    for p in (out, side):
        if p.exists():
            raise UserError(f"{p} already exists; exports are never overwritten, choose another --out")
    out.parent.mkdir(parents=True, exist_ok=True)

    backbone, record = load_encoder(run_dir)
    model_name, kwargs = timm_create_kwargs(backbone)
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.vit.state_dict().items()}
    # The promise of this file: timm builds this exact model and accepts every key. Check it here, so a
    # timm upgrade that renames a key fails at export, not in a user's script.
    timm.create_model(model_name, pretrained=False, **kwargs).load_state_dict(state, strict=True)

    _save_weights(state, out)
    info = record.get("data_info") or {}
    sidecar = {
        "model_name": model_name,
        "create_kwargs": kwargs,
        "weights": out.name,
        "weights_sha256": hashlib.sha256(out.read_bytes()).hexdigest(),
        "input": {
            "img_size": kwargs["img_size"], "in_chans": kwargs["in_chans"],
            "mean": info.get("mean"), "std": info.get("std"), "scale": "pixels / 255, then (x - mean) / std",
        },
        "features": "forward_features(x): (B, 1 + N, D) after the final norm; [:, 0] cls token, [:, 1:] patch tokens",
        "position_embedding": "fixed 2-D sin-cos (stored in pos_embed, cls slot zero); keep it frozen when fine-tuning",
        "source": {
            "run_dir": str(Path(run_dir).resolve()), "method": record.get("method"), "data": record.get("data"),
            "preset": record.get("preset"), "seed": record.get("seed"), "git_commit": record.get("git_commit"),
        },
        "timm_version": timm.__version__,
        "created": now_iso(),
    }
    _save_json(sidecar, side)
    return out, side
