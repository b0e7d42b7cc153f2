"""The batched device path draws what the per-sample torchvision path draws, and applies the same ops.

Distributions: parameters recovered from the batched path (from its images where they can be read back,
else from its draws) against torchvision's own draws, with two-sample KS tests and binomial intervals.
Everything is seeded, so the tests are deterministic; each has a control that the test can tell
different distributions apart.
"""
import math

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision import transforms as T1
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ssl_bench.data import batched as B
from ssl_bench.data.transforms import blur_kernel_size
from ssl_bench.data.views import View
from tests.conftest import ON_CUDA

N = 4000


def draws(n=N, seed=0, epoch=0, view=0):
    return B.uniforms(seed, epoch, torch.arange(n), view)


def torchvision_crops(n, height, width, scale, ratio, seed=0):
    torch.manual_seed(seed)
    img = torch.zeros(1, height, width)
    return np.array([T1.RandomResizedCrop.get_params(img, list(scale), list(ratio)) for _ in range(n)], dtype=float)


def binomial_ok(successes: int, n: int, p: float, alpha: float = 1e-3) -> bool:
    return stats.binomtest(successes, n, p).pvalue > alpha


def test_uniforms_are_a_function_of_seed_epoch_index_view():
    u = draws(1000)
    assert torch.equal(u, draws(1000)) and torch.equal(u[500:], B.uniforms(0, 0, torch.arange(500, 1000), 0))
    for other in (draws(1000, seed=1), draws(1000, epoch=1), draws(1000, view=1)):
        assert not torch.isclose(u, other).any(dim=1).all()
    flat = u.flatten().numpy()
    assert stats.kstest(flat, "uniform").pvalue > 1e-3 and 0 <= flat.min() and flat.max() < 1
    assert abs(np.corrcoef(u[:, 0], u[:, 1])[0, 1]) < 0.05  # neighbouring counters are independent


@pytest.mark.parametrize("height,width,scale,ratio", [
    (28, 28, (0.2, 1.0), (3 / 4, 4 / 3)),   # mim / simsiam on Fashion-MNIST
    (32, 32, (0.08, 1.0), (3 / 4, 4 / 3)),  # byol on CIFAR
    (96, 64, (0.05, 0.4), (0.5, 3.0)),      # local crops of a non-square image, wide ratios (fallback taken)
])
def test_crop_scale_aspect_and_place_match_torchvision(height, width, scale, ratio):
    ours = B.crop_boxes(draws(), height, width, scale, ratio).numpy()  # (top, left, h, w)
    ref = torchvision_crops(N, height, width, scale, ratio)
    for name, f in {
        "area": lambda b: b[:, 2] * b[:, 3] / (height * width),
        "aspect": lambda b: b[:, 3] / b[:, 2],
        "top": lambda b: b[:, 0] / np.maximum(1, height - b[:, 2]),
        "left": lambda b: b[:, 1] / np.maximum(1, width - b[:, 3]),
    }.items():
        assert stats.ks_2samp(f(ours), f(ref)).pvalue > 1e-3, name
    assert (ours[:, 0] + ours[:, 2] <= height).all() and (ours[:, 1] + ours[:, 3] <= width).all() and (ours >= 0).all()
    # control: the test tells a different scale range apart
    other = torchvision_crops(N, height, width, (scale[0] * 2, scale[1]), ratio, seed=1)
    assert stats.ks_2samp(ours[:, 2] * ours[:, 3], other[:, 2] * other[:, 3]).pvalue < 1e-6


def _apply(view: View, images: torch.Tensor, seed=0, epoch=0) -> torch.Tensor:
    """The batched path on ``images`` (N, C, H, W) uint8, returned in [0, 1] (mean 0, std 1 undone)."""
    c = images.shape[1]
    maker = B.BatchedViews(images, (view,), images.shape[-1], (0.0,) * c, (1.0,) * c, seed=seed, device="cpu")
    return maker(torch.arange(len(images)), epoch)[0]


NO_CROP = dict(crop_scale=(1.0, 1.0), crop_ratio=(1.0, 1.0))


@pytest.mark.parametrize("p", [0.5, 0.25])
def test_flip_rate_read_back_from_images(p):
    ramp = torch.arange(16, dtype=torch.uint8).mul(16).expand(N, 1, 16, 16).contiguous()  # increases left to right
    out = _apply(View(flip_p=p, **NO_CROP), ramp)
    flipped = out[:, 0, 0, 0] > out[:, 0, 0, -1]
    assert torch.allclose(out[~flipped], ramp[~flipped].float() / 255, atol=1e-5)
    assert torch.allclose(out[flipped], ramp[flipped].flip(-1).float() / 255, atol=1e-5)
    assert binomial_ok(int(flipped.sum()), N, p) and not binomial_ok(int(flipped.sum()), N, p + 0.05)


def test_brightness_factors_read_back_match_colorjitter():
    grey = torch.full((N, 1, 8, 8), 100, dtype=torch.uint8)
    out = _apply(View(jitter=(0.4, 0.0, 0.0, 0.0), jitter_p=0.8, flip_p=0.0, **NO_CROP), grey)
    factor = (out.mean(dim=(1, 2, 3)) / (100 / 255)).numpy()
    applied = np.abs(factor - 1) > 1e-6
    assert binomial_ok(int(applied.sum()), N, 0.8)
    torch.manual_seed(0)
    ref = np.array([T1.ColorJitter.get_params((0.6, 1.4), None, None, None)[1] for _ in range(N)])
    assert stats.ks_2samp(factor[applied], ref).pvalue > 1e-3
    assert stats.ks_2samp(factor[applied], ref * 1.05).pvalue < 1e-6  # control


def test_jitter_factor_ranges_and_order_match_colorjitter():
    u = draws()
    ours = B.jitter_factors(u, (0.4, 0.3, 0.2, 0.1)).numpy()
    torch.manual_seed(0)
    ref = [T1.ColorJitter.get_params((0.6, 1.4), (0.7, 1.3), (0.8, 1.2), (-0.1, 0.1)) for _ in range(N)]
    for k in range(4):
        assert stats.ks_2samp(ours[:, k], np.array([r[k + 1] for r in ref])).pvalue > 1e-3
    # the order is a uniform random permutation of the four ops, as ColorJitter's randperm(4)
    perms = [tuple(p) for p in B.jitter_order(u).tolist()]
    counts = np.array([perms.count(p) for p in set(perms)])
    assert len(counts) == 24 and stats.chisquare(counts).pvalue > 1e-3


@pytest.mark.parametrize("p", [1.0, 0.5, 0.1])
def test_blur_rate_and_sigma_match_gaussianblur(p):
    u = draws()
    applied = (u[:, B._BLUR_P] < p).numpy()
    assert binomial_ok(int(applied.sum()), N, p)
    sigma = B.blur_sigmas(u, (0.1, 2.0)).numpy()
    torch.manual_seed(0)
    ref = np.array([T1.GaussianBlur.get_params(0.1, 2.0) for _ in range(N)])
    assert stats.ks_2samp(sigma[applied], ref[: applied.sum()]).pvalue > 1e-3
    # read back from images: a blurred impulse loses its peak as w0(sigma)^2, an unblurred one keeps it
    impulse = torch.zeros(N, 1, 9, 9, dtype=torch.uint8)
    impulse[:, :, 4, 4] = 255
    out = _apply(View(blur_p=p, flip_p=0.0, **NO_CROP), impulse)
    k = blur_kernel_size(9)
    pos = torch.arange(k, dtype=torch.float64) - (k - 1) / 2
    w = torch.exp(-0.5 * (pos[None] / torch.from_numpy(sigma)[:, None]) ** 2)
    w0 = (w[:, k // 2] / w.sum(dim=1)).numpy()
    expected = np.where(applied, w0**2, 1.0)
    assert np.allclose(out[:, 0, 4, 4].numpy(), expected, atol=1e-5)


@pytest.mark.parametrize("p", [0.2, 0.5])
def test_solarize_rate_read_back_from_images(p):
    bright = torch.full((N, 1, 4, 4), 200, dtype=torch.uint8)
    out = _apply(View(solarize_p=p, flip_p=0.0, **NO_CROP), bright)
    solarized = out[:, 0, 0, 0] < 0.5
    assert torch.allclose(out[solarized], torch.tensor(55 / 255)) and torch.allclose(out[~solarized], torch.tensor(200 / 255))
    assert binomial_ok(int(solarized.sum()), N, p) and not binomial_ok(int(solarized.sum()), N, p + 0.05)


def test_grayscale_and_jitter_rates_read_back_from_images():
    colour = torch.zeros(N, 3, 4, 4, dtype=torch.uint8)
    colour[:, 0] = 200  # pure red
    out = _apply(View(grayscale_p=0.2, flip_p=0.0, **NO_CROP), colour)
    grey = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6
    assert binomial_ok(int(grey.sum()), N, 0.2)


@pytest.mark.parametrize("chans", [3, 1])
def test_one_view_equals_torchvision_ops_with_the_same_parameters(chans):
    """Same meaning, sample by sample: the batched view equals torchvision's functional ops (float
    images) applied one sample at a time with the parameters the batched path drew."""
    view = View(size=20, crop_scale=(0.3, 1.0), flip_p=0.5, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8,
                grayscale_p=0.2, blur_p=0.5, solarize_p=0.3)
    torch.manual_seed(3)
    images = torch.randint(0, 256, (24, chans, 28, 28), dtype=torch.uint8)
    out = _apply(view, images, seed=5, epoch=2)
    u = B.uniforms(5, 2, torch.arange(24), 0)
    boxes = B.crop_boxes(u, 28, 28, view.crop_scale, view.crop_ratio).long()
    factors, order = B.jitter_factors(u, view.jitter), B.jitter_order(u)
    sigma = B.blur_sigmas(u, view.blur_sigma)
    ops = [TF.adjust_brightness, TF.adjust_contrast, TF.adjust_saturation, TF.adjust_hue]
    for i in range(24):
        top, left, h, w = boxes[i].tolist()
        x = TF.resized_crop(images[i].float(), top, left, h, w, [20, 20], InterpolationMode.BICUBIC, antialias=True)
        x = (x / 255).clamp(0, 1)
        if u[i, B._JITTER_P] < view.jitter_p:
            for op in order[i].tolist():
                if chans == 3 or op < 2:  # 1 channel: no saturation or hue
                    x = ops[op](x, float(factors[i, op]))
        if u[i, B._GRAY] < view.grayscale_p and chans == 3:
            x = TF.rgb_to_grayscale(x, num_output_channels=3)
        if u[i, B._BLUR_P] < view.blur_p:
            k = blur_kernel_size(20)
            x = TF.gaussian_blur(x, [k, k], [float(sigma[i])] * 2)
        if u[i, B._SOLARIZE] < view.solarize_p:
            x = TF.solarize(x, 128 / 255)
        if u[i, B._FLIP] < view.flip_p:
            x = TF.horizontal_flip(x)
        assert torch.allclose(out[i], x, atol=2e-4), (i, (out[i] - x).abs().max())


def test_every_sample_of_a_batch_is_its_own_draw_and_resumable():
    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    maker = B.BatchedViews(images, (View(), View(size=12)), 28, (0.5,), (0.25,), seed=0, device="cpu")
    whole = maker(torch.arange(64), 3)
    part = maker(torch.arange(32, 64), 3)  # another batch composition, e.g. a DDP shard
    assert [tuple(v.shape) for v in whole] == [(64, 1, 28, 28), (64, 1, 12, 12)]
    assert all(torch.equal(a[32:], b) for a, b in zip(whole, part))
    assert not torch.equal(whole[0], maker(torch.arange(64), 4)[0])
    assert math.isfinite(float(whole[0].sum()))


@pytest.mark.parametrize("channels", [1, 3])
def test_views_made_as_one_group_equal_the_views_made_one_by_one(channels):
    """Views that differ only in probabilities are made as one batch: every row is still its own view's
    draw, and a view without an operation (BYOL's first view: no solarize) keeps its images exactly."""
    from ssl_bench.data.views import multicrop, resolve_policy

    images = torch.randint(0, 256, (48, channels, 28, 28), dtype=torch.uint8)
    index = torch.randperm(48)[:32]
    for policy in (resolve_policy("byol"), multicrop(n_local=3, local_size=12)):
        grouped = B.BatchedViews(images, policy, 28, (0.5,) * channels, (0.25,) * channels, seed=1, device="cpu")
        single = B.BatchedViews(images, policy, 28, (0.5,) * channels, (0.25,) * channels, seed=1, device="cpu")
        single.groups = [(k,) for k in range(len(policy))]
        assert len(grouped.groups) < len(policy)
        assert all(torch.equal(a, b) for a, b in zip(grouped(index, 2), single(index, 2)))


def test_resampling_table_holds_the_matrices_a_crop_would_compute(monkeypatch):
    """The table's gathered matrices (flipped or not) are the computed ones, bit for bit; past
    ``TABLE_BYTES`` (a large image) they are computed per batch."""
    u = draws(500)
    top, left, h, w = B.crop_boxes(u, 28, 20, (0.08, 1.0), (3 / 4, 4 / 3)).unbind(dim=1)
    flip = (u[:, B._FLIP] < 0.5).double()
    for src, start, length in ((28, top, h), (20, left, w)):
        table = B.Resampler(src, 16, "cpu")
        assert table.table is not None
        computed = B.resample_matrix(start, length, src, 16)
        assert torch.equal(table(start, length), computed)
        assert torch.equal(table(start, length, flip), B._pick(flip, computed.flip(1), computed))
    monkeypatch.setattr(B.Resampler, "TABLE_BYTES", 0)
    assert B.Resampler(28, 16, "cpu").table is None
    assert torch.equal(B.Resampler(28, 16, "cpu")(top, h), B.resample_matrix(top, h, 28, 16))


def test_compiled_views_equal_the_eager_ones_and_compile_once_per_group_of_views(dynamo_tracing_only):
    """``compile=True`` (on with train.compile) traces each group of views once: a new epoch reuses it
    (the stream keys are an input). Dynamo's own tracing (backend
    "eager") checks this at no compiler cost; with it the views are the eager ones, bit for bit."""
    from ssl_bench.data.views import resolve_policy

    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    policy = resolve_policy("simsiam")  # two views with the same parameters
    eager = B.BatchedViews(images, policy, 28, (0.5,), (0.25,), seed=0, device="cpu")
    compiled = B.BatchedViews(images, policy, 28, (0.5,), (0.25,), seed=0, device="cpu", compile=True)
    index = torch.randperm(64)[:32]
    first = compiled(index, 0)
    with torch.compiler.set_stance("fail_on_recompile"):
        later = [compiled(index, epoch) for epoch in (1, 2)]
    assert all(torch.equal(a, b) for a, b in zip(first, eager(index, 0)))
    assert all(torch.equal(a, b) for epoch, views in zip((1, 2), later) for a, b in zip(views, eager(index, epoch)))
    assert not torch.equal(first[0], first[1]) and not torch.equal(first[0], later[0][0])


@pytest.mark.parametrize("compile_views,train_compile,device,expected", [
    ("auto", "auto", "cuda", True),  # the full preset's compiled step on a GPU: views compiled with it
    ("auto", "auto", "cpu", False),
    ("auto", True, "cpu", True),
    (False, "auto", "cuda", False),  # eager views beside a compiled step (throughput's comparison row)
    (True, False, "cpu", True),
])
def test_views_compile_with_the_step_unless_data_compile_views_says(compile_views, train_compile, device, expected):
    from ssl_bench.data.pipeline import compile_views as decide

    cfg = {"preset": "full", "data": {"compile_views": compile_views}, "train": {"compile": train_compile}}
    assert decide(cfg, torch.device(device)) is expected
    assert decide({"preset": "full", "data": {}, "train": {"compile": train_compile}}, torch.device(device)) is (
        train_compile is True or (train_compile == "auto" and device == "cuda"))  # runs from before the key


def test_numpy_uniforms_are_the_same_numbers():
    """Views made on a GPU draw from the torch copy of the hash, masks and views made on the CPU from the
    numpy one: one function of (seed, epoch, index, stream, draw), index values past 2**32 included."""
    from ssl_bench.counter_rng import _uniforms_torch, stream_key, uniforms, uniforms_numpy

    index = np.concatenate([np.arange(500), np.random.default_rng(0).integers(0, 2**40, 500)])
    for seed, epoch, stream in ((0, 0, 0), (7, 3, 5), (2**40 + 3, 11, 2**31)):
        from_numpy = uniforms_numpy(seed, epoch, index, stream, 33)
        key = stream_key(seed, epoch, stream)
        assert np.array_equal(_uniforms_torch(key, torch.from_numpy(index), 33).numpy(), from_numpy)
        assert np.array_equal(uniforms(seed, epoch, torch.from_numpy(index), stream, 33).numpy(), from_numpy)
        keys = torch.full((len(index),), key)  # one key per index, as views made together pass them
        assert np.array_equal(_uniforms_torch(keys, torch.from_numpy(index), 33).numpy(), from_numpy)


@pytest.mark.parametrize("device", [ON_CUDA])
def test_views_are_made_without_waiting_for_the_work_queued_before_them(device):
    """The trainer makes a batch's views while the previous step still runs on the GPU: nothing in them may copy
    from pageable host memory, which first waits for everything queued (here a one-second kernel, standing in for
    the step). The stream is still busy when the views return."""
    from ssl_bench.data.views import resolve_policy

    images = torch.randint(0, 256, (64, 1, 28, 28), dtype=torch.uint8)
    maker = B.BatchedViews(images, resolve_policy("byol"), 28, (0.5,), (0.25,), seed=0, device=device)
    index = torch.arange(32, device=device)
    maker(index, 0)  # allocations, pinned blocks
    torch.cuda.synchronize()
    torch.cuda._sleep(2_000_000_000)  # about a second of GPU time
    maker(index, 1)
    assert not torch.cuda.current_stream().query(), "making views waited for the work queued before them"
    torch.cuda.synchronize()
