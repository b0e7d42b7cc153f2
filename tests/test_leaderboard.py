"""Leaderboard: fixture records -> the expected table (mean ± std over seeds, latest record per run and
seed, unfinished runs skipped with a note), CSV numbers, LaTeX, the plot's bars, atomic writes."""
import csv
import json
import shutil
from pathlib import Path

import pytest

from evals.leaderboard import collect, make_figure, write_leaderboard
from ssl_bench.cli import main

FIXTURES = Path(__file__).parent / "fixtures"


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "results"
    shutil.copytree(FIXTURES / "leaderboard", root)
    return root


def test_markdown_matches_expected_table(results):
    # Expected by hand: mae knn (80, 82, 84) -> 82.00 ± 2.00; attentive only on seeds 0, 1 -> n=2;
    # finetune seed 0 was rerun (-1 file, later) 90 -> 91, so (91, 92, 93); simsiam-s0-old and the
    # running moco_v3 run are skipped; simsiam linear has three records, the latest (-2) 76.0 counts;
    # the cifar10 transfer eval gets its own column.
    _, written = write_leaderboard(results, ["md", "csv", "latex"])
    assert [p.name for p in written] == ["leaderboard.md", "leaderboard.csv", "leaderboard.tex", "leaderboard.png"]
    assert (results / "leaderboard.md").read_text() == (FIXTURES / "leaderboard_expected.md").read_text()
    assert (results / "leaderboard.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert not list(results.glob(".tmp-*"))  # atomic writes leave no temp files


def test_csv_holds_unrounded_numbers(results):
    write_leaderboard(results, ["csv"], plot=False)
    rows = {r["method"]: r for r in csv.DictReader(open(results / "leaderboard.csv"))}
    assert set(rows) == {"mae", "simsiam"}
    assert float(rows["mae"]["attentive_mean"]) == 88.5 and float(rows["mae"]["attentive_std"]) == pytest.approx(0.5**0.5, abs=1e-6)
    assert rows["mae"]["finetune_n"] == "3" and float(rows["mae"]["finetune_mean"]) == 92.0
    assert float(rows["simsiam"]["finetune_cifar10_mean"]) == 60.5 and rows["mae"]["finetune_cifar10_mean"] == ""
    assert float(rows["simsiam"]["images_per_s"]) == 900.4 and float(rows["simsiam"]["linear_mean"]) == 76.0  # -2 is the latest of 3


def test_latex_escapes_and_uses_pm(results):
    write_leaderboard(results, ["latex"], plot=False)
    tex = (results / "leaderboard.tex").read_text()
    assert r"82.00 $\pm$ 2.00 (n=3)" in tex and r"\toprule" in tex and "±" not in tex.split("\\begin")[1]


def test_plot_bars_are_the_means(results):
    lb = collect(results)
    ax = make_figure(lb).axes[0]
    heights = [round(b.get_height(), 6) for b in ax.patches]
    # bars are drawn per protocol column (knn, linear, attentive, finetune, finetune (cifar10)), per row (mae, simsiam)
    expected = [82.0, 70.25, 86.5, 76.0, 88.5, float("nan"), 92.0, 88.0, float("nan"), 60.5]
    assert [h for h in heights if h == h] == [h for h in expected if h == h]


def test_rows_split_by_preset_when_several(results):
    run = results / "fashion_mnist-smoke/runs/mae-s0"
    (run / "evals").mkdir(parents=True)
    record = json.loads((results / "fashion_mnist-quick/runs/mae-s0/run.json").read_text())
    (run / "run.json").write_text(json.dumps(dict(record, preset="smoke")))
    (run / "evals/knn-fashion_mnist-smoke.json").write_text(json.dumps({"protocol": "knn", "data": "fashion_mnist", "preset": "smoke", "top1": 40.0}))
    lb = collect(results)
    assert lb.show_preset and not lb.show_data
    assert [(r.method, r.preset, r.top1["knn"].mean) for r in lb.rows] == [("mae", "quick", 82.0), ("simsiam", "quick", 70.25), ("mae", "smoke", 40.0)]  # grouped by setting


def test_cli(results, capsys):
    assert main(["leaderboard", "--results", str(results), "--format", "md", "--no-plot"]) == 0
    out = capsys.readouterr().out
    assert "82.00 ± 2.00 (n=3)" in out and not (results / "leaderboard.csv").exists()
    assert main(["leaderboard", "--results", str(results), "--format", "md,xls"]) == 2
    assert "unknown leaderboard format" in capsys.readouterr().err
    assert main(["leaderboard", "--results", str(results / "nope")]) == 2
