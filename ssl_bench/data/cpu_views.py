"""Per-sample augmentation of image files at OpenCV / Pillow speed: the CPU path for folder data sets.

    read the bytes -> image size from the header (Pillow) -> draw every view's parameters from
    (seed, view) -> decode once (OpenCV's libjpeg-turbo), at the smallest JPEG DCT scale that still
    holds every crop at full resolution -> per view: crop + bicubic antialiased resize (torchvision's
    own uint8 kernel) -> colour jitter -> grayscale -> blur -> solarize -> flip (OpenCV and lookup
    tables on uint8); the loader's batches are normalised to float on the training device

The parameters follow torchvision's distributions (RandomResizedCrop, ColorJitter in random order,
RandomGrayscale, GaussianBlur, RandomSolarize, RandomHorizontalFlip); the pixel operations equal
torchvision's on uint8 images or differ by at most a few grey levels (tests/test_cpu_views.py).

Why OpenCV (measured on one core of the project's CPU machine, 500x375 JPEG, 224 px views): decoding to
an array costs ~1.0 ms with OpenCV against ~2.2 ms with Pillow (whose RGB images are stored 4 bytes a
pixel and copied out); a hue shift (uint8 HSV round trip) ~0.15 ms against Pillow's ~2.2 ms. Files
that are not complete JPEGs (PNG, truncated files...) are decoded by Pillow, as before.
"""
from __future__ import annotations

import io
import math
from dataclasses import dataclass

import cv2
import numpy as np
import torch

from ssl_bench.data.transforms import blur_kernel_size
from ssl_bench.data.datasets import unreadable_image
from ssl_bench.data.views import crop_fallback

JITTER_OPS = ("brightness", "contrast", "saturation", "hue")
SOLARIZE_THRESHOLD = 128
BLUR_TRUNCATE = 4.0  # kernel radius in sigmas: the mass beyond 4 sigma (6e-5) is below one grey level


@dataclass(frozen=True)
class ViewDraw:
    """The random parameters of one view of one image (source pixel coordinates)."""

    top: int
    left: int
    height: int
    width: int
    flip: bool
    jitter: tuple[tuple[str, float], ...]  # (op, factor) in the order applied; () = no jitter
    grayscale: bool
    blur_sigma: float | None  # None = no blur
    solarize: bool


def view_rng(seed: int, view_index: int) -> np.random.Generator:
    """The generator of one view of one sample: a function of (sample seed, view) only. The sample
    seed is itself a function of (run seed, epoch, index) (``pipeline.sample_seed``)."""
    return np.random.default_rng([seed, view_index])


def sample_crop(rng: np.random.Generator, width: int, height: int, scale, ratio) -> tuple[int, int, int, int]:
    """torchvision's ``RandomResizedCrop.get_params``: ten tries at an area fraction uniform in
    ``scale`` and a log-uniform aspect ratio in ``ratio``, then a centre crop. -> (top, left, h, w)."""
    area = width * height
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    for _ in range(10):
        target_area = area * rng.uniform(scale[0], scale[1])
        aspect = math.exp(rng.uniform(log_lo, log_hi))
        w = int(round(math.sqrt(target_area * aspect)))
        h = int(round(math.sqrt(target_area / aspect)))
        if 0 < w <= width and 0 < h <= height:
            return int(rng.integers(0, height - h + 1)), int(rng.integers(0, width - w + 1)), h, w
    return crop_fallback(height, width, ratio)


def _jitter_ranges(jitter, in_chans: int) -> list[tuple[str, float, float]]:
    """ColorJitter's factor ranges: brightness/contrast/saturation b -> [max(0, 1-b), 1+b], hue h ->
    [-h, h]; a zero strength is left out, and saturation and hue on 1-channel images."""
    out = []
    for op, strength in zip(JITTER_OPS, jitter):
        if not strength or (in_chans == 1 and op in ("saturation", "hue")):
            continue
        out.append((op, -strength, strength) if op == "hue" else (op, max(0.0, 1.0 - strength), 1.0 + strength))
    return out


def sample_view(rng: np.random.Generator, view, width: int, height: int, in_chans: int) -> ViewDraw:
    """One view's parameters for a ``width`` x ``height`` source image, as torchvision draws them."""
    top, left, h, w = sample_crop(rng, width, height, view.crop_scale, view.crop_ratio)
    jitter: tuple = ()
    if view.jitter is not None and rng.random() < view.jitter_p:
        ranges = _jitter_ranges(view.jitter, in_chans)
        order = rng.permutation(len(ranges))
        jitter = tuple((ranges[k][0], float(rng.uniform(ranges[k][1], ranges[k][2]))) for k in order)
    grayscale = in_chans == 3 and rng.random() < view.grayscale_p
    blur_sigma = float(rng.uniform(*view.blur_sigma)) if rng.random() < view.blur_p else None
    solarize = rng.random() < view.solarize_p
    flip = rng.random() < view.flip_p
    return ViewDraw(top, left, h, w, bool(flip), jitter, bool(grayscale), blur_sigma, bool(solarize))


# -- pixel operations on uint8 arrays (H, W, 3) or (H, W), each a function of plain parameters ----------
def _lut(array: np.ndarray, table: np.ndarray) -> np.ndarray:
    return cv2.LUT(array, np.clip(table, 0, 255).astype(np.uint8))  # astype truncates, as torchvision's .to(uint8)


_GREY_WEIGHTS = np.array([[0.2989, 0.587, 0.114, -0.5]], np.float32)  # torchvision's; -0.5 turns rounding into truncation


def _gray(array: np.ndarray) -> np.ndarray:
    """Luma as torchvision computes it on uint8 (weighted sum, truncated)."""
    return array if array.ndim == 2 else cv2.transform(array, _GREY_WEIGHTS)


def adjust_brightness(array: np.ndarray, factor: float) -> np.ndarray:
    return _lut(array, np.arange(256, dtype=np.float32) * np.float32(factor))


def adjust_contrast(array: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the mean grey level of the image."""
    mean = np.float32(cv2.mean(_gray(array))[0])
    return _lut(array, np.arange(256, dtype=np.float32) * np.float32(factor) + mean * np.float32(1.0 - factor))


def adjust_saturation(array: np.ndarray, factor: float) -> np.ndarray:
    """Blend with the grey image; gamma -0.5 makes OpenCV's rounding a truncation, as torchvision's."""
    grey = cv2.cvtColor(_gray(array), cv2.COLOR_GRAY2RGB)
    return cv2.addWeighted(array, factor, grey, 1.0 - factor, -0.5)


def adjust_hue(array: np.ndarray, factor: float) -> np.ndarray:
    """Rotate the hue by ``factor`` turns (HSV with hue in 256 steps, so to the nearest 1/256 turn)."""
    hsv = cv2.cvtColor(array, cv2.COLOR_RGB2HSV_FULL)
    hsv[..., 0] += np.uint8(int(round(factor * 256)) % 256)  # uint8 arithmetic wraps around the circle
    return cv2.cvtColor(hsv, cv2.COLOR_HSV2RGB_FULL)


def to_grayscale(array: np.ndarray) -> np.ndarray:
    return cv2.cvtColor(_gray(array), cv2.COLOR_GRAY2RGB)


def blur_kernel(sigma: float, max_kernel: int) -> int:
    """Kernel side for ``sigma``: 4 sigma each side, at most ``max_kernel`` (the policy's kernel size)."""
    return min(max_kernel, 2 * math.ceil(BLUR_TRUNCATE * sigma) + 1)


def gaussian_blur(array: np.ndarray, sigma: float, max_kernel: int) -> np.ndarray:
    """Gaussian blur with reflected borders; the kernel spans 4 sigma each side, at most ``max_kernel``
    taps (the kernel size torchvision's path uses)."""
    k = blur_kernel(sigma, max_kernel)
    return cv2.GaussianBlur(array, (k, k), sigmaX=sigma, sigmaY=sigma, borderType=cv2.BORDER_REFLECT_101)


def solarize(array: np.ndarray, threshold: int = SOLARIZE_THRESHOLD) -> np.ndarray:
    """Invert every value at or above ``threshold``."""
    levels = np.arange(256, dtype=np.int32)
    return _lut(array, np.where(levels >= threshold, 255 - levels, levels))


def hflip(array: np.ndarray) -> np.ndarray:
    return cv2.flip(array, 1)


_JITTER_FN = {"brightness": adjust_brightness, "contrast": adjust_contrast, "saturation": adjust_saturation, "hue": adjust_hue}


def apply_colour_and_flip(array: np.ndarray, draw: ViewDraw, max_kernel: int) -> np.ndarray:
    """Every operation after the crop, in torchvision's order: jitter, grayscale, blur, solarize, flip."""
    for op, factor in draw.jitter:
        array = _JITTER_FN[op](array, factor)
    if draw.grayscale:
        array = to_grayscale(array)
    if draw.blur_sigma is not None:
        array = gaussian_blur(array, draw.blur_sigma, max_kernel)
    if draw.solarize:
        array = solarize(array)
    if draw.flip:
        array = hflip(array)
    return array


# -- files --------------------------------------------------------------------------------------
def read_bytes(path: str) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as exc:
        raise unreadable_image(path, exc) from None


def image_size(data: bytes, path: str) -> tuple[int, int]:
    """(width, height) from the header alone."""
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return img.size
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise unreadable_image(path, exc) from None


def is_complete_jpeg(data: bytes) -> bool:
    """A JPEG that starts with SOI and ends with EOI (a truncated file does not)."""
    return data[:2] == b"\xff\xd8" and data.rstrip(b"\0")[-2:] == b"\xff\xd9"


def decode(data: bytes, path: str, in_chans: int, reduction: int = 1) -> np.ndarray:
    """Pixels as uint8 (H, W, 3) RGB, or (H, W) for ``in_chans`` 1, EXIF orientation ignored (as
    Pillow's ``open``). A complete JPEG is decoded by OpenCV's libjpeg-turbo at 1/``reduction`` scale
    (DCT scaling; 1, 2, 4 or 8); anything else, or anything OpenCV cannot decode, by Pillow at full
    scale, which names the file if it cannot either."""
    if is_complete_jpeg(data):
        reduced = {1: 0, 2: cv2.IMREAD_REDUCED_GRAYSCALE_2, 4: cv2.IMREAD_REDUCED_GRAYSCALE_4, 8: cv2.IMREAD_REDUCED_GRAYSCALE_8}
        colour = cv2.IMREAD_GRAYSCALE if in_chans == 1 else cv2.IMREAD_COLOR_RGB
        array = cv2.imdecode(np.frombuffer(data, np.uint8), reduced[reduction] | colour | cv2.IMREAD_IGNORE_ORIENTATION)
        if array is not None:
            return array
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(io.BytesIO(data)) as img:
            return np.array(img.convert("L" if in_chans == 1 else "RGB"))
    except (OSError, UnidentifiedImageError, SyntaxError, ValueError) as exc:
        raise unreadable_image(path, exc) from None


def dct_reduction(downscale: float) -> int:
    """The largest JPEG DCT scale-down (1, 2, 4, 8) that keeps every crop at least its output size;
    ``downscale``: the smallest ratio of crop side to output side over the views."""
    reduction = 1
    while reduction < 8 and downscale >= 2 * reduction:
        reduction *= 2
    return reduction


def resized_crop_chw(array: np.ndarray, top: float, left: float, height: float, width: float, size: int) -> torch.Tensor:
    """Crop (box in ``array``'s pixels, rounded to whole pixels) and resize to ``size`` x ``size`` with
    the bicubic antialiased uint8 kernel torchvision's RandomResizedCrop uses: a contiguous uint8
    (C, size, size) tensor (torch's kernel reads the HWC memory and writes channels-first)."""
    top, left = min(round(top), array.shape[0] - 1), min(round(left), array.shape[1] - 1)
    crop = np.ascontiguousarray(array[top : top + max(1, round(height)), left : left + max(1, round(width))])
    image = torch.from_numpy(crop if crop.ndim == 3 else crop[..., None]).permute(2, 0, 1).unsqueeze(0)  # (1, C, h, w) channels-last
    return torch.nn.functional.interpolate(image, size=(size, size), mode="bicubic", antialias=True)[0]


def to_hwc(image: torch.Tensor) -> np.ndarray:
    """uint8 (C, H, W) tensor -> (H, W, C) array, or (H, W) for one channel. OpenCV's interleaving
    (``cv2.merge``) takes ~0.01 ms for a 224 px view, a transposing copy ~0.2 ms."""
    planes = image.numpy()
    return planes[0] if len(planes) == 1 else cv2.merge(list(planes))


def resized_crop(array: np.ndarray, top: float, left: float, height: float, width: float, size: int) -> np.ndarray:
    """``resized_crop_chw`` as an (H, W, C) or (H, W) array, the layout of the OpenCV operations."""
    return to_hwc(resized_crop_chw(array, top, left, height, width, size))


class Normalise:
    """(B, C, H, W) uint8 batches -> float on ``device``, normalised with ``mean`` / ``std`` (0..1 scale):
    done once per batch on the training device rather than per sample in the workers, so workers hand
    over a quarter of the bytes."""

    def __init__(self, mean, std, device="cpu"):
        self.device = torch.device(device)
        self.shift = torch.tensor(mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255
        self.scale = 1.0 / (torch.tensor(std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1) * 255)

    def __call__(self, batch: torch.Tensor) -> torch.Tensor:
        return batch.to(self.device, non_blocking=True).float().sub_(self.shift).mul_(self.scale)


class NormalisedBatches:
    """A loader of uint8 views, yielding its batches on ``normalise.device`` with float normalised views."""

    def __init__(self, loader, normalise: Normalise):
        self.loader, self.normalise = loader, normalise

    def __len__(self) -> int:
        return len(self.loader)

    def __iter__(self):
        for batch in self.loader:
            out = {k: v.to(self.normalise.device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}
            out["views"] = [self.normalise(v) for v in batch["views"]]
            yield out


def to_chw(array: np.ndarray) -> torch.Tensor:
    """uint8 (H, W, C) or (H, W) array -> (C, H, W) tensor sharing its memory."""
    image = torch.from_numpy(array)
    return image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)


class FolderViews:
    """A policy (a tuple of ``View``) applied to image files on the CPU: ``(path, seed) -> [views]``,
    each view a uint8 tensor (C, size, size); ``Normalise`` turns a batch of them into model input."""

    def __init__(self, policy, img_size: int, in_chans: int, mean, std):
        self.policy, self.in_chans = tuple(policy), in_chans
        self.sizes = [view.resolved_size(img_size) for view in self.policy]
        self.mean, self.std = tuple(mean), tuple(std)
        cv2.setNumThreads(1)  # loader workers are the parallelism; OpenCV's own threads would oversubscribe

    def draws(self, seed: int, width: int, height: int) -> list[ViewDraw]:
        return [sample_view(view_rng(seed, v), view, width, height, self.in_chans) for v, view in enumerate(self.policy)]

    def normaliser(self, device="cpu") -> Normalise:
        return Normalise(self.mean, self.std, device)

    def decoded(self, path: str, seed: int) -> tuple[np.ndarray, list[ViewDraw], tuple[int, int]]:
        """The file's pixels at the smallest DCT scale every view's crop allows, its views' draws and its
        full (width, height): everything before the first view is made."""
        data = read_bytes(path)
        width, height = image_size(data, path)
        draws = self.draws(seed, width, height)
        reduction = dct_reduction(min(min(d.height, d.width) / size for d, size in zip(draws, self.sizes)))
        return decode(data, path, self.in_chans, reduction), draws, (width, height)

    def __call__(self, path: str, seed: int | None = None) -> list[torch.Tensor]:
        """The augmented views, each a uint8 (C, size, size) tensor. ``seed``: the sample's seed, which the
        pipeline passes (a function of run seed, epoch and index); None: torch's initial seed."""
        seed = torch.initial_seed() if seed is None else seed
        array, draws, (width, height) = self.decoded(path, seed)
        sy, sx = array.shape[0] / height, array.shape[1] / width
        views = []
        for d, size in zip(draws, self.sizes):
            x = resized_crop_chw(array, d.top * sy, d.left * sx, d.height * sy, d.width * sx, size)
            if d.jitter or d.grayscale or d.blur_sigma is not None or d.solarize:  # OpenCV's operations work on HWC memory
                x = to_chw(apply_colour_and_flip(to_hwc(x), d, blur_kernel_size(size)))
            elif d.flip:  # a view without colour operations stays channels-first: contiguous, so batching is a plain copy
                x = x.flip(-1)
            views.append(x)
        return views
