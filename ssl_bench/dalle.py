"""DALL-E's dVAE encoder (Ramesh et al. 2021) as BEiT's / CAE's tokenizer, from a local file.

BEiT's published targets come from OpenAI's released ``encoder.pkl``: a pickled ``dall_e.encoder.Encoder``
(8192 codes) that reads RGB at half the ViT's resolution, mapped into [eps, 1 - eps] (eps 0.1, its
logit-Laplace parameterisation), and downsamples 8x, so a 224 image read at 112 gives 14 x 14 tokens: one
per 16 x 16 patch. Nothing is downloaded: a user who has the file passes

    method.tokenizer=dalle:/path/to/encoder.pkl

(unpickling it needs OpenAI's ``DALL-E`` package: ``pip install DALL-E``). ``prepare`` then writes a small
sidecar, ``RUN_DIR/tokenizer/dalle.json``, naming the file, its sha256 and the run's image geometry and
normalization, and the run's config becomes ``method.tokenizer=dalle:SIDECAR``. This is the one file the suite
unpickles (a pickled module can run code when loaded), so it loads only through the ``dalle:`` prefix, and
only while the file still has the sha256 it had when the run started. ``ssl-bench pretrain`` unpickles it only
where its own command line names the file: ``method.tokenizer=dalle:FILE`` for a new run, ``--trust-pickle FILE``
where the value comes from a config file or a resumed run (a run folder from elsewhere must not run code).

The adapter generalises the half-resolution rule to any patch grid: the image is resized to (grid x 8) pixels, so
the encoder's token grid is the ViT's.
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssl_bench.errors import UserError
from ssl_bench.records import file_sha256, write_json_atomic

SIDECAR_FORMAT = "ssl-bench-dalle-tokenizer/1"
SIDECAR_FILE = "dalle.json"
LOGIT_LAPLACE_EPS = 0.1  # DALL-E's pixel mapping: x -> (1 - 2 eps) x + eps
DOWNSAMPLE = 8  # the dVAE encoder's three 2x poolings


class DalleTokenizer(nn.Module):
    """Normalized images (B, C, H, W) -> DALL-E tokens (B, N), N = the ViT's patch grid."""

    def __init__(self, encoder: nn.Module, img_size: int, patch_size: int, in_chans: int, mean, std, data: str | None = None):
        super().__init__()
        self.encoder = encoder.eval().requires_grad_(False)
        self.vocab_size = int(getattr(encoder, "vocab_size", 8192))
        self.img_size, self.patch_size, self.in_chans = img_size, patch_size, in_chans
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        self.data = data
        self.register_buffer("mean", torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1), persistent=False)

    def train(self, mode: bool = True):
        return super().train(False)  # fixed targets

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise UserError(f"the DALL-E tokenizer was set up for images (B, {self.in_chans}, {self.img_size}, {self.img_size}), "
                            f"got {tuple(images.shape)}; rerun prepare (a new run) for this image size")
        with torch.autocast(images.device.type, enabled=False):
            pixels = (images.float() * self.std + self.mean).clamp(0, 1)  # back to [0, 1]
            if pixels.shape[1] == 1:
                pixels = pixels.expand(-1, 3, -1, -1)  # grayscale -> RGB
            side = self.grid_size * DOWNSAMPLE
            if pixels.shape[-1] != side:
                pixels = F.interpolate(pixels, size=(side, side), mode="bilinear", align_corners=False, antialias=side < pixels.shape[-1])
            logits = self.encoder((1 - 2 * LOGIT_LAPLACE_EPS) * pixels + LOGIT_LAPLACE_EPS)  # (B, vocab, g, g)
            return logits.argmax(dim=1).flatten(1)  # (B, N), row-major like the ViT's patches


def load_encoder_file(path: str | Path) -> nn.Module:
    path = Path(path)
    if not path.is_file():
        raise UserError(f"no DALL-E encoder at {path}; pass method.tokenizer=dalle:<path to OpenAI's encoder.pkl>")
    try:
        encoder = torch.load(path, map_location="cpu", weights_only=False)  # a pickled module, not a state dict
    except ModuleNotFoundError as exc:
        raise UserError(f"{path} needs the module '{exc.name}' to load; install OpenAI's package: pip install DALL-E") from None
    except Exception as exc:
        raise UserError(f"{path} is not a loadable DALL-E encoder ({exc.__class__.__name__}); pass OpenAI's encoder.pkl") from None
    if not isinstance(encoder, nn.Module):
        raise UserError(f"{path} holds a {type(encoder).__name__}, not the pickled DALL-E encoder module; pass OpenAI's encoder.pkl")
    return encoder


def write_sidecar(encoder_path: str | Path, out_dir: str | Path, img_size: int, patch_size: int, in_chans: int,
                  mean, std, data: str) -> Path:
    """Check the encoder loads and write ``out_dir/dalle.json``; returns its path (the method's tokenizer)."""
    encoder_path = Path(encoder_path).expanduser().resolve()
    load_encoder_file(encoder_path)  # fail now, with one line, not at the first training step
    if img_size % patch_size:
        raise UserError(f"img_size {img_size} is not divisible by patch_size {patch_size}; change model.patch_size")
    sidecar = Path(out_dir) / SIDECAR_FILE
    write_json_atomic(sidecar, {
        "format": SIDECAR_FORMAT, "encoder": str(encoder_path), "encoder_sha256": file_sha256(encoder_path),
        "img_size": img_size, "patch_size": patch_size,
        "in_chans": in_chans, "mean": list(mean), "std": list(std), "data": data,
    })
    return sidecar


def is_sidecar(path: str | Path) -> bool:
    path = Path(path)
    if path.suffix != ".json" or not path.is_file():
        return False
    try:
        return json.loads(path.read_text()).get("format") == SIDECAR_FORMAT
    except (OSError, ValueError):
        return False


def pickled_encoder(tokenizer_choice) -> Path | None:
    """The file a ``method.tokenizer`` value would unpickle: the encoder of ``dalle:ENCODER`` or the one a
    ``dalle:SIDECAR`` names (the sidecar itself is JSON, read without running anything); None for any other value."""
    from ssl_bench.tokenizer import DALLE_PREFIX

    if not str(tokenizer_choice or "").startswith(DALLE_PREFIX):
        return None
    target = Path(str(tokenizer_choice)[len(DALLE_PREFIX):]).expanduser()
    if is_sidecar(target):
        target = Path(str(json.loads(target.read_text()).get("encoder", "")))
    return target.resolve()


def load_sidecar(path: str | Path) -> DalleTokenizer:
    """The tokenizer a sidecar describes; its encoder file must be the one the run started with (same sha256)."""
    spec = json.loads(Path(path).read_text())
    pinned = spec.get("encoder_sha256")
    if pinned and Path(spec["encoder"]).is_file() and file_sha256(spec["encoder"]) != pinned:
        raise UserError(f"DALL-E encoder {spec['encoder']} has changed since this run started (sha256 differs from {path}); "
                        f"restore the original file or start a new run")
    return DalleTokenizer(
        load_encoder_file(spec["encoder"]), spec["img_size"], spec["patch_size"], spec["in_chans"], spec["mean"], spec["std"], spec["data"],
    )
