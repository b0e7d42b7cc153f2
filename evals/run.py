"""Run evaluation protocols on a finished pretraining run and record one result per protocol.

    evaluate(run_dir, ["knn", "linear"], "fashion_mnist", None, "quick")
      -> RUN_DIR/evals/knn-fashion_mnist-quick.json, RUN_DIR/evals/linear-fashion_mnist-quick.json
    evaluate(..., modes=["fast", "official"])   # both modes of every probe; fast records end in -fast

A protocol is a function ``evaluate(ctx: EvalContext) -> dict`` registered in ``evals.registry`` (built-ins
in ``evals/<name>.py``, plug-ins through entry points) returning at least ``top1`` (test split, percent),
``selected`` (what was chosen on the held-out split) and ``details`` (with ``n_test``), optionally
``warnings`` (a choice on the edge of its grid). Each record names the protocol's ``mode`` and carries
``ci95``: the 95% Wilson interval of the test top-1 over the test images.
Records are written with ``write_json_new``: atomic, and never overwriting an earlier result.
"""
from __future__ import annotations

import dataclasses
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from evals.features import AugmentedImages, Features, file_sha256, load_features
from evals.presets import resolve_eval_config
from evals.registry import get_protocol, kinds_per_split, protocol_names
from evals.selection import wilson_interval
from ssl_bench.atomic import remove_stale_temps
from ssl_bench.backbone import ViTBackbone
from ssl_bench.checkpoint import load_encoder
from ssl_bench.config import comma_list
from ssl_bench.data.datasets import DatasetInfo, TransformedSubset, fixed_subset, load_dataset
from ssl_bench.data.transforms import eval_transform
from ssl_bench.distributed import resolve_device
from ssl_bench.errors import UserError
from ssl_bench.records import git_commit, hardware, now_iso, write_json_new
from ssl_bench.rundir import CHECKPOINT_NAME, EVALS_DIR, FEATURES_DIR, eval_stem, read_run

SPLIT_SEED = 0  # the held-out / train / test subsets are the same for every method and run
MODES = ("official", "fast")


@dataclass
class EvalContext:
    """What a protocol needs: the run, the evaluation data and its preset values.

    ``params`` are this protocol's preset values; ``features(split)`` gives frozen-encoder features of
    "train", "heldout" (held out of the labelled train split, for choosing hyper-parameters) or "test";
    ``load_encoder()`` gives a fresh trainable copy of the pretrained encoder (fine-tuning).
    """

    run_dir: Path
    record: dict  # the run's run.json
    data: str
    data_root: str | None
    preset: str
    params: dict
    device: torch.device
    checkpoint_sha256: str
    feature_cfg: dict  # the preset's "features" section
    cache_dir: Path
    _shared: dict = field(default_factory=dict, repr=False)  # frozen encoder, data sets: loaded once for all protocols

    # -- encoder ------------------------------------------------------------------------------------------
    def frozen_encoder(self) -> ViTBackbone:
        """The pretrained encoder, eval mode, no gradients, on ``device``; loaded once."""
        if "encoder" not in self._shared:
            encoder, _ = load_encoder(self.run_dir)
            self._shared["encoder"] = encoder.requires_grad_(False).eval().to(self.device)
        return self._shared["encoder"]

    def load_encoder(self, drop_path: float = 0.0) -> ViTBackbone:
        """A fresh trainable copy of the pretrained encoder (train mode, on the CPU), with stochastic
        depth ``drop_path``; the fixed position embedding stays frozen."""
        encoder, _ = load_encoder(self.run_dir)
        if drop_path:
            fresh = ViTBackbone(**encoder.signature(), drop_path=drop_path)
            fresh.load_state_dict(encoder.state_dict())
            encoder = fresh
        return encoder.train()

    # -- data -----------------------------------------------------------------------------------------------
    @property
    def img_size(self) -> int:
        return int(self.record["arch"]["img_size"]) if "arch" in self.record else self.frozen_encoder().img_size

    def dataset(self, split: str):
        """The labelled ``split`` ("train" or "test") of the evaluation data set, uint8 images:
        (Dataset of (image, label), DatasetInfo). Use ``split_indices`` for the subsets."""
        if split not in ("train", "test"):
            raise ValueError(split)
        if split not in self._shared:
            ds, info = load_dataset(self.data, self.data_root, split, img_size=self.img_size)
            in_chans = int(self.record.get("arch", {}).get("in_chans", info.in_chans))
            if info.in_chans != in_chans:
                raise UserError(f"the encoder takes {in_chans}-channel images but {self.data} has {info.in_chans}; evaluate on a data set with {in_chans} channel(s)")
            self._shared[split] = (ds, info)
        return self._shared[split]

    @property
    def info(self) -> DatasetInfo:
        return self.dataset("train")[1]

    @property
    def num_classes(self) -> int:
        return self.info.num_classes

    def normalization(self) -> tuple[tuple, tuple]:
        """The mean / std the encoder was pretrained with (its inputs must look the same), else the
        evaluation data set's."""
        pre = self.record.get("data_info") or {}
        if "mean" in pre and len(pre["mean"]) == self.info.in_chans:
            return tuple(pre["mean"]), tuple(pre["std"])
        return self.info.mean, self.info.std

    def transform(self):
        mean, std = self.normalization()
        return eval_transform(self.img_size, self.info.img_size, mean, std)

    def split_indices(self, split: str) -> np.ndarray:
        """Sorted image indices of "train" / "heldout" (disjoint parts of the labelled train split) or
        "test", sized by this protocol's ``train_size`` / ``heldout_size`` / ``test_size``."""
        p = self.params
        if split == "test":
            n = len(self.dataset("test")[0])
            sub = fixed_subset(n, p["test_size"], seed=SPLIT_SEED)
            return np.arange(n) if sub is None else sub
        if split not in ("train", "heldout"):
            raise ValueError(f"unknown split '{split}'; use train, heldout or test")
        n = len(self.dataset("train")[0])
        held = p["heldout_size"]
        n_held = int(round(held * n)) if isinstance(held, float) else int(held)
        if not 0 < n_held < n:
            raise UserError(f"heldout_size={held} leaves no held-out or no train images out of {n}; pick 0 < heldout_size < {n}")
        perm = np.random.default_rng(SPLIT_SEED).permutation(n)
        if split == "heldout":
            return np.sort(perm[:n_held])
        rest = perm[n_held:]
        return np.sort(rest if p["train_size"] is None else rest[: p["train_size"]])

    def split_key(self, split: str) -> tuple:
        """What fixes the images of ``split`` (protocols with the same key share its cached features)."""
        p = self.params
        return (split, p["test_size"]) if split == "test" else (split, p["train_size"], p["heldout_size"])

    def features(self, split: str, kinds: Sequence[str] = ("cls", "mean")) -> Features:
        """Frozen-encoder features of ``split``: cached under ``cache_dir``, extracted when missing.
        A missing split is extracted with every kind the protocols of this evaluation read from the same
        images (their ``feature_kinds``), so one pass of the encoder serves them all."""
        ds, _ = self.dataset("test" if split == "test" else "train")
        mean, std = self.normalization()
        key = {
            "checkpoint_sha256": self.checkpoint_sha256, "data": self.data,
            "data_root": str(Path(self.data_root).resolve()) if self.data_root else None,
            "split": split, "img_size": self.img_size, "mean": list(mean), "std": list(std),
        }
        f = self.feature_cfg
        return load_features(
            cache_dir=self.cache_dir, key_fields=key, dataset=ds, indices=self.split_indices(split),
            transform=self.transform(), encoder_fn=self.frozen_encoder,
            kinds=sorted({*kinds, *self._shared.get("kinds", {}).get(self.split_key(split), ())}), cache_mb=f["cache_mb"],
            batch_size=f["batch_size"], num_workers=f["num_workers"], device=self.device,
        )

    def augmented_train(self) -> AugmentedImages:
        """The probe's training images, cropped and flipped anew each epoch (seed: the protocol's ``seed``)
        and encoded by the frozen encoder batch by batch."""
        ds, info = self.dataset("train")
        plain = eval_transform(self.img_size, info.img_size, (0.0,) * info.in_chans, (1.0,) * info.in_chans)  # [0, 1], common side
        mean, std = self.normalization()
        return AugmentedImages(
            TransformedSubset(ds, self.split_indices("train"), plain), self.frozen_encoder, self.img_size, mean, std,
            seed=int(self.params["seed"]), device=self.device, num_workers=self.feature_cfg["num_workers"],
            encoder_threads=torch.get_num_threads(),
        )


def parse_protocols(protocols: str | Sequence[str]) -> list[str]:
    """"knn,linear" or ["knn", "linear"] -> validated list; unknown or unavailable names: UserError."""
    names = comma_list(protocols)
    if not names:
        raise UserError(f"no protocol given; choose from {', '.join(protocol_names())}")
    for name in names:
        get_protocol(name)
    return names


def make_context(run_dir: str | Path, data: str | None, data_root: str | None, preset: str, cfg: dict) -> EvalContext:
    """Validate the run (one clear error for a missing / unfinished run or checkpoint) and set up."""
    run_dir = Path(run_dir)
    record = read_run(run_dir)
    ckpt = run_dir / CHECKPOINT_NAME
    if not ckpt.is_file():
        raise UserError(f"checkpoint {ckpt} not found; the run directory is incomplete, rerun `ssl-bench pretrain`")
    f = cfg["features"]
    run_data = record.get("data") or record["config"]["data"]["name"]
    if data_root is None and (data or run_data) == run_data:  # the run's own data set: where the run read it
        data_root = (record.get("config") or {}).get("data", {}).get("root")
    ctx = EvalContext(
        run_dir=run_dir, record=record, data=data or run_data,
        data_root=data_root, preset=preset, params={}, device=resolve_device(f["device"], "features.device"),
        checkpoint_sha256=file_sha256(ckpt), feature_cfg=f,
        cache_dir=Path(f["cache_dir"]) if f.get("cache_dir") else run_dir / FEATURES_DIR,
    )
    ctx.frozen_encoder()  # a corrupt checkpoint fails here, before any protocol runs
    return ctx


def _check_applicable(method: str | None, protocols: Sequence[str]) -> None:
    """A method may declare the protocols its encoder admits (``Method.protocols``): raw pixels cannot be fine-tuned."""
    from ssl_bench.registry import get_method

    allowed = get_method(method).protocols if method else None
    refused = [p for p in protocols if allowed is not None and p not in allowed]
    if refused:
        raise UserError(f"protocol {', '.join(refused)} does not apply to a {method} run (it admits {', '.join(allowed)}); "
                        f"drop it from --protocol")


def parse_modes(modes: str | Sequence[str] | None) -> list[str] | None:
    """"fast,official" -> ["fast", "official"]; None: each protocol's preset mode."""
    if modes is None:
        return None
    names = comma_list(modes)
    bad = [m for m in names if m not in MODES]
    if bad or not names:
        raise UserError(f"unknown mode(s) {', '.join(bad) or '(none)'}; choose from {', '.join(MODES)} (comma-separated)")
    return names


def plan_modes(names: Sequence[str], cfg: dict, modes: Sequence[str] | None) -> list[tuple[str, dict]]:
    """(protocol, its params) for every evaluation to run: each probe once per mode in ``modes`` (None: its
    preset's), fine-tuning once (its mode is a property of its recipe, not a choice)."""
    plan = []
    for name in names:
        if modes is None or name == "finetune" or "mode" not in cfg[name]:  # plug-ins without modes: once
            plan.append((name, cfg[name]))
        else:
            plan += [(name, {**cfg[name], "mode": m}) for m in modes]
    return plan


def evaluate(
    run_dir: str | Path, protocols: Sequence[str] | str, data: str | None = None, data_root: str | None = None,
    preset: str = "quick", overrides: Sequence[str] = (), modes: str | Sequence[str] | None = None,
) -> list[Path]:
    """Run each protocol (in each of ``modes``) on the run's encoder; one record per protocol and mode
    under ``run_dir/evals``."""
    names = parse_protocols(protocols)
    modes = parse_modes(modes)
    cfg = resolve_eval_config(preset, list(overrides))
    base = make_context(run_dir, data, data_root, preset, cfg)
    remove_stale_temps(base.run_dir)  # feature caches or records a killed evaluation was writing
    _check_applicable(base.record.get("method"), names)
    cfg = resolve_eval_config(preset, list(overrides), arch=base.record.get("arch", {}).get("arch"))
    chosen = {name: get_protocol(name) for name in names}
    plan = plan_modes(names, cfg, modes)
    kinds: dict[tuple, set] = {}  # (split, sizes) -> every feature kind read from those images
    for name, params in plan:
        ctx = dataclasses.replace(base, params=params)
        for split, ks in kinds_per_split(chosen[name], params).items():
            kinds.setdefault(ctx.split_key(split), set()).update(ks)
    base._shared["kinds"] = kinds
    paths = []
    for name, params in plan:
        protocol = chosen[name]
        ctx = dataclasses.replace(base, params=params)  # shares the loaded encoder and data sets
        start = time.perf_counter()
        result = protocol.evaluate(ctx)
        missing = {"top1", "selected", "details"} - set(result)
        if missing:
            raise RuntimeError(f"protocol {name} ({protocol.evaluate.__module__}) returned no {sorted(missing)}")
        mode = params.get("mode")
        n_test = int(result["details"].get("n_test", 0))
        record: dict[str, Any] = {
            "protocol": name, "mode": mode, "data": ctx.data, "preset": preset, "top1": float(result["top1"]),
            "ci95": wilson_interval(float(result["top1"]), n_test) if n_test > 0 else None, "n_test": n_test,  # None: no n_test given
            "warnings": list(result.get("warnings", [])),
            "selected": result["selected"], "details": result["details"],
            "method": base.record.get("method"), "run_dir": str(base.run_dir.resolve()),
            "checkpoint_sha256": base.checkpoint_sha256, "wall_time_s": time.perf_counter() - start,
            "hardware": hardware(), "created": now_iso(),
            "config": {"features": cfg["features"], name: params}, "overrides": list(overrides),
            "device": str(ctx.device), "git_commit": git_commit(),
        }
        stem = eval_stem(name, ctx.data, preset, mode)
        paths.append(write_json_new(base.run_dir / EVALS_DIR, stem, record))
    return paths
