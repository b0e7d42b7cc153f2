"""Mask generators: one boolean mask per sample, True = masked, exactly ``num_masked`` True each.

They run in the data pipeline with a per-sample numpy Generator, so masks are reproducible from
(seed, epoch, index) alone: exact resume needs no mask state.
"""
from __future__ import annotations

import math

import numpy as np
import torch


class RandomMaskGenerator:
    """MAE's uniform random masking: a random subset of patches, keeping int(N * (1 - ratio)) as MAE's code."""

    kind = "random"

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
    """BEiT/CAE block-wise masking.

    Repeatedly masks a rectangle of area s ~ U[min_block, remaining] and aspect ratio r (log-uniform
    in [min_aspect, 1/min_aspect]) at a random place, until ``num_masked`` patches are covered; then
    pads or trims at random so every sample masks exactly ``num_masked``. ``min_block`` is 16 patches
    on BEiT's 14x14 grid and scales with the grid's area here.
    """

    kind = "block"

    def __init__(self, grid_size: int, ratio: float, min_block: int | None = None, min_aspect: float = 0.3):
        if not 0.0 < ratio < 1.0:
            raise ValueError(f"mask ratio must be in (0, 1), got {ratio}")
        self.grid_size = grid_size
        self.num_patches = grid_size**2
        self.num_masked = int(round(ratio * self.num_patches))
        self.min_block = min_block or max(1, round(16 * self.num_patches / 196))
        self.log_aspect = (math.log(min_aspect), math.log(1 / min_aspect))

    def _add_block(self, mask: np.ndarray, budget: int, rng: np.random.Generator) -> int:
        g = self.grid_size
        for _ in range(10):
            area = rng.uniform(self.min_block, max(self.min_block, budget))
            aspect = math.exp(rng.uniform(*self.log_aspect))
            h = int(round(math.sqrt(area * aspect)))
            w = int(round(math.sqrt(area / aspect)))
            if 0 < h < g and 0 < w < g:
                top, left = rng.integers(0, g - h + 1), rng.integers(0, g - w + 1)
                block = mask[top : top + h, left : left + w]
                new = h * w - int(block.sum())
                if 0 < new <= budget:
                    block[...] = True
                    return new
        return 0

    def __call__(self, rng: np.random.Generator) -> np.ndarray:
        mask = np.zeros((self.grid_size, self.grid_size), dtype=bool)
        count = 0
        while count < self.num_masked:
            added = self._add_block(mask, self.num_masked - count, rng)
            if added == 0:
                break
            count += added
        flat = mask.reshape(-1)
        # Exact count: trim extra masked patches or pad with random unmasked ones.
        if count > self.num_masked:
            flat[rng.choice(np.flatnonzero(flat), count - self.num_masked, replace=False)] = False
        elif count < self.num_masked:
            flat[rng.choice(np.flatnonzero(~flat), self.num_masked - count, replace=False)] = True
        return flat


MASK_GENERATORS = {"random": RandomMaskGenerator, "block": BlockMaskGenerator}


def split_by_mask(mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From a boolean mask (B, N), every row with the same number of True, build index tensors:

    ids_keep (B, N_vis): visible patch indices, ascending;
    ids_masked (B, N_mask): masked patch indices, ascending;
    ids_restore (B, N): position of each patch in cat([visible, masked]) -- to unshuffle.
    """
    num_masked = mask.sum(dim=1)
    if not bool((num_masked == num_masked[0]).all()):
        raise ValueError("every sample must mask the same number of patches")
    n_mask = int(num_masked[0])
    ids_shuffle = torch.argsort(mask.to(torch.int8), dim=1, stable=True)  # visible first, then masked
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    n_vis = mask.shape[1] - n_mask
    return ids_shuffle[:, :n_vis], ids_shuffle[:, n_vis:], ids_restore
