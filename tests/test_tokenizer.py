"""The discrete tokenizer: one token per ViT patch, learnt without labels, saved and loaded exactly."""
import re

import pytest
import torch

from ssl_bench import tokenizer as tk
from ssl_bench.backbone import ViTBackbone
from ssl_bench_app.cli import main
from ssl_bench.errors import UserError
from ssl_bench.records import read_json
from ssl_bench import tokenizer_training as tt
from ssl_bench.tokenizer import EMAQuantizer, Tokenizer, check_compatible, load_tokenizer, save_tokenizer
from ssl_bench.tokenizer_training import ensure_tokenizer, train_tokenizer
from tests.conftest import smoke_config

FAST = ["train.progress=false", "train.holdout=200"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A smoke tokenizer (64 codes, 7x7-pixel patches) trained briefly on real Fashion-MNIST."""
    out = tmp_path_factory.mktemp("tok")
    record = train_tokenizer("fashion_mnist", None, out, "smoke", [*FAST, "train.steps=60"])
    return out, record


def test_one_token_per_patch_in_row_major_order():
    torch.manual_seed(0)
    tok = Tokenizer(img_size=28, patch_size=4, in_chans=1, vocab_size=32, hidden_dim=16, code_dim=8, num_res_blocks=1)
    x = torch.randn(3, 1, 28, 28)
    tokens = tok.tokenize(x)
    assert tokens.shape == (3, 49) and tokens.dtype == torch.long
    assert int(tokens.min()) >= 0 and int(tokens.max()) < 32
    # Change the pixels of patch (row 0, col 5) only: the code vector at index 0*7+5 moves, and, with one
    # 3x3 residual block, nothing outside its 3x3 neighbourhood of patches does.
    y = x.clone()
    y[:, :, 0:4, 20:24] += 3.0
    moved = (tok.encode(x) - tok.encode(y)).abs().amax(dim=(0, 2)).reshape(7, 7) > 0
    assert moved[0, 5]
    neighbourhood = torch.zeros(7, 7, dtype=torch.bool)
    neighbourhood[0:2, 4:7] = True
    assert not moved[~neighbourhood].any()


def test_decode_gives_images_of_the_input_shape():
    tok = Tokenizer(img_size=28, patch_size=7, in_chans=1, vocab_size=16, hidden_dim=16, code_dim=8, num_res_blocks=1)
    assert tok.decode(torch.randint(0, 16, (2, 16))).shape == (2, 1, 28, 28)
    with pytest.raises(UserError, match="shape"):
        tok.tokenize(torch.randn(2, 1, 32, 32))


def test_dead_codes_are_restarted_on_encoder_outputs():
    torch.manual_seed(0)
    q = EMAQuantizer(vocab_size=8, code_dim=4, decay=0.9, restart_threshold=1.0)
    z = torch.nn.functional.normalize(torch.randn(64, 4) + torch.tensor([4.0, 0, 0, 0]), dim=1)  # all near +e1
    q.update(z, q.nearest(z))  # first call: codebook initialized from z
    q.codebook[3] = q.ema_sum[3] = torch.tensor([-1.0, 0, 0, 0])  # move code 3 out of reach ...
    q.ema_count[3] = 0.5  # ... and mark it rarely used
    assert (q.nearest(z) != 3).all()
    assert q.update(z, q.nearest(z)) >= 1
    # code 3 now sits on one of the batch's vectors
    assert torch.isclose(q.codebook[3] @ z.t(), torch.tensor(1.0), atol=1e-5).any()


def test_training_lowers_reconstruction_error_and_uses_many_codes(trained):
    out, record = trained
    assert record["recon_mse"] < 0.5 * record["recon_mse_untrained"], record
    assert record["recon_mse"] < 0.5 * record["pixel_variance"], record
    assert record["codes_used"] >= 16 and record["perplexity"] > 8, record  # of 64 codes, on held-out images
    on_disk = read_json(out / tk.RECORD_FILE)
    assert on_disk["recon_mse"] == pytest.approx(record["recon_mse"]) and on_disk["config"]["model"]["patch_size"] == 7
    assert on_disk["hardware"]["summary"] and on_disk["wall_time_s"] > 0


def test_save_load_round_trip_gives_identical_tokens(trained, tmp_path, fashion_info):
    out, _ = trained
    tok = load_tokenizer(out)  # the directory or the file both work
    assert not tok.training and not any(p.requires_grad for p in tok.parameters())
    x = torch.randn(4, 1, 28, 28)
    save_tokenizer(tok, tmp_path / "copy.pt")
    again = load_tokenizer(tmp_path / "copy.pt")
    assert torch.equal(tok.tokenize(x), again.tokenize(x))
    assert torch.equal(load_tokenizer(out / tk.TOKENIZER_FILE).tokenize(x), tok.tokenize(x))
    assert (tok.data, tok.mean, tok.std) == ("fashion_mnist", fashion_info.mean, fashion_info.std)


def test_missing_or_corrupt_tokenizer_is_one_clear_line(tmp_path):
    (tmp_path / "garbage.pt").write_bytes(b"not a tokenizer at all")
    torch.save({"some": "dict"}, tmp_path / "foreign.pt")
    for path in (tmp_path / "missing", tmp_path / "garbage.pt", tmp_path / "foreign.pt", tmp_path):
        with pytest.raises(UserError) as err:
            load_tokenizer(path)
        msg = str(err.value)
        assert "\n" not in msg and "ssl-bench tokenizer train --data D --out DIR" in msg and str(path.name) in msg
        assert "delete it" not in msg or path.name == "garbage.pt"  # a readable file of another kind is not to be deleted


def test_grid_mismatch_is_a_user_error(trained):
    tok = load_tokenizer(trained[0])  # 28 px, patch 7
    check_compatible(tok, ViTBackbone("vit_tiny", img_size=28, patch_size=7, in_chans=1, embed_dim=32, depth=1, num_heads=2))
    with pytest.raises(UserError, match="model.patch_size=4"):
        check_compatible(tok, ViTBackbone("vit_tiny", img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2))


def test_ensure_tokenizer_validates_paths_and_trains_auto_once(trained, tmp_path, monkeypatch):
    cfg = smoke_config("beit", f"method.tokenizer={trained[0]}")
    assert ensure_tokenizer(cfg, tmp_path / "run") == str((trained[0] / tk.TOKENIZER_FILE).resolve())
    with pytest.raises(UserError, match="patch size 7 vs model.patch_size=4"):
        ensure_tokenizer(smoke_config("beit", f"method.tokenizer={trained[0]}", "model.patch_size=4"), tmp_path / "run")

    # auto: trained for this run (its patch grid, its image subset), then reused on resume
    monkeypatch.setitem(tt.TOKENIZER_PRESETS["smoke"], "train", {**tt.TOKENIZER_PRESETS["smoke"]["train"], "steps": 3, "holdout": 50})
    calls = []
    real_train = tt.train_tokenizer
    monkeypatch.setattr(tt, "train_tokenizer", lambda *a, **k: calls.append(a) or real_train(*a, **k))
    cfg = smoke_config("beit", "model.patch_size=4", "data.subset=200", "train.progress=false")
    first = ensure_tokenizer(cfg, tmp_path / "run")
    again = ensure_tokenizer(cfg, tmp_path / "run")
    assert first == again == str((tmp_path / "run" / "tokenizer" / tk.TOKENIZER_FILE).resolve()) and len(calls) == 1
    record = read_json(tmp_path / "run" / "tokenizer" / tk.RECORD_FILE)
    assert record["config"]["data"]["subset"] == 200 and load_tokenizer(first).patch_size == 4
    # the untrained stand-in scripts/count_flops.py counts with is that network: the same config, so the same FLOPs
    assert tt.untrained_auto_tokenizer(cfg).config() == load_tokenizer(first).config()
    assert tt.untrained_auto_tokenizer(smoke_config("beit", "model.patch_size=7")).config() != load_tokenizer(first).config()


def test_cli_trains_and_rejects_bad_keys(tmp_path, capsys):
    assert main(["tokenizer", "train", "--out", str(tmp_path / "t"), "--preset", "smoke", *FAST, "train.steps=2"]) == 0
    printed = capsys.readouterr().out
    assert "reconstruction MSE" in printed and "of codes used" in printed and (tmp_path / "t" / tk.TOKENIZER_FILE).exists()
    assert main(["tokenizer", "train", "--out", str(tmp_path / "u"), "--preset", "smoke", "tokenizer.vocab=3"]) == 2
    err = capsys.readouterr().err
    assert "unknown config key 'tokenizer.vocab'" in err and "vocab_size" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "u").exists()


@pytest.mark.parametrize("override, allowed", [
    ("tokenizer.vocab_size=0", "an integer >= 2"), ("train.batch_size=0", "an integer >= 1"), ("data.subset=0", "an integer >= 1"),
    ("train.holdout=0", "an integer >= 1"), ("train.steps=0", "an integer >= 1"), ("train.steps=1e9", "an integer >= 1"),
    ("seed=99999999999999999999", "an integer in [0, 2147483647]"), ("tokenizer.ema_decay=1", "a number in [0, 1)"),
])
def test_tokenizer_values_out_of_range_are_one_line_before_training(override, allowed):
    key = override.split("=")[0]
    with pytest.raises(UserError, match=re.escape(f"config key '{key}' takes {allowed}")):
        tt.tokenizer_config("smoke", [override])


def test_an_unusable_out_is_one_line_before_training(tmp_path, capsys):
    (tmp_path / "file").write_text("x")
    assert main(["tokenizer", "train", "--out", str(tmp_path / "file" / "t"), "--preset", "smoke", "train.steps=100000"]) == 2
    assert "is a file; pass --out a folder you can write to" in capsys.readouterr().err


def test_tokenizer_takes_the_trainers_progress_modes(tmp_path, capsys):
    """A BEiT / CAE run passes its train.progress on: lines (a log) and off are taken, a typo is one line."""
    assert tt.tokenizer_config("smoke", ["train.progress=off"])["train"]["progress"] == "off"
    train_tokenizer("fashion_mnist", None, tmp_path, "smoke", ["train.progress=lines", "train.holdout=50", "train.steps=3"])
    assert "tokenizer step 3/3 (100%)" in capsys.readouterr().err  # the closing progress line, as a log shows it
    with pytest.raises(UserError, match="'train.progress' takes one of true, false, auto, bar, lines, off, got 'maybe'"):
        tt.tokenizer_config("smoke", ["train.progress=maybe"])
