"""Monitoring during pretraining: the online probe learns from labels without touching the method, the kNN
check runs every N epochs, and both reach metrics, run.json and the hook contract."""
import json

import torch

from ssl_bench.trainer import pretrain
from tests.conftest import smoke_config

TINY = ["model.embed_dim=32", "model.depth=2", "model.num_heads=2", "model.drop_path=0.1", "data.subset=32", "train.batch_size=16",
        "train.epochs=2", "train.ckpt_every=100"]
ON = ["monitor.online_probe=true", "monitor.knn_every=1", "monitor.knn_train_size=300", "monitor.knn_heldout_size=100",
      "monitor.knn_k=10", "monitor.probe_lr=0.05"]


def test_the_monitor_changes_no_weight_of_the_method_and_logs_its_probes(tmp_path):
    off = pretrain(smoke_config("simsiam", *TINY), tmp_path / "off")
    on = pretrain(smoke_config("simsiam", *TINY, *ON), tmp_path / "on")
    a, b = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=False)["model"] for d in ("off", "on"))
    # the probe's cross-entropy has no path to the encoder and the monitor draws no random number
    assert all(torch.equal(a[k], b[k]) for k in a), "the monitor changed the method's training"
    assert "monitor" not in off and off["steps"] == on["steps"] == 4

    monitor = on["monitor"]
    assert [e["epoch"] for e in monitor["online_probe"]] == [0, 1]
    assert [(r["epoch"], r["step"]) for r in monitor["knn"]] == [(0, 2), (1, 4)]
    for r in monitor["knn"]:  # 10 classes: chance is 10%; even a barely trained ViT's features beat it
        assert 30.0 < r["knn_top1"] <= 100.0 and 0.0 <= r["probe_heldout_top1"] <= 100.0
    rows = [json.loads(line) for line in (tmp_path / "on" / "metrics.jsonl").read_text().splitlines()]
    assert any("probe_top1" in r and "probe_loss" in r for r in rows)
    assert [r["monitor/knn_top1"] for r in rows if "monitor/knn_top1" in r] == [r["knn_top1"] for r in monitor["knn"]]
    assert "probe_top1" in (tmp_path / "on" / "metrics.csv").read_text().splitlines()[0]
    assert json.loads((tmp_path / "on" / "run.json").read_text())["monitor"] == monitor


def test_the_online_probe_learns_from_labels(tmp_path):
    """On the detached features of a fixed encoder, the probe's held-out accuracy climbs well above chance."""
    from ssl_bench.build import build_method
    from ssl_bench.data.datasets import load_dataset
    from ssl_bench.monitor import Monitor

    cfg = smoke_config("simsiam", *TINY, *ON)
    _, info = load_dataset("fashion_mnist", None, "pretrain")
    method = build_method(cfg, info)
    monitor = Monitor(cfg, method, info, torch.device("cpu"))
    memory, _ = monitor._knn_data()
    images, labels = zip(*(memory[i] for i in range(len(memory))))
    images, labels = torch.stack(images), torch.tensor(labels)
    before = monitor.knn_check()["probe_heldout_top1"]
    for epoch in range(3):
        for i in range(0, len(images), 32):
            monitor.on_batch(i, {"views": [images[i: i + 32]], "label": labels[i: i + 32]}, method)
    after = monitor.knn_check()["probe_heldout_top1"]
    assert after > 40.0 and after > before + 20.0, (before, after)
    assert all(p.grad is None for p in method.parameters())  # nothing reached the method


def test_a_resumed_run_continues_the_monitor(tmp_path, monkeypatch):
    from methods.simsiam import SimSiam
    from tests.test_trainer import interrupted_run

    cfg = smoke_config("simsiam", *TINY, *ON, "train.ckpt_every=2")
    straight = pretrain(cfg, tmp_path / "straight")
    # interrupted in step 3: the checkpoint of step 2 (end of epoch 0) is the last
    interrupted_run(monkeypatch, SimSiam, 3, cfg, tmp_path / "resumed")
    import torch
    assert torch.load(tmp_path / "resumed" / "checkpoint.pt", weights_only=True)["step"] == 2
    resumed = pretrain(cfg, tmp_path / "resumed", resume=True)
    assert resumed["monitor"] == straight["monitor"]  # probe, its optimizer, running sums and kNN history carried over


def test_the_online_probe_reads_nothing_back_between_log_rows(monkeypatch):
    """On a GPU a read-back stalls the CPU until the device catches up, every step: the probe trains every
    ``probe_every`` steps with no host read between log rows, and unlabelled images (-1) get no weight."""
    from ssl_bench.build import build_method
    from ssl_bench.data.datasets import load_dataset
    from ssl_bench.monitor import Monitor

    cfg = smoke_config("simsiam", *TINY, *ON, "train.log_every=4", "monitor.probe_every=2")
    _, info = load_dataset("fashion_mnist", None, "pretrain")
    method = build_method(cfg, info)
    images = torch.rand(16, 1, 28, 28)
    labels = torch.tensor([3, -1] * 8)

    def read_back(*args, **kwargs):
        raise AssertionError("the probe read a tensor back to the host between log rows")

    def probe_weight(m):
        return m.probe[1].weight.detach().clone()

    monitor = Monitor(cfg, method, info, torch.device("cpu"))
    with monkeypatch.context() as patch:
        for name in ("__bool__", "item", "tolist", "nonzero"):
            patch.setattr(torch.Tensor, name, read_back)
        before = probe_weight(monitor)
        monitor.on_batch(2, {"views": [images], "label": labels}, method)  # a probe step
        trained = probe_weight(monitor)
        monitor.on_batch(3, {"views": [images], "label": labels}, method)  # not one
        assert not torch.equal(before, trained) and torch.equal(trained, probe_weight(monitor))
    assert monitor._window[2].item() == 8  # images seen: the labelled ones only

    fresh = Monitor(cfg, method, info, torch.device("cpu"))  # a batch with no label moves nothing
    before = probe_weight(fresh)
    fresh.on_batch(2, {"views": [images], "label": torch.full((16,), -1)}, method)
    assert torch.equal(before, probe_weight(fresh))
