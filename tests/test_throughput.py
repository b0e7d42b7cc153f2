"""`ssl-bench throughput`: trainer, step-alone and loader-alone figures for both data paths in one table."""
import json

from ssl_bench_app.cli import main


def test_compare_paths_table(tmp_path, capsys):
    code = main(["throughput", "--preset", "smoke", "--methods", "mae", "--steps", "3", "--limit-steps", "2",
                 "--compare-paths", "--out", str(tmp_path)])
    assert code == 0
    record = json.loads((tmp_path / "throughput-fashion_mnist-smoke.json").read_text())
    rows = record["rows"]
    assert [(r["method"], r["data_path"]) for r in rows] == [("mae", "per-sample CPU"), ("mae", "batched device")]
    for r in rows:
        assert r["images_per_s"] > 0 and r["step_images_per_s"] > 0 and r["loader_images_per_s"] > 0
        assert r["trainer_over_step"] == r["images_per_s"] / r["step_images_per_s"]
        assert r["mfu"] is None and r["peak_mem_gib"] is None  # CPU: no MFU or GPU memory
    md = (tmp_path / "throughput-fashion_mnist-smoke.md").read_text()
    assert "trainer / step" in md and "loader alone img/s (1 core)" in md
    assert "Loader alone, batched / per-sample (same core): mae " in md and "--compare-paths" in md
    assert "CPU:" in md  # names the hardware
