"""Optional wandb logging (train.wandb=true), run by the real wandb package in offline mode (no network):
the losses, learning rate, throughput and monitoring probes of metrics.jsonl reach wandb's own run file."""
import json
import struct
import time

import pytest

from ssl_bench.trainer import pretrain
from tests.conftest import smoke_config

wandb = pytest.importorskip("wandb", reason="wandb is an optional extra: pip install 'ssl-bench[wandb]' (scripts/setup.sh installs it)")


def wandb_history(run_file, timeout_s: float = 60.0) -> list[dict]:
    """The logged rows of an offline wandb run file (run-<id>.wandb): a LevelDB-style log of 32 KiB blocks,
    each record a 7-byte header (crc32, length, type: 1 full, 2 first, 3 middle, 4 last) and a protobuf Record.
    wandb's service process may still be writing it when finish() returns: read until its exit record is there."""
    deadline = time.monotonic() + timeout_s
    while True:
        rows, complete = _read_run_file(run_file)
        if complete or time.monotonic() > deadline:
            return rows
        time.sleep(0.2)


def _read_run_file(run_file) -> tuple[list[dict], bool]:
    from wandb.proto import wandb_internal_pb2

    data, block, pos, parts, rows, complete = run_file.read_bytes(), 32768, 7, b"", [], False  # 7: wandb's file header
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        payload, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind == 0:
            break
        parts = payload if kind in (1, 2) else parts + payload
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(parts)
            if record.WhichOneof("record_type") == "history":
                rows.append({item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in record.history.item})
            complete = complete or record.WhichOneof("record_type") == "exit"
    return rows, complete


def test_offline_wandb_run_gets_losses_lr_throughput_and_probes(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    cfg = smoke_config("mae", "model.embed_dim=32", "model.depth=1", "data.subset=64", "train.wandb=true",
                       "monitor.online_probe=true", "monitor.knn_every=1", "monitor.knn_train_size=64", "monitor.knn_heldout_size=32")
    record = pretrain(cfg, tmp_path / "run")
    assert record["status"] == "finished" and record["steps"] == 2
    files = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(files) == 1 and files[0].name == f"run-{(tmp_path / 'run' / 'wandb_id').read_text()}.wandb"
    history = wandb_history(files[0])
    logged = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    steps = [row for row in logged if "loss" in row]
    assert [h["_step"] for h in history if "train/loss" in h] == [row["step"] for row in steps] == [1, 2]
    for h, row in zip((h for h in history if "train/loss" in h), steps):
        for key in ("loss", "lr", "images_per_s", "probe_loss", "probe_top1"):
            assert h[f"train/{key}"] == pytest.approx(row[key]), key
    knn = [row for row in logged if any(k.startswith("monitor/") for k in row)]
    assert knn and all(h.get("monitor/knn_top1") == pytest.approx(knn[-1]["monitor/knn_top1"]) for h in history if "monitor/knn_top1" in h)
    assert any("monitor/knn_top1" in h for h in history)


def test_missing_wandb_is_one_line_before_the_run_starts(tmp_path, monkeypatch):
    import builtins

    from ssl_bench.errors import UserError

    real_import = builtins.__import__
    monkeypatch.setattr(builtins, "__import__", lambda name, *a, **k: (_ for _ in ()).throw(ImportError(name)) if name == "wandb" else real_import(name, *a, **k))
    with pytest.raises(UserError, match=r"pip install 'ssl-bench\[wandb\]'"):
        pretrain(smoke_config("mae", "train.wandb=true"), tmp_path / "run")
    assert not (tmp_path / "run" / "run.json").exists()
