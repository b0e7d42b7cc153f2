"""The probes' training augmentation on batches of tensors: RandomResizedCrop (scale 0.08-1, ratio 3/4-4/3,
bicubic) + horizontal flip, as MAE's main_linprobe.py, CAE's run_linear.py / run_attentive.py and DINOv2's
eval/linear.py apply to the images that train a frozen-encoder probe. No colour jitter.

Every random number is a function of (seed, epoch, index): ``crop_params`` draws the whole split's crops
and flips for an epoch from one generator seeded with (seed, epoch), and a batch takes the rows of its
images. So a batch's crops do not depend on how the split is cut into batches, and every epoch draws anew.

The crop is one batched ``grid_sample`` (bicubic) over the images at their common side; a crop is at most
the image, so it is only ever enlarged and needs no antialiasing. The augmentation is stated as a
``ssl_bench.data.views.View`` (crop scale / ratio and flip probability are read from it; its colour
operations are off); until the batched device path of views lands, this module interprets it for probes.
"""
from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from ssl_bench.data.views import View

PROBE_VIEW = View(crop_scale=(0.08, 1.0), crop_ratio=(3 / 4, 4 / 3), flip_p=0.5)  # MAE / CAE / DINOv2 probes


def crop_params(n: int, seed: int, epoch: int, view: View = PROBE_VIEW, attempts: int = 10) -> np.ndarray:
    """(n, 5) float64 rows (top, left, height, width, flip) for images 0..n-1, as fractions of the side.

    torchvision's RandomResizedCrop rule: up to ``attempts`` draws of (area fraction, log aspect ratio),
    the first that fits inside the image wins; none fits: the whole image.
    """
    rng = np.random.default_rng([seed, epoch])
    area = rng.uniform(*view.crop_scale, size=(n, attempts))
    log_r = rng.uniform(math.log(view.crop_ratio[0]), math.log(view.crop_ratio[1]), size=(n, attempts))
    u_top, u_left, u_flip = rng.random((n, attempts)), rng.random((n, attempts)), rng.random(n)
    w = np.sqrt(area * np.exp(log_r))  # fractions of a square image's side
    h = np.sqrt(area / np.exp(log_r))
    fits = (w <= 1) & (h <= 1)
    first = fits.argmax(axis=1)  # the first attempt that fits (0 when none does: masked below)
    row = np.arange(n)
    h, w, u_top, u_left = h[row, first], w[row, first], u_top[row, first], u_left[row, first]
    none = ~fits.any(axis=1)  # fallback: the centre crop of the whole image (square: ratio 1 is allowed)
    h[none], w[none], u_top[none], u_left[none] = 1.0, 1.0, 0.5, 0.5
    return np.stack([u_top * (1 - h), u_left * (1 - w), h, w, (u_flip < view.flip_p).astype(np.float64)], axis=1)


def crop_and_flip(images: torch.Tensor, params: torch.Tensor | np.ndarray, size: int) -> torch.Tensor:
    """(B, C, H, W) float, params (B, 5) from ``crop_params`` -> (B, C, size, size): each crop resized
    (bicubic) to ``size``, mirrored where flip = 1."""
    params = torch.as_tensor(params, dtype=images.dtype, device=images.device)
    top, left, h, w, flip = params.unbind(dim=1)
    # affine map from output coordinates [-1, 1] to input coordinates [-1, 1] (align_corners=False)
    theta = torch.zeros(len(images), 2, 3, dtype=images.dtype, device=images.device)
    theta[:, 0, 0] = w * (1 - 2 * flip)  # a flip mirrors x inside the crop
    theta[:, 0, 2] = 2 * left + w - 1  # the crop's centre
    theta[:, 1, 1] = h
    theta[:, 1, 2] = 2 * top + h - 1
    grid = F.affine_grid(theta, [len(images), images.shape[1], size, size], align_corners=False)
    return F.grid_sample(images, grid, mode="bicubic", padding_mode="border", align_corners=False)
