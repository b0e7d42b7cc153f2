"""The device path for image folders, run on the CPU (no GPU here): workers read bytes and draw
parameters only; batches are decoded (batched decode_jpeg, CPU fallback) and augmented on the device
with the CPU path's draws; unreadable files are one line naming the file."""
import itertools

import numpy as np
import pytest
import torch
from scipy import stats

from ssl_bench.data import cpu_views as cv
from ssl_bench.data.device_decode import DeviceFolderBatches, EncodedFiles, collate_encoded, decode_batch, split_files
from ssl_bench.data.jpeg_folder import synthetic_image, write_jpeg_folder
from ssl_bench.data.views import View, resolve_policy
from ssl_bench.errors import UserError
from tests.conftest import ON_CUDA

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("jpegs")
    write_jpeg_folder(root, images=6, size=(96, 72), classes=2, seed=1)
    return sorted(str(p) for p in root.rglob("*.jpg"))


def test_workers_only_read_bytes_and_draw(folder):
    views = cv.FolderViews(resolve_policy("byol"), 48, 3, MEAN, STD)
    record = EncodedFiles(views)(folder[0], seed=9)
    assert record["data"].dtype == torch.uint8 and bytes(record["data"].numpy()) == open(folder[0], "rb").read()
    assert record["draws"] == views.draws(9, 96, 72)  # the CPU path's parameters exactly
    assert record["jpeg"] is True  # checked in the worker, so the process feeding the GPU need not copy the bytes


def _records(paths):
    """Loader-worker records of files, as ``EncodedFiles`` makes them, without the draws."""
    return [{"path": p, "data": torch.frombuffer(bytearray(data), dtype=torch.uint8), "jpeg": cv.is_complete_jpeg(data)}
            for p, data in ((p, open(p, "rb").read()) for p in paths)]


def test_batched_decode_with_fallbacks(folder, tmp_path, monkeypatch):
    """JPEGs in one batched call; a PNG, and a JPEG the batched decoder rejects, on the CPU."""
    from PIL import Image

    import torchvision.io

    png = tmp_path / "a.png"
    Image.fromarray(synthetic_image(np.random.default_rng(3), 40, 30)).save(png)
    records = _records([folder[0], str(png), folder[1]])
    real, calls = torchvision.io.decode_jpeg, []

    def nvjpeg_rejecting_the_third(data, mode, device):  # stands in for a file nvjpeg cannot take
        calls.append(len(data) if isinstance(data, list) else 1)
        if any(d is records[2]["data"] for d in (data if isinstance(data, list) else [data])):
            raise RuntimeError("nvjpeg: unsupported")
        return real(data, mode=mode, device=device)

    monkeypatch.setattr(torchvision.io, "decode_jpeg", nvjpeg_rejecting_the_third)  # device_decode takes it from there at each batch
    images = decode_batch(records, 3, torch.device("cpu"))
    assert calls == [2, 1, 1]  # the batch of both JPEGs, then each alone
    assert [tuple(i.shape) for i in images] == [(3, 72, 96), (3, 30, 40), (3, 72, 96)]
    for image, path in ((images[0], folder[0]), (images[2], folder[1])):
        reference = torch.from_numpy(cv.decode(open(path, "rb").read(), path, 3)).permute(2, 0, 1)
        assert (image.int() - reference.int()).abs().max() <= 1
    assert torch.equal(images[1].permute(1, 2, 0), torch.from_numpy(np.asarray(Image.open(png).convert("RGB"))))
    assert decode_batch(records[:1], 1, torch.device("cpu"))[0].shape == (1, 72, 96)


@pytest.mark.parametrize("content", ["garbage", "truncated", "corrupt"])
def test_unreadable_file_in_a_batch_is_named(folder, tmp_path, content):
    data = bytearray(open(folder[2], "rb").read())
    if content == "corrupt":  # SOI and EOI intact, tables destroyed: no decoder can read it
        data[300:1500] = bytes(1200)
    path = tmp_path / "bad.jpg"
    path.write_bytes(b"garbage, not an image" if content == "garbage" else bytes(data[:-500] if content == "truncated" else data))
    records = _records([folder[0], str(path)])
    with pytest.raises(UserError, match=r"cannot read image .*bad\.jpg: \w+; remove or replace the file"):
        decode_batch(records, 3, torch.device("cpu"))


def test_device_batches_match_the_cpu_path(tmp_path):
    """Through the pretraining loader with data.decode=device: same shapes, same draws, so views within
    a few grey levels of the CPU path's for the same (seed, epoch, index)."""
    from ssl_bench.config import resolve_config
    from ssl_bench.data.pipeline import build_pretrain_loader
    from ssl_bench.method import DataSpec
    from ssl_bench.registry import get_method

    write_jpeg_folder(tmp_path / "data", images=8, size=(64, 48), classes=2)
    every_op = View(jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.5, grayscale_p=0.3, blur_p=0.5, solarize_p=0.5)
    batches = {}
    for decode in ("cpu", "device"):
        cfg = resolve_config(get_method("simsiam"), "smoke", [
            "data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.img_size=32", "data.subset=none",
            "data.num_workers=1", "train.batch_size=8", "train.device=cpu", f"data.decode={decode}"])
        loader, *_ = build_pretrain_loader(cfg, DataSpec(augmentation=(every_op, every_op)))
        batches[decode] = next(iter(loader))
    cpu, device = batches["cpu"], batches["device"]
    assert isinstance(loader, DeviceFolderBatches) and torch.equal(cpu["label"], device["label"])
    for a, b in zip(cpu["views"], device["views"]):
        assert a.shape == b.shape == (8, 3, 32, 32) and b.dtype == torch.float32
        assert (a - b).abs().mean() < 1.5 / 255 / 0.224  # under 1.5 grey levels on average (hue: OpenCV's 256 steps)


def test_collate_holds_a_batch_of_files_in_one_tensor_and_splits_back_to_records():
    items = [{"views": {"path": str(i), "data": torch.arange(3 + i, dtype=torch.uint8) + i, "draws": [f"d{i}"], "jpeg": i == 1},
              "label": i, "mask": torch.zeros(4, dtype=torch.bool)} for i in range(3)]
    batch = collate_encoded(items)
    assert batch["files"]["data"].shape == (3 + 4 + 5,) and batch["mask"].shape == (3, 4)  # one block of bytes
    assert batch["label"].tolist() == [0, 1, 2]
    records = split_files(batch["files"])
    assert [r["path"] for r in records] == ["0", "1", "2"] and [r["draws"] for r in records] == [["d0"], ["d1"], ["d2"]]
    assert [r["jpeg"] for r in records] == [False, True, False]
    for item, record in zip(items, records):
        assert torch.equal(record["data"], item["views"]["data"])
        assert record["data"].untyped_storage().data_ptr() == batch["files"]["data"].untyped_storage().data_ptr()  # views, no copies


def test_pretrain_on_device_path_names_a_corrupt_file(tmp_path, capsys):
    from ssl_bench_app.cli import main

    write_jpeg_folder(tmp_path / "data", images=16, size=(48, 40), classes=2)
    bad = next((tmp_path / "data").rglob("*.jpg"))
    bad.write_bytes(b"\xff\xd8 not really a JPEG \xff\xd9")
    code = main(["pretrain", "--method", "mae", "--data", "imagefolder", "--data-root", str(tmp_path / "data"), "--preset", "smoke",
                 "--out", str(tmp_path / "r"), "data.img_size=28", "data.subset=none", "data.decode=device", "data.num_workers=1",
                 "train.progress=false", "train.batch_size=16", "train.device=cpu"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ssl-bench")]
    assert code == 2 and len(err) == 1 and "cannot read image" in err[0] and str(bad) in err[0]


def test_a_torchvision_without_the_jpeg_decoder_is_one_line_before_any_work(tmp_path, capsys, monkeypatch):
    """torchvision deprecated its image decoders in 0.29: where one drops decode_jpeg, data.decode=device says so
    and names the fix, before the run starts; the CPU path does not need it."""
    import torchvision.io

    from ssl_bench_app.cli import main

    write_jpeg_folder(tmp_path / "data", images=16, size=(48, 40), classes=2)
    monkeypatch.delattr(torchvision.io, "decode_jpeg")
    args = ["pretrain", "--method", "mae", "--data", "imagefolder", "--data-root", str(tmp_path / "data"), "--preset", "smoke",
            "data.img_size=28", "data.subset=none", "data.num_workers=0", "train.progress=false", "train.batch_size=16",
            "train.device=cpu", "train.max_steps=1"]
    code = main([*args[:7], "--out", str(tmp_path / "device"), *args[7:], "data.decode=device"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("ssl-bench")]
    assert code == 2 and len(err) == 1 and "torchvision.io.decode_jpeg" in err[0] and "data.decode=cpu" in err[0]
    assert not (tmp_path / "device" / "checkpoint.pt").exists()
    assert main([*args[:7], "--out", str(tmp_path / "cpu"), *args[7:], "data.decode=cpu"]) == 0


@pytest.mark.parametrize("decode", ["cpu", "device"])
def test_resume_on_a_jpeg_folder_is_bit_for_bit(tmp_path, monkeypatch, decode):
    from methods.mae import MAE
    from ssl_bench.trainer import pretrain
    from tests.conftest import smoke_config
    from tests.test_trainer import interrupted_run, weights

    write_jpeg_folder(tmp_path / "data", images=48, size=(48, 40), classes=2)
    cfg = smoke_config("mae", "data.name=imagefolder", f"data.root={tmp_path / 'data'}", "data.img_size=28", "data.subset=none",
                       f"data.decode={decode}", "data.num_workers=1", "train.batch_size=8", "train.ckpt_every=2", "train.device=cpu")
    straight = pretrain(cfg, tmp_path / "straight")
    interrupted_run(monkeypatch, MAE, 3, cfg, tmp_path / "resumed")
    resumed = pretrain(cfg, tmp_path / "resumed", resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert resumed["steps"] == straight["steps"] == 6 and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("batched_resize", [False, True])
def test_device_views_equal_torchvision_ops_on_their_draws(tmp_path, batched_resize):
    """Sample by sample and view by view, the batched device ops equal torchvision's functional ops (float
    images) applied to the decoded image with that view's draw: crop box, resize, every colour op in its order,
    flip; also where views of one size are made as one batch (the first two) beside a view of another size;
    with crops resized sample by sample (a CPU's way) or in batched products (a GPU's)."""
    from PIL import Image
    from torchvision.transforms import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from ssl_bench.data.transforms import blur_kernel_size

    view = View(size=20, crop_scale=(0.3, 1.0), jitter=(0.4, 0.4, 0.4, 0.1), jitter_p=0.8, grayscale_p=0.2, blur_p=0.5, solarize_p=0.3)
    policy = (view, View(size=20, jitter=(0.2, 0.2, 0.2, 0.05), jitter_p=0.5, blur_p=1.0, blur_sigma=(0.5, 1.0), flip_p=0.9),
              View(size=12, crop_scale=(0.1, 0.5), blur_p=0.5, solarize_p=0.5))
    tv = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast, "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}
    for chans in (3, 1):
        pixels = synthetic_image(np.random.default_rng(chans), 40, 30)
        path = tmp_path / f"photo{chans}.jpg"
        Image.fromarray(pixels if chans == 3 else pixels[..., 0]).save(path, quality=90)
        views = cv.FolderViews(policy, 20, chans, (0.0,) * chans, (1.0,) * chans)
        records = [EncodedFiles(views)(str(path), seed=i) for i in range(32)]
        made = DeviceFolderBatches(None, views, "cpu", batched_resize=batched_resize).make_views(records)
        image = decode_batch(records[:1], chans, torch.device("cpu"))[0].float()
        for (k, out), (i, record) in itertools.product(enumerate(made), enumerate(records)):
            d, size = record["draws"][k], policy[k].size
            x = TF.resized_crop(image, d.top, d.left, d.height, d.width, [size, size], InterpolationMode.BICUBIC, antialias=True)
            x = (x / 255).clamp(0, 1)
            for op, factor in d.jitter:
                x = tv[op](x, factor)
            if d.grayscale:
                x = TF.rgb_to_grayscale(x, num_output_channels=3)
            if d.blur_sigma is not None:
                x = TF.gaussian_blur(x, [blur_kernel_size(size)] * 2, [d.blur_sigma] * 2)
            if d.solarize:
                x = TF.solarize(x, 128 / 255)
            if d.flip:
                x = TF.horizontal_flip(x)
            assert out.shape == (32, chans, size, size) and torch.allclose(out[i], x, atol=2e-4), (chans, k, i, d, (out[i] - x).abs().max())


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
@pytest.mark.parametrize("chans", [3, 1])
def test_batched_resize_of_images_of_many_sizes_equals_the_per_sample_resize(monkeypatch, chans, device):
    """Images of different sizes, two views each, padded and resized in batched products, in one chunk or in
    several (a small memory bound): every row equals resizing its own crop alone (in full float32 products)."""
    from ssl_bench.data import device_decode

    rng = np.random.default_rng(chans)
    shapes = [(int(h), int(w)) for h, w in rng.integers(12, 60, size=(9, 2))]
    images = [torch.from_numpy(rng.integers(0, 256, size=(chans, h, w), dtype=np.uint8)).to(device) for h, w in shapes]
    views = cv.FolderViews(resolve_policy("byol"), 16, chans, (0.0,) * chans, (1.0,) * chans)
    draws = [views.draws(i, w, h)[k] for k in range(2) for i, (h, w) in enumerate(shapes)]  # view after view
    alone = device_decode.resized_crops(images, draws, 16)
    assert alone.shape == (18, chans, 16, 16)
    for bound in (device_decode.PADDED_ELEMENTS, 2 * chans * 3 * 60 * 60):
        monkeypatch.setattr(device_decode, "PADDED_ELEMENTS", bound)
        chunks = device_decode._resize_chunks([tuple(i.shape) for i in images], 2)
        assert sorted(i for chunk in chunks for i in chunk) == list(range(9))
        assert (len(chunks) == 1) == (bound > 2**20)
        for chunk in chunks:  # within the bound, or one image alone
            padded = 2 * len(chunk) * chans * max(shapes[i][0] for i in chunk) * max(shapes[i][1] for i in chunk)
            assert padded <= bound or len(chunk) == 1
        tf32, torch.backends.cuda.matmul.allow_tf32 = torch.backends.cuda.matmul.allow_tf32, False  # (a run allows it: ~0.1 grey level)
        try:
            batched = device_decode.resized_crops(images, draws, 16, batched=True)
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        assert batched.shape == alone.shape and torch.allclose(batched, alone, atol=1e-3), (batched - alone).abs().max()


def test_padded_batch_holds_each_image_in_its_corner():
    """Images of several sizes (one not contiguous, as a CPU-decoded one is) in one (m, C, H, W) tensor, each at
    its top left; what lies beyond an image's own rows and columns is finite (other pixels of the batch)."""
    from ssl_bench.data.device_decode import _padded

    rng = np.random.default_rng(0)
    images = [torch.from_numpy(rng.integers(0, 256, size=(3, h, w), dtype=np.uint8)) for h, w in ((5, 7), (9, 4), (2, 2))]
    images.append(torch.from_numpy(rng.integers(0, 256, size=(6, 3, 3), dtype=np.uint8)).permute(2, 0, 1))  # (3, 6, 3)
    padded = _padded(images)
    assert padded.shape == (4, 3, 9, 7) and padded.dtype == torch.uint8
    for image, out in zip(images, padded):
        assert torch.equal(out[:, :image.shape[1], :image.shape[2]], image)
    assert torch.equal(_padded(images[:1] * 2), torch.stack(images[:1] * 2))


N_RATES = 2000


def _device_views(tmp_path, pixels: np.ndarray, view: View):
    """The device path's views of one 16 x 16 JPEG for N_RATES sample seeds -> ((N, C, 16, 16) in [0, 1],
    each sample's draw, the decoded image in [0, 1])."""
    from PIL import Image

    path = tmp_path / "one.jpg"
    Image.fromarray(pixels).save(path, quality=95)
    views = cv.FolderViews((view,), 16, 3, (0.0,) * 3, (1.0,) * 3)
    records = [EncodedFiles(views)(str(path), seed=i) for i in range(N_RATES)]
    (out,) = DeviceFolderBatches(None, views, "cpu").make_views(records)
    return out, [r["draws"][0] for r in records], decode_batch(records[:1], 3, torch.device("cpu"))[0].float() / 255


def _constant(rgb) -> np.ndarray:
    return np.broadcast_to(np.array(rgb, np.uint8), (16, 16, 3)).copy()


@pytest.mark.parametrize("op,p", [("flip", 0.5), ("flip", 0.25), ("solarize", 0.2), ("grayscale", 0.2), ("blur", 0.5), ("blur", 0.1)])
def test_device_path_rates_read_back_from_images(tmp_path, op, p):
    """Each operation's rate, read back from the device path's images, is the view's probability (binomial
    test, with a control 5 points off), and each sample shows exactly its own draw."""
    from tests.test_batched import NO_CROP, binomial_ok

    if op == "flip":  # a ramp, increasing left to right
        ramp = np.broadcast_to((np.arange(16, dtype=np.uint8) * 16)[None, :, None], (16, 16, 3)).copy()
        out, draws, _ = _device_views(tmp_path, ramp, View(flip_p=p, **NO_CROP))
        seen, drawn = out[:, 0, 0, 0] > out[:, 0, 0, -1], [d.flip for d in draws]
    elif op == "solarize":
        out, draws, _ = _device_views(tmp_path, _constant(200), View(solarize_p=p, flip_p=0.0, **NO_CROP))
        seen, drawn = out.mean(dim=(1, 2, 3)) < 0.5, [d.solarize for d in draws]
    elif op == "grayscale":
        out, draws, _ = _device_views(tmp_path, _constant((200, 0, 0)), View(grayscale_p=p, flip_p=0.0, **NO_CROP))
        seen, drawn = (out[:, 0] - out[:, 1]).abs().amax(dim=(1, 2)) < 1e-6, [d.grayscale for d in draws]
    else:  # a vertical edge: blurred samples differ from the decoded image, the others equal it
        edge = _constant(0)
        edge[:, 8:] = 255
        out, draws, plain = _device_views(tmp_path, edge, View(blur_p=p, blur_sigma=(0.5, 2.0), flip_p=0.0, **NO_CROP))
        assert torch.allclose(out[[d.blur_sigma is None for d in draws]], plain, atol=1e-5)
        seen, drawn = (out - plain).abs().amax(dim=(1, 2, 3)) > 1e-2, [d.blur_sigma is not None for d in draws]
    assert seen.tolist() == drawn
    hits = int(seen.sum())
    assert binomial_ok(hits, N_RATES, p) and not binomial_ok(hits, N_RATES, p + 0.05)


def test_device_path_brightness_factors_read_back_match_colorjitter(tmp_path):
    from torchvision import transforms as T1

    from tests.test_batched import NO_CROP, binomial_ok

    out, draws, plain = _device_views(tmp_path, _constant(100), View(jitter=(0.4, 0.0, 0.0, 0.0), jitter_p=0.8, flip_p=0.0, **NO_CROP))
    factor = (out.mean(dim=(1, 2, 3)) / plain.mean()).numpy()
    applied = np.abs(factor - 1) > 1e-6
    assert applied.tolist() == [bool(d.jitter) for d in draws] and binomial_ok(int(applied.sum()), N_RATES, 0.8)
    torch.manual_seed(0)
    ref = np.array([T1.ColorJitter.get_params((0.6, 1.4), None, None, None)[1] for _ in range(N_RATES)])
    assert stats.ks_2samp(factor[applied], ref).pvalue > 1e-3
    assert stats.ks_2samp(factor[applied], ref * 1.05).pvalue < 1e-4  # control: 5% off is told apart


@pytest.mark.parametrize("device", [ON_CUDA])
def test_cuda_decode_never_writes_memory_the_training_stream_still_reads(tmp_path, device):
    """nvJPEG may write its outputs before the caller's queued kernels run (pytorch/vision#9606). Tensors
    freed while reductions over them are still queued behind a long kernel must keep their values through
    decode_batch: the decoder's outputs come from another stream's memory."""
    write_jpeg_folder(tmp_path, images=16, size=(500, 375), classes=1, seed=3)
    records = _records(sorted(str(p) for p in tmp_path.rglob("*.jpg")))
    device = torch.device(device)
    bad = 0
    for trial in range(20):
        tensors = [torch.full((3 * 500 * 375,), float(i + 1), device=device) for i in range(16)]
        torch.cuda.synchronize()
        torch.cuda._sleep(100_000_000)  # keeps the stream busy while the decoder runs
        sums = [t.sum() for t in tensors]
        del tensors  # freed with their reductions still queued
        decode_batch(records, 3, device)
        torch.cuda.synchronize()
        bad += sum(float(s) != float(i + 1) * 3 * 500 * 375 for i, s in enumerate(sums))
    assert bad == 0


def test_device_rate_times_the_whole_path_and_its_decode_alone(folder):
    """The folder table's device columns (a GPU's in gpu-check), here on the CPU: both rates from the same batches."""
    from ssl_bench.data.device_decode import device_rate

    rates = device_rate([(p, 0) for p in folder], "byol", 32, batch_size=3, batches=2, device="cpu")
    assert set(rates) == {"images_per_s", "decode_images_per_s"}
    assert all(0 < v < float("inf") for v in rates.values())


def test_one_ahead_yields_the_same_batches_raises_their_errors_and_stops_when_closed():
    """The GPU path's batch-ahead thread (run here on CPU tensors): same items in the same order; an error
    raised while making a batch is raised to the caller as it was; a caller that stops early stops the thread."""
    import threading

    from ssl_bench.data.device_decode import one_ahead

    def batches(n, fail_at=None):
        for i in range(n):
            if i == fail_at:
                raise UserError(f"cannot read image {i}")
            yield {"views": [torch.full((2,), float(i))], "label": torch.tensor([i])}

    seen = [int(b["label"]) for b in one_ahead(batches(6), torch.device("cpu"))]
    assert seen == list(range(6))
    with pytest.raises(UserError, match="cannot read image 3"):
        for _ in one_ahead(batches(6, fail_at=3), torch.device("cpu")):
            pass
    before = threading.active_count()
    early = one_ahead(batches(10_000), torch.device("cpu"))
    assert int(next(early)["label"]) == 0 and threading.active_count() == before + 1
    early.close()
    assert threading.active_count() == before


def test_compiled_finishing_stage_traces_and_equals_the_eager_one(tmp_path, dynamo_tracing_only):
    """Where the run's views are compiled, the folder path's finishing stage (colour, blur, solarize, flip,
    normalise) goes through torch.compile: Dynamo traces it whole (backend "eager": no compiler cost, no
    fallback) and its views are the eager ones, bit for bit."""
    from torch._dynamo.utils import counters

    from ssl_bench.data.views import resolve_policy

    write_jpeg_folder(tmp_path / "data", images=16, size=(48, 40), classes=2)
    paths = sorted(str(p) for p in (tmp_path / "data").rglob("*.jpg"))
    views = cv.FolderViews(resolve_policy("byol"), 24, 3, (0.5,) * 3, (0.25,) * 3)
    eager, compiled = DeviceFolderBatches(None, views, "cpu"), DeviceFolderBatches(None, views, "cpu", compile=True)
    for first in (0, 8):
        records = [EncodedFiles(views)(path, seed=first + i) for i, path in enumerate(paths[first:first + 8])]
        assert all(torch.equal(a, b) for a, b in zip(compiled.make_views(records), eager.make_views(records)))
    assert not compiled._finish.fell_back
    assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]  # traced, and whole
