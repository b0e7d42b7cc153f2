"""Our block masks against the official generators' distribution (tests/reference/mask_stats_official.json,
measured by running microsoft/unilm's and Atten4Vis/CAE's masking_generator.py outside this repository).

Each statistic must lie within 4 standard errors of the official one (the errors of both samples combined),
for both ways our generators draw: per sample (numpy) and a whole batch at once (torch, ``batch``).
The old generator, which fixed blocks at 16 patches and padded with isolated random patches, fails this at
once: it gave 0.5-0.75 isolated masked patches per mask against the official 0.04-0.06.
"""
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from ssl_bench.masking import BlockMaskGenerator
from tests.reference.mask_stats import STATS, summarize

OFFICIAL = json.loads((Path(__file__).parent / "mask_stats_official.json").read_text())["stats"]
N_OURS = 2000
Z = 4.0

# name -> (grid, mask ratio, exact count): BEiT's 75 of 196, CAE's half, as the methods build them
CASES = {
    "beit_14x14": (14, 75 / 196, False),
    "beit_7x7": (7, 75 / 196, False),
    "cae_14x14": (14, 0.5, True),
    "cae_7x7": (7, 0.5, True),
}


def _close(ours_mean, ours_sd, ref_mean, ref_sd, n_ref) -> tuple[bool, float]:
    se = math.sqrt(ours_sd**2 / N_OURS + ref_sd**2 / n_ref)
    return abs(ours_mean - ref_mean) <= Z * se + 1e-12, se


def _masks(gen: BlockMaskGenerator, how: str):
    """N_OURS masks (g, g): per sample from a numpy Generator, or one batch from the counter-based draws."""
    g = gen.grid_size
    if how == "per-sample":
        rng = np.random.default_rng(0)
        return (gen(rng).reshape(g, g) for _ in range(N_OURS))
    return gen.batch(0, 0, torch.arange(N_OURS)).reshape(N_OURS, g, g).numpy()


@pytest.mark.parametrize("how", ["per-sample", "batched"])
@pytest.mark.parametrize("name", CASES)
def test_block_masks_match_official_distribution(name, how):
    grid, ratio, exact = CASES[name]
    ref = OFFICIAL[name]
    gen = BlockMaskGenerator(grid, ratio, exact=exact)
    assert (gen.num_masked, gen.min_block) == (ref["num_masked"], ref["min_block"])  # same settings as measured
    ours = summarize(_masks(gen, how), gen.num_masked)
    for key in STATS:
        ok, se = _close(ours[key]["mean"], ours[key]["std"], ref[key]["mean"], ref[key]["std"], ref["n"])
        assert ok, f"{name} {key}: ours {ours[key]['mean']:.4f} vs official {ref[key]['mean']:.4f} (4 SE = {Z * se:.4f})"
    p, q = ours["share_exact"], ref["share_exact"]
    se = math.sqrt(p * (1 - p) / N_OURS + q * (1 - q) / ref["n"])
    assert abs(p - q) <= Z * se + 1e-12, f"{name} share of masks at the target: ours {p:.4f} vs official {q:.4f}"
    # CAE always masks exactly the target; BEiT sometimes ends short of it (no padding)
    assert (ours["count_min"] == gen.num_masked) == exact
