"""A discrete image tokenizer (VQ-VAE) giving exactly one token per ViT patch: BEiT's and CAE's targets.

BEiT reads its targets from DALL-E's dVAE (8192 codes, one per 16x16 patch); no weights can be downloaded
here, so the suite trains its own tokenizer without labels on the pretraining images (the CAE paper's
"d-VAE trained on ImageNet-1K" is the precedent). Design (van den Oord et al. 2017, "Neural Discrete
Representation Learning", with the EMA codebook of its appendix and two later fixes for codebook use):

* encoder: conv with kernel = stride = patch size (so the token grid IS the ViT's patch grid) ->
  residual 3x3 convs at token resolution (each token sees its neighbours) -> 1x1 conv to ``code_dim``;
* quantizer: l2-normalized codes, nearest code by cosine similarity (ViT-VQGAN, Yu et al. 2022: better
  codebook use), codebook updated as an EMA of the vectors assigned to each code (decay 0.99), codebook
  initialized from encoder outputs, and dead-code restarts: a code whose EMA count falls below
  ``restart_threshold`` is moved onto a random encoder output of the batch (Dhariwal et al. 2020, Jukebox);
* decoder: mirror of the encoder, with a transposed conv of kernel = stride = patch size;
* loss: MSE reconstruction of the normalized image + ``commitment`` x ||z - sg(code)||^2 (beta 0.25),
  straight-through gradients from decoder to encoder.

Images are normalized exactly as the pretraining pipeline normalizes them (``DatasetInfo.mean/std``);
:meth:`Tokenizer.tokenize` works in float32 whatever autocast is active, and does not depend on the
module's train/eval mode, so tokens are a pure function of the weights and the image.

This module is the model and its files; ``ssl_bench.tokenizer_training`` trains one (and ``ensure_tokenizer``
provides one to BEiT / CAE).
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from ssl_bench.atomic import atomic_write
from ssl_bench.errors import UserError
from ssl_bench.safe_load import load_torch_file

TOKENIZER_FILE = "tokenizer.pt"
RECORD_FILE = "tokenizer.json"
FORMAT = "ssl-bench-tokenizer/1"
DALLE_PREFIX = "dalle:"  # method.tokenizer=dalle:/path/to/encoder.pkl (ssl_bench.dalle)
TRAIN_HINT = "train one with `ssl-bench tokenizer train --data D --out DIR` (or set method.tokenizer=auto)"


# -- the model -----------------------------------------------------------------------------------
class ResBlock(nn.Module):
    """Pre-activation residual block: x + conv1x1(relu(conv3x3(relu(x))))."""

    def __init__(self, dim: int):
        super().__init__()
        self.body = nn.Sequential(nn.ReLU(), nn.Conv2d(dim, dim, 3, padding=1), nn.ReLU(), nn.Conv2d(dim, dim, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.body(x)


class EMAQuantizer(nn.Module):
    """Codebook of ``vocab_size`` unit vectors, learnt by EMA (no gradient), with dead-code restarts."""

    def __init__(self, vocab_size: int, code_dim: int, decay: float = 0.99, restart_threshold: float = 1.0, eps: float = 1e-5):
        super().__init__()
        self.vocab_size, self.decay, self.restart_threshold, self.eps = vocab_size, decay, restart_threshold, eps
        self.register_buffer("codebook", F.normalize(torch.randn(vocab_size, code_dim), dim=1))  # (K, d)
        self.register_buffer("ema_count", torch.ones(vocab_size))  # (K,) EMA of vectors per code per batch
        self.register_buffer("ema_sum", self.codebook.clone())  # (K, d) EMA of their sum
        self.register_buffer("initialized", torch.tensor(False))

    def nearest(self, z: torch.Tensor) -> torch.Tensor:
        """z (M, d) unit vectors -> (M,) index of the most similar code."""
        return (z @ self.codebook.t()).argmax(dim=1)

    @torch.no_grad()
    def update(self, z: torch.Tensor, ids: torch.Tensor) -> int:
        """One EMA step from the batch's vectors z (M, d) and their codes ids (M,); returns #restarted codes."""
        if not bool(self.initialized):
            # data-dependent init: codes start on encoder outputs, so none starts out of reach
            self.codebook.copy_(z[torch.randint(len(z), (self.vocab_size,), device=z.device)])
            self.ema_sum.copy_(self.codebook)
            self.initialized.fill_(True)
            ids = self.nearest(z)
        count = torch.bincount(ids, minlength=self.vocab_size).type_as(z)  # (K,) vectors per code
        total = torch.zeros_like(self.ema_sum).index_add_(0, ids, z)  # (K, d) their sum
        self.ema_count.mul_(self.decay).add_(count, alpha=1 - self.decay)
        self.ema_sum.mul_(self.decay).add_(total, alpha=1 - self.decay)
        self.codebook.copy_(F.normalize(self.ema_sum, dim=1, eps=self.eps))
        dead = self.ema_count < self.restart_threshold
        n_dead = int(dead.sum())
        if n_dead:
            fresh = z[torch.randint(len(z), (n_dead,), device=z.device)]
            self.codebook[dead] = fresh
            self.ema_sum[dead] = fresh
            self.ema_count[dead] = self.restart_threshold  # a grace period before it can be restarted again
        return n_dead


class Tokenizer(nn.Module):
    """VQ-VAE whose token grid is the ViT's patch grid: (B, C, H, W) <-> (B, N) tokens, N = (H/p)^2."""

    def __init__(
        self,
        img_size: int = 28,
        patch_size: int = 4,
        in_chans: int = 1,
        vocab_size: int = 512,
        hidden_dim: int = 64,
        code_dim: int = 32,
        num_res_blocks: int = 2,
        ema_decay: float = 0.99,
        restart_threshold: float = 1.0,
        data: str | None = None,
        mean: tuple[float, ...] | None = None,
        std: tuple[float, ...] | None = None,
    ):
        super().__init__()
        if img_size % patch_size:
            raise UserError(f"img_size {img_size} is not divisible by patch_size {patch_size}; change model.patch_size")
        self.img_size, self.patch_size, self.in_chans, self.vocab_size = img_size, patch_size, in_chans, vocab_size
        self.grid_size = img_size // patch_size
        self.num_patches = self.grid_size**2
        # what the tokenizer was trained on: the normalization its inputs must have
        self.data, self.mean, self.std = data, tuple(mean) if mean else None, tuple(std) if std else None
        self._config = dict(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, vocab_size=vocab_size, hidden_dim=hidden_dim,
            code_dim=code_dim, num_res_blocks=num_res_blocks, ema_decay=ema_decay, restart_threshold=restart_threshold,
            data=data, mean=self.mean, std=self.std,
        )
        # Every layer but the first and last works at token resolution: cheap, and the grid is the ViT's.
        self.encoder = nn.Sequential(
            nn.Conv2d(in_chans, hidden_dim, patch_size, stride=patch_size),  # (B, h, g, g): one cell per patch
            *[ResBlock(hidden_dim) for _ in range(num_res_blocks)], nn.ReLU(),
            nn.Conv2d(hidden_dim, code_dim, 1),
        )
        self.quantizer = EMAQuantizer(vocab_size, code_dim, ema_decay, restart_threshold)
        self.decoder = nn.Sequential(
            nn.Conv2d(code_dim, hidden_dim, 1),
            *[ResBlock(hidden_dim) for _ in range(num_res_blocks)], nn.ReLU(),
            nn.ConvTranspose2d(hidden_dim, in_chans, patch_size, stride=patch_size),  # (B, C, H, W)
        )

    def config(self) -> dict:
        return dict(self._config)

    def _check_images(self, images: torch.Tensor) -> None:
        if images.ndim != 4 or tuple(images.shape[1:]) != (self.in_chans, self.img_size, self.img_size):
            raise UserError(
                f"the tokenizer reads images of shape (B, {self.in_chans}, {self.img_size}, {self.img_size}), got "
                f"{tuple(images.shape)}; use a tokenizer trained for this image size ({TRAIN_HINT})"
            )

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, N, d) unit vectors, one per patch, row-major like the ViT's patches."""
        z = self.encoder(images)  # (B, d, g, g)
        return F.normalize(z.flatten(2).transpose(1, 2), dim=-1)

    def decode_codes(self, q: torch.Tensor) -> torch.Tensor:
        """(B, N, d) code vectors -> (B, C, H, W) images."""
        b, n, d = q.shape
        return self.decoder(q.transpose(1, 2).reshape(b, d, self.grid_size, self.grid_size))

    @torch.no_grad()
    def tokenize(self, images: torch.Tensor) -> torch.Tensor:
        """Normalized images (B, C, H, W) -> tokens (B, N) long, in [0, vocab_size)."""
        self._check_images(images)
        with torch.autocast(images.device.type, enabled=False):
            z = self.encode(images.float())  # (B, N, d)
            return self.quantizer.nearest(z.flatten(0, 1)).view(z.shape[:2])

    @torch.no_grad()
    def decode(self, tokens: torch.Tensor) -> torch.Tensor:
        """Tokens (B, N) -> normalized images (B, C, H, W)."""
        if tokens.ndim != 2 or tokens.shape[1] != self.num_patches:
            raise UserError(f"decode expects tokens of shape (B, {self.num_patches}), got {tuple(tokens.shape)}")
        with torch.autocast(tokens.device.type, enabled=False):
            return self.decode_codes(self.quantizer.codebook[tokens])

    def training_loss(self, images: torch.Tensor, commitment: float = 0.25) -> tuple[torch.Tensor, dict]:
        """The VQ-VAE objective on a batch; in train mode also takes one EMA step of the codebook."""
        z = self.encode(images)  # (B, N, d), unit vectors
        ids = self.quantizer.nearest(z.detach().flatten(0, 1))  # (B*N,)
        if self.training:
            restarts = self.quantizer.update(z.detach().flatten(0, 1), ids)
            ids = self.quantizer.nearest(z.detach().flatten(0, 1))  # against the updated codebook
        else:
            restarts = 0
        q = self.quantizer.codebook[ids].view_as(z)  # (B, N, d), no gradient: learnt by EMA
        recon = self.decode_codes(z + (q - z).detach())  # straight-through: decoder grads reach the encoder
        mse = F.mse_loss(recon, images)
        commit = F.mse_loss(z, q)
        return mse + commitment * commit, {"mse": mse.detach(), "commit": commit.detach(), "restarts": restarts}


# -- files ---------------------------------------------------------------------------------------
def tokenizer_file(path: str | Path) -> Path:
    """PATH itself, or PATH/tokenizer.pt when PATH is a directory."""
    path = Path(path)
    return path / TOKENIZER_FILE if path.is_dir() else path


def save_tokenizer(tokenizer: Tokenizer, path: str | Path) -> Path:
    """Write the tokenizer atomically (a reader never sees half a file)."""
    state = {k: v.detach().cpu() for k, v in tokenizer.state_dict().items()}
    return atomic_write(path, lambda f: torch.save({"format": FORMAT, "config": tokenizer.config(), "state_dict": state}, f))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """A trained tokenizer (a ``tokenizer.pt`` or the directory holding one), or ``dalle:SIDECAR`` (OpenAI's
    encoder, ``ssl_bench.dalle``: the only tokenizer that is unpickled, so only with that explicit prefix),
    frozen, in eval mode."""
    from ssl_bench import dalle

    if str(path).startswith(DALLE_PREFIX):
        sidecar = str(path)[len(DALLE_PREFIX):]
        if not dalle.is_sidecar(sidecar):
            raise UserError(f"{path}: a DALL-E encoder is set up when pretraining starts; pass method.tokenizer=dalle:<encoder.pkl> to ssl-bench pretrain")
        return dalle.load_sidecar(sidecar)
    if dalle.is_sidecar(path):
        raise UserError(f"{path} names a pickled DALL-E encoder, and unpickling runs code: it loads only when asked "
                        f"explicitly, as method.tokenizer={DALLE_PREFIX}{path}")
    file = tokenizer_file(path)
    if not file.is_file():
        raise UserError(f"no tokenizer at {path}; {TRAIN_HINT}")
    fix = f"delete it and {TRAIN_HINT}"
    blob = load_torch_file(file, "tokenizer file", fix)  # tensors and plain values only: opening it runs no code
    if not isinstance(blob, dict) or blob.get("format") != FORMAT:  # readable, but something else (a checkpoint?)
        raise UserError(f"{file} is not an ssl-bench tokenizer file (another torch file); {TRAIN_HINT}")
    try:
        tokenizer = Tokenizer(**blob["config"])
        tokenizer.load_state_dict(blob["state_dict"])
    except UserError:
        raise
    except Exception as exc:  # truncated / garbled / foreign files raise many types
        raise UserError(f"tokenizer file {file} is corrupt or not a tokenizer ({exc.__class__.__name__}); {fix}") from None
    tokenizer.requires_grad_(False)
    return tokenizer.eval()


def check_compatible(tokenizer: Tokenizer, backbone) -> None:
    """The tokenizer must give one token per patch of ``backbone`` (same image size, patch size, channels)."""
    mine = (tokenizer.img_size, tokenizer.patch_size, tokenizer.in_chans)
    theirs = (backbone.img_size, backbone.patch_size, backbone.in_chans)
    if mine != theirs:
        raise UserError(
            f"tokenizer grid {tokenizer.grid_size}x{tokenizer.grid_size} (img_size {mine[0]}, patch {mine[1]}, {mine[2]} channels) "
            f"does not match the backbone's {backbone.grid_size}x{backbone.grid_size} (img_size {theirs[0]}, patch {theirs[1]}, "
            f"{theirs[2]} channels); train a tokenizer with model.patch_size={theirs[1]} data.img_size={theirs[0]} or use method.tokenizer=auto"
        )
