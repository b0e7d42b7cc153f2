"""Export a pretrained encoder as a folder timm loads directly: ``model.safetensors`` + ``config.json``.

    import timm
    model = timm.create_model("local-dir:DIR", pretrained=True)   # timm >= 1.0.16
    tokens = model.forward_features(x)   # (B, 1 + N, D): cls token, then patch tokens, after the final norm
    cls = model(x)                       # (B, D): num_classes 0, global_pool "token"

``config.json`` has the layout timm's hub exports use (``architecture``, ``num_classes``, ``global_pool``,
``model_args`` for ``create_model``, ``pretrained_cfg`` with the input size, mean and std), plus an
``ssl_bench`` section naming the run it came from. ``ViTBackbone`` wraps a timm ``VisionTransformer``
(``backbone.vit``) whose ``pos_embed`` holds the fixed sin-cos table with a zero cls slot, so
``backbone.vit.state_dict()`` already has timm's keys and ``forward_features`` computes exactly
``ViTBackbone.forward``. An encoder with BEiT's shared relative position bias (``model.rel_pos_bias=shared``)
exports as timm's ``Beit`` (:func:`beit_state_dict` renames its keys). An encoder option neither has is
refused, never dropped.
"""
from __future__ import annotations

import hashlib
from pathlib import Path

from ssl_bench.backbone import ARCHS
from ssl_bench.atomic import atomic_write, make_folder
from ssl_bench.errors import UserError
from ssl_bench.records import json_bytes, now_iso
from ssl_bench.safe_load import load_torch_file

WEIGHTS_FILE = "model.safetensors"
CONFIG_FILE = "config.json"
# signature keys -> timm VisionTransformer arguments; any other key is an option a plain timm ViT lacks
TIMM_ARGS = {"img_size": "img_size", "patch_size": "patch_size", "in_chans": "in_chans", "embed_dim": "embed_dim",
             "depth": "depth", "num_heads": "num_heads", "layer_scale": "init_values"}
# model.rel_pos_bias=shared -> timm's Beit; width, depth and heads are always given, so tiny/small use the base name
BEIT_NAMES = {"vit_large": "beit_large_patch16_224"}
BEIT_DEFAULT = "beit_base_patch16_224"


def timm_create_kwargs(signature: dict) -> tuple[str, dict]:
    """(timm model name, kwargs) that build a ``timm.create_model`` ViT with the encoder's exact keys/shapes."""
    sig = dict(signature)
    if sig.get("kind", "vit") != "vit":
        raise UserError(f"this run's encoder is the '{sig['kind']}' control, not a ViT: there are no weights to export")
    sig.pop("kind", None)
    arch = sig.pop("arch")
    beit = sig.get("rel_pos_bias") == "shared"
    if beit:
        sig.pop("rel_pos_bias")
    foreign = {k: v for k, v in sig.items() if k not in TIMM_ARGS and v not in (None, "none", False)}
    if foreign:
        options = ", ".join(f"model.{k}={v}" for k, v in foreign.items())
        raise UserError(f"cannot export this encoder to timm: it uses {options}, which timm's VisionTransformer "
                        f"and Beit do not have; evaluate it with ssl-bench eval instead")
    kwargs = {TIMM_ARGS[k]: v for k, v in sig.items() if k in TIMM_ARGS and v is not None}
    kwargs["num_classes"] = 0  # no head: forward() returns the cls token, forward_features() all tokens
    if not beit:
        return ARCHS[arch][0], kwargs
    # every Beit default that differs from our encoder is given: the registered beit_* names turn on a
    # per-block bias, an absolute table, LayerScale 0.1 and average pooling (which moves the final norm)
    kwargs.update(use_abs_pos_emb=False, use_rel_pos_bias=False, use_shared_rel_pos_bias=True,
                  init_values=sig.get("layer_scale"), global_pool="token")
    return BEIT_NAMES.get(arch, BEIT_DEFAULT), kwargs


def beit_state_dict(vit_state: dict, rel_pos_bias_table) -> dict:
    """Our ViT's keys renamed to timm's ``Beit`` (same computation):

    blocks.i.attn.qkv.bias (3D,) -> blocks.i.attn.q_bias, v_bias (D,) each. Beit has no key bias, and needs
        none: a key bias adds q_i . b_k to every logit of query i's row, which the softmax cancels.
    blocks.i.ls1.gamma / ls2.gamma -> blocks.i.gamma_1 / gamma_2 (LayerScale)
    the shared relative position bias table ((2G-1)^2 + 3, H) -> rel_pos_bias.relative_position_bias_table
    """
    out = {}
    for key, value in vit_state.items():
        if key.endswith(".attn.qkv.bias"):
            q, _, v = value.chunk(3)
            out[key.replace(".qkv.bias", ".q_bias")] = q.clone()
            out[key.replace(".qkv.bias", ".v_bias")] = v.clone()
        elif key.endswith((".ls1.gamma", ".ls2.gamma")):
            out[key[: -len(".ls1.gamma")] + (".gamma_1" if ".ls1." in key else ".gamma_2")] = value
        else:
            out[key] = value
    out["rel_pos_bias.relative_position_bias_table"] = rel_pos_bias_table.detach().cpu().contiguous()
    return out


def timm_config(model_name: str, kwargs: dict, mean, std, source: dict) -> dict:
    """``config.json`` in the layout of timm's hub exports (read by ``create_model("local-dir:DIR")``)."""
    import timm

    size = (kwargs["in_chans"], kwargs["img_size"], kwargs["img_size"])
    return {
        "architecture": model_name,
        "num_classes": 0,
        "num_features": kwargs["embed_dim"],
        "global_pool": "token",
        "model_args": kwargs,
        "pretrained_cfg": {
            "tag": f"ssl_bench_{source.get('method')}", "custom_load": False, "input_size": list(size),
            "fixed_input_size": True, "interpolation": "bicubic", "crop_pct": 1.0, "crop_mode": "center",
            "mean": list(mean), "std": list(std), "num_classes": 0, "pool_size": None,
            "first_conv": "patch_embed.proj", "classifier": "head",
        },
        "ssl_bench": {
            "source": source,
            "input": "pixels / 255, then (x - mean) / std, at input_size",
            "features": "forward_features(x): (B, 1 + N, D) after the final norm; [:, 0] cls token, [:, 1:] patch tokens",
            "position_embedding": "one learned relative position bias shared by all blocks (rel_pos_bias), no absolute table"
                                  if kwargs.get("use_shared_rel_pos_bias") else
                                  "fixed 2-D sin-cos (stored in pos_embed, cls slot zero); keep it frozen when fine-tuning",
            "timm_version": timm.__version__,
            "created": now_iso(),
        },
    }


def _write_new(out: Path, data: bytes) -> None:
    """Write ``out`` atomically, failing (not replacing) if it appeared meanwhile."""
    try:
        atomic_write(out, lambda f: f.write(data), new_names=[out])
    except FileExistsError:
        raise UserError(f"{out} already exists; exports are never overwritten, choose another --out") from None


def load_exported(path: str | Path) -> dict:
    """The state dict of an exported folder or weights file (safetensors, or a torch file of tensors)."""
    path = Path(path)
    if path.is_dir():
        path = path / WEIGHTS_FILE
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    return load_torch_file(path, "exported weights", "export the run again")


def export_encoder(run_dir: str | Path, out: str | Path) -> Path:
    """Write the encoder of the finished run in ``run_dir`` into the new folder ``out``
    (``model.safetensors`` + ``config.json``); returns ``out``."""
    import timm
    from safetensors.torch import save

    from ssl_bench.checkpoint import load_encoder

    out = Path(out)
    if out.suffix in (".pth", ".pt", ".bin", ".safetensors"):
        raise UserError(f"--out {out} names a file; it names a folder, which gets {WEIGHTS_FILE} and {CONFIG_FILE} (e.g. --out {out.with_suffix('')})")
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise UserError(f"{out} already exists and is not an empty folder; exports are never overwritten, choose another --out")

    backbone, record = load_encoder(run_dir)
    model_name, kwargs = timm_create_kwargs(backbone.signature())
    state = {k: v.detach().cpu().contiguous() for k, v in backbone.vit.state_dict().items()}
    if backbone.rel_pos_bias is not None:
        state = beit_state_dict(state, backbone.rel_pos_bias.relative_position_bias_table)
    # The promise of this folder: timm builds this exact model and accepts every key. Check it here, so a
    # timm upgrade that renames a key fails at export, not in a user's script.
    timm.create_model(model_name, pretrained=False, **kwargs).load_state_dict(state, strict=True)

    info = record.get("data_info") or {}
    weights = save(state, metadata={"format": "pt"})
    source = {
        "run_dir": str(Path(run_dir).resolve()), "method": record.get("method"), "data": record.get("data"),
        "preset": record.get("preset"), "seed": record.get("seed"), "git_commit": record.get("git_commit"),
        "weights_sha256": hashlib.sha256(weights).hexdigest(),
    }
    if not info.get("mean") or not info.get("std"):
        raise UserError(f"run {run_dir} records no input normalization (run.json data_info mean/std); it was not written by ssl-bench pretrain")
    config = timm_config(model_name, kwargs, info["mean"], info["std"], source)
    make_folder(out, "--out")
    _write_new(out / WEIGHTS_FILE, weights)
    _write_new(out / CONFIG_FILE, json_bytes(config))  # last: a folder with config.json is complete
    return out
