import numpy as np
import pytest
import torch

from ssl_bench.counter_rng import MASK_STREAM, uniforms_numpy
from ssl_bench.masking import BLOCK_TRIES, ROUNDS_PER_DRAW, BlockMaskGenerator, RandomMaskGenerator, split_by_mask


@pytest.mark.parametrize("grid,ratio,num_masked", [(14, 0.75, 147), (7, 0.75, 37), (4, 0.5, 8), (8, 0.6, 39)])
def test_random_mask_exact_count(grid, ratio, num_masked):
    # MAE's code keeps int(N * (1 - ratio)) patches: at 8x8 and 0.6 that masks 39, where round(0.6 * 64) = 38
    gen = RandomMaskGenerator(grid, ratio)
    rng = np.random.default_rng(0)
    masks = np.stack([gen(rng) for _ in range(200)])
    assert (masks.sum(1) == num_masked).all()
    # every position gets masked sometimes: the subset is random, not fixed
    assert masks.any(0).all() and not masks.all(0).any()


@pytest.mark.parametrize("grid,ratio,exact", [(14, 0.4, False), (14, 0.5, True), (7, 0.5, True), (8, 0.4, False)])
def test_block_mask_count_and_blocky(grid, ratio, exact):
    gen = BlockMaskGenerator(grid, ratio, exact=exact)
    assert gen.fixed_count == exact
    rng = np.random.default_rng(0)
    masks = np.stack([gen(rng) for _ in range(200)])
    target = round(ratio * grid * grid)
    if exact:  # CAE: exactly the target in every sample
        assert (masks.sum(1) == target).all()
    else:  # BEiT: never more than the target, sometimes fewer (a block that does not fit ends the mask)
        assert (masks.sum(1) <= target).all() and (masks.sum(1) < target).any() and (masks.sum(1) == target).mean() > 0.5
    # block-wise: masked patches have many masked 4-neighbours, far more than uniform random masking gives
    def neighbour_share(m):
        m = m.reshape(grid, grid)
        right = (m[:, 1:] & m[:, :-1]).sum()
        down = (m[1:, :] & m[:-1, :]).sum()
        return 2 * (right + down) / max(1, m.sum())
    rand = RandomMaskGenerator(grid, ratio)
    block_score = np.mean([neighbour_share(m) for m in masks])
    random_score = np.mean([neighbour_share(rand(rng)) for _ in range(200)])
    assert block_score > random_score + 0.4


def test_split_by_mask_round_trip():
    gen = RandomMaskGenerator(7, 0.75)
    rng = np.random.default_rng(1)
    mask = torch.from_numpy(np.stack([gen(rng) for _ in range(5)]))
    keep, masked, restore = split_by_mask(mask)
    assert keep.shape == (5, 12) and masked.shape == (5, 37)
    assert not mask.gather(1, keep).any() and mask.gather(1, masked).all()
    order = torch.cat([keep, masked], 1)
    assert torch.equal(order.gather(1, restore), torch.arange(49).expand(5, -1))


def test_split_by_mask_rejects_ragged_masks():
    mask = torch.zeros(2, 4, dtype=torch.bool)
    mask[0, 0] = True
    with pytest.raises(ValueError):
        split_by_mask(mask)


def test_split_by_mask_with_the_generators_count_reads_nothing_back(monkeypatch):
    """With the count a fixed-count generator guarantees, the split never reads the mask back to the host
    (a stall per step on a GPU, and a graph break under torch.compile), and equals the checked split."""
    gen = RandomMaskGenerator(grid_size=4, ratio=0.75)
    rng = np.random.default_rng(0)
    mask = torch.from_numpy(np.stack([gen(rng) for _ in range(5)]))
    checked = split_by_mask(mask)

    def read_back(*args, **kwargs):
        raise AssertionError("read back to the host")

    for name in ("__bool__", "__int__", "__index__", "item", "tolist"):
        monkeypatch.setattr(torch.Tensor, name, read_back)
    given = split_by_mask(mask, gen.num_masked)
    monkeypatch.undo()
    assert all(torch.equal(a, b) for a, b in zip(checked, given))
    assert given[1].shape == (5, gen.num_masked)


# -- batched draws (the in-memory data path): same semantics, a function of (seed, epoch, index) ----------
GENERATORS = {
    "random": lambda: RandomMaskGenerator(4, 0.75),
    "block-beit": lambda: BlockMaskGenerator(7, 75 / 196),
    "block-cae": lambda: BlockMaskGenerator(7, 0.5, exact=True),
}


@pytest.mark.parametrize("name", GENERATORS)
def test_batched_masks_are_each_samples_own_draw(name):
    """A sample's mask depends on (seed, epoch, index) only: not on its batch, its place in it, or the
    other samples (so resume and DDP shards draw the same masks); another epoch or seed draws anew."""
    gen = GENERATORS[name]()
    index = torch.arange(64)
    whole = gen.batch(3, 1, index)
    assert whole.shape == (64, gen.num_patches) and whole.dtype == torch.bool
    assert torch.equal(whole[40:], gen.batch(3, 1, index[40:]))
    shuffled = torch.randperm(64, generator=torch.Generator().manual_seed(0))
    assert torch.equal(whole[shuffled], gen.batch(3, 1, shuffled))
    assert not torch.equal(whole, gen.batch(3, 2, index)) and not torch.equal(whole, gen.batch(4, 1, index))
    assert (whole != whole[:1]).any(dim=1).float().mean() > 0.9  # the samples' masks differ


def test_batched_random_masks_are_uniform_subsets_of_the_count():
    gen = RandomMaskGenerator(4, 0.75)
    masks = gen.batch(0, 0, torch.arange(4000))
    assert (masks.sum(1) == gen.num_masked).all()
    # each of the 16 positions is masked with probability 12/16 (4 standard errors: 0.027)
    assert (masks.float().mean(0) - 0.75).abs().max() < 0.03


@pytest.mark.parametrize("grid,ratio,exact", [(7, 75 / 196, False), (7, 0.5, True), (4, 0.5, True)])
def test_batched_block_masks_keep_the_count_rules(grid, ratio, exact):
    gen = BlockMaskGenerator(grid, ratio, exact=exact)
    counts = gen.batch(0, 0, torch.arange(1000)).sum(1)
    if exact:  # CAE: exactly the target in every sample
        assert (counts == gen.num_masked).all()
    else:  # BEiT: never above the target, sometimes below (a block that fails ends the mask)
        assert (counts <= gen.num_masked).all() and (counts < gen.num_masked).any()


def _block_masks_one_by_one(gen: BlockMaskGenerator, seed: int, epoch: int, index: torch.Tensor) -> torch.Tensor:
    """``batch``'s masks made sample by sample with the official loop (``_add_block``'s), reading each
    try's four uniforms from the sample's own draws of its round."""
    g, (lo, hi), out = gen.grid_size, gen.log_aspect, []
    for i in index.tolist():
        mask, count = np.zeros((g, g), dtype=bool), 0
        for block in range(1000):
            if count >= gen.num_masked:
                break
            u = uniforms_numpy(seed, epoch, np.array([i]), MASK_STREAM + 1 + block // ROUNDS_PER_DRAW, ROUNDS_PER_DRAW * 4 * BLOCK_TRIES)
            tries, remaining, added = u.reshape(ROUNDS_PER_DRAW, BLOCK_TRIES, 4)[block % ROUNDS_PER_DRAW], gen.num_masked - count, 0
            for ua, ur, ut, ul in tries:
                area = gen.min_block + (remaining - gen.min_block) * ua
                aspect = np.exp(lo + (hi - lo) * ur)
                h, w = int(np.rint(np.sqrt(area * aspect))), int(np.rint(np.sqrt(area / aspect)))
                if h < g and w < g:
                    top, left = int(ut * (g - h + 1)), int(ul * (g - w + 1))
                    new = h * w - int(mask[top:top + h, left:left + w].sum())
                    if 0 < new <= remaining:
                        mask[top:top + h, left:left + w], added = True, new
                        break
            if added == 0 and not gen.exact:
                break
            count += added
        out.append(torch.from_numpy(mask.reshape(-1)))
    return torch.stack(out)


@pytest.mark.parametrize("grid,ratio,exact,min_block", [(7, 75 / 196, False, None), (7, 0.5, True, None), (5, 0.6, True, 1), (14, 0.4, False, None)])
def test_batched_block_masks_are_the_official_loop_on_the_same_draws(grid, ratio, exact, min_block):
    gen = BlockMaskGenerator(grid, ratio, min_block=min_block, exact=exact)
    index = torch.arange(100, 300)
    assert torch.equal(gen.batch(5, 2, index), _block_masks_one_by_one(gen, 5, 2, index))
