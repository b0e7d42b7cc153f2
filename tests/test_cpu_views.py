"""The fast CPU path for image folders (ssl_bench.data.cpu_views): the same distributions and the same
pixels as the torchvision path, reproducible from (seed, view), and unreadable files named in one line.

Every statistical test draws from fixed seeds, so it gives the same answer on every run; its bounds
are wide enough for the sample sizes (about 4.5 standard deviations, KS at p 0.001) and tight enough
that the wrong distribution fails (each was broken once by hand: e.g. a uniform instead of log-uniform
aspect ratio, a flip rate 15% low, a fixed jitter order, hue without wrap-around, no centre-crop fallback,
replicated instead of reflected blur borders, bilinear instead of bicubic resizing)."""
import math
import shutil

import numpy as np
import pytest
import torch
from scipy import stats
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T
from torchvision.transforms.v2 import functional as TF

from ssl_bench.data import cpu_views as cv
from ssl_bench.data.jpeg_folder import synthetic_image, write_jpeg_folder
from ssl_bench.data.transforms import blur_kernel_size
from ssl_bench.data.views import View, resolve_policy
from ssl_bench.errors import UserError

N = 4000


def _binomial_ok(hits: int, n: int, p: float) -> bool:
    return abs(hits - n * p) <= 4.5 * math.sqrt(n * p * (1 - p)) + 1


def _draws(view: View, n: int = N, width: int = 500, height: int = 375, in_chans: int = 3):
    return [cv.sample_view(cv.view_rng(i, 0), view, width, height, in_chans) for i in range(n)]


@pytest.fixture(scope="module")
def photo() -> np.ndarray:
    return synthetic_image(np.random.default_rng(7), 96, 80)


@pytest.mark.parametrize("scale,ratio,size", [((0.08, 1.0), (3 / 4, 4 / 3), (500, 375)), ((0.2, 1.0), (3 / 4, 4 / 3), (1000, 120))])
def test_crop_distribution_is_torchvisions(scale, ratio, size):
    """Area fraction, aspect ratio and position as RandomResizedCrop.get_params draws them, including
    the centre-crop fallback on an elongated image (the second case)."""
    width, height = size
    ours = np.array([cv.sample_crop(cv.view_rng(i, 0), width, height, scale, ratio) for i in range(N)], dtype=float)
    torch.manual_seed(0)
    image = torch.empty(1, height, width)
    theirs = np.array([T.RandomResizedCrop.get_params(image, list(scale), list(ratio)) for _ in range(N)], dtype=float)
    for crops in (ours, theirs):
        top, left, h, w = crops.T
        assert (h >= 1).all() and (w >= 1).all() and (top + h <= height).all() and (left + w <= width).all()

    def features(crops):
        top, left, h, w = crops.T
        centre_x = (left + w / 2) / width
        return {"area": h * w / (height * width), "log_aspect": np.log(w / h), "centre_x": centre_x, "top": top / height}

    a, b = features(ours), features(theirs)
    for key in a:
        assert stats.ks_2samp(a[key], b[key]).pvalue > 1e-3, key


def test_flip_grayscale_blur_solarize_rates_and_sigma():
    view = View(flip_p=0.3, grayscale_p=0.2, blur_p=0.6, blur_sigma=(0.1, 2.0), solarize_p=0.25)
    draws = _draws(view)
    assert _binomial_ok(sum(d.flip for d in draws), N, 0.3)
    assert _binomial_ok(sum(d.grayscale for d in draws), N, 0.2)
    assert _binomial_ok(sum(d.solarize for d in draws), N, 0.25)
    sigmas = [d.blur_sigma for d in draws if d.blur_sigma is not None]
    assert _binomial_ok(len(sigmas), N, 0.6)
    assert stats.kstest(sigmas, stats.uniform(0.1, 1.9).cdf).pvalue > 1e-3
    never = _draws(View(flip_p=0.0), n=200)
    assert not any(d.flip or d.grayscale or d.blur_sigma or d.solarize or d.jitter for d in never)


def test_jitter_rate_ranges_and_random_order():
    view = View(jitter=(0.4, 0.3, 0.2, 0.1), jitter_p=0.8)
    draws = _draws(view)
    applied = [d.jitter for d in draws if d.jitter]
    assert _binomial_ok(len(applied), N, 0.8)
    ranges = {"brightness": (0.6, 1.4), "contrast": (0.7, 1.3), "saturation": (0.8, 1.2), "hue": (-0.1, 0.1)}
    for op, (lo, hi) in ranges.items():
        factors = [dict(j)[op] for j in applied]
        assert stats.kstest(factors, stats.uniform(lo, hi - lo).cdf).pvalue > 1e-3, op
    firsts = [j[0][0] for j in applied]
    for op in ranges:  # ColorJitter applies the four in a uniformly random order
        assert _binomial_ok(firsts.count(op), len(applied), 0.25), op
    assert all(sorted(op for op, _ in j) == sorted(ranges) for j in applied)
    # one channel: no saturation, hue or grayscale; a zero strength is left out
    mono = _draws(View(jitter=(0.4, 0.0, 0.2, 0.1), jitter_p=1.0, grayscale_p=1.0), n=50, in_chans=1)
    assert all([op for op, _ in d.jitter] == ["brightness"] and not d.grayscale for d in mono)


def test_draws_depend_on_seed_and_view_only():
    view = resolve_policy("byol")[0]
    a = cv.sample_view(cv.view_rng(11, 0), view, 500, 375, 3)
    torch.manual_seed(5)
    np.random.seed(5)
    assert cv.sample_view(cv.view_rng(11, 0), view, 500, 375, 3) == a
    assert cv.sample_view(cv.view_rng(11, 1), view, 500, 375, 3) != a
    assert cv.sample_view(cv.view_rng(12, 0), view, 500, 375, 3) != a


def _chw(array: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)


@pytest.mark.parametrize("op,factor,tv_fn,max_diff", [
    ("brightness", 1.3, TF.adjust_brightness, 0),
    ("brightness", 0.6, TF.adjust_brightness, 0),
    ("contrast", 1.35, TF.adjust_contrast, 0),
    ("contrast", 0.65, TF.adjust_contrast, 0),
    ("saturation", 1.4, TF.adjust_saturation, 1),
    ("saturation", 0.6, TF.adjust_saturation, 1),
    ("hue", 0.1, TF.adjust_hue, 3),  # OpenCV's uint8 HSV: hue in 256 steps, saturation rounded
    ("hue", -0.07, TF.adjust_hue, 3),
    ("hue", 0.45, TF.adjust_hue, 3),
])
def test_colour_ops_match_torchvision(photo, op, factor, tv_fn, max_diff):
    ours = _chw(cv._JITTER_FN[op](photo, factor)).int()
    theirs = tv_fn(_chw(photo), factor).int()
    diff = (ours - theirs).abs()
    assert diff.max() <= max_diff and diff.float().mean() < 0.25, (op, factor, diff.max(), diff.float().mean())


def test_grayscale_blur_solarize_flip_match_torchvision(photo):
    image = _chw(photo)
    assert torch.equal(_chw(cv.to_grayscale(photo)), TF.rgb_to_grayscale(image, 3))
    for sigma in (0.3, 1.0, 2.0):
        ours = _chw(cv.gaussian_blur(photo, sigma, 23)).int()
        theirs = TF.gaussian_blur(image, [23, 23], [sigma, sigma]).int()
        assert (ours - theirs).abs().max() <= 1, sigma
    assert torch.equal(_chw(cv.solarize(photo)), TF.solarize(image, 128))
    assert torch.equal(_chw(cv.hflip(photo)), TF.horizontal_flip(image))


def test_resized_crop_is_torchvisions(photo):
    ours = _chw(cv.resized_crop(photo, 5, 9, 60, 70, 32)).int()
    theirs = TF.resized_crop(_chw(photo), 5, 9, 60, 70, [32, 32], InterpolationMode.BICUBIC, antialias=True).int()
    assert (ours - theirs).abs().max() <= 1
    grey = photo[..., 0].copy()
    assert cv.resized_crop(grey, 0, 0, 80, 96, 40).shape == (40, 40)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    write_jpeg_folder(root, images=4, size=(120, 90), classes=2, seed=3)
    return sorted(str(p) for p in root.rglob("*.jpg"))


def test_whole_view_equals_torchvision_ops_on_the_same_draw(folder):
    """Decode + every op of a view, against torchvision's functional ops with the same parameters."""
    from PIL import Image

    policy = (View(size=48, jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=1.0, grayscale_p=0.0, blur_p=1.0, solarize_p=1.0, flip_p=1.0),)
    mean, std = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
    views = cv.FolderViews(policy, 48, 3, mean, std)
    (ours,) = views(folder[0], seed=21)
    assert ours.dtype == torch.uint8
    ours = views.normaliser()(ours[None])[0]
    (draw,) = views.draws(21, 120, 90)
    with Image.open(folder[0]) as img:
        image = TF.pil_to_tensor(img.convert("RGB"))
    x = TF.resized_crop(image, draw.top, draw.left, draw.height, draw.width, [48, 48], InterpolationMode.BICUBIC, antialias=True)
    tv_ops = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    for op, factor in draw.jitter:
        x = tv_ops[op](x, factor)
    x = TF.horizontal_flip(TF.solarize(TF.gaussian_blur(x, [blur_kernel_size(48)] * 2, [draw.blur_sigma] * 2), 128))
    theirs = TF.normalize(TF.to_dtype(x, torch.float32, scale=True), mean, std)
    assert ours.shape == theirs.shape == (3, 48, 48) and ours.dtype == torch.float32
    assert (ours - theirs).abs().mean() < 2.0 / 255 / 0.224  # under two grey levels on average


def test_views_are_reproducible_and_differ(folder):
    views = cv.FolderViews(resolve_policy("simsiam"), 32, 3, (0.5,) * 3, (0.25,) * 3)
    a = views(folder[1], seed=5)
    torch.manual_seed(1)
    b = views(folder[1], seed=5)
    assert len(a) == 2 and all(torch.equal(x, y) for x, y in zip(a, b))
    assert not torch.equal(a[0], a[1]) and not torch.equal(a[0], views(folder[1], seed=6)[0])
    multi = cv.FolderViews(resolve_policy("multicrop")[:3], 32, 3, (0.5,) * 3, (0.25,) * 3)(folder[1], seed=5)
    assert [v.shape[-1] for v in multi] == [32, 32, 96]


def test_large_crops_decode_at_reduced_scale_without_visible_change(tmp_path):
    """A 4x-larger crop than the output is decoded at 1/4 scale (DCT scaling); the view barely changes."""
    from PIL import Image

    path = tmp_path / "big.jpg"
    Image.fromarray(synthetic_image(np.random.default_rng(0), 800, 640)).save(path, quality=90)
    data = path.read_bytes()
    assert cv.dct_reduction(640 / 64) == 8 and cv.dct_reduction(3.9) == 2 and cv.dct_reduction(1.99) == 1
    assert cv.decode(data, str(path), 3, reduction=4).shape == (160, 200, 3)
    full = cv.resized_crop(cv.decode(data, str(path), 3), 0, 80, 640, 640, 64).astype(int)
    reduced = cv.resized_crop(cv.decode(data, str(path), 3, reduction=4), 0, 20, 160, 160, 64).astype(int)
    assert np.abs(full - reduced).mean() < 2.0


def test_grey_images_and_non_jpeg_files(tmp_path):
    from PIL import Image

    pixels = synthetic_image(np.random.default_rng(1), 40, 30)
    Image.fromarray(pixels).save(tmp_path / "a.png")
    Image.fromarray(pixels[..., 0]).save(tmp_path / "grey.jpg", quality=95)
    png = cv.FolderViews((View(),), 16, 3, (0.5,) * 3, (0.25,) * 3)(str(tmp_path / "a.png"), 0)
    assert png[0].shape == (3, 16, 16)
    mono = cv.FolderViews(resolve_policy("byol"), 16, 1, (0.5,), (0.25,))(str(tmp_path / "grey.jpg"), 0)
    assert [v.shape for v in mono] == [(1, 16, 16)] * 2
    assert cv.decode((tmp_path / "grey.jpg").read_bytes(), "grey.jpg", 3).shape == (30, 40, 3)


@pytest.mark.parametrize("mode,progressive", [("CMYK", False), ("CMYK", True), ("L", False), ("RGB", True)])
def test_cmyk_grey_and_progressive_jpegs_decode_as_pillows_rgb_on_both_paths(tmp_path, mode, progressive):
    """Photo folders hold such files (ImageNet's train set has CMYK JPEGs): the CPU path (OpenCV) and the device
    path's batched decoder give Pillow's RGB conversion, which the torchvision path used, to one grey level."""
    from PIL import Image

    from ssl_bench.data.device_decode import decode_batch

    path = tmp_path / "a.jpg"
    Image.fromarray(synthetic_image(np.random.default_rng(2), 48, 36)).convert(mode).save(path, quality=95, progressive=progressive)
    want = np.asarray(Image.open(path).convert("RGB")).astype(int)  # (36, 48, 3)
    cpu = cv.decode(path.read_bytes(), str(path), 3)
    record = {"path": str(path), "data": torch.from_numpy(np.fromfile(path, np.uint8)), "jpeg": cv.is_complete_jpeg(path.read_bytes())}
    device = decode_batch([record], 3, torch.device("cpu"))[0]
    assert np.abs(cpu.astype(int) - want).max() <= 1
    assert np.abs(device.permute(1, 2, 0).numpy().astype(int) - want).max() <= 1


@pytest.mark.parametrize("content", [b"not an image", "truncated", b""])
def test_unreadable_files_are_one_line_naming_the_file(tmp_path, content):
    from PIL import Image

    path = tmp_path / "bad.jpg"
    if content == "truncated":
        Image.fromarray(synthetic_image(np.random.default_rng(2), 64, 48)).save(path, quality=90)
        content = path.read_bytes()[:-400]
    path.write_bytes(content)
    views = cv.FolderViews((View(),), 16, 3, (0.5,) * 3, (0.25,) * 3)
    with pytest.raises(UserError, match=r"cannot read image .*bad\.jpg: \w+; remove or replace the file") as info:
        views(str(path), 0)
    assert "\n" not in str(info.value)
    with pytest.raises(UserError, match="missing.jpg"):
        views(str(tmp_path / "missing.jpg"), 0)
    odd = tmp_path / "bad\nname.jpg"  # a file name may hold a newline: the message stays one line, quoted
    odd.write_bytes(b"not an image")
    with pytest.raises(UserError, match=r"cannot read image '.*bad\\nname\.jpg'") as info:
        views(str(odd), 0)
    assert "\n" not in str(info.value)


def test_imagefolder_pretraining_batches_come_from_the_fast_path(tmp_path):
    """An image folder goes through FolderViews in the loader; batches depend on (seed, epoch, index)
    only, with or without a worker process."""
    from ssl_bench.config import resolve_config
    from ssl_bench.data.cpu_views import FolderViews
    from ssl_bench.data.pipeline import build_pretrain_loader, sample_seed
    from ssl_bench.method import DataSpec
    from ssl_bench.registry import get_method

    write_jpeg_folder(tmp_path / "data", images=8, size=(64, 48), classes=2)
    batches = []
    for workers in (0, 1):
        cfg = resolve_config(get_method("simsiam"), "smoke", [
            "data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.img_size=28", "data.subset=none",
            f"data.num_workers={workers}", "train.batch_size=4"])
        loader, sampler, dataset, info = build_pretrain_loader(cfg, DataSpec(augmentation="simsiam"))
        assert isinstance(dataset.transform, FolderViews) and info.in_chans == 3
        batches.append(next(iter(loader)))
    a, b = batches
    assert [v.shape for v in a["views"]] == [(4, 3, 28, 28)] * 2 and a["views"][0].dtype == torch.float32
    assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"])) and torch.equal(a["label"], b["label"])
    first = next(iter(sampler))
    path, _ = dataset.base[first]
    view = dataset.transform(path, sample_seed(cfg["seed"], 0, first))[1]  # the sample's seed; uint8 until normalised
    assert view.dtype == torch.uint8 and torch.equal(a["views"][1][0], dataset.transform.normaliser()(view[None])[0])


def test_an_image_folder_test_split_is_its_own_folder_with_the_training_labels(tmp_path):
    """The test split is val/ (or test/), never the training images; its labels are the training classes' (a
    val/ lacking a class shifts no label); a class only val/ has, no val/ at all, or a FIFO among the images is
    refused or skipped, never read as data."""
    import os

    from ssl_bench.data.datasets import imagefolder

    write_jpeg_folder(tmp_path / "data", images=6, size=(16, 16), classes=3)
    with pytest.raises(UserError, match="has no val/ \\(or test/\\) folder"):
        imagefolder(str(tmp_path / "data"), "test")
    with pytest.raises(UserError, match="has no val/"):
        imagefolder(str(tmp_path / "data" / "train"), "test")  # root/<class> layout: pretraining only
    (tmp_path / "data" / "val").mkdir()
    shutil.copytree(tmp_path / "data" / "train" / "class_0002", tmp_path / "data" / "val" / "class_0002")
    os.mkfifo(tmp_path / "data" / "val" / "class_0002" / "pipe.jpg")
    test, info = imagefolder(str(tmp_path / "data"), "test")
    assert info.num_classes == 3 and sorted(label for _, label in test.samples) == [2, 2]
    assert all("/val/" in path for path, _ in test.samples)
    (tmp_path / "data" / "val" / "class_0009").mkdir()
    with pytest.raises(UserError, match="has classes the training images lack \\(class_0009\\)"):
        imagefolder(str(tmp_path / "data"), "test")
