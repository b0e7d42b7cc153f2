"""The run-directory contract: record naming and the one latest-record rule, used by every reader."""
import json

from ssl_bench_app.commands.status import _result
from ssl_bench.records import write_json_new
from ssl_bench.rundir import eval_records, eval_stem, latest, record_rank


def test_latest_is_the_later_stamp_then_the_higher_suffix(tmp_path):
    evals = tmp_path / "evals"
    stem = eval_stem("knn", "fashion_mnist", "smoke")
    a = write_json_new(evals, stem, {"protocol": "knn", "top1": 1.0, "created": "2026-01-02T00:00:00"})
    b = write_json_new(evals, stem, {"protocol": "knn", "top1": 2.0, "created": "2026-01-01T00:00:00"})  # older stamp, -1
    c = write_json_new(evals, stem, {"protocol": "knn", "top1": 3.0, "created": "2026-01-02T00:00:00"})  # same stamp, -2
    write_json_new(evals, "knn-fashion_mnist-smokeX", {"protocol": "knn"})  # another stem, not a rerun
    assert [p.name for p in (a, b, c)] == [f"{stem}.json", f"{stem}-1.json", f"{stem}-2.json"]
    assert eval_records(tmp_path, stem) == [a, b, c]
    records = {p: json.loads(p.read_text()) for p in eval_records(tmp_path, stem)}
    assert latest(records)[0] == c
    assert sorted(records, key=lambda p: record_rank(p, records[p])) == [b, a, c]
    # the status command reads the same record (it used the file time before)
    assert _result({"kind": "eval", "protocol": "knn", "run_dir": str(tmp_path)}) == "top-1 3.00%"


def test_leaderboard_uses_the_same_rule(tmp_path):
    from evals.leaderboard import collect

    run = tmp_path / "mae-s0"
    run.mkdir()
    (run / "run.json").write_text(json.dumps({"status": "finished", "method": "mae", "data": "fashion_mnist", "preset": "smoke", "seed": 0}))
    for top1, created in ((50.0, "2026-01-02T00:00:00"), (40.0, "2026-01-01T00:00:00")):
        write_json_new(run / "evals", "knn-fashion_mnist-smoke", {"protocol": "knn", "top1": top1, "created": created, "data": "fashion_mnist", "preset": "smoke"})
    assert collect(tmp_path).rows[0].top1["knn"].values == [50.0]
