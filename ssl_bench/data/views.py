"""Views: what a method's augmentation is, independent of where it runs.

A :class:`View` describes one augmented view of an image; a *policy* is a tuple of views, one per view,
in the order the method receives them (``batch["views"][i]`` is a ``(B, C, size, size)`` tensor for
``policy[i]``; views may differ in size, e.g. multi-crop). Both the per-sample CPU path
(``ssl_bench.data.transforms``) and the batched device path (``ssl_bench.data.batched``) interpret
views, so a method declares them once.

Policies are registered by name with ``@register_policy("name")`` on a function that returns a policy
and takes keyword options; third-party packages register theirs through the entry-point group
``ssl_bench.views`` (the entry point names a module, or such a function). ``DataSpec.augmentation``
takes a registered name, a policy (a tuple of views, or one view), or a function returning one.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from importlib.metadata import entry_points
from typing import Callable

from ssl_bench.errors import UserError

ENTRY_POINT_GROUP = "ssl_bench.views"

# MoCo v2's colour jitter (SimSiam uses it); BYOL / MoCo v3 / DINO use a weaker saturation.
MOCO_V2_JITTER = (0.4, 0.4, 0.4, 0.1)
BYOL_JITTER = (0.4, 0.4, 0.2, 0.1)


@dataclass(frozen=True)
class View:
    """One augmented view, applied in this order: crop, colour jitter, grayscale, blur, solarize, flip.

    Colour operations that need three channels (saturation, hue, grayscale) are skipped on 1-channel data.
    """

    size: int | None = None  # output side in px; None = the data set's image size
    crop_scale: tuple = (0.2, 1.0)  # RandomResizedCrop area fraction; (1.0, 1.0) with ratio (1, 1) = no crop
    crop_ratio: tuple = (3 / 4, 4 / 3)  # aspect ratio range (log-uniform)
    flip_p: float = 0.5
    jitter: tuple | None = None  # ColorJitter (brightness, contrast, saturation, hue); None = off
    jitter_p: float = 0.8
    grayscale_p: float = 0.0
    blur_p: float = 0.0
    blur_sigma: tuple = (0.1, 2.0)
    solarize_p: float = 0.0

    def __post_init__(self):
        def bad(field, value, need):
            raise UserError(f"View.{field}={value!r}: {need}")

        if self.size is not None and (not isinstance(self.size, int) or self.size < 1):
            bad("size", self.size, "must be a positive int or None (the data set's size)")
        for name in ("flip_p", "jitter_p", "grayscale_p", "blur_p", "solarize_p"):
            p = getattr(self, name)
            if not isinstance(p, (int, float)) or not 0.0 <= p <= 1.0:
                bad(name, p, "must be a probability in [0, 1]")
        lo, hi = _pair(self.crop_scale, "crop_scale")
        if not 0.0 < lo <= hi <= 1.0:
            bad("crop_scale", self.crop_scale, "needs 0 < low <= high <= 1")
        lo, hi = _pair(self.crop_ratio, "crop_ratio")
        if not 0.0 < lo <= hi:
            bad("crop_ratio", self.crop_ratio, "needs 0 < low <= high")
        lo, hi = _pair(self.blur_sigma, "blur_sigma")
        if not 0.0 < lo <= hi:
            bad("blur_sigma", self.blur_sigma, "needs 0 < low <= high")
        if self.jitter is not None:
            if len(self.jitter) != 4 or any(not isinstance(v, (int, float)) or v < 0 for v in self.jitter):
                bad("jitter", self.jitter, "must be 4 non-negative numbers (brightness, contrast, saturation, hue) or None")
            if self.jitter[3] > 0.5:
                bad("jitter", self.jitter, "hue must be at most 0.5")

    def resolved_size(self, img_size: int) -> int:
        return self.size or img_size


def crop_fallback(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    """RandomResizedCrop's box when no attempt fits (as torchvision): the whole image clamped to the ratio
    range, centred, as (top, left, h, w). Shared by the per-sample and batched paths."""
    in_ratio = width / height
    if in_ratio < min(ratio):
        w, h = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        h, w = height, int(round(height * max(ratio)))
    else:
        w, h = width, height
    return (height - h) // 2, (width - w) // 2, h, w


def _pair(value, name: str) -> tuple[float, float]:
    if not isinstance(value, (tuple, list)) or len(value) != 2:
        raise UserError(f"View.{name}={value!r}: must be a (low, high) pair")
    return float(value[0]), float(value[1])


# -- registry ----------------------------------------------------------------------------------------
_POLICIES: dict[str, Callable[..., tuple]] = {}
_discovered = False


def register_policy(name: str):
    """Decorator: register ``fn(**options) -> tuple[View, ...]`` as the augmentation policy ``name``."""

    def decorate(fn: Callable[..., tuple]) -> Callable[..., tuple]:
        existing = _POLICIES.get(name)
        if existing is not None and existing.__qualname__ != fn.__qualname__:
            raise TypeError(f"augmentation policy '{name}' is taken by {existing.__module__}.{existing.__qualname__}")
        _POLICIES[name] = fn
        fn.policy_name = name
        return fn

    return decorate


def _discover() -> None:
    global _discovered
    if _discovered:
        return
    _discovered = True
    for ep in entry_points(group=ENTRY_POINT_GROUP):
        obj = ep.load()  # importing the module runs its @register_policy
        if callable(obj) and ep.name not in _POLICIES:
            register_policy(ep.name)(obj)


def available_policies() -> dict[str, Callable[..., tuple]]:
    _discover()
    return dict(sorted(_POLICIES.items()))


def resolve_policy(augmentation) -> tuple[View, ...]:
    """A policy (tuple of views) from a registered name, a policy, one view, or a function returning one."""
    if isinstance(augmentation, str):
        known = available_policies()
        if augmentation not in known:
            raise UserError(f"unknown augmentation policy '{augmentation}'; known: {', '.join(known)}")
        augmentation = known[augmentation]()
    elif callable(augmentation) and not isinstance(augmentation, View):
        augmentation = augmentation()
    if isinstance(augmentation, View):
        augmentation = (augmentation,)
    if not isinstance(augmentation, (tuple, list)) or not augmentation or not all(isinstance(v, View) for v in augmentation):
        raise UserError(
            f"augmentation policy {augmentation!r} is not a policy: give a registered name "
            f"({', '.join(available_policies())}), a tuple of ssl_bench.data.views.View, or a function returning one"
        )
    return tuple(augmentation)


def describe(policy: tuple[View, ...]) -> list[dict]:
    """A policy as JSON-able dicts (for records)."""
    return [{f.name: getattr(v, f.name) for f in fields(View)} for v in policy]


# -- built-in policies -------------------------------------------------------------------------------
@register_policy("mim")
def mim(crop_scale=(0.2, 1.0), jitter=None, jitter_p=0.8) -> tuple[View, ...]:
    """MAE / BEiT / CAE: one view, crop and flip (MAE: colour jitter hurts MIM, so it is off)."""
    return (View(crop_scale=crop_scale, jitter=jitter, jitter_p=jitter_p),)


@register_policy("simsiam")
def simsiam(crop_scale=(0.2, 1.0)) -> tuple[View, ...]:
    """SimSiam: two views of MoCo v2's set (jitter (0.4, 0.4, 0.4, 0.1) p 0.8, grayscale 0.2, blur 0.5, flip)."""
    view = View(crop_scale=crop_scale, jitter=MOCO_V2_JITTER, jitter_p=0.8, grayscale_p=0.2, blur_p=0.5)
    return (view, view)


@register_policy("byol")
def byol(crop_scale=(0.08, 1.0)) -> tuple[View, ...]:
    """BYOL / MoCo v3: two asymmetric views (blur p 1.0 / 0.1, solarize p 0 / 0.2)."""
    common = dict(crop_scale=crop_scale, jitter=BYOL_JITTER, jitter_p=0.8, grayscale_p=0.2)
    return (View(blur_p=1.0, solarize_p=0.0, **common), View(blur_p=0.1, solarize_p=0.2, **common))


@register_policy("multicrop")
def multicrop(n_local=6, local_size=96, global_size=None, global_scale=(0.4, 1.0), local_scale=(0.05, 0.4)) -> tuple[View, ...]:
    """DINO / iBOT / SwAV: two global views (BYOL's asymmetric pair) then ``n_local`` small views (blur p 0.5).

    ``global_size`` None keeps the data set's size; ``local_size`` is DINO's 96 px (for 224 px globals):
    set it in proportion for smaller images.
    """
    colour = dict(jitter=BYOL_JITTER, jitter_p=0.8, grayscale_p=0.2)
    first = View(size=global_size, crop_scale=global_scale, blur_p=1.0, **colour)
    second = View(size=global_size, crop_scale=global_scale, blur_p=0.1, solarize_p=0.2, **colour)
    local = View(size=local_size, crop_scale=local_scale, blur_p=0.5, **colour)
    return (first, second) + (local,) * n_local
