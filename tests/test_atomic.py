"""The one atomic write: a full disk keeps the previous good file and says so in one line."""
import errno
import json
import os

import pytest
import torch

from ssl_bench import atomic
from ssl_bench.atomic import WriteFailed
from ssl_bench.checkpoint import load_checkpoint, save_checkpoint
from ssl_bench_app.cli import main
from ssl_bench.records import write_json_atomic, write_json_new


def disk_full(*args, **kwargs):
    raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))


def half_then_full(obj, f, *args, **kwargs):
    """torch.save that gets some bytes out, then hits a full disk."""
    f.write(b"PK\x03\x04 half a checkpoint")
    disk_full()


def test_full_disk_during_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint(path, {"step": 4})
    monkeypatch.setattr(torch, "save", half_then_full)
    with pytest.raises(WriteFailed) as exc:
        save_checkpoint(path, {"step": 8})
    message = str(exc.value)
    assert "\n" not in message and "No space left on device" in message and "previous checkpoint.pt is kept" in message
    monkeypatch.undo()
    assert load_checkpoint(path)["step"] == 4
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temp file left behind


def test_full_disk_at_fsync_keeps_the_previous_record(tmp_path, monkeypatch):
    path = write_json_atomic(tmp_path / "run.json", {"status": "running", "steps": 4})
    monkeypatch.setattr(atomic, "_fsync_file", disk_full)  # delayed allocation: ENOSPC shows at fsync
    with pytest.raises(WriteFailed, match="previous run.json is kept"):
        write_json_atomic(path, {"status": "finished", "steps": 8})
    with pytest.raises(WriteFailed, match="no knn-x.json was written"):
        write_json_new(tmp_path / "evals", "knn-x", {"top1": 1.0})
    assert json.loads(path.read_text()) == {"status": "running", "steps": 4}
    assert sorted(p.name for p in tmp_path.rglob("*") if p.is_file()) == ["run.json"]


def test_writes_are_fsynced_and_renamed(tmp_path, monkeypatch):
    synced = []
    monkeypatch.setattr(os, "fsync", lambda fd: synced.append(os.readlink(f"/proc/self/fd/{fd}")))
    write_json_atomic(tmp_path / "run.json", {"a": 1})
    assert len(synced) == 2 and synced[0].startswith(str(tmp_path / atomic.TEMP_PREFIX)) and synced[1] == str(tmp_path)


def test_full_disk_mid_run_is_one_line_and_the_run_resumes(tmp_path, monkeypatch, capsys):
    out = tmp_path / "run"
    argv = ["pretrain", "--method", "mae", "--preset", "smoke", "--out", str(out), "train.max_steps=6", "train.ckpt_every=3", "train.progress=false"]
    real_save, saves = torch.save, []

    def second_save_fails(obj, f, *args, **kwargs):
        saves.append(obj["step"])
        if len(saves) == 2:
            half_then_full(obj, f)
        real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", second_save_fails)
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "No space left on device" in err and "previous checkpoint.pt is kept" in err, err
    monkeypatch.undo()
    assert load_checkpoint(out / "checkpoint.pt")["step"] == 3
    assert main(["pretrain", "--resume", "--method", "mae", "--preset", "smoke", "--out", str(out)]) == 0
    assert json.loads((out / "run.json").read_text())["steps"] == 6


def test_stale_temps_of_dead_writers_are_removed_live_ones_kept(tmp_path):
    import subprocess
    import sys
    from pathlib import Path

    (tmp_path / "sub").mkdir()
    # a writer that dies mid-write (its temp file stays), and one that is still writing
    code = ("import sys; from pathlib import Path; from ssl_bench import atomic;"
            "s = atomic.Staged(Path(sys.argv[1])); s.tmp.write_text('half'); print(s.tmp)")
    dead = Path(subprocess.run([sys.executable, "-c", code, str(tmp_path / "sub" / "record.json")], check=True,
                               capture_output=True, text=True, env={**os.environ, "PYTHONPATH": "."}).stdout.strip())
    live = atomic.Staged(tmp_path / "checkpoint.pt").tmp
    live.write_text("writing")
    foreign = tmp_path / f"{atomic.TEMP_PREFIX}x-00000000-1-abcdef12.json"  # another host's writer
    foreign.write_text("?")
    assert dead.exists()
    assert atomic.remove_stale_temps(tmp_path) == [dead]
    assert live.exists() and foreign.exists() and not dead.exists()
