"""Linear and attentive probes on synthetic features whose answer is known."""
import numpy as np
import pytest
import torch

from evals.attentive import AttentiveProbe, attentive_probe
from evals.features import Features
from evals.linear import LinearHead, linear_probe, train_heads
from evals.presets import resolve_eval_config

CPU = torch.device("cpu")


def split(n_train, n_heldout, n_test):
    return np.split(np.arange(n_train + n_heldout + n_test), [n_train, n_train + n_heldout])


def as_features(labels, **arrays) -> Features:
    return Features(np.asarray(labels, dtype=np.int64), {k: np.asarray(v, dtype=np.float16) for k, v in arrays.items()})


def test_linear_probe_solves_a_linearly_separable_task():
    g = torch.Generator().manual_seed(0)
    z = torch.randn(4000, 32, generator=g)
    logits = z @ torch.randn(32, 4, generator=g)  # the label is a linear function of the features
    top2 = logits.topk(2, dim=1).values
    keep = (top2[:, 0] - top2[:, 1] > 1.0).nonzero()[:1800, 0]  # with a margin around every boundary
    x, labels = 3 * z[keep] + 5, logits[keep].argmax(1)  # off-centre and scaled: BatchNorm must whiten it
    noise = torch.randn(1800, 32, generator=g)
    parts = [as_features(labels[i], cls=x[i], mean=noise[i]) for i in split(1000, 300, 500)]
    p = resolve_eval_config("smoke")["linear"]
    result = linear_probe(*parts, num_classes=4, p=p, device=CPU)
    assert result["top1"] > 95
    assert result["selected"]["feature"] == "cls"  # chosen on held-out: the mean feature is noise
    assert len(result["details"]["grid"]) == 2 * len(p["blrs"])


def test_every_head_sees_the_same_batches_in_one_pass_per_epoch():
    n, batch, epochs = 100, 16, 3
    ids = np.repeat(np.arange(n, dtype=np.float32)[:, None], 4, axis=1)  # column 0 = sample id
    data = Features(np.arange(n) % 3, {"cls": ids, "mean": ids + 0})
    p = {**resolve_eval_config("smoke")["linear"], "epochs": epochs, "batch_size": batch, "warmup_epochs": 0}
    heads = [LinearHead(4, 3, f) for f in ("cls", "mean", "cls", "mean")]
    seen = {i: [] for i in range(len(heads))}
    for i, h in enumerate(heads):
        h.register_forward_pre_hook(lambda m, args, i=i: seen[i].append(args[0][m.feature][:, 0].long().tolist()))
    train_heads(heads, [0.1, 0.1, 1.0, 1.0], data, p, CPU)
    steps = n // batch
    assert all(seen[i] == seen[0] for i in seen)  # same batches, same order, for every head
    assert len(seen[0]) == epochs * steps  # one forward per head per step
    epochs_seen = [sum(seen[0][e * steps : (e + 1) * steps], []) for e in range(epochs)]
    assert all(len(set(ids)) == steps * batch for ids in epochs_seen)  # each epoch: one pass, no repeats
    assert epochs_seen[0] != epochs_seen[1]  # reshuffled every epoch


def one_patch_task(n, num_patches=16, dim=32, classes=4, seed=0):
    """Every patch shows a class prototype; one patch, marked, shows the true class, the rest are random
    distractors. The mean over patches is dominated by the distractors; attention can find the mark."""
    g = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(dim, dim, generator=g))[0]
    protos, mark = 2 * basis[:classes], 4 * basis[classes]
    labels = torch.randint(0, classes, (n,), generator=g)
    patches = protos[torch.randint(0, classes, (n, num_patches), generator=g)]  # distractors
    where = torch.randint(0, num_patches, (n,), generator=g)
    patches[torch.arange(n), where] = protos[labels] + mark
    patches = patches + 0.3 * torch.randn(n, num_patches, dim, generator=g)
    return labels, patches


def test_attentive_probe_beats_mean_pooling_when_the_label_lives_in_one_patch():
    labels, patches = one_patch_task(2400)
    parts = [
        as_features(labels[i], patches=patches[i], mean=patches[i].mean(1), cls=torch.randn(len(i), 32))
        for i in split(1600, 400, 400)
    ]
    cfg = resolve_eval_config("smoke", ["attentive.epochs=10"])
    attentive = attentive_probe(*parts, num_classes=4, num_heads=2, p=cfg["attentive"], device=CPU)
    linear = linear_probe(*parts, num_classes=4, p={**cfg["linear"], "feature_types": ("mean",)}, device=CPU)
    assert attentive["top1"] > 90
    assert attentive["top1"] > linear["top1"] + 30
    assert linear["top1"] > 30  # above chance (25%): the mean carries a little signal, so the gap is real


def test_attentive_probe_is_one_cross_attention_without_skip_or_mlp():
    probe = AttentiveProbe(dim=8, num_heads=2, num_classes=3).eval()
    patches = torch.randn(5, 6, 8)
    pooled = probe.pool(patches)
    # the pooled vector is an attention-weighted mix of the projected values: permuting the patches
    # changes nothing (no position, no skip from the query)
    assert torch.allclose(pooled, probe.pool(patches[:, torch.randperm(6)]), atol=1e-6)
    # identical patches pool to that patch's projected value, whatever the query
    same = patches[:, :1].expand(-1, 6, -1)
    value = probe.attn.proj(probe.attn.v(probe.norm_v(patches[:, 0])))
    assert torch.allclose(probe.pool(same), value, atol=1e-5)
    assert not any(isinstance(m, torch.nn.GELU) for m in probe.modules())


@pytest.mark.parametrize("bad", ["linear.nope=1", "attentive.epochs", "nope.epochs=1"])
def test_unknown_eval_override_is_a_clear_error(bad):
    from ssl_bench.errors import UserError

    with pytest.raises(UserError):
        resolve_eval_config("smoke", [bad])
