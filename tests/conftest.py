"""Shared test helpers: tiny configs on real Fashion-MNIST (installed by the setup command)."""
from __future__ import annotations

import pytest
import torch

from ssl_bench.config import resolve_config
from ssl_bench.data.datasets import load_dataset
from ssl_bench.registry import get_method

torch.set_num_threads(2)


def smoke_config(method: str, *overrides: str) -> dict:
    """The smoke preset of ``method``, quiet, with ``overrides`` applied."""
    return resolve_config(get_method(method), "smoke", ["train.progress=false", *overrides])


@pytest.fixture(scope="session")
def fashion_info():
    return load_dataset("fashion_mnist", None, "pretrain")[1]
