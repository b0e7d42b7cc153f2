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
import math
import tomllib
from dataclasses import dataclass
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
        "decode": "cpu",  # image folders: cpu (decode + views per sample in the workers) | device (JPEGs decoded in batches on the training device)
        "device_augment": True,  # in-memory data sets: batched views on the training device (false: per sample on CPU)
        "compile_views": "auto",  # batched views through torch.compile: auto (whenever the step is compiled) | true | false
    },
    "model": {
        "arch": "vit_tiny",
        "patch_size": 4,
        "embed_dim": None,  # None: the arch's width/depth/heads
        "depth": None,
        "num_heads": None,
        "drop_path": 0.0,
        "layer_scale": None,  # LayerScale init value (BEiT / CAE: 0.1); None: no LayerScale
        "rel_pos_bias": "none",  # none: fixed sin-cos absolute positions; shared: BEiT's shared relative position bias
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
        "weight_decay_end": None,  # None: constant; a number: half-cosine from weight_decay to this over training (DINO)
        "betas": (0.9, 0.95),
        "momentum": 0.9,
        "clip_grad": None,
        "amp": "auto",  # auto (bf16 on GPU, off on CPU) | bf16 | none
        "compile": "auto",  # auto: on for GPU runs of the full preset (eager if compiling fails) | true | false
        # torch.compile's mode for the step: default | reduce-overhead (CUDA graphs: one launch for many kernels, for
        # steps the host cannot launch fast enough) | max-autotune | max-autotune-no-cudagraphs
        "compile_mode": "default",
        "ckpt_every": 200,
        "log_every": 10,
        "progress": "auto",  # auto (a bar on a terminal, a line every 30 s otherwise) | bar | lines | off (or true/false)
        "device": "auto",  # auto | cpu | cuda
        "wandb": False,  # also log to wandb (pip install 'ssl-bench[wandb]'; WANDB_MODE=offline needs no network)
        "wandb_project": "ssl-bench",
    },
    "monitor": {  # progress probes during pretraining (ssl_bench.monitor); labels reach only the probes
        "online_probe": False,  # linear probe on the detached cls token, trained alongside
        "probe_lr": 0.1,
        "probe_every": 1,  # train the online probe every N steps (its extra encoder forward costs like a step)
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
    # the main job (scripts/bench.sh): every method and probe in about 30 minutes on 2 CPU cores. A 4-block,
    # 96-wide ViT on 16 patches (7 px), one epoch of the whole training set: measured on the idle 2-core
    # machine, 520 (DINO) to 1,800 (MAE) images/s, so 33-117 s per method (results/fashion_mnist-quick)
    # Every data set is resized to 28 px at quick (Fashion-MNIST's own size, so its table is what it was), so
    # that CIFAR, STL-10 or a folder fit the same budget and the same 7-px patches.
    "quick": {
        "data": {"subset": None, "num_workers": 1, "img_size": 28},
        "model": {"arch": "vit_tiny", "patch_size": 7, "embed_dim": 96, "depth": 4, "num_heads": 3},
        "train": {"epochs": 1, "batch_size": 128, "ckpt_every": 100, "log_every": 10, "warmup_epochs": 0.2},
    },
    # the reference study for one GPU: every method's `full` recipe (the published one) with its schedule
    # scaled to one budget for all (RECIPE_FROM), the whole training set, ViT-S/4
    "standard": {
        "data": {"subset": None, "num_workers": 8},
        "model": {"arch": "vit_small", "patch_size": 4, "drop_path": 0.1},
        "train": {"epochs": 50, "batch_size": 512, "ckpt_every": 1000, "log_every": 50, "warmup_epochs": 5},
        "monitor": {"online_probe": True, "probe_every": 10, "knn_every": 5},
    },
    # the published recipe scaled to the data set; meant for a GPU
    "full": {
        "data": {"subset": None, "num_workers": 8},
        "model": {"arch": "vit_small", "patch_size": 4, "drop_path": 0.1},
        "train": {"epochs": 100, "batch_size": 512, "ckpt_every": 1000, "log_every": 50, "warmup_epochs": 10},
        "monitor": {"online_probe": True, "probe_every": 10, "knn_every": 5},
    },
}


# Presets that borrow each method's recipe from another preset (unless the method has one of its own):
# the recipe's hyper-parameters apply, its schedule is rescaled to the preset's epochs (warmup in proportion).
RECIPE_FROM: dict[str, str] = {"standard": "full"}


@dataclass(frozen=True)
class Check:
    """What one config value may be: a finite number in [lo, hi] (``lo_open`` / ``hi_open`` exclude an end;
    ``integer``: a whole number), or one of ``choices``; None only where ``none_ok``. With ``each`` the
    value is a non-empty tuple (of ``length`` items, if given) whose every item is checked."""

    lo: float | None = None
    hi: float | None = None
    lo_open: bool = False
    hi_open: bool = False
    integer: bool = False
    choices: tuple = ()
    none_ok: bool = False
    each: bool = False
    length: int | None = None

    def _item_ok(self, v: Any) -> bool:
        if self.choices:
            return any(v == c and type(v) is type(c) for c in self.choices)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            return False
        if self.integer and not isinstance(v, int):
            return False
        if self.lo is not None and (v < self.lo or self.lo_open and v == self.lo):
            return False
        return self.hi is None or not (v > self.hi or self.hi_open and v == self.hi)

    def allows(self, value: Any) -> bool:
        if value is None:
            return self.none_ok
        if not self.each:
            return self._item_ok(value)
        if not isinstance(value, (list, tuple)) or not value or (self.length is not None and len(value) != self.length):
            return False
        return all(self._item_ok(v) for v in value)

    def describe(self) -> str:
        if self.choices:
            text = "one of " + ", ".join(str(c).lower() if isinstance(c, bool) else str(c) for c in self.choices)
        else:
            text = "an integer" if self.integer else "a number"
            if self.lo is not None and self.hi is not None:
                text += f" in {'(' if self.lo_open else '['}{self.lo}, {self.hi}{')' if self.hi_open else ']'}"
            elif self.lo is not None:
                text += f" {'>' if self.lo_open else '>='} {self.lo}"
            elif self.hi is not None:
                text += f" {'<' if self.hi_open else '<='} {self.hi}"
        if self.each:
            text = f"{'a list of ' + str(self.length) if self.length else 'a non-empty list of'} values, each {text}"
        return text + (", or none" if self.none_ok else "")


def as_check(spec: Check | tuple) -> Check:
    """A method's ``option_checks`` value: a Check, or ``(lo, hi)`` for a number in [lo, hi]."""
    return spec if isinstance(spec, Check) else Check(*spec)


SWITCH = Check(choices=(True, False))
AMP_CHOICES = ("auto", "bf16", "none")  # ssl_bench.runtime.autocast
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")  # torch.compile(mode=...)
# The allowed values of the common config keys (a method adds its own with ``Method.option_checks``).
CHECKS: dict[str, Check] = {
    "seed": Check(0, 2**31 - 1, integer=True),  # seeds torch, numpy and Python alike (numpy's limit is 2**32)
    "data.subset": Check(1, integer=True, none_ok=True),
    "data.img_size": Check(1, integer=True, none_ok=True),
    "data.num_workers": Check(0, integer=True),
    "data.decode": Check(choices=("cpu", "device")),
    "data.device_augment": SWITCH,
    "data.compile_views": Check(choices=("auto", True, False)),
    "model.patch_size": Check(1, integer=True),
    "model.embed_dim": Check(4, integer=True, none_ok=True),
    "model.depth": Check(1, integer=True, none_ok=True),
    "model.num_heads": Check(1, integer=True, none_ok=True),
    "model.drop_path": Check(0, 1, hi_open=True),
    "model.layer_scale": Check(0, lo_open=True, none_ok=True),
    "model.rel_pos_bias": Check(choices=("none", "shared")),
    "train.epochs": Check(0, lo_open=True),  # a fraction of an epoch is allowed (the schedule spans it)
    "train.max_steps": Check(0, integer=True, none_ok=True),
    "train.batch_size": Check(1, integer=True),
    "train.accum_steps": Check(1, integer=True),
    "train.optimizer": Check(choices=("adamw", "sgd", "lars")),
    "train.blr": Check(0, lo_open=True),
    "train.lr": Check(0, lo_open=True, none_ok=True),
    "train.min_lr": Check(0),
    "train.warmup_epochs": Check(0),
    "train.weight_decay": Check(0),
    "train.weight_decay_end": Check(0, none_ok=True),
    "train.betas": Check(0, 1, hi_open=True, each=True, length=2),
    "train.momentum": Check(0, 1),
    "train.clip_grad": Check(0, lo_open=True, none_ok=True),
    "train.amp": Check(choices=AMP_CHOICES),
    "train.compile": Check(choices=("auto", True, False)),
    "train.compile_mode": Check(choices=COMPILE_MODES),
    "train.ckpt_every": Check(1, integer=True),
    "train.log_every": Check(1, integer=True),
    "monitor.probe_every": Check(1, integer=True),
    "train.progress": Check(choices=(True, False, "auto", "bar", "lines", "off")),
    "train.device": Check(choices=("auto", "cpu", "cuda")),
}


def check_config(cfg: dict, checks: dict[str, Check], prefix: str = "") -> None:
    """Every value of ``cfg`` that ``checks`` names (by ``section.key``, or ``*.key`` for that key in
    any section) is allowed; else one line naming the key, the value given and what is allowed."""
    for key, value in cfg.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            check_config(value, checks, f"{name}.")
            continue
        check = checks.get(name) or (checks.get(f"*.{key}") if prefix else None)
        if check is not None and not check.allows(value):
            raise UserError(f"config key '{name}' takes {check.describe()}, got {_show(value)}")


def _show(value: Any) -> str:
    return "none" if value is None else str(value).lower() if isinstance(value, bool) else repr(value) if isinstance(value, str) else str(value)


def deep_merge(base: dict, update: dict) -> dict:
    """A copy of ``base`` with ``update`` merged in, recursively for nested dicts."""
    out = copy.deepcopy(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def comma_list(names: str | list[str] | tuple[str, ...]) -> list[str]:
    """"a, b,,a" (or a sequence of names) -> ["a", "b"]: stripped, empty items dropped, each name once, in order."""
    given = names.split(",") if isinstance(names, str) else names
    return list(dict.fromkeys(n.strip() for n in given if n.strip()))


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


TEXT_KEYS = ("data.root",)  # keys whose default is None but that take a path


def _checked(key: str, current: Any, value: Any, raw: str) -> Any:
    """``value`` for a key now holding ``current``: a number stays a number and a switch a switch (None is
    always allowed), so a typo such as ``train.epochs=1o`` is a one-line error, not a crash deep in a run."""
    if value is None and isinstance(current, str):
        return "none"  # a key holding a word (train.amp, model.rel_pos_bias) takes none as that word, not as None
    if isinstance(value, dict) or not isinstance(value, (str, int, float, list, tuple, type(None))):  # a table, a TOML date
        raise UserError(f"config key '{key}' takes a single value, not a {'table' if isinstance(value, dict) else type(value).__name__}, got '{raw}'")
    if key in TEXT_KEYS and not isinstance(value, (str, type(None))):
        raise UserError(f"config key '{key}' takes a path, got '{raw}'")
    numeric = isinstance(value, (list, tuple)) or isinstance(value, (int, float)) and not isinstance(value, bool)
    if isinstance(current, str) and numeric and key not in CHECKS:  # (a checked key says what it takes, once resolved)
        raise UserError(f"config key '{key}' takes a word, got '{raw}'")  # (words that also take true/false: train.compile)
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
    except UnicodeDecodeError:
        raise UserError(f"config file {path} is not UTF-8 text; save it as UTF-8 (.toml, .yaml or .json)") from None
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
            cfg[key] = _checked(name, cfg[key], value, json.dumps(value, default=str))
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
    cfg = apply_overrides(cfg, overrides or [])
    check_config(cfg, {**CHECKS, **{f"method.{k}": as_check(v) for k, v in method_cls.option_checks.items()}})
    return cfg
