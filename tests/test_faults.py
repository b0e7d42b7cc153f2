"""kill -9 during pretraining, feature extraction and fine-tuning, then a rerun of the same bench: the
records and weights equal those of an uninterrupted bench (smoke size, one method, kNN + fine-tuning)."""
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parent.parent
BENCH = ["bench", "--methods", "mae", "--protocols", "knn,finetune", "--preset", "smoke",
         "--eval-override", "finetune.train_size=200", "--eval-override", "finetune.test_size=200",
         "data.subset=64", "train.batch_size=8", "train.max_steps=6", "train.ckpt_every=2", "train.progress=false", "data.num_workers=0"]
ENV = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}


def bench(results: Path, kill_when=None) -> bool:
    """Run the bench; with ``kill_when(run_dir, output)``, SIGKILL it as soon as that holds. Returns
    whether it was killed (False: it ran to the end, which must then have succeeded)."""
    cmd = [sys.executable, "-c", "import sys; from ssl_bench_app.cli import main; sys.exit(main())", *BENCH, "--results", str(results)]
    proc = subprocess.Popen(cmd, cwd=results, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    output: list[str] = []
    reader = threading.Thread(target=lambda: output.extend(proc.stdout), daemon=True)
    reader.start()
    run_dir = results / "fashion_mnist-smoke" / "mae-s0"
    while proc.poll() is None:
        if kill_when is not None and kill_when(run_dir, "".join(output)):
            proc.send_signal(signal.SIGKILL)
            proc.wait()
            return True
        time.sleep(0.01)
    reader.join()
    assert proc.returncode == 0, "".join(output)[-3000:]
    return False


def mid_pretraining(run_dir: Path, _) -> bool:  # two steps logged, a checkpoint at 2, not finished
    log = run_dir / "metrics.jsonl"
    return log.exists() and len(log.read_text().splitlines()) >= 3


def mid_extraction(run_dir: Path, _) -> bool:  # a feature array being written
    return any(p.name.startswith(".tmp-") for p in (run_dir / "features").glob("*/*"))


def mid_finetuning(_, output: str) -> bool:
    return "finetune: evaluating" in output


def records(run_dir: Path) -> dict:
    out = {}
    for path in sorted((run_dir / "evals").glob("*.json")):
        r = json.loads(path.read_text())
        out[path.name] = (r["top1"], r["selected"])  # (checkpoint bytes differ: they hold wall time; weights compared below)
    run = json.loads((run_dir / "run.json").read_text())
    out["run.json"] = (run["status"], run["steps"], run["loss"]["loss"]["curve"])
    return out


@pytest.mark.slow
def test_kill_9_at_several_points_then_rerun_gives_the_same_records(tmp_path):
    (tmp_path / "straight").mkdir()
    (tmp_path / "killed").mkdir()
    assert not bench(tmp_path / "straight")
    for point in (mid_pretraining, mid_extraction, mid_finetuning):
        assert bench(tmp_path / "killed", point), f"the bench ended before {point.__name__}"
    assert not bench(tmp_path / "killed")  # the rerun finishes what was left

    a, b = (tmp_path / d / "fashion_mnist-smoke" / "mae-s0" for d in ("straight", "killed"))
    assert records(a) == records(b)
    assert set(records(b)) == {"run.json", "knn-fashion_mnist-smoke.json", "finetune-fashion_mnist-smoke.json"}
    wa, wb = (torch.load(d / "checkpoint.pt", weights_only=True)["model"] for d in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    # a killed writer's temp file is removed by the next process working on the run (atomic.remove_stale_temps)
    assert not [p for p in b.rglob(".tmp-*")]
