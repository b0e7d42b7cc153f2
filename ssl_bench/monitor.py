"""Progress probes during pretraining (config section ``monitor``; off at smoke and quick).

* Online linear probe (``monitor.online_probe``): BatchNorm (no affine) + Linear on the encoder's cls token of
  the first view, trained alongside the method with its own SGD optimizer. The cls token is computed under
  ``no_grad`` from the weights just updated, so the probe's loss has no path to the encoder: labels are
  used by the probe only and the method trains exactly as without it (tested bit-for-bit).
* kNN check (``monitor.knn_every`` epochs): cls features of ``knn_train_size`` labelled training images
  (the memory) and ``knn_heldout_size`` other ones (the queries), no augmentation, scored by
  ``evals.knn.KNNClassifier`` (weighted vote, k = ``knn_k``); the online probe is scored on the same queries.

Both go to metrics.jsonl / metrics.csv (probe every logged step), TensorBoard and ``run.json["monitor"]``.
The trainer calls ``on_batch(step, batch, method)`` after each optimizer step and ``on_epoch_end(epoch)``;
nothing here draws from the training random streams, so switching the monitor on changes no weight of the
method. Its state (probe, optimizer, running sums, history) is checkpointed with the run, so a resumed run
continues it.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ssl_bench.data.datasets import DatasetInfo, TransformedSubset, load_dataset
from ssl_bench.data.transforms import eval_transform
from ssl_bench.runtime import autocast

MONITOR_SEED = 0  # the probe's initialisation and the kNN subsets: the same for every run


class Monitor:
    def __init__(self, cfg: dict, method, info: DatasetInfo, device: torch.device, logger=None):
        self.opts, self.info, self.device, self.logger = cfg["monitor"], info, device, logger
        self.log_every = cfg["train"]["log_every"]
        self.img_size = method.encoder.img_size
        self.data_cfg = cfg["data"]
        self.step, self.knn_history, self.probe_epochs = 0, [], []
        self._window = torch.zeros(3, device=device)  # loss sum, correct, seen since the last log
        self._epoch = torch.zeros(3, device=device)  # the same over the current epoch
        self.probe = None
        if self.opts["online_probe"]:
            with torch.random.fork_rng(devices=[]):  # the method's random stream stays as without a monitor
                torch.manual_seed(MONITOR_SEED)
                dim = method.encoder.embed_dim
                self.probe = nn.Sequential(nn.BatchNorm1d(dim, affine=False), nn.Linear(dim, info.num_classes)).to(device)
            self.optimizer = torch.optim.SGD(self.probe.parameters(), lr=self.opts["probe_lr"], momentum=0.9)
        self.method = method

    # -- the trainer's hooks --------------------------------------------------------------------------
    def on_batch(self, step: int, batch: dict, method) -> None:
        """Every ``probe_every`` steps, train the probe one step on the detached cls token of
        ``batch["views"][0]`` with ``batch["label"]``. Nothing is read back to the host except at the
        logger's cadence: unlabelled images are weighted out rather than indexed out (which would sync)."""
        self.step, self.method = step, method
        if self.probe is None or "label" not in batch:
            return
        if step % self.opts["probe_every"] == 0 or step == 1:
            labels = torch.as_tensor(batch["label"], device=self.device)
            known = (labels >= 0).float()  # (B,); unlabelled images (e.g. STL-10's unlabeled split) carry -1
            cls = self._cls(method.encoder, batch["views"][0])  # (B, D), no graph to the encoder
            self.probe.train()
            logits = self.probe(cls)  # (B, C)
            per_image = F.cross_entropy(logits, labels.clamp_min(0), reduction="none")  # (B,)
            seen = known.sum()
            loss = (per_image * known).sum() / seen.clamp_min(1.0)  # a batch with no label: zero gradient
            self.optimizer.zero_grad(set_to_none=True)
            loss.backward()
            self.optimizer.step()
            correct = ((logits.detach().argmax(1) == labels).float() * known).sum()
            stats = torch.stack([loss.detach() * seen, correct, seen])
            self._window += stats
            self._epoch += stats
        if step % self.log_every == 0 or step == 1:  # the logger's cadence: one sync per logged row
            loss_sum, correct, seen = self._window.tolist()
            if seen > 0:
                method.log("probe_loss", loss_sum / seen)
                method.log("probe_top1", 100.0 * correct / seen)
            self._window.zero_()

    def on_epoch_end(self, epoch: int) -> None:
        if self.probe is not None and self._epoch[2] > 0:
            loss_sum, correct, seen = self._epoch.tolist()
            self.probe_epochs.append({"epoch": epoch, "train_loss": loss_sum / seen, "train_top1": 100.0 * correct / seen})
            self._epoch.zero_()
        every = self.opts["knn_every"]
        if every and (epoch + 1) % every == 0:
            result = {"epoch": epoch, "step": self.step, **self.knn_check()}
            self.knn_history.append(result)
            if self.logger is not None:
                self.logger.scalars(self.step, epoch, {f"monitor/{k}": v for k, v in result.items() if k not in ("epoch", "step")})

    def state_dict(self) -> dict:
        state = {"window": self._window, "epoch": self._epoch, "knn": self.knn_history, "probe_epochs": self.probe_epochs}
        if self.probe is not None:
            state |= {"probe": self.probe.state_dict(), "optimizer": self.optimizer.state_dict()}
        return state

    def load_state_dict(self, state: dict) -> None:
        self._window.copy_(state["window"])
        self._epoch.copy_(state["epoch"])
        self.knn_history, self.probe_epochs = list(state["knn"]), list(state["probe_epochs"])
        if self.probe is not None and "probe" in state:
            self.probe.load_state_dict(state["probe"])
            self.optimizer.load_state_dict(state["optimizer"])

    def summary(self) -> dict:
        """What run.json records under "monitor"."""
        return {"online_probe": self.probe_epochs if self.probe is not None else None, "knn": self.knn_history, "settings": dict(self.opts)}

    # -- pieces ------------------------------------------------------------------------------------------
    @torch.no_grad()
    def _cls(self, encoder, images: torch.Tensor) -> torch.Tensor:
        """The encoder's cls token (eval mode: no drop path, no random draw), detached."""
        was_training = encoder.training
        encoder.eval()
        with autocast(self.device):
            cls, _ = encoder(images)
        encoder.train(was_training)
        return cls.float()

    def _knn_data(self) -> tuple[TransformedSubset, TransformedSubset]:
        if not hasattr(self, "_subsets"):
            ds, _ = load_dataset(self.data_cfg["name"], self.data_cfg["root"], "train", img_size=self.data_cfg["img_size"])
            perm = np.random.default_rng(MONITOR_SEED).permutation(len(ds))
            n_query = self.opts["knn_heldout_size"]
            memory, queries = perm[n_query: n_query + self.opts["knn_train_size"]], perm[:n_query]
            transform = eval_transform(self.img_size, self.info.img_size, self.info.mean, self.info.std)
            self._subsets = (TransformedSubset(ds, np.sort(memory), transform), TransformedSubset(ds, np.sort(queries), transform))
        return self._subsets

    def _features(self, subset: TransformedSubset) -> tuple[torch.Tensor, torch.Tensor]:
        """cls features (n, D) on the CPU and labels (n,), in batches (no DataLoader: it would draw a seed)."""
        feats, labels, bs = [], [], self.opts["batch_size"]
        for i in range(0, len(subset), bs):
            images, ys = zip(*(subset[j] for j in range(i, min(i + bs, len(subset)))))
            feats.append(self._cls(self.method.encoder, torch.stack(images).to(self.device)).cpu())
            labels += [int(y) for y in ys]
        return torch.cat(feats), torch.tensor(labels)

    def knn_check(self) -> dict:
        """kNN top-1 (%) of the held-out queries against the memory; the online probe's top-1 on them too."""
        from ssl_bench.knn import KNNClassifier

        memory, queries = self._knn_data()
        train_x, train_y = self._features(memory)
        query_x, query_y = self._features(queries)
        k = min(self.opts["knn_k"], len(train_x))
        clf = KNNClassifier(train_x, train_y, self.info.num_classes, self.opts["knn_temperature"])
        out = {"knn_top1": clf.accuracy(query_x, query_y, [k])[k]}
        if self.probe is not None:
            self.probe.eval()
            with torch.no_grad():
                pred = self.probe(query_x.to(self.device)).argmax(1).cpu()
            out["probe_heldout_top1"] = 100.0 * float((pred == query_y).float().mean())
        return out


def build_monitor(cfg: dict, method, info: DatasetInfo, device: torch.device, logger=None) -> Monitor | None:
    """A Monitor when ``cfg["monitor"]`` switches a probe on, else None."""
    opts = cfg.get("monitor") or {}
    if not (opts.get("online_probe") or opts.get("knn_every")):
        return None
    return Monitor(cfg, method, info, device, logger)
