"""MAE's defining behaviour: the encoder sees visible patches only; the loss covers masked patches only."""
import pytest
import torch

from ssl_bench.build import build_method
from ssl_bench.data.pipeline import build_pretrain_loader
from ssl_bench.trainer import pretrain
from tests.conftest import smoke_config


@pytest.fixture
def mae_and_batch(fashion_info):
    cfg = smoke_config("mae")
    torch.manual_seed(0)
    method = build_method(cfg, fashion_info)
    loader, *_ = build_pretrain_loader(cfg, method.data_spec())
    return method, next(iter(loader))


def test_encoder_receives_only_visible_tokens(mae_and_batch):
    method, batch = mae_and_batch
    seen = []
    method.backbone.blocks.register_forward_hook(lambda m, inp, out: seen.append(inp[0].shape))
    method.training_step(batch)
    n_visible = int((~batch["mask"][0]).sum())
    assert seen == [(len(batch["mask"]), 1 + n_visible, method.backbone.embed_dim)]


def test_encoder_output_ignores_masked_pixels(mae_and_batch):
    method, batch = mae_and_batch
    method.eval()
    images, mask = batch["views"][0], batch["mask"]
    latents = []
    method.decoder.register_forward_hook(lambda m, inp, out: latents.append(inp[0].detach().clone()))
    method.training_step(batch)
    # scramble the pixels of every masked patch: the encoder's output must not move
    p = method.backbone.patch_size
    g = method.backbone.grid_size
    pixel_mask = mask.reshape(-1, 1, g, g).repeat_interleave(p, 2).repeat_interleave(p, 3)
    scrambled = torch.where(pixel_mask, torch.randn_like(images) * 5, images)
    method.training_step({**batch, "views": [scrambled]})
    assert torch.equal(latents[0], latents[1])


def test_loss_covers_masked_patches_only(mae_and_batch, monkeypatch):
    method, batch = mae_and_batch
    method.eval()
    mask = batch["mask"]
    clean = method.training_step(batch)["loss_recon"]
    decoder_forward = method.decoder.forward

    def corrupt(where):
        def forward(latent, ids_restore):
            pred = decoder_forward(latent, ids_restore)
            return torch.where(where.unsqueeze(-1), pred + 100.0, pred)
        return forward

    monkeypatch.setattr(method.decoder, "forward", corrupt(~mask))
    assert torch.allclose(method.training_step(batch)["loss_recon"], clean)
    monkeypatch.setattr(method.decoder, "forward", corrupt(mask))
    assert method.training_step(batch)["loss_recon"] > clean + 1000


def test_loss_falls_on_real_images(tmp_path):
    # a few hundred Fashion-MNIST images, several epochs of a tiny MAE
    cfg = smoke_config("mae", "data.subset=320", "train.epochs=6", "train.log_every=1")
    record = pretrain(cfg, tmp_path / "run")
    curve = [v for _, v in record["loss"]["loss"]["curve"]]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert record["status"] == "finished" and last < 0.85 * first, (first, last)


def test_official_init_and_weight_decay(fashion_info):
    """models_mae.py: xavier_uniform on every Linear (zero bias) and on the patch projection seen as a
    Linear; LayerNorm eps 1e-6 throughout; the optimizer decays cls and mask token too."""
    method = build_method(smoke_config("mae"), fashion_info)
    linears = [m for m in method.modules() if isinstance(m, torch.nn.Linear)]
    proj = method.backbone.vit.patch_embed.proj.weight
    for w in [m.weight for m in linears] + [proj.flatten(1)]:
        bound = (6 / (w.shape[0] + w.shape[1])) ** 0.5
        assert w.abs().max() <= bound and w.abs().max() > 0.9 * bound  # uniform over the whole xavier range
    assert all(m.bias is None or not m.bias.any() for m in linears)
    assert all(m.eps == 1e-6 for m in method.modules() if isinstance(m, torch.nn.LayerNorm))
    decayed = {id(p) for g in method.param_groups(0.05) if g["weight_decay"] > 0 for p in g["params"]}
    assert id(method.backbone.vit.cls_token) in decayed and id(method.decoder.mask_token) in decayed
