"""`ssl-bench throughput`: trainer, step-alone and loader-alone figures for both data paths in one table."""
import json

from ssl_bench_app.cli import main


def test_compare_paths_table(tmp_path, capsys):
    code = main(["throughput", "--preset", "smoke", "--methods", "mae", "--steps", "3", "--limit-steps", "2",
                 "--rounds", "3", "--compare-paths", "--out", str(tmp_path)])
    assert code == 0
    record = json.loads((tmp_path / "throughput-fashion_mnist-smoke.json").read_text())
    rows = record["rows"]
    assert [(r["method"], r["data_path"]) for r in rows] == [("mae", "per-sample CPU"), ("mae", "batched device")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["step_images_per_s"] > 0 and r["loader_images_per_s"] > 0
        # three alternating rounds: medians, and the ratio is the median of the rounds' own ratios
        assert len(r["trainer_images_per_s_rounds"]) == len(r["step_images_per_s_rounds"]) == 3
        assert r["images_per_s"] == sorted(r["trainer_images_per_s_rounds"])[1]
        assert r["step_images_per_s"] == sorted(r["step_images_per_s_rounds"])[1]
        ratios = [t / s for t, s in zip(r["trainer_images_per_s_rounds"], r["step_images_per_s_rounds"])]
        assert r["trainer_over_step"] == sorted(ratios)[1]
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU: no MFU or GPU memory
    md = (tmp_path / "throughput-fashion_mnist-smoke.md").read_text()
    assert "trainer / step" in md and "loader alone img/s (1 core)" in md
    assert "Loader alone, batched / per-sample (same core): mae " in md and "--compare-paths" in md
    assert "CPU:" in md  # names the hardware


def test_rounds_below_one_is_a_one_line_error(tmp_path, capsys):
    code = main(["throughput", "--preset", "smoke", "--methods", "mae", "--rounds", "0", "--out", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert code != 0 and err.count("\n") == 0 and "--rounds must be at least 1" in err
