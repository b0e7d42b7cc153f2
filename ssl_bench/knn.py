"""Weighted k-nearest-neighbour classification (DINO's vote) over a faiss index: the classifier the
evaluation harness (evals.knn) and the pretraining monitor (ssl_bench.monitor) share.

Features are l2-normalized; each query's k nearest train features by cosine similarity s vote for their
labels with weight exp(s / T); one exact inner-product search at the largest k serves every k. The search
runs in faiss (on the GPU when faiss has GPU support); where faiss is CPU-only but torch sees a CUDA GPU,
the same exact search runs in torch on that GPU (``TorchFlatIP``; no faiss-gpu wheel exists for every CUDA).
"""
from __future__ import annotations

import contextlib
import math
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
            self.index, self.on_gpu = TorchFlatIP(train.shape[1]), True
            self.index_name = "exact inner product, torch float16 screen + float32 (gpu)"
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


QUERY_BLOCK = 1024  # queries per product: a (1024, ntotal) similarity block


def screen_error(dim: int) -> float:
    """A bound on |float16 product - exact product| for two unit vectors q, x of ``dim`` elements.

    * Each element rounded to float16: relative error u = 2^-11, plus at most a = 2^-25 below float16's normal
      range. Per element |q'x' - qx| <= (2u + u^2)|qx| + a(1 + u)(|q| + |x|) + a^2; summed, with sum |qx| <= 1 and
      |q|_1, |x|_1 <= sqrt(dim) for unit vectors: (2u + u^2) + 2a(1 + u) sqrt(dim) + dim a^2.
    * The sum in float32: at most dim 2^-22 of the sum of |products| (2^-22 rather than float32's 2^-24 leaves
      room for tensor cores' truncating adders).
    * The result rounded to float16: at most 2^-11 for |s| < 2."""
    u, a = 2.0**-11, 2.0**-25
    products = 2 * u + u * u + 2 * a * (1 + u) * math.sqrt(dim) + dim * a * a
    return products + dim * 2.0**-22 * (1 + products) + u


class TorchFlatIP:
    """faiss ``IndexFlatIP``'s ``add`` / ``search`` / ``ntotal`` on a torch device, exact: each block of queries
    is screened by float16 products (half the memory traffic of float32 and tensor-core speed), the ``k +
    extra`` best by that screen are scored again as float32 products, and a query whose screen could have
    missed one of its k nearest (``screen_error``) is searched again in float32 over every reference. Inputs
    are unit vectors (``_unit``)."""

    def __init__(self, dim: int, device="cuda", extra: int = 64):
        self.dim, self.device, self.extra = dim, torch.device(device), extra
        self.data = torch.empty(0, dim, device=self.device)  # (n, D) float32: the exact scores
        self.screen = torch.empty(0, dim, dtype=torch.float16, device=self.device)  # (n, D) float16: the screen
        self.margin = 2 * screen_error(dim)  # screen within margin of the k-th best: possibly among the k nearest
        self.searched_again = 0  # queries the screen could not settle, searched in float32 over every reference

    @property
    def ntotal(self) -> int:
        return len(self.data)

    def add(self, x: np.ndarray) -> None:
        x = torch.from_numpy(x).to(self.device)
        self.data, self.screen = torch.cat([self.data, x]), torch.cat([self.screen, x.half()])

    def search(self, q: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        with _float32_products():
            parts = [self._search_block(part, k) for part in torch.from_numpy(q).to(self.device).split(QUERY_BLOCK)]
        return torch.cat([s for s, _ in parts]).cpu().numpy(), torch.cat([i for _, i in parts]).cpu().numpy()

    def _search_block(self, q: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        m = min(self.ntotal, k + self.extra)  # candidates a query keeps
        screened, candidates = (q.half() @ self.screen.T).topk(m, dim=1)  # (b, m), descending
        exact = torch.bmm(self.data[candidates], q.unsqueeze(2)).squeeze(2)  # (b, m) float32 products
        sims, best = exact.topk(k, dim=1)
        ids = candidates.gather(1, best)
        if m == self.ntotal:  # every reference was a candidate
            return sims, ids
        # a true k-nearest x has screen(x) >= true(x) - e >= (k-th true) - e >= (k-th screened) - 2e; a query is
        # settled if its m-th candidate is below that, so no reference left out can be among its k nearest
        unsettled = (screened[:, -1].float() >= screened[:, k - 1].float() - self.margin).nonzero().squeeze(1)
        self.searched_again += len(unsettled)  # (dense near-ties at the k-th place)
        if len(unsettled):
            sims[unsettled], ids[unsettled] = (q[unsettled] @ self.data.T).topk(k, dim=1)
        return sims, ids


@contextlib.contextmanager
def _float32_products():
    """Matrix products as faiss's flat index computes them: float32 without TF32, and float16 products summed in
    float32 (no reduced-precision reductions), which ``screen_error`` assumes."""
    matmul = torch.backends.cuda.matmul
    before = matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction
    matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction = False, False
    try:
        yield
    finally:
        matmul.allow_tf32, matmul.allow_fp16_reduced_precision_reduction = before


def _unit(x: torch.Tensor) -> np.ndarray:
    return np.ascontiguousarray(F.normalize(torch.as_tensor(x, dtype=torch.float32), dim=1).numpy())
