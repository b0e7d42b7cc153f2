"""A method from a separate, pip-installed package registers through the `ssl_bench.methods` entry point."""
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

PLUGIN = '''
"""A throw-away plug-in: predicts each patch's mean pixel from the full ViT (no masking)."""
import torch

from ssl_bench.method import DataSpec, Method
from ssl_bench.registry import register_method


@register_method
class PatchMean(Method):
    name = "patchmean"
    description = "toy plug-in: regress each patch's mean pixel"
    recipes = {"smoke": {"train": {"blr": 1e-3}}}

    def __init__(self, backbone, scale: float = 1.0):
        super().__init__(backbone)
        self.head = torch.nn.Linear(backbone.embed_dim, 1)
        self.scale = scale

    def data_spec(self):
        return DataSpec(augmentation="mim")

    def training_step(self, batch):
        images = batch["views"][0]
        _, patches = self.backbone(images)
        p = self.backbone.patch_size
        target = torch.nn.functional.avg_pool2d(images, p).flatten(1)
        return {"loss_mse": self.scale * (self.head(patches).squeeze(-1) - target).pow(2).mean()}
'''


def test_entry_point_plugin_is_listed_and_trains(tmp_path):
    pkg = tmp_path / "pkg"
    (pkg / "ssl_bench_toy").mkdir(parents=True)
    (pkg / "ssl_bench_toy" / "__init__.py").write_text(PLUGIN)
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "ssl-bench-toy"
        version = "0.0.1"
        [project.entry-points."ssl_bench.methods"]
        patchmean = "ssl_bench_toy:PatchMean"
    '''))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(pkg)], check=True, capture_output=True)
    assert list(site.glob("ssl_bench_toy-*.dist-info/entry_points.txt"))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).resolve().parent.parent)])}
    cli = [sys.executable, "-m", "ssl_bench.cli"]

    listed = subprocess.run([*cli, "methods"], env=env, capture_output=True, text=True, check=True).stdout
    assert any(ln.startswith("patchmean ") and "toy plug-in" in ln for ln in listed.splitlines())
    assert any(ln.startswith("mae ") for ln in listed.splitlines())

    out = tmp_path / "run"
    done = subprocess.run([*cli, "pretrain", "--method", "patchmean", "--preset", "smoke", "--out", str(out),
                           "train.max_steps=2", "train.progress=false", "method.scale=2.0"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished" and record["steps"] == 2
    assert record["config"]["method"] == {"scale": 2.0}
    assert "loss_mse" in record["loss"]
