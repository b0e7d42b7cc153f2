"""The official protocols: DINO's kNN figure, probes trained on crops drawn anew each epoch through the frozen
encoder (one forward per batch for the whole grid), and the records that name their mode."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evals.augment import crop_and_flip, crop_params
from evals.features import AugmentedImages, Features
from evals.knn import concat, knn_official
from evals.linear import linear_probe
from evals.presets import resolve_eval_config
from ssl_bench.backbone import ViTBackbone
from ssl_bench.data.datasets import TensorImageDataset, TransformedSubset

CPU = torch.device("cpu")


def dino_knn_top1(train, train_labels, test, test_labels, k, T, num_classes):
    """DINO's knn_classifier, from its formula: l2-normalised features, the k most similar train features by
    inner product vote for their labels with weight exp(similarity / T), top-1 of the summed votes."""
    train, test = F.normalize(train, dim=1), F.normalize(test, dim=1)
    sims, idx = (test @ train.T).topk(k, dim=1)  # (nq, k)
    votes = F.one_hot(train_labels[idx], num_classes).float() * (sims / T).exp()[..., None]  # (nq, k, C)
    return 100.0 * int((votes.sum(1).argmax(1) == test_labels).sum()) / len(test_labels)


def features(labels, cls, mean) -> Features:
    return Features(np.asarray(labels), {"cls": cls.numpy().astype(np.float16), "mean": mean.numpy().astype(np.float16)})


def test_official_knn_is_dinos_figure_on_cls_at_k20_over_the_whole_train_split():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(6, 16, generator=g)
    labels = torch.randint(0, 6, (700,), generator=g)
    cls = centers[labels] + 1.8 * torch.randn(700, 16, generator=g)
    mean = torch.randn(700, 16, generator=g)  # noise: must not be chosen, only reported
    train, heldout, test = (features(labels[s], cls[s], mean[s]) for s in (slice(0, 400), slice(400, 500), slice(500, 700)))
    result = knn_official(concat(train, heldout), test, 6, k=20, ks=(10, 20, 100), temperature=0.07, chunk=64)
    # the reference on the very features the protocol used (stored as float16), memory = train + held-out
    as_stored = torch.from_numpy(np.asarray(concat(train, heldout).arrays["cls"], dtype=np.float32))
    queries = torch.from_numpy(np.asarray(test.arrays["cls"], dtype=np.float32))
    expected = dino_knn_top1(as_stored, labels[:500], queries, labels[500:], 20, 0.07, 6)
    assert result["top1"] == pytest.approx(expected, abs=1e-9)
    assert result["selected"] == {"feature": "cls", "k": 20} and result["details"]["n_train"] == 500
    # without the held-out images in the memory the figure is another one (so the test can tell)
    assert dino_knn_top1(as_stored[:400], labels[:400], queries, labels[500:], 20, 0.07, 6) != expected
    extra = {(r["feature"], r["k"]): r["test_top1"] for r in result["details"]["extra"]}
    assert set(extra) == {(f, k) for f in ("cls", "mean") for k in (10, 20, 100)}
    assert extra[("cls", 20)] == result["top1"] and extra[("mean", 20)] < 40  # reported beside, never chosen


def test_crops_are_a_function_of_seed_epoch_and_index():
    a = crop_params(50, seed=0, epoch=0)
    assert np.array_equal(a, crop_params(50, seed=0, epoch=0))
    other_epoch, other_seed = crop_params(50, seed=0, epoch=1), crop_params(50, seed=1, epoch=0)
    assert (np.abs(a - other_epoch).sum(1) > 0).all() and (np.abs(a - other_seed).sum(1) > 0).all()
    top, left, h, w, flip = a.T
    assert ((top >= 0) & (left >= 0) & (top + h <= 1 + 1e-12) & (left + w <= 1 + 1e-12)).all()
    area = h * w
    assert area.min() >= 0.08 - 1e-9 and area.max() <= 1 + 1e-9 and 0 < flip.mean() < 1
    assert ((w / h >= 3 / 4 - 1e-9) & (w / h <= 4 / 3 + 1e-9)).all()


def test_crop_and_flip_geometry():
    img = torch.arange(16.0).view(1, 1, 4, 4)
    whole = crop_and_flip(img, [[0, 0, 1, 1, 0]], 4)
    torch.testing.assert_close(whole, img, atol=1e-4, rtol=0)  # the whole image at its size: unchanged
    torch.testing.assert_close(crop_and_flip(img, [[0, 0, 1, 1, 1]], 4), img.flip(-1), atol=1e-4, rtol=0)
    quarter = crop_and_flip(img, [[0.5, 0.5, 0.5, 0.5, 0]], 2)  # the bottom-right 2x2 block at 2x2
    torch.testing.assert_close(quarter, img[..., 2:, 2:], atol=1e-4, rtol=0)


@pytest.fixture
def augmented():
    """64 random 12x12 one-channel images and a tiny frozen ViT counting its forwards."""
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (64, 1, 12, 12), dtype=torch.uint8, generator=g)
    labels = (images.float().mean((1, 2, 3)) > 127.5).long()
    base = TensorImageDataset(images, labels)
    plain = TransformedSubset(base, np.arange(64), lambda x: x.float() / 255)
    torch.manual_seed(0)
    encoder = ViTBackbone(img_size=12, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2).eval().requires_grad_(False)
    inputs = []
    encoder.register_forward_pre_hook(lambda m, args: inputs.append(args[0].clone()))
    return AugmentedImages(plain, lambda: encoder, 12, (0.5,), (0.25,), seed=3), inputs


def test_augmented_batches_draw_new_crops_each_epoch_whatever_the_batching(augmented):
    data, inputs = augmented
    order = np.arange(64)
    (first, _), = data.batches(["cls"], order, 64, epoch=0)
    again = [f["cls"] for f, _ in data.batches(["cls"], order[::-1].copy(), 16, epoch=0)]  # other order, other batches
    torch.testing.assert_close(torch.cat(again).flip(0), first["cls"], atol=1e-5, rtol=1e-5)
    (later, _), = data.batches(["cls"], order, 64, epoch=1)
    assert not torch.allclose(later["cls"], first["cls"], atol=1e-3)
    # the encoder saw crops, not the plain images
    plain = (torch.stack([data.images[i][0] for i in range(64)]) - 0.5) / 0.25
    assert not torch.allclose(inputs[0], plain, atol=1e-2)


def test_official_linear_probe_one_encoder_forward_per_batch_feeds_every_head(augmented):
    data, inputs = augmented
    p = {**resolve_eval_config("smoke")["linear"], "epochs": 3, "warmup_epochs": 0, "batch_size": 16, "blrs": (0.01, 0.1, 1.0)}
    g = torch.Generator().manual_seed(1)
    held = features(torch.randint(0, 2, (40,), generator=g), torch.randn(40, 16, generator=g), torch.randn(40, 16, generator=g))
    head_calls = []
    import evals.linear

    original = evals.linear.LinearHead.forward

    def counting(self, feats):
        head_calls.append(id(self))
        return original(self, feats)

    evals.linear.LinearHead.forward = counting
    try:
        result = linear_probe(data, held, held, num_classes=2, p=p, device=CPU)
    finally:
        evals.linear.LinearHead.forward = original
    steps = 3 * (64 // 16)
    assert data.forwards == len(inputs) == steps == result["details"]["train_forwards"]  # one forward per batch ...
    train_calls = head_calls[: steps * 3]
    assert len(set(train_calls)) == 3 and all(train_calls.count(h) == steps for h in set(train_calls))  # ... for all 3 heads
    assert [r["feature"] for r in result["details"]["grid"]] == ["cls"] * 3  # official: the cls token only
    # every epoch draws new crops: the same 64 images (in any order) sum differently in each epoch
    per_epoch = [torch.cat(inputs[e * 4 : (e + 1) * 4]) for e in range(3)]
    sums = [x.sum().item() for x in per_epoch]
    assert len({round(s, 3) for s in sums}) == 3


def _write_run(root, method, figures):
    """A finished run with one eval record per (protocol, mode) -> top-1."""
    import json

    run = root / f"{method}-s0"
    (run / "evals").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"method": method, "data": "fashion_mnist", "preset": "quick", "seed": 0, "status": "finished"}))
    for (protocol, mode), top1 in figures.items():
        stem = f"{protocol}-fashion_mnist-quick" + ("-fast" if mode == "fast" else "")
        warnings = ["blr=3.0 is the highest value of its grid"] if (method, mode) == ("b", "fast") else []
        (run / "evals" / f"{stem}.json").write_text(json.dumps({
            "protocol": protocol, "mode": mode, "data": "fashion_mnist", "preset": "quick", "top1": top1,
            "ci95": [top1 - 0.8, top1 + 0.9], "warnings": warnings, "created": "2026-11-23T20:00:00"}))


def test_leaderboard_names_modes_marks_edges_and_compare_modes_prints_the_shift(tmp_path, capsys):
    from evals.leaderboard import collect, to_markdown
    from ssl_bench_app.cli import main

    _write_run(tmp_path, "a", {("linear", "fast"): 70.0, ("linear", "official"): 60.0, ("finetune", "proxy"): 50.0})
    _write_run(tmp_path, "b", {("linear", "fast"): 72.0, ("linear", "official"): 58.0})
    _write_run(tmp_path, "c", {("linear", "fast"): 65.0, ("linear", "official"): 59.0})
    lb = collect(tmp_path)
    assert lb.columns == ["linear (fast)", "linear (official)", "finetune (proxy)"]
    md = to_markdown(lb)
    assert "72.00 †" in md and "60.00 †" not in md and "† a hyper-parameter chosen on held-out" in md
    assert "finetune (proxy): a budget proxy" in md and "at most ±0.85 points" in md
    assert main(["compare-modes", "--results", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    rows = [ln.split("|")[1:-1] for ln in out.splitlines() if ln.startswith("| linear")]
    # fast ranks b, a, c; official ranks a, c, b
    assert [(r[1].strip(), r[3].strip(), r[5].strip(), r[6].strip()) for r in rows] == [("a", "2", "1", "+1"), ("c", "3", "2", "+1"), ("b", "1", "3", "-2")]
    assert "3 of 3 (protocol, method) pairs change rank" in out
    (tmp_path / "c-s0" / "evals" / "broken.json").write_text("{")  # left out, and said to be, as the leaderboard says it
    assert main(["compare-modes", "--results", str(tmp_path)]) == 0
    assert "note: skipped eval record c-s0/evals/broken.json" in capsys.readouterr().out
    assert main(["compare-modes", "--results", str(tmp_path), "--modes", "fast,fast"]) == 2
    assert "--modes takes two different modes" in capsys.readouterr().err
