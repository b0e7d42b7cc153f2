"""Counter-based random numbers: uniforms that are a pure function of (seed, epoch, index, stream, draw).

The batched data path draws every random parameter (crop boxes, colour decisions, masks) from a hash of
those numbers instead of an RNG stream, so a resumed run or another DDP shard draws the same values for
the same sample, on any device and in any batch, and no global RNG state is consumed. ``stream`` tells
apart what is drawn for one sample: view k of a policy is stream k, masks use ``MASK_STREAM`` onwards.

The same function is written twice: in torch for views made on a GPU (and under torch.compile), and in
numpy (``uniforms_numpy``) for the masks and for views made on the CPU, small arrays where numpy's per-call
cost is a tenth of torch's and its uint32 products wrap as the hash needs; tests/test_batched.py checks that
both return the same numbers.
"""
from __future__ import annotations

import numpy as np
import torch

_M32 = 0xFFFFFFFF
MASK_STREAM = 0x4D41534B  # masks' streams start here, far above any policy's view count


def _mul32(x: torch.Tensor, c: int) -> torch.Tensor:
    """(x * c) mod 2**32 for int64 x < 2**32, without overflowing int64 (16-bit limbs)."""
    return ((((x >> 16) * c) & 0xFFFF) << 16) + (x & 0xFFFF) * c & _M32


def _mix32(x: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finalizer: a bijection of [0, 2**32) with full avalanche."""
    x = x ^ (x >> 16)
    x = _mul32(x, 0x85EBCA6B)
    x = x ^ (x >> 13)
    x = _mul32(x, 0xC2B2AE35)
    return x ^ (x >> 16)


def _mix32_exact(x: int) -> int:
    """_mix32 on a Python int (the per-call prefix of the hash: no tensor, so no host-to-device copy)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def _mix32_uint32(x: np.ndarray) -> np.ndarray:
    """_mix32 on a numpy uint64 or uint32 array, in uint32 after the first shift (whose high input bits
    still count): products wrap modulo 2**32 as the hash needs, so no limbs and no masking."""
    x = (x ^ (x >> 16)).astype(np.uint32, copy=False)
    x = x * np.uint32(0x85EBCA6B)
    x = x ^ (x >> 13)
    x = x * np.uint32(0xC2B2AE35)
    return x ^ (x >> 16)


def stream_key(seed: int, epoch: int, stream: int) -> int:
    """The hash of (seed, epoch, stream): the per-call prefix of ``uniforms``."""
    h = _mix32_exact((seed & _M32) ^ 0x9E3779B9)
    for k in ((seed >> 32) & _M32, epoch & _M32, stream & _M32):
        h = _mix32_exact(h ^ k)
    return h


def uniforms(seed: int, epoch: int, index: torch.Tensor, stream: int, draws: int) -> torch.Tensor:
    """(B, draws) float64 uniforms in [0, 1) on ``index``'s device, a pure function of (seed, epoch, index,
    stream, draw)."""
    return uniforms_from_key(stream_key(seed, epoch, stream), index, draws)


def uniforms_from_key(key: int | torch.Tensor, index: torch.Tensor, draws: int) -> torch.Tensor:
    """``uniforms`` from its ``stream_key``: an int, or an int64 tensor on ``index``'s device, 0-d or one key
    per index (B,) (a compiled caller's input rather than a constant it would recompile for at every epoch).
    On the CPU the numpy copy computes them (uint32 products: half the time of torch's 16-bit limbs)."""
    if index.device.type == "cpu" and not torch.compiler.is_compiling():
        key = key.numpy() if isinstance(key, torch.Tensor) else key
        return torch.from_numpy(uniforms_numpy_from_key(key, index.numpy(), draws))
    return _uniforms_torch(key, index, draws)


def _uniforms_torch(key: int | torch.Tensor, index: torch.Tensor, draws: int) -> torch.Tensor:
    """``uniforms_from_key`` in torch ops, on any device and under torch.compile."""
    x = _mix32(index.long() ^ key)  # (B,)
    x = _mix32(x[:, None] ^ torch.arange(draws, device=index.device))  # (B, draws)
    x = _mix32(x ^ 0x68E31DA4)  # a second round, so neighbouring counters decorrelate fully
    return x.double() * 2.0**-32


def uniforms_numpy(seed: int, epoch: int, index: np.ndarray, stream: int, draws: int) -> np.ndarray:
    """``uniforms`` in numpy: the same (B, draws) float64 numbers, for CPU-side draws."""
    return uniforms_numpy_from_key(stream_key(seed, epoch, stream), index, draws)


def uniforms_numpy_from_key(key: int | np.ndarray, index: np.ndarray, draws: int) -> np.ndarray:
    """``uniforms_from_key`` in numpy: ``key`` an int or one key per index (B,)."""
    with np.errstate(over="ignore"):  # the products wrap by design
        x = _mix32_uint32(np.asarray(index).astype(np.uint64) ^ np.asarray(key).astype(np.uint64))  # (B,)
        x = _mix32_uint32(x[:, None] ^ np.arange(draws, dtype=np.uint32))  # (B, draws)
        x = _mix32_uint32(x ^ np.uint32(0x68E31DA4))
    return x * 2.0**-32
