"""SimSiam's defining behaviour: the target branch is a stop-gradient, without which the
representation collapses (the z_std monitor falls); the predictor's lr is not scheduled."""
import json
import math

import pytest
import torch

from ssl_bench.build import build_method
from ssl_bench.data import views
from ssl_bench.data.pipeline import build_pretrain_loader
from ssl_bench.optim import build_optimizer, set_lr
from ssl_bench.trainer import pretrain
from tests.conftest import smoke_config


def simsiam(info, *overrides, seed=0):
    torch.manual_seed(seed)
    return build_method(smoke_config("simsiam", *overrides), info)


def batches(info, n, *overrides):
    """``n`` real two-view batches, over as many epochs as needed (fresh augmentations each epoch)."""
    cfg = smoke_config("simsiam", *overrides)
    loader, sampler, dataset, _ = build_pretrain_loader(cfg, simsiam(info).data_spec())
    out, epoch = [], 0
    while len(out) < n:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        out += list(loader)
        epoch += 1
    return out[:n]


@pytest.mark.parametrize("stop_gradient", [True, False])
def test_target_branch_gets_no_gradient(fashion_info, stop_gradient):
    method = simsiam(fashion_info, f"method.stop_gradient={stop_gradient}")
    batch = batches(fashion_info, 1, "train.batch_size=16")[0]
    # Cut the predictor path (p = h(z)): the only route left from the loss to z is the target branch.
    method.predictor.register_forward_pre_hook(lambda module, args: (args[0].detach(),))
    targets = []

    def keep_z(module, args, z):
        z.retain_grad()
        targets.append(z)

    method.projector.register_forward_hook(keep_z)
    method.training_step(batch)["loss_simsiam"].backward()
    reached = [z.grad is not None and z.grad.abs().max() > 0 for z in targets]
    projector_grads = [p.grad is not None and p.grad.abs().max() > 0 for p in method.projector.parameters()]
    assert len(targets) == 2
    if stop_gradient:
        assert not any(reached) and not any(projector_grads)
    else:  # control: the same probe sees the gradient once the stop-gradient is removed
        assert all(reached) and any(projector_grads)


def test_without_stop_gradient_the_representation_collapses(tmp_path):
    """Two tiny runs through the trainer, identical but for method.stop_gradient (seed 003, the SimSiam
    paper's Fig. 2): the collapse monitor in run.json (std of l2-normalized z per channel) stays near
    1/sqrt(d) with the stop-gradient and falls well below without it. A constant lr 0.1 (above the
    recipe's) so that a few dozen steps suffice."""
    common = ("data.subset=1024", "train.epochs=2", "train.lr=0.1", "train.min_lr=0.1", "train.ckpt_every=1000")
    monitor = {}
    for stop_gradient in (True, False):
        cfg = smoke_config("simsiam", f"method.stop_gradient={stop_gradient}", *common)
        pretrain(cfg, tmp_path / f"sg-{stop_gradient}")
        record = json.loads((tmp_path / f"sg-{stop_gradient}" / "run.json").read_text())
        z_std = record["metrics"]["z_std"]
        healthy = 1 / math.sqrt(cfg["method"]["proj_dim"])
        assert record["steps"] == 64 and abs(z_std["first"] / healthy - 1) < 0.1  # healthy at init
        monitor[stop_gradient] = z_std["last_10pct_mean"]
    assert monitor[True] > 0.8 * healthy, monitor
    assert monitor[False] < 0.8 * monitor[True], monitor


def test_official_heads_decay_and_augmentation(fashion_info):
    """The official builder: projector hidden width = the encoder's width, its output proj_dim; the
    official SGD decays every parameter; the MoCo v2 colour jitter has saturation 0.4."""
    method = simsiam(fashion_info, "model.embed_dim=48", "method.proj_dim=80")
    linears = [m for m in method.projector if isinstance(m, torch.nn.Linear)]
    assert [(m.in_features, m.out_features) for m in linears] == [(48, 48), (48, 48), (48, 80)]
    for group in method.param_groups(1e-4):
        assert group["weight_decay"] == 1e-4
    policy = views.resolve_policy(method.data_spec().augmentation)
    assert len(policy) == 2 and all(v.jitter == (0.4, 0.4, 0.4, 0.1) and v.jitter_p == 0.8 for v in policy)


def test_predictor_lr_is_fixed(fashion_info):
    method = simsiam(fashion_info)
    groups = method.param_groups(1e-4)
    predictor = {id(p) for p in method.predictor.parameters()}
    trainable = [p for p in method.parameters() if p.requires_grad]
    grouped = [p for g in groups for p in g["params"]]
    assert sorted(map(id, grouped)) == sorted(map(id, trainable))  # every parameter exactly once
    for g in groups:
        assert g.get("fixed_lr", False) == (id(g["params"][0]) in predictor)
        assert all((id(p) in predictor) == g.get("fixed_lr", False) for p in g["params"])
    # as the trainer schedules it: the predictor keeps the base lr when the schedule moves the rest
    optimizer = build_optimizer(groups, "sgd", lr=0.05)
    set_lr(optimizer, 0.001)
    for g in optimizer.param_groups:
        assert g["lr"] == (0.05 if g.get("fixed_lr") else 0.001)


def test_loss_falls_on_real_images_without_collapse(tmp_path):
    # the smoke recipe (SGD, blr 0.05) through the trainer: 6 epochs of 8 steps on 256 images
    cfg = smoke_config("simsiam", "train.epochs=6", "train.log_every=1", "train.ckpt_every=1000")
    record = pretrain(cfg, tmp_path / "run")
    curve = [v for _, v in record["loss"]["loss"]["curve"]]
    n = record["steps_per_epoch"]
    first, last = sum(curve[:n]) / n, sum(curve[-n:]) / n  # first vs last epoch: same images
    assert record["status"] == "finished" and last < first - 0.07, (first, last)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    d = cfg["method"]["proj_dim"]
    assert min(r["z_std"] for r in rows[-n:]) > 0.8 / math.sqrt(d)  # it learned without collapsing
    assert record["metrics"]["z_std"]["last"] == rows[-1]["z_std"]  # the monitor is in the run record too
