"""Augmentation policies per method family, on uint8 tensors (C, H, W).

* "mim":     RandomResizedCrop(0.2-1, bicubic) + flip (MAE: colour jitter hurts MIM).
* "simsiam": two views of the MoCo v2 set (crop, colour jitter 0.4/0.4/0.4/0.1 p 0.8, grayscale p 0.2,
             blur p 0.5, flip), as SimSiam's code.
* "byol":    two asymmetric views (blur p 1.0 / 0.1, solarize p 0 / 0.2, jitter saturation 0.2, crop
             scale 0.08-1), as MoCo v3's code uses.
Colour operations that need three channels are left out for grayscale data.
"""
from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ssl_bench.errors import UserError


def _to_float(mean, std) -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]


def _blur(img_size: int, p: float):
    kernel = max(3, int(0.1 * img_size) // 2 * 2 + 1)  # ~10% of the side, odd
    return T.RandomApply([T.GaussianBlur(kernel, sigma=(0.1, 2.0))], p=p)


def _colour(in_chans: int, saturation: float) -> list:
    if in_chans == 3:
        return [T.RandomApply([T.ColorJitter(0.4, 0.4, saturation, 0.1)], p=0.8), T.RandomGrayscale(p=0.2)]
    return [T.RandomApply([T.ColorJitter(brightness=0.4, contrast=0.4)], p=0.8)]


def _crop(img_size: int, scale: tuple = (0.2, 1.0)):
    return T.RandomResizedCrop(img_size, scale=scale, interpolation=InterpolationMode.BICUBIC, antialias=True)


class MultiView:
    """Applies one transform per view and returns the list of views."""

    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, img: torch.Tensor) -> list[torch.Tensor]:
        return [t(img) for t in self.transforms]


def mim(img_size, in_chans, mean, std):
    return MultiView(T.Compose([_crop(img_size), T.RandomHorizontalFlip(), *_to_float(mean, std)]))


def simsiam(img_size, in_chans, mean, std):
    view = T.Compose([_crop(img_size), *_colour(in_chans, 0.4), _blur(img_size, 0.5), T.RandomHorizontalFlip(), *_to_float(mean, std)])
    return MultiView(view, view)


def byol(img_size, in_chans, mean, std):
    def view(blur_p, solarize_p):
        return T.Compose([
            _crop(img_size, (0.08, 1.0)), *_colour(in_chans, 0.2), _blur(img_size, blur_p),
            T.RandomSolarize(threshold=128, p=solarize_p), T.RandomHorizontalFlip(), *_to_float(mean, std),
        ])

    return MultiView(view(1.0, 0.0), view(0.1, 0.2))


POLICIES = {"mim": mim, "simsiam": simsiam, "byol": byol}


def build_policy(name: str, img_size: int, in_chans: int, mean, std) -> MultiView:
    if name not in POLICIES:
        raise UserError(f"unknown augmentation policy '{name}'; known: {', '.join(POLICIES)}")
    return POLICIES[name](img_size, in_chans, mean, std)


def eval_transform(img_size: int, native_size: int, mean, std):
    """No augmentation: resize (short side, keeping the usual 224/256 crop ratio for large images) and
    centre-crop to ``img_size``; images already at that size pass through."""
    ops = []
    if native_size != img_size or native_size >= 64:
        resize = img_size if native_size <= 64 else int(round(img_size * 256 / 224))
        ops += [T.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(img_size)]
    return T.Compose([*ops, *_to_float(mean, std)])
