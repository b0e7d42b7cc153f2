"""The presets: `standard` (the reference study on one GPU) borrows each method's published `full` recipe
at one budget for all methods; it is built and run here at smoke scale on the CPU."""
from __future__ import annotations

import pytest

from ssl_bench_app.cli import main
from ssl_bench.config import PRESETS, resolve_config
from ssl_bench.registry import available_methods, get_method
from ssl_bench_app.sweep import plan

from tests.test_leaderboard import TINY_EVALS


@pytest.mark.parametrize("method", [m for m in available_methods() if get_method(m).pretrains])
def test_standard_is_the_full_recipe_at_one_budget(method):
    standard, full = resolve_config(get_method(method), "standard"), resolve_config(get_method(method), "full")
    assert standard["train"]["epochs"] == PRESETS["standard"]["train"]["epochs"]  # the same for every method
    share = full["train"]["warmup_epochs"] / full["train"]["epochs"]
    assert standard["train"]["warmup_epochs"] == pytest.approx(share * standard["train"]["epochs"])
    for key in ("blr", "betas", "weight_decay", "optimizer", "clip_grad"):  # the published hyper-parameters
        assert standard["train"][key] == full["train"][key], key
    assert standard["method"] == full["method"]
    assert standard["data"]["subset"] is None  # the whole training set


def test_standard_defaults_to_three_seeds(tmp_path):
    sweep = plan("mae", None, "knn", "fashion_mnist", None, "standard", tmp_path)
    assert [r.seed for r in sweep.runs] == [0, 1, 2]
    assert [r.seed for r in plan("mae", None, "knn", "fashion_mnist", None, "quick", tmp_path).runs] == [0]


def test_standard_bench_runs_at_smoke_scale(tmp_path, capsys):
    shrink = ["model.embed_dim=64", "model.depth=2", "model.num_heads=2", "model.patch_size=7", "data.subset=256",
              "data.num_workers=0", "train.batch_size=32", "train.max_steps=2", "train.progress=false"]
    argv = ["bench", "--preset", "standard", "--methods", "mae,random_init,raw_pixels", "--seeds", "0", "--results", str(tmp_path),
            "--protocols", "knn,linear", "--eval-override", "features.num_workers=0", *shrink]
    for o in TINY_EVALS:
        if o.startswith(("knn.", "linear.")):
            argv[1:1] = ["--eval-override", o]
    assert main(argv) == 0, capsys.readouterr().err
    bench = tmp_path / "fashion_mnist-standard"
    assert sorted(p.parent.parent.name + "/" + p.name for p in bench.glob("*/evals/*.json")) == [
        f"{m}-s0/{p}-fashion_mnist-standard.json" for m in ("mae", "random_init", "raw_pixels") for p in ("knn", "linear")
    ]
    assert (bench / "leaderboard.md").exists()


def test_raw_pixels_control_probes_the_input_pixels(tmp_path, capsys):
    """The raw-pixels row: 0 steps, no weights, and its features are exactly the normalised input pixels."""
    import torch

    from evals.run import evaluate
    from ssl_bench.checkpoint import load_encoder
    from ssl_bench.trainer import pretrain
    from tests.conftest import smoke_config

    record = pretrain(smoke_config("raw_pixels"), tmp_path / "run")
    assert record["status"] == "finished" and record["steps"] == 0 and record["family"] == "control"
    encoder, _ = load_encoder(tmp_path / "run")
    assert sum(p.numel() for p in encoder.parameters()) == 0
    images = torch.randn(3, 1, 28, 28)
    cls, tokens = encoder(images)
    assert torch.equal(cls, images.flatten(1)) and torch.equal(tokens[:, 0], images.flatten(1))
    # fine-tuning does not apply: one line, before any work
    from ssl_bench.errors import UserError

    with pytest.raises(UserError, match="protocol finetune does not apply to a raw_pixels run"):
        evaluate(tmp_path / "run", ["knn", "finetune"], preset="smoke")
    paths = evaluate(tmp_path / "run", ["knn"], preset="smoke", overrides=["knn.train_size=500", "knn.test_size=200"])
    assert len(paths) == 1


def test_quick_runs_data_sets_of_any_size(tmp_path):
    """The quick preset's 7-px patches fit any data set: images are resized to 28 px (CIFAR's 32 would not divide)."""
    from ssl_bench.trainer import pretrain

    cfg = resolve_config(get_method("mae"), "quick", ["data.name=synthetic", "data.subset=128", "data.num_workers=0",
                                                      "train.max_steps=1", "train.progress=false"])
    record = pretrain(cfg, tmp_path / "run")
    assert record["status"] == "finished" and record["arch"]["img_size"] == 28
