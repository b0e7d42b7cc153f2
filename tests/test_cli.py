"""The command line: listing, a smoke run, and one clear line for each kind of bad input."""
import json
import shutil

import pytest

from ssl_bench_app.cli import main


def run_cli(capsys, *argv):
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code, err, *fragments):
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, err
    assert lines[0].startswith("ssl-bench: error: ")
    for f in fragments:
        assert f in lines[0], (f, lines[0])


def test_methods_lists_mae(capsys):
    code, out, _ = run_cli(capsys, "methods")
    assert code == 0 and any(line.startswith("mae ") for line in out.splitlines())


def test_smoke_pretrain_writes_record(capsys, tmp_path):
    code, out, _ = run_cli(capsys, "pretrain", "--method", "mae", "--data", "fashion_mnist", "--preset", "smoke",
                           "--out", str(tmp_path / "run"), "train.progress=false")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert code == 0 and "finished" in out
    assert record["status"] == "finished" and record["images_per_s"] > 0
    assert 0 < record["loss"]["loss"]["last"] < float("inf")


def test_unknown_method(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pretrain", "--method", "nope", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "unknown method 'nope'", "mae")


def test_unknown_data_set(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pretrain", "--method", "mae", "--data", "mnist2", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "unknown data set 'mnist2'", "fashion_mnist", "imagefolder")


def test_unknown_preset(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pretrain", "--method", "mae", "--preset", "huge", "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "unknown preset 'huge'", "smoke")


def test_missing_data_path(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pretrain", "--method", "mae", "--preset", "smoke", "--data-root", str(tmp_path / "none"),
                           "--out", str(tmp_path / "r"))
    assert_one_line_error(code, err, "Fashion-MNIST not found", "apt-get install dataset-fashion-mnist", "--data-root")


@pytest.mark.parametrize("override,fragment", [
    ("train.epoch=3", "unknown config key 'train.epoch'"),
    ("optim.lr=1", "unknown config key 'optim.lr'"),
    ("method.mask_ration=0.5", "unknown config key 'method.mask_ration'"),
    ("train", "not of the form key=value"),
    ("train.epochs=1o", "config key 'train.epochs' takes a number, got '1o'"),
    ("train.progress=1", "config key 'train.progress' takes one of true, false, auto, bar, lines, off"),
    ("method.mask_ratio=true", "config key 'method.mask_ratio' takes a number"),
])
def test_unknown_override_key(capsys, tmp_path, override, fragment):
    code, _, err = run_cli(capsys, "pretrain", "--method", "mae", "--preset", "smoke", "--out", str(tmp_path / "r"), override)
    assert_one_line_error(code, err, fragment)


@pytest.mark.parametrize("workers", [0, 1])
def test_corrupt_image_is_named(capsys, tmp_path, workers):
    from PIL import Image

    for cls in ("a", "b"):
        (tmp_path / "data" / cls).mkdir(parents=True)
        for i in range(20):
            Image.new("RGB", (40, 40), (i * 10, 0, 0)).save(tmp_path / "data" / cls / f"{i}.png")
    bad = tmp_path / "data" / "b" / "7.png"
    bad.write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    code, _, err = run_cli(capsys, "pretrain", "--method", "mae", "--data", "imagefolder", "--data-root", str(tmp_path / "data"),
                           "--preset", "smoke", "--out", str(tmp_path / "r"), "data.img_size=28", "data.subset=none",
                           f"data.num_workers={workers}", "train.progress=false", "train.batch_size=8")
    assert_one_line_error(code, err, "cannot read image", str(bad))


def test_resume_with_checkpoint_of_other_architecture(capsys, tmp_path):
    common = ["--method", "mae", "--preset", "smoke", "train.progress=false", "train.max_steps=2"]
    assert run_cli(capsys, "pretrain", "--out", str(tmp_path / "a"), *common)[0] == 0
    assert run_cli(capsys, "pretrain", "--out", str(tmp_path / "b"), *common, "model.embed_dim=32")[0] == 0
    # an interrupted run a, whose checkpoint was swapped for one of another width
    record = json.loads((tmp_path / "a" / "run.json").read_text())
    record["status"] = "interrupted"
    (tmp_path / "a" / "run.json").write_text(json.dumps(record))
    shutil.copy(tmp_path / "b" / "checkpoint.pt", tmp_path / "a" / "checkpoint.pt")
    code, _, err = run_cli(capsys, "pretrain", "--method", "mae", "--preset", "smoke", "--out", str(tmp_path / "a"), "--resume")
    assert_one_line_error(code, err, "another architecture", "embed_dim: checkpoint 32 vs this run 64")


def test_resume_of_empty_dir(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pretrain", "--method", "mae", "--out", str(tmp_path), "--resume")
    assert_one_line_error(code, err, "nothing to resume")


def test_overrides_keep_their_types_but_allow_none_and_numbers_of_either_kind():
    from ssl_bench.config import resolve_config
    from ssl_bench.registry import get_method

    cfg = resolve_config(get_method("mae"), "smoke", ["train.epochs=2.5", "train.blr=1e-3", "data.subset=none", "train.lr=0.01",
                                                      "model.arch=vit_small", "train.betas=(0.9,0.99)"])
    assert (cfg["train"]["epochs"], cfg["train"]["blr"], cfg["data"]["subset"]) == (2.5, 1e-3, None)
    assert (cfg["train"]["lr"], cfg["model"]["arch"], cfg["train"]["betas"]) == (0.01, "vit_small", (0.9, 0.99))


def test_resume_takes_method_and_config_from_the_run(capsys, tmp_path, monkeypatch):
    from methods.mae import MAE
    from tests.test_trainer import interrupt_after

    out = str(tmp_path / "r")
    with monkeypatch.context() as m:
        interrupt_after(m, MAE, 3)
        assert run_cli(capsys, "pretrain", "--method", "mae", "--preset", "smoke", "--out", out, "train.progress=false",
                       "train.max_steps=5", "train.ckpt_every=2")[0] == 130
    code, _, err = run_cli(capsys, "pretrain", "--resume", "--out", out, "--preset", "quick")
    assert_one_line_error(code, err, "is a run with --preset smoke, not quick")
    code, _, err = run_cli(capsys, "pretrain", "--resume", "--out", out, "train.epochs=3")
    assert_one_line_error(code, err, "keeps the config it started with", "train.epochs=3")
    code, out_text, _ = run_cli(capsys, "pretrain", "--resume", "--out", out)  # as the README writes it
    assert code == 0 and "mae: finished after 5 steps" in out_text


@pytest.mark.parametrize("command", [
    ["pretrain", "--method", "mae", "--preset", "smoke"],
    ["throughput", "--preset", "smoke", "--methods", "mae", "--steps", "3", "--rounds", "1", "--no-limits"],
    ["make-jpeg-folder", "--images", "2", "--size", "16x16"],
    ["export", "--run", "MAE_RUN"],
    ["leaderboard", "--results", "MAE_RUN"],
])
def test_an_output_folder_that_cannot_be_made_is_one_line_before_any_work(capsys, tmp_path, monkeypatch, mae_run, command):
    """--out under a regular file (as a read-only or mistyped path would be): one line naming the folder and --out,
    before anything is trained or measured."""
    import ssl_bench.trainer

    def work(*args, **kwargs):
        raise AssertionError("the command started its work before making its --out folder")

    monkeypatch.setattr(ssl_bench.trainer, "_pretrain", work)
    (tmp_path / "a-file").write_text("")
    out = tmp_path / "a-file" / "out"
    code, _, err = run_cli(capsys, *[str(mae_run) if a == "MAE_RUN" else a for a in command], "--out", str(out))
    assert_one_line_error(code, err, f"cannot create folder {out}", "--out")


def test_overrides_may_follow_options_and_empty_values_are_refused(capsys, tmp_path):
    """argparse alone rejects a key=value placed after an option, and takes --preset "" as no preset at all."""
    code, text, err = run_cli(capsys, "pretrain", "--method", "mae", "--preset", "smoke", "train.max_steps=1", "--out",
                              str(tmp_path / "r"), "train.progress=false", "data.subset=64")
    assert code == 0, err
    assert json.loads((tmp_path / "r" / "run.json").read_text())["config"]["data"]["subset"] == 64
    for argv, named in ((["pretrain", "--method", "mae", "--preset", ""], "--preset is empty"),
                        (["pretrain", "--method", "mae", "--data-root", ""], "--data-root is empty"),
                        (["sweep", "--methods", "mae", "--protocols", ""], "--protocols is empty"),
                        (["pretrain", "--method", "mae", ""], "an override is empty"),
                        (["pretrain", "--method", "mae", "--out", str(tmp_path / "s"), "--bogus"], "unrecognized arguments: --bogus")):
        with pytest.raises(SystemExit) as exit_:
            main(argv)
        assert exit_.value.code == 2 and named in capsys.readouterr().err
    assert not (tmp_path / "s").exists()
