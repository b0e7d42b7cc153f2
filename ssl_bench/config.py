"""Run configuration: a nested dict resolved as

    common defaults < common preset < method's recipe for that preset < config file < command-line overrides

A config file (``pretrain --config``) is TOML, YAML or JSON holding the same nested keys (``method_name``
and ``preset`` at the top pick the method and preset), or a run's ``run.json``, whose resolved config
repeats that run.

Every key that may be overridden exists in the defaults, so a typo is an error, not a silent no-op.
"""
from __future__ import annotations

import ast
import copy
import json
import tomllib
from pathlib import Path
from typing import Any

from ssl_bench.errors import UserError

DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "data": {
        "name": "fashion_mnist",
        "root": None,  # None: the data set's standard location
        "subset": None,  # int: train on a fixed random subset of this many images
        "img_size": None,  # None: the data set's native size
        "num_workers": 2,
    },
    "model": {
        "arch": "vit_tiny",
        "patch_size": 4,
        "embed_dim": None,  # None: the arch's width/depth/heads
        "depth": None,
        "num_heads": None,
        "drop_path": 0.0,
        "layer_scale": None,  # LayerScale init value (BEiT / CAE: 0.1); None: no LayerScale
    },
    "method": {},  # filled from the method's __init__ keyword defaults
    "train": {
        "epochs": 1,
        "max_steps": None,  # stop early after this many optimizer steps (the schedule still spans `epochs`)
        "batch_size": 64,  # per process, per micro-step
        "accum_steps": 1,
        "optimizer": "adamw",  # adamw | sgd | lars
        "blr": 1.5e-4,  # base lr; lr = blr * effective_batch / 256
        "lr": None,  # absolute lr; overrides blr when set
        "min_lr": 0.0,
        "warmup_epochs": 0.0,
        "weight_decay": 0.05,
        "betas": (0.9, 0.95),
        "momentum": 0.9,
        "clip_grad": None,
        "amp": "auto",  # auto (bf16 on GPU, off on CPU) | bf16 | none
        "compile": False,
        "ckpt_every": 200,
        "log_every": 10,
        "progress": "auto",  # auto (a bar on a terminal, a line every 30 s otherwise) | bar | lines | off (or true/false)
        "device": "auto",  # auto | cpu | cuda
    },
    "monitor": {  # progress probes during pretraining (ssl_bench.monitor); labels reach only the probes
        "online_probe": False,  # linear probe on the detached cls token, trained alongside
        "probe_lr": 0.1,
        "knn_every": 0,  # kNN check on held-out images every N epochs; 0: off
        "knn_k": 20,
        "knn_temperature": 0.07,
        "knn_train_size": 5000,
        "knn_heldout_size": 1000,
        "batch_size": 256,
    },
}

PRESETS: dict[str, dict[str, Any]] = {
    # seconds on CPU: a 2-block ViT on 16 patches, a few hundred images
    "smoke": {
        "data": {"subset": 256, "num_workers": 0},
        "model": {"arch": "vit_tiny", "patch_size": 7, "embed_dim": 64, "depth": 2, "num_heads": 2},
        "train": {"epochs": 1, "batch_size": 32, "ckpt_every": 4, "log_every": 1, "warmup_epochs": 0.0},
    },
    # a few minutes on 2 CPU cores: a 6-block ViT-Tiny on 49 patches, a subset of the training set
    "quick": {
        "data": {"subset": 10000, "num_workers": 1},
        "model": {"arch": "vit_tiny", "patch_size": 4, "depth": 6},
        "train": {"epochs": 2, "batch_size": 128, "ckpt_every": 100, "log_every": 10, "warmup_epochs": 0.2},
    },
    # the reference study for one GPU: every method's `full` recipe (the published one) with its schedule
    # scaled to one budget for all (RECIPE_FROM), the whole training set, ViT-S/4
    "standard": {
        "data": {"subset": None, "num_workers": 8},
        "model": {"arch": "vit_small", "patch_size": 4, "drop_path": 0.1},
        "train": {"epochs": 50, "batch_size": 512, "ckpt_every": 1000, "log_every": 50, "warmup_epochs": 5},
        "monitor": {"online_probe": True, "knn_every": 5},
    },
    # the published recipe scaled to the data set; meant for a GPU
    "full": {
        "data": {"subset": None, "num_workers": 8},
        "model": {"arch": "vit_small", "patch_size": 4, "drop_path": 0.1},
        "train": {"epochs": 100, "batch_size": 512, "ckpt_every": 1000, "log_every": 50, "warmup_epochs": 10},
        "monitor": {"online_probe": True, "knn_every": 5},
    },
}


# Presets that borrow each method's recipe from another preset (unless the method has one of its own):
# the recipe's hyper-parameters apply, its schedule is rescaled to the preset's epochs (warmup in proportion).
RECIPE_FROM: dict[str, str] = {"standard": "full"}


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in, recursively for nested dicts."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def parse_value(text: str) -> Any:
    """'1e-3' -> 0.001, 'true' -> True, 'none' -> None, '(0.9,0.95)' -> tuple, otherwise the string."""
    lowered = text.strip().lower()
    if lowered in ("none", "null"):
        return None
    if lowered in ("true", "false"):
        return lowered == "true"
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


# keys whose value is one of a few choices (a switch that may also be a word)
CHOICES: dict[str, tuple] = {"train.progress": (True, False, "auto", "bar", "lines", "off")}


def _checked(key: str, current: Any, value: Any, raw: str) -> Any:
    """``value`` for a key now holding ``current``: a number stays a number and a switch a switch (None is
    always allowed), so a typo such as ``train.epochs=1o`` is a one-line error, not a crash deep in a run."""
    if key in CHOICES:
        if value not in CHOICES[key] or isinstance(value, (int, float)) and not isinstance(value, bool):
            raise UserError(f"config key '{key}' takes one of {', '.join(str(c).lower() for c in CHOICES[key])}, got '{raw}'")
        return value
    if value is None or current is None:
        return value
    if isinstance(current, bool):
        if not isinstance(value, bool):
            raise UserError(f"config key '{key}' takes true or false, got '{raw}'")
    elif isinstance(current, (int, float)) and (isinstance(value, bool) or not isinstance(value, (int, float))):
        raise UserError(f"config key '{key}' takes a number, got '{raw}'")
    return value


def apply_overrides(cfg: dict, overrides: list[str]) -> dict:
    """Apply ``key.sub=value`` strings; unknown keys are an error that lists the valid ones."""
    cfg = copy.deepcopy(cfg)
    for item in overrides:
        if "=" not in item:
            raise UserError(f"override '{item}' is not of the form key=value (e.g. train.epochs=5)")
        key, raw = item.split("=", 1)
        node = cfg
        parts = key.strip().split(".")
        for i, part in enumerate(parts):
            if not isinstance(node, dict) or part not in node:
                where = ".".join(parts[:i]) or "top level"
                choices = ", ".join(sorted(node)) if isinstance(node, dict) else "(not a section)"
                raise UserError(f"unknown config key '{key}': no '{part}' under {where}; valid keys there: {choices}")
            if i == len(parts) - 1:
                if isinstance(node[part], dict):
                    raise UserError(f"config key '{key}' is a section; set one of its keys: {', '.join(sorted(node[part]))}")
                node[part] = _checked(key, node[part], parse_value(raw), raw)
            else:
                node = node[part]
    return cfg


def read_config_file(path: str | Path) -> dict:
    """The config in a ``.toml``, ``.yaml`` / ``.yml`` or ``.json`` file, or the resolved config of a run
    record (``run.json``); parsing only, nothing in the file runs."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise UserError(f"cannot read config file {path}: {e.strerror}; pass an existing .toml, .yaml or .json file (or a run's run.json)") from None
    try:
        if path.suffix == ".toml":
            data = tomllib.loads(text)
        elif path.suffix in (".yaml", ".yml"):
            try:
                import yaml
            except ImportError:
                raise UserError(f"{path}: reading YAML needs PyYAML (pip install pyyaml); or write the config as .toml or .json") from None
            data = yaml.safe_load(text)
        elif path.suffix == ".json":
            data = json.loads(text)
        else:
            raise UserError(f"config file {path} must end in .toml, .yaml, .yml or .json")
    except (tomllib.TOMLDecodeError, json.JSONDecodeError, ValueError) as e:
        raise UserError(f"config file {path} is not valid {path.suffix[1:].upper()}: {' '.join(str(e).split())}") from None
    except Exception as e:  # yaml.YAMLError, without importing yaml when it is not needed
        if type(e).__module__.startswith("yaml"):
            raise UserError(f"config file {path} is not valid YAML: {' '.join(str(e).split())}") from None
        raise
    if isinstance(data, dict) and isinstance(data.get("config"), dict) and "status" in data:
        data = data["config"]  # a run record: repeat its resolved config
    if not isinstance(data, dict):
        raise UserError(f"config file {path} must hold a table of config keys (e.g. [train] epochs = 5), not {type(data).__name__}")
    return data


def merge_config_file(cfg: dict, data: dict, source: str, prefix: str = "") -> dict:
    """``cfg`` with the values of a config file merged in; an unknown key is a one-line error naming it."""
    cfg = copy.deepcopy(cfg)
    for key, value in data.items():
        name = f"{prefix}{key}"
        if key not in cfg:
            choices = ", ".join(sorted(cfg))
            raise UserError(f"{source}: unknown config key '{name}'; valid keys {'under ' + prefix[:-1] if prefix else 'at the top level'}: {choices}")
        if isinstance(cfg[key], dict):
            if not isinstance(value, dict):
                raise UserError(f"{source}: config key '{name}' is a section; give a table of its keys ({', '.join(sorted(cfg[key]))})")
            cfg[key] = merge_config_file(cfg[key], value, source, f"{name}.")
        else:
            if isinstance(value, list) and isinstance(cfg[key], tuple):
                value = tuple(value)  # JSON / TOML / YAML have lists where the defaults hold tuples
            cfg[key] = _checked(name, cfg[key], value, json.dumps(value))
    return cfg


def resolve_config(method_cls: type, preset: str, overrides: list[str] | None = None, base: dict | None = None,
                   file_cfg: dict | None = None, file_source: str = "config file") -> dict:
    """The full config of a run of ``method_cls`` at ``preset``, with a config file's values ``file_cfg``
    (from ``read_config_file``) and then ``overrides`` applied."""
    if preset not in PRESETS:
        raise UserError(f"unknown preset '{preset}'; choose one of: {', '.join(PRESETS)}")
    cfg = deep_merge(base or DEFAULTS, {"method": method_cls.option_defaults()})
    cfg = deep_merge(cfg, PRESETS[preset])
    borrowed = preset not in method_cls.recipes and preset in RECIPE_FROM
    recipe = method_cls.recipes.get(RECIPE_FROM[preset] if borrowed else preset, {})
    unknown = [k for k in recipe if k not in cfg]
    if unknown:
        raise TypeError(f"{method_cls.__name__}.recipes['{preset}'] has unknown sections {unknown}")
    cfg = deep_merge(cfg, recipe)
    if borrowed:  # one budget for every method: the preset's epochs, with the recipe's share of warmup
        source = deep_merge(PRESETS[RECIPE_FROM[preset]], recipe)["train"]
        epochs = PRESETS[preset]["train"]["epochs"]
        cfg["train"]["epochs"] = epochs
        cfg["train"]["warmup_epochs"] = source.get("warmup_epochs", 0.0) * epochs / source["epochs"]
    cfg["method_name"] = method_cls.name
    cfg["preset"] = preset
    if file_cfg:
        cfg = merge_config_file(cfg, file_cfg, file_source)
    return apply_overrides(cfg, overrides or [])
