"""The folder loader benchmark and the synthetic JPEG folder command, at toy size."""
import json

from ssl_bench_app.cli import main


def test_make_jpeg_folder_is_deterministic_and_never_overwrites(tmp_path, capsys):
    """The same files from one process and from several (images are written in parallel), and never twice."""
    args = ["make-jpeg-folder", "--images", "5", "--size", "40x30", "--classes", "2"]
    assert main([*args, "--out", str(tmp_path / "a"), "--workers", "1"]) == 0
    assert main([*args, "--out", str(tmp_path / "b"), "--workers", "2"]) == 0
    files = sorted(p.relative_to(tmp_path / "a") for p in (tmp_path / "a").rglob("*.jpg"))
    assert len(files) == 5 and len({f.parent for f in files}) == 2
    assert all((tmp_path / "a" / f).read_bytes() == (tmp_path / "b" / f).read_bytes() for f in files)
    assert "wrote 5 JPEGs of 40x30" in capsys.readouterr().out
    assert main([*args, "--out", str(tmp_path / "a")]) == 2
    assert "already holds files" in capsys.readouterr().err
    assert main([*args, "--out", str(tmp_path / "c"), "--workers", "0"]) == 2 and not (tmp_path / "c").exists()
    assert "--workers must be at least 1" in capsys.readouterr().err
    assert main(["make-jpeg-folder", "--out", str(tmp_path / "c"), "--size", "40"]) == 2


def test_make_jpeg_folder_refuses_bad_options_in_one_line(tmp_path, capsys):
    """Out-of-range options are named before anything is written, never a traceback or a memory error."""
    (tmp_path / "file").write_text("x")
    cases = {("--size", "100000x100000"): "from 8 to 4096", ("--quality", "0"): "--quality is a JPEG quality from 1 to 100",
             ("--quality", "101"): "--quality is a JPEG quality", ("--seed", "-1"): "--seed must be at least 0",
             ("--out", str(tmp_path / "file")): "is a file, not a folder"}
    for (option, value), message in cases.items():
        out = ["--out", str(tmp_path / "new")] if option != "--out" else []
        assert main(["make-jpeg-folder", "--images", "2", "--size", "16x16", *out, option, value]) == 2, option
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not (tmp_path / "new").exists()
    assert main(["make-jpeg-folder", "--images", "3", "--classes", "10", "--size", "16x16", "--out", str(tmp_path / "few")]) == 0
    assert "3 JPEGs of 16x16 in 3 classes" in capsys.readouterr().out
    assert main(["make-jpeg-folder", "--images", "2", "--size", "16x16,16x", "--out", str(tmp_path / "new")]) == 2
    err = capsys.readouterr().err
    assert "image size '16x' is not WIDTHxHEIGHT" in err and err.count("\n") == 1 and not (tmp_path / "new").exists()


def test_make_jpeg_folder_takes_several_sizes_in_turn(tmp_path, capsys):
    """Landscape and portrait, as ImageNet's photographs: image i has the i-th size in turn."""
    from PIL import Image

    assert main(["make-jpeg-folder", "--images", "5", "--size", "40x30, 30x40", "--classes", "1", "--out", str(tmp_path / "d")]) == 0
    assert "5 JPEGs of 40x30, 30x40 in 1 classes" in capsys.readouterr().out
    files = sorted((tmp_path / "d").rglob("*.jpg"))
    assert [Image.open(f).size for f in files] == [(40, 30), (30, 40), (40, 30), (30, 40), (40, 30)]


def test_throughput_loader_table_for_a_folder(tmp_path, capsys):
    assert main(["make-jpeg-folder", "--out", str(tmp_path / "data"), "--images", "70", "--size", "48x40"]) == 0
    code = main(["throughput", "--data", "imagefolder", "--root", str(tmp_path / "data"), "--loader-only",
                 "--policies", "mim,simsiam", "--out", str(tmp_path / "out"), "data.img_size=32", "data.num_workers=0"])
    assert code == 0
    record = json.loads((tmp_path / "out" / "loader-imagefolder-32px.json").read_text())
    rows = {r["policy"]: r for r in record["rows"]}
    assert set(rows) == {"mim", "simsiam"} and rows["simsiam"]["views"] == 2
    assert all(r["fast_per_core"] > 0 and r["torchvision_per_core"] > 0 and r["loader_wall_images_per_s"] > 0 for r in rows.values())
    assert all(r["decode_per_core"] > 0 and r["decode_share"] > 0 for r in rows.values())
    md = (tmp_path / "out" / "loader-imagefolder-32px.md").read_text()
    assert "Hardware:" in md and "| simsiam" in md and "--root" in md and "--policies mim,simsiam" in md
    assert "its read + decode alone, img/s per core" in md
    assert main(["throughput", "--data", "imagefolder", "--root", str(tmp_path / "data"), "--loader-only", "--policies", "nope",
                 "--out", str(tmp_path / "out2")]) == 2
    assert "unknown augmentation policy 'nope'" in capsys.readouterr().err
    for bad, named in (("data.num_workers=x", "'data.num_workers' takes an integer >= 0"), ("data.img_size=0", "'data.img_size' takes")):
        assert main(["throughput", "--data", "imagefolder", "--root", str(tmp_path / "data"), "--loader-only", "--out", str(tmp_path / "out3"), bad]) == 2
        err = capsys.readouterr().err
        assert named in err and err.count("\n") == 1, err
    assert not (tmp_path / "out3").exists() or not list((tmp_path / "out3").iterdir())


def test_vitb16_configuration_applies_to_a_folder(tmp_path, monkeypatch):
    """--vitb16 is the official codes' ViT-B/16 setting on any data: on a folder, the loader table runs at
    224 px and every trained configuration is ViT-B/16, batch 256, bf16, with the method's published sizes where
    the preset scales them down (MAE's decoder 512 x 8, 16 heads) unless the user sets one (the trainer is stood
    in for: a ViT-B/16 step is a GPU's work)."""
    import ssl_bench.trainer

    trained = []

    def pretrain(cfg, out_dir):
        trained.append(cfg)
        return {"images_per_s": 1.0, "data_share": 0.5, "config": cfg, "steps": 3, "effective_batch": cfg["train"]["batch_size"]}

    monkeypatch.setattr(ssl_bench.trainer, "pretrain", pretrain)
    assert main(["make-jpeg-folder", "--out", str(tmp_path / "data"), "--images", "8", "--size", "48x40"]) == 0
    code = main(["throughput", "--data", "imagefolder", "--root", str(tmp_path / "data"), "--vitb16", "--preset", "quick",
                 "--methods", "mae", "--policies", "mim", "--rounds", "1", "--no-limits", "--out", str(tmp_path / "out"),
                 "data.num_workers=0", "method.decoder_depth=2"])
    assert code == 0
    loader = json.loads((tmp_path / "out" / "loader-imagefolder-224px.json").read_text())
    assert loader["device_batch_size"] == 256  # a GPU's device path is timed at the training batch
    (cfg,) = trained
    assert (cfg["model"]["arch"], cfg["model"]["patch_size"], cfg["data"]["img_size"]) == ("vit_base", 16, 224)
    assert (cfg["train"]["batch_size"], cfg["train"]["amp"], cfg["data"]["name"]) == (256, "bf16", "imagefolder")
    assert (cfg["method"]["decoder_dim"], cfg["method"]["decoder_heads"], cfg["method"]["decoder_depth"]) == (512, 16, 2)
    assert "--vitb16" in (tmp_path / "out" / "throughput-imagefolder-vitb16-quick.md").read_text()
