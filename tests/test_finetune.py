"""Fine-tuning: layer-wise lr decay really scales each block's updates; the epoch is chosen on the
held-out split and that epoch's model (not the last) is the one scored on test; a short run trains."""
import numpy as np
import pytest
import torch
from torch.utils.data import TensorDataset

import evals.finetune as ft
from evals.finetune import FineTuneModel, layer_decay_groups, layer_id
from ssl_bench.backbone import ViTBackbone
from ssl_bench.optim import build_optimizer, set_lr

DEPTH, DECAY = 3, 0.5


def tiny_encoder(drop_path=0.0):
    return ViTBackbone("vit_tiny", img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=DEPTH, num_heads=2, drop_path=drop_path)


def params(**kw):
    p = {"batch_size": 16, "epochs": 3, "warmup_epochs": 0, "blr": 1e-3, "min_lr": 0.0, "layer_decay": DECAY,
         "weight_decay": 0.05, "drop_path": 0.0, "mixup": 0.0, "cutmix": 0.0, "label_smoothing": 0.1,
         "optimizer": "adamw", "randaug": None, "reprob": 0.0, "seed": 0}
    return {**p, **kw}


def test_layer_ids_follow_beit():
    assert layer_id("encoder.vit.patch_embed.proj.weight", DEPTH) == 0
    assert layer_id("encoder.vit.cls_token", DEPTH) == 0
    assert layer_id("encoder.vit.blocks.0.attn.qkv.weight", DEPTH) == 1
    assert layer_id("encoder.vit.blocks.2.mlp.fc2.bias", DEPTH) == DEPTH
    assert layer_id("head.weight", DEPTH) == layer_id("fc_norm.weight", DEPTH) == DEPTH + 1


def test_layer_decay_gives_each_block_its_lr():
    """One AdamW step moves every weight by ~lr x scale (Adam's first step is lr x sign(grad)); so the
    measured update of block i must be lr x decay^(depth - i), patch embed decay^(depth + 1), head 1."""
    torch.manual_seed(0)
    model = FineTuneModel(tiny_encoder(), num_classes=4)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # a non-tiny head, so gradients reach every block
    groups = layer_decay_groups(model, weight_decay=0.0, layer_decay=DECAY)
    names = {n: g["lr_scale"] for g in groups for n in g["names"]}
    assert set(names) == {n for n, p in model.named_parameters() if p.requires_grad}
    assert "encoder.vit.pos_embed" not in names  # the fixed sin-cos table stays frozen
    for g in groups:
        g.pop("names")
    opt = build_optimizer(groups, "adamw", 1e-2, betas=(0.9, 0.999))
    set_lr(opt, 1e-2)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    loss = torch.nn.functional.cross_entropy(model(torch.randn(8, 1, 28, 28)), torch.arange(8) % 4)
    loss.backward()
    opt.step()
    expected = {
        "encoder.vit.patch_embed.proj.weight": DECAY ** (DEPTH + 1),
        "encoder.vit.cls_token": DECAY ** (DEPTH + 1),
        **{f"encoder.vit.blocks.{i}.attn.qkv.weight": DECAY ** (DEPTH - i) for i in range(DEPTH)},
        **{f"encoder.vit.blocks.{i}.mlp.fc1.weight": DECAY ** (DEPTH - i) for i in range(DEPTH)},
        "fc_norm.weight": 1.0, "head.weight": 1.0,
    }
    for name, scale in expected.items():
        step = (dict(model.named_parameters())[name] - before[name]).abs().max().item()
        assert step == pytest.approx(1e-2 * scale, rel=0.02), name
        assert names[name] == pytest.approx(scale), name


def test_weight_decay_only_on_matrices():
    model = FineTuneModel(tiny_encoder(), num_classes=4)
    for g in layer_decay_groups(model, weight_decay=0.05, layer_decay=DECAY):
        for n, p in zip(g["names"], g["params"]):
            assert g["weight_decay"] == (0.05 if p.ndim > 1 and not n.endswith("cls_token") else 0.0), n


def test_randaugment_top_magnitude_posterize_does_not_crash():
    """rand-m9-mstd0.5 reaches magnitude 10 now and then, where posterize keeps 0 bits (black image)."""
    from PIL import Image

    aug = ft.train_transform(28, (0.5,), (0.5,), params(randaug="rand-m9-mstd0.5-inc1"))
    randaugment = next(t for t in aug.transforms if hasattr(t, "ops"))
    op = next(o for o in randaugment.ops if o.name == "PosterizeIncreasing")
    op.prob, op.magnitude, op.magnitude_std = 1.0, 10, 0.0
    out = op(Image.new("L", (28, 28), color=200))
    assert out.getextrema() == (0, 0)


def _blobs(n, seed):
    """Two classes told apart by brightness: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    x = torch.randn(n, 1, 28, 28, generator=g) * 0.3 + (y.float() * 2 - 1).view(-1, 1, 1, 1)
    return TensorDataset(x, y)


def test_selects_best_heldout_epoch_and_tests_that_model(monkeypatch):
    """accuracy() is scripted for the held-out passes (best at epoch 2 of 3) and returns a fingerprint of
    the head for the test pass: the test score must come from the epoch-2 weights."""
    heldout_scores, fingerprints, loaders = [50.0, 70.0, 60.0], [], []

    def scripted(model, loader, device, autocast):
        fingerprints.append(model.head.weight.detach().sum().item())
        loaders.append(loader.dataset)
        return heldout_scores[len(fingerprints) - 1] if len(fingerprints) <= 3 else fingerprints[-1]

    monkeypatch.setattr(ft, "accuracy", scripted)
    train, heldout, test = _blobs(64, 0), _blobs(32, 1), _blobs(32, 2)
    out = ft.finetune(tiny_encoder(), train, heldout, test, 2, params(), torch.device("cpu"))
    assert out["selected"] == {"epoch": 2, "heldout_top1": 70.0}
    assert [c["heldout_top1"] for c in out["details"]["curve"]] == heldout_scores
    assert loaders == [heldout] * 3 + [test]  # test is scored once, after selection
    assert out["top1"] == fingerprints[1] != fingerprints[2]


def test_short_finetune_learns_with_mixup_and_augmentation():
    torch.manual_seed(0)
    encoder = tiny_encoder(drop_path=0.1)
    start = encoder.blocks[0].attn.qkv.weight.detach().clone()
    p = params(epochs=3, blr=4e-3, mixup=0.8, cutmix=1.0, label_smoothing=0.1)
    aug = ft.train_transform(28, (0.0,), (1.0,), params(randaug="rand-m9-mstd0.5-inc1", reprob=0.25))
    assert aug(torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)).shape == (1, 28, 28)
    out = ft.finetune(encoder, _blobs(128, 0), _blobs(64, 1), _blobs(64, 2), 2, p, torch.device("cpu"))
    assert out["top1"] >= 90.0  # chance is 50
    assert not torch.equal(start, encoder.blocks[0].attn.qkv.weight)  # the encoder itself was trained
    assert np.isfinite([c["train_loss"] for c in out["details"]["curve"]]).all()


def test_lp_ft_fits_the_head_on_frozen_features_first():
    """LP-FT's first stage trains only fc_norm + head (the encoder is bit-for-bit unchanged) and already
    separates the classes; fine-tuning then starts from that head."""
    torch.manual_seed(0)
    model = FineTuneModel(tiny_encoder(), num_classes=2)
    encoder_before = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    head_before = model.head.weight.detach().clone()
    out = ft.fit_head(model, _blobs(128, 0), epochs=20, lr=3e-2, device=torch.device("cpu"),
                      autocast=ft.contextlib.nullcontext, heldout=_blobs(64, 1))
    assert all(torch.equal(v, encoder_before[k]) for k, v in model.encoder.state_dict().items())
    assert not torch.equal(head_before, model.head.weight)
    assert out["heldout_top1"] >= 90.0 and out["steps"] == 20

    p = params(epochs=1, probe_epochs=20, probe_lr=3e-2)
    with pytest.raises(ft.UserError, match="train_plain"):
        ft.finetune(tiny_encoder(), _blobs(64, 0), _blobs(32, 1), _blobs(32, 2), 2, p, torch.device("cpu"))
    result = ft.finetune(tiny_encoder(), _blobs(64, 0), _blobs(32, 1), _blobs(32, 2), 2, p, torch.device("cpu"),
                         train_plain=_blobs(64, 0))
    assert result["details"]["probe"]["heldout_top1"] >= 90.0


def test_transform_without_crop_and_flip_is_the_eval_transform():
    """The quick preset fine-tunes on un-augmented images: the train transform must then equal the eval one."""
    from ssl_bench.data.transforms import eval_transform

    image = torch.randint(0, 256, (1, 28, 28), dtype=torch.uint8)
    plain = ft.train_transform(28, (0.3,), (0.4,), params(crop_scale=None, hflip=False))
    assert torch.equal(plain(image), eval_transform(28, 28, (0.3,), (0.4,))(image))
    flipped = ft.train_transform(28, (0.3,), (0.4,), params(crop_scale=None, hflip=True))
    outs = {tuple(flipped(image).flatten()[:28].tolist()) for _ in range(20)}
    assert len(outs) == 2  # the image and its mirror
    assert ft.train_transform(14, (0.3,), (0.4,), params(crop_scale=None, hflip=False))(image).shape == (1, 14, 14)
