"""The common trainer: exact resume, divergence guard, records that are never overwritten."""
import csv
import json
import time

import pytest
import torch

from methods.mae import MAE
from ssl_bench.errors import TrainingDiverged, UserError
from ssl_bench.records import write_json_new
from ssl_bench.trainer import pretrain
from tests.conftest import TINY_VIT, smoke_config


def interrupt_after(monkeypatch, cls, n_steps):
    """Make ``cls`` raise KeyboardInterrupt after ``n_steps`` optimizer steps, like a killed job."""
    original, calls = cls.after_optimizer_step, {"n": 0}

    def hook(self):
        original(self)
        calls["n"] += 1
        if calls["n"] == n_steps:
            raise KeyboardInterrupt

    monkeypatch.setattr(cls, "after_optimizer_step", hook)


def interrupted_run(monkeypatch, cls, n_steps, cfg, run_dir):
    """Pretrain ``cfg`` into ``run_dir`` until ``cls`` is interrupted after ``n_steps`` optimizer steps."""
    with monkeypatch.context() as m:
        interrupt_after(m, cls, n_steps)
        with pytest.raises(KeyboardInterrupt):
            pretrain(cfg, run_dir)


def poison_loss(monkeypatch, at_call: int, factor: float) -> dict:
    """Make MAE's ``training_step`` return its losses times ``factor`` (nan, inf) on call ``at_call``;
    returns the call counter ({"n": calls so far})."""
    original, calls = MAE.training_step, {"n": 0}

    def step(self, batch):
        calls["n"] += 1
        losses = original(self, batch)
        return {k: v * factor for k, v in losses.items()} if calls["n"] == at_call else losses

    monkeypatch.setattr(MAE, "training_step", step)
    return calls


def weights(run_dir):
    return torch.load(run_dir / "checkpoint.pt", weights_only=True)["model"]


@pytest.mark.parametrize("workers,device_augment", [(0, True), (1, True), (1, False)])
def test_resume_is_bit_for_bit(tmp_path, monkeypatch, workers, device_augment):
    # drop path and a loader worker make this test sensitive to RNG and data-order state; both data paths
    cfg = smoke_config("mae", "model.drop_path=0.1", "train.ckpt_every=3", f"data.num_workers={workers}",
                       f"data.device_augment={device_augment}")
    straight = pretrain(cfg, tmp_path / "straight")
    interrupted_run(monkeypatch, MAE, 5, cfg, tmp_path / "resumed")
    assert json.loads((tmp_path / "resumed" / "run.json").read_text())["status"] == "interrupted"
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 3
    resumed = pretrain(cfg, tmp_path / "resumed", resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert resumed["steps"] == straight["steps"] == 8
    assert resumed["loss"]["loss"]["last"] == straight["loss"]["loss"]["last"]
    # the metrics files hold each step once: the rows logged after the checkpoint before the kill are replaced
    logged = lambda run: [(r["step"], r["loss"]) for r in map(json.loads, (run / "metrics.jsonl").read_text().splitlines())]  # noqa: E731
    table = lambda run: [(r["step"], r["loss"]) for r in csv.DictReader(open(run / "metrics.csv", newline=""))]  # noqa: E731
    assert logged(tmp_path / "resumed") == logged(tmp_path / "straight") and table(tmp_path / "resumed") == table(tmp_path / "straight")


def test_resume_changes_nothing_without_checkpointed_state(tmp_path, monkeypatch):
    """Control for the test above: resuming from a checkpoint taken at another step must not match."""
    cfg = smoke_config("mae", "model.drop_path=0.1", "train.ckpt_every=3")
    pretrain(cfg, tmp_path / "straight")
    interrupted_run(monkeypatch, MAE, 5, cfg, tmp_path / "resumed")
    ckpt_path = tmp_path / "resumed" / "checkpoint.pt"
    ckpt = torch.load(ckpt_path, weights_only=True)
    ckpt["rng"]["torch"] = torch.manual_seed(123).get_state()  # lose the RNG state
    torch.save(ckpt, ckpt_path)
    pretrain(cfg, tmp_path / "resumed", resume=True)
    a, b = weights(tmp_path / "straight"), weights(tmp_path / "resumed")
    assert not all(torch.equal(a[k], b[k]) for k in a)


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, monkeypatch):
    cfg = smoke_config("mae", "train.ckpt_every=2")
    poison_loss(monkeypatch, at_call=4, factor=float("nan"))
    with pytest.raises(TrainingDiverged, match="step 3.*last good checkpoint"):
        pretrain(cfg, tmp_path / "run")
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert record["status"] == "diverged" and ckpt["step"] == 2
    assert all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())


def test_run_dir_is_never_overwritten(tmp_path):
    cfg = smoke_config("mae", "train.max_steps=1")
    pretrain(cfg, tmp_path / "run")
    before = (tmp_path / "run" / "run.json").read_bytes()
    with pytest.raises(UserError, match="already holds a run"):
        pretrain(cfg, tmp_path / "run")
    assert (tmp_path / "run" / "run.json").read_bytes() == before
    # a finished run that is "resumed" (e.g. a requeued job) returns its record and trains nothing
    assert pretrain(cfg, tmp_path / "run", resume=True)["status"] == "finished"
    assert (tmp_path / "run" / "run.json").read_bytes() == before


def test_records_written_next_to_not_over(tmp_path):
    paths = [write_json_new(tmp_path, "knn-fashion_mnist-smoke", {"i": i}) for i in range(3)]
    assert [p.name for p in paths] == ["knn-fashion_mnist-smoke.json", "knn-fashion_mnist-smoke-1.json", "knn-fashion_mnist-smoke-2.json"]
    assert [json.loads(p.read_text())["i"] for p in paths] == [0, 1, 2]
    assert not list(tmp_path.glob(".tmp-*"))


def test_run_record_contents(tmp_path):
    record = pretrain(smoke_config("mae"), tmp_path / "run")
    on_disk = json.loads((tmp_path / "run" / "run.json").read_text())
    for key in ("method", "config", "data", "arch", "epochs", "steps", "loss", "wall_time_s", "images_per_s",
                "gpu_hours", "hardware", "git_commit", "status"):
        assert key in on_disk, key
    assert on_disk["hardware"]["torch"] == torch.__version__ and on_disk["hardware"]["timm"]
    assert record["images_per_s"] > 0 and record["loss"]["loss"]["last"] > 0
    assert (tmp_path / "run" / "metrics.jsonl").read_text().count("\n") == record["steps"]


def slow_loader(monkeypatch, seconds: float) -> None:
    """Make every pretraining loader wait ``seconds`` before each batch, like workers that cannot keep up."""
    import ssl_bench.trainer

    original = ssl_bench.trainer.build_pretrain_loader

    class Slow:
        def __init__(self, loader):
            self.loader = loader

        def __len__(self):
            return len(self.loader)

        def __iter__(self):
            for batch in self.loader:
                time.sleep(seconds)
                yield batch

    def build(*args, **kwargs):
        loader, *rest = original(*args, **kwargs)
        return (Slow(loader), *rest)

    monkeypatch.setattr(ssl_bench.trainer, "build_pretrain_loader", build)


@pytest.mark.parametrize("wait,device_augment", [(0.0, True), (0.05, False)])
def test_the_run_says_how_long_it_waited_for_data(tmp_path, monkeypatch, capsys, wait, device_augment):
    """Every logged row and the record carry the share of the time spent waiting for batches; a run whose loader
    sets its pace says so once, naming what to change, and one whose step does says nothing. (The tiny model's
    step is quicker than its per-sample views, so the quiet run makes them in batches.)"""
    slow_loader(monkeypatch, wait)
    cfg = smoke_config("mae", *TINY_VIT, "train.epochs=2", "train.log_every=6", "train.ckpt_every=100",
                       "data.num_workers=0", f"data.device_augment={device_augment}")  # 16 steps, logged at 1, 6, 12
    record = pretrain(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [row["step"] for row in rows] == [1, 6, 12] and all(0 <= row["data_share"] <= 1 for row in rows)
    notes = [line for line in capsys.readouterr().err.splitlines() if "waiting for data" in line]
    if wait:  # a tiny step takes a few ms: the 50 ms wait is most of the time
        assert record["data_share"] > 0.6 and min(row["data_share"] for row in rows[1:]) > 0.6
        assert len(notes) == 1 and "steps 2-6" in notes[0] and "data.num_workers (now 0" in notes[0]
    else:
        assert record["data_share"] < 0.25 and notes == []


def test_a_log_window_says_the_loader_sets_the_pace_once_never_first_nor_from_a_few_steps():
    from ssl_bench.logging import LogWindow

    window = LogWindow(images_per_step=32, loader_bound_share=0.25, min_steps=5)
    said = []
    for steps, waited in [(10, 1e3), (4, 1e3), (10, 0.0), (10, 1e3), (10, 1e3)]:  # seconds far beyond the window's
        window.waited(waited)
        rate, share, say = window.close(steps)
        assert rate > 0 and share == (1.0 if waited else 0.0)
        said.append(say)
    # the first window pays for compilation, the second is too short, the third does not wait; then once only
    assert said == [False, False, False, True, False]


def test_weight_decay_schedule_rises_on_decayed_groups_only(tmp_path):
    """train.weight_decay_end: half-cosine from weight_decay to it over training (DINO's 0.04 -> 0.4)."""
    from ssl_bench.optim import cosine_with_warmup

    cfg = smoke_config("mae", "train.weight_decay=0.04", "train.weight_decay_end=0.4", "train.max_steps=3")
    record = pretrain(cfg, tmp_path / "run")
    groups = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)["optimizer"]["param_groups"]
    last = cosine_with_warmup(2, record["total_steps"], 0, 0.04, 0.4)  # the value set for the last step taken
    assert 0.04 < last < 0.4
    assert sorted({round(g["weight_decay"], 9) for g in groups}) == [0.0, round(last, 9)]


@pytest.mark.parametrize("overrides, compiled, kwargs", [
    (["train.compile=true"], True, {}),
    (["train.compile=true", "train.compile_mode=reduce-overhead"], True, {"mode": "reduce-overhead"}),
    (["train.compile=false", "train.compile_mode=reduce-overhead"], False, None),
    (["train.compile=auto"], False, None),  # auto: GPU runs of the full preset only
])
def test_the_step_is_compiled_as_train_compile_and_compile_mode_say(monkeypatch, overrides, compiled, kwargs):
    from ssl_bench.runtime import CompiledOrEager, compiled_step

    seen = []
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: seen.append(kw) or fn)
    model = torch.nn.Linear(2, 2)
    step = compiled_step(model, smoke_config("mae", *overrides), torch.device("cpu"))
    assert isinstance(step, CompiledOrEager) == compiled and (step is model) != compiled
    assert seen == ([kwargs] if compiled else [])
