"""scripts/gpu-check.sh, checked where CI runs (no GPU): its --dry-run does the same steps at smoke size."""
import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def gpu_check(*args):
    return subprocess.run(["bash", str(ROOT / "scripts" / "gpu-check.sh"), "--python", sys.executable, *args],
                          capture_output=True, text=True, timeout=600)


def dry_run_report(parts: str, out: Path, *args: str) -> str:
    """The report of ``--dry-run --only parts [args]`` into ``out`` (which holds no earlier report)."""
    done = gpu_check("--dry-run", "--only", parts, "--out", str(out), *args)
    assert done.returncode == 0, done.stderr[-2000:]
    (report,) = out.glob("*-cpu-dryrun.md")
    return report.read_text()


def test_dry_run_of_chosen_parts_writes_their_report_sections(tmp_path):
    text = dry_run_report("knn,mae", tmp_path)
    assert "Dry run on the CPU" in text and "--only knn,mae" in text
    assert "## kNN over random features" in text and "## MAE, fashion_mnist, short pretraining" in text
    assert "Training throughput" not in text and "Failed steps" not in text  # only the parts asked for
    again = gpu_check("--dry-run", "--only", "knn", "--out", str(tmp_path))
    assert again.returncode == 0 and len(list(tmp_path.glob("*.md"))) == 2  # a second check never overwrites the first


def test_the_tests_part_records_each_cuda_test_and_its_outcome(tmp_path):
    """--only tests runs the tests that need a GPU and lists each with its outcome (skipped on this CPU)."""
    text = dry_run_report("tests", tmp_path)
    section = text.split("## Tests that need a CUDA GPU", 1)[1]
    assert "test_cuda_decode_never_writes_memory_the_training_stream_still_reads[cuda]`: skipped" in section
    assert "test_torch_search_returns_faiss_neighbours[cuda]`: skipped" in section
    assert "test_ema_update_is_lerp_of_every_parameter_bit_for_bit_and_leaves_buffers[cuda]`: skipped" in section
    assert "[cpu]" not in section  # only the tests marked cuda
    assert "Failed steps" not in text


def test_an_unknown_part_is_one_line_naming_the_choices(tmp_path):
    done = gpu_check("--dry-run", "--only", "knn,warp", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and not (tmp_path / "out").exists()
    assert done.stderr.strip() == "gpu-check: unknown part 'warp' in --only; choose from throughput, vitb16, knn, mae, tests, folders"


def test_set_without_a_value_is_one_line(tmp_path):
    done = gpu_check("--dry-run", "--set", "train.compile_mode", "--out", str(tmp_path / "out"))
    assert done.returncode == 2 and not (tmp_path / "out").exists() and done.stderr.count("\n") == 1
    assert "gpu-check: --set takes KEY=VALUE" in done.stderr


def test_dry_run_of_the_folders_part_trains_from_jpegs_decoded_on_the_device(tmp_path):
    """--only folders (issue 16's GPU check): a synthetic JPEG folder, its loader table, and MAE and MoCo v3
    trained from it with data.decode=device, named as such in the report."""
    text = dry_run_report("folders", tmp_path)
    assert text.count("## Image-folder loader") == 1 and "data.decode=device" in text  # once, though two tables hold it
    assert "| mae      | device decode" in text and "| mocov3   | device decode" in text


def test_dry_run_times_the_official_steps_beside_ours_when_given_their_code(tmp_path):
    """--official-code reaches the ViT-B/16 rows: both official models are built at our sizes and timed; --set
    overrides reach them too."""
    official = tmp_path / "official"
    shutil.copytree(ROOT / "tests" / "fixtures" / "official_standin", official)
    text = dry_run_report("vitb16", tmp_path / "out", "--official-code", str(official), "--set", "model.depth=1")
    assert "official step img/s" in text and f"--official-code {official}" in text and "model.depth=1`" in text
    mae, mocov3 = (json.loads((official / repo / "built.json").read_text()) for repo in ("mae", "moco-v3"))
    assert mae["img_size"] == mocov3["img_size"] == 28 and mae["mask_ratio"] == 0.75 and mae["depth"] == 1
    assert {"dim", "mlp_dim", "T", "m", "stop_grad_conv1"} <= set(mocov3)
