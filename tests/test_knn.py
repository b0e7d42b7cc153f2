"""kNN (DINO's weighted vote): the faiss search agrees with a brute-force torch implementation."""
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from evals.features import Features
from evals.knn import KNNClassifier, knn_protocol
from ssl_bench.errors import UserError
from tests.conftest import ON_CUDA

KS = (1, 5, 20, 100)


def brute_force_knn(train, train_labels, queries, k, temperature, num_classes):
    """DINO's eval_knn, written directly: full similarity matrix, top-k, exp(s/T)-weighted one-hot votes."""
    x, q = F.normalize(train, dim=1), F.normalize(queries, dim=1)
    sims, idx = (q @ x.T).topk(k, dim=1)  # (nq, k)
    one_hot = F.one_hot(train_labels[idx], num_classes).float()  # (nq, k, C)
    return (one_hot * (sims / temperature).exp().unsqueeze(-1)).sum(dim=1), idx  # (nq, C)


@pytest.fixture
def clusters():
    """Noisy class clusters, so neighbours are informative but not trivially all one class."""
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(5, 24, generator=g)
    train_labels = torch.randint(0, 5, (400,), generator=g)
    query_labels = torch.randint(0, 5, (73,), generator=g)
    train = centers[train_labels] + 1.5 * torch.randn(400, 24, generator=g)
    queries = centers[query_labels] + 1.5 * torch.randn(73, 24, generator=g)
    return train, train_labels, queries, query_labels


def test_knn_matches_brute_force_for_every_k_with_chunked_queries(clusters):
    train, train_labels, queries, _ = clusters
    clf = KNNClassifier(train, train_labels, num_classes=5, temperature=0.07)
    scores = clf.scores(queries, KS, chunk=16)  # 73 queries in chunks of 16: the last chunk is ragged
    _, ids = clf.search(queries, max(KS), chunk=16)
    for k in KS:
        expected, expected_ids = brute_force_knn(train, train_labels, queries, k, 0.07, 5)
        assert torch.equal(ids[:, :k], expected_ids), f"k={k}: different neighbours"
        assert torch.equal(scores[k].argmax(1), expected.argmax(1)), f"k={k}: different labels"
        # faiss and torch sum the dot products in different orders: equal to float32 rounding
        torch.testing.assert_close(scores[k], expected, rtol=1e-5, atol=0.0)
    # the votes really depend on k (else slicing one search could hide a bug)
    assert not torch.equal(scores[1].argmax(1), scores[100].argmax(1))
    # chunking changes nothing (on a GPU, products of other shapes may round differently)
    whole = clf.scores(queries, KS, chunk=10_000)
    for k in KS:
        torch.testing.assert_close(whole[k], scores[k], rtol=1e-5 if clf.on_gpu else 0.0, atol=0.0)


def test_knn_weights_neighbours_by_exp_similarity_over_temperature():
    # two train points of class 0 at similarity 0.6, one of class 1 at similarity 1.0
    train = torch.tensor([[0.6, 0.8], [0.6, -0.8], [1.0, 0.0]])
    clf = KNNClassifier(train, torch.tensor([0, 0, 1]), num_classes=2, temperature=0.1)
    scores = clf.scores(torch.tensor([[2.0, 0.0]]), [3])[3][0]
    torch.testing.assert_close(scores, torch.tensor([2 * np.exp(6.0), np.exp(10.0)], dtype=torch.float32))
    assert scores.argmax() == 1  # one close neighbour outweighs two far ones at T = 0.1


def test_knn_accuracy_counts_correct_predictions(clusters):
    train, train_labels, queries, query_labels = clusters
    clf = KNNClassifier(train, train_labels, num_classes=5)
    acc = clf.accuracy(queries, query_labels, KS, chunk=8)
    for k in KS:
        expected, _ = brute_force_knn(train, train_labels, queries, k, 0.07, 5)
        assert acc[k] == pytest.approx(100.0 * (expected.argmax(1) == query_labels).float().mean().item())
    assert acc[20] > 60  # the clusters are learnable


def test_k_larger_than_the_memory_is_a_clear_error(clusters):
    train, train_labels, queries, _ = clusters
    with pytest.raises(UserError, match="k=500"):
        KNNClassifier(train, train_labels, 5).scores(queries, [10, 500])


def _features(cls, mean, labels):
    return Features(np.asarray(labels), {"cls": cls.numpy().astype(np.float16), "mean": mean.numpy().astype(np.float16)})


def test_feature_and_k_are_chosen_on_heldout_never_on_test(clusters):
    train, train_labels, queries, query_labels = clusters
    noise = torch.randn_like(queries)
    # held-out: only the cls token carries the class; test: only the mean feature does
    heldout = _features(queries, noise, query_labels)
    test = _features(noise, queries, query_labels)
    result = knn_protocol(_features(train, train, train_labels), heldout, test, 5, (5, 20), 0.07, 32)
    assert result["selected"]["feature"] == "cls"
    row = {(r["feature"], r["k"]): r for r in result["details"]["grid"]}
    chosen = row[("cls", result["selected"]["k"])]
    assert result["top1"] == chosen["test_top1"]
    assert chosen["heldout_top1"] == max(r["heldout_top1"] for r in row.values())
    assert result["top1"] < max(r["test_top1"] for r in row.values()) - 20  # test would have picked "mean"


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_torch_search_returns_faiss_neighbours(clusters, device):
    """The torch search used where faiss has no GPU support (float16 screen, float32 scores) finds faiss's exact
    neighbours and similarities; on well-separated neighbours the screen settles every query."""
    import faiss

    from ssl_bench.knn import TorchFlatIP, _unit

    train, _, queries, _ = clusters
    reference, ours = faiss.IndexFlatIP(train.shape[1]), TorchFlatIP(train.shape[1], device)
    for index in (reference, ours):
        index.add(_unit(train[:250]))
        index.add(_unit(train[250:]))  # added in two parts, like faiss allows
    want_sims, want_ids = reference.search(_unit(queries), 20)
    sims, ids = ours.search(_unit(queries), 20)
    assert ours.ntotal == reference.ntotal == len(train)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, atol=1e-5)
    assert ours.searched_again < len(queries) // 4  # most queries settled by the screen alone


def test_torch_search_stays_exact_where_float16_cannot_rank_the_neighbours():
    """Near-ties around the k-th place: each query's 300 nearest references lie within 1e-3 of similarity 0.01,
    3.3e-6 apart, finer than the float16 screen's errors (~1e-5 there) but not its resolution, so the screen
    ranks them wrongly without tying them. It must not settle on its own ranking: the k nearest are faiss's,
    in faiss's order."""
    import faiss

    from ssl_bench.knn import TorchFlatIP, _unit

    g = torch.Generator().manual_seed(0)
    dim, k, nq, near = 64, 20, 8, 300
    rotation, _ = torch.linalg.qr(torch.randn(dim, dim, generator=g))  # dense vectors, same inner products
    queries = torch.eye(dim)[:nq]  # (nq, dim): query i is axis i, before the rotation
    noise = torch.randn(nq, near, dim, generator=g)
    noise[..., :nq] = 0  # orthogonal to every query
    spaced = torch.linspace(0.01, 0.011, near)
    target = spaced[torch.stack([torch.randperm(near, generator=g) for _ in range(nq)])].unsqueeze(2)  # (nq, near, 1)
    train = target * queries.unsqueeze(1) + (1 - target**2).sqrt() * F.normalize(noise, dim=2)  # similarity target to its query, 0 to the others
    train, queries = train.reshape(-1, dim) @ rotation, queries @ rotation
    reference, ours = faiss.IndexFlatIP(dim), TorchFlatIP(dim, "cpu", extra=4)
    for index in (reference, ours):
        index.add(_unit(train))
    want_sims, want_ids = reference.search(_unit(queries), k)
    sims, ids = ours.search(_unit(queries), k)
    np.testing.assert_array_equal(ids, want_ids)
    np.testing.assert_allclose(sims, want_sims, atol=1e-6)
    screened = (torch.from_numpy(_unit(queries)).half() @ torch.from_numpy(_unit(train)).half().T).topk(k, dim=1).indices
    assert any(set(a.tolist()) != set(b.tolist()) for a, b in zip(screened, want_ids))  # the screen alone is wrong here


def test_screen_error_bounds_the_float16_products():
    """The bound the screen relies on holds for unit vectors, with room to spare (a bound, not an estimate)."""
    from ssl_bench.knn import screen_error

    g = torch.Generator().manual_seed(0)
    for dim in (24, 768):
        q, x = (F.normalize(torch.randn(n, dim, generator=g), dim=1) for n in (64, 4096))
        x[:8] = q[:8]  # |s| = 1: the largest products
        error = ((q.half() @ x.half().T).double() - q.double() @ x.double().T).abs().max().item()
        assert 0 < error < screen_error(dim)
