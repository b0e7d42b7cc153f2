"""The launcher without a cluster: profiles and their overrides, the sbatch script they become, the
requeue/resume rule of the submitted job, the debug executor, the job index and `ssl-bench status`,
and the sweep's plan and skip rules (run in-process with --launcher local)."""
import argparse
import json
import os
import pickle
from pathlib import Path

import pytest
import submitit
from submitit.core.utils import JobPaths, pickle_load

from ssl_bench_app import launch
from ssl_bench.errors import UserError
from ssl_bench.records import write_json_atomic
from tests.test_cli import assert_one_line_error, run_cli


def _args(argv: list[str]) -> argparse.Namespace:
    p = argparse.ArgumentParser()
    launch.add_launcher_args(p)
    return p.parse_args(argv)


# -- profiles -------------------------------------------------------------------------------------
def test_profiles_shipped_and_valid():
    names = launch.available_profiles()
    assert "local" in names
    for name in names:  # every shipped profile loads and describes itself
        assert launch.load_cluster(name).describe().startswith(f"cluster {name}")


def test_override_precedence_profile_then_slurm_then_flags(tmp_path):
    prof = tmp_path / "site.toml"
    prof.write_text('partition = "gpu"\ngpus_per_node = 4\ntime = "01:00:00"\nqos = "low"\n[sbatch]\nreservation = "r1"\n')
    args = _args(["--cluster", str(prof), "--slurm", "qos=high", "--slurm", "partition=big", "--slurm", "sbatch.exclusive=true",
                  "--partition", "huge", "--time", "2-00:00:00"])
    c = launch.cluster_from_args(args)
    assert c["partition"] == "huge"  # flag beats --slurm beats profile
    assert c["qos"] == "high" and c["gpus_per_node"] == 4 and c.tasks_per_node == 4  # one process per GPU
    assert c["sbatch"] == {"reservation": "r1", "exclusive": True}
    assert launch.time_minutes(c["time"]) == 2 * 1440


@pytest.mark.parametrize("text,minutes", [("90", 90), ("02:30:00", 150), ("1-00:00:00", 1440), ("10:30", 11), ("0:00:20", 1)])
def test_time_formats(text, minutes):
    assert launch.time_minutes(text) == minutes


def test_bad_profiles_are_one_line(tmp_path):
    with pytest.raises(UserError, match="unknown cluster profile 'nope'; known profiles: .*local"):
        launch.load_cluster("nope")
    bad = tmp_path / "bad.toml"
    bad.write_text("partitoin = 'gpu'\n")
    with pytest.raises(UserError, match="unknown cluster setting 'partitoin'.*valid keys: .*partition"):
        launch.load_cluster(str(bad))
    with pytest.raises(UserError, match="must be int"):
        launch.load_cluster("local", ["nodes=two"])
    with pytest.raises(UserError, match="time='soon'"):
        launch.load_cluster("local", ["time=soon"])
    bad.write_bytes(b"partition = '\xa1gpu'\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        launch.load_cluster(str(bad))


def test_unknown_cluster_on_the_command_line(capsys, tmp_path):
    code, _, err = run_cli(capsys, "pretrain", "--method", "mae", "--preset", "smoke", "--out", str(tmp_path / "r"),
                           "--launcher", "slurm", "--cluster", "nope")
    assert_one_line_error(code, err, "unknown cluster profile 'nope'", "local")
    assert not (tmp_path / "r").exists() and not (tmp_path / "r.slurm").exists()  # nothing written, nothing submitted


def test_profile_becomes_sbatch_flags(tmp_path, monkeypatch):
    monkeypatch.setattr(submitit.SlurmExecutor, "affinity", classmethod(lambda cls: 2))  # no srun needed to render
    c = launch.load_cluster("gpu-2nodes", ["account=proj", "constraint=h100", "qos=high", "sbatch.reservation=r"], {"partition": "p"})
    ex = launch.make_executor("slurm", tmp_path, c, "pretrain-mae", sbatch={"dependency": "afterok:12_3"})
    text = ex._executor._make_submission_file_text("CMD", "uid")
    for flag in ("--partition=p", "--nodes=2", "--gpus-per-node=8", "--ntasks-per-node=8", "--cpus-per-task=10",
                 "--time=4320", "--mem=480GB", "--account=proj", "--constraint=h100", "--qos=high", "--reservation=r",
                 "--dependency=afterok:12_3", "--job-name=pretrain-mae", "--signal=USR2@120"):
        assert f"#SBATCH {flag}\n" in text, flag
    assert ex._executor.python.endswith(os.path.join("bin", "python")) or "python" in ex._executor.python


# -- the submitted job: requeue -> resume ---------------------------------------------------------
def fake_pretrain(cfg, out_dir, resume=False):
    return {"resume": resume, "world": os.environ.get("WORLD_SIZE")}


def _call_as_job(job, monkeypatch, restarts: int | None):
    monkeypatch.setenv("SUBMITIT_DEBUG_JOB_ID", "DEBUG_1")  # a (debug) submitit job environment
    if restarts is None:
        monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    else:
        monkeypatch.setenv("SLURM_RESTART_COUNT", str(restarts))
    return job()


def test_requeued_job_resumes_only_when_the_run_dir_holds_a_run(tmp_path, monkeypatch):
    out = tmp_path / "run"
    job = launch.Job(fake_pretrain, ({}, out), {"resume": False}, resume_dir=out)
    undeclared = launch.Job(fake_pretrain, ({}, out), {"resume": False})  # resumability is declared, not guessed
    assert _call_as_job(job, monkeypatch, None)["resume"] is False  # first start: a fresh run
    assert _call_as_job(job, monkeypatch, 1)["resume"] is False  # requeued before anything was written
    out.mkdir()
    (out / "checkpoint.pt").write_bytes(b"x")
    assert _call_as_job(job, monkeypatch, None)["resume"] is False  # not requeued: the trainer must refuse the dir
    assert _call_as_job(job, monkeypatch, 2)["resume"] is True  # scontrol requeue: SLURM_RESTART_COUNT
    assert _call_as_job(undeclared, monkeypatch, 2)["resume"] is False
    # preemption/time-out: submitit calls checkpoint() and requeues what it returns
    delayed = job.checkpoint()
    assert isinstance(delayed, submitit.helpers.DelayedSubmission) and isinstance(delayed.function, submitit.helpers.Checkpointable)
    assert _call_as_job(delayed.function, monkeypatch, None)["resume"] is True
    assert delayed.function.args == job.args and job.requeued is False  # the original is untouched


def test_pretrain_logs_go_beside_a_fresh_run_dir(tmp_path):
    from ssl_bench.trainer import pretrain

    out = tmp_path / "run"
    assert launch.job_folder(str(out), "x", resume_dir=out) == tmp_path / "run.slurm"
    assert launch.job_folder(str(tmp_path / "logs"), "x", resume_dir=out) == tmp_path / "logs"
    assert launch.job_folder(str(out / "logs"), "x") == out / "logs"  # not a resumable run


# -- launchers in this process --------------------------------------------------------------------
def test_local_and_debug_launchers_return_the_result(tmp_path):
    assert launch.run_job(_args([]), fake_pretrain, {}, tmp_path / "a") == {"resume": False, "world": os.environ.get("WORLD_SIZE")}
    res = launch.run_job(_args(["--launcher", "debug"]), fake_pretrain, {}, tmp_path / "b", name="t", log_dir=str(tmp_path / "logs"))
    assert res["resume"] is False
    assert "SUBMITIT_DEBUG_JOB_ID" not in os.environ  # the job's environment does not leak


def test_debug_launcher_bad_input_is_one_line_not_pdb(capsys, tmp_path):
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "stray.txt").write_text("x")
    code, _, err = run_cli(capsys, "pretrain", "--method", "mae", "--preset", "smoke", "--out", str(tmp_path / "r"), "--launcher", "debug")
    assert_one_line_error(code, err, "already holds files")


# -- job index and status -------------------------------------------------------------------------
def test_index_keeps_previous_ids_and_status_reads_results(capsys, tmp_path, monkeypatch):
    monkeypatch.setattr(launch.slurm_state, "_run", lambda cmd: "")  # SLURM no longer knows these jobs
    folder = tmp_path / "logs"
    folder.mkdir()
    write_json_atomic(launch.outcome_path(folder, "11"), {"outcome": "success", "result": {}})
    write_json_atomic(launch.outcome_path(folder, "12"), {"outcome": "error", "error": "boom"})
    index = tmp_path / launch.INDEX_NAME

    def entry(jid):
        return {"kind": "pretrain", "job_id": jid, "launcher": "slurm", "folder": str(folder), "log": str(folder / f"{jid}_0_log.out")}

    launch.record_jobs(index, {"pretrain/a": entry("10")})
    launch.record_jobs(index, {"pretrain/a": entry("11"), "pretrain/b": entry("12")})
    jobs = launch.read_index(index)
    assert jobs["pretrain/a"]["job_id"] == "11" and jobs["pretrain/a"]["previous"] == ["10"]
    code, out, _ = run_cli(capsys, "status", "--results", str(tmp_path))
    assert code == 0
    row_a = next(ln for ln in out.splitlines() if ln.startswith("pretrain/a"))
    row_b = next(ln for ln in out.splitlines() if ln.startswith("pretrain/b"))
    assert "COMPLETED" in row_a and "11_0_log.out" in row_a
    assert "FAILED" in row_b and "12_0_log.out" in row_b
    code, _, err = run_cli(capsys, "status", "--results", str(tmp_path / "nothing"))
    assert_one_line_error(code, err, "does not exist")


class PlantedResult:
    """Unpickling this writes ``marker``: what a result pickle planted in a shared results folder can do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_status_and_failure_lines_never_unpickle_the_job_folder(capsys, tmp_path, monkeypatch):
    """Every job folder holds submitit's *_result.pkl; status, the failure line and the result of a waited-for
    job come from SLURM, the logs and the job's JSON outcome, so a planted pickle never runs."""
    monkeypatch.setattr(launch.slurm_state, "_run", lambda cmd: "")  # SLURM no longer knows these jobs
    folder, marker = tmp_path / "logs", tmp_path / "ran.txt"
    folder.mkdir()
    for jid in ("21", "22", "23"):
        with open(JobPaths(folder, job_id=jid, task_id=0).result_pickle, "wb") as f:
            pickle.dump(("success", PlantedResult(marker)), f)
    write_json_atomic(launch.outcome_path(folder, "21"), {"outcome": "success", "result": {"steps": 2}})
    write_json_atomic(launch.outcome_path(folder, "22"), {"outcome": "error", "error": "bad value; pass a good one"})
    # 23 left no outcome (killed, or a pickle with no job of ours behind it); its log says why
    JobPaths(folder, job_id="23", task_id=0).stderr.write_text("slurmstepd: error: Detected 1 oom_kill event\nKilled\n")
    launch.record_jobs(tmp_path / launch.INDEX_NAME, {
        f"pretrain/{jid}": {"kind": "pretrain", "job_id": jid, "launcher": "slurm", "folder": str(folder),
                            "log": str(folder / f"{jid}_0_log.out")} for jid in ("21", "22", "23")})

    code, out, _ = run_cli(capsys, "status", "--results", str(tmp_path))
    assert not marker.exists(), "ssl-bench status unpickled a result file"
    rows = {ln.split()[0]: ln.split()[2] for ln in out.splitlines() if ln.startswith("pretrain/")}
    assert code == 0 and rows == {"pretrain/21": "COMPLETED", "pretrain/22": "FAILED", "pretrain/23": "UNKNOWN"}
    job = {jid: submitit.SlurmJob(folder=folder, job_id=jid) for jid in ("21", "22", "23")}
    assert launch.job_failure_message(job["22"], "FAILED") == f"SLURM job 22 failed: bad value; pass a good one; log: {folder / '22_0_log.out'}"
    assert launch.job_failure_message(job["23"], "OUT_OF_MEMORY").startswith("SLURM job 23 failed: ended OUT_OF_MEMORY (Killed); log: ")
    assert launch.wait_result(job["21"]) == {"steps": 2}  # the result the job recorded, as JSON
    with pytest.raises(UserError, match="bad value; pass a good one"):
        launch.wait_result(job["22"])
    assert not marker.exists(), "the failure line or the waited-for result unpickled a result file"
    pickle_load(JobPaths(folder, job_id="21", task_id=0).result_pickle)  # the plant is live: submitit's reader runs it
    assert marker.read_text() == "ran"


def failing_work(cfg, out_dir):
    raise UserError("cfg is bad: pass a good one")


def test_submitted_job_records_its_outcome_as_json(tmp_path, monkeypatch):
    monkeypatch.setenv("SUBMITIT_FOLDER", str(tmp_path))  # set by submitit's job runner, not by the debug executor
    result = _call_as_job(launch.Job(fake_pretrain, ({}, tmp_path / "run")), monkeypatch, None)
    assert launch.read_outcome(tmp_path, "DEBUG_1") == {"outcome": "success", "result": result}
    with pytest.raises(UserError):  # the job still fails (SLURM marks it FAILED), after recording why
        _call_as_job(launch.Job(failing_work, ({}, tmp_path / "run")), monkeypatch, None)
    assert launch.read_outcome(tmp_path, "DEBUG_1") == {"outcome": "error", "error": "cfg is bad: pass a good one", "type": "UserError"}
    assert sorted(p.name for p in tmp_path.iterdir()) == ["DEBUG_1_0_outcome.json"]  # replaced atomically, no leftovers


# -- sweeps ---------------------------------------------------------------------------------------
def test_sweep_plan_validates_before_submitting(tmp_path):
    from ssl_bench_app.sweep import plan

    with pytest.raises(UserError, match="unknown method 'nope'"):
        plan("mae,nope", "0", "knn", "fashion_mnist", None, "smoke", tmp_path)
    with pytest.raises(UserError, match="--seeds 'a' must be comma-separated integers"):
        plan("mae", "a", "knn", "fashion_mnist", None, "smoke", tmp_path)
    with pytest.raises(UserError, match="unknown protocol 'knnn'"):
        plan("mae", "0", "knnn", "fashion_mnist", None, "smoke", tmp_path)
    with pytest.raises(UserError, match="names an item twice"):
        plan("mae,mae", "0", "knn", "fashion_mnist", None, "smoke", tmp_path)
    sweep = plan("mae", "0,1", "knn,linear", "fashion_mnist", None, "smoke", tmp_path, ["train.max_steps=3"])
    assert [(r.method, r.seed, r.cfg["seed"], r.cfg["train"]["max_steps"]) for r in sweep.runs] == [("mae", 0, 0, 3), ("mae", 1, 1, 3)]
    assert [e.key for e in sweep.runs[0].evals] == ["eval/mae-s0/knn", "eval/mae-s0/linear"]


def test_sweep_skip_rules(tmp_path):
    from evals.presets import resolve_eval_config
    from ssl_bench.rundir import run_state
    from ssl_bench_app.sweep import eval_done, plan

    run = tmp_path / "mae-s0"
    assert run_state(run) == "fresh"
    run.mkdir()
    (run / "tokenizer.pt").write_text("x")
    assert run_state(run) == "partial"
    (run / "run.json").write_text(json.dumps({"status": "failed"}))
    assert run_state(run) == "resumable"
    (run / "run.json").write_text(json.dumps({"status": "finished"}))
    assert run_state(run) == "finished"
    (run / "evals").mkdir()
    knn_smoke = resolve_eval_config("smoke")["knn"]
    (run / "evals" / "knn-fashion_mnist-smoke-1.json").write_text(json.dumps({"config": {"knn": knn_smoke}}))
    assert eval_done(run, "knn", "fashion_mnist", "smoke", knn_smoke)
    linear_smoke = resolve_eval_config("smoke")["linear"]
    assert not eval_done(run, "knn", "fashion_mnist", "quick", knn_smoke) and not eval_done(run, "linear", "fashion_mnist", "smoke", linear_smoke)
    sweep = plan("mae", "0", "knn,linear", "fashion_mnist", None, "smoke", tmp_path)
    assert sweep.runs[0].state == "finished" and [e.done for e in sweep.runs[0].evals] == [True, False]
    # a record made under other settings (an older preset, or an override) is not reused
    sweep = plan("mae", "0", "knn", "fashion_mnist", None, "smoke", tmp_path, eval_overrides=["knn.temperature=0.1"])
    assert [e.done for e in sweep.runs[0].evals] == [False]
    # a fast-mode probe's record (<stem>-fast.json) counts for that mode, and only for it
    linear_fast = resolve_eval_config("smoke", ["linear.mode=fast"])["linear"]
    (run / "evals" / "linear-fashion_mnist-smoke-fast.json").write_text(json.dumps({"config": {"linear": linear_fast}}))
    assert eval_done(run, "linear", "fashion_mnist", "smoke", linear_fast) and not eval_done(run, "linear", "fashion_mnist", "smoke", linear_smoke)
    sweep = plan("mae", "0", "linear", "fashion_mnist", None, "smoke", tmp_path, eval_overrides=["linear.mode=fast"])
    assert [e.done for e in sweep.runs[0].evals] == [True]


def test_a_sweep_never_reuses_a_run_made_with_other_settings(tmp_path):
    """A finished or resumable run is reused only if it was asked for with the settings the sweep asks for now
    (another preset or override is refused in one line, naming the difference); keys that change how a run is
    watched, not what it computes, may differ. Runs from before requested configs were recorded compare their
    resolved config without the keys their method's prepare() rewrites (BEiT's tokenizer path for "auto")."""
    from ssl_bench.config import resolve_config
    from ssl_bench.registry import get_method
    from ssl_bench_app.sweep import plan

    def finished_run(name, overrides, requested=True, ran=None):
        cfg = resolve_config(get_method(name), "smoke", ["data.name=fashion_mnist", *overrides, "seed=0"])
        record = {"status": "finished", "config": ran or cfg, **({"requested_config": cfg} if requested else {})}
        (tmp_path / f"{name}-s0").mkdir(exist_ok=True)
        (tmp_path / f"{name}-s0" / "run.json").write_text(json.dumps(record))

    finished_run("mae", ["train.max_steps=2"])
    assert plan("mae", "0", "knn", "fashion_mnist", None, "smoke", tmp_path, ["train.max_steps=2", "train.progress=off"]).runs[0].state == "finished"
    with pytest.raises(UserError, match=r"mae-s0 holds a run made with other settings \(train.max_steps: 2 -> 3\); pass a new --out"):
        plan("mae", "0", "knn", "fashion_mnist", None, "smoke", tmp_path, ["train.max_steps=3"])
    with pytest.raises(UserError, match=r"preset: 'smoke' -> 'quick'"):
        plan("mae", "0", "knn", "fashion_mnist", None, "quick", tmp_path, ["train.max_steps=2"])
    auto = resolve_config(get_method("beit"), "smoke", ["data.name=fashion_mnist", "seed=0"])
    ran = {**auto, "method": {**auto["method"], "tokenizer": str(tmp_path / "beit-s0" / "tokenizer" / "tokenizer.pt")}}
    finished_run("beit", [], requested=False, ran=ran)  # a record from before requested_config
    assert plan("beit", "0", "knn", "fashion_mnist", None, "smoke", tmp_path).runs[0].state == "finished"
    with pytest.raises(UserError, match="method.mask_ratio"):
        plan("beit", "0", "knn", "fashion_mnist", None, "smoke", tmp_path, ["method.mask_ratio=0.5"])


def test_local_sweep_runs_then_skips_what_is_done(capsys, tmp_path):
    out = tmp_path / "sweep"
    argv = ["sweep", "--launcher", "local", "--methods", "mae", "--seeds", "0", "--protocols", "knn", "--preset", "smoke",
            "--out", str(out), "train.max_steps=2"]
    code, text, err = run_cli(capsys, *argv)
    assert code == 0, err
    record = json.loads((out / "mae-s0" / "run.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 2
    assert list((out / "mae-s0" / "evals").glob("knn-fashion_mnist-smoke*.json"))
    assert "| mae" in text and (out / "leaderboard.md").exists()
    stamp = (out / "mae-s0" / "checkpoint.pt").stat().st_mtime_ns
    code, text, err = run_cli(capsys, *argv)
    assert code == 0, err
    assert "1 runs and 1 evaluations already done" in text
    assert (out / "mae-s0" / "checkpoint.pt").stat().st_mtime_ns == stamp  # not trained again
    assert len(list((out / "mae-s0" / "evals").glob("knn-*.json"))) == 1  # not evaluated again
    # a failed evaluation is named as such, and the run's other evaluations go on
    code, text, err = run_cli(capsys, *argv[:-1], "--protocols", "knn,linear", "train.max_steps=2", "--eval-override", "knn.ks=(999999,)")
    assert code == 2 and "eval/mae-s0/knn: failed: kNN asks for k=999999" in text and "pretrain/mae-s0: failed" not in text
    assert "1 step(s) failed; first: eval/mae-s0/knn" in err and list((out / "mae-s0" / "evals").glob("linear-*.json"))


@pytest.mark.parametrize("content", ['{"jobs": 5}', '{"jobs": [1]}', '{"jobs": {"x": 5}}', '{"jobs": {"x": {"job_id": "1"}}}',
                                     '{"jobs": {"x": {"job_id": "1", "folder": "f", "run_dir": 5}}}', '[1]'])
def test_a_jobs_index_of_another_shape_is_one_line(capsys, tmp_path, content):
    (tmp_path / "jobs.json").write_text(content)
    code, _, err = run_cli(capsys, "status", "--results", str(tmp_path))
    assert_one_line_error(code, err, "jobs.json is corrupt; delete it")
