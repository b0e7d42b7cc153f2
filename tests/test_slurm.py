"""Through a real SLURM (the one-node cluster of `slurm/local-cluster.sh up`; skipped when `sinfo`
cannot reach a controller): a pretraining job submitted with --launcher slurm, the same job requeued
mid-run (`scontrol requeue`) ending with the very weights of an uninterrupted run, a sweep of two
methods x two seeds ending in the leaderboard, and bad input (a partition SLURM rejects, a job that
fails) as one line each.

The requeued job and the reference run at the same time (one CPU each), so the module costs about as
long as the slowest of them."""
import contextlib
import io
import json
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from ssl_bench_app import launch
from ssl_bench_app.cli import main
from ssl_bench.config import resolve_config
from ssl_bench.registry import available_methods, get_method
from tests.test_cli import assert_one_line_error, run_cli

pytestmark = pytest.mark.slurm

# MAE smoke, long enough (960 steps: about 10 s on the fastest CPU machine seen, at 3,250 img/s) that a requeue
# at the first checkpoint lands mid-run; 96 and then 288 steps each finished before the kill on a faster machine.
REQUEUE_OVERRIDES = ["data.subset=3072", "train.epochs=10", "train.ckpt_every=2", "train.log_every=50", "train.progress=false"]
STEPS = 10 * 3072 // 32


def _slurm_reason() -> str | None:
    if shutil.which("sinfo") is None:
        return "SLURM is not installed (no sinfo): run `slurm/local-cluster.sh up`"
    probe = subprocess.run(["sinfo", "-h", "-o", "%a"], capture_output=True, text=True, timeout=30)
    if probe.returncode != 0 or "up" not in probe.stdout:
        return f"no SLURM controller reachable (sinfo: {probe.stderr.strip() or 'no partition up'}): run `slurm/local-cluster.sh up`"
    return None


@pytest.fixture(scope="module", autouse=True)
def slurm_cluster():
    reason = _slurm_reason()
    if reason:
        pytest.skip(reason)


def _state(job_id: str) -> str:
    return launch.slurm_states([job_id]).get(job_id, "UNKNOWN")


def _requeue_at_first_checkpoint(job, run_dir: Path, seen: dict) -> None:
    """Requeue the job once its first checkpoint exists; note what the run looked like when it was killed."""
    try:
        deadline = time.time() + 300
        while not (run_dir / "checkpoint.pt").exists():
            assert time.time() < deadline, "the job wrote no checkpoint in 300 s"
            time.sleep(0.05)
        subprocess.run(["scontrol", "requeue", job.job_id], check=True, capture_output=True, timeout=30)
        seen["requeued"] = True
        while _state(job.job_id) not in ("PENDING", "REQUEUED"):  # the old process is dead once it is pending again
            assert time.time() < deadline, "the requeued job never went back to PENDING"
            time.sleep(0.2)
        seen["status_when_killed"] = json.loads((run_dir / "run.json").read_text())["status"]
        seen["step_when_killed"] = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)["step"]
    except BaseException as exc:  # reported by the test
        seen["error"] = repr(exc)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    """Job A (requeued mid-run) submitted through the API, and the reference submitted through the CLI
    at the same time; returns what both left behind."""
    tmp = tmp_path_factory.mktemp("slurm")
    cfg = resolve_config(get_method("mae"), "smoke", ["data.name=fashion_mnist", *REQUEUE_OVERRIDES])
    from ssl_bench.trainer import pretrain

    executor = launch.make_executor("slurm", tmp / "requeued.slurm", launch.load_cluster("local"), "requeue-test")
    job = executor.submit(launch.Job(pretrain, (cfg, tmp / "requeued"), {"resume": False}, resume_dir=tmp / "requeued"))
    seen: dict = {}
    watcher = threading.Thread(target=_requeue_at_first_checkpoint, args=(job, tmp / "requeued", seen), daemon=True)
    watcher.start()

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(["pretrain", "--method", "mae", "--preset", "smoke", "--out", str(tmp / "reference"), "--launcher", "slurm",
                     "--cluster", "local", *REQUEUE_OVERRIDES])
    watcher.join(timeout=400)
    final = launch.wait_for([job])[job.job_id]
    return {"tmp": tmp, "code": code, "out": out.getvalue(), "err": err.getvalue(), "job": job, "final": final, "seen": seen}


def test_pretrain_with_slurm_launcher_finishes_and_writes_record(runs):
    assert runs["code"] == 0, runs["err"]
    m = re.search(r"submitted SLURM job (\d+) .*; log: (\S+)", runs["out"])
    assert m, runs["out"]
    assert Path(m.group(2)).exists()  # the log path it printed
    record = json.loads((runs["tmp"] / "reference" / "run.json").read_text())
    assert record["status"] == "finished" and record["steps"] == record["total_steps"] == STEPS
    assert f"finished after {STEPS} steps" in runs["out"]


def test_requeued_job_resumes_to_the_same_weights(runs):
    seen, job, tmp = runs["seen"], runs["job"], runs["tmp"]
    assert "error" not in seen, seen.get("error")
    assert seen.get("requeued"), "the job was never requeued"
    # it really was killed mid-run: the record still said running, the checkpoint was short of the end
    assert seen["status_when_killed"] == "running" and seen["step_when_killed"] < STEPS, seen
    assert runs["final"] == "COMPLETED", launch.job_failure_message(job, runs["final"])
    log = job.paths.stdout.read_text()
    assert "requeued (restart 1); resuming" in log, log[-2000:]

    record = json.loads((tmp / "requeued" / "run.json").read_text())
    assert record["status"] == "finished" and record["steps"] == STEPS
    resumed = torch.load(tmp / "requeued" / "checkpoint.pt", map_location="cpu", weights_only=True)
    reference = torch.load(tmp / "reference" / "checkpoint.pt", map_location="cpu", weights_only=True)
    assert resumed["step"] == reference["step"] == STEPS
    assert resumed["model"].keys() == reference["model"].keys()
    for name, tensor in reference["model"].items():
        assert torch.equal(resumed["model"][name], tensor), name


def test_sweep_two_methods_two_seeds_then_leaderboard(capsys, tmp_path):
    methods = [m for m in ("mae", "simsiam") if m in available_methods()] or list(available_methods())
    methods = (methods + [m for m in available_methods() if m not in methods])[:2]
    out = tmp_path / "sweep"
    argv = ["sweep", "--methods", ",".join(methods), "--seeds", "0,1", "--protocols", "knn", "--preset", "smoke",
            "--out", str(out), "--cluster", "local"]

    code, text, err = run_cli(capsys, *argv, "--no-wait")  # submit and return
    assert code == 0, err
    assert re.search(r"submitted pretraining array \d+ \(4 runs\) and 4 evaluation jobs", text), text
    index = json.loads((out / "jobs.json").read_text())["jobs"]
    assert sorted(index) == sorted([f"pretrain/{m}-s{s}" for m in methods for s in (0, 1)] + [f"eval/{m}-s{s}/knn" for m in methods for s in (0, 1)])
    arrays = {e["job_id"].split("_")[0] for k, e in index.items() if k.startswith("pretrain/")}
    assert len(arrays) == 1  # one job array
    for key, entry in index.items():
        if key.startswith("eval/"):  # each evaluation waits for its own run's pretraining
            assert entry["depends_on"] == index[f"pretrain/{key.split('/')[1]}"]["job_id"]

    code, text, err = run_cli(capsys, "status", "--results", str(out))
    assert code == 0, err
    assert "8 jobs" in text and all(e["log"] in text for e in index.values())

    code, text, err = run_cli(capsys, *argv)  # a rerun submits nothing new, waits for the queued jobs
    assert code == 0, err
    assert "8 job(s) of an earlier submission are still queued or running" in text or "nothing to submit" in text, text
    assert "submitted pretraining" not in text
    for m in methods:
        row = next(ln for ln in text.splitlines() if ln.startswith(f"| {m} "))
        assert "(n=2)" in row, row  # both seeds' knn results in the leaderboard
    assert (out / "leaderboard.md").exists()

    code, text, err = run_cli(capsys, *argv)  # everything done: nothing submitted, same leaderboard
    assert code == 0, err
    assert "4 runs and 4 evaluations already done" in text and "nothing to submit" in text


def test_partition_rejected_by_slurm_is_one_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pretrain", "--method", "mae", "--preset", "smoke", "--out", str(tmp_path / "r"),
                           "--launcher", "slurm", "--partition", "nope")
    assert_one_line_error(code, err, "SLURM refused the job", "invalid partition", "nope")


def test_failed_job_is_one_line_with_its_log(capsys, tmp_path):
    def stray_run(name: str) -> Path:
        run = tmp_path / name
        run.mkdir()
        (run / "stray.txt").write_text("not a run")  # the trainer refuses this directory inside the job
        return run

    argv = ["pretrain", "--method", "mae", "--preset", "smoke", "--launcher", "slurm"]
    with pytest.raises(SystemExit) as exit_:  # --no-wait: the job id and log path, and back at once
        main([*argv, "--out", str(stray_run("a")), "--no-wait"])
    out = capsys.readouterr().out
    assert exit_.value.code == 0 and re.search(r"submitted SLURM job \d+ .*; log: \S+", out), out
    assert "not waiting (--no-wait)" in out

    code, out, err = run_cli(capsys, *argv, "--out", str(stray_run("b")))  # waiting: the failure as one line
    assert_one_line_error(code, err, "SLURM job", "failed", "already holds files", "log: ")
    log = Path(err.strip().rsplit("log: ", 1)[1])
    assert log.exists() and "already holds files" in log.read_text()

    (entry,) = launch.read_index(tmp_path / "a.slurm" / launch.INDEX_NAME).values()
    import submitit

    launch.wait_for([submitit.SlurmJob(folder=entry["folder"], job_id=entry["job_id"])])
    code, out, err = run_cli(capsys, "status", "--results", str(tmp_path))
    row = next(ln for ln in out.splitlines() if entry["job_id"] in ln and "a.slurm" in ln)
    assert "FAILED" in row and entry["log"] in row
