"""Training the image tokenizer (``ssl_bench.tokenizer``) without labels on the pretraining images, with the
suite's optimizer, schedule, device and seeding helpers; and ``ensure_tokenizer``, which gives BEiT / CAE the
tokenizer their config names (a path, OpenAI's DALL-E encoder, or one trained for the run)."""
from __future__ import annotations

import time
from pathlib import Path

import torch

from ssl_bench.atomic import check_can_make
from ssl_bench.config import CHECKS, Check
from ssl_bench.errors import UserError
from ssl_bench.progress import StepProgress
from ssl_bench.tokenizer import (
    DALLE_PREFIX, RECORD_FILE, TOKENIZER_FILE, TRAIN_HINT, Tokenizer, load_tokenizer, save_tokenizer, tokenizer_file,
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
        "device": "auto", "log_every": 100, "progress": "auto",  # as the trainer's train.progress
    },
}

TOKENIZER_PRESETS: dict = {
    "smoke": {
        "tokenizer": {"vocab_size": 64, "hidden_dim": 32, "code_dim": 16, "num_res_blocks": 1},
        "train": {"steps": 150, "batch_size": 64, "lr": 3e-3, "holdout": 500, "log_every": 50},
    },
    "quick": {
        "tokenizer": {"vocab_size": 512, "hidden_dim": 64, "code_dim": 32, "num_res_blocks": 2},
        "train": {"steps": 200, "batch_size": 128, "lr": 2e-3, "holdout": 2000, "log_every": 50},
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
    from ssl_bench.config import PRESETS, apply_overrides, check_config, deep_merge

    if preset not in TOKENIZER_PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(TOKENIZER_PRESETS)}")
    shared = {
        "data": {k: v for k, v in PRESETS[preset].get("data", {}).items() if k in TOKENIZER_DEFAULTS["data"]},
        "model": {"patch_size": PRESETS[preset].get("model", {}).get("patch_size", TOKENIZER_DEFAULTS["model"]["patch_size"])},
    }
    cfg = deep_merge(deep_merge(TOKENIZER_DEFAULTS, shared), TOKENIZER_PRESETS[preset])
    cfg["preset"] = preset
    cfg = apply_overrides(cfg, list(overrides))
    check_config(cfg, TOKENIZER_CHECKS | {key: CHECKS[key] for key in SHARED_CHECKS})
    return cfg


# what a tokenizer config may hold: the keys it shares with pretraining are checked as pretraining checks them
SHARED_CHECKS = ("seed", "data.subset", "data.img_size", "data.num_workers", "model.patch_size", "train.batch_size",
                 "train.weight_decay", "train.log_every", "train.progress", "train.device")


TOKENIZER_CHECKS = {
    "tokenizer.vocab_size": Check(2, integer=True), "tokenizer.hidden_dim": Check(1, integer=True),
    "tokenizer.code_dim": Check(1, integer=True), "tokenizer.num_res_blocks": Check(0, integer=True),
    "tokenizer.ema_decay": Check(0, 1, hi_open=True), "tokenizer.restart_threshold": Check(0),
    "train.steps": Check(1, integer=True), "train.lr": Check(0, lo_open=True), "train.commitment": Check(0),
    "train.holdout": Check(1, integer=True),
}


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


def _run_config(data: str, data_root: str | None, preset: str, overrides) -> dict:
    """``tokenizer_config`` for training on ``data`` (at ``data_root``, if given)."""
    return tokenizer_config(preset, [f"data.name={data}", *([f"data.root={data_root}"] if data_root else []), *overrides])


def new_tokenizer(cfg: dict, info, img_size: int) -> Tokenizer:
    """The untrained network of a tokenizer config (``tokenizer_config``) for a data set (``DatasetInfo``)."""
    return Tokenizer(img_size, cfg["model"]["patch_size"], info.in_chans, data=info.name, mean=info.mean, std=info.std, **cfg["tokenizer"])


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

    cfg = _run_config(data, data_root, preset, overrides)
    out = Path(out_dir)
    if (out / TOKENIZER_FILE).exists():
        raise UserError(f"{out} already holds a tokenizer ({TOKENIZER_FILE}); choose a new --out or use it as it is")
    check_can_make(out, "--out")  # out/ is created only when the tokenizer is saved: a failed run leaves nothing behind
    train = cfg["train"]
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

    tokenizer = new_tokenizer(cfg, info, img_size).to(device)
    before = evaluate_tokenizer(tokenizer.eval(), _heldout_batches(cfg, img_size, info))
    optimizer = build_optimizer([{"params": list(tokenizer.parameters()), "weight_decay": train["weight_decay"]}], "adamw", train["lr"])
    steps = train["steps"]
    curve, restarts, step, epoch = [], 0, 0, 0
    t0 = time.perf_counter()
    tokenizer.train()
    progress = StepProgress(total=steps, mode=train["progress"], label="tokenizer step")
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
            progress.update(mse=f"{float(stats['mse']):.4f}")
            if step >= steps:
                break
        epoch += 1
    wall = time.perf_counter() - t0
    progress.close()
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
        return str(tokenizer_file(path))
    out = Path(run_dir) / "tokenizer"
    if (out / TOKENIZER_FILE).exists():
        return str((out / TOKENIZER_FILE).resolve())  # resumed run: reuse
    train_tokenizer(data["name"], data["root"], out, *auto_tokenizer_settings(cfg))
    return str((out / TOKENIZER_FILE).resolve())


def auto_tokenizer_settings(cfg: dict) -> tuple[str, list[str]]:
    """The tokenizer preset and overrides ``method.tokenizer=auto`` trains with for a pretraining run config:
    the run's preset (quick for one without a tokenizer preset), patch grid, images, seed and device."""
    data, model, train = cfg["data"], cfg["model"], cfg.get("train", {})
    preset = cfg.get("preset") or "quick"
    overrides = [
        f"model.patch_size={model['patch_size']}",
        f"data.img_size={data['img_size']}",
        f"data.subset={data['subset']}",  # the same images the method pretrains on, no more
        f"seed={cfg.get('seed', 0)}",
        f"train.device={train.get('device', 'auto')}",
        f"train.progress={train.get('progress', True)}",
    ]
    return (preset if preset in TOKENIZER_PRESETS else "quick"), overrides


def untrained_auto_tokenizer(cfg: dict) -> Tokenizer:
    """The network ``method.tokenizer=auto`` would train for a pretraining run config, untrained: what costs
    the same FLOPs as the trained one, for counting them without the training."""
    from ssl_bench.data.datasets import load_dataset

    tcfg = _run_config(cfg["data"]["name"], cfg["data"]["root"], *auto_tokenizer_settings(cfg))
    _, info = load_dataset(tcfg["data"]["name"], tcfg["data"]["root"], "pretrain", img_size=tcfg["data"]["img_size"])
    return new_tokenizer(tcfg, info, tcfg["data"]["img_size"] or info.img_size)

