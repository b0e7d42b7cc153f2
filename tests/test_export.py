"""Export: a folder that timm loads with one create_model call, computing the suite's features."""
import json

import pytest
import timm
import torch

from evals.export import export_encoder, load_exported
from ssl_bench.checkpoint import load_encoder
from ssl_bench_app.cli import main
from ssl_bench.config import resolve_config
from ssl_bench.registry import get_method
from ssl_bench.trainer import pretrain


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "mae"
    cfg = resolve_config(get_method("mae"), "smoke", ["train.max_steps=2", "train.progress=false"])
    pretrain(cfg, out)
    return out


def assert_same_features(model, encoder, cfg: dict, images) -> None:
    """The timm model loaded from the export computes our encoder's features, and an untrained one does not."""
    with torch.no_grad():
        tokens = model.forward_features(images)  # (B, 1 + N, D)
        cls, patches = encoder(images)
        untrained = timm.create_model(cfg["architecture"], pretrained=False, **cfg["model_args"]).eval()
        assert not torch.allclose(untrained.forward_features(images), tokens)  # the comparison below is not vacuous
        torch.testing.assert_close(tokens[:, 0], cls)
        torch.testing.assert_close(tokens[:, 1:], patches)
        torch.testing.assert_close(model(images), cls)  # num_classes 0, global pool "token": forward() is the cls feature


def test_timm_loads_the_export_folder_in_one_call(run_dir, tmp_path):
    out = export_encoder(run_dir, tmp_path / "export")
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # exactly the README's call
    cfg = json.loads((out / "config.json").read_text())
    c, size, _ = cfg["pretrained_cfg"]["input_size"]
    images = torch.randn(3, c, size, size)
    encoder, record = load_encoder(run_dir)
    assert_same_features(model, encoder, cfg, images)
    assert (cfg["num_classes"], cfg["global_pool"], cfg["model_args"]["patch_size"]) == (0, "token", encoder.patch_size)
    assert cfg["pretrained_cfg"]["mean"] == record["data_info"]["mean"] and cfg["ssl_bench"]["source"]["method"] == "mae"
    assert tuple(timm.data.resolve_data_config({}, model=model)["mean"]) == tuple(record["data_info"]["mean"])  # timm's own preprocessing reads it
    assert load_exported(out).keys() == model.state_dict().keys()


def test_export_never_overwrites(run_dir, tmp_path, capsys):
    out = tmp_path / "enc"
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 0
    assert f'timm.create_model("local-dir:{out}", pretrained=True)' in capsys.readouterr().out
    first = (out / "model.safetensors").read_bytes()
    assert main(["export", "--run", str(run_dir), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err
    assert (out / "model.safetensors").read_bytes() == first
    assert main(["export", "--run", str(run_dir), "--out", str(tmp_path / "enc.pth")]) == 2
    assert "names a folder" in capsys.readouterr().err


def test_an_encoder_option_timm_lacks_is_refused_in_one_line():
    from evals.export import timm_create_kwargs
    from ssl_bench.errors import UserError

    sig = {"arch": "vit_tiny", "img_size": 28, "patch_size": 4, "in_chans": 1, "embed_dim": 32, "depth": 1, "num_heads": 2}
    assert timm_create_kwargs(sig)[1]["num_classes"] == 0
    assert timm_create_kwargs({**sig, "rel_pos_bias": "shared"})[0] == "beit_base_patch16_224"  # exported as timm's Beit
    # an option neither timm class has (here a made-up one, as a newer suite's signature could carry)
    with pytest.raises(UserError, match="model.rope=2d, which timm's VisionTransformer and Beit do not have"):
        timm_create_kwargs({**sig, "rel_pos_bias": "shared", "rope": "2d"})
    with pytest.raises(UserError, match="no weights to export"):
        timm_create_kwargs({"kind": "pixels", "img_size": 28, "in_chans": 1})


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
    folder = export_encoder(out, tmp_path / "export")
    assert json.loads((folder / "config.json").read_text())["model_args"]["init_values"] == 0.1
    model = timm.create_model(f"local-dir:{folder}", pretrained=True).eval()
    images = torch.randn(2, encoder.in_chans, encoder.img_size, encoder.img_size)
    with torch.no_grad():
        torch.testing.assert_close(model.forward_features(images)[:, 1:], encoder(images)[1])
    plain = {k: v for k, v in encoder.signature().items() if k != "layer_scale"}
    assert ViTBackbone(**plain).signature() == plain  # no LayerScale: the signature reads as before
    with pytest.raises(UserError, match="layer_scale: checkpoint 0.1 vs this run None"):
        check_signature(encoder.signature(), plain, "x.pt")


def test_beit_keys_become_timm_beit_with_the_same_features():
    """The renaming of :func:`beit_state_dict` (q/v bias out of the qkv bias, LayerScale gammas, the shared
    relative position bias table) on weights far from their init, so that any misplaced tensor shows."""
    from evals.export import beit_state_dict, timm_create_kwargs
    from ssl_bench.backbone import ViTBackbone

    torch.manual_seed(0)
    encoder = ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=2, num_heads=2,
                          layer_scale=0.1, rel_pos_bias="shared").eval()
    with torch.no_grad():
        for p in encoder.parameters():  # the bias table and q/k/v biases start at zero, the gammas at 0.1
            p.add_(torch.randn_like(p) * 0.2)
    name, kwargs = timm_create_kwargs(encoder.signature())
    model = timm.create_model(name, pretrained=False, **kwargs).eval()
    assert isinstance(model, timm.models.beit.Beit) and model.rel_pos_bias is not None and model.pos_embed is None
    model.load_state_dict(beit_state_dict(encoder.vit.state_dict(), encoder.rel_pos_bias.relative_position_bias_table), strict=True)
    images = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        cls, patches = encoder(images)
        tokens = model.forward_features(images)
        torch.testing.assert_close(tokens[:, 0], cls)
        torch.testing.assert_close(tokens[:, 1:], patches)
        torch.testing.assert_close(model(images), cls)
        model.rel_pos_bias.relative_position_bias_table.zero_()  # the table matters: without it the features differ
        assert not torch.allclose(model.forward_features(images), tokens, atol=1e-3)


def test_beit_run_exports_as_a_timm_beit_folder(tmp_path, monkeypatch):
    """A pretrained BEiT encoder (shared relative position bias and LayerScale, BEiT's defaults) exports to a
    folder that the README's one call loads as timm's Beit, giving the suite's features."""
    from ssl_bench import tokenizer_training as tt

    monkeypatch.setitem(tt.TOKENIZER_PRESETS["smoke"], "train", {**tt.TOKENIZER_PRESETS["smoke"]["train"], "steps": 3, "holdout": 50})
    run = tmp_path / "beit"
    pretrain(resolve_config(get_method("beit"), "smoke", ["train.max_steps=2", "train.progress=false", "data.subset=64"]), run)
    encoder, record = load_encoder(run)
    assert encoder.signature()["rel_pos_bias"] == "shared" and encoder.signature()["layer_scale"] == 0.1
    out = export_encoder(run, tmp_path / "export")
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"].startswith("beit_") and cfg["model_args"]["use_shared_rel_pos_bias"] is True
    model = timm.create_model(f"local-dir:{out}", pretrained=True).eval()  # exactly the README's call
    assert isinstance(model, timm.models.beit.Beit)
    images = torch.randn(3, encoder.in_chans, encoder.img_size, encoder.img_size)
    assert_same_features(model, encoder, cfg, images)
    assert cfg["pretrained_cfg"]["mean"] == record["data_info"]["mean"] and cfg["ssl_bench"]["source"]["method"] == "beit"
