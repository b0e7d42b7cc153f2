"""Synthetic JPEG folders for loader benchmarks: ``OUT/train/<class>/<image>.jpg``, the layout of ImageNet.

Each image is random but smooth: noise with a photograph's 1/f amplitude spectrum, so that its JPEG
holds about as many bytes per pixel as a photograph's (about 0.6 at quality 90; ImageNet's average
is of that order) and decodes at about the same cost. Image ``i`` depends on (seed, i) only; with several
sizes, image ``i`` takes the ``i``-th in turn (ImageNet's photographs are landscape and portrait).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from ssl_bench.atomic import atomic_write, make_folder
from ssl_bench.errors import UserError


MAX_SIDE = 4096  # an image is made as float64 planes in one worker: 2.4 GB of memory at 4096 x 4096


def parse_sizes(text: str) -> list[tuple[int, int]]:
    """'500x375' -> [(500, 375)] (width, height); '500x375,375x500' -> both, in that order."""
    sizes = []
    for item in text.split(","):
        try:
            width, height = (int(v) for v in item.strip().lower().split("x"))
            if not (8 <= width <= MAX_SIDE and 8 <= height <= MAX_SIDE):
                raise ValueError
        except ValueError:
            raise UserError(f"image size {item.strip()!r} is not WIDTHxHEIGHT with both from 8 to {MAX_SIDE}, e.g. 500x375 "
                            "(several: 500x375,375x500)") from None
        sizes.append((width, height))
    return sizes


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


def write_jpeg_folder(out: str | Path, images: int, size: tuple[int, int] | list[tuple[int, int]], classes: int, seed: int = 0,
                      quality: int = 90, workers: int = 1) -> dict:
    """Write ``images`` JPEGs (``size`` = (width, height), or a list of them taken in turn) spread over ``classes``
    class folders under ``out/train``, with ``workers`` processes (the same files for any number); refuses a folder
    that already holds files. -> a summary dict."""
    out, sizes = Path(out), list(size) if isinstance(size, list) else [size]
    if images < 1 or classes < 1:
        raise UserError(f"need at least one image and one class; got --images {images} --classes {classes}")
    if workers < 1:
        raise UserError(f"--workers must be at least 1, got {workers}")
    if not 1 <= quality <= 100:
        raise UserError(f"--quality is a JPEG quality from 1 to 100, got {quality}")
    if seed < 0:
        raise UserError(f"--seed must be at least 0, got {seed}")
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} is a file, not a folder; give a new or empty folder")
    if out.exists() and any(out.iterdir()):
        raise UserError(f"{out} already holds files; give a new or empty folder (nothing is overwritten)")
    for c in range(min(classes, images)):
        make_folder(out / "train" / f"class_{c:04d}", "--out")
    image_sizes = [sizes[i % len(sizes)] for i in range(images)]
    jobs = [(out, i, classes, seed, image_sizes[i], quality) for i in range(images)]
    if workers == 1:
        written = [_write_image(job) for job in jobs]
    else:  # the images' pixels (FFTs, ~17 ms each at 500x375) are most of the time: one image per task
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor

        with ProcessPoolExecutor(min(workers, images), mp_context=multiprocessing.get_context("spawn")) as pool:
            written = list(pool.map(_write_image, jobs, chunksize=8))
    pixels = sum(width * height for width, height in image_sizes)
    return {"root": str(out), "images": images, "classes": min(classes, images), "sizes": sizes[:images],
            "quality": quality, "seed": seed, "bytes": sum(written), "bytes_per_pixel": sum(written) / pixels}


def _write_image(job: tuple) -> int:
    """Image ``i`` of the folder, written atomically into its class folder -> its size in bytes."""
    from PIL import Image

    out, i, classes, seed, (width, height), quality = job
    path = out / "train" / f"class_{i % classes:04d}" / f"img_{i:07d}.jpg"
    pixels = synthetic_image(np.random.default_rng([seed, i]), width, height)
    atomic_write(path, lambda f: Image.fromarray(pixels).save(f, format="JPEG", quality=quality))
    return path.stat().st_size
