"""Export: the encoder loads into a plain timm ViT with strict=True and computes the same features."""
import json

import pytest
import timm
import torch

from evals.export import export_encoder, load_exported
from ssl_bench.checkpoint import load_encoder
from ssl_bench.cli import main
from ssl_bench.config import resolve_config
from ssl_bench.registry import get_method
from ssl_bench.trainer import pretrain


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "mae"
    cfg = resolve_config(get_method("mae"), "smoke", ["train.max_steps=2", "train.progress=false"])
    pretrain(cfg, out)
    return out


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_export_loads_strict_and_matches_features(run_dir, tmp_path, suffix):
    weights, sidecar = export_encoder(run_dir, tmp_path / f"encoder{suffix}")
    spec = json.loads(sidecar.read_text())
    model = timm.create_model(spec["model_name"], **spec["create_kwargs"]).eval()
    images = torch.randn(3, spec["input"]["in_chans"], spec["input"]["img_size"], spec["input"]["img_size"])
    with torch.no_grad():
        before = model.forward_features(images)
        model.load_state_dict(load_exported(weights), strict=True)
        tokens = model.forward_features(images)  # (B, 1 + N, D)
        encoder, _ = load_encoder(run_dir)
        cls, patches = encoder(images)
    assert not torch.allclose(before, tokens)  # the comparison below is not vacuous
    torch.testing.assert_close(tokens[:, 0], cls)
    torch.testing.assert_close(tokens[:, 1:], patches)
    torch.testing.assert_close(model(images), cls)  # num_classes=0: forward() is the cls feature
    assert spec["source"]["method"] == "mae" and spec["input"]["mean"] is not None


def test_export_never_overwrites(run_dir, tmp_path, capsys):
    out = tmp_path / "enc.pth"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    first = out.read_bytes()
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert out.read_bytes() == first
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "enc.txt")]) == 2


def test_layer_scale_encoder_exports_and_guards_its_signature(tmp_path):
    """BEiT / CAE's LayerScale (model.layer_scale) is a timm option too: the export carries it, loads strictly
    and computes the same features; a checkpoint with it never loads into an encoder without it."""
    from ssl_bench.backbone import ViTBackbone
    from ssl_bench.checkpoint import check_signature
    from ssl_bench.errors import UserError

    out = tmp_path / "mae-ls"
    cfg = resolve_config(get_method("mae"), "smoke", ["train.max_steps=2", "train.progress=false", "model.layer_scale=0.1"])
    pretrain(cfg, out)
    encoder, _ = load_encoder(out)
    gammas = [b.ls1.gamma for b in encoder.blocks]
    assert gammas and all(torch.allclose(g, torch.full_like(g, 0.1), atol=0.01) for g in gammas)  # init 0.1, 2 steps
    weights, sidecar = export_encoder(out, tmp_path / "encoder.pth")
    spec = json.loads(sidecar.read_text())
    assert spec["create_kwargs"]["init_values"] == 0.1
    model = timm.create_model(spec["model_name"], **spec["create_kwargs"]).eval()
    model.load_state_dict(load_exported(weights), strict=True)
    images = torch.randn(2, spec["input"]["in_chans"], spec["input"]["img_size"], spec["input"]["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images)[:, 1:], encoder(images)[1])
    plain = {k: v for k, v in encoder.signature().items() if k != "layer_scale"}
    assert ViTBackbone(**plain).signature() == plain  # no LayerScale: the signature reads as before
    with pytest.raises(UserError, match="layer_scale: checkpoint 0.1 vs this run None"):
        check_signature(encoder.signature(), plain, "x.pt")
