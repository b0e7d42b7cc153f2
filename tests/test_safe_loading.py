"""Opening a file never runs code: a pickled callable planted in a checkpoint, a tokenizer file, a feature
cache or an export is refused with one line naming the file, and the callable never runs."""
import os
import random
import shutil

import numpy as np
import pytest
import torch

from evals.export import load_exported
from ssl_bench.checkpoint import load_checkpoint
from ssl_bench_app.cli import main
from ssl_bench.errors import UserError
from ssl_bench.tokenizer import FORMAT, Tokenizer, load_tokenizer
from ssl_bench.trainer import pretrain
from tests.conftest import TINY_VIT, smoke_config

KNN = ["--preset", "smoke", "knn.ks=(5,)", "knn.train_size=100", "knn.heldout_size=50", "knn.test_size=50"]


class Planted:
    """Unpickling this calls os.system: it creates ``marker``. A real attack would do anything else."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.fixture
def run_copy(mae_run, tmp_path):
    copy = tmp_path / "run"
    shutil.copytree(mae_run, copy)
    return copy


def test_the_planted_callable_is_live(tmp_path):
    """Control: the payload used below does run when a file is unpickled the unsafe way."""
    marker = tmp_path / "ran"
    torch.save({"x": Planted(marker)}, tmp_path / "f.pt")
    torch.load(tmp_path / "f.pt", weights_only=False)
    assert marker.exists()


def refused_by_cli(args, path, capsys) -> str:
    assert main(args) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and str(path) in err and "refused" in err and "can run code" in err
    return err


def test_checkpoint_with_a_pickled_callable_is_refused(run_copy, tmp_path, capsys):
    marker = tmp_path / "ran"
    ckpt_path = run_copy / "checkpoint.pt"
    ckpt = load_checkpoint(ckpt_path)
    torch.save({**ckpt, "history": {"loss": [Planted(marker)]}}, ckpt_path)
    err = refused_by_cli(["eval", "--run", str(run_copy), "--protocol", "knn", *KNN], ckpt_path, capsys)
    assert "posix.system" in err  # names what it would have called
    assert main(["export", "--run", str(run_copy), "--out", str(tmp_path / "export")]) == 2
    with pytest.raises(UserError, match="refused"):
        load_checkpoint(ckpt_path)
    assert not marker.exists()


def test_resume_from_a_planted_checkpoint_is_refused(run_copy, tmp_path):
    import json

    marker = tmp_path / "ran"
    record = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**record, "status": "interrupted"}))
    ckpt = load_checkpoint(run_copy / "checkpoint.pt")
    torch.save({**ckpt, "rng": {**ckpt["rng"], "numpy": Planted(marker)}}, run_copy / "checkpoint.pt")
    with pytest.raises(UserError, match="refused"):
        pretrain(record["config"], run_copy, resume=True)
    assert not marker.exists()


@pytest.mark.parametrize("damage", ["no_optimizer", "signature_word", "model_number", "step_list"])
def test_resume_from_a_checkpoint_of_another_shape_is_one_line(run_copy, damage):
    import json

    record = json.loads((run_copy / "run.json").read_text())
    (run_copy / "run.json").write_text(json.dumps({**record, "status": "interrupted"}))
    ckpt = load_checkpoint(run_copy / "checkpoint.pt")
    if damage == "no_optimizer":
        del ckpt["optimizer"]
    elif damage == "signature_word":
        ckpt["signature"] = "hello"
    elif damage == "model_number":
        ckpt["model"] = 5
    else:
        ckpt["step"] = [1]
    torch.save(ckpt, run_copy / "checkpoint.pt")
    with pytest.raises(UserError, match="is corrupt: it does not hold what a run of this config saves") as err:
        pretrain(record["config"], run_copy, resume=True)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("config, message", [
    (5, "holds no usable config"), ({"method_name": ["mae"]}, "holds no usable config"),
    ("drop train", "holds no usable config"), ("batch as text", "is corrupt: config key 'train.batch_size' takes an integer"),
])
def test_resume_of_a_run_whose_recorded_config_is_malformed_is_one_line(run_copy, capsys, config, message):
    import json

    record = json.loads((run_copy / "run.json").read_text())
    cfg = record["config"]
    if config == "drop train":
        config = {k: v for k, v in cfg.items() if k != "train"}
    elif config == "batch as text":
        config = {**cfg, "train": {**cfg["train"], "batch_size": "8"}}
    (run_copy / "run.json").write_text(json.dumps({**record, "status": "interrupted", "config": config}))
    assert main(["pretrain", "--resume", "--out", str(run_copy)]) == 2
    err = capsys.readouterr().err
    assert message in err and err.count("\n") == 1, err


def test_tokenizer_file_with_a_pickled_callable_is_refused(tmp_path):
    marker = tmp_path / "ran"
    tok = Tokenizer(img_size=28, patch_size=7, in_chans=1, vocab_size=8, hidden_dim=8, code_dim=4, num_res_blocks=1)
    path = tmp_path / "tokenizer.pt"
    torch.save({"format": FORMAT, "config": {**tok.config(), "data": Planted(marker)}, "state_dict": tok.state_dict()}, path)
    with pytest.raises(UserError) as err:
        load_tokenizer(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value) and "refused" in str(err.value)
    assert not marker.exists()


def test_feature_cache_with_a_pickled_callable_is_refused(run_copy, tmp_path, capsys):
    marker = tmp_path / "ran"
    assert main(["eval", "--run", str(run_copy), "--protocol", "knn", *KNN]) == 0
    caches = sorted(run_copy.glob("**/cls.npy"))
    assert caches, "the eval cached no features"
    np.save(caches[0], np.array([Planted(marker)], dtype=object), allow_pickle=True)
    refused_by_cli(["eval", "--run", str(run_copy), "--protocol", "knn", *KNN], caches[0], capsys)
    assert not marker.exists()


def test_export_file_with_a_pickled_callable_is_refused(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "encoder.pth"
    torch.save({"cls_token": torch.zeros(1), "x": Planted(marker)}, path)
    with pytest.raises(UserError, match="refused"):
        load_exported(path)
    assert not marker.exists()


def test_checkpoints_hold_only_plain_values(mae_run):
    """What makes the above possible: the trainer's checkpoint, RNG states included, loads with weights_only=True."""
    ckpt = torch.load(mae_run / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert isinstance(ckpt["rng"]["numpy"]["key"], torch.Tensor) and isinstance(ckpt["rng"]["python"]["state"], list)
    np.random.set_state(np.random.get_state())  # (the conversions below round-trip exactly)
    from ssl_bench.checkpoint import numpy_state_from_plain, python_state_from_plain, rng_state_to_plain

    np_state, py_state = np.random.get_state(), random.getstate()
    plain = rng_state_to_plain({"numpy": np_state, "python": py_state})
    back = numpy_state_from_plain(plain["numpy"])
    assert back[0] == np_state[0] and np.array_equal(back[1], np_state[1]) and back[1].dtype == np.uint32 and back[2:] == np_state[2:]
    assert python_state_from_plain(plain["python"]) == py_state


# -- checkpoints of earlier versions ------------------------------------------------------------------
def write_the_old_way(ckpt: dict, path) -> None:
    """As the trainer wrote checkpoints before RNG states became plain values: numpy's get_state() tuple
    (its key a uint32 numpy array, which weights_only=True refuses by default) and Python's getstate() tuple."""
    from ssl_bench.checkpoint import numpy_state_from_plain, python_state_from_plain

    rng = ckpt["rng"]
    torch.save({**ckpt, "rng": {**rng, "numpy": numpy_state_from_plain(rng["numpy"]), "python": python_state_from_plain(rng["python"])}}, path)


def test_an_old_checkpoint_still_resumes_bit_for_bit(tmp_path, monkeypatch):
    from methods.mae import MAE
    from tests.test_trainer import interrupted_run

    cfg = smoke_config("mae", *TINY_VIT, "model.drop_path=0.1", "train.ckpt_every=3", "train.max_steps=6")
    pretrain(cfg, tmp_path / "straight")
    interrupted_run(monkeypatch, MAE, 5, cfg, tmp_path / "resumed")
    path = tmp_path / "resumed" / "checkpoint.pt"
    write_the_old_way(load_checkpoint(path), path)
    with pytest.raises(Exception, match="numpy"):
        torch.load(path, weights_only=True)  # really the old format
    pretrain(cfg, tmp_path / "resumed", resume=True)
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("straight", "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_convert_checkpoint_rewrites_an_old_checkpoint_and_keeps_a_backup(run_copy, capsys):
    path = run_copy / "checkpoint.pt"
    current = load_checkpoint(path)
    write_the_old_way(current, path)
    old_bytes = path.read_bytes()
    assert main(["convert-checkpoint", str(run_copy)]) == 0
    assert "original is kept as" in capsys.readouterr().out
    assert (run_copy / "checkpoint.pt.bak").read_bytes() == old_bytes
    converted = torch.load(path, map_location="cpu", weights_only=True)  # no allowlist needed any more
    assert torch.equal(converted["rng"]["numpy"]["key"], current["rng"]["numpy"]["key"])
    assert converted["rng"]["python"] == current["rng"]["python"] and converted["step"] == current["step"]
    assert all(torch.equal(converted["model"][k], v) for k, v in current["model"].items())
    assert main(["convert-checkpoint", str(path)]) == 0  # current already: nothing rewritten, no second backup
    assert "nothing to convert" in capsys.readouterr().out and not (run_copy / "checkpoint.pt.bak-1").exists()


def test_convert_checkpoint_unpickles_only_when_trusted(run_copy, tmp_path, capsys):
    from pathlib import PurePosixPath

    path = run_copy / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    write_the_old_way({**ckpt, "config": {**ckpt["config"], "data_root": PurePosixPath("/data")}}, path)
    before = path.read_bytes()
    with pytest.raises(UserError, match="refused.*convert-checkpoint --trust"):
        load_checkpoint(path)  # loading says how to convert it
    assert main(["convert-checkpoint", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and "pathlib.PurePosixPath" in err and "--trust" in err
    assert path.read_bytes() == before and not (run_copy / "checkpoint.pt.bak").exists()
    assert main(["convert-checkpoint", "--trust", str(path)]) == 0
    assert "runs any code the file holds" in capsys.readouterr().out
    assert load_checkpoint(path)["config"]["data_root"] == "/data"
    # an object with no plain equivalent is not converted (and the file stays as it was)
    marker = tmp_path / "ran"
    torch.save({**ckpt, "history": {"loss": [Planted(marker)]}}, path)
    planted = path.read_bytes()
    assert main(["convert-checkpoint", str(path)]) == 2 and not marker.exists()
    assert "posix.system" in capsys.readouterr().err and path.read_bytes() == planted


@pytest.mark.parametrize("damage, message", [
    ("list", "holds a list, not an ssl-bench checkpoint"),
    ("other_method", "is of a simsiam run, but run.json beside it records mae"),
    ("other_architecture", "is from another architecture (embed_dim: checkpoint 16 vs this run 32"),
    ("weights_not_signature", "its encoder weights do not fit its own description"),
    ("signature_word", "has no encoder weights"),
    ("nan_weights", "holds non-finite encoder weights"),
])
def test_a_checkpoint_that_does_not_fit_its_run_is_one_line(run_copy, tmp_path, capsys, damage, message):
    """eval and export read the encoder only from the checkpoint its run.json describes: a swapped or malformed
    checkpoint is one line naming the mismatch, never a traceback nor a record filed under the wrong method."""
    path = run_copy / "checkpoint.pt"
    ckpt = load_checkpoint(path)
    if damage == "list":
        ckpt = [1, 2]
    elif damage == "other_method":
        ckpt["method"] = "simsiam"
    elif damage == "other_architecture":
        ckpt["signature"] = {**ckpt["signature"], "embed_dim": 16}
    elif damage == "nan_weights":
        ckpt["encoder"] = {k: v * float("nan") if v.is_floating_point() else v for k, v in ckpt["encoder"].items()}
    elif damage == "weights_not_signature":
        ckpt["encoder"] = {k: v[..., :1] if v.ndim else v for k, v in ckpt["encoder"].items()}
    else:
        ckpt["signature"] = "hello"
    torch.save(ckpt, path)
    for command in (["eval", "--run", str(run_copy), "--protocol", "knn", *KNN], ["export", "--run", str(run_copy), "--out", str(tmp_path / "x")]):
        assert main(command) == 2, command
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert not (run_copy / "evals").exists() and not (tmp_path / "x").exists()


def test_an_older_pickle_format_is_one_line_and_never_unpickled(run_copy, tmp_path, capsys):
    """torch's legacy (non-zip) format at pickle protocol 4 cannot be read safely: one line, no torch warning,
    and a planted callable in it never runs."""
    marker = tmp_path / "ran"
    import warnings

    torch.save({"encoder": Planted(marker)}, run_copy / "checkpoint.pt", _use_new_zipfile_serialization=False, pickle_protocol=4)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert main(["export", "--run", str(run_copy), "--out", str(tmp_path / "x")]) == 2
    assert not [w for w in caught if "pickle protocol" in str(w.message)]  # torch's two-line note would reach the user
    err = capsys.readouterr().err
    assert "in an older pickle format that cannot be read without running it" in err and err.count("\n") == 1, err
    assert not marker.exists()
