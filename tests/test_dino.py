"""DINO's defining behaviour: the teacher sees only global views and gets no gradient, it follows the student by
EMA, the centre update, the schedules, the frozen last layer, and the collapse monitor."""
import math

import pytest
import torch

from ssl_bench.build import build_method
from ssl_bench.data import views
from ssl_bench.trainer import pretrain
from tests.conftest import smoke_config

B = 4


@pytest.fixture
def dino(fashion_info):
    torch.manual_seed(0)
    return build_method(smoke_config("dino", "method.n_local=3"), fashion_info).train()


def crops(method, b=B):
    g, loc = method.backbone.img_size, method.local_size
    return [torch.randn(b, 1, g, g) for _ in range(2)] + [torch.randn(b, 1, loc, loc) for _ in range(method.n_local)]


def test_views_are_dinos_multicrop(dino):
    policy = views.resolve_policy(dino.data_spec().augmentation)
    assert len(policy) == 2 + 3 and [v.size for v in policy] == [None, None, 14, 14, 14]  # 28 px images, patch 7
    assert [(v.blur_p, v.solarize_p) for v in policy] == [(1.0, 0.0), (0.1, 0.2)] + [(0.5, 0.0)] * 3
    assert [v.crop_scale for v in policy] == [(0.4, 1.0)] * 2 + [(0.05, 0.4)] * 3


def test_the_teacher_sees_only_the_global_views_and_gets_no_gradient(dino):
    seen = {"teacher": [], "student": []}
    dino.teacher_backbone.register_forward_hook(lambda m, args, out: seen["teacher"].append(tuple(args[0].shape)))
    dino.backbone.register_forward_hook(lambda m, args, out: seen["student"].append(tuple(args[0].shape)))
    loss = dino.training_step({"views": crops(dino)})["loss_dino"]
    assert seen["teacher"] == [(2 * B, 1, 28, 28)]  # both global crops, one pass
    assert seen["student"] == [(2 * B, 1, 28, 28), (3 * B, 1, 14, 14)]  # every crop, one pass per size
    loss.backward()
    teacher = [*dino.teacher_backbone.parameters(), *dino.teacher_head.parameters()]
    assert all(p.grad is None and not p.requires_grad for p in teacher)
    assert dino.backbone.vit.blocks[0].attn.qkv.weight.grad.abs().sum() > 0
    in_optimizer = {id(p) for g in dino.param_groups(0.04) for p in g["params"]}
    assert not in_optimizer & {id(p) for p in teacher}
    assert dino.encoder is dino.teacher_backbone  # DINO evaluates the teacher


def test_teacher_is_the_ema_of_the_student(dino):
    dino.on_step_start(0, 100)
    assert dino.momentum == pytest.approx(0.996)
    with torch.no_grad():
        for p in [*dino.backbone.parameters(), *dino.head.parameters()]:
            p.add_(0.5)
    before = [t.clone() for t in dino.teacher_head.parameters()]
    dino.after_optimizer_step()
    for t_old, t, s in zip(before, dino.teacher_head.parameters(), dino.head.parameters(), strict=True):
        torch.testing.assert_close(t, 0.996 * t_old + 0.004 * s)
    dino.on_step_start(100, 100)
    assert dino.momentum == pytest.approx(1.0)


def test_the_centre_update_by_hand(dino):
    dino.center.fill_(0.5)
    x = crops(dino)
    with torch.no_grad():
        teacher_out = dino.teacher_head(dino.teacher_backbone(torch.cat(x[:2]))[0])  # (2B, K)
        dino.training_step({"views": x})
    expected = 0.9 * 0.5 + 0.1 * teacher_out.mean(0, keepdim=True)
    torch.testing.assert_close(dino.center, expected)
    assert "center" in dino.state_dict()  # resumes with the run


def test_the_loss_by_hand_with_centering_and_sharpening(dino):
    torch.manual_seed(1)
    K = dino.center.shape[1]
    student, teacher = torch.randn(4 * 2, K), torch.randn(2 * 2, K)  # 4 crops, 2 images
    dino.center.normal_()
    dino.teacher_temp = 0.05
    loss, _ = dino.dino_loss(student, teacher, 4)
    p = torch.softmax((teacher - dino.center) / 0.05, -1).chunk(2)
    logq = torch.log_softmax(student / 0.1, -1).chunk(4)
    pairs = [(t, s) for t in range(2) for s in range(4) if s != t]  # 6 pairs: no view against itself
    expected = sum((-p[t] * logq[s]).sum(-1).mean() for t, s in pairs) / len(pairs)
    torch.testing.assert_close(loss, expected)


def test_schedules_and_the_frozen_last_layer(dino):
    temps = []
    for step in (0, 15, 30, 99):
        dino.on_step_start(step, 100)
        temps.append(dino.teacher_temp)
    assert temps == pytest.approx([0.04, 0.055, 0.07, 0.07])  # warm-up over 30% of training
    v = dino.head.last_layer.parametrizations.weight.original1  # the direction; the norm g is fixed at 1
    assert not dino.head.last_layer.parametrizations.weight.original0.requires_grad
    for step, frozen in ((0, True), (1, False)):
        dino.zero_grad()
        dino.on_step_start(step, 100)
        dino.training_step({"views": crops(dino)})["loss_dino"].backward()
        assert bool((v.grad == 0).all()) == frozen
        assert dino.head.mlp[0].weight.grad.abs().sum() > 0


def test_the_collapse_monitor_flags_a_dominant_dimension_without_centering(dino):
    torch.manual_seed(2)
    K = dino.center.shape[1]
    teacher = 0.1 * torch.randn(2 * B, K)  # the scale of a weight-normalised layer on unit inputs
    teacher[:, 0] += 1.0  # one dimension dominates every image
    student = torch.randn(5 * B, K)
    dino.teacher_temp = 0.04
    dino.center.copy_(teacher.mean(0, keepdim=True))  # the centre after a while on such outputs

    def stats(centering):
        dino.centering = centering
        _, s = dino.dino_loss(student, teacher, 5)
        return dino.collapse_stats(s)

    on, off = stats(True), stats(False)
    assert on["collapse"] == 0 and on["teacher_batch_entropy"] > 0.3
    assert off["collapse"] == 1 and off["teacher_batch_entropy"] < 0.01 and off["teacher_entropy"] < 0.01
    # the other collapse: a uniform teacher that the student copies
    dino.centering = True
    dino.center.zero_()
    flat = torch.zeros(2 * B, K)
    _, s = dino.dino_loss(torch.zeros(5 * B, K), flat, 5)
    assert dino.collapse_stats(s)["collapse"] == 1 and s["kl"].abs() < 1e-6


def test_dino_trains_through_the_common_trainer_and_logs_the_monitor(tmp_path):
    cfg = smoke_config("dino", "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "data.subset=64",
                       "train.batch_size=16", "method.n_local=2")
    record = pretrain(cfg, tmp_path / "run")
    assert record["status"] == "finished" and math.isfinite(record["loss"]["loss_dino"]["last"])
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert {"teacher_entropy", "teacher_kl", "collapse", "teacher_temp"} <= set(rows[0].split(","))


def test_resume_is_bit_for_bit_with_multicrop_and_the_centre(tmp_path, monkeypatch):
    from methods.dino import DINO
    from tests.test_trainer import interrupted_run, weights

    cfg = smoke_config("dino", "model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.drop_path=0.1",
                       "data.subset=64", "train.batch_size=16", "train.epochs=2", "train.ckpt_every=3",
                       "method.n_local=2", "method.freeze_last_layer=0.5")  # frozen for steps 0-3: across the cut
    straight = pretrain(cfg, tmp_path / "straight")
    interrupted_run(monkeypatch, DINO, 5, cfg, tmp_path / "resumed")
    resumed = pretrain(cfg, tmp_path / "resumed", resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert resumed["steps"] == straight["steps"] == 8 and "center" in a
    assert all(torch.equal(a[k], b[k]) for k in a)
