"""DDP on CPU (gloo): two processes started by torchrun train to the same weights as one process with
the same global batch.

Comparable because: each sample's augmentation and mask depend on (seed, epoch, index) only; the
sampler gives the two ranks interleaved halves of the same global batch; MAE's loss is a mean over an
equal number of masked patches per image, so the mean of the two ranks' gradients (DDP's all-reduce)
is the one-process gradient; drop_path is 0 and MAE has no BatchNorm; rank 1 gets rank 0's initial
weights from DDP's broadcast; lr follows the effective batch (per-process batch x processes).
The optimizer is SGD: what is compared is the averaged gradient, and Adam would turn the float noise of
gradients that are exactly zero in exact arithmetic (the attention key biases) into full-size steps.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from ssl_bench.trainer import pretrain
from tests.conftest import smoke_config

GLOBAL_BATCH = 32
ATOL = 1e-4  # float32 all-reduce sums in another order
COMMON = ["model.drop_path=0.0", "train.optimizer=sgd", "train.blr=2.0", "data.subset=128", "train.epochs=1", "train.ckpt_every=100", "train.log_every=100"]


def _torchrun_pretrain(out, nproc: int, per_process_batch: int) -> subprocess.CompletedProcess:
    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "ssl_bench_app.cli", "pretrain", "--method", "mae", "--preset", "smoke", "--out", str(out),
        "train.progress=false", "train.device=cpu", f"train.batch_size={per_process_batch}", *COMMON,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.getcwd()}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300, env=env)


def test_two_process_ddp_matches_one_process_same_global_batch(tmp_path):
    ddp = _torchrun_pretrain(tmp_path / "ddp", nproc=2, per_process_batch=GLOBAL_BATCH // 2)
    assert ddp.returncode == 0, ddp.stderr[-3000:]

    torch.set_num_threads(1)
    try:
        single = pretrain(smoke_config("mae", "train.device=cpu", f"train.batch_size={GLOBAL_BATCH}", *COMMON), tmp_path / "single")
    finally:
        torch.set_num_threads(2)

    ckpt_ddp = torch.load(tmp_path / "ddp" / "checkpoint.pt", map_location="cpu", weights_only=True)
    ckpt_one = torch.load(tmp_path / "single" / "checkpoint.pt", map_location="cpu", weights_only=True)
    rec = json.loads((tmp_path / "ddp" / "run.json").read_text())
    assert rec["world_size"] == 2 and rec["effective_batch"] == GLOBAL_BATCH == single["effective_batch"]
    assert rec["lr"] == pytest.approx(single["lr"])
    assert ckpt_ddp["step"] == ckpt_one["step"] == 128 // GLOBAL_BATCH

    # the initial weights (a run of 0 steps), to show that training moved them far beyond the tolerance
    pretrain(smoke_config("mae", "train.device=cpu", f"train.batch_size={GLOBAL_BATCH}", *COMMON, "train.max_steps=0"),
             tmp_path / "init")
    init = torch.load(tmp_path / "init" / "checkpoint.pt", map_location="cpu", weights_only=True)["model"]
    moved = 0.0  # the largest change of any weight during training
    for name, tensor in ckpt_one["model"].items():
        torch.testing.assert_close(ckpt_ddp["model"][name], tensor, rtol=1e-3, atol=ATOL, msg=lambda m: f"{name}: {m}")
        moved = max(moved, (tensor.float() - init[name].float()).abs().max().item())
    assert moved > 100 * ATOL  # the match is not vacuous
