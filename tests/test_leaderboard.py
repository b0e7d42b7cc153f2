"""Leaderboard: fixture records -> the expected table (mean ± std over seeds, latest record per run and
seed, unfinished runs skipped with a note), CSV numbers, LaTeX, the plot's bars, atomic writes."""
import csv
import json
import shutil
from pathlib import Path

import pytest

from evals.leaderboard import collect, make_figure, write_leaderboard
from ssl_bench_app.cli import main

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


# -- the one-command benchmark, end to end (smoke presets, shrunk further) ------------------------------
TINY_EVALS = [
    "knn.train_size=200", "knn.heldout_size=50", "knn.test_size=100", "knn.ks=(5,10)",
    "linear.train_size=200", "linear.heldout_size=50", "linear.test_size=100", "linear.epochs=2", "linear.blrs=(1.0,)",
    "attentive.train_size=200", "attentive.heldout_size=50", "attentive.test_size=100", "attentive.epochs=1", "attentive.blrs=(0.2,)",
    "finetune.train_size=64", "finetune.heldout_size=32", "finetune.test_size=64", "finetune.batch_size=32", "finetune.epochs=1",
]


def _bench(results, capsys, *extra):
    argv = ["bench", "--preset", "smoke", "--methods", "mae,simsiam", "--results", str(results), *extra, "train.max_steps=2"]
    for o in TINY_EVALS:
        argv[1:1] = ["--eval-override", o]
    code = main(argv)
    captured = capsys.readouterr()
    return code, captured.out + captured.err


def _snapshot(root):
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.json")) if "features" not in p.parts}


def test_bench_end_to_end_and_rerun_skips_finished_work(tmp_path, capsys):
    code, out = _bench(tmp_path, capsys)
    assert code == 0, out
    bench = tmp_path / "fashion_mnist-smoke"
    runs = sorted(p.parent.name for p in bench.glob("*/run.json"))
    assert runs == ["mae-s0", "simsiam-s0"]
    records = sorted(str(p.relative_to(bench)) for p in bench.glob("*/evals/*.json"))
    assert records == [f"{r}/evals/{p}-fashion_mnist-smoke.json" for r in runs for p in ("attentive", "finetune", "knn", "linear")]
    lb = collect(bench)
    assert [r.method for r in lb.rows] == ["mae", "simsiam"] and lb.columns == ["knn (official)", "linear (official)", "attentive (official)", "finetune (proxy)"]
    assert all(0 <= s.mean <= 100 and s.n == 1 for r in lb.rows for s in r.top1.values())
    table = [ln for ln in (bench / "leaderboard.md").read_text().splitlines() if ln.startswith("| ")]
    assert len(table) == 3 and all(ln in out for ln in table)  # header, mae, simsiam  # the final table is printed
    assert (bench / "leaderboard.png").exists()
    # progress all the way: a line per stage with elapsed time and what is left, and each run's own progress
    stages = [ln for ln in out.splitlines() if ln.startswith("[")]
    assert len(stages) == 10 and stages[0].startswith("[1/10, elapsed") and stages[-1].startswith("[10/10, elapsed")
    assert "left" in stages[-1] and "not known yet" not in stages[-1]
    assert out.count("step 2/2 (100%)") == 2  # each pretraining run's closing progress line (stderr, not a terminal)

    # A rerun finds everything done: no step runs again and no record is rewritten or duplicated.
    before = _snapshot(bench)
    code, out = _bench(tmp_path, capsys)
    assert code == 0 and "2 runs and 8 evaluations already done" in out
    assert ": pretraining" not in out and ": evaluating" not in out
    assert _snapshot(bench) == before

    # A missing evaluation is the only thing redone.
    (bench / "mae-s0/evals/knn-fashion_mnist-smoke.json").unlink()
    code, out = _bench(tmp_path, capsys)
    assert code == 0 and "eval/mae-s0/knn: evaluating" in out and out.count(": evaluating") == 1
    after = _snapshot(bench)
    assert {k: v for k, v in after.items() if "knn" not in k or "mae" not in k} == {k: v for k, v in before.items() if "knn" not in k or "mae" not in k}


def test_bench_bad_input_is_one_line(tmp_path, capsys):
    assert main(["bench", "--preset", "smoke", "--methods", "mae,nope", "--results", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "unknown method 'nope'" in err and len(err.strip().splitlines()) == 1
    assert not any(tmp_path.iterdir())  # validated before anything ran


def test_control_rows_come_last_and_are_named(results):
    """A random_init run (family "control") sorts after the methods and is named under the table."""
    src = results / "fashion_mnist-quick" / "runs" / "mae-s0"
    dst = results / "fashion_mnist-quick" / "runs" / "random_init-s0"
    shutil.copytree(src, dst)
    record = json.loads((dst / "run.json").read_text())
    (dst / "run.json").write_text(json.dumps({**record, "method": "random_init", "family": "control"}))
    lb, _ = write_leaderboard(results, ["md"], plot=False)
    assert [r.method for r in lb.rows] == ["mae", "simsiam", "random_init"]
    assert "Control rows (never pretrained; what every method should beat): random_init." in (results / "leaderboard.md").read_text()
    ax = make_figure(lb).axes[0]
    hatched = [b.get_hatch() == "//" for b in ax.patches]  # per protocol column: mae, simsiam, random_init
    assert hatched == [False, False, True] * len(lb.columns)
    assert ax.get_xticklabels()[-1].get_text() == "random_init\n(control)"


def _scored_run(root, method, seed, family, scores):
    run = root / f"{method}-s{seed}"
    (run / "evals").mkdir(parents=True)
    (run / "run.json").write_text(json.dumps({"method": method, "family": family, "data": "fashion_mnist", "preset": "quick", "seed": seed, "status": "finished"}))
    for protocol, top1 in scores.items():
        (run / f"evals/{protocol}-fashion_mnist-quick.json").write_text(json.dumps({"protocol": protocol, "top1": top1}))


def test_against_the_controls_needs_the_whole_spread_above(tmp_path):
    """A method beats the controls on a protocol only when its worst seed is above every control's best seed."""
    for seed, (rand, pix, a, b) in enumerate([(70, 80, 81, 85), (72, 80, 82, 79), (71, 80, 83, 90)]):
        _scored_run(tmp_path, "random_init", seed, "control", {"knn": rand, "linear": rand, "finetune": rand})
        _scored_run(tmp_path, "raw_pixels", seed, "control", {"knn": pix, "linear": pix})  # nothing to fine-tune
        _scored_run(tmp_path, "clear", seed, "mim", {"knn": a, "linear": 60, "finetune": 75})  # knn: 81..83 > 80
        _scored_run(tmp_path, "noisy", seed, "mim", {"knn": b})  # mean 84.7 above, but its seed 1 (79) is not
    _scored_run(tmp_path, "single", 0, "mim", {"knn": 99, "linear": 99})
    from evals.leaderboard import beats_controls

    lb, _ = write_leaderboard(tmp_path, ["md"], plot=False)
    verdicts = {method: v for (_, _, method), v in beats_controls(lb).items()}
    assert verdicts == {
        "clear": {"knn": "all", "linear": "none", "finetune": "all"},  # fine-tuning: against random_init alone
        "noisy": {"knn": "random_init", "linear": "-", "finetune": "-"},  # 79 is below raw pixels' 80, above 72
        "single": {"knn": "n<2", "linear": "n<2", "finetune": "-"},
    }
    text = (tmp_path / "leaderboard.md").read_text()
    assert "## Against the controls (random_init, raw_pixels)" in text and "| clear    | all         | none     | all        |" in text


@pytest.mark.parametrize("run_fields, eval_fields", [
    ({}, {"top1": True}), ({}, {"top1": -50}), ({}, {"top1": 1e308}), ({}, {"mode": ["x"]}), ({}, {"data": 7}),
    ({"seed": [1]}, {}), ({"hardware": 5}, {}), ({"config": "x"}, {}), ({"preset": 3}, {}),
])
def test_records_with_wrongly_typed_fields_are_skipped_with_a_note(tmp_path, run_fields, eval_fields):
    """Hand-edited or foreign records never crash the table nor enter it as numbers they are not."""
    _scored_run(tmp_path, "mae", 0, "mim", {"knn": 80})
    _scored_run(tmp_path, "odd", 0, "mim", {"knn": 70})
    run = tmp_path / "odd-s0"
    (run / "run.json").write_text(json.dumps({**json.loads((run / "run.json").read_text()), **run_fields}))
    ev = run / "evals/knn-fashion_mnist-quick.json"
    ev.write_text(json.dumps({**json.loads(ev.read_text()), **eval_fields}))
    lb = collect(tmp_path)
    odd = [r for r in lb.rows if r.method == "odd"]
    assert [r.method for r in lb.rows if r.method == "mae"] == ["mae"]
    if run_fields.keys() & {"seed", "preset"}:
        assert not odd and any("skipped odd-s0" in n for n in lb.notes)
    elif eval_fields:
        assert not odd or not odd[0].top1 and any("skipped eval record odd-s0" in n for n in lb.notes)
    else:
        assert odd[0].top1["knn"].values == [70.0] and odd[0].hardware == []  # fields the table does not use


def test_a_sweeps_table_counts_only_records_made_with_the_settings_it_asks_for(tmp_path):
    """A later `ssl-bench eval` with an override writes a newer record in the same column; the sweep that asks for
    the preset's settings shows its own record, and says why the other is not counted. Other modes' columns
    and tables built without a sweep (every record) are unchanged."""
    from evals.presets import resolve_eval_config

    knn = json.loads(json.dumps(resolve_eval_config("quick")["knn"]))
    _scored_run(tmp_path, "mae", 0, "mim", {})
    evals = tmp_path / "mae-s0" / "evals"
    stem = f"knn-fashion_mnist-quick{'-fast' if knn.get('mode') == 'fast' else ''}"
    (evals / f"{stem}.json").write_text(json.dumps({"protocol": "knn", "top1": 56.0, "mode": knn.get("mode"), "config": {"knn": knn}, "created": "1"}))
    (evals / f"{stem}-1.json").write_text(json.dumps({"protocol": "knn", "top1": 58.2, "mode": knn.get("mode"), "config": {"knn": {**knn, "k": 5}}, "created": "2"}))
    asked = {"data": "fashion_mnist", "preset": "quick", "protocols": resolve_eval_config("quick")}
    [plain], [swept] = collect(tmp_path).rows, collect(tmp_path, asked).rows
    assert [s.values for s in plain.top1.values()] == [[58.2]] and [s.values for s in swept.top1.values()] == [[56.0]]
    assert any(f"not counted: mae-s0/evals/{stem}-1.json was made with other knn settings" in n for n in collect(tmp_path, asked).notes)
