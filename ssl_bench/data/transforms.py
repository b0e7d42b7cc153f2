"""Per-sample torchvision transforms on uint8 tensors (C, H, W), built from :class:`~ssl_bench.data.views.View`.

This is the CPU path (image folders, or ``data.device_augment=false``); ``ssl_bench.data.batched`` applies
the same views to whole batches on the training device.
"""
from __future__ import annotations

import torch
from torchvision.transforms import InterpolationMode
from torchvision.transforms import v2 as T

from ssl_bench.data.views import View, resolve_policy


def _to_float(mean, std) -> list:
    return [T.ToDtype(torch.float32, scale=True), T.Normalize(mean, std)]


def blur_kernel_size(size: int) -> int:
    """Gaussian blur kernel side for a ``size`` px view: ~10% of the side, odd, at least 3."""
    return max(3, int(0.1 * size) // 2 * 2 + 1)


def view_transform(view: View, img_size: int, in_chans: int, mean, std) -> T.Compose:
    """One view as torchvision ops: crop, colour jitter, grayscale, blur, solarize, flip, normalize."""
    size = view.resolved_size(img_size)
    ops = [T.RandomResizedCrop(size, scale=view.crop_scale, ratio=view.crop_ratio,
                               interpolation=InterpolationMode.BICUBIC, antialias=True)]
    if view.jitter is not None and view.jitter_p > 0:
        b, c, s, h = view.jitter
        jitter = T.ColorJitter(b, c, s, h) if in_chans == 3 else T.ColorJitter(brightness=b, contrast=c)
        ops.append(T.RandomApply([jitter], p=view.jitter_p))
    if view.grayscale_p > 0 and in_chans == 3:
        ops.append(T.RandomGrayscale(p=view.grayscale_p))
    if view.blur_p > 0:
        ops.append(T.RandomApply([T.GaussianBlur(blur_kernel_size(size), sigma=view.blur_sigma)], p=view.blur_p))
    if view.solarize_p > 0:
        ops.append(T.RandomSolarize(threshold=128, p=view.solarize_p))
    if view.flip_p > 0:
        ops.append(T.RandomHorizontalFlip(p=view.flip_p))
    return T.Compose([*ops, *_to_float(mean, std)])


class MultiView:
    """Applies one transform per view and returns the list of views."""

    def __init__(self, *transforms):
        self.transforms = transforms

    def __call__(self, img: torch.Tensor) -> list[torch.Tensor]:
        return [t(img) for t in self.transforms]


def build_policy(augmentation, img_size: int, in_chans: int, mean, std) -> MultiView:
    """``augmentation``: a registered policy name, a policy (tuple of View) or a function returning one."""
    return MultiView(*(view_transform(v, img_size, in_chans, mean, std) for v in resolve_policy(augmentation)))


def eval_transform(img_size: int, native_size: int, mean, std):
    """No augmentation: resize (short side, keeping the usual 224/256 crop ratio for large images) and
    centre-crop to ``img_size``; images already at that size pass through."""
    ops = []
    if native_size != img_size or native_size >= 64:
        resize = img_size if native_size <= 64 else int(round(img_size * 256 / 224))
        ops += [T.Resize(resize, interpolation=InterpolationMode.BICUBIC, antialias=True), T.CenterCrop(img_size)]
    return T.Compose([*ops, *_to_float(mean, std)])
