"""Batched augmentation on the training device, for data sets held in memory.

The uint8 data set sits on the training device (the GPU when there is one); a batch is a tensor of
sample indices, and each view of the policy is made for all its samples at once (views that differ only
in their probabilities together, as one batch of views x samples):

    indices (B,) -> uniforms (B, DRAWS) = hash(seed, epoch, index, view, draw)
                 -> crop boxes -> bicubic resize -> colour jitter -> grayscale -> blur -> solarize -> flip
                 -> normalize -> (B, C, size, size)

Random parameters come from a counter-based hash of (seed, epoch, index, view, draw)
(``ssl_bench.counter_rng``), not from an RNG stream, so they are a function of those numbers alone: a
resumed run or another DDP shard draws the same augmentation for the same sample, and no global RNG state
is consumed. The batch's masks come from the same hash (``ssl_bench.masking``, ``batch``).

The parameters follow torchvision's definitions (RandomResizedCrop's ten attempts and centre fallback,
ColorJitter's factor ranges and random order, GaussianBlur's kernel), so both paths draw the same
distributions (tests/test_batched.py). The crop is resized with torchvision's antialiased bicubic kernel
(the CPU path's interpolation), written as two per-sample resampling matrices, (size, H) and (W, size),
applied with one batched matmul: the same interpolation as the per-sample path, antialiased when a crop
shrinks, one kernel for the whole batch. (``grid_sample`` has no antialiasing and ``roi_align`` only
bilinear.) Per-sample choices are blends with 0/1 factors and comparisons are written with ``floor``,
which is exact and, unlike ``torch.where``, vectorised on CPU as on GPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ssl_bench import counter_rng
from ssl_bench.counter_rng import stream_key, uniforms_from_key
from ssl_bench.data.transforms import blur_kernel_size
from ssl_bench.data.views import View, crop_fallback

ATTEMPTS = 10  # RandomResizedCrop's tries before its centre-crop fallback
# uniforms per (sample, view): crop (area, log-ratio, top, left) x ATTEMPTS, then one per decision below
_AREA, _RATIO, _TOP, _LEFT = (k * ATTEMPTS for k in range(4))
_FLIP, _JITTER_P, _BRIGHT, _CONTRAST, _SAT, _HUE, _ORDER = range(4 * ATTEMPTS, 4 * ATTEMPTS + 7)
_GRAY, _BLUR_P, _SIGMA, _SOLARIZE = range(_ORDER + 4, _ORDER + 8)
DRAWS = _SOLARIZE + 1


def to_device(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    """A host tensor on ``device``; to a GPU from pinned memory, so the copy queues behind the stream's work
    instead of waiting for it."""
    return (t.pin_memory() if device.type == "cuda" else t).to(device, non_blocking=True)


def uniforms(seed: int, epoch: int, index: torch.Tensor, view: int, draws: int = DRAWS) -> torch.Tensor:
    """(B, draws) float64 uniforms in [0, 1), a pure function of (seed, epoch, index, view, draw)."""
    return counter_rng.uniforms(seed, epoch, index, view, draws)


# -- parameters (pure functions of uniforms; tests compare them with torchvision's) -----------------
def crop_boxes(u: torch.Tensor, height: int, width: int, scale, ratio) -> torch.Tensor:
    """RandomResizedCrop.get_params for each row of ``u``: (B, 4) boxes (top, left, h, w) as float64."""
    area = height * width
    target = area * (scale[0] + (scale[1] - scale[0]) * u[:, _AREA:_AREA + ATTEMPTS])
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    aspect = torch.exp(log_lo + (log_hi - log_lo) * u[:, _RATIO:_RATIO + ATTEMPTS])
    w = torch.round(torch.sqrt(target * aspect))
    h = torch.round(torch.sqrt(target / aspect))
    ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
    top = torch.floor(u[:, _TOP:_TOP + ATTEMPTS] * (height - h + 1))
    left = torch.floor(u[:, _LEFT:_LEFT + ATTEMPTS] * (width - w + 1))
    first = ok.int().argmax(dim=1, keepdim=True)  # the first attempt that fits
    pick = lambda t: t.gather(1, first).squeeze(1)  # noqa: E731
    boxes = torch.stack([pick(top), pick(left), pick(h), pick(w)], dim=1)
    fits = ok.any(dim=1)
    fallback = crop_fallback(height, width, ratio)  # scalars: no host-to-device copy per batch
    return torch.stack([torch.where(fits, boxes[:, k], float(v)) for k, v in enumerate(fallback)], dim=1)


def jitter_factors(u: torch.Tensor, jitter) -> torch.Tensor:
    """(B, 4) ColorJitter factors: brightness, contrast, saturation in [max(0, 1-x), 1+x], hue in [-h, h]."""
    b, c, s, h = jitter
    ranges = ((max(0.0, 1 - b), 1 + b), (max(0.0, 1 - c), 1 + c), (max(0.0, 1 - s), 1 + s), (-h, h))
    return torch.stack([lo + (hi - lo) * u[:, _BRIGHT + k] for k, (lo, hi) in enumerate(ranges)], dim=1)


def jitter_order(u: torch.Tensor) -> torch.Tensor:
    """(B, 4) a uniformly random permutation of the four colour operations per sample."""
    return u[:, _ORDER:_ORDER + 4].argsort(dim=1)


def _below(u: torch.Tensor, p: float) -> torch.Tensor:
    """1.0 with probability p: (u < p) for uniforms u (B,), as float."""
    return (u < p).to(u.dtype)


def no_jitter_factors(like: torch.Tensor, n: int) -> torch.Tensor:
    """(n, 4) ColorJitter factors that change nothing (brightness, contrast, saturation 1, hue 0), made on
    ``like``'s device without a host-to-device copy."""
    return F.pad(like.new_ones(n, 3), (0, 1))


def blur_sigmas(u: torch.Tensor, sigma) -> torch.Tensor:
    return sigma[0] + (sigma[1] - sigma[0]) * u[:, _SIGMA]


# -- batched image operations on float images in [0, 1] -------------------------------------------------
def _step(x: torch.Tensor) -> torch.Tensor:
    """1.0 where x >= 0 else 0.0, for x in [-1, 1): exact, and fast where comparisons are not."""
    return torch.floor(x) + 1


def _pick(choice: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per sample: ``a`` where choice (B,) is 1.0, ``b`` where 0.0 (exact for 0/1 choices)."""
    c = choice.to(a.dtype).view(-1, *([1] * (a.ndim - 1)))
    return a * c + b * (1 - c)


def _bicubic_aa(x: torch.Tensor) -> torch.Tensor:
    """torch's antialiased bicubic kernel (a = -0.5, as PIL), evaluated at distances ``x``. Both pieces
    vanish at their ends (|x| = 1, 2), so clamping |x| into each piece's interval selects it exactly."""
    a = -0.5
    t = x.abs_()
    near = t.clamp(max=1.0)
    far = t.clamp_(1.0, 2.0)
    near = ((a + 2) * near - (a + 3)) * near * near + 1
    far = ((a * far - 5 * a) * far + 8 * a) * far - 4 * a
    return near.add_(far)


def resample_matrix(start: torch.Tensor, length: torch.Tensor, src: int, size: int) -> torch.Tensor:
    """(B, size, src) weights that resize source pixels [start, start + length) to ``size`` pixels, as torch's
    antialiased bicubic resize does: the kernel widens by the shrink factor, rows sum to one."""
    start, length = start.float(), length.float()  # whole pixels: exact in float32
    scale = (length / size).view(-1, 1, 1)  # source px per output px
    support = scale.clamp(min=1.0)
    centre = start.view(-1, 1, 1) + (torch.arange(size, device=start.device, dtype=start.dtype).view(1, -1, 1) + 0.5) * scale
    pixel = torch.arange(src, device=start.device, dtype=start.dtype).view(1, 1, -1)
    # only the crop's own pixels, as resizing the cropped image does (whole numbers: the clamps give 0 or 1)
    inside = (pixel - start.view(-1, 1, 1) + 1).clamp_(0, 1) * (start.view(-1, 1, 1) + length.view(-1, 1, 1) - pixel).clamp_(0, 1)
    w = _bicubic_aa((pixel + 0.5 - centre) / support) * inside
    return w / w.sum(dim=2, keepdim=True)


class Resampler:
    """``resample_matrix`` for one side: crops of a side-``src`` image resized to ``size`` px, optionally
    flipped (the output reversed). A crop starts and ends on whole pixels, so a side has only src (src + 1) / 2
    crops: where their matrices fit in ``TABLE_BYTES`` (up to about 56 px) they are computed once and a
    batch gathers its matrices from the table, one copy instead of some twenty ops on (B, size, src)
    tensors; the values are the same either way."""

    TABLE_BYTES = 32 * 2**20

    def __init__(self, src: int, size: int, device):
        self.src, self.size = src, size
        entries = src * (src + 1) // 2
        self.table = None
        if 2 * entries * size * src * 4 <= self.TABLE_BYTES:
            length = torch.cat([torch.full((src - n + 1,), n) for n in range(1, src + 1)])  # (entries,)
            start = torch.cat([torch.arange(src - n + 1) for n in range(1, src + 1)])
            table = resample_matrix(start.to(device), length.to(device), src, size)  # (entries, size, src)
            self.table = torch.cat([table, table.flip(1)])  # then the flipped ones
            # entry of (start, length): the crops of length n begin after those of lengths 1 .. n - 1
            first = [0] + [src - n + 1 for n in range(1, src + 1)]
            self.first = torch.tensor(first, device=device).cumsum(0)  # (src + 1,)

    def __call__(self, start: torch.Tensor, length: torch.Tensor, flip: torch.Tensor | None = None) -> torch.Tensor:
        """(B, size, src) matrices for crops [start, start + length) (B,) of whole pixels; ``flip`` (B,) 0/1."""
        if self.table is None:
            m = resample_matrix(start, length, self.src, self.size)
            return m if flip is None else _pick(flip, m.flip(1), m)
        entry = self.first[length.long() - 1] + start.long()
        if flip is not None:
            entry = entry + flip.long() * (len(self.table) // 2)
        return self.table.index_select(0, entry)


def _gray(x: torch.Tensor) -> torch.Tensor:
    """(B, 1, H, W) luma of RGB images, torchvision's weights."""
    r, g, b = x.unbind(dim=1)
    return (0.2989 * r + 0.587 * g + 0.114 * b).unsqueeze(1)


def _adjust_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the HSV hue by ``shift`` (B,) turns (torchvision's hexagonal HSV), without branches."""
    r, g, b = x.unbind(dim=1)
    maxc = torch.maximum(torch.maximum(r, g), b)
    minc = torch.minimum(torch.minimum(r, g), b)
    delta = maxc - minc
    grey = 1 - torch.ceil(delta)  # 1.0 where r == g == b (no hue)
    s = delta / (maxc + (1 - torch.ceil(maxc)))
    d = delta + grey
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    is_r = _step(r - maxc)  # the first channel that holds the max picks the hue sector, as torchvision
    is_g = (1 - is_r) * _step(g - maxc)
    is_b = 1 - is_r - is_g
    h = is_r * (bc - gc) + is_g * (2.0 + rc - bc) + is_b * (4.0 + gc - rc)
    h = (1 - grey) * h / 6.0 + shift.view(-1, 1, 1).to(x.dtype)
    h = h - torch.floor(h)  # mod 1
    # HSV -> RGB: channel n in (5, 3, 1) is v - v s clamp(min(k, 4 - k), 0, 1) with k = (n + 6h) mod 6
    out = []
    for n in (5.0, 3.0, 1.0):
        k = n + 6.0 * h
        k = k - 6.0 * torch.floor(k / 6.0)
        out.append(maxc - maxc * s * torch.minimum(k, 4.0 - k).clamp_(0, 1))
    return torch.stack(out, dim=1)


def _scale_shift(x: torch.Tensor, scale: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """``scale x + shift`` with one rounding (addcmul) for per-sample ``scale`` and ``shift`` (B, 1, 1, 1). On
    a CPU the shift is expanded to x's shape first: with two broadcast operands addcmul runs a scalar loop,
    with one its vectorised loop (2.5x faster at 28 px); the numbers are the same."""
    if x.device.type == "cpu":
        return shift.expand_as(x).contiguous().addcmul_(scale, x)
    return torch.addcmul(shift, scale, x)


def _colour_jitter(x: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, apply: torch.Tensor) -> torch.Tensor:
    """ColorJitter per sample in its own random order; samples with ``apply`` False keep identity factors.

    At each turn every sample applies one of its operations. Brightness, contrast and saturation are
    torchvision's blends (with black, the mean luma, the luma) with a factor f, each ``f x + (1 - f) other``
    clamped to [0, 1]; a sample's other two factors are exactly 1 at this turn, so one fused expression,
    ``clamp(fb fc fs x + (1 - fc) mean + (1 - fs) luma)``, applies whichever it draws."""
    n_ops = 2 if x.shape[1] == 1 else 4  # the first n_ops operations apply (1 channel: no saturation or hue)
    identity = no_jitter_factors(factors, 1)[0, :n_ops]  # (n_ops,)
    factors = torch.where(apply.bool()[:, None], factors[:, :n_ops], identity)  # (B, n_ops)
    # rank of each present op in this sample's order (torchvision draws a permutation of all four)
    position = order.argsort(dim=1)  # (B, 4): when each op comes
    present = position[:, :n_ops]
    rank = (present[:, None, :] < present[:, :, None]).sum(dim=2)  # (B, n_ops): its turn among the present ops
    for turn in range(n_ops):
        now = rank == turn  # (B, n_ops): the op each sample applies at this turn
        f = torch.where(now, factors, identity).to(x.dtype)  # (B, n_ops): its factor, identities elsewhere
        b, c = f[:, 0].view(-1, 1, 1, 1), f[:, 1].view(-1, 1, 1, 1)
        luma = x if x.shape[1] == 1 else _gray(x)
        scale = b * c if n_ops == 2 else b * c * f[:, 2].view(-1, 1, 1, 1)
        shift = (1 - c) * luma.mean(dim=(1, 2, 3), keepdim=True)
        out = _scale_shift(x, scale, shift)
        if n_ops > 2:
            out = out.addcmul_(1 - f[:, 2].view(-1, 1, 1, 1), luma)
        x = out.clamp_(0, 1)
        if n_ops > 3:
            hue = now[:, 3] & factors[:, 3].ne(0)  # (the HSV round trip is not exact: keep samples without a shift as they are)
            if x.device.type == "cpu" and not torch.compiler.is_compiling():  # the round trip (~70 passes) on this turn's hue samples only: a quarter of the work
                rows = hue.nonzero().squeeze(1)
                x.index_copy_(0, rows, _adjust_hue(x.index_select(0, rows), factors[:, 3].index_select(0, rows)))  # (x is this turn's own)
            else:  # fixed shapes: no host sync for the rows, and one compiled graph (a row count would break it)
                x = _pick(hue, _adjust_hue(x, factors[:, 3]), x)
    return x


def _gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, kernel: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample, reflect padding (as torchvision): a depthwise
    convolution per direction, one filter per (sample, channel)."""
    B, C, H, W = x.shape
    half = (kernel - 1) / 2
    pos = torch.linspace(-half, half, kernel, device=x.device, dtype=torch.float64)
    w = torch.exp(-0.5 * (pos[None] / sigma[:, None]) ** 2)
    w = (w / w.sum(dim=1, keepdim=True)).to(x.dtype).repeat_interleave(C, dim=0)  # (B * C, kernel)
    pad = kernel // 2
    y = F.pad(x.reshape(1, B * C, H, W), (pad, pad, pad, pad), mode="reflect")
    y = F.conv2d(y, w.view(B * C, 1, 1, kernel), groups=B * C)  # along rows
    y = F.conv2d(y, w.view(B * C, 1, kernel, 1), groups=B * C)  # along columns
    return y.view(B, C, H, W)


@dataclass(frozen=True)
class Decisions:
    """One view's per-sample choices after the crop, each (B,) 0.0/1.0 unless said; None = no sample takes
    that operation (it is skipped). Drawn from uniforms here, or taken from the folder path's draws."""

    jitter: torch.Tensor | None = None  # colour jitter applied
    factors: torch.Tensor | None = None  # (B, 4) brightness, contrast, saturation factors and hue shift
    order: torch.Tensor | None = None  # (B, 4) the jitter operations' indices in the order applied
    grayscale: torch.Tensor | None = None
    blur: torch.Tensor | None = None
    sigma: torch.Tensor | None = None  # (B,) the blur's sigma where ``blur`` is 1.0
    solarize: torch.Tensor | None = None


def decisions(u: torch.Tensor, v: View, channels: int) -> Decisions:
    """The choices of view ``v`` from uniforms ``u`` (B, DRAWS), for images with ``channels`` channels."""
    jitter = v.jitter is not None and v.jitter_p > 0
    return Decisions(
        jitter=_below(u[:, _JITTER_P], v.jitter_p) if jitter else None,
        factors=jitter_factors(u, v.jitter) if jitter else None,
        order=jitter_order(u) if jitter else None,
        grayscale=_below(u[:, _GRAY], v.grayscale_p) if v.grayscale_p > 0 and channels == 3 else None,
        blur=_below(u[:, _BLUR_P], v.blur_p) if v.blur_p > 0 else None,
        sigma=blur_sigmas(u, v.blur_sigma) if v.blur_p > 0 else None,
        solarize=_below(u[:, _SOLARIZE], v.solarize_p) if v.solarize_p > 0 else None,
    )


def after_crop(x: torch.Tensor, d: Decisions) -> torch.Tensor:
    """Colour jitter, grayscale, blur and solarize, in the View's order, on float images (B, C, size, size)
    in [0, 1], each sample as ``d`` decides. (The flip, which commutes with all of them, is the caller's.)"""
    if d.jitter is not None:
        x = _colour_jitter(x, d.factors, d.order, d.jitter)
    if d.grayscale is not None:
        x = _pick(d.grayscale, _gray(x).expand_as(x), x)
    if d.blur is not None:
        # samples not blurred get a vanishing sigma: their kernel is an exact delta
        sigma = d.blur * d.sigma + (1 - d.blur) * 1e-3
        x = _gaussian_blur(x, sigma, blur_kernel_size(x.shape[-1]))
    if d.solarize is not None:
        above = _step(x - 128 / 255)  # solarize inverts pixels >= 128 (of 255)
        solarized = d.solarize.to(x.dtype).view(-1, 1, 1, 1) * above
        x = x + solarized * (1 - 2 * x)
    return x


def merge(parts: list[Decisions], like: torch.Tensor) -> Decisions:
    """Several views' decisions for the same samples as one batch (view after view). A view without an
    operation takes its identity (not applied; for blur, a vanishing sigma), which leaves its images exactly
    as they were, so views that differ only in their probabilities are made as one batch."""
    if len(parts) == 1:
        return parts[0]
    n = len(like)
    identity = {"jitter": like.new_zeros(n), "factors": no_jitter_factors(like, n),
                "order": torch.arange(4, device=like.device).expand(n, 4), "grayscale": like.new_zeros(n),
                "blur": like.new_zeros(n), "sigma": like.new_ones(n), "solarize": like.new_zeros(n)}
    merged = {}
    for name, fill in identity.items():
        values = [getattr(d, name) for d in parts]
        merged[name] = None if all(v is None for v in values) else torch.cat([fill if v is None else v for v in values])
    return Decisions(**merged)


def view_groups(policy: tuple[View, ...], img_size: int) -> list[tuple[int, ...]]:
    """The policy's views, grouped by what a batch op cannot vary per sample: output size, crop ranges,
    jitter ranges and blur sigmas. A group's views are made as one batch: a few hundred small ops per
    group instead of per view (on a CPU, 30% less time for SimSiam's two views, 57% for DINO's eight)."""
    groups: dict[tuple, list[int]] = {}
    for k, v in enumerate(policy):
        groups.setdefault((v.resolved_size(img_size), v.crop_scale, v.crop_ratio, v.jitter, v.blur_sigma), []).append(k)
    return [tuple(ks) for ks in groups.values()]


class BatchedViews:
    """Holds a uint8 data set (N, C, H, W) on ``device`` and makes a batch's views from its indices.

    Views that differ only in their probabilities (``view_groups``) are made together, as one batch of
    (views x samples) rows; each row is still its own draw, so the result is the views made one by one.

    ``compile``: each group through ``torch.compile``, which fuses its few hundred small ops (each a kernel
    launch eagerly, CPU time a GPU step then waits for) into a few kernels; one compilation per distinct
    group, reused across epochs (the epoch enters through the stream keys, a tensor)."""

    def __init__(self, images: torch.Tensor, policy: tuple[View, ...], img_size: int, mean, std, seed: int, device,
                 compile: bool = False):
        from ssl_bench.runtime import CompiledOrEager

        assert images.dtype == torch.uint8 and images.ndim == 4
        self.images = images.to(device)
        self.policy, self.img_size, self.seed, self.device = policy, img_size, seed, torch.device(device)
        self.groups = view_groups(policy, img_size)
        H, W = images.shape[-2:]
        sizes = {policy[g[0]].resolved_size(img_size) for g in self.groups}
        self.resamplers = {n: (Resampler(H, n, device), Resampler(W, n, device)) for n in sizes}  # (rows, cols)
        self.mean = torch.tensor(mean, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32, device=device).view(1, -1, 1, 1)
        self.compiled = compile
        self._make = CompiledOrEager(make_views, what="making views", dynamic=False) if compile else make_views

    def __call__(self, index: torch.Tensor, epoch: int) -> list[torch.Tensor]:
        index = index.to(self.device, non_blocking=True)
        source = self.images.index_select(0, index).float()  # (B, C, H, W), 0..255
        out: list[torch.Tensor | None] = [None] * len(self.policy)
        for group in self.groups:
            # the stream keys as a tensor: an input to a compiled group, not constants it would recompile for; copied
            # from pinned memory, since a copy from pageable memory would first wait for the step queued before it
            keys = to_device(torch.tensor([stream_key(self.seed, epoch, k) for k in group], dtype=torch.int64), self.device)
            views = tuple(self.policy[k] for k in group)
            size = views[0].resolved_size(self.img_size)
            made = self._make(source, index, keys, views, self.resamplers[size], self.mean, self.std)
            for k, x in zip(group, made):
                out[k] = x
        return out


def make_views(source: torch.Tensor, index: torch.Tensor, keys: torch.Tensor, views: tuple[View, ...],
               resamplers: tuple[Resampler, Resampler], mean: torch.Tensor, std: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """A group of views of a batch -> one (B, C, size, size) tensor per view, normalised with ``mean`` / ``std``.

    source (B, C, H, W) float 0..255; index (B,) the samples' data set indices; keys (G,) int64 the views'
    stream keys of (seed, epoch, view), on the device (``BatchedViews`` copies them there without waiting);
    resamplers for the rows and the columns, to the views' size. The views share size, crop, jitter and
    blur ranges (``view_groups``)."""
    B, C, H, W = source.shape
    G, v, size = len(views), views[0], resamplers[0].size
    keys = keys.to(index.device).repeat_interleave(B)  # (G B,)
    u = uniforms_from_key(keys, index.repeat(G), DRAWS)  # (G B, DRAWS): row g B + i is view g of sample i

    top, left, h, w = crop_boxes(u, H, W, v.crop_scale, v.crop_ratio).unbind(dim=1)
    # the horizontal flip, drawn here, is applied last (below) by reversing the output columns: every op
    # in between (colour, blur with a symmetric kernel, solarize) commutes with it
    flip = torch.cat([_below(u[g * B:(g + 1) * B, _FLIP], views[g].flip_p) for g in range(G)])
    rows = resamplers[0](top, h)  # (G B, size, H)
    cols = resamplers[1](left, w, flip)  # (G B, size, W)
    x = rows.view(G, B, 1, size, H) @ source @ cols.transpose(1, 2).view(G, B, 1, W, size)  # (G, B, C, size, size)
    x = x.view(G * B, C, size, size).div_(255.0).clamp_(0, 1)
    x = after_crop(x, merge([decisions(u[g * B:(g + 1) * B], views[g], C) for g in range(G)], like=u[:B, 0]))
    return ((x - mean) / std).view(G, B, C, size, size).unbind(0)
