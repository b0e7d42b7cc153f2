"""`ssl-bench throughput`: trainer, step-alone and loader-alone figures for both data paths in one table."""
import json
import shutil
import sys
from pathlib import Path

import pytest
import torch

from ssl_bench_app.cli import main
from tests.conftest import TINY_VIT


def test_compare_paths_table(tmp_path, capsys):
    code = main(["throughput", "--preset", "smoke", "--methods", "mae, mae", "--steps", "3", "--limit-steps", "2",
                 "--rounds", "3", "--compare-paths", "--out", str(tmp_path)])
    assert code == 0
    record = json.loads((tmp_path / "throughput-fashion_mnist-smoke.json").read_text())
    rows = record["rows"]
    assert [(r["method"], r["data_path"]) for r in rows] == [("mae", "per-sample CPU"), ("mae", "batched device")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["step_images_per_s"] > 0 and r["loader_images_per_s"] > 0
        # three alternating rounds: medians, and the ratio is the median of the rounds' own ratios
        assert len(r["trainer_images_per_s_rounds"]) == len(r["step_images_per_s_rounds"]) == 3
        assert r["images_per_s"] == sorted(r["trainer_images_per_s_rounds"])[1]
        assert r["step_images_per_s"] == sorted(r["step_images_per_s_rounds"])[1]
        ratios = [t / s for t, s in zip(r["trainer_images_per_s_rounds"], r["step_images_per_s_rounds"])]
        assert r["trainer_over_step"] == sorted(ratios)[1]
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU: no MFU or GPU memory
        assert r["data_share"] == sorted(r["data_share_rounds"])[1] and all(0 <= w <= 1 for w in r["data_share_rounds"])
    md = (tmp_path / "throughput-fashion_mnist-smoke.md").read_text()
    assert "trainer / step" in md and "loader alone img/s (1 core)" in md and "waiting for data" in md
    assert "Loader alone, batched / per-sample (same core): mae " in md and "--compare-paths" in md
    assert "CPU:" in md  # names the hardware


def test_rounds_below_one_is_a_one_line_error(tmp_path, capsys):
    code = main(["throughput", "--preset", "smoke", "--methods", "mae", "--rounds", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "--rounds must be at least 1" in err


def test_a_method_list_naming_nothing_is_a_one_line_error(tmp_path, capsys):
    code = main(["throughput", "--preset", "smoke", "--methods", " , ,", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.count("\n") == 0 and "names no method" in err and not list(tmp_path.iterdir())
    assert main(["throughput", "--preset", "smoke", "--loader-only", "--out", str(tmp_path / "x")]) == 2
    assert "--loader-only is the image folder's loader table" in capsys.readouterr().err and not (tmp_path / "x").exists()


STANDIN = Path(__file__).parent / "fixtures" / "official_standin"  # the official repositories' entry points, tiny


def test_official_step_is_timed_beside_ours_at_our_sizes(tmp_path):
    official = tmp_path / "official"
    shutil.copytree(STANDIN, official)
    code = main(["throughput", "--preset", "smoke", "--data", "synthetic", "--methods", "mae", "--steps", "3", "--limit-steps", "1",
                 "--rounds", "1", "--official-code", str(official), "--out", str(tmp_path / "out"),
                 *TINY_VIT, "data.img_size=28", "model.patch_size=7", "method.mask_ratio=0.6"])
    assert code == 0
    built = json.loads((official / "mae" / "built.json").read_text())
    assert {k: built[k] for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "mask_ratio")} \
        == {"img_size": 28, "patch_size": 7, "in_chans": 3, "embed_dim": 32, "depth": 1, "num_heads": 2, "mlp_ratio": 4.0, "mask_ratio": 0.6}
    assert "models_mae" not in sys.modules  # the official module is gone once measured
    row = json.loads((tmp_path / "out" / "throughput-synthetic-smoke.json").read_text())["rows"][0]
    assert row["official_step_images_per_s"] > 0 and len(row["official_step_images_per_s_rounds"]) == 1
    assert row["step_over_official"] == row["step_images_per_s"] / row["official_step_images_per_s"]
    md = (tmp_path / "out" / "throughput-synthetic-smoke.md").read_text()
    assert "official step img/s" in md and "step / official" in md and "trainer / official" in md
    assert f"--official-code {official}" in md


def test_official_code_errors_are_one_line(tmp_path, capsys):
    for methods, expected in (("mae", f"no official code at {tmp_path / 'mae'}"), ("simsiam", "none of simsiam has an official step")):
        code = main(["throughput", "--preset", "smoke", "--methods", methods, "--official-code", str(tmp_path), "--out", str(tmp_path)])
        err = capsys.readouterr().err.strip()
        assert code != 0 and err.count("\n") == 0 and expected in err


@pytest.mark.parametrize("compiles", [True, False])
def test_the_table_says_whether_each_step_alone_ran_compiled(tmp_path, monkeypatch, compiles):
    """With train.compile on, a step whose compilation failed runs eagerly (one line on stderr): the table says
    so for ours and the official step, since an eager step beside a compiled one is not the claimed comparison.
    torch.compile is stood in for (identity, or a compiled function that fails at its first call)."""
    def failing(*args, **kwargs):
        raise RuntimeError("stand-in compiler failure")

    monkeypatch.setattr(torch, "compile", lambda fn, **kw: fn if compiles else failing)
    official = tmp_path / "official"
    shutil.copytree(STANDIN, official)
    assert main(["throughput", "--preset", "smoke", "--data", "synthetic", "--methods", "mae", "--steps", "3", "--limit-steps", "1",
                 "--rounds", "1", "--official-code", str(official), "--out", str(tmp_path / "out"),
                 *TINY_VIT, "data.img_size=28", "model.patch_size=7", "train.compile=true", "data.compile_views=false"]) == 0
    row = json.loads((tmp_path / "out" / "throughput-synthetic-smoke.json").read_text())["rows"][0]
    assert row["step_compiled"] is compiles and row["official_step_compiled"] is compiles
    said = "compiled" if compiles else "eager: compiling failed"
    assert f"Step alone: mae {said}, official {said}" in (tmp_path / "out" / "throughput-synthetic-smoke.md").read_text()


def test_step_flops_counts_forward_and_backward():
    """MFU's numerator: one more MAE decoder block adds, per image over its 17 tokens (16 patches and cls),
    the block's linear layers (12 w^2 multiply-adds a token) and attention (two n x n x w products) three
    times over: forward, then gradients of inputs and weights; flash attention's backward counts 2.5 forwards."""
    from ssl_bench.config import resolve_config
    from ssl_bench.registry import get_method
    from ssl_bench.throughput import build_on_device, held_batch, step_flops

    per_image = []
    for depth in (1, 2):
        cfg = resolve_config(get_method("mae"), "smoke", [
            "data.name=synthetic", "data.img_size=28", "model.patch_size=7", *TINY_VIT, "method.decoder_dim=32",
            "method.decoder_heads=2", f"method.decoder_depth={depth}", "train.batch_size=2", "train.device=cpu", "data.num_workers=0"])
        method, device = build_on_device(cfg)
        method.train()
        batch = held_batch(cfg, method, device)
        per_image.append(step_flops(method, batch, device, "none") / len(batch["views"][0]))
    w, n = 32, 17
    linear, attention = 2 * 12 * w * w * n, 2 * 2 * n * n * w  # forward FLOPs of one block, per image
    assert per_image[1] - per_image[0] == 3 * linear + 3.5 * attention


def count_flops(*args: str):
    """scripts/count_flops.py run as a user runs it."""
    import subprocess

    script = Path(__file__).parents[1] / "scripts" / "count_flops.py"
    return subprocess.run([sys.executable, str(script), *args], capture_output=True, text=True)


def test_count_flops_script_names_a_bad_method_in_one_line():
    done = count_flops("mae,nope", "--preset", "smoke")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.strip().startswith("count_flops: error: unknown method 'nope'") and done.stderr.count("\n") == 1


def test_count_flops_script_names_missing_data_in_one_line_with_no_half_table(tmp_path):
    """A missing data set shows only when a method is built, after the configs resolve: still nothing on
    stdout (no table header), and one line on stderr naming the data set."""
    done = count_flops("mae,simsiam", "--preset", "smoke", "--data", "cifar10", f"data.root={tmp_path / 'absent'}")
    assert done.returncode == 1 and done.stdout == "", done.stdout
    assert done.stderr.startswith("count_flops: error: ") and "cifar" in done.stderr.lower() and done.stderr.count("\n") == 1


def test_count_flops_script_counts_a_method_whose_tokenizer_is_trained_at_pretraining():
    """BEiT's method.tokenizer=auto is trained when pretraining starts; the script counts it with that network
    untrained (same architecture: tests/test_tokenizer.py) and says so, with no training and no error."""
    done = count_flops("beit", "--preset", "smoke")
    assert done.returncode == 0, done.stderr[-2000:]
    row = next(line for line in done.stdout.splitlines() if line.startswith("| beit |"))
    assert float(row.split("|")[2]) > 0
    assert "beit: counted with the untrained network of the tokenizer method.tokenizer=auto trains" in done.stdout
