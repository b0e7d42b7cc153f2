"""Weighted k-nearest-neighbour classification (DINO's vote) over a faiss index: the classifier the
evaluation harness (evals.knn) and the pretraining monitor (ssl_bench.monitor) share.

Features are l2-normalized; each query's k nearest train features by cosine similarity s vote for their
labels with weight exp(s / T); one exact inner-product search at the largest k serves every k. The search
runs in faiss (on the GPU when faiss has GPU support); where faiss is CPU-only but torch sees a CUDA GPU,
the same exact search runs as float32 matrix products on that GPU (no faiss-gpu wheel exists for every CUDA).
"""
from __future__ import annotations

from collections.abc import Sequence

import faiss
import numpy as np
import torch
import torch.nn.functional as F

from ssl_bench.errors import UserError


class KNNClassifier:
    """An exact inner-product index over the l2-normalized train features (n, D) with their labels (n,)."""

    def __init__(self, train: torch.Tensor, labels: torch.Tensor | np.ndarray, num_classes: int, temperature: float = 0.07):
        self.labels = torch.as_tensor(labels, dtype=torch.int64)
        self.num_classes, self.temperature = num_classes, temperature
        if faiss.get_num_gpus() > 0:
            self._gpu_resources = faiss.StandardGpuResources()
            self.index = faiss.index_cpu_to_gpu(self._gpu_resources, 0, faiss.IndexFlatIP(train.shape[1]))
            self.index_name, self.on_gpu = "faiss IndexFlatIP (gpu)", True
        elif torch.cuda.is_available():
            self.index, self.index_name, self.on_gpu = CudaFlatIP(train.shape[1]), "exact inner product, torch float32 (gpu)", True
        else:
            self.index, self.index_name, self.on_gpu = faiss.IndexFlatIP(train.shape[1]), "faiss IndexFlatIP (cpu)", False
        self.index.add(_unit(train))  # inner product of unit vectors = cosine

    def search(self, queries: torch.Tensor, k: int, chunk: int = 1024) -> tuple[torch.Tensor, torch.Tensor]:
        """Similarities (nq, k) float32, descending, and train indices (nq, k) of the k nearest."""
        if k > self.index.ntotal:
            raise UserError(f"kNN asks for k={k} neighbours but there are only {self.index.ntotal} train images; lower knn.ks or raise knn.train_size")
        q = _unit(queries)
        sims, ids = zip(*(self.index.search(q[i : i + chunk], k) for i in range(0, len(q), chunk)))
        return torch.from_numpy(np.concatenate(sims)), torch.from_numpy(np.concatenate(ids))

    def scores(self, queries: torch.Tensor, ks: Sequence[int], chunk: int = 1024) -> dict[int, torch.Tensor]:
        """Class scores (nq, C) for every k in ``ks``, from one search at max(ks)."""
        sims, ids = self.search(queries, max(ks), chunk)
        weights = (sims / self.temperature).exp()  # (nq, kmax)
        votes = self.labels[ids]  # (nq, kmax)
        out = {}
        for k in ks:  # neighbours come sorted by similarity, so the k nearest are the first k columns
            scores = torch.zeros(len(queries), self.num_classes)
            out[k] = scores.scatter_add_(1, votes[:, :k], weights[:, :k])
        return out

    def accuracy(self, queries: torch.Tensor, labels: torch.Tensor | np.ndarray, ks: Sequence[int], chunk: int = 1024) -> dict[int, float]:
        """Top-1 (%) for every k; scores are computed one chunk of queries at a time."""
        labels = torch.as_tensor(labels, dtype=torch.int64)
        correct = dict.fromkeys(ks, 0)
        for i in range(0, len(queries), chunk):
            for k, s in self.scores(queries[i : i + chunk], ks, chunk).items():
                correct[k] += int((s.argmax(dim=1) == labels[i : i + chunk]).sum())
        return {k: 100.0 * c / len(queries) for k, c in correct.items()}


class CudaFlatIP:
    """faiss ``IndexFlatIP``'s ``add`` / ``search`` / ``ntotal`` as exact float32 products on the GPU."""

    def __init__(self, dim: int):
        self.dim, self.data = dim, torch.empty(0, dim, device="cuda")

    @property
    def ntotal(self) -> int:
        return len(self.data)

    def add(self, x: np.ndarray) -> None:
        self.data = torch.cat([self.data, torch.from_numpy(x).to("cuda")])

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        tf32 = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False  # exact float32, like faiss's flat index
        try:  # 1024 queries at a time: a (1024, ntotal) similarity block
            parts = [(part @ self.data.T).topk(k, dim=1) for part in torch.from_numpy(q).to("cuda").split(1024)]
        finally:
            torch.backends.cuda.matmul.allow_tf32 = tf32
        return torch.cat([p.values for p in parts]).cpu().numpy(), torch.cat([p.indices for p in parts]).cpu().numpy()


def _unit(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1).numpy())
