"""DALL-E's released encoder as a tokenizer (ssl_bench.dalle). OpenAI's weights are not here, so a stand-in
module with the same calling convention (pickled whole, RGB in [0.1, 0.9] at 8 pixels per token, logits
(B, vocab, g, g), a ``vocab_size`` attribute) checks the plumbing around it."""
import json
import sys
import types

import pytest
import torch
from torch import nn

from ssl_bench import dalle
from ssl_bench.config import resolve_config
from ssl_bench.errors import UserError
from ssl_bench.registry import get_method
from ssl_bench.tokenizer import load_tokenizer
from ssl_bench.trainer import pretrain


class StandInEncoder(nn.Module):
    """8x8 stride-8 conv to ``vocab_size`` logits; remembers its last input."""

    def __init__(self, vocab_size=512):
        super().__init__()
        self.vocab_size = vocab_size
        self.conv = nn.Conv2d(3, vocab_size, 8, stride=8)
        self.last_input = None

    def forward(self, x):
        assert x.dtype == torch.float32 and x.shape[1] == 3
        self.last_input = x
        return self.conv(x)


def test_tokens_follow_dalles_input_convention():
    torch.manual_seed(0)
    encoder = StandInEncoder()
    mean, std = (0.3,), (0.5,)
    tok = dalle.DalleTokenizer(encoder, img_size=28, patch_size=7, in_chans=1, mean=mean, std=std)
    pixels = torch.tensor([0.0, 0.5, 1.0]).view(3, 1, 1, 1).expand(3, 1, 28, 28)  # three flat images
    tokens = tok.tokenize((pixels - mean[0]) / std[0])
    seen = encoder.last_input
    assert tokens.shape == (3, 16) and tokens.dtype == torch.long  # one token per 7x7 patch
    assert seen.shape == (3, 3, 32, 32)  # grid 4 x 8 pixels per token, grayscale copied to RGB
    torch.testing.assert_close(seen.mean(dim=(1, 2, 3)), torch.tensor([0.1, 0.5, 0.9]))  # (1 - 2 eps) x + eps
    torch.testing.assert_close(tokens, encoder.conv(seen).argmax(dim=1).flatten(1))
    with pytest.raises(UserError, match="set up for images"):
        tok.tokenize(torch.zeros(1, 1, 32, 32))


def test_beit_pretrains_on_a_dalle_encoder_file(tmp_path):
    torch.manual_seed(0)
    torch.save(StandInEncoder(vocab_size=600), tmp_path / "encoder.pkl")
    cfg = resolve_config(get_method("beit"), "smoke",
                         ["train.max_steps=2", "train.progress=false", f"method.tokenizer=dalle:{tmp_path / 'encoder.pkl'}"])
    out = tmp_path / "run"
    pretrain(cfg, out)
    record = json.loads((out / "run.json").read_text())
    assert record["status"] == "finished"
    sidecar = out / "tokenizer" / "dalle.json"
    assert record["config"]["method"]["tokenizer"] == f"dalle:{sidecar.resolve()}"  # the explicit prefix is kept
    assert record["requested_config"]["method"]["tokenizer"] == f"dalle:{tmp_path / 'encoder.pkl'}"  # as asked, before prepare()
    tok = load_tokenizer(f"dalle:{sidecar}")
    assert isinstance(tok, dalle.DalleTokenizer) and tok.vocab_size == 600 and tok.num_patches == 16
    assert json.loads(sidecar.read_text())["mean"] == [pytest.approx(0.286, abs=1e-3)]  # Fashion-MNIST's normalization
    # the pickled encoder loads only through the explicit dalle: prefix, and only the file the run started with
    with pytest.raises(UserError, match="unpickling runs code: it loads only when asked explicitly"):
        load_tokenizer(sidecar)
    torch.save(StandInEncoder(vocab_size=600), tmp_path / "encoder.pkl")  # other weights under the same name
    with pytest.raises(UserError, match="has changed since this run started"):
        load_tokenizer(f"dalle:{sidecar}")


def test_bad_dalle_files_are_one_line_errors(tmp_path):
    with pytest.raises(UserError, match="no DALL-E encoder at"):
        dalle.load_encoder_file(tmp_path / "missing.pkl")
    torch.save(StandInEncoder().state_dict(), tmp_path / "state.pkl")
    with pytest.raises(UserError, match="not the pickled DALL-E encoder module"):
        dalle.load_encoder_file(tmp_path / "state.pkl")
    # a pickle of a class from a package this machine lacks (as OpenAI's file is without `dall_e`)
    package = types.ModuleType("absent_dalle_package")
    exec("import torch\nclass Encoder(torch.nn.Module):\n    pass\n", package.__dict__)
    package.Encoder.__module__ = "absent_dalle_package"
    sys.modules["absent_dalle_package"] = package
    try:
        torch.save(package.Encoder(), tmp_path / "foreign.pkl")
    finally:
        del sys.modules["absent_dalle_package"]
    with pytest.raises(UserError, match="pip install DALL-E"):
        dalle.load_encoder_file(tmp_path / "foreign.pkl")


def test_a_pickle_named_only_by_a_file_is_never_unpickled(tmp_path, capsys):
    """A run folder or config file from elsewhere cannot make pretrain unpickle: a dalle: tokenizer that this
    command line does not name (a resumed run's sidecar, a --config file's value) is refused in one line
    before anything loads, and --trust-pickle naming that very file allows it."""
    from ssl_bench_app.cli import main

    loaded = tmp_path / "LOADED"

    class Marker:  # unpickling it writes a file: the stand-in for code a pickle runs
        def __reduce__(self):
            return (open, (str(loaded), "w"))

    torch.save(Marker(), tmp_path / "encoder.pkl")
    sidecar = tmp_path / "dalle.json"
    sidecar.write_text(json.dumps({"format": dalle.SIDECAR_FORMAT, "encoder": str(tmp_path / "encoder.pkl"), "img_size": 28,
                                   "patch_size": 7, "in_chans": 1, "mean": [0.5], "std": [0.5], "data": "fashion_mnist"}))
    (tmp_path / "cfg.toml").write_text(f'method_name = "beit"\n[method]\ntokenizer = "dalle:{sidecar}"\n')
    common = ["pretrain", "--preset", "smoke", "--out", str(tmp_path / "run"), "train.max_steps=1", "train.progress=false"]
    assert main([*common, "--config", str(tmp_path / "cfg.toml")]) == 2
    err = capsys.readouterr().err
    assert "asks to unpickle the DALL-E encoder" in err and f"--trust-pickle {tmp_path / 'encoder.pkl'}" in err and err.count("\n") == 1
    assert main([*common, "--config", str(tmp_path / "cfg.toml"), "--trust-pickle", str(tmp_path / "other.pkl")]) == 2
    assert not loaded.exists() and not (tmp_path / "run").exists()
    # named on the command line: it is unpickled (and, not being a module, refused after)
    assert main([*common, "--config", str(tmp_path / "cfg.toml"), "--trust-pickle", str(tmp_path / "encoder.pkl")]) != 0
    assert loaded.exists()
