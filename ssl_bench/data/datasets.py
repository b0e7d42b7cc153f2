"""Data sets by name, read from local files only (nothing is ever downloaded).

Each loader returns a ``torch.utils.data.Dataset`` of ``(image, label)`` with the image a uint8
tensor (C, H, W), plus a :class:`DatasetInfo`.
"""
from __future__ import annotations

import gzip
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

from ssl_bench.errors import UserError, shown

FASHION_MNIST_ROOT = "/usr/share/datasets/fashion-mnist"


@dataclass(frozen=True)
class DatasetInfo:
    name: str
    num_classes: int
    img_size: int  # native (or nominal, for folders) side length
    in_chans: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


class TensorImageDataset(Dataset):
    """In-memory images (N, C, H, W) uint8 and labels (N,)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor):
        assert images.dtype == torch.uint8 and images.ndim == 4
        self.images, self.labels = images, labels

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        return self.images[idx], int(self.labels[idx])


def unreadable_image(path: str, exc: BaseException) -> UserError:
    return UserError(f"cannot read image {shown(path)}: {exc.__class__.__name__}; remove or replace the file")


class ImageFileDataset(Dataset):
    """(path, label) pairs decoded with PIL on access; a file that fails to decode is named."""

    def __init__(self, samples: list[tuple[str, int]], in_chans: int = 3):
        self.samples = samples
        self.mode = "L" if in_chans == 1 else "RGB"

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[torch.Tensor, int]:
        from PIL import Image, UnidentifiedImageError
        from torchvision.transforms.v2.functional import pil_to_tensor

        path, label = self.samples[idx]
        try:
            with Image.open(path) as img:
                img = img.convert(self.mode)
        except (OSError, UnidentifiedImageError, SyntaxError) as exc:
            raise unreadable_image(path, exc) from None
        return pil_to_tensor(img), label

    def undecoded(self) -> "ImagePaths":
        return ImagePaths(self.samples)


class ImagePaths(Dataset):
    """(path, label) pairs, not decoded: for transforms that read the file themselves."""

    def __init__(self, samples: list[tuple[str, int]]):
        self.samples = samples

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, idx: int) -> tuple[str, int]:
        return self.samples[idx]


class TransformedSubset(Dataset):
    """``base[indices[i]]`` through ``transform``: (transformed image, label). Probes and fine-tuning
    use it to take fixed train / held-out / test subsets of a data set."""

    def __init__(self, base: Dataset, indices, transform):
        self.base, self.indices, self.transform = base, np.asarray(indices), transform

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int):
        image, label = self.base[int(self.indices[i])]
        return self.transform(image), label


# -- Fashion-MNIST (idx files) ----------------------------------------------------------------
def _read_idx(path: Path) -> np.ndarray:
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as f:
            data = f.read()
        zero, dtype_code, ndim = struct.unpack(">HBB", data[:4])
        if zero != 0 or dtype_code != 0x08:
            raise ValueError("bad magic")
        shape = struct.unpack(">" + "I" * ndim, data[4 : 4 + 4 * ndim])
        return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(shape)
    except (OSError, EOFError, ValueError, struct.error) as exc:
        raise UserError(f"corrupt idx file {path} ({exc}); reinstall it with `apt-get install --reinstall dataset-fashion-mnist`") from None


def _find_idx(root: Path, stem: str) -> Path:
    for name in (f"{stem}.gz", stem):
        if (root / name).exists():
            return root / name
    raise UserError(
        f"Fashion-MNIST file {stem}[.gz] not found under {root}; install it with "
        f"`apt-get install dataset-fashion-mnist` or pass --data-root DIR holding the idx files"
    )


def fashion_mnist(root: str | None, split: str):
    root_path = Path(root or FASHION_MNIST_ROOT)
    if not root_path.is_dir():
        raise UserError(
            f"Fashion-MNIST not found at {root_path}; install it with `apt-get install dataset-fashion-mnist` "
            f"or pass --data-root DIR holding the idx files"
        )
    prefix = "train" if split == "train" else "t10k"
    images = _read_idx(_find_idx(root_path, f"{prefix}-images-idx3-ubyte"))
    labels = _read_idx(_find_idx(root_path, f"{prefix}-labels-idx1-ubyte"))
    if images.shape[1:] != (28, 28) or labels.ndim != 1:
        raise UserError(f"Fashion-MNIST under {root_path}: {prefix} images of shape {images.shape[1:]} and labels of {labels.ndim} "
                        f"dimension(s), not 28x28 images and a list of labels; reinstall the data")
    if len(images) != len(labels):
        raise UserError(f"Fashion-MNIST under {root_path}: {len(images)} images but {len(labels)} labels; reinstall the data")
    if labels.size and labels.max() >= 10:
        raise UserError(f"Fashion-MNIST under {root_path}: a {prefix} label of {labels.max()}, past its 10 classes; reinstall the data")
    ds = TensorImageDataset(torch.from_numpy(images.copy()).unsqueeze(1), torch.from_numpy(labels.astype(np.int64)))
    return ds, DatasetInfo("fashion_mnist", 10, 28, 1, (0.2860,), (0.3530,))


# -- torchvision's on-disk formats -----------------------------------------------------------
def _torchvision(cls_name: str, root: str | None, hint: str, **kwargs):
    import torchvision.datasets as tvd

    if root is None or not os.path.isdir(root):
        raise UserError(f"{cls_name} needs --data-root DIR holding {hint} (nothing is downloaded); got {root!r}")
    try:
        return getattr(tvd, cls_name)(root, download=False, **kwargs)
    except RuntimeError as exc:  # torchvision: "Dataset not found or corrupted..."
        raise UserError(f"{cls_name} not found or corrupt under {root} ({exc}); point --data-root at the folder holding {hint}") from None


def cifar(name: str, root: str | None, split: str):
    cls_name, classes = ("CIFAR10", 10) if name == "cifar10" else ("CIFAR100", 100)
    folder = "cifar-10-batches-py" if classes == 10 else "cifar-100-python"
    ds = _torchvision(cls_name, root, f"the extracted '{folder}' folder", train=split == "train")
    images = torch.from_numpy(ds.data).permute(0, 3, 1, 2).contiguous()
    info = DatasetInfo(name, classes, 32, 3, (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616))
    return TensorImageDataset(images, torch.as_tensor(ds.targets)), info


def stl10(root: str | None, split: str):
    # Pretraining uses train+unlabeled (labels -1 for unlabeled); evaluation train / test.
    tv_split = {"pretrain": "train+unlabeled", "train": "train", "test": "test"}[split]
    ds = _torchvision("STL10", root, "the extracted 'stl10_binary' folder", split=tv_split)
    info = DatasetInfo("stl10", 10, 96, 3, (0.4467, 0.4398, 0.4066), (0.2603, 0.2566, 0.2713))
    return TensorImageDataset(torch.from_numpy(ds.data), torch.from_numpy(ds.labels.astype(np.int64))), info


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


def imagefolder(root: str | None, split: str):
    """``root/train/<class>/<image>`` and ``root/val/<class>/<image>`` (ImageNet's layout; ``test/`` for ``val/``),
    or ``root/<class>/<image>`` for pretraining alone. Labels follow the training classes' sorted names in every
    split; the test split must be its own folder, never the training images."""
    if root is None or not os.path.isdir(root):
        raise UserError(f"imagefolder needs --data-root DIR with one sub-folder per class; got {root!r}")
    base = Path(root)
    train = base / "train" if (base / "train").is_dir() else base
    classes = sorted(d.name for d in train.iterdir() if d.is_dir() and not (train is base and d.name in ("val", "test")))
    if not classes:
        raise UserError(f"no class sub-folders found under {train}; expected {root}/train/<class>/<image> or {root}/<class>/<image>")
    folder = train
    if split == "test":
        folder = next((base / d for d in ("val", "test") if (base / d).is_dir()), None)
        if folder is None:
            raise UserError(f"{root} has no val/ (or test/) folder: evaluation needs held-out images the encoder never trained on; "
                            f"add {root}/val/<class>/<image> beside {root}/train/")
        unknown = sorted(d.name for d in folder.iterdir() if d.is_dir() and d.name not in classes)
        if unknown:
            raise UserError(f"{folder} has classes the training images lack ({', '.join(unknown[:3])}); "
                            f"give val/ the class folders of {train}")
    samples = [
        (str(p), label)
        for label, cls in enumerate(classes)
        if (folder / cls).is_dir()
        for p in sorted((folder / cls).rglob("*"))
        if p.suffix.lower() in IMAGE_EXTENSIONS and p.is_file()  # (a FIFO or socket would block a reader)
    ]
    if not samples:
        raise UserError(f"no images ({', '.join(IMAGE_EXTENSIONS)}) found under {folder}")
    info = DatasetInfo("imagefolder", len(classes), 224, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    return ImageFileDataset(samples), info


def synthetic(split: str, img_size: int | None = None, size: int = 20000, in_chans: int = 3):
    """Random images and labels, in memory, for throughput measurements (learns nothing). Large sides hold
    fewer images (at most 2**28 bytes, at least 2048 images): an epoch is then a few steps."""
    side = img_size or 224
    n = max(2048, min(size, 2**28 // (in_chans * side * side)))
    n = n if split != "test" else n // 5
    g = torch.Generator().manual_seed(0 if split != "test" else 1)
    images = torch.randint(0, 256, (n, in_chans, side, side), dtype=torch.uint8, generator=g)
    labels = torch.arange(n) % 10
    return TensorImageDataset(images, labels), DatasetInfo("synthetic", 10, side, in_chans, (0.5,) * in_chans, (0.29,) * in_chans)


DATASETS = ("fashion_mnist", "cifar10", "cifar100", "stl10", "imagefolder", "synthetic")


def load_dataset(name: str, root: str | None = None, split: str = "train", img_size: int | None = None):
    """split: "pretrain" (what SSL trains on), "train" (labelled train split) or "test"."""
    if name not in DATASETS:
        raise UserError(f"unknown data set '{name}'; known data sets: {', '.join(DATASETS)}")
    if split not in ("pretrain", "train", "test"):
        raise ValueError(split)
    if name == "fashion_mnist":
        return fashion_mnist(root, "test" if split == "test" else "train")
    if name in ("cifar10", "cifar100"):
        return cifar(name, root, "test" if split == "test" else "train")
    if name == "stl10":
        return stl10(root, split)
    if name == "imagefolder":
        return imagefolder(root, split)
    return synthetic(split, img_size)


def fixed_subset(n_total: int, n_subset: int | None, seed: int = 0) -> np.ndarray | None:
    """Indices of a random subset that is the same for every method and run seed (seed 0 by default)."""
    if n_subset is None or n_subset >= n_total:
        return None
    return np.sort(np.random.default_rng(seed).permutation(n_total)[:n_subset])
