"""Shared test helpers: tiny configs on real Fashion-MNIST (installed by the setup command)."""
from __future__ import annotations

import pytest
import torch

from ssl_bench.config import resolve_config
from ssl_bench.data.datasets import load_dataset
from ssl_bench.registry import get_method

torch.set_num_threads(2)


TINY_VIT = ["model.embed_dim=32", "model.depth=1", "model.num_heads=2"]  # a 1-block, 32-wide ViT

# The device parameter of a test that needs a CUDA GPU (parametrize("device", ["cpu", ON_CUDA])): skipped
# without one, and what `scripts/gpu-check.sh --only tests` selects (pytest -m cuda) on a machine that has one.
ON_CUDA = pytest.param("cuda", marks=[pytest.mark.cuda, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")])


def smoke_config(method: str, *overrides: str) -> dict:
    """The smoke preset of ``method``, quiet, with ``overrides`` applied."""
    return resolve_config(get_method(method), "smoke", ["train.progress=false", *overrides])


@pytest.fixture(scope="session")
def mae_run(tmp_path_factory):
    """A finished 2-step MAE run of the tiny ViT: what `ssl-bench pretrain` leaves. Shared by the session,
    so tests only read it; a test that writes into a run copies it first."""
    from ssl_bench.trainer import pretrain

    out = tmp_path_factory.mktemp("runs") / "mae"
    pretrain(smoke_config("mae", *TINY_VIT, "train.max_steps=2"), out)
    return out


@pytest.fixture(scope="session")
def fashion_info():
    return load_dataset("fashion_mnist", None, "pretrain")[1]


@pytest.fixture
def dynamo_tracing_only(monkeypatch):
    """torch.compile as Dynamo's tracing alone (backend "eager"): graph capture, recompiles and graph breaks are
    checked at no compiler cost, and the compiled code computes exactly what the eager code does. Dynamo's
    caches and counters are cleared before and after."""
    import functools

    import torch._dynamo

    torch._dynamo.reset()
    monkeypatch.setattr(torch, "compile", functools.partial(torch.compile, backend="eager"))
    yield
    torch._dynamo.reset()
