"""Build a method (and its backbone) from a resolved run config."""
from __future__ import annotations

from ssl_bench.backbone import ViTBackbone
from ssl_bench.data.datasets import DatasetInfo
from ssl_bench.errors import UserError, one_line
from ssl_bench.registry import get_method


def build_backbone(model_cfg: dict, img_size: int, in_chans: int) -> ViTBackbone:
    return ViTBackbone(
        arch=model_cfg["arch"], img_size=img_size, patch_size=model_cfg["patch_size"], in_chans=in_chans,
        drop_path=model_cfg["drop_path"], embed_dim=model_cfg["embed_dim"], depth=model_cfg["depth"],
        num_heads=model_cfg["num_heads"], layer_scale=model_cfg.get("layer_scale"),
        rel_pos_bias=model_cfg.get("rel_pos_bias", "none"),
    )


def build_method(cfg: dict, info: DatasetInfo):
    """The method of ``cfg`` on a backbone sized for the data set (``data.img_size`` overrides its size)."""
    backbone = build_backbone(cfg["model"], cfg["data"]["img_size"] or info.img_size, info.in_chans)
    try:
        return get_method(cfg["method_name"])(backbone, **cfg["method"])
    except (AssertionError, ValueError) as exc:  # a layer refusing its shape, e.g. a width not divisible by the heads
        options = ", ".join(f"method.{k}={v}" for k, v in cfg["method"].items())
        raise UserError(f"{cfg['method_name']} cannot be built with {options} ({one_line(exc)}); change these options") from None
