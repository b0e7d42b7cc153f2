"""The random_init control: a finished 0-step run whose encoder is exactly the initialization the other
methods start from (same seed, same architecture), evaluable like any run, and it refuses to train."""
import pytest
import torch

from ssl_bench.build import build_method
from ssl_bench.checkpoint import load_encoder
from ssl_bench.config import resolve_config
from ssl_bench.data.datasets import load_dataset
from ssl_bench.errors import UserError
from ssl_bench.registry import get_method
from ssl_bench.runtime import seed_everything
from ssl_bench.trainer import pretrain

SMOKE = ["train.progress=false"]


def _run(tmp_path, name, *overrides):
    cfg = resolve_config(get_method("random_init"), "smoke", [*SMOKE, *overrides])
    record = pretrain(cfg, tmp_path / name)
    return record, load_encoder(tmp_path / name)[0]


def test_encoder_is_the_initialization_every_method_starts_from(tmp_path):
    record, encoder = _run(tmp_path, "ri-s0")
    assert record["status"] == "finished" and record["steps"] == 0 and record["family"] == "control"
    # MAE built the way the trainer builds it (seed first, then data, then the method) starts from these weights
    mae_cfg = resolve_config(get_method("mae"), "smoke", SMOKE)
    seed_everything(mae_cfg["seed"])
    _, info = load_dataset(mae_cfg["data"]["name"], None, "pretrain")
    mae_start = build_method(mae_cfg, info).encoder.state_dict()
    assert all(torch.equal(v, mae_start[k]) for k, v in encoder.state_dict().items())
    _, other_seed = _run(tmp_path, "ri-s1", "seed=1")
    assert not torch.equal(other_seed.blocks[0].attn.qkv.weight, encoder.blocks[0].attn.qkv.weight)


def test_never_trains_whatever_the_overrides_and_is_left_out_of_throughput(tmp_path):
    record, encoder = _run(tmp_path, "ri-steps", "train.max_steps=3")  # e.g. a sweep's overrides for every method
    _, reference = _run(tmp_path, "ri-ref")
    assert record["steps"] == 0 and record["config"]["train"]["max_steps"] == 0
    assert torch.equal(encoder.blocks[0].attn.qkv.weight, reference.blocks[0].attn.qkv.weight)
    method = build_method(record["config"], load_dataset("fashion_mnist", None, "pretrain")[1])
    with pytest.raises(UserError, match="no training step"):
        method.training_step({})
    assert get_method("random_init").pretrains is False and get_method("mae").pretrains is True
