"""Frozen-encoder features, extracted once per (checkpoint, data set, split) and shared by every probe.

Extraction: the encoder in eval mode under no_grad (bf16 autocast on GPU) on un-augmented images
(``eval_transform``); per image the cls token (D,), the mean of the patch tokens (D,) and the patch
tokens (N, D), all after the encoder's final norm.

Cache: ``<cache_dir>/<key>/{labels,cls,mean,patches}.npy`` (float16 features, int64 labels), read back as
memory maps. The key hashes the checkpoint file's bytes, the data set, the split and its image indices,
the image size and the normalization, so features of a changed checkpoint are never reused. Each file is
written under a temporary name and renamed when complete: a killed extraction leaves no half file.
cls / mean / labels are always cached (they are small and kNN needs them whole); patch tokens are cached
when they fit the budget (``features.cache_mb``), otherwise they are streamed: recomputed by the encoder
for each batch that needs them.

The official linear and attentive probes train on augmented images instead (``AugmentedImages``): each
batch is cropped and flipped anew (``evals.augment``) and encoded once, and that one forward feeds every
head of the grid. Cached features serve their held-out and test splits and the ``fast`` mode.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from ssl_bench.atomic import staged
from evals.augment import crop_and_flip, crop_params
from ssl_bench.backbone import ViTBackbone
from ssl_bench.data.datasets import TransformedSubset
from ssl_bench.runtime import autocast
from ssl_bench.errors import UserError
from ssl_bench.records import file_sha256, write_json_atomic  # noqa: F401 - file_sha256 is part of this module's API

KINDS = ("cls", "mean", "patches")
FORMAT_VERSION = 1


def cache_key(fields: dict) -> str:
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:24]


@torch.no_grad()
def encode(encoder: ViTBackbone, images: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    """(B, C, H, W) -> {"cls": (B, D), "mean": (B, D), "patches": (B, N, D)}, float32 on the CPU."""
    with autocast(device):
        cls, patches = encoder(images.to(device, non_blocking=True))
    patches = patches.float()
    return {"cls": cls.float().cpu(), "mean": patches.mean(dim=1).cpu(), "patches": patches.cpu()}


@dataclass
class Features:
    """The features of one split. ``arrays``: kind -> (n, D) or (n, N, D) float16 (memory-mapped when
    cached); a kind missing there comes from ``stream`` (batches of positions -> encoded kinds)."""

    labels: np.ndarray  # (n,) int64
    arrays: dict[str, np.ndarray]
    stream: Callable[[list[np.ndarray]], Iterator[dict[str, torch.Tensor]]] | None = None

    def __len__(self) -> int:
        return len(self.labels)

    def dim(self, kind: str) -> int:
        if kind in self.arrays:
            return self.arrays[kind].shape[-1]
        return self.arrays["cls"].shape[-1]  # patch tokens have the width of the cls token

    def tensor(self, kind: str) -> torch.Tensor:
        """The whole array of ``kind`` as float32 (cls / mean: small)."""
        return torch.from_numpy(np.asarray(self.arrays[kind], dtype=np.float32))

    def batches(self, kinds: Sequence[str], order: np.ndarray, batch_size: int, epoch: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """({kind: float32 (B, ...)}, labels (B,)) for consecutive chunks of the positions ``order``
        (the same features in every ``epoch``)."""
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        streamed = [k for k in kinds if k not in self.arrays]
        if streamed and self.stream is None:
            raise KeyError(f"features {streamed} were neither extracted nor streamable")
        computed = self.stream(chunks) if streamed else iter([{}] * len(chunks))
        for chunk, extra in zip(chunks, computed):
            batch = {k: torch.from_numpy(self.arrays[k][chunk].astype(np.float32)) for k in kinds if k in self.arrays}
            batch.update({k: extra[k] for k in streamed})
            yield batch, torch.from_numpy(self.labels[chunk])


@dataclass
class AugmentedImages:
    """A probe's training split seen through augmentation: the same ``batches`` interface as ``Features``,
    but every batch is cropped and flipped anew for its epoch and encoded by the frozen encoder, one forward
    per batch for all the kinds asked for. ``forwards`` counts those forwards."""

    images: Dataset  # (float (C, S, S) in [0, 1] at one common side S, label): the un-augmented view
    encoder_fn: Callable[[], ViTBackbone]
    img_size: int
    mean: Sequence[float]
    std: Sequence[float]
    seed: int
    device: torch.device = torch.device("cpu")
    num_workers: int = 0
    encoder_threads: int | None = None  # torch CPU threads for the forward (the heads may train on fewer)
    forwards: int = 0

    def __len__(self) -> int:
        return len(self.images)

    def dim(self, kind: str) -> int:
        return self.encoder_fn().embed_dim

    def batches(self, kinds: Sequence[str], order: np.ndarray, batch_size: int, epoch: int = 0) -> Iterator[tuple[dict[str, torch.Tensor], torch.Tensor]]:
        """({kind: float32 (B, ...)}, labels (B,)) for consecutive chunks of the positions ``order``, each
        image cropped and flipped as drawn for (seed, epoch, its position)."""
        params = crop_params(len(self), self.seed, epoch)  # (n, 5)
        chunks = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
        loader = DataLoader(self.images, batch_sampler=chunks, num_workers=self.num_workers, pin_memory=self.device.type == "cuda")
        mean = torch.tensor(self.mean, device=self.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=self.device).view(1, -1, 1, 1)
        encoder = self.encoder_fn()
        for chunk, (images, labels) in zip(chunks, loader):
            views = crop_and_flip(images.to(self.device, non_blocking=True).float(), params[chunk], self.img_size)  # (B, C, img, img)
            before = torch.get_num_threads()
            torch.set_num_threads(self.encoder_threads or before)
            try:
                feats = encode(encoder, (views - mean) / std, self.device)
            finally:
                torch.set_num_threads(before)
            self.forwards += 1
            yield {k: feats[k] for k in kinds}, labels


def load_features(
    *,
    cache_dir: str | Path,
    key_fields: dict,
    dataset: Dataset,
    indices: np.ndarray,
    transform,
    encoder_fn: Callable[[], ViTBackbone],
    kinds: Sequence[str] = ("cls", "mean"),
    cache_mb: float = 1024,
    batch_size: int = 256,
    num_workers: int = 0,
    device: torch.device = torch.device("cpu"),
) -> Features:
    """Features of ``dataset[indices]``: from the cache when there, else extracted (and cached).

    ``key_fields`` must name everything the features depend on besides the indices (checkpoint hash,
    data set, split, image size, normalization); ``encoder_fn`` is only called when something must be
    computed.
    """
    unknown = set(kinds) - set(KINDS)
    if unknown:
        raise ValueError(f"unknown feature kinds {sorted(unknown)}; known: {KINDS}")
    indices = np.asarray(indices, dtype=np.int64)
    fields = {**key_fields, "version": FORMAT_VERSION, "indices": hashlib.sha256(indices.tobytes()).hexdigest()}
    folder = Path(cache_dir) / cache_key(fields)
    path = {k: folder / f"{k}.npy" for k in ("labels", *KINDS)}
    images = TransformedSubset(dataset, indices, transform)

    def loader(batch_sampler=None) -> DataLoader:
        kw = {"batch_sampler": batch_sampler} if batch_sampler is not None else {"batch_size": batch_size, "shuffle": False}
        return DataLoader(images, num_workers=num_workers, pin_memory=device.type == "cuda", **kw)

    # Decide what to compute: the small kinds always, patch tokens only if asked for and within budget.
    todo = [k for k in ("labels", "cls", "mean") if not path[k].exists()]
    stream_patches = False
    if "patches" in kinds and not path["patches"].exists():
        encoder = encoder_fn()
        patch_bytes = len(indices) * encoder.num_patches * encoder.embed_dim * 2
        if patch_bytes <= cache_mb * 2**20:
            todo.append("patches")
        else:
            stream_patches = True
    if todo:
        _extract(encoder_fn(), loader(), len(indices), todo, path, device)
        write_json_atomic(folder / "meta.json", {**fields, "n": len(indices)})

    arrays = {k: _load_array(path[k], mmap=True) for k in KINDS if path[k].exists()}
    labels = _load_array(path["labels"])
    stream = None
    if stream_patches:
        def stream(chunks: list[np.ndarray]) -> Iterator[dict[str, torch.Tensor]]:
            encoder = encoder_fn()
            for batch, _ in loader(batch_sampler=chunks):
                yield encode(encoder, batch, device)
    return Features(labels, arrays, stream)


def _load_array(path: Path, mmap: bool = False) -> np.ndarray:
    """A cached .npy of numbers; a file holding pickled Python objects is refused, never unpickled."""
    try:
        return np.load(path, mmap_mode="r" if mmap else None, allow_pickle=False)
    except ValueError as exc:  # numpy's words for object arrays: "allow_pickle=False" / "Python objects in dtype"
        if "pickle" in str(exc) or "Python objects" in str(exc):
            raise UserError(f"feature cache file {path} refused: it holds pickled Python objects, which can run code when loaded; "
                            f"delete {path.parent} to extract the features again") from None
        raise UserError(f"feature cache file {path} is corrupt ({exc}); delete {path.parent} to extract the features again") from None


def _extract(encoder: ViTBackbone, loader: DataLoader, n: int, kinds: list[str], path: dict[str, Path], device: torch.device) -> None:
    """One pass of the frozen encoder over the images, filling a float16 .npy per kind."""
    encoder.eval()
    n_tok, dim = encoder.num_patches, encoder.embed_dim
    shapes = {"labels": (n,), "cls": (n, dim), "mean": (n, dim), "patches": (n, n_tok, dim)}
    with contextlib.ExitStack() as stack:  # each .npy is published atomically once all are complete
        tmp = {k: stack.enter_context(staged(path[k])).tmp for k in kinds}
        out = {
            k: np.lib.format.open_memmap(tmp[k], mode="w+", dtype=np.int64 if k == "labels" else np.float16, shape=shapes[k])
            for k in kinds
        }
        start = 0
        for images, labels in loader:
            feats = encode(encoder, images, device)
            feats["labels"] = labels
            stop = start + len(labels)
            for k in kinds:
                out[k][start:stop] = feats[k].numpy()
            start = stop
        assert start == n, (start, n)
        for k in kinds:
            out[k].flush()
            del out[k]
