"""Statistics of a set of block masks, computed the same way for the official generators (measured
outside this repository) and for ours: masked count, connected regions and isolated masked patches."""
from __future__ import annotations

import numpy as np
from scipy import ndimage

STATS = ("count", "regions", "isolated")


def per_mask(mask: np.ndarray) -> dict[str, int]:
    """mask (g, g) bool -> masked count, 4-connected masked regions, masked patches with no masked 4-neighbour."""
    mask = mask.astype(bool)
    _, regions = ndimage.label(mask)  # default structure: 4-connectivity
    padded = np.pad(mask, 1)
    neighbours = padded[:-2, 1:-1].astype(int) + padded[2:, 1:-1] + padded[1:-1, :-2] + padded[1:-1, 2:]
    return {"count": int(mask.sum()), "regions": int(regions), "isolated": int((mask & (neighbours == 0)).sum())}


def summarize(masks, target: int) -> dict:
    """masks: iterable of (g, g) masks -> per statistic its mean and standard deviation over masks, the number
    of masks, and the share of masks with exactly ``target`` patches masked."""
    rows = [per_mask(m) for m in masks]
    out: dict = {"n": len(rows)}
    for key in STATS:
        values = np.array([r[key] for r in rows], dtype=np.float64)
        out[key] = {"mean": float(values.mean()), "std": float(values.std(ddof=1))}
    counts = np.array([r["count"] for r in rows])
    out["share_exact"] = float((counts == target).mean())
    out["count_min"] = int(counts.min())
    return out
