"""Synthetic JPEG folders for loader benchmarks: ``OUT/train/<class>/<image>.jpg``, the layout of ImageNet.

Each image is random but smooth: noise with a photograph's 1/f amplitude spectrum, so that its JPEG
holds about as many bytes per pixel as a photograph's (about 0.6 at quality 90; ImageNet's average
is of that order) and decodes at about the same cost. Image ``i`` depends on (seed, i) only.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_bench.atomic import atomic_write, make_folder
from ssl_bench.errors import UserError


def parse_size(text: str) -> tuple[int, int]:
    """'500x375' -> (500, 375) (width, height)."""
    try:
        width, height = (int(v) for v in text.lower().split("x"))
        if width < 8 or height < 8:
            raise ValueError
    except ValueError:
        raise UserError(f"image size {text!r} is not WIDTHxHEIGHT with both at least 8, e.g. 500x375") from None
    return width, height


def synthetic_image(rng: np.random.Generator, width: int, height: int) -> np.ndarray:
    """(height, width, 3) uint8: Gaussian noise whose amplitude spectrum falls as 1/f, as photographs'
    does, with the three channels mostly shared (one luminance field plus two weaker colour fields)."""
    fy = np.fft.fftfreq(height)[:, None]
    fx = np.fft.rfftfreq(width)[None, :]
    freq = np.sqrt(fx**2 + fy**2)
    freq[0, 0] = np.inf  # no constant term: the mean is set below
    shape = (3, *freq.shape)
    spectrum = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)) / freq
    fields = np.fft.irfft2(spectrum, s=(height, width))
    lum, c1, c2 = fields / fields.std(axis=(1, 2), keepdims=True)
    rgb = np.stack([lum + 0.3 * c1, lum - 0.2 * c1 + 0.2 * c2, lum - 0.3 * c2], axis=-1)
    return np.clip(128 + 45 * rgb, 0, 255).astype(np.uint8)


def write_jpeg_folder(out: str | Path, images: int, size: tuple[int, int], classes: int, seed: int = 0, quality: int = 90) -> dict:
    """Write ``images`` JPEGs (``size`` = (width, height)) spread over ``classes`` class folders under
    ``out/train``; refuses a folder that already holds files. -> a summary dict."""
    from PIL import Image

    out = Path(out)
    if images < 1 or classes < 1:
        raise UserError(f"need at least one image and one class; got --images {images} --classes {classes}")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already holds files; give a new or empty folder (nothing is overwritten)")
    width, height = size
    total = 0
    for i in range(images):
        folder = out / "train" / f"class_{i % classes:04d}"
        make_folder(folder, "--out")
        path = folder / f"img_{i:07d}.jpg"
        pixels = synthetic_image(np.random.default_rng([seed, i]), width, height)
        atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="JPEG", quality=quality))
        total += path.stat().st_size
    return {"root": str(out), "images": images, "classes": classes, "width": width, "height": height,
            "quality": quality, "seed": seed, "bytes": total, "bytes_per_pixel": total / (images * width * height)}
