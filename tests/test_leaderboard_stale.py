"""The leaderboard never mixes a score with weights it did not score: a record whose checkpoint was replaced
is stale, not counted, and listed under the table."""
import hashlib
import json
import shutil
from pathlib import Path

from evals.leaderboard import collect, to_markdown

FIXTURES = Path(__file__).parent / "fixtures"


def test_a_record_of_a_replaced_checkpoint_is_stale(tmp_path):
    root = tmp_path / "results"
    shutil.copytree(FIXTURES / "leaderboard", root)
    run = root / "fashion_mnist-quick/runs/mae-s2"
    (run / "checkpoint.pt").write_bytes(b"the weights that were scored")
    record = run / "evals/knn-fashion_mnist-quick.json"  # knn 84.0; seeds 0, 1 score 80, 82
    scored = hashlib.sha256(b"the weights that were scored").hexdigest()
    record.write_text(json.dumps({**json.loads(record.read_text()), "checkpoint_sha256": scored}))
    lb = collect(root)
    assert lb.rows[0].top1["knn"].values == [80.0, 82.0, 84.0] and not any("stale" in n for n in lb.notes)

    (run / "checkpoint.pt").write_bytes(b"weights trained further, or another run's")  # replaced
    lb = collect(root)
    mae = next(r for r in lb.rows if r.method == "mae")
    assert mae.top1["knn"].values == [80.0, 82.0]  # the stale score is not mixed in
    assert mae.top1["linear"].n == 3  # records without a hash (older ones) still count
    stale = [n for n in lb.notes if n.startswith("stale")]
    assert len(stale) == 1 and "runs/mae-s2/evals/knn-fashion_mnist-quick.json" in stale[0] and scored[:12] in stale[0]
    assert f"- {stale[0]}" in to_markdown(lb)  # listed under the table

    (run / "checkpoint.pt").unlink()  # no checkpoint kept (as in committed results): cannot be checked, counts
    assert next(r for r in collect(root).rows if r.method == "mae").top1["knn"].n == 3
