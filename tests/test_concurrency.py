"""Two processes on one results directory (two `ssl-bench bench` started by mistake): the run and each
evaluation are locked, so neither is corrupted nor run twice; the second process waits and says so."""
import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
BENCH = ["bench", "--methods", "mae", "--protocols", "knn", "--preset", "smoke",
         "--eval-override", "knn.train_size=200", "--eval-override", "knn.heldout_size=50", "--eval-override", "knn.test_size=100",
         "data.subset=64", "train.batch_size=8", "train.max_steps=4", "train.ckpt_every=2", "train.progress=false", "data.num_workers=0"]


def test_two_benches_on_one_directory_run_each_step_once(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-c", "import sys; from ssl_bench_app.cli import main; sys.exit(main())", *BENCH, "--results", str(tmp_path)]
    procs = [subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outputs = [p.communicate(timeout=600) for p in procs]
    for p, (out, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    run = tmp_path / "fashion_mnist-smoke" / "mae-s0"
    record = json.loads((run / "run.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 4
    steps = [json.loads(line)["step"] for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]  # every step ran once, in one process
    assert [p.name for p in (run / "evals").glob("*.json")] == ["knn-fashion_mnist-smoke.json"]  # one evaluation, not two
    json.loads((run / "evals" / "knn-fashion_mnist-smoke.json").read_text())  # whole
    said = "".join(out + err for out, err in outputs)
    assert "another process" in said and "meanwhile by another process; skipped" in said, said[-3000:]
