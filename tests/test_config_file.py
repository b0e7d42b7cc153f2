"""`pretrain --config`: a run repeated from its run.json reaches the same weights; TOML / YAML / JSON config
files with key=value overrides on top; bad files are one clear line."""
import argparse
import json

import pytest
import torch

from ssl_bench_app.commands.pretrain import resolve
from tests.test_cli import assert_one_line_error, run_cli

TINY = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2", "train.max_steps=3", "train.progress=false"]


def weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=False)["model"]


def test_a_run_repeated_from_its_record_reaches_the_same_weights(capsys, tmp_path):
    first, again = tmp_path / "first", tmp_path / "again"
    code, _, err = run_cli(capsys, "pretrain", "--method", "mae", "--preset", "smoke", "--seed", "3", "--out", str(first),
                           *TINY, "train.blr=3e-3")
    assert code == 0, err
    code, _, err = run_cli(capsys, "pretrain", "--config", str(first / "run.json"), "--out", str(again))
    assert code == 0, err
    one, two = (json.loads((d / "run.json").read_text()) for d in (first, again))
    assert two["config"] == one["config"] and two["seed"] == 3 and two["steps"] == 3
    a, b = weights(first), weights(again)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def args_for(**given):
    defaults = dict(method=None, config=None, data=None, data_root=None, preset=None, seed=None, overrides=[])
    return argparse.Namespace(**{**defaults, **given})


TOML = """
method_name = "simsiam"
preset = "smoke"
seed = 7
[train]
epochs = 3
betas = [0.9, 0.99]
[model]
depth = 1
"""

YAML = """
method_name: simsiam
preset: smoke
seed: 7
train: {epochs: 3, betas: [0.9, 0.99]}
model: {depth: 1}
"""


@pytest.mark.parametrize("suffix,text", [(".toml", TOML), (".yaml", YAML), (".json", None)])
def test_config_files_set_keys_and_overrides_go_on_top(tmp_path, suffix, text):
    path = tmp_path / f"cfg{suffix}"
    path.write_text(text if text is not None else json.dumps(
        {"method_name": "simsiam", "preset": "smoke", "seed": 7, "train": {"epochs": 3, "betas": [0.9, 0.99]}, "model": {"depth": 1}}))
    cfg = resolve(args_for(config=str(path), overrides=["train.epochs=5"]))
    assert cfg["method_name"] == "simsiam" and cfg["preset"] == "smoke" and cfg["seed"] == 7
    assert cfg["train"]["epochs"] == 5 and cfg["train"]["betas"] == (0.9, 0.99) and cfg["model"]["depth"] == 1
    assert cfg["data"]["subset"] == 256  # the rest comes from the smoke preset
    assert resolve(args_for(config=str(path), seed=1, data="cifar10"))["seed"] == 1  # options beat the file too


@pytest.mark.parametrize("text,fragments", [
    ('method_name = "mae"\n[train]\nepochz = 3\n', ["unknown config key 'train.epochz'", "epochs"]),
    ('method_name = "mae"\nmonitr = 1\n', ["unknown config key 'monitr'"]),
    ('method_name = "mae"\n[train]\nepochs = "many"\n', ["'train.epochs' takes a number"]),
    ('method_name = "mae"\ntrain = 3\n', ["'train' is a section"]),
    ('method_name = "mae"\n[train\n', ["is not valid TOML"]),
    ('method_name = ["mae"]\n', ["'method_name' takes a name, got ['mae']"]),
    ('method_name = "mae"\n[train]\nblr = 1979-05-27T07:32:00Z\n', ["'train.blr' takes a single value, not a datetime"]),
    ('method_name = "mae"\n[model]\narch = {x = 1}\n', ["'model.arch' takes a single value, not a table"]),
    ('method_name = "mae"\n[data]\nroot = 5\n', ["'data.root' takes a path"]),
    ('[train]\nepochs = 2\n', ["which method?"]),
    ('method_name = "mae"\npreset = "smoke"\n', ["is for method 'mae' but --method says 'simsiam'"]),
])
def test_bad_config_files_are_one_clear_line(capsys, tmp_path, text, fragments):
    path = tmp_path / "cfg.toml"
    path.write_text(text)
    extra = ["--method", "simsiam"] if "--method" in fragments[0] else []
    code, _, err = run_cli(capsys, "pretrain", "--config", str(path), *extra, "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, *fragments)
    assert not (tmp_path / "r").exists()


def test_missing_or_unsupported_config_file(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pretrain", "--config", str(tmp_path / "nope.toml"))
    assert_one_line_error(code, err, "cannot read config file")
    (tmp_path / "cfg.ini").write_text("[train]\n")
    code, _, err = run_cli(capsys, "pretrain", "--config", str(tmp_path / "cfg.ini"))
    assert_one_line_error(code, err, "must end in .toml, .yaml, .yml or .json")
    (tmp_path / "latin1.toml").write_bytes('method_name = "mae"  # caf\xe9\n'.encode("latin-1"))
    code, _, err = run_cli(capsys, "pretrain", "--config", str(tmp_path / "latin1.toml"))
    assert_one_line_error(code, err, "is not UTF-8 text")
