"""Weighted k-nearest-neighbour classification of frozen features (DINO, Caron et al. 2021, eval_knn).

Features are l2-normalized; each query's k nearest train features by cosine similarity s vote for their
labels with weight exp(s / T), T = 0.07; the class with the largest sum wins. One exact inner-product
search (``ssl_bench.knn``: faiss ``IndexFlatIP``, or its equal on a GPU) at the largest k serves every k, and
queries are searched in chunks so memory stays bounded. Reported for the cls token and for the mean of
the patch tokens; (feature, k) is chosen on the held-out part of the train split.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from evals.features import Features
from evals.selection import edge_warnings
from evals.registry import register_protocol
from ssl_bench.errors import UserError
from ssl_bench.knn import KNNClassifier

FEATURE_TYPES = ("cls", "mean")
MODES = ("official", "fast")


def knn_protocol(train, heldout, test, num_classes: int, ks: Sequence[int], temperature: float, chunk: int, feature_types=FEATURE_TYPES) -> dict:
    """Train features as memory; (feature, k) chosen on held-out; test top-1 of the choice."""
    ks = sorted(int(k) for k in ks)
    grid, index = [], None
    for feature in feature_types:
        clf = KNNClassifier(train.tensor(feature), train.labels, num_classes, temperature)
        index = clf.index_name
        held = clf.accuracy(heldout.tensor(feature), heldout.labels, ks, chunk)
        tested = clf.accuracy(test.tensor(feature), test.labels, ks, chunk)
        grid += [{"feature": feature, "k": k, "heldout_top1": held[k], "test_top1": tested[k]} for k in ks]
    best = max(grid, key=lambda row: row["heldout_top1"])  # first (cls, smallest k) on ties
    selected = {"feature": best["feature"], "k": best["k"]}
    return {
        "top1": best["test_top1"],
        "selected": selected,
        "warnings": edge_warnings(selected, {"k": ks}, limits={"k": (1, None)}),
        "details": {
            "grid": grid, "temperature": temperature, "index": index,
            "n_train": len(train), "n_heldout": len(heldout), "n_test": len(test),
        },
    }


def knn_official(memory, test, num_classes: int, k: int, ks: Sequence[int], temperature: float, chunk: int) -> dict:
    """DINO's figure: cls token, ``k`` neighbours in ``memory``; every (feature, k in ``ks``) beside it."""
    ks = sorted({int(k), *(int(x) for x in ks)})
    extra, index = [], None
    for feature in FEATURE_TYPES:
        clf = KNNClassifier(memory.tensor(feature), memory.labels, num_classes, temperature)
        index = clf.index_name
        tested = clf.accuracy(test.tensor(feature), test.labels, ks, chunk)
        extra += [{"feature": feature, "k": x, "test_top1": tested[x]} for x in ks]
    official = next(row for row in extra if row["feature"] == "cls" and row["k"] == int(k))
    return {
        "top1": official["test_top1"],
        "selected": {"feature": "cls", "k": int(k)},  # fixed by the protocol, not chosen
        "warnings": [],
        "details": {
            "extra": extra, "temperature": temperature, "index": index,
            "n_train": len(memory), "n_test": len(test),
        },
    }


def concat(*parts: Features) -> Features:
    """One ``Features`` holding the cls / mean features and labels of several splits, in order."""
    return Features(
        np.concatenate([p.labels for p in parts]),
        {k: np.concatenate([np.asarray(p.arrays[k]) for p in parts]) for k in FEATURE_TYPES},
    )


def feature_kinds(p: dict) -> dict[str, tuple[str, ...]]:
    if p["mode"] not in MODES:
        raise UserError(f"knn.mode={p['mode']!r}; choose from {', '.join(MODES)}")
    return dict.fromkeys(("train", "heldout", "test"), FEATURE_TYPES)


@register_protocol("knn", feature_kinds=feature_kinds, description="weighted kNN on frozen features (DINO)")
def evaluate(ctx) -> dict:
    p = ctx.params
    feature_kinds(p)  # validates the mode
    train, heldout, test = (ctx.features(split, FEATURE_TYPES) for split in ("train", "heldout", "test"))
    if p["mode"] == "official":  # the memory is the whole labelled train split: nothing is held out
        return knn_official(concat(train, heldout), test, ctx.num_classes, p["k"], p["ks"], p["temperature"], p["query_chunk"])
    return knn_protocol(train, heldout, test, ctx.num_classes, p["ks"], p["temperature"], p["query_chunk"])
