"""Mask generators: one boolean mask per sample, True = masked.

Each generator draws a mask in two ways, both reproducible from (seed, epoch, index) alone, so exact
resume needs no mask state:

* ``gen(rng)``: one sample's mask from a numpy Generator seeded with the sample's seed, written as the
  official code is (the per-sample data paths: image folders, torchvision views);
* ``gen.batch(seed, epoch, index)``: a batch's masks (B, N) at once, in array ops (numpy, on the CPU,
  where the loader runs: a few hundred ops on arrays of a few thousand elements, a tenth of torch's cost
  per call), drawn from ``ssl_bench.counter_rng`` (the batched path for data sets held in memory). The
  same distribution, not the same masks: tests/reference/test_masking_reference.py checks both against
  the official generators' statistics.

``RandomMaskGenerator`` and ``BlockMaskGenerator(exact=True)`` mask the same number of patches in every
sample (``fixed_count`` True), which methods whose encoder sees only the visible patches need for
rectangular batches. ``BlockMaskGenerator(exact=False)`` (BEiT's) may mask fewer: the method then keeps
a boolean mask and never assumes a count per sample.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch

from ssl_bench.counter_rng import MASK_STREAM, uniforms_numpy

BEIT_GRID_PATCHES = 196  # the 14x14 grid the official block-masking constants are set for
BEIT_MIN_BLOCK = 16  # min_num_patches of BEiT's and CAE's pretraining scripts at 14x14
BLOCK_TRIES = 10  # rectangles tried per block before the block fails (the official ``_mask``)
ROUNDS_PER_DRAW = 8  # block rounds whose uniforms are drawn at once (``BlockMaskGenerator.batch``)


class RandomMaskGenerator:
    """MAE's uniform random masking: a random subset of patches, keeping int(N * (1 - ratio)) as MAE's code."""

    kind = "random"
    fixed_count = True

    def __init__(self, grid_size: int, ratio: float):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        self.grid_size = grid_size
        self.num_patches = grid_size**2
        self.num_masked = self.num_patches - int(self.num_patches * (1 - ratio))

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros(self.num_patches, dtype=bool)
        mask[rng.permutation(self.num_patches)[: self.num_masked]] = True
        return mask

    def batch(self, seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """(B, N) masks of the samples ``index``: the ``num_masked`` patches of lowest noise, as MAE's
        argsort of per-patch noise."""
        noise = uniforms_numpy(seed, epoch, index.numpy(), MASK_STREAM, self.num_patches)  # (B, N)
        rank = noise.argsort(axis=1, kind="stable").argsort(axis=1)  # (B, N): each patch's place in the noise order
        return torch.from_numpy(rank < self.num_masked)


class BlockMaskGenerator:
    """Block-wise masking of BEiT (``exact=False``) and CAE (``exact=True``), as in their official
    ``masking_generator.py`` (microsoft/unilm beit/, Atten4Vis/CAE furnace/).

    One block: up to 10 tries of a rectangle with area s = min_block + (remaining - min_block) * U(0, 1)
    (so between ``remaining`` and ``min_block`` when fewer than ``min_block`` patches remain), aspect
    ratio log-uniform in [min_aspect, 1/min_aspect], h = round(sqrt(s * aspect)), w = round(sqrt(s / aspect)),
    h and w smaller than the grid, at a uniformly random place; a try is kept only if it masks between 1 and
    ``remaining`` new patches, and the first kept try ends the block.

    * ``exact=False`` (BEiT): blocks are added while fewer than ``num_masked`` are masked; a block whose
      10 tries all fail ends the mask, which may then be short of the target (no padding).
    * ``exact=True`` (CAE): blocks are added until exactly ``num_masked`` patches are masked.

    ``num_masked = round(ratio * N)``. ``min_block`` defaults to the official 16 patches at 196 patches
    (14x14) and keeps that share of the grid on other grids (4 at 7x7): our choice for grids the official
    scripts do not use.
    """

    kind = "block"
    MAX_BLOCKS = 100_000  # exact=True: a guard against a loop that cannot finish (never reached in practice)

    def __init__(
        self, grid_size: int, ratio: float, min_block: int | None = None, min_aspect: float = 0.3, exact: bool = False
    ):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        self.grid_size = grid_size
        self.num_patches = grid_size**2
        self.num_masked = int(round(ratio * self.num_patches))
        self.min_block = min_block or max(1, round(BEIT_MIN_BLOCK * self.num_patches / BEIT_GRID_PATCHES))
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))
        self.exact = exact
        self.fixed_count = exact

    def _add_block(self, mask: np.ndarray, remaining: int, rng: np.random.Generator) -> int:
        """Mask one block in place (2-D ``mask``); returns the number of newly masked patches (0: none)."""
        g = self.grid_size
        for _ in range(BLOCK_TRIES):
            area = self.min_block + (remaining - self.min_block) * rng.random()
            aspect = math.exp(self.log_aspect[0] + (self.log_aspect[1] - self.log_aspect[0]) * rng.random())
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if h < g and w < g:
                top, left = int(rng.integers(0, g - h + 1)), int(rng.integers(0, g - w + 1))
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= remaining:
                    block[...] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.grid_size, self.grid_size), dtype=bool)
        count = 0
        for _ in range(self.MAX_BLOCKS):
            if count >= self.num_masked:
                return mask.reshape(-1)
            added = self._add_block(mask, self.num_masked - count, rng)
            if added == 0 and not self.exact:
                return mask.reshape(-1)  # BEiT: a block that cannot be placed ends the mask, short of the target
            count += added
        raise RuntimeError(f"block masking did not reach {self.num_masked} masked patches in {self.MAX_BLOCKS} blocks")

    def batch(self, seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
        """(B, N) masks of the samples ``index``: ``__call__``'s algorithm for the whole batch in step, one
        block per round. A round tries all 10 rectangles of every sample still taking blocks at once and keeps
        each sample's first valid one. Its draws are the sample's own (stream ``MASK_STREAM + 1 + round //
        ROUNDS_PER_DRAW``), so a sample's mask never depends on the rest of its batch. Samples that have
        finished (or, for BEiT, failed a block) leave the round's arrays; the loop ends when none is left.

        Masks and rectangles are bit sets (``_spans``): the patches a try would add are an AND and a
        popcount, and placing a block an OR, on a few words per sample."""
        g, index, (lo, hi) = self.grid_size, index.numpy(), self.log_aspect
        row_spans, col_spans = _spans(g)  # ((g+1)^2, words) each
        B = len(index)
        mask = np.zeros((B, row_spans.shape[-1]), dtype=np.uint64)  # (B, words)
        count = np.zeros(B, dtype=np.int64)
        active = np.arange(B)  # the samples still taking blocks
        for block in range(self.MAX_BLOCKS):
            active = active[count[active] < self.num_masked]
            if not len(active):
                return torch.from_numpy(_unpack(mask, self.num_patches))
            if block % ROUNDS_PER_DRAW == 0:  # one hash for several rounds: hashing is most of a round's ops
                stream = MASK_STREAM + 1 + block // ROUNDS_PER_DRAW
                drawn = uniforms_numpy(seed, epoch, index[active], stream, ROUNDS_PER_DRAW * 4 * BLOCK_TRIES)
                if len(active) < B:  # drawn for the samples still taking blocks only; rows by sample
                    draws = np.empty((B, drawn.shape[1]))
                    draws[active] = drawn
                else:
                    draws = drawn
                draws = draws.reshape(B, ROUNDS_PER_DRAW, BLOCK_TRIES, 4)
            u = draws[active, block % ROUNDS_PER_DRAW]  # (A, T, 4): area, aspect, top, left of each try
            remaining = (self.num_masked - count[active])[:, None]  # (A, 1)
            area = self.min_block + (remaining - self.min_block) * u[..., 0]  # (A, T)
            aspect = np.exp(lo + (hi - lo) * u[..., 1])
            h = np.rint(np.sqrt(area * aspect)).astype(np.int64)  # rint rounds half to even, as Python's round
            w = np.rint(np.sqrt(area / aspect)).astype(np.int64)
            fits = (h < g) & (w < g)
            h, w = h * fits, w * fits  # a try that leaves the grid becomes an empty one: it adds nothing, never valid
            top = np.floor(u[..., 2] * (g - h + 1)).astype(np.int64)  # uniform in [0, g - h]
            left = np.floor(u[..., 3] * (g - w + 1)).astype(np.int64)
            rect = row_spans[top * (g + 1) + top + h] & col_spans[left * (g + 1) + left + w]  # (A, T, words)
            new = h * w - np.bitwise_count(rect & mask[active, None]).sum(axis=-1, dtype=np.int64)  # (A, T): patches it adds
            valid = (new > 0) & (new <= remaining)
            first = valid.argmax(axis=1)  # the first valid try
            placed = valid[np.arange(len(active)), first]  # (A,): whether any try was valid
            took, first = active[placed], first[placed]
            mask[took] |= rect[placed, first]
            count[took] += new[placed, first]
            if not self.exact:
                active = took  # BEiT: a block that cannot be placed ends the mask
        raise RuntimeError(f"block masking did not reach {self.num_masked} masked patches in {self.MAX_BLOCKS} blocks")


@functools.lru_cache(maxsize=None)
def _spans(g: int) -> tuple[np.ndarray, np.ndarray]:
    """Bit sets of a g x g grid, ((g+1)^2, words) uint64 each: entry a (g+1) + b of the first holds the
    patches of rows a to b - 1, of the second those of columns a to b - 1 (a rectangle is one AND of the two).
    Patch n = y g + x is bit n % 64 of word n // 64."""
    n = np.arange(g * g)
    y, x = n // g, n % g
    a, b = np.arange(g + 1)[:, None, None], np.arange(g + 1)[None, :, None]  # (g+1, 1, 1), (1, g+1, 1)
    out = []
    for coord in (y, x):
        inside = (coord >= a) & (coord < b)  # (g+1, g+1, g g)
        words = np.zeros((g + 1, g + 1, -(-g * g // 64)), dtype=np.uint64)
        np.bitwise_or.at(words, (..., n // 64), inside.astype(np.uint64) << (n % 64).astype(np.uint64))
        words = words.reshape((g + 1) ** 2, -1)  # one flat index per span: cheaper to gather than two
        words.flags.writeable = False
        out.append(words)
    return tuple(out)


def _unpack(bits: np.ndarray, num_patches: int) -> np.ndarray:
    """(B, num_patches) bool from bit sets (B, words)."""
    n = np.arange(num_patches)
    return ((bits[:, n // 64] >> (n % 64).astype(np.uint64)) & np.uint64(1)).astype(bool)


MASK_GENERATORS = {"random": RandomMaskGenerator, "block": BlockMaskGenerator}


def split_by_mask(mask: torch.Tensor, num_masked: int | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From a boolean mask (B, N), every row with the same number of True, build index tensors:

    ids_keep (B, N_vis): visible patch indices, ascending;
    ids_masked (B, N_mask): masked patch indices, ascending;
    ids_restore (B, N): position of each patch in cat([visible, masked]) -- to unshuffle.

    ``num_masked``: the count a fixed-count generator guarantees. Given, nothing is read back from the
    device (on a GPU such a read stalls the CPU every step, and breaks a compiled graph); without it the
    count is read from ``mask`` and checked to be the same in every row.
    """
    if num_masked is None:
        counts = mask.sum(dim=1)
        if not bool((counts == counts[0]).all()):
            raise ValueError("every sample must mask the same number of patches")
        num_masked = int(counts[0])
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first, then masked
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    n_vis = mask.shape[1] - num_masked
    return ids_shuffle[:, :n_vis], ids_shuffle[:, n_vis:], ids_restore
