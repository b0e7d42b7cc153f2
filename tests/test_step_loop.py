"""The step loop: losses read at log time only, the NaN guard there, torch.compile's fallback."""
import json

import pytest
import torch

from ssl_bench.errors import TrainingDiverged
from ssl_bench.trainer import pretrain
from tests.conftest import ON_CUDA, smoke_config
from tests.test_trainer import poison_loss


def test_losses_are_read_once_per_log_window(tmp_path, monkeypatch):
    """Every step's losses are read in one transfer per log_every steps, not one per step."""
    reads = {"n": 0}
    original = torch.Tensor.tolist

    def counting_tolist(self):
        reads["n"] += self.is_floating_point()  # (the sampler's index lists are integer)
        return original(self)

    monkeypatch.setattr(torch.Tensor, "tolist", counting_tolist)
    cfg = smoke_config("mae", "train.max_steps=8", "train.log_every=4", "train.ckpt_every=100")
    record = pretrain(cfg, tmp_path / "run")
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 4, 8] and record["steps"] == 8
    assert len(record["loss"]["loss"]["curve"]) == 8  # every step's loss is kept, read in bulk
    assert reads["n"] == 3  # flushes at steps 1, 4 and 8


def test_nan_is_caught_at_log_time_and_the_checkpoint_before_it_kept(tmp_path, monkeypatch):
    cfg = smoke_config("mae", "train.ckpt_every=4", "train.log_every=4")
    calls = poison_loss(monkeypatch, at_call=6, factor=float("inf"))
    with pytest.raises(TrainingDiverged, match=r"loss is (inf|nan) at step 5 .*last good checkpoint: .*checkpoint"):
        pretrain(cfg, tmp_path / "run")
    assert calls["n"] == 8  # found when step 8 was logged, not before
    ckpt = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert ckpt["step"] == 4 and all(torch.isfinite(v).all() for v in ckpt["model"].values() if v.is_floating_point())
    record = json.loads((tmp_path / "run" / "run.json").read_text())
    assert record["status"] == "diverged" and record["loss"]["loss"]["curve"][-1][0] == 5  # last good step


def test_compile_failure_falls_back_to_eager_in_one_line(tmp_path, monkeypatch, capsys):
    cfg = smoke_config("mae", "train.max_steps=3", "model.drop_path=0.1")
    eager = pretrain(cfg, tmp_path / "eager")

    def broken_compile(model, **kwargs):
        def run(*args, **kw):
            torch.rand(5)  # a failed attempt may have consumed RNG: the fallback must restore it
            raise RuntimeError("backend exploded\nlong compiler traceback")
        return run

    monkeypatch.setattr(torch, "compile", broken_compile)
    fallback = pretrain({**cfg, "train": {**cfg["train"], "compile": True}}, tmp_path / "fallback")
    err = [ln for ln in capsys.readouterr().err.splitlines() if "torch.compile" in ln]
    assert err == [f"ssl-bench: torch.compile failed (RuntimeError: backend exploded); {what} without compilation "
                   "(train.compile=false skips the attempt)" for what in ("making views", "training")]
    assert fallback["status"] == "finished"
    a = torch.load(tmp_path / "eager" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "fallback" / "checkpoint.pt", weights_only=True)["model"]
    assert all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("method", ["mae", "mocov3", "dino", "simsiam", "cae", "beit", "mixedae"])
def test_compiled_step_compiles_once_and_never_recompiles(tmp_path, monkeypatch, capsys, method):
    """Values that change every step (momentum, teacher temperature) must reach the compiled step as
    tensors: a Python float read there recompiles it at every step (MoCo v3 fell from 7.5k to 83 img/s
    on an H100). Dynamo's own tracing (backend "eager") checks this without the compiler's cost: after
    the first step any recompilation raises, and the trainer would fall back to eager and say so.
    Nor may the step break its graph: a break is where a value is read back to the host (a boolean
    index, ``.item()``), which on a GPU stops the host until the device catches up, every step."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    real_compile = torch.compile

    def compile_then_forbid_recompiling(model, **kwargs):
        compiled, calls = real_compile(model, backend="eager"), []
        if not isinstance(model, torch.nn.Module):  # the batch's views (compiled with the step): all made by then
            return compiled

        def step(*args, **kw):
            if len(calls) == 1:
                torch.compiler.set_stance("fail_on_recompile")
            calls.append(1)
            return compiled(*args, **kw)
        return step

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", compile_then_forbid_recompiling)
    cfg = smoke_config(method, "train.max_steps=4", "train.compile=true")
    counters.clear()
    try:
        record = pretrain(cfg, tmp_path / "run")
        breaks = dict(counters["graph_break"])
    finally:
        torch.compiler.set_stance("default")
        torch._dynamo.reset()
    assert record["status"] == "finished" and record["steps"] == 4
    assert not breaks, f"{method}'s step breaks its graph: {list(breaks)[:3]}"
    assert "torch.compile failed" not in capsys.readouterr().err


@pytest.mark.parametrize("method", ["mae", "mocov3"])
@pytest.mark.parametrize("device", [ON_CUDA])
def test_the_loop_never_waits_for_the_gpu_between_log_steps(tmp_path, monkeypatch, method, device):
    """Between log steps the trainer queues each step behind the last without waiting for it: data, views,
    masks, the optimizer and the bookkeeping make no host-device sync (a copy from pageable memory is one).
    Steps 3 and 4 queue a one-second kernel after their forward; when the next step's forward starts, that
    kernel must still be running, as it would not be after any wait. (Earlier steps run at the GPU's pace, so
    the pinned blocks of their copies are free for reuse: only a new pinned allocation may wait for the GPU.)"""
    from ssl_bench.registry import get_method

    cls = get_method(method)
    real, running = cls.training_step, []

    def step_then_a_long_kernel(self, batch):
        running.append(not torch.cuda.current_stream().query())
        out = real(self, batch)
        if len(running) in (3, 4):
            torch.cuda._sleep(2_000_000_000)  # about a second of GPU time
        return out

    monkeypatch.setattr(cls, "training_step", step_then_a_long_kernel)
    cfg = smoke_config(method, f"train.device={device}", "train.max_steps=6", "train.log_every=100", "train.ckpt_every=100")
    pretrain(cfg, tmp_path / "run")
    assert running[3:5] == [True, True], running
