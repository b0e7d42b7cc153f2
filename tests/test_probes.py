"""Linear and attentive probes on synthetic features whose answer is known."""
import numpy as np
import pytest
import torch

from evals.attentive import AttentiveProbe, attentive_probe
from evals.features import Features
from evals.linear import LinearHead, linear_probe, mode_params, train_heads
from evals.presets import resolve_eval_config

CPU = torch.device("cpu")


def fast(protocol: str, *overrides: str) -> dict:
    """The smoke preset's ``protocol`` section in fast mode (cached features, its fast epochs)."""
    return mode_params({**resolve_eval_config("smoke", list(overrides))[protocol], "mode": "fast"})


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
    p = fast("linear")
    result = linear_probe(*parts, num_classes=4, p=p, device=CPU, features=("cls", "mean"))
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
    attentive = attentive_probe(*parts, num_classes=4, num_heads=2, p=fast("attentive", "attentive.fast_epochs=10"), device=CPU)
    linear = linear_probe(*parts, num_classes=4, p=fast("linear"), device=CPU, features=("mean",))
    assert attentive["top1"] > 90
    assert attentive["top1"] > linear["top1"] + 30
    assert linear["top1"] > 30  # above chance (25%): the mean carries a little signal, so the gap is real


def test_attentive_probe_is_one_cross_attention_without_skip_or_mlp():
    probe = AttentiveProbe(dim=8, num_heads=2, num_classes=3).eval()
    tokens = torch.randn(5, 7, 8)  # cls + 6 patch tokens
    pooled = probe.pool(tokens)
    # the pooled vector is an attention-weighted mix of the projected values: permuting the tokens
    # changes nothing (no position, no skip from the query)
    assert torch.allclose(pooled, probe.pool(tokens[:, torch.randperm(7)]), atol=1e-6)
    # identical tokens pool to that token's projected value, whatever the query
    same = tokens[:, :1].expand(-1, 7, -1)
    value = probe.attn.proj(probe.attn.v(probe.norm_v(tokens[:, 0])))
    assert torch.allclose(probe.pool(same), value, atol=1e-5)
    assert not any(isinstance(m, torch.nn.GELU) for m in probe.modules())


def test_attentive_probe_attends_over_cls_and_patches_with_a_normed_query():
    """CAE's AttentiveBlock: keys / values are the whole normalised output sequence, cls included, and the
    query goes through its own LayerNorm (norm_q)."""
    probe = AttentiveProbe(dim=8, num_heads=2, num_classes=3).eval()
    cls, patches = torch.randn(5, 8), torch.randn(5, 6, 8)
    logits = probe({"cls": cls, "patches": patches})
    tokens = torch.cat([cls[:, None], patches], dim=1)
    torch.testing.assert_close(logits, probe.linear(probe.norm(probe.pool(tokens))))
    assert not torch.allclose(logits, probe({"cls": cls + 3 * torch.randn(5, 8), "patches": patches}))  # cls is a key / value
    assert probe.kinds == ("cls", "patches")
    # the query is layer-normed: scaling and shifting the learned query changes nothing ...
    with torch.no_grad():
        before = probe.pool(tokens)
        probe.norm_q.weight.fill_(1.0)
        probe.norm_q.bias.zero_()
        probe.query.normal_()  # unit scale, so LayerNorm's eps is negligible
        plain = probe.pool(tokens)
        probe.query.mul_(5.0).add_(2.0)
        torch.testing.assert_close(probe.pool(tokens), plain, atol=1e-5, rtol=1e-4)
        # ... and norm_q's own affine parameters are used
        probe.norm_q.weight.fill_(2.0)
        assert not torch.allclose(probe.pool(tokens), plain, atol=1e-4)
    assert before.shape == (5, 8)


def test_attentive_probe_trains_with_nesterov_sgd():
    p = resolve_eval_config("quick")["attentive"]
    assert p["optimizer"] == "sgd" and p["nesterov"] is True
    from ssl_bench.optim import build_optimizer

    opt = build_optimizer([{"params": [torch.nn.Parameter(torch.zeros(2))]}], "sgd", 0.1, nesterov=p["nesterov"])
    assert opt.param_groups[0]["nesterov"] is True


def test_grid_choice_on_an_edge_is_warned_and_a_middle_choice_is_not():
    g = torch.Generator().manual_seed(1)
    z = torch.randn(900, 16, generator=g)
    labels = (z[:, 0] > 0).long()
    parts = [as_features(labels[i], cls=z[i]) for i in split(500, 200, 200)]
    # lrs far too small to move the head: held-out top-1 rises with the lr, the largest wins
    low = linear_probe(*parts, num_classes=2, p={**fast("linear"), "blrs": (1e-7, 1e-6, 1e-1)}, device=CPU)
    assert low["selected"]["blr"] == 0.1
    assert len(low["warnings"]) == 1 and "blr=0.1 is the highest value of its grid" in low["warnings"][0]
    from evals.selection import edge_warnings

    assert edge_warnings({"blr": 0.1}, {"blr": (0.01, 0.1, 1.0)}) == []
    assert "lowest" in edge_warnings({"k": 10}, {"k": (10, 20, 100)})[0]
    assert edge_warnings({"k": 20}, {"k": (20,)}) == []  # a grid of one is no choice
    # an end that is a hard limit is no edge: nothing lies below k = 1, or after a schedule's last epoch
    assert edge_warnings({"k": 1}, {"k": (1, 5, 20)}, limits={"k": (1, None)}) == []
    assert "lowest" in edge_warnings({"k": 1}, {"k": (1, 5, 20)})[0]
    assert edge_warnings({"epoch": 3}, {"epoch": range(1, 4)}, limits={"epoch": (None, 3)}) == []
    assert "lowest" in edge_warnings({"epoch": 1}, {"epoch": range(1, 4)}, limits={"epoch": (None, 3)})[0]


def test_wilson_interval():
    from evals.selection import wilson_interval

    lo, hi = wilson_interval(75.0, 10_000)
    assert lo < 75.0 < hi and hi - lo == pytest.approx(2 * 1.96 * (0.75 * 0.25 / 10_000) ** 0.5 * 100, rel=0.01)
    lo, hi = wilson_interval(100.0, 20)  # never beyond [0, 100], and not empty at the extremes
    assert 80 < lo < 100 and hi == pytest.approx(100.0)


@pytest.mark.parametrize("bad", ["linear.nope=1", "attentive.epochs", "nope.epochs=1"])
def test_unknown_eval_override_is_a_clear_error(bad):
    from ssl_bench.errors import UserError

    with pytest.raises(UserError):
        resolve_eval_config("smoke", [bad])
