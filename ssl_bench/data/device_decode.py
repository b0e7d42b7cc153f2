"""The device path for image folders (``data.decode=device``): loader workers only read files; JPEGs are
decoded in batches on the training device and the views are made there.

    worker, per sample: read the bytes -> size from the header -> draw every view's parameters
                        (the CPU path's draws exactly: ``FolderViews.draws``, from (seed, epoch, index, view))
    device, per batch:  decode every JPEG at once (``torchvision.io.decode_jpeg``; on CUDA that is nvjpeg)
                        -> per view and sample: crop + bicubic antialiased resize (images differ in size),
                        colour jitter, grayscale, blur, solarize, flip with torchvision's ops on the device
                        -> normalise the batch

A file that is not a complete JPEG, or that the batched decoder rejects, is decoded on the CPU
(``cpu_views.decode``: OpenCV or Pillow), which names the file in one line if it cannot either.
Without a GPU the same code runs on the CPU, which is what the tests exercise; no GPU figure has been
measured yet. The augmentation after the crop still runs per sample (torchvision ops on device
tensors); moving it onto the batched ops of ``ssl_bench.data.batched`` is the next step.
"""
from __future__ import annotations

import torch
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms import InterpolationMode
from torchvision.transforms.v2 import functional as TF

from ssl_bench.data.cpu_views import FolderViews, ViewDraw, blur_kernel, decode, image_size, is_complete_jpeg, read_bytes
from ssl_bench.data.transforms import blur_kernel_size

_TV_JITTER = {"brightness": TF.adjust_brightness, "contrast": TF.adjust_contrast,
              "saturation": TF.adjust_saturation, "hue": TF.adjust_hue}


class EncodedFiles:
    """Per-sample transform of the device path, run in the loader workers: the file's bytes and its
    views' parameters, nothing decoded. ``(path, seed) -> {"path", "data" uint8 (n,), "draws"}``."""

    def __init__(self, views: FolderViews):
        self.views = views

    def __call__(self, path: str, seed: int | None = None) -> dict:
        data = read_bytes(path)
        width, height = image_size(data, path)
        seed = torch.initial_seed() if seed is None else seed  # the sample's seed, set by the pipeline
        return {"path": path, "data": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                "draws": self.views.draws(seed, width, height)}


def collate_encoded(items: list[dict]) -> dict:
    """Batch of PretrainDataset items whose "views" are EncodedFiles records: the records stay a list."""
    batch = {"views": [item["views"] for item in items], "label": torch.tensor([item["label"] for item in items])}
    if "mask" in items[0]:
        batch["mask"] = torch.stack([item["mask"] for item in items])
    return batch


def decode_batch(records: list[dict], in_chans: int, device: torch.device) -> list[torch.Tensor]:
    """Every record's image as uint8 (C, H, W) on ``device``: complete JPEGs in one batched call, the rest
    (and any file the batched call rejects) one by one, on the CPU when the device cannot."""
    mode = ImageReadMode.GRAY if in_chans == 1 else ImageReadMode.RGB
    images: list[torch.Tensor | None] = [None] * len(records)
    jpegs = [i for i, r in enumerate(records) if is_complete_jpeg(r["data"].numpy().tobytes())]
    if jpegs:
        try:
            for i, image in zip(jpegs, decode_jpeg([records[i]["data"] for i in jpegs], mode=mode, device=device)):
                images[i] = image
        except RuntimeError:  # one undecodable file fails the whole call: retry one by one below
            for i in jpegs:
                try:
                    images[i] = decode_jpeg(records[i]["data"], mode=mode, device=device)
                except RuntimeError:
                    pass
    for i, image in enumerate(images):
        if image is None:
            array = decode(records[i]["data"].numpy().tobytes(), records[i]["path"], in_chans)  # names the file if unreadable
            image = torch.from_numpy(array)
            images[i] = (image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)).to(device)
    return images


def augment(image: torch.Tensor, draw: ViewDraw, size: int) -> torch.Tensor:
    """One view of one uint8 (C, H, W) image, with torchvision's ops, in the CPU path's order."""
    x = TF.resized_crop(image, draw.top, draw.left, draw.height, draw.width, [size, size], InterpolationMode.BICUBIC, antialias=True)
    for op, factor in draw.jitter:
        x = _TV_JITTER[op](x, factor)
    if draw.grayscale:
        x = TF.rgb_to_grayscale(x, num_output_channels=3)
    if draw.blur_sigma is not None:
        kernel = blur_kernel(draw.blur_sigma, blur_kernel_size(size))
        x = TF.gaussian_blur(x, [kernel, kernel], [draw.blur_sigma, draw.blur_sigma])
    if draw.solarize:
        x = TF.solarize(x, 128)
    if draw.flip:
        x = TF.horizontal_flip(x)
    return x


class DeviceFolderBatches:
    """Iterates a loader of EncodedFiles batches and yields training batches made on ``device``:
    {"views": [(B, C, size, size) float, ...], "label" (B,), "mask"?} all on ``device``."""

    def __init__(self, loader, views: FolderViews, device):
        self.loader, self.views, self.device = loader, views, torch.device(device)
        self.normalise = views.normaliser(self.device)

    def __len__(self) -> int:
        return len(self.loader)

    def make_views(self, records: list[dict]) -> list[torch.Tensor]:
        images = decode_batch(records, self.views.in_chans, self.device)
        out = []
        for k, size in enumerate(self.views.sizes):
            out.append(self.normalise(torch.stack([augment(image, r["draws"][k], size) for image, r in zip(images, records)])))
        return out

    def __iter__(self):
        for batch in self.loader:
            out = {"views": self.make_views(batch["views"]), "label": batch["label"].to(self.device, non_blocking=True)}
            if "mask" in batch:
                out["mask"] = batch["mask"].to(self.device, non_blocking=True)
            yield out


def device_rate(samples: list[tuple[str, int]], policy: str, img_size: int, batch_size: int, batches: int) -> float:
    """images/s of the device path on the current CUDA device (bytes read here, not in workers)."""
    import time

    from ssl_bench.data.views import resolve_policy

    views = FolderViews(resolve_policy(policy), img_size, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    encode, maker = EncodedFiles(views), DeviceFolderBatches(None, views, "cuda")
    groups = [[encode(samples[(b * batch_size + i) % len(samples)][0], b * batch_size + i) for i in range(batch_size)]
              for b in range(batches + 1)]
    maker.make_views(groups[0])  # warm-up: nvjpeg handles, kernels
    torch.cuda.synchronize()
    start = time.perf_counter()
    for records in groups[1:]:
        maker.make_views(records)
    torch.cuda.synchronize()
    return batches * batch_size / (time.perf_counter() - start)
