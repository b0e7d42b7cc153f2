"""`ssl-bench eval` end to end on a tiny pretrained run: records, the feature cache, bad input."""
import json
import shutil

import numpy as np
import pytest
import torch

import evals.features
from evals.presets import resolve_eval_config
from evals.run import make_context
from ssl_bench_app.cli import main

SIZES = ["train_size=200", "heldout_size=100", "test_size=100"]
SMALL = ["knn.ks=(5,10)", *(f"knn.{s}" for s in SIZES)]


@pytest.fixture
def fresh_run(mae_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(mae_run, copy, ignore=shutil.ignore_patterns("evals", "features"))
    return copy


@pytest.fixture
def extractions(monkeypatch):
    """Counts the passes of the encoder over a split."""
    calls = []
    original = evals.features._extract

    def counting(encoder, loader, n, kinds, path, device):
        calls.append(sorted(kinds))
        return original(encoder, loader, n, kinds, path, device)

    monkeypatch.setattr(evals.features, "_extract", counting)
    return calls


def context(run, *overrides):
    """The eval context the kNN protocol gets (smoke preset, small subsets)."""
    cfg = resolve_eval_config("smoke", [*SMALL, *overrides])
    ctx = make_context(run, None, None, "smoke", cfg)
    ctx.params = cfg["knn"]
    return ctx


def test_eval_command_writes_one_record_per_protocol_and_never_overwrites(fresh_run, capsys, extractions):
    args = ["eval", "--run", str(fresh_run), "--protocol", "knn,linear,attentive", "--preset", "smoke", *SMALL,
            "linear.epochs=2", "attentive.epochs=1", *(f"{p}.{s}" for p in ("linear", "attentive") for s in SIZES)]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    # one pass of the encoder per split, giving what every protocol of the call needs: official linear and
    # attentive probes encode their (augmented) training images themselves, so no patch tokens of train
    assert extractions == [["cls", "labels", "mean"]] + [["cls", "labels", "mean", "patches"]] * 2
    assert [ln.split()[:2] for ln in lines] == [["knn", "official"], ["linear", "official"], ["attentive", "official"]]
    records = {p: json.loads((fresh_run / "evals" / f"{p}-fashion_mnist-smoke.json").read_text()) for p in ("knn", "linear", "attentive")}
    for name, rec in records.items():
        assert rec["protocol"] == name and rec["data"] == "fashion_mnist" and rec["preset"] == "smoke" and rec["mode"] == "official"
        assert 0 <= rec["top1"] <= 100 and rec["selected"] and (rec["details"].get("grid") or rec["details"]["extra"])
        assert rec["method"] == "mae" and rec["checkpoint_sha256"] == evals.features.file_sha256(fresh_run / "checkpoint.pt")
        assert {"wall_time_s", "hardware", "created", "config", "run_dir", "warnings"} <= set(rec)
        lo, hi = rec["ci95"]
        assert rec["n_test"] == 100 and lo <= rec["top1"] <= hi and 10 < hi - lo < 25  # 95% over 100 test images
    assert records["knn"]["config"]["knn"]["ks"] == [5, 10]  # the overrides are what ran
    assert records["knn"]["selected"] == {"feature": "cls", "k": 20} and records["knn"]["details"]["n_train"] == 300
    assert {(r["feature"], r["k"]) for r in records["knn"]["details"]["extra"]} == {(f, k) for f in ("cls", "mean") for k in (5, 10, 20)}
    assert records["linear"]["details"]["train_forwards"] == 2 * (200 // 128)  # official: encoded anew every batch

    first = (fresh_run / "evals" / "knn-fashion_mnist-smoke.json").read_bytes()
    assert main(["eval", "--run", str(fresh_run), "--protocol", "knn", "--preset", "smoke", *SMALL]) == 0
    assert (fresh_run / "evals" / "knn-fashion_mnist-smoke.json").read_bytes() == first
    again = json.loads((fresh_run / "evals" / "knn-fashion_mnist-smoke-1.json").read_text())
    assert again["top1"] == records["knn"]["top1"]  # same cached features, same result


def test_eval_command_writes_both_modes_in_one_call(fresh_run, capsys):
    args = ["eval", "--run", str(fresh_run), "--protocol", "knn,linear", "--preset", "smoke", "--mode", "fast,official", *SMALL,
            "linear.epochs=1", "linear.fast_epochs=2", *(f"linear.{s}" for s in SIZES)]
    assert main(args) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert [ln.split()[:2] for ln in lines] == [["knn", "fast"], ["knn", "official"], ["linear", "fast"], ["linear", "official"]]
    evals_dir = fresh_run / "evals"
    fast = {p: json.loads((evals_dir / f"{p}-fashion_mnist-smoke-fast.json").read_text()) for p in ("knn", "linear")}
    official = {p: json.loads((evals_dir / f"{p}-fashion_mnist-smoke.json").read_text()) for p in ("knn", "linear")}
    assert all(r["mode"] == "fast" for r in fast.values()) and all(r["mode"] == "official" for r in official.values())
    assert fast["knn"]["details"]["n_train"] == 200 and {r["k"] for r in fast["knn"]["details"]["grid"]} == {5, 10}
    assert fast["linear"]["details"]["train_forwards"] is None and fast["linear"]["details"]["epochs"] == 2
    assert {r["feature"] for r in fast["linear"]["details"]["grid"]} == {"cls", "mean"}
    assert {r["feature"] for r in official["linear"]["details"]["grid"]} == {"cls"}
    assert "unknown mode(s) slow" in one_line_error(capsys, [*args[:7], "--mode", "slow"])


def test_feature_cache_is_reused_and_invalidated_by_a_changed_checkpoint(fresh_run, extractions):
    first = context(fresh_run).features("train")
    assert extractions == [["cls", "labels", "mean"]]
    cls = np.array(first.arrays["cls"])
    assert isinstance(first.arrays["cls"], np.memmap) and first.arrays["cls"].dtype == np.float16

    again = context(fresh_run).features("train")  # a new context: nothing carried over in memory
    assert len(extractions) == 1
    assert np.array_equal(np.array(again.arrays["cls"]), cls)

    ckpt = torch.load(fresh_run / "checkpoint.pt", weights_only=True)
    ckpt["encoder"]["vit.patch_embed.proj.weight"] += 0.5  # as if training had gone on
    torch.save(ckpt, fresh_run / "checkpoint.pt")
    changed = context(fresh_run).features("train")
    assert len(extractions) == 2
    assert not np.array_equal(np.array(changed.arrays["cls"]), cls)
    assert len(list((fresh_run / "features").iterdir())) == 2


def test_features_are_those_of_the_frozen_encoder_on_unaugmented_images(fresh_run):
    ctx = context(fresh_run)
    feats = ctx.features("heldout", ("cls", "mean", "patches"))
    ds, _ = ctx.dataset("train")
    idx = ctx.split_indices("heldout")[:4]
    images = torch.stack([ctx.transform()(ds[int(i)][0]) for i in idx])
    with torch.no_grad():
        cls, patches = ctx.frozen_encoder()(images)
    torch.testing.assert_close(feats.tensor("cls")[:4], cls, atol=2e-2, rtol=1e-2)  # float16 storage
    torch.testing.assert_close(feats.tensor("mean")[:4], patches.mean(1), atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(feats.tensor("patches")[:4], patches, atol=2e-2, rtol=1e-2)
    assert np.array_equal(feats.labels[:4], [ds[int(i)][1] for i in idx])


def test_patch_tokens_over_the_budget_are_streamed_not_cached(fresh_run):
    cached = context(fresh_run).features("heldout", ("patches",))
    streamed = context(fresh_run, "features.cache_mb=0", "features.cache_dir=" + str(fresh_run / "other")).features("heldout", ("patches",))
    assert "patches" in cached.arrays and "patches" not in streamed.arrays
    assert not list((fresh_run / "other").rglob("patches.npy"))
    order = np.array([5, 1, 3, 2])
    (a, la), = cached.batches(["patches"], order, 4)
    (b, lb), = streamed.batches(["patches"], order, 4)
    torch.testing.assert_close(a["patches"], b["patches"], atol=2e-2, rtol=1e-2)
    assert torch.equal(la, lb)


def test_heldout_train_and_test_subsets(fresh_run):
    ctx = context(fresh_run)
    ctx.params = resolve_eval_config("smoke")["linear"]
    train, held, test = (ctx.split_indices(s) for s in ("train", "heldout", "test"))
    assert len(train) == 1000 and len(held) == 250 and len(test) == 500
    assert not set(train) & set(held)  # hyper-parameters are chosen on images the probe never fits
    ctx.params = {**ctx.params, "train_size": 300}  # the held-out set does not move with the train size
    assert np.array_equal(ctx.split_indices("heldout"), held)
    assert set(ctx.split_indices("train")) < set(train)
    ctx.params = {**ctx.params, "train_size": None}  # all the rest of the train split
    everything = np.concatenate([ctx.split_indices("train"), held])
    assert len(everything) == len(ctx.dataset("train")[0]) == len(set(everything))


def one_line_error(capsys, args) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err
    assert len(err.strip().splitlines()) == 1, err
    return err


def test_missing_or_corrupt_runs_give_one_clear_line(tmp_path, fresh_run, capsys):
    assert "does not exist" in one_line_error(capsys, ["eval", "--run", str(tmp_path / "nope"), "--preset", "smoke"])

    empty = tmp_path / "empty"
    empty.mkdir()
    assert "run.json not found" in one_line_error(capsys, ["eval", "--run", str(empty), "--preset", "smoke"])

    (empty / "run.json").write_text('{"status": "fini')
    assert "corrupt" in one_line_error(capsys, ["eval", "--run", str(empty), "--preset", "smoke"])
    (empty / "run.json").write_text('[1, 2]')
    assert "is corrupt (a JSON list, not a record)" in one_line_error(capsys, ["eval", "--run", str(empty), "--preset", "smoke"])
    (empty / "run.json").write_text('{"status": "finished", "method": "mae", "arch": "x"}')
    assert "its 'arch' is a str, not a table" in one_line_error(capsys, ["eval", "--run", str(empty), "--preset", "smoke"])
    assert "is a file, not a directory" in one_line_error(capsys, ["eval", "--run", str(empty / "run.json"), "--preset", "smoke"])

    (fresh_run / "checkpoint.pt").write_bytes(b"not a checkpoint")
    assert "corrupt" in one_line_error(capsys, ["eval", "--run", str(fresh_run), "--preset", "smoke", "--protocol", "knn"])

    (fresh_run / "checkpoint.pt").unlink()
    assert "checkpoint" in one_line_error(capsys, ["eval", "--run", str(fresh_run), "--preset", "smoke", "--protocol", "knn"])
    assert not (fresh_run / "evals").exists()


def test_bad_protocol_preset_or_override_gives_one_clear_line(mae_run, capsys):
    base = ["eval", "--run", str(mae_run)]
    assert "unknown protocol 'svm'" in one_line_error(capsys, [*base, "--protocol", "knn,svm"])
    assert "unknown eval preset" in one_line_error(capsys, [*base, "--preset", "huge"])
    assert "knn.kk" in one_line_error(capsys, [*base, "--preset", "smoke", "knn.kk=3"])
    assert "takes a number, got 'bad'" in one_line_error(capsys, [*base, "--preset", "smoke", "finetune.probe_epochs=bad"])


def test_a_folder_run_is_evaluated_on_its_own_folder_without_naming_it_again(tmp_path, capsys):
    """eval reads the run's own data set where the run read it: an image-folder run needs no --data-root."""
    from ssl_bench.data.jpeg_folder import write_jpeg_folder

    write_jpeg_folder(tmp_path / "data", images=40, size=(40, 32), classes=2)
    (tmp_path / "data" / "val").mkdir()
    shutil.copytree(tmp_path / "data" / "train" / "class_0000", tmp_path / "data" / "val" / "class_0000")
    shutil.copytree(tmp_path / "data" / "train" / "class_0001", tmp_path / "data" / "val" / "class_0001")
    assert main(["pretrain", "--method", "mae", "--preset", "smoke", "--data", "imagefolder", "--data-root", str(tmp_path / "data"),
                 "--out", str(tmp_path / "run"), "data.img_size=28", "train.max_steps=1", "train.progress=false"]) == 0
    capsys.readouterr()
    assert main(["eval", "--run", str(tmp_path / "run"), "--protocol", "knn", "--preset", "smoke", "knn.ks=(3,)",
                 "knn.train_size=20", "knn.heldout_size=10", "knn.test_size=10"]) == 0, capsys.readouterr().err
    assert json.loads(next((tmp_path / "run" / "evals").glob("knn-*.json")).read_text())["data"] == "imagefolder"
