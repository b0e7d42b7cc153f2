"""Data: reproducible per-sample augmentation and masks, resumable sampler, policies, data-set errors."""
import re

import numpy as np
import pytest
import torch

from ssl_bench.data.datasets import fixed_subset, load_dataset
from ssl_bench.data.pipeline import PretrainDataset, ResumableSampler
from ssl_bench.data.transforms import build_policy
from ssl_bench.errors import UserError
from ssl_bench.masking import BlockMaskGenerator


@pytest.fixture(scope="module")
def fashion():
    return load_dataset("fashion_mnist", None, "pretrain")


def test_fashion_mnist_is_the_real_data(fashion):
    ds, info = fashion
    image, label = ds[0]
    assert len(ds) == 60000 and image.shape == (1, 28, 28) and image.dtype == torch.uint8
    assert info.num_classes == 10 and sorted({ds[i][1] for i in range(200)}) == list(range(10))
    test, _ = load_dataset("fashion_mnist", None, "test")
    assert len(test) == 10000


def test_samples_depend_on_seed_epoch_index_only(fashion):
    ds, info = fashion
    policy = build_policy("simsiam", 28, 1, info.mean, info.std)
    data = PretrainDataset(ds, policy, BlockMaskGenerator(7, 0.5), seed=3)
    a = data[5]
    torch.manual_seed(999)  # the caller's RNG must neither matter nor be consumed
    state = torch.get_rng_state()
    b = data[5]
    assert torch.equal(torch.get_rng_state(), state)
    assert all(torch.equal(x, y) for x, y in zip(a["views"], b["views"])) and torch.equal(a["mask"], b["mask"])
    assert not torch.equal(a["views"][0], a["views"][1])  # two different augmentations of one image
    data.set_epoch(1)
    c = data[5]
    assert not torch.equal(a["views"][0], c["views"][0]) and not torch.equal(a["mask"], c["mask"])


def test_sampler_resumes_mid_epoch_and_shards():
    full = list(ResumableSampler(100, 8, seed=1))
    assert len(full) == 96 and len(set(full)) == 96
    resumed = ResumableSampler(100, 8, seed=1)
    resumed.set_epoch(0, start_step=5)
    assert list(resumed) == full[40:]
    ranks = [ResumableSampler(100, 8, seed=1, rank=r, world_size=2) for r in (0, 1)]
    shards = [list(s) for s in ranks]
    assert len(shards[0]) == len(shards[1]) == 48 and not set(shards[0]) & set(shards[1])
    other_epoch = ResumableSampler(100, 8, seed=1)
    other_epoch.set_epoch(1)
    assert list(other_epoch) != full


@pytest.mark.parametrize("policy,views", [("mim", 1), ("simsiam", 2), ("byol", 2)])
@pytest.mark.parametrize("chans", [1, 3])
def test_policies(policy, views, chans):
    img = torch.randint(0, 256, (chans, 40, 40), dtype=torch.uint8)
    out = build_policy(policy, 32, chans, (0.5,) * chans, (0.25,) * chans)(img)
    assert len(out) == views and all(v.shape == (chans, 32, 32) and v.dtype == torch.float32 for v in out)


def test_fixed_subset_is_shared_across_runs():
    a, b = fixed_subset(1000, 100), fixed_subset(1000, 100)
    assert np.array_equal(a, b) and len(set(a.tolist())) == 100
    assert fixed_subset(1000, None) is None and fixed_subset(10, 100) is None


@pytest.mark.parametrize("name,fragment", [
    ("cifar10", "CIFAR10 needs --data-root"),
    ("cifar100", "CIFAR100 needs --data-root"),
    ("stl10", "STL10 needs --data-root"),
    ("imagefolder", "imagefolder needs --data-root"),
    ("svhn", "unknown data set 'svhn'"),
])
def test_missing_data_sets_say_what_to_do(name, fragment, tmp_path):
    with pytest.raises(UserError, match=fragment):
        load_dataset(name, str(tmp_path / "missing"), "train")


def test_torchvision_format_missing_files(tmp_path):
    with pytest.raises(UserError, match="CIFAR10 not found or corrupt"):
        load_dataset("cifar10", str(tmp_path), "train")


def test_corrupt_idx_file_is_named(tmp_path):
    for stem in ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"):
        (tmp_path / f"{stem}.gz").write_bytes(b"not gzip at all")
    with pytest.raises(UserError, match="corrupt idx file .*train-images"):
        load_dataset("fashion_mnist", str(tmp_path), "train")


def test_synthetic_is_deterministic():
    ds, info = load_dataset("synthetic", None, "pretrain", img_size=32)
    assert torch.equal(ds[3][0], ds[3][0]) and ds[3][0].shape == (3, 32, 32) and info.num_classes == 10


def test_batched_path_draws_whole_batch_masks_in_process_on_cpu(fashion):
    """In-memory data: each batch's masks are the generator's batch draw for the batch's indices, made in
    the training process on a CPU device (a loader worker would take a core from the step), and a worker
    draws the same masks; a plug-in generator with only ``__call__`` still gets one mask per sample."""
    from torch.utils.data import DataLoader

    from ssl_bench.build import build_method
    from ssl_bench.data.pipeline import _MaskBatches, _WithEpoch, build_pretrain_loader, sample_mask
    from tests.conftest import smoke_config

    cfg = smoke_config("mae", "data.num_workers=1", "data.device_augment=true")
    spec = build_method(cfg, fashion[1]).data_spec()
    loader, sampler, *_ = build_pretrain_loader(cfg, spec, device="cpu")
    assert loader.loader.num_workers == 0
    first = next(iter(loader))
    index = torch.tensor(list(sampler)[: cfg["train"]["batch_size"]])
    assert torch.equal(first["mask"], spec.mask.batch(cfg["seed"], 0, index))

    blocks = BlockMaskGenerator(4, 0.5, exact=True)  # CAE's
    in_worker = DataLoader(_MaskBatches(1000, blocks, 3), sampler=_WithEpoch(sampler, 8), batch_size=None, num_workers=1)
    batch = next(iter(in_worker))
    assert torch.equal(batch["mask"], blocks.batch(3, batch["epoch"], batch["index"]))

    plug_in = lambda rng: blocks(rng)  # noqa: E731  (a callable, as a third-party generator may be)
    item = _MaskBatches(1000, plug_in, 3)[(2, [5, 9], 0)]
    assert torch.equal(item["mask"], torch.stack([sample_mask(plug_in, 3, 2, i) for i in (5, 9)]))


def test_batched_path_draws_several_batches_at_once_and_yields_the_same_batches(fashion):
    """The batched loader draws masks and views for several batches per item and yields one batch per step,
    each the batch drawn alone (masks, views, labels). Items begin every few batches from the epoch's start:
    a run resumed inside an item draws that whole item again and skips the batches already trained on."""
    import dataclasses

    from ssl_bench.build import build_method
    from ssl_bench.data.pipeline import build_pretrain_loader
    from tests.conftest import smoke_config

    cfg = smoke_config("mae", "data.device_augment=true", "data.subset=1024", "train.batch_size=128")
    spec = dataclasses.replace(build_method(cfg, fashion[1]).data_spec(), mask=BlockMaskGenerator(4, 0.4))  # BEiT's kind
    loader, sampler, *_ = build_pretrain_loader(cfg, spec, device="cpu")
    B, k, steps = cfg["train"]["batch_size"], loader.batches_per_item, sampler.steps_per_epoch
    assert 1 < k < steps and steps % k == 0
    order = torch.tensor(list(sampler))
    batches = list(loader)
    assert len(batches) == len(loader) == steps
    for i, batch in enumerate(batches):
        index = order[i * B:(i + 1) * B]
        assert torch.equal(batch["mask"], spec.mask.batch(cfg["seed"], 0, index))
        assert torch.equal(batch["views"][0], loader.views(index, 0)[0])
        assert torch.equal(batch["label"], loader.labels[index])

    resume = k + 1  # the second batch of the second item
    sampler.set_epoch(0, start_step=resume)
    items = list(loader.loader.sampler)
    assert [(len(indices) // B, skip) for _, indices, skip in items] == [(k, 1)] * 1 + [(k, 0)] * (steps // k - 2)
    assert items[0][1] == order[k * B:2 * k * B].tolist()  # the whole item, drawn again
    resumed = list(loader)
    assert len(resumed) == len(loader) == steps - resume
    for a, b in zip(resumed, batches[resume:], strict=True):
        assert torch.equal(a["mask"], b["mask"]) and torch.equal(a["views"][0], b["views"][0])


@pytest.mark.parametrize("images_shape, labels, named", [
    ((4, 5, 5), [0, 1, 2, 3], "images of shape (5, 5)"),
    ((4,), [0, 1, 2, 3], "images of shape ()"),
    ((4, 28, 28), [0, 1, 2, 200], "a train label of 200, past its 10 classes"),
])
def test_idx_files_of_another_shape_are_named(tmp_path, images_shape, labels, named):
    """Well-formed idx files that do not hold Fashion-MNIST (other sizes, a label file for images, labels past
    the classes) are one line, not an assertion or an index error at probe time."""
    import struct

    def idx(shape, values):
        return struct.pack(">HBB", 0, 8, len(shape)) + struct.pack(">" + "I" * len(shape), *shape) + bytes(values)

    (tmp_path / "train-images-idx3-ubyte").write_bytes(idx(images_shape, [0] * int(np.prod(images_shape))))
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(idx((len(labels),), labels))
    with pytest.raises(UserError, match=re.escape(named)):
        load_dataset("fashion_mnist", str(tmp_path), "train")
