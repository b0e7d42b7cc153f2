"""Batches for pretraining, reproducible from (seed, epoch, index) alone.

Every sample's augmentation and mask are drawn from RNGs seeded by (seed, epoch, index), and the
order of samples by (seed, epoch); so a run resumed at step k sees exactly the batches an
uninterrupted run sees, whatever the number of loader workers.
"""
from __future__ import annotations

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl_bench.data.cpu_views import FolderViews, NormalisedBatches
from ssl_bench.data.device_decode import DeviceFolderBatches, EncodedFiles, collate_encoded
from ssl_bench.data.datasets import ImageFileDataset, ImagePaths, fixed_subset, load_dataset
from ssl_bench.data.transforms import build_policy
from ssl_bench.data.views import resolve_policy
from ssl_bench.distributed import resolve_device
from ssl_bench.errors import UserError
from ssl_bench.method import DataSpec


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


class PretrainDataset(Dataset):
    """Wraps an (image, label) data set: returns {"views": [...], "mask": (N,) bool?, "label": int}."""

    def __init__(self, base: Dataset, transform, mask_generator=None, seed: int = 0, indices=None):
        self.base, self.transform, self.mask_generator = base, transform, mask_generator
        self.seed, self.epoch = seed, 0
        self.indices = indices

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)

    def __getitem__(self, idx: int) -> dict:
        image, label = self.base[int(self.indices[idx]) if self.indices is not None else idx]
        s = sample_seed(self.seed, self.epoch, idx)
        # fork_rng: torchvision draws from torch's global RNG; keep the caller's stream untouched.
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(s)
            views = self.transform(image)
        item = {"views": views, "label": label}
        if self.mask_generator is not None:
            item["mask"] = torch.from_numpy(self.mask_generator(np.random.default_rng(s)))
        return item


class ResumableSampler(Sampler[int]):
    """A seeded permutation per epoch, sharded over ranks, that can start at any batch.

    Each epoch yields ``steps_per_epoch * batch_size`` indices for this rank (the tail that does not
    fill a global batch is dropped, as with drop_last).
    """

    def __init__(self, num_samples: int, batch_size: int, seed: int = 0, rank: int = 0, world_size: int = 1):
        self.num_samples, self.batch_size = num_samples, batch_size
        self.seed, self.rank, self.world_size = seed, rank, world_size
        self.steps_per_epoch = num_samples // (batch_size * world_size)
        self.epoch, self.start_step = 0, 0

    def set_epoch(self, epoch: int, start_step: int = 0) -> None:
        self.epoch, self.start_step = epoch, start_step

    def __len__(self) -> int:
        return (self.steps_per_epoch - self.start_step) * self.batch_size

    def __iter__(self):
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        used = perm[: self.steps_per_epoch * self.batch_size * self.world_size]
        mine = used[self.rank :: self.world_size]
        return iter(mine[self.start_step * self.batch_size :].tolist())


def build_pretrain_loader(cfg: dict, spec: DataSpec, rank: int = 0, world_size: int = 1):
    """-> (DataLoader, ResumableSampler, PretrainDataset, DatasetInfo) for a resolved run config."""
    data = cfg["data"]
    base, info = load_dataset(data["name"], data["root"], "pretrain", img_size=data["img_size"])
    img_size = data["img_size"] or info.img_size
    on_device = isinstance(base, ImageFileDataset) and data.get("decode", "cpu") == "device"  # (runs from before the key: cpu)
    if isinstance(base, ImageFileDataset):  # files: read, decoded and augmented by the fast CPU path, or only read (device)
        folder_views = FolderViews(resolve_policy(spec.augmentation), img_size, info.in_chans, info.mean, info.std)
        base, transform = base.undecoded(), EncodedFiles(folder_views) if on_device else folder_views
    else:
        transform = build_policy(spec.augmentation, img_size, info.in_chans, info.mean, info.std)
    dataset = PretrainDataset(base, transform, spec.mask, seed=cfg["seed"], indices=fixed_subset(len(base), data["subset"]))
    batch = cfg["train"]["batch_size"]
    sampler = ResumableSampler(len(dataset), batch, seed=cfg["seed"], rank=rank, world_size=world_size)
    if sampler.steps_per_epoch == 0:
        raise UserError(
            f"data set has {len(dataset)} images, fewer than one global batch of {batch * world_size}; "
            f"lower train.batch_size or raise data.subset"
        )
    workers = data["num_workers"]
    loader = DataLoader(
        dataset, batch_size=batch, sampler=sampler, num_workers=workers, drop_last=True,
        pin_memory=torch.cuda.is_available(), persistent_workers=False,
        prefetch_factor=4 if workers > 0 else None,
        generator=torch.Generator(),  # workers' base seed must not consume the global RNG (exact resume)
        collate_fn=collate_encoded if on_device else None,
    )
    if isinstance(base, ImagePaths):  # folder views leave the workers as uint8 and are normalised on the device
        device = resolve_device(cfg["train"]["device"])
        loader = DeviceFolderBatches(loader, folder_views, device) if on_device else NormalisedBatches(loader, folder_views.normaliser(device))
    return loader, sampler, dataset, info
