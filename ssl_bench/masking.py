"""Mask generators: one boolean mask per sample, True = masked.

They run in the data pipeline with a per-sample numpy Generator, so masks are reproducible from
(seed, epoch, index) alone: exact resume needs no mask state.

``RandomMaskGenerator`` and ``BlockMaskGenerator(exact=True)`` mask the same number of patches in every
sample (``fixed_count`` True), which methods whose encoder sees only the visible patches need for
rectangular batches. ``BlockMaskGenerator(exact=False)`` (BEiT's) may mask fewer: the method then keeps
a boolean mask and never assumes a count per sample.
"""
from __future__ import annotations

import math

import numpy as np
import torch

BEIT_GRID_PATCHES = 196  # the 14x14 grid the official block-masking constants are set for
BEIT_MIN_BLOCK = 16  # min_num_patches of BEiT's and CAE's pretraining scripts at 14x14


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
        for _ in range(10):
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
