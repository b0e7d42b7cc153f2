"""Plug-ins from a separate, pip-installed package: methods (`ssl_bench.methods`), augmentation policies
(`ssl_bench.views`) and evaluation protocols (`ssl_bench.protocols`), through entry points only."""
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


# A DINO-style method whose multi-crop views (2 global + 2 local crops of another size) come from its own policy,
# registered in another module of the package and named by the method.
TOY_VIEWS = '''
from ssl_bench.data.views import View, register_policy


@register_policy("toy_multicrop")
def toy_multicrop(local_size=14):
    glob = View(crop_scale=(0.4, 1.0), jitter=(0.4, 0.4, 0.2, 0.1), blur_p=0.5)
    local = View(size=local_size, crop_scale=(0.05, 0.4), blur_p=0.5)
    return (glob, glob, local, local)
'''

TOY_DINO = '''
import copy

import torch
import torch.nn.functional as F

from ssl_bench.method import DataSpec, Method
from ssl_bench.registry import register_method


@register_method
class ToyDINO(Method):
    name = "toydino"
    description = "toy plug-in: self-distillation from an EMA teacher on global crops"

    def __init__(self, backbone, out_dim: int = 32):
        super().__init__(backbone)
        self.head = torch.nn.Linear(backbone.embed_dim, out_dim)
        self.teacher = copy.deepcopy(torch.nn.ModuleList([backbone, self.head])).requires_grad_(False)

    def data_spec(self):
        return DataSpec(augmentation="toy_multicrop")

    def after_optimizer_step(self):
        with torch.no_grad():
            for t, s in zip(self.teacher.parameters(), [*self.backbone.parameters(), *self.head.parameters()]):
                t.lerp_(s, 0.01)

    def training_step(self, batch):
        crops = batch["views"]  # 2 x (B, C, 28, 28), then 2 x (B, C, 14, 14)
        with torch.no_grad():
            targets = [F.softmax(self.teacher[1](self.teacher[0](x)[0]) / 0.04, -1) for x in crops[:2]]
        logps = [F.log_softmax(self.head(self.backbone(x)[0]) / 0.1, -1) for x in crops]
        loss = sum(-(p * q).sum(-1).mean() for i, p in enumerate(targets) for j, q in enumerate(logps) if i != j)
        self.log("local_px", crops[-1].shape[-1])
        return {"loss_distill": loss / 6}
'''

# An evaluation protocol: nearest class centroid on the frozen cls features.
TOY_PROTOCOL = '''
import torch
import torch.nn.functional as F

from evals.registry import register_protocol


@register_protocol("centroid", presets={"smoke": {"train_size": 300, "test_size": 200}}, feature_kinds=("cls",))
def evaluate(ctx):
    """Nearest class centroid (cosine) on frozen cls features."""
    train, test = ctx.features("train", ("cls",)), ctx.features("test", ("cls",))
    x, y = F.normalize(train.tensor("cls"), dim=1), torch.as_tensor(train.labels)
    centroids = F.normalize(torch.stack([x[y == c].mean(0) for c in range(ctx.num_classes)]), dim=1)
    pred = (F.normalize(test.tensor("cls"), dim=1) @ centroids.T).argmax(1)
    top1 = 100.0 * float((pred == torch.as_tensor(test.labels)).float().mean())
    return {"top1": top1, "selected": {}, "details": {"n_train": len(y)}}
'''


def install(tmp_path, modules: dict, entry_points: str):
    """pip-install a throw-away package ``ssl_bench_toy`` into tmp_path/site; its environment for the CLI."""
    pkg = tmp_path / "pkg"
    (pkg / "ssl_bench_toy").mkdir(parents=True)
    for name, text in modules.items():
        (pkg / "ssl_bench_toy" / f"{name}.py").write_text(text)
    (pkg / "pyproject.toml").write_text(textwrap.dedent('''
        [build-system]
        requires = ["setuptools"]
        build-backend = "setuptools.build_meta"
        [project]
        name = "ssl-bench-toy"
        version = "0.0.1"
    ''') + textwrap.dedent(entry_points))
    site = tmp_path / "site"
    subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation", "--no-index",
                    "--target", str(site), str(pkg)], check=True, capture_output=True)
    assert list(site.glob("ssl_bench_toy-*.dist-info/entry_points.txt"))
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(Path(__file__).resolve().parent.parent)])}


def test_multicrop_method_views_and_protocol_plugins_pretrain_evaluate_and_rank(tmp_path):
    env = install(tmp_path, {"__init__": "", "views": TOY_VIEWS, "method": TOY_DINO, "protocol": TOY_PROTOCOL}, '''
        [project.entry-points."ssl_bench.methods"]
        toydino = "ssl_bench_toy.method:ToyDINO"
        [project.entry-points."ssl_bench.views"]
        toy_multicrop = "ssl_bench_toy.views:toy_multicrop"
        [project.entry-points."ssl_bench.protocols"]
        centroid = "ssl_bench_toy.protocol:evaluate"
    ''')
    cli = [sys.executable, "-m", "ssl_bench_app.cli"]
    run = tmp_path / "results" / "toydino-s0"
    done = subprocess.run([*cli, "pretrain", "--method", "toydino", "--preset", "smoke", "--out", str(run),
                           "train.max_steps=2", "train.progress=false"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["local_px"] == 14  # the local crops arrived at their own size

    done = subprocess.run([*cli, "eval", "--run", str(run), "--protocol", "centroid,knn", "--preset", "smoke",
                           "centroid.test_size=100", "knn.ks=(5,)", "knn.train_size=200", "knn.heldout_size=50",
                           "knn.test_size=100"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    record = json.loads((run / "evals" / "centroid-fashion_mnist-smoke.json").read_text())
    assert record["config"]["centroid"]["train_size"] == 300 and record["config"]["centroid"]["test_size"] == 100
    assert record["details"] == {"n_train": 300} and 10.0 < record["top1"] <= 100.0

    done = subprocess.run([*cli, "leaderboard", "--results", str(tmp_path / "results"), "--no-plot", "--format", "csv"],
                          env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    header = (tmp_path / "results" / "leaderboard.csv").read_text().splitlines()[0]
    assert header.index("knn") < header.index("centroid")  # built-ins first, then plug-ins
    names = subprocess.run([sys.executable, "-c", "from evals.registry import protocol_names; print(protocol_names())"],
                           env=env, capture_output=True, text=True, check=True).stdout
    assert "'centroid'" in names  # what `ssl-bench bench` evaluates by default


def test_entry_point_plugin_is_listed_and_trains(tmp_path):
    env = install(tmp_path, {"__init__": PLUGIN}, '''
        [project.entry-points."ssl_bench.methods"]
        patchmean = "ssl_bench_toy:PatchMean"
    ''')
    cli = [sys.executable, "-m", "ssl_bench_app.cli"]

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
