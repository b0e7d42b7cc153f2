"""MoCo v3's defining behaviour: a momentum encoder moved only by EMA on a half-cosine schedule,
a frozen random patch projection, and the symmetric InfoNCE over keys gathered from all processes."""
import math

import pytest
import torch

import methods.mocov3 as mocov3_module
from ssl_bench.build import build_method
from ssl_bench.data import views
from ssl_bench.data.pipeline import build_pretrain_loader
from ssl_bench.optim import build_optimizer
from ssl_bench.trainer import pretrain
from tests.conftest import smoke_config


@pytest.fixture
def moco_and_batch(fashion_info):
    cfg = smoke_config("mocov3", "train.batch_size=16")
    torch.manual_seed(0)
    method = build_method(cfg, fashion_info)
    loader, *_ = build_pretrain_loader(cfg, method.data_spec())
    return method, next(iter(loader))


def snapshot(module):
    return [p.detach().clone() for p in module.parameters()]


def train_step(method, optimizer, batch, step=0, total=10):
    method.on_step_start(step, total)
    loss = method.training_step(batch)["loss_contrastive"]
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()


def test_momentum_encoder_gets_no_gradient_and_follows_ema(moco_and_batch):
    method, batch = moco_and_batch
    online = [method.backbone, method.projector]
    target = [method.momentum_backbone, method.momentum_projector]
    optimizer = build_optimizer(method.param_groups(0.1), "adamw", lr=1e-3)
    in_optimizer = {id(p) for g in optimizer.param_groups for p in g["params"]}
    momentum_params = [p for m in target for p in m.parameters()]
    assert not any(p.requires_grad or id(p) in in_optimizer for p in momentum_params)  # never trained or decayed

    train_step(method, optimizer, batch)  # step 0: m = 0.99, and both encoders start equal
    before = [snapshot(m) for m in target]
    online_now = [snapshot(m) for m in online]
    # As the official forward: the EMA step comes first in a step, with that step's momentum, so the
    # keys of step 3 come from f_k moved towards f_q as the optimizer left it after step 2.
    method.on_step_start(3, 10)
    m = method.momentum
    for t_mod, o_params, old in zip(target, online_now, before):
        for t, o, t0 in zip(t_mod.parameters(), o_params, old):
            torch.testing.assert_close(t, m * t0 + (1 - m) * o, rtol=0, atol=1e-6)
    loss = method.training_step(batch)["loss_contrastive"]
    optimizer.zero_grad()
    loss.backward()
    assert all(p.grad is None for p in momentum_params)
    moved = [not torch.equal(t, t0) for t, t0 in zip(method.momentum_projector.parameters(), before[1])]
    assert any(moved)  # the check above was not vacuous
    assert method.encoder is method.backbone  # evaluation uses the query encoder
    assert any(k.startswith("momentum_backbone.") for k in method.state_dict())  # resumable


def test_official_heads_init_decay_and_augmentation(fashion_info):
    """The official ViT builder: predictor ends in a BN without affine; vits.py init (qkv as three
    blocks, cls std 1e-6, row-first sin-cos table); AdamW decays every parameter; crops at 0.08-1."""
    method = build_method(smoke_config("mocov3"), fashion_info)
    last = method.predictor[-1]
    assert isinstance(last, torch.nn.BatchNorm1d) and not last.affine
    assert not any(m.bias is not None for m in method.predictor.modules() if isinstance(m, torch.nn.Linear))
    qkv = method.backbone.blocks[0].attn.qkv.weight  # (3D, D)
    d = qkv.shape[1]
    assert (6 / (2 * d)) ** 0.5 * 0.9 < qkv.abs().max() <= (6 / (2 * d)) ** 0.5  # not xavier over (3D, D)
    assert method.backbone.vit.cls_token.abs().max() < 1e-5
    pos = method.backbone.patch_pos_embed[0]  # (N, D): first half encodes the row, constant along a row
    g = method.backbone.grid_size
    assert torch.equal(pos[0, : d // 2], pos[g - 1, : d // 2]) and not torch.equal(pos[0, : d // 2], pos[g, : d // 2])
    groups = method.param_groups(0.1)
    trainable = [p for p in method.parameters() if p.requires_grad]
    assert len(groups) == 1 and groups[0]["weight_decay"] == 0.1 and len(groups[0]["params"]) == len(trainable)
    policy = views.resolve_policy(method.data_spec().augmentation)
    assert len(policy) == 2 and all(v.crop_scale == (0.08, 1.0) and v.jitter == (0.4, 0.4, 0.2, 0.1) for v in policy)


def test_momentum_schedule_is_half_cosine_from_base_to_one(fashion_info):
    method = build_method(smoke_config("mocov3"), fashion_info)
    total = 1000

    def m_at(step):
        method.on_step_start(step, total)
        return method.momentum

    base = 0.99
    assert m_at(0) == base and m_at(total) == 1.0
    values = [m_at(s) for s in range(total + 1)]
    assert all(a <= b for a, b in zip(values, values[1:]))
    assert m_at(total // 2) == pytest.approx((base + 1) / 2)
    # a half cosine, not a line: flat at both ends, base + (1 - base)(1 - cos(pi t/T))/2 in between
    assert m_at(total // 4) == pytest.approx(base + (1 - base) * (1 - math.cos(math.pi / 4)) / 2, abs=1e-12)
    assert m_at(1) - m_at(0) < 0.01 * (1 - base) / total


def test_patch_projection_stays_frozen(moco_and_batch):
    method, batch = moco_and_batch
    optimizer = build_optimizer(method.param_groups(0.1), "adamw", lr=1e-3)
    patch, blocks = snapshot(method.backbone.vit.patch_embed), snapshot(method.backbone.blocks)
    for step in range(3):
        train_step(method, optimizer, batch, step)
    assert all(torch.equal(a, b) for a, b in zip(patch, snapshot(method.backbone.vit.patch_embed)))
    assert not all(torch.equal(a, b) for a, b in zip(blocks, snapshot(method.backbone.blocks)))


def hand_infonce(q, k, labels, tau):
    """Mean over i of -log(exp(q_i.k_label/tau) / sum_j exp(q_i.k_j/tau)), times 2 tau, by loops."""
    total = 0.0
    for i, qi in enumerate(q.tolist()):
        qn = math.sqrt(sum(x * x for x in qi))
        logits = []
        for kj in k.tolist():
            kn = math.sqrt(sum(x * x for x in kj))
            logits.append(sum(a * b for a, b in zip(qi, kj)) / (qn * kn) / tau)
        top = max(logits)
        log_sum_exp = top + math.log(sum(math.exp(v - top) for v in logits))
        total += log_sum_exp - logits[labels[i]]
    return total / len(q) * 2 * tau


@pytest.mark.parametrize("rank", [0, 1])
def test_loss_is_symmetric_infonce_over_gathered_keys(moco_and_batch, monkeypatch, rank):
    method, batch = moco_and_batch
    x1, x2 = (v[:4] for v in batch["views"])  # a tiny batch: B = 4
    with torch.no_grad():  # each view through each encoder on its own
        q1, q2 = (method.predictor(method.projector(method.backbone(x)[0])) for x in (x1, x2))
        k1, k2 = (method.momentum_projector(method.momentum_backbone(x)[0]) for x in (x1, x2))
    # a second process: its (normalized) keys come first in the gather when this one is rank 1
    other = torch.nn.functional.normalize(torch.randn(4, k1.shape[1]), dim=1)
    if rank == 1:
        monkeypatch.setattr(mocov3_module, "concat_all_gather", lambda k: torch.cat([other, k]))
        monkeypatch.setattr(torch.distributed, "is_initialized", lambda: True)
        monkeypatch.setattr(torch.distributed, "get_rank", lambda: 1)
    keys = (lambda k: torch.cat([other, k])) if rank == 1 else (lambda k: k)
    labels = [rank * 4 + i for i in range(4)]
    tau = method.temperature
    expected = hand_infonce(q1, keys(k2), labels, tau) + hand_infonce(q2, keys(k1), labels, tau)
    with torch.no_grad():
        loss = method.training_step({"views": [x1, x2]})["loss_contrastive"]
    assert loss.item() == pytest.approx(expected, rel=1e-4)


def test_loss_falls_on_real_images(tmp_path):
    # the smoke recipe through the trainer: 6 epochs of 8 steps on 256 images
    cfg = smoke_config("mocov3", "train.epochs=6", "train.log_every=1", "train.ckpt_every=1000")
    record = pretrain(cfg, tmp_path / "run")
    curve = [v for _, v in record["loss"]["loss"]["curve"]]
    n = record["steps_per_epoch"]
    first, last = sum(curve[:n]) / n, sum(curve[-n:]) / n  # first vs last epoch: same images
    assert record["status"] == "finished" and last < first - 0.08, (first, last)
