"""BEiT's defining behaviour: [MASK] embeddings replace masked patches in a full-sequence encoder, and the
loss is the cross-entropy against the tokenizer's codes at masked positions only."""
import pytest
import torch

from ssl_bench.build import build_method
from ssl_bench.data.pipeline import build_pretrain_loader
from ssl_bench.errors import UserError
from ssl_bench.tokenizer import TOKENIZER_FILE
from ssl_bench.tokenizer_training import train_tokenizer
from ssl_bench.trainer import pretrain
from tests.conftest import smoke_config


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A briefly trained smoke tokenizer (64 codes, one per 7x7 patch of 28x28 Fashion-MNIST)."""
    out = tmp_path_factory.mktemp("tok")
    train_tokenizer("fashion_mnist", None, out, "smoke", ["train.progress=false", "train.steps=40", "train.holdout=100"])
    return str(out / TOKENIZER_FILE)


@pytest.fixture
def beit_and_batch(tokenizer_path, fashion_info):
    cfg = smoke_config("beit", f"method.tokenizer={tokenizer_path}")
    torch.manual_seed(0)
    method = build_method(cfg, fashion_info)
    loader, *_ = build_pretrain_loader(cfg, method.data_spec())
    return method, next(iter(loader))


def test_block_masking_at_official_share(beit_and_batch):
    method, batch = beit_and_batch
    spec = method.data_spec()
    assert spec.mask.kind == "block" and not spec.mask.fixed_count  # BEiT's generator: may end short
    assert (batch["mask"].sum(1) <= round(75 / 196 * method.backbone.num_patches)).all()


def test_loss_covers_masked_positions_only(beit_and_batch, monkeypatch):
    method, batch = beit_and_batch
    method.eval()
    mask = batch["mask"]
    clean = method.training_step(batch)["loss_mim"]
    tokenize = method.tokenizer.tokenize

    # other targets at visible positions: same loss; at masked positions: another loss
    def shifted_targets(where):
        def fn(images):
            t = tokenize(images)
            return torch.where(where, (t + 1) % method.tokenizer.vocab_size, t)
        return fn

    monkeypatch.setattr(method.tokenizer, "tokenize", shifted_targets(~mask))
    assert torch.allclose(method.training_step(batch)["loss_mim"], clean)
    monkeypatch.setattr(method.tokenizer, "tokenize", shifted_targets(mask))
    assert not torch.allclose(method.training_step(batch)["loss_mim"], clean)
    monkeypatch.setattr(method.tokenizer, "tokenize", tokenize)

    # other final features at visible positions: same loss; at masked positions: another loss
    def perturb(where):
        def hook(module, inp, out):
            patches = torch.where(where.unsqueeze(-1), out[:, 1:] + 3.0 * torch.randn_like(out[:, 1:]), out[:, 1:])
            return torch.cat([out[:, :1], patches], dim=1)
        return method.backbone.vit.norm.register_forward_hook(hook)

    handle = perturb(~mask)
    assert torch.allclose(method.training_step(batch)["loss_mim"], clean)
    handle.remove()
    handle = perturb(mask)
    assert not torch.allclose(method.training_step(batch)["loss_mim"], clean)
    handle.remove()


def test_mask_embedding_replaces_masked_patches_and_learns(beit_and_batch):
    method, batch = beit_and_batch
    images, mask = batch["views"][0], batch["mask"]
    seen = []
    method.backbone.blocks.register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
    method.training_step(batch)["loss_mim"].backward()
    x = seen[0][:, 1:]  # (B, N, D): the encoder's input, all N positions
    pos = method.backbone.patch_pos_embed.expand_as(x)
    expected_masked = (method.mask_token + pos)[mask]
    expected_visible = (method.backbone.embed_patches(images) + pos)[~mask]
    assert x.shape[1] == method.backbone.num_patches
    assert torch.allclose(x[mask], expected_masked.detach(), atol=1e-6)
    assert torch.allclose(x[~mask], expected_visible.detach(), atol=1e-5)
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.tokenizer.parameters())  # the tokenizer is frozen


def test_loss_falls_on_real_images(tokenizer_path, tmp_path):
    # a few hundred Fashion-MNIST images, several epochs of a tiny BEiT (64-way targets)
    cfg = smoke_config("beit", f"method.tokenizer={tokenizer_path}", "data.subset=320", "train.epochs=6",
                       "train.log_every=1", "train.blr=0.03")
    record = pretrain(cfg, tmp_path / "run")
    curve = [v for _, v in record["loss"]["loss"]["curve"]]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert record["status"] == "finished" and last < 0.9 * first, (first, last)


def test_tokenizer_option_errors_are_clear(tokenizer_path, fashion_info, tmp_path):
    with pytest.raises(UserError, match="resolved when pretraining starts"):
        build_method(smoke_config("beit"), fashion_info)  # "auto" needs prepare
    with pytest.raises(UserError, match="does not match the backbone"):  # a 4x4-grid tokenizer on a 7x7-grid ViT
        build_method(smoke_config("beit", f"method.tokenizer={tokenizer_path}", "model.patch_size=4"), fashion_info)
    with pytest.raises(UserError, match="ssl-bench tokenizer train"):
        build_method(smoke_config("beit", f"method.tokenizer={tmp_path / 'nope.pt'}"), fashion_info)


def test_auto_tokenizer_is_trained_in_prepare_and_reused_on_resume(tmp_path, monkeypatch):
    from ssl_bench import tokenizer_training as tt

    monkeypatch.setitem(tt.TOKENIZER_PRESETS["smoke"], "train", {**tt.TOKENIZER_PRESETS["smoke"]["train"], "steps": 3, "holdout": 50})
    run = tmp_path / "run"
    cfg = smoke_config("beit", "train.max_steps=2", "data.subset=64")  # method.tokenizer=auto by default
    record = pretrain(cfg, run)
    path = run / "tokenizer" / TOKENIZER_FILE
    assert record["status"] == "finished" and record["config"]["method"]["tokenizer"] == str(path.resolve())
    stamp = path.stat().st_mtime_ns
    (run / "run.json").unlink()  # as if interrupted after the checkpoint: resume runs prepare again
    assert pretrain(cfg, run, resume=True)["status"] == "finished"
    assert path.stat().st_mtime_ns == stamp  # reused, not retrained
