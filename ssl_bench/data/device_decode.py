"""The device path for image folders (``data.decode=device``): loader workers only read files; JPEGs are
decoded in batches on the training device and the views are made there.

    worker, per sample: read the bytes -> size from the header -> draw every view's parameters
                        (the CPU path's draws exactly: ``FolderViews.draws``, from (seed, epoch, index, view))
                        -> whether the bytes are a complete JPEG
    device, per batch:  decode every JPEG at once (``torchvision.io.decode_jpeg``; on CUDA that is nvjpeg)
                        -> per output size, its views together: crop + bicubic antialiased resize
                           (``resized_crops``: on a GPU in batched products over the images padded to one
                           size, on a CPU crop by crop), into (views x B, C, size, size)
                        -> colour jitter, grayscale, blur, solarize, flip for the whole group at once, with
                           the in-memory path's batched ops (``batched.after_crop``) on the draws' parameters
                        -> normalise

A file that is not a complete JPEG, or that the batched decoder rejects, is decoded on the CPU
(``cpu_views.decode``: OpenCV or Pillow), which names the file in one line if it cannot either.
Without a GPU the same code runs on the CPU, which is what the tests exercise (a CUDA test checks the decoder
against memory still in use); GPU rates are in ``results/gpu/``.
"""
from __future__ import annotations

import contextlib
import queue
import threading

import numpy as np
import torch
import torch.nn.functional as F

from ssl_bench.data.batched import Decisions, _pick, after_crop, resample_matrix, to_device
from ssl_bench.data.cpu_views import JITTER_OPS, FolderViews, ViewDraw, decode, image_size, is_complete_jpeg, read_bytes
from ssl_bench.errors import UserError


def jpeg_decoder():
    """torchvision's batched JPEG decoder (nvjpeg on CUDA) and its colour modes, or a one-line error where this
    torchvision has none: torchvision deprecated its image decoders in 0.29 for TorchCodec's."""
    try:
        from torchvision.io import ImageReadMode, decode_jpeg
    except ImportError:
        import torchvision

        raise UserError(f"data.decode=device needs torchvision.io.decode_jpeg, which torchvision {torchvision.__version__} "
                        "no longer has; use data.decode=cpu, or a torchvision that has it (0.19 to 0.29 do)") from None
    return decode_jpeg, ImageReadMode


class EncodedFiles:
    """Per-sample transform of the device path, run in the loader workers: the file's bytes and its
    views' parameters, nothing decoded. ``(path, seed) -> {"path", "data" uint8 (n,), "draws", "jpeg"}``, where
    "jpeg" says whether the bytes are a complete JPEG (checked here, where they are bytes already)."""

    def __init__(self, views: FolderViews):
        self.views = views

    def __call__(self, path: str, seed: int | None = None) -> dict:
        data = read_bytes(path)
        width, height = image_size(data, path)
        seed = torch.initial_seed() if seed is None else seed  # the sample's seed, passed by the pipeline
        return {"path": path, "data": torch.frombuffer(bytearray(data), dtype=torch.uint8),
                "draws": self.views.draws(seed, width, height), "jpeg": is_complete_jpeg(data)}


def collate_encoded(items: list[dict]) -> dict:
    """Batch of PretrainDataset items whose "views" are EncodedFiles records: {"files": the files' bytes
    concatenated in one uint8 tensor, their sizes, paths, draws and JPEG checks; "label" (B,); "mask"?}. One tensor for all
    the bytes: a worker hands each tensor of a batch to the main process as its own shared-memory block."""
    records = [item["views"] for item in items]
    files = {"data": torch.cat([r["data"] for r in records]), "sizes": [len(r["data"]) for r in records],
             "paths": [r["path"] for r in records], "draws": [r["draws"] for r in records], "jpeg": [r["jpeg"] for r in records]}
    batch = {"files": files, "label": torch.tensor([item["label"] for item in items])}
    if "mask" in items[0]:
        batch["mask"] = torch.stack([item["mask"] for item in items])
    return batch


def split_files(files: dict) -> list[dict]:
    """A collated batch's files as EncodedFiles records again, each one's bytes a view of the shared tensor."""
    return [{"path": path, "data": data, "draws": draws, "jpeg": jpeg}
            for path, data, draws, jpeg in zip(files["paths"], files["data"].split(files["sizes"]), files["draws"], files["jpeg"])]


def decode_batch(records: list[dict], in_chans: int, device: torch.device) -> list[torch.Tensor]:
    """Every record's image as uint8 (C, H, W) on ``device``: complete JPEGs (``EncodedFiles``' "jpeg") in one
    batched call, the rest (and any file the batched call rejects) one by one, on the CPU when the device cannot."""
    decode_jpeg, modes = jpeg_decoder()
    mode = modes.GRAY if in_chans == 1 else modes.RGB
    images: list[torch.Tensor | None] = [None] * len(records)
    jpegs = [i for i, r in enumerate(records) if r["jpeg"]]
    if jpegs:
        with _decoder_stream(device) as keep:
            try:
                for i, image in zip(jpegs, decode_jpeg([records[i]["data"] for i in jpegs], mode=mode, device=device)):
                    images[i] = keep(image)
            except RuntimeError:  # one undecodable file fails the whole call: retry one by one below
                for i in jpegs:
                    try:
                        images[i] = keep(decode_jpeg(records[i]["data"], mode=mode, device=device))
                    except RuntimeError:
                        pass
    for i, image in enumerate(images):
        if image is None:
            array = decode(records[i]["data"].numpy().tobytes(), records[i]["path"], in_chans)  # names the file if unreadable
            image = torch.from_numpy(array)
            images[i] = (image.unsqueeze(0) if image.ndim == 2 else image.permute(2, 0, 1)).to(device)
    return images


@contextlib.contextmanager
def _decoder_stream(device: torch.device):
    """Where the CUDA decoder may write: a side stream's memory, never a block the training stream has freed
    while its queued kernels still read it. torchvision's nvJPEG decode writes its outputs without waiting for
    the caller's stream (pytorch/vision#9606: wrong numbers and NaNs in unrelated tensors; here a NaN loss at
    MoCo v3's second step from a JPEG folder on an H100). Outputs are allocated on the side stream, the training
    stream waits for them, and each is marked as used there, so its block is reused only after that use.
    Yields ``keep(image) -> image``; on a CPU device both are no-ops."""
    if device.type != "cuda":
        yield lambda image: image
        return
    current = torch.cuda.current_stream(device)
    if device not in _side_streams:
        _side_streams[device] = torch.cuda.Stream(device)
    side = _side_streams[device]  # (it need not wait for the training stream: the decoder's inputs are host bytes)

    def keep(image: torch.Tensor) -> torch.Tensor:
        image.record_stream(current)
        return image

    with torch.cuda.stream(side):
        yield keep
    current.wait_stream(side)


_side_streams: dict[torch.device, "torch.cuda.Stream"] = {}


# float32 elements of one resize chunk's padded images, times its views (1 GiB): bounds the batched resize's memory
PADDED_ELEMENTS = 2**28


def resized_crops(images: list[torch.Tensor], draws: list[ViewDraw], size: int, batched: bool = False) -> torch.Tensor:
    """Each draw's crop box of its image resized to ``size`` (torch's antialiased bicubic kernel): float
    (len(draws), C, size, size), 0..255, not yet flipped. ``draws`` hold one view after another, so row
    ``g * len(images) + i`` crops image ``i``.

    Images differ in size. Sample by sample (``batched=False``) that is two kernels a row, which a CPU
    computes cheapest; ``batched``, the images are padded to one size (``_padded``) in chunks of ``PADDED_ELEMENTS`` and
    resized as the in-memory path resizes, by two batched products with per-row resampling matrices that
    weigh only the crop's own pixels: a few dozen kernels a batch, whatever its size, for a GPU's launch queue."""
    if not batched:
        repeated = images * (len(draws) // len(images))
        return torch.cat([F.interpolate(image[None, :, d.top:d.top + d.height, d.left:d.left + d.width].float(),
                                        size=(size, size), mode="bicubic", antialias=True) for image, d in zip(repeated, draws)])
    n, channels, device = len(images), images[0].shape[0], images[0].device
    views = len(draws) // n
    boxes = torch.tensor([(d.top, d.height, d.left, d.width) for d in draws], dtype=torch.float32).view(views, n, 4)
    chunks = _resize_chunks([tuple(image.shape) for image in images], views)
    out = None if chunks == [list(range(n))] else torch.empty(views, n, channels, size, size, device=device)
    for chunk in chunks:
        source = _padded([images[i] for i in chunk]).float()  # (m, C, H, W): the chunk's largest height and width
        height, width = source.shape[-2:]
        box = to_device(boxes[:, chunk].reshape(-1, 4), device)  # (views m, 4)
        rows = resample_matrix(box[:, 0], box[:, 1], height, size).view(views, len(chunk), 1, size, height)
        cols = resample_matrix(box[:, 2], box[:, 3], width, size).view(views, len(chunk), 1, size, width)
        made = rows @ source @ cols.transpose(-1, -2)  # (views, m, C, size, size)
        if out is None:
            out = made
        else:
            out.index_copy_(1, to_device(torch.tensor(chunk), device), made)
    return out.view(views * n, channels, size, size)


def _resize_chunks(shapes: list[tuple[int, int, int]], views: int) -> list[list[int]]:
    """Indices of ``shapes`` (C, H, W) in chunks whose padded images, ``views`` times over, hold at most
    ``PADDED_ELEMENTS`` elements (one image alone may hold more); smallest areas first, so that one large
    photograph does not pad a whole batch to its size."""
    chunks: list[list[int]] = [[]]
    height = width = 0
    for i in sorted(range(len(shapes)), key=lambda i: shapes[i][1] * shapes[i][2]):
        c, h, w = shapes[i]
        if chunks[-1] and views * (len(chunks[-1]) + 1) * c * max(height, h) * max(width, w) > PADDED_ELEMENTS:
            chunks.append([])
            height = width = 0
        chunks[-1].append(i)
        height, width = max(height, h), max(width, w)
    return chunks


def _padded(images: list[torch.Tensor]) -> torch.Tensor:
    """(m, C, H, W) of images (C, h, w), H and W their largest h and w, in a few kernels whatever m. Beyond an
    image's own h rows and w columns the values are other pixels of the batch, not zeros: the resampling
    matrices weigh only a crop's own pixels, and any finite value times a zero weight adds exactly nothing."""
    if all(image.shape == images[0].shape for image in images):
        return torch.stack(images)
    channels = images[0].shape[0]
    heights, widths = np.array([image.shape[1] for image in images]), np.array([image.shape[2] for image in images])
    height, width = int(heights.max()), int(widths.max())
    # every image's pixels in one row of memory, then W more, so that a window of W starting at any pixel fits
    flat = torch.cat([image.reshape(-1) for image in images] + [images[0].new_zeros(width)])
    starts = np.concatenate([[0], np.cumsum(channels * heights * widths)[:-1]])  # (m,) where each image begins
    y = np.minimum(np.arange(height), heights[:, None] - 1)  # (m, H): rows past an image's height repeat its last
    rows = (starts[:, None, None] + np.arange(channels)[None, :, None] * (heights * widths)[:, None, None]
            + y[:, None, :] * widths[:, None, None])  # (m, C, H) where each padded row begins in ``flat``
    windows = flat.as_strided((flat.numel() - width + 1, width), (1, 1))  # window i: flat[i:i + W]
    return windows.index_select(0, to_device(torch.from_numpy(rows.reshape(-1)), flat.device)).view(len(images), channels, height, width)


def finish_views(x: torch.Tensor, flip: torch.Tensor, d: Decisions, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """Resized crops (B, C, size, size), 0..255 -> the views: colour jitter, grayscale, blur and solarize as
    ``d`` decides per sample, the flip where ``flip`` (B,) is 1, normalised with ``mean`` / ``std``."""
    x = after_crop(x.div(255.0).clamp_(0, 1), d)
    x = _pick(flip, x.flip(-1), x)  # the flip commutes with every op before it
    return (x - mean) / std


_IDENTITY = (1.0, 1.0, 1.0, 0.0)  # jitter factors that leave an image as it is


def draw_decisions(draws: list[ViewDraw], device: torch.device) -> tuple[Decisions, torch.Tensor]:
    """The batched ops' choices for the draws' rows and their flips (B,) 0.0/1.0, from each row's draw in one
    host-to-device copy; an operation that no row takes is left out."""
    rows = []
    for d in draws:
        applied = [JITTER_OPS.index(op) for op, _ in d.jitter]
        factors = list(_IDENTITY)
        for k, (_, factor) in zip(applied, d.jitter):
            factors[k] = factor
        order = applied + [k for k in range(4) if k not in applied]  # ops not drawn come after, as identities
        sigma = d.blur_sigma or 1.0
        rows.append([float(bool(d.jitter)), *factors, *order, float(d.grayscale), float(d.blur_sigma is not None), sigma,
                     float(d.solarize), float(d.flip)])
    host = torch.tensor(rows, dtype=torch.float64)  # (B, 14)
    taken, t = host.amax(dim=0).tolist(), to_device(host, device)
    used = lambda column: taken[column] > 0  # noqa: E731
    decisions = Decisions(
        jitter=t[:, 0] if used(0) else None, factors=t[:, 1:5] if used(0) else None, order=t[:, 5:9].long() if used(0) else None,
        grayscale=t[:, 9] if used(9) else None,  # (never drawn for 1-channel images)
        blur=t[:, 10] if used(10) else None, sigma=t[:, 11] if used(10) else None,
        solarize=t[:, 12] if used(12) else None,
    )
    return decisions, t[:, 13]


class DeviceFolderBatches:
    """Iterates a loader of EncodedFiles batches and yields training batches made on ``device``:
    {"views": [(B, C, size, size) float, ...], "label" (B,), "mask"?} all on ``device``.

    Views of one output size (MoCo v3's two, SimSiam's two, DINO's globals and its locals) are made as one
    batch of views x samples: every parameter comes with each row's draw, so only the size must be shared.
    ``compile``: the finishing stage (colour, blur, solarize, flip, normalise: a few hundred small kernels
    eagerly) through torch.compile. ``batched_resize`` (default: on CUDA): crops resized in batched products
    rather than sample by sample (``resized_crops``)."""

    def __init__(self, loader, views: FolderViews, device, compile: bool = False, batched_resize: bool | None = None):
        from ssl_bench.runtime import CompiledOrEager

        self.loader, self.views, self.device = loader, views, torch.device(device)
        by_size: dict[int, list[int]] = {}
        for k, size in enumerate(views.sizes):
            by_size.setdefault(size, []).append(k)
        self.groups = list(by_size.values())
        self.mean = torch.tensor(views.mean, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self.std = torch.tensor(views.std, dtype=torch.float32, device=self.device).view(1, -1, 1, 1)
        self._finish = CompiledOrEager(finish_views, what="making views", dynamic=False) if compile else finish_views
        self.batched_resize = self.device.type == "cuda" if batched_resize is None else batched_resize

    def __len__(self) -> int:
        return len(self.loader)

    def make_views(self, records: list[dict]) -> list[torch.Tensor]:
        images = decode_batch(records, self.views.in_chans, self.device)
        out: list[torch.Tensor | None] = [None] * len(self.views.sizes)
        for group in self.groups:
            draws = [r["draws"][k] for k in group for r in records]  # view after view
            x = resized_crops(images, draws, self.views.sizes[group[0]], self.batched_resize)
            decisions, flip = draw_decisions(draws, self.device)
            x = self._finish(x, flip, decisions, self.mean, self.std)
            for k, view in zip(group, x.chunk(len(group))):
                out[k] = view
        return out

    def __iter__(self):
        # on a GPU the next batch is made while the step runs: nvJPEG waits for its decode on the host
        return one_ahead(self._batches(), self.device) if self.device.type == "cuda" else self._batches()

    def _batches(self):
        for batch in self.loader:
            out = {"views": self.make_views(split_files(batch["files"])), "label": to_device(batch["label"], self.device)}
            if "mask" in batch:
                out["mask"] = to_device(batch["mask"], self.device)
            yield out


_END = object()


def one_ahead(batches, device: torch.device):
    """Yields ``batches``' items in order, each made by a thread while the caller uses the one before: the decoder
    and the view ops leave the GIL, so making a batch overlaps the training step's launches. On CUDA the thread
    works on its own stream; the caller's stream waits for each batch, and the batch's tensors are marked as used
    there. An exception in the thread is raised here, as it would have been; closing this generator stops it."""
    device = torch.device(device)
    ready: queue.Queue = queue.Queue(maxsize=1)
    stop = threading.Event()
    stream = torch.cuda.Stream(device) if device.type == "cuda" else None

    def put(item) -> bool:
        while not stop.is_set():
            try:
                ready.put(item, timeout=0.1)
                return True
            except queue.Full:
                pass
        return False

    def work() -> None:
        try:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for batch in batches:
                    event = torch.cuda.Event() if stream is not None else None
                    if event is not None:
                        event.record(stream)
                    if not put((batch, event, None)):
                        return
        except BaseException as exc:  # noqa: BLE001 - handed to the caller
            put((None, None, exc))
            return
        finally:
            batches.close()  # a stopped one's loader workers end with it
        put((_END, None, None))

    thread = threading.Thread(target=work, name="device-folder-batches", daemon=True)
    thread.start()
    try:
        while True:
            batch, event, exc = ready.get()
            if exc is not None:
                raise exc
            if batch is _END:
                return
            if event is not None:
                current = torch.cuda.current_stream(device)
                current.wait_event(event)
                for t in [*batch["views"], batch["label"], *([batch["mask"]] if "mask" in batch else [])]:
                    t.record_stream(current)
            yield batch
    finally:
        stop.set()
        thread.join(timeout=60)


def device_rate(samples: list[tuple[str, int]], policy: str, img_size: int, batch_size: int, batches: int,
                device="cuda") -> dict:
    """The device path's images/s on ``device`` (bytes read here, not in workers): ``images_per_s`` for decode
    and views, ``decode_images_per_s`` for the batched decode alone, timed on the same batches after it. On a
    GPU the views are finished compiled, as in a GPU run of the full preset."""
    import time

    from ssl_bench.data.views import resolve_policy

    device = torch.device(device)
    views = FolderViews(resolve_policy(policy), img_size, 3, (0.485, 0.456, 0.406), (0.229, 0.224, 0.225))
    encode, maker = EncodedFiles(views), DeviceFolderBatches(None, views, device, compile=device.type == "cuda")
    groups = [[encode(samples[(b * batch_size + i) % len(samples)][0], b * batch_size + i) for i in range(batch_size)]
              for b in range(batches + 1)]
    maker.make_views(groups[0])  # warm-up: nvjpeg handles, kernels

    def rate(work) -> float:
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        start = time.perf_counter()
        for records in groups[1:]:
            work(records)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        return batches * batch_size / (time.perf_counter() - start)

    return {"images_per_s": rate(maker.make_views), "decode_images_per_s": rate(lambda r: decode_batch(r, 3, device))}
