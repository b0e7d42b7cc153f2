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


def test_loss_is_the_mean_over_masked_positions_whatever_each_mask_counts(beit_and_batch):
    """The official loss: cross-entropy over the flat set of the batch's masked positions (a boolean index).
    The step reads the head at a fixed number of positions per sample instead (no host sync), so a mask
    short of the target must count only its masked positions, and a mask above the target is refused."""
    method, batch = beit_and_batch
    method.eval()
    mask = batch["mask"].clone()
    for i in range(0, len(mask), 2):  # every other sample loses i % 5 + 1 of its masked positions
        mask[i, mask[i].nonzero()[: i % 5 + 1, 0]] = False
    assert len(set(mask.sum(1).tolist())) > 3
    features = []
    handle = method.backbone.vit.norm.register_forward_hook(lambda m, i, out: features.append(out[:, 1:]))
    loss = method.training_step({**batch, "mask": mask})["loss_mim"]
    handle.remove()
    targets = method.tokenizer.tokenize(batch["views"][0])
    official = torch.nn.functional.cross_entropy(method.head(features[0][mask]).float(), targets[mask])
    torch.testing.assert_close(loss, official, rtol=1e-6, atol=0)

    mask[0] = True  # more masked positions than the generator ever draws
    with pytest.raises(RuntimeError, match="more positions than its generator's target"):
        method.training_step({**batch, "mask": mask})


def test_mask_embedding_replaces_masked_patches_and_learns(beit_and_batch):
    method, batch = beit_and_batch
    images, mask = batch["views"][0], batch["mask"]
    seen = []
    method.backbone.blocks[0].register_forward_pre_hook(lambda m, inp: seen.append(inp[0].detach()))
    method.training_step(batch)["loss_mim"].backward()
    x = seen[0][:, 1:]  # (B, N, D): the encoder's input, all N positions, no absolute position embedding
    expected_masked = method.mask_token.expand_as(x)[mask]
    expected_visible = method.backbone.embed_patches(images)[~mask]
    assert x.shape[1] == method.backbone.num_patches
    assert torch.allclose(x[mask], expected_masked.detach(), atol=1e-6)
    assert torch.allclose(x[~mask], expected_visible.detach(), atol=1e-5)
    assert method.mask_token.grad is not None and method.mask_token.grad.abs().sum() > 0
    assert all(p.grad is None for p in method.tokenizer.parameters())  # the tokenizer is frozen


def test_shared_relative_position_bias_is_the_only_position_signal(beit_and_batch):
    method, batch = beit_and_batch
    backbone = method.backbone
    assert backbone.vit.pos_embed is None and backbone.signature()["rel_pos_bias"] == "shared"
    table = backbone.rel_pos_bias.relative_position_bias_table
    g = backbone.grid_size
    assert table.shape == ((2 * g - 1) ** 2 + 3, backbone.num_heads) and not table.any()  # zero at init, as official
    # one table for all blocks: every block receives the same bias as its attention mask
    masks = []
    for block in backbone.blocks:
        block.register_forward_pre_hook(lambda m, args, kwargs: masks.append(kwargs["attn_mask"]), with_kwargs=True)
    method.training_step(batch)["loss_mim"].backward()
    assert len(masks) == backbone.depth and all(m is masks[0] for m in masks)
    assert table.grad is not None and table.grad.abs().sum() > 0  # it learns
    # a subset of positions (forward_visible) sees the bias rows/columns of exactly those positions
    images = batch["views"][0][:2]
    with torch.no_grad():
        table.normal_()
        ids = torch.tensor([[0, 3, 5, 9], [1, 2, 8, 15]])
        sub = backbone.forward_visible(images, ids)
        for i in range(2):
            keep = torch.cat([torch.zeros(1, dtype=torch.long), ids[i] + 1])
            x = torch.cat([backbone.vit.cls_token[0], backbone.embed_patches(images[i : i + 1])[0, ids[i]]])[None]
            bias = backbone.rel_pos_bias()[:, keep][:, :, keep][None]
            for block in backbone.blocks:
                x = block(x, attn_mask=bias)
            assert torch.allclose(backbone.vit.norm(x)[0], sub[i], atol=1e-5)


def test_official_init_rescales_residual_projections(beit_and_batch):
    method, _ = beit_and_batch
    for layer_id, block in enumerate(method.backbone.blocks, start=1):
        for weight in (block.attn.proj.weight, block.mlp.fc2.weight):
            bound = 0.02 / (2 * layer_id) ** 0.5  # normal(0.02) truncated at one std, then / sqrt(2 * layer_id)
            assert weight.abs().max() <= bound + 1e-7 and weight.abs().max() > 0.9 * bound
    assert method.backbone.blocks[0].attn.qkv.weight.abs().max() <= 0.02 + 1e-7  # truncated at +-std


def test_rel_pos_encoder_survives_a_checkpoint(beit_and_batch):
    from ssl_bench.backbone import ViTBackbone

    method, batch = beit_and_batch
    backbone = method.backbone.eval()
    with torch.no_grad():
        backbone.rel_pos_bias.relative_position_bias_table.normal_()
    rebuilt = ViTBackbone(**backbone.signature())  # as load_encoder rebuilds it for the probes
    rebuilt.load_state_dict(backbone.state_dict())
    images = batch["views"][0][:4]
    with torch.no_grad():
        assert all(torch.equal(a, b) for a, b in zip(backbone(images), rebuilt.eval()(images)))


def test_recipe_matches_official_defaults(beit_and_batch):
    from methods.beit import BEiT
    from ssl_bench.config import resolve_config

    for preset in ("smoke", "quick", "full"):
        cfg = resolve_config(BEiT, preset)
        assert cfg["train"]["clip_grad"] == 3.0 and cfg["model"]["rel_pos_bias"] == "shared" and cfg["model"]["layer_scale"] == 0.1
    method, _ = beit_and_batch
    (view,) = method.data_spec().augmentation  # DataAugmentationForBEiT: ColorJitter 0.4 on every image, crop 0.08-1
    assert view.jitter == (0.4, 0.4, 0.4, 0.0) and view.jitter_p == 1.0 and tuple(view.crop_scale) == (0.08, 1.0)


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
