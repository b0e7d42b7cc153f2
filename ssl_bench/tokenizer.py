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
"""
from __future__ import annotations

import time
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
def _tokenizer_file(path: str | Path) -> Path:
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
    file = _tokenizer_file(path)
    if not file.is_file():
        raise UserError(f"no tokenizer at {path}; {TRAIN_HINT}")
    fix = f"delete it and {TRAIN_HINT}"
    blob = load_torch_file(file, "tokenizer file", fix)  # tensors and plain values only: opening it runs no code
    try:
        if not isinstance(blob, dict) or blob.get("format") != FORMAT:
            raise ValueError("not an ssl-bench tokenizer file")
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


# -- training ------------------------------------------------------------------------------------
# Config: the data / model keys mean what they mean for pretraining (so a tokenizer trained at a preset
# matches `ssl-bench pretrain` at that preset); "tokenizer" is the network, "train" its optimization.
TOKENIZER_DEFAULTS: dict = {
    "seed": 0,
    "data": {"name": "fashion_mnist", "root": None, "subset": None, "img_size": None, "num_workers": 0},
    "model": {"patch_size": 4},
    "tokenizer": {"vocab_size": 512, "hidden_dim": 64, "code_dim": 32, "num_res_blocks": 2, "ema_decay": 0.99, "restart_threshold": 1.0},
    "train": {
        "steps": 1000, "batch_size": 128, "lr": 2e-3, "weight_decay": 0.0, "commitment": 0.25,
        "holdout": 2000,  # held-out images (the data set's test split) for usage and reconstruction figures
        "device": "auto", "log_every": 100, "progress": True,
    },
}

TOKENIZER_PRESETS: dict = {
    "smoke": {
        "tokenizer": {"vocab_size": 64, "hidden_dim": 32, "code_dim": 16, "num_res_blocks": 1},
        "train": {"steps": 150, "batch_size": 64, "lr": 3e-3, "holdout": 500, "log_every": 50},
    },
    "quick": {
        "tokenizer": {"vocab_size": 512, "hidden_dim": 64, "code_dim": 32, "num_res_blocks": 2},
        "train": {"steps": 400, "batch_size": 128, "lr": 2e-3, "holdout": 2000, "log_every": 50},
    },
    "standard": {  # the reference study on one GPU: BEiT's vocabulary, a shorter schedule than full
        "data": {"num_workers": 8},
        "tokenizer": {"vocab_size": 8192, "hidden_dim": 128, "code_dim": 32, "num_res_blocks": 2},
        "train": {"steps": 8000, "batch_size": 256, "lr": 1e-3, "holdout": 10000, "log_every": 500},
    },
    "full": {  # BEiT's vocabulary; meant for a GPU
        "data": {"num_workers": 8},
        "tokenizer": {"vocab_size": 8192, "hidden_dim": 128, "code_dim": 32, "num_res_blocks": 2},
        "train": {"steps": 20000, "batch_size": 256, "lr": 1e-3, "holdout": 10000, "log_every": 500},
    },
}


def tokenizer_config(preset: str = "quick", overrides=()) -> dict:
    """Defaults < the pretraining preset's data/model keys < the tokenizer preset < overrides."""
    from ssl_bench.config import PRESETS, apply_overrides, deep_merge

    if preset not in TOKENIZER_PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(TOKENIZER_PRESETS)}")
    shared = {
        "data": {k: v for k, v in PRESETS[preset].get("data", {}).items() if k in TOKENIZER_DEFAULTS["data"]},
        "model": {"patch_size": PRESETS[preset].get("model", {}).get("patch_size", TOKENIZER_DEFAULTS["model"]["patch_size"])},
    }
    cfg = deep_merge(deep_merge(TOKENIZER_DEFAULTS, shared), TOKENIZER_PRESETS[preset])
    cfg["preset"] = preset
    return apply_overrides(cfg, list(overrides))


@torch.no_grad()
def evaluate_tokenizer(tokenizer: Tokenizer, batches) -> dict:
    """Over batches of normalized images (B, C, H, W): reconstruction MSE through the tokens, codebook
    use, perplexity, and the pixel variance (the MSE of predicting the mean pixel: a scale for the MSE)."""
    device = next(tokenizer.parameters()).device
    counts = torch.zeros(tokenizer.vocab_size, dtype=torch.float64)
    sq_err = pix_sum = pix_sq = 0.0
    n_pix = n_img = 0
    for x in batches:
        x = x.to(device)
        tokens = tokenizer.tokenize(x)  # (B, N)
        sq_err += float((tokenizer.decode(tokens) - x).pow(2).sum())
        pix_sum, pix_sq = pix_sum + float(x.double().sum()), pix_sq + float(x.double().pow(2).sum())
        n_pix, n_img = n_pix + x.numel(), n_img + len(x)
        counts += torch.bincount(tokens.flatten().cpu(), minlength=tokenizer.vocab_size).double()
    p = counts / counts.sum()
    entropy = -(p[p > 0] * p[p > 0].log()).sum()
    return {
        "recon_mse": sq_err / n_pix,
        "codebook_usage": float((counts > 0).double().mean()),  # fraction of codes used at least once
        "codes_used": int((counts > 0).sum()),
        "perplexity": float(entropy.exp()),  # effective number of codes
        "pixel_variance": pix_sq / n_pix - (pix_sum / n_pix) ** 2,
        "heldout_images": n_img,
    }


def _heldout_batches(cfg: dict, img_size: int, info, batch_size: int = 256):
    """Batches of ``train.holdout`` images of the test split (a fixed random subset), normalized, not augmented."""
    from ssl_bench.data.datasets import fixed_subset, load_dataset
    from ssl_bench.data.transforms import eval_transform

    test, _ = load_dataset(cfg["data"]["name"], cfg["data"]["root"], "test", img_size=cfg["data"]["img_size"])
    idx = fixed_subset(len(test), cfg["train"]["holdout"], seed=1)
    idx = list(range(len(test)) if idx is None else idx)
    tf = eval_transform(img_size, info.img_size, info.mean, info.std)
    for i in range(0, len(idx), batch_size):
        yield torch.stack([tf(test[int(j)][0]) for j in idx[i : i + batch_size]])


def train_tokenizer(data: str, data_root: str | None, out_dir, preset: str = "quick", overrides=()) -> dict:
    """Train a tokenizer on ``data``'s pretraining images (no labels); write ``out_dir/tokenizer.pt`` and the
    record ``out_dir/tokenizer.json``; return the record."""
    from ssl_bench.data.datasets import fixed_subset, load_dataset
    from ssl_bench.data.pipeline import PretrainDataset, ResumableSampler
    from ssl_bench.data.transforms import build_policy
    from ssl_bench.distributed import resolve_device
    from ssl_bench.optim import build_optimizer, cosine_with_warmup, set_lr
    from ssl_bench.records import git_commit, hardware, now_iso, write_json_atomic
    from ssl_bench.runtime import seed_everything

    extra = [f"data.name={data}"] + ([f"data.root={data_root}"] if data_root else [])
    cfg = tokenizer_config(preset, [*extra, *overrides])
    out = Path(out_dir)
    if (out / TOKENIZER_FILE).exists():
        raise UserError(f"{out} already holds a tokenizer ({TOKENIZER_FILE}); choose a new --out or use it as it is")
    # out/ is created only when the tokenizer is saved: a failed run leaves nothing behind
    train, tcfg = cfg["train"], cfg["tokenizer"]
    device = resolve_device(train["device"])
    seed_everything(cfg["seed"])

    base, info = load_dataset(cfg["data"]["name"], cfg["data"]["root"], "pretrain", img_size=cfg["data"]["img_size"])
    img_size = cfg["data"]["img_size"] or info.img_size
    # the pretraining images (same fixed subset) and augmentation of MIM pretraining: the tokenizer
    # sees no image and no view that the methods it serves do not
    dataset = PretrainDataset(base, build_policy("mim", img_size, info.in_chans, info.mean, info.std), None,
                              seed=cfg["seed"], indices=fixed_subset(len(base), cfg["data"]["subset"]))
    batch = min(train["batch_size"], len(dataset))
    sampler = ResumableSampler(len(dataset), batch, seed=cfg["seed"])
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, sampler=sampler, num_workers=cfg["data"]["num_workers"],
                                         drop_last=True, generator=torch.Generator())

    tokenizer = Tokenizer(img_size, cfg["model"]["patch_size"], info.in_chans, data=info.name, mean=info.mean, std=info.std, **tcfg).to(device)
    before = evaluate_tokenizer(tokenizer.eval(), _heldout_batches(cfg, img_size, info))
    optimizer = build_optimizer([{"params": list(tokenizer.parameters()), "weight_decay": train["weight_decay"]}], "adamw", train["lr"])
    steps = train["steps"]
    curve, restarts, step, epoch = [], 0, 0, 0
    t0 = time.perf_counter()
    tokenizer.train()
    bar = None
    if train["progress"]:
        from tqdm import tqdm

        bar = tqdm(total=steps, unit="step", desc="tokenizer", dynamic_ncols=True, mininterval=1.0)
    while step < steps:
        sampler.set_epoch(epoch)
        dataset.set_epoch(epoch)
        for item in loader:
            images = item["views"][0].to(device, non_blocking=True)
            set_lr(optimizer, cosine_with_warmup(step, steps, 0, train["lr"]))
            loss, stats = tokenizer.training_loss(images, train["commitment"])
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
            restarts += stats["restarts"]
            if step % train["log_every"] == 0 or step in (1, steps):
                curve.append((step, float(stats["mse"])))
            if bar is not None:
                bar.update(1)
                bar.set_postfix(mse=f"{float(stats['mse']):.4f}", refresh=False)
            if step >= steps:
                break
        epoch += 1
    wall = time.perf_counter() - t0
    if bar is not None:
        bar.close()
    tokenizer.eval().requires_grad_(False)
    after = evaluate_tokenizer(tokenizer, _heldout_batches(cfg, img_size, info))
    record = {
        "status": "finished",
        "kind": "tokenizer",
        "data": info.name,
        "preset": preset,
        "vocab_size": tokenizer.vocab_size,
        "grid_size": tokenizer.grid_size,
        "patch_size": tokenizer.patch_size,
        "img_size": img_size,
        **after,
        "recon_mse_untrained": before["recon_mse"],
        "codebook_restarts": restarts,
        "steps": step,
        "loss_curve": curve,
        "wall_time_s": wall,
        "images_per_s": step * batch / wall if wall > 0 else None,
        "config": cfg,
        "path": str((out / TOKENIZER_FILE).resolve()),
        "hardware": hardware(),
        "git_commit": git_commit(),
        "finished": now_iso(),
    }
    write_json_atomic(out / RECORD_FILE, record)
    save_tokenizer(tokenizer.cpu(), out / TOKENIZER_FILE)  # last: its presence means the record is there too
    return record


def ensure_tokenizer(cfg: dict, run_dir) -> str:
    """For ``Method.prepare`` (BEiT, CAE): the path of the tokenizer named by ``cfg["method"]["tokenizer"]``.

    A path is validated (loadable, right patch grid and data set) and returned absolute; ``"dalle:PATH"``
    (OpenAI's released encoder) gets a sidecar in ``run_dir/tokenizer/`` and becomes ``"dalle:SIDECAR"``,
    which ``load_tokenizer`` reads. ``"auto"`` trains a
    tokenizer for this run's data set, images, patch grid and preset into ``run_dir/tokenizer/``, or reuses
    the one already there (prepare runs again on resume).
    """
    choice = cfg["method"].get("tokenizer")
    data, model = cfg["data"], cfg["model"]
    if choice is None or choice == "":
        raise UserError(f"method.tokenizer is not set; pass method.tokenizer=auto or a path; {TRAIN_HINT}")
    if str(choice).startswith(DALLE_PREFIX):  # OpenAI's released dVAE encoder, from a local file
        from ssl_bench import dalle
        from ssl_bench.data.datasets import load_dataset

        target = choice[len(DALLE_PREFIX):]
        if dalle.is_sidecar(target):
            return choice  # resumed run: its sidecar is written already
        _, info = load_dataset(data["name"], data["root"], "pretrain", img_size=data["img_size"])
        sidecar = dalle.write_sidecar(target, Path(run_dir) / "tokenizer", data["img_size"] or info.img_size,
                                      model["patch_size"], info.in_chans, info.mean, info.std, info.name)
        return f"{DALLE_PREFIX}{sidecar.resolve()}"  # the prefix stays: it is what allows unpickling the encoder
    if choice != "auto":
        path = Path(choice).expanduser().resolve()
        tokenizer = load_tokenizer(path)
        problems = []
        if tokenizer.patch_size != model["patch_size"]:
            problems.append(f"patch size {tokenizer.patch_size} vs model.patch_size={model['patch_size']}")
        if data["img_size"] and tokenizer.img_size != data["img_size"]:
            problems.append(f"image size {tokenizer.img_size} vs data.img_size={data['img_size']}")
        if tokenizer.data is not None and tokenizer.data != data["name"]:
            problems.append(f"trained on '{tokenizer.data}', this run uses '{data['name']}' (another normalization)")
        if problems:
            raise UserError(f"tokenizer {path} does not fit this run: {'; '.join(problems)}; "
                            f"train a matching one (ssl-bench tokenizer train --data {data['name']} --out DIR model.patch_size={model['patch_size']}) or use method.tokenizer=auto")
        return str(_tokenizer_file(path))
    out = Path(run_dir) / "tokenizer"
    if (out / TOKENIZER_FILE).exists():
        return str((out / TOKENIZER_FILE).resolve())  # resumed run: reuse
    preset = cfg.get("preset") or "quick"
    overrides = [
        f"model.patch_size={model['patch_size']}",
        f"data.img_size={data['img_size']}",
        f"data.subset={data['subset']}",  # the same images the method pretrains on, no more
        f"seed={cfg.get('seed', 0)}",
        f"train.device={cfg.get('train', {}).get('device', 'auto')}",
        f"train.progress={cfg.get('train', {}).get('progress', True)}",
    ]
    train_tokenizer(data["name"], data["root"], out, preset if preset in TOKENIZER_PRESETS else "quick", overrides)
    return str((out / TOKENIZER_FILE).resolve())

