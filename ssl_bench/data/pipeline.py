"""Batches for pretraining, reproducible from (seed, epoch, index) alone.

Every sample's augmentation and mask are functions of (seed, epoch, index), and the order of samples
of (seed, epoch); so a run resumed at step k sees exactly the batches an uninterrupted run sees, whatever
the number of loader workers. Two paths make the views:

* data sets held in memory (``data.device_augment=true``, the default): the uint8 images sit on the
  training device and each batch's views are made there in batched ops (``ssl_bench.data.batched``);
  a light loader only draws the masks (several batches at a time, on the CPU);
* image folders: per sample on the CPU (``ssl_bench.data.cpu_views``), in persistent loader workers, or
  (``data.decode=device``) only read there, then decoded and augmented in batches on the device
  (``ssl_bench.data.device_decode``);
  in-memory data with ``data.device_augment=false``: per sample with torchvision (``ssl_bench.data.transforms``).

The sampler hands each worker ``(epoch, index)``, so persistent workers need no epoch state.
"""
from __future__ import annotations

import os

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler

from ssl_bench.data.batched import BatchedViews, to_device
from ssl_bench.data.cpu_views import FolderViews, NormalisedBatches
from ssl_bench.data.device_decode import DeviceFolderBatches, EncodedFiles, collate_encoded, jpeg_decoder
from ssl_bench.data.datasets import ImageFileDataset, ImagePaths, TensorImageDataset, fixed_subset, load_dataset
from ssl_bench.data.transforms import build_policy
from ssl_bench.data.views import resolve_policy
from ssl_bench.distributed import resolve_device
from ssl_bench.errors import UserError
from ssl_bench.runtime import use_compile
from ssl_bench.method import DataSpec


MASK_DRAW_SAMPLES = 512  # the batched path draws masks for at least this many samples at a time


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return int(np.random.SeedSequence([seed, epoch, index]).generate_state(1, dtype=np.uint64)[0] >> 1)


def sample_mask(mask_generator, seed: int, epoch: int, index: int) -> torch.Tensor:
    return torch.from_numpy(mask_generator(np.random.default_rng(sample_seed(seed, epoch, index))))


class PretrainDataset(Dataset):
    """Wraps an (image, label) data set: returns {"views": [...], "mask": (N,) bool?, "label": int}.

    Indexed by ``index`` (at the epoch of ``set_epoch``) or by ``(epoch, index)``.
    """

    def __init__(self, base: Dataset, transform, mask_generator=None, seed: int = 0, indices=None):
        self.base, self.transform, self.mask_generator = base, transform, mask_generator
        self.seed, self.epoch = seed, 0
        self.indices = indices

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __len__(self) -> int:
        return len(self.indices) if self.indices is not None else len(self.base)

    def __getitem__(self, key) -> dict:
        epoch, idx = key if isinstance(key, tuple) else (self.epoch, key)
        image, label = self.base[int(self.indices[idx]) if self.indices is not None else idx]
        s = sample_seed(self.seed, epoch, idx)
        if isinstance(self.transform, (FolderViews, EncodedFiles)):  # draw from the seed alone (saves ~0.1 ms a sample)
            views = self.transform(image, s)
        else:  # torchvision draws from torch's global RNG: seed it, keeping the caller's stream untouched
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                views = self.transform(image)
        item = {"views": views, "label": label}
        if self.mask_generator is not None:
            item["mask"] = sample_mask(self.mask_generator, self.seed, epoch, idx)
        return item


class _WithEpoch(Sampler):
    """Yields ``(epoch, index)`` from a ResumableSampler, or items ``(epoch, [indices], skip)`` of ``batches``
    whole batches of ``batch_size``. Items begin every ``batches`` batches from the epoch's start, whatever
    the step a run resumes at, so a resumed run draws the same items: the item that holds the resumed step is
    drawn whole and its first ``skip`` batches, already trained on, are skipped."""

    def __init__(self, sampler: "ResumableSampler", batch_size: int | None = None, batches: int = 1):
        self.sampler, self.batch_size, self.batches = sampler, batch_size, batches

    def __len__(self) -> int:
        if self.batch_size is None:
            return len(self.sampler)
        start = self.sampler.start_step
        return -(-(self.sampler.steps_per_epoch - (start - start % self.batches)) // self.batches)

    def __iter__(self):
        epoch = self.sampler.epoch
        if self.batch_size is None:
            return ((epoch, i) for i in self.sampler)
        b, k, start, steps = self.batch_size, self.batches, self.sampler.start_step, self.sampler.steps_per_epoch
        indices = self.sampler.epoch_indices()
        return ((epoch, indices[i * b:min(i + k, steps) * b], max(0, start - i)) for i in range(start - start % k, steps, k))


class _MaskBatches(Dataset):
    """``(epoch, [indices], skip)`` -> {"epoch", "skip", "index" (n,), "mask" (n, N) bool?}: all the CPU does per item
    on the batched path (an item: one or more batches). Masks are drawn for the whole item (the generator's
    ``batch``), or per sample for a plug-in's generator that has only ``__call__``."""

    def __init__(self, num_samples: int, mask_generator, seed: int):
        self.num_samples, self.mask_generator, self.seed = num_samples, mask_generator, seed

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, key) -> dict:
        epoch, indices, skip = key
        out = {"epoch": epoch, "skip": skip, "index": torch.tensor(indices, dtype=torch.long)}
        if hasattr(self.mask_generator, "batch"):
            out["mask"] = self.mask_generator.batch(self.seed, epoch, out["index"])
        elif self.mask_generator is not None:
            out["mask"] = torch.stack([sample_mask(self.mask_generator, self.seed, epoch, i) for i in indices])
        return out


class DeviceBatches:
    """Iterates a light (index, mask) loader, whose items may hold several batches, makes their views on the
    device and yields one batch at a time."""

    def __init__(self, loader: DataLoader, views: BatchedViews, labels: torch.Tensor, batch_size: int):
        self.loader, self.views, self.batch_size = loader, views, batch_size
        self.labels = labels.to(views.device)
        self.batches_per_item = loader.sampler.batches

    def __len__(self) -> int:
        return len(self.loader.sampler.sampler) // self.batch_size

    def __iter__(self):
        device = self.views.device
        for item in self.loader:
            item = {k: to_device(v, device) if isinstance(v, torch.Tensor) else v for k, v in item.items()}
            index, epoch = item["index"], item["epoch"]
            # eager views for the whole item at once: one set of a few hundred ops for several batches (on a CPU,
            # between quick BEiT steps, 2.0 -> 0.9 ms a batch in fours); compiled views one batch at a time, so
            # that they keep one shape
            views = None if self.views.compiled else self.views(index, epoch)
            for part in range(item["skip"] * self.batch_size, len(index), self.batch_size):
                rows = slice(part, part + self.batch_size)
                batch = {"views": [v[rows] for v in views] if views is not None else self.views(index[rows], epoch),
                         "label": self.labels.index_select(0, index[rows])}
                if "mask" in item:
                    batch["mask"] = item["mask"][rows]
                yield batch


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

    def epoch_indices(self) -> list[int]:
        """This rank's indices of the whole epoch, from its first step."""
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        perm = torch.randperm(self.num_samples, generator=g)
        used = perm[: self.steps_per_epoch * self.batch_size * self.world_size]
        return used[self.rank :: self.world_size].tolist()

    def __iter__(self):
        return iter(self.epoch_indices()[self.start_step * self.batch_size :])


def compile_views(cfg: dict, device: torch.device) -> bool:
    """Whether the batched views go through torch.compile: ``data.compile_views``, where auto (and runs
    from before the key) follows the step's ``train.compile``."""
    setting = cfg["data"].get("compile_views", "auto")
    return use_compile(cfg["train"]["compile"] if setting == "auto" else setting, cfg.get("preset"), device)


def loader_advice(cfg: dict, device: torch.device) -> str:
    """What to change when ``cfg``'s loader, not its step, sets a run's pace (one clause, for a note)."""
    data = cfg["data"]
    folder = data["name"] == "imagefolder"
    batched = not folder and data.get("device_augment", False)
    if batched:  # views made on the training device in batches: no workers to add
        return f"the views are already made in batches on {device.type}; data.compile_views=true compiles them"
    advice = f"raise data.num_workers (now {data['num_workers']}, {os.cpu_count()} cores here)"
    if folder and device.type == "cuda" and data.get("decode", "cpu") != "device":
        advice += ", or decode JPEGs on the GPU: data.decode=device"
    elif not folder:
        advice += ", or make the views in batches on the device: data.device_augment=true"
    return advice


def build_pretrain_loader(cfg: dict, spec: DataSpec, rank: int = 0, world_size: int = 1, device=None):
    """-> (loader, ResumableSampler, PretrainDataset, DatasetInfo) for a resolved run config.

    The loader yields {"views": [(B, C, size, size), ...], "mask"?, "label"}; on the batched path (an
    in-memory data set and ``data.device_augment``) its tensors are already on ``device``.
    """
    data = cfg["data"]
    base, info = load_dataset(data["name"], data["root"], "pretrain", img_size=data["img_size"])
    img_size = data["img_size"] or info.img_size
    policy = resolve_policy(spec.augmentation)
    indices = fixed_subset(len(base), data["subset"])
    on_device = isinstance(base, ImageFileDataset) and data.get("decode", "cpu") == "device"  # (runs from before the key: cpu)
    if on_device:
        jpeg_decoder()  # a torchvision without the batched decoder is one line before any work
    if isinstance(base, ImageFileDataset):  # files: read, decoded and augmented by the fast CPU path, or only read (device)
        folder_views = FolderViews(policy, img_size, info.in_chans, info.mean, info.std)
        base, transform = base.undecoded(), EncodedFiles(folder_views) if on_device else folder_views
    else:
        transform = build_policy(policy, img_size, info.in_chans, info.mean, info.std)
    dataset = PretrainDataset(base, transform, spec.mask, seed=cfg["seed"], indices=indices)
    batch = cfg["train"]["batch_size"]
    sampler = ResumableSampler(len(dataset), batch, seed=cfg["seed"], rank=rank, world_size=world_size)
    if sampler.steps_per_epoch == 0:
        raise UserError(
            f"data set has {len(dataset)} images, fewer than one global batch of {batch * world_size}; "
            f"lower train.batch_size or raise data.subset"
        )
    workers = data["num_workers"]
    common = dict(num_workers=workers, persistent_workers=workers > 0, prefetch_factor=4 if workers > 0 else None,
                  generator=torch.Generator())  # workers' base seed must not consume the global RNG (exact resume)
    # a run recorded before the batched path existed (no such key) keeps the per-sample path it started with
    if data.get("device_augment", False) and isinstance(base, TensorImageDataset):
        device = torch.device(device or "cpu")
        images, labels = base.images, base.labels
        if indices is not None:
            images, labels = images[torch.from_numpy(indices)], labels[torch.from_numpy(indices)]
        views = BatchedViews(images, policy, img_size, info.mean, info.std, seed=cfg["seed"], device=device,
                             compile=compile_views(cfg, device))
        # the light loader needs no workers without masks; nor on a CPU device, where batched masks (about 0.5 ms
        # a batch at the quick preset) cost less than a worker's copies, and a worker takes its core from the
        # step (with one, quick BEiT and CAE kept less of their step's speed, not more)
        if spec.mask is None or device.type == "cpu":
            common.update(num_workers=0, persistent_workers=False, prefetch_factor=None)
        # masks for at least MASK_DRAW_SAMPLES samples (whole batches) at a time: numpy's per-call cost, most of a
        # small batch's, is shared (block masks, 7x7: 0.71 ms a batch of 128 alone, 0.46 in fours)
        masks = DataLoader(_MaskBatches(len(dataset), spec.mask, cfg["seed"]), batch_size=None,
                           sampler=_WithEpoch(sampler, batch, max(1, MASK_DRAW_SAMPLES // batch)), **common)
        return DeviceBatches(masks, views, labels, batch), sampler, dataset, info
    # pinned batches copy to the GPU without a staging copy; the device path's file bytes go to the JPEG decoder,
    # which takes them from any host memory, so pinning them would only copy every file once more
    loader = DataLoader(
        dataset, batch_size=batch, sampler=_WithEpoch(sampler), drop_last=True,
        pin_memory=torch.cuda.is_available() and not on_device, collate_fn=collate_encoded if on_device else None, **common,
    )
    if isinstance(base, ImagePaths):  # folder views leave the workers as uint8 and are normalised on the device
        device = resolve_device(cfg["train"]["device"])
        loader = (DeviceFolderBatches(loader, folder_views, device, compile=compile_views(cfg, device)) if on_device
                  else NormalisedBatches(loader, folder_views.normaliser(device)))
    return loader, sampler, dataset, info
