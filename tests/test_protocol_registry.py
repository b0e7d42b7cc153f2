"""The one protocol list (evals.registry): built-ins register themselves, a registered protocol gets a preset
section and overrides, runs through `evaluate`, and sorts after the built-ins on the leaderboard."""
import json

import numpy as np
import pytest

import evals.registry as registry
from evals.leaderboard import collect
from evals.presets import resolve_eval_config
from evals.registry import get_protocol, protocol_names, register_protocol
from evals.run import evaluate, parse_protocols
from ssl_bench.errors import UserError
from ssl_bench.trainer import pretrain
from tests.conftest import smoke_config


@pytest.fixture
def clean_registry(monkeypatch):
    monkeypatch.setattr(registry, "_PROTOCOLS", dict(registry._PROTOCOLS))
    monkeypatch.setattr(registry, "_loaded", set(registry._loaded))


def test_builtins_register_themselves_in_display_order():
    import evals.attentive
    import evals.knn

    assert protocol_names()[:4] == ["knn", "linear", "attentive", "finetune"]
    assert get_protocol("knn").evaluate is evals.knn.evaluate
    from evals.registry import kinds_per_split

    official = kinds_per_split(get_protocol("attentive"), {"mode": "official"})
    assert official == {"heldout": ("cls", "patches"), "test": ("cls", "patches")}  # training images are encoded anew
    assert kinds_per_split(get_protocol("attentive"), {"mode": "fast"})["train"] == ("cls", "patches")
    assert get_protocol("linear").presets is None  # its section lives in evals.presets
    with pytest.raises(UserError, match="unknown protocol 'svm'; choose from knn, linear, attentive, finetune"):
        parse_protocols("knn,svm")


def test_a_registered_protocol_is_listed_configured_evaluated_and_ranked(clean_registry, tmp_path):
    seen = {}

    @register_protocol("chance", presets={"smoke": {"train_size": 60, "vote": 1}}, feature_kinds=("cls",))
    def chance(ctx):
        """Predict the most frequent training label."""
        seen["params"] = dict(ctx.params)
        train, test = ctx.features("train", ("cls",)), ctx.features("test", ("cls",))
        top = np.bincount(train.labels).argmax()
        return {"top1": 100.0 * float((test.labels == top).mean()), "selected": {}, "details": {"n": len(train.labels)}}

    assert protocol_names()[-1] == "chance"
    cfg = resolve_eval_config("smoke", ["chance.vote=2"])
    assert cfg["chance"] == {"train_size": 60, "heldout_size": 250, "test_size": 500, "vote": 2}
    with pytest.raises(UserError, match="chance.nope"):
        resolve_eval_config("smoke", ["chance.nope=1"])

    run = tmp_path / "results" / "mae-s0"
    pretrain(smoke_config("mae", "model.embed_dim=32", "model.depth=1", "model.num_heads=2", "train.max_steps=1"), run)
    knn_small = ["knn.ks=(5,)", "knn.train_size=100", "knn.heldout_size=50", "knn.test_size=100", "chance.test_size=100"]
    paths = evaluate(run, "chance,knn", preset="smoke", overrides=knn_small)
    record = json.loads(paths[0].read_text())
    assert record["protocol"] == "chance" and record["config"]["chance"]["vote"] == 1
    assert seen["params"]["train_size"] == 60 and record["details"] == {"n": 60}
    assert collect(tmp_path / "results").columns == ["knn (official)", "chance"]  # built-ins first; a plug-in without modes has no mode label


def test_a_declared_protocol_that_registers_nothing_is_one_clear_line(clean_registry, monkeypatch):
    class EntryPoint:
        name = "ghost"

        def load(self):
            return None

    monkeypatch.setattr(registry, "_plugin_entry_points", lambda: {"ghost": EntryPoint()})
    assert "ghost" in protocol_names()
    with pytest.raises(UserError, match=r"@register_protocol\('ghost'\)"):
        get_protocol("ghost")
