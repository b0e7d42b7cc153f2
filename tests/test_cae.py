"""CAE's defining behaviour: the regressor never updates the visible latents, the decoder sees only the
regressor's predictions, the alignment target is a stop-gradient encoding of the masked patches, and the
switches of the paper's ablations (no alignment, no decoder) change exactly the loss terms they name."""
import json

import pytest
import torch
import torch.nn.functional as F

from ssl_bench.backbone import gather_tokens, normalized_pixel_targets
from ssl_bench.build import build_method
from ssl_bench.checkpoint import load_method
from ssl_bench.data.pipeline import build_pretrain_loader
from ssl_bench.errors import UserError
from ssl_bench.masking import split_by_mask
from ssl_bench.tokenizer import TOKENIZER_FILE, Tokenizer, save_tokenizer
from ssl_bench.trainer import pretrain
from methods.cae import CAE
from tests.conftest import smoke_config


def build(fashion_info, *overrides):
    """A tiny CAE (2 regressor blocks, so 'every block' means something) on pixel targets (no tokenizer
    needed; the token targets have their own test) and one real batch."""
    cfg = smoke_config("cae", "method.regressor_depth=2", "method.target=pixels", *overrides)
    torch.manual_seed(0)
    method = build_method(cfg, fashion_info)
    loader, *_ = build_pretrain_loader(cfg, method.data_spec())
    return method, next(iter(loader))


@pytest.fixture
def cae_and_batch(fashion_info):
    return build(fashion_info)


def record_calls(module, store):
    """Forward hook appending the module's output to ``store``."""
    return module.register_forward_hook(lambda m, inp, out: store.append(out))


def scramble_pixels(images, patch_mask, patch_size, grid):
    """Replace the pixels of the patches where ``patch_mask`` (B, N) is True by noise."""
    pixel_mask = patch_mask.reshape(-1, 1, grid, grid).repeat_interleave(patch_size, 2).repeat_interleave(patch_size, 3)
    return torch.where(pixel_mask, torch.randn_like(images) * 3, images)


def test_half_the_patches_are_block_masked(cae_and_batch):
    method, batch = cae_and_batch
    mask = batch["mask"]
    assert (mask.sum(1) == mask.shape[1] // 2).all()
    assert method.data_spec().mask.kind == "block"


def test_regressor_never_updates_visible_latents(cae_and_batch):
    method, batch = cae_and_batch
    mask = batch["mask"]
    ids_keep, ids_masked, _ = split_by_mask(mask)
    n_ctx = ids_keep.shape[1]  # the visible patches only: no cls token (official code and paper)
    encoder_out, block_inputs = [], []
    record_calls(method.backbone.vit.norm, encoder_out)  # first call: the visible patches
    for block in method.regressor.blocks:
        block.register_forward_pre_hook(lambda m, args: block_inputs.append([a.detach().clone() for a in args]))
    method.training_step(batch)

    z_vis = encoder_out[0].detach()[:, 1:]  # the encoder's output without its cls token
    pos = method.backbone.patch_pos_embed.expand(len(mask), -1, -1)
    assert len(block_inputs) == len(method.regressor.blocks) == 2
    for q, kv, pos_q, pos_kv in block_inputs:
        assert torch.equal(kv[:, :n_ctx], z_vis)  # keys/values of Zv are the encoder's Zv in every block
        assert torch.equal(kv[:, n_ctx:], q)  # followed by the current queries
        assert torch.equal(pos_q, gather_tokens(pos, ids_masked))
        assert torch.equal(pos_kv[:, :n_ctx], gather_tokens(pos, ids_keep)) and torch.equal(pos_kv[:, n_ctx:], pos_q)
    # the first queries are the one shared mask token at every masked position
    first_q = block_inputs[0][0]
    assert torch.equal(first_q, method.mask_token.detach().expand_as(first_q))
    # the queries do change from block to block (the regressor is doing something)
    assert not torch.allclose(block_inputs[0][0], block_inputs[1][0])


def test_decoder_sees_only_the_regressor_output(cae_and_batch, monkeypatch):
    method, batch = cae_and_batch
    images, mask = batch["views"][0], batch["mask"]
    _, ids_masked, _ = split_by_mask(mask)
    predicted, first_block_in, decoded = [], [], []
    record_calls(method.regressor, predicted)
    method.decoder.blocks[0].register_forward_pre_hook(lambda m, args: first_block_in.append(args[0].detach()))
    record_calls(method.decoder, decoded)
    method.training_step(batch)

    # G's input is exactly H's output plus the masked positions' embeddings: (B, N_mask, D), no visible latents
    pos_masked = gather_tokens(method.backbone.patch_pos_embed.expand(len(mask), -1, -1), ids_masked)
    assert torch.equal(first_block_in[0], predicted[0].detach() + pos_masked)

    # Scrambling the visible pixels changes G's output, but only through H: with H's output held fixed
    # G's output does not move.
    p, g = method.backbone.patch_size, method.backbone.grid_size
    scrambled = {**batch, "views": [scramble_pixels(images, ~mask, p, g)]}
    method.training_step(scrambled)
    assert not torch.allclose(decoded[0], decoded[1])
    fixed = predicted[0].detach()
    monkeypatch.setattr(method.regressor, "forward", lambda *args: fixed)
    method.training_step(scrambled)
    assert torch.equal(decoded[0], decoded[2])


def test_alignment_target_is_a_stop_gradient_encoding_of_the_masked_patches(cae_and_batch, monkeypatch):
    method, batch = cae_and_batch
    images, mask = batch["views"][0], batch["mask"]
    ids_keep, ids_masked, _ = split_by_mask(mask)
    # one optimizer step first: the target must use the encoder's CURRENT weights (not a copy or an EMA)
    opt = torch.optim.AdamW(method.parameters(), lr=1e-2)
    sum(method.training_step(batch).values()).backward()
    opt.step()
    opt.zero_grad()

    calls = []
    forward_visible = method.backbone.forward_visible

    def spy(imgs, ids):
        out = forward_visible(imgs, ids)
        calls.append((ids, out))
        return out

    monkeypatch.setattr(method.backbone, "forward_visible", spy)
    predicted = []
    record_calls(method.regressor, predicted)
    align = method.training_step(batch)["loss_align"]
    (vis_ids, _), (tgt_ids, target) = calls
    assert torch.equal(vis_ids, ids_keep) and torch.equal(tgt_ids, ids_masked)
    assert target.grad_fn is None and not target.requires_grad
    with torch.no_grad():
        assert torch.equal(target, forward_visible(images, ids_masked))  # the current encoder, masked patches only
    # the alignment compares H's output with the target minus its cls token
    assert method.pop_logged()["align_mse"] == pytest.approx(F.mse_loss(predicted[0], target[:, 1:]).item(), rel=1e-6)

    # A pure-alignment backward gives the encoder the same gradient as aligning to a constant copy of
    # the target: nothing flows back through the target branch.
    align.backward()
    grads = {n: p.grad.clone() for n, p in method.backbone.named_parameters() if p.grad is not None}
    assert grads  # the encoder does learn from the alignment, through the visible path
    method.zero_grad()
    constant = target.detach().clone()
    monkeypatch.setattr(method.backbone, "forward_visible", lambda imgs, ids: constant if torch.equal(ids, ids_masked) else forward_visible(imgs, ids))
    method.training_step(batch)["loss_align"].backward()
    for n, p in method.backbone.named_parameters():
        if n in grads:
            assert torch.allclose(p.grad, grads[n], atol=1e-7), n


def test_switches_change_the_loss_terms(fashion_info):
    def run(*overrides):
        method, batch = build(fashion_info, *overrides)
        encoder_calls, predicted = [], []
        record_calls(method.backbone.vit.norm, encoder_calls)
        record_calls(method.regressor, predicted)
        losses = method.training_step(batch)
        sum(losses.values()).backward()
        # every trainable parameter takes part (DDP runs without find_unused_parameters)
        unused = [n for n, p in method.named_parameters() if p.requires_grad and p.grad is None]
        assert not unused, unused
        return method, batch, losses, len(encoder_calls), predicted[0], method.pop_logged()

    with_decoder, _, losses, n_enc, _, logged = run()
    assert set(losses) == {"loss_recon", "loss_align"} and n_enc == 2 and len(with_decoder.decoder.blocks) == 1
    assert losses["loss_align"].item() == pytest.approx(2.0 * logged["align_mse"], rel=1e-6)  # lambda = 2

    for off in ("method.use_alignment=false", "method.align_weight=0"):
        _, _, losses, n_enc, _, logged = run(off)
        assert set(losses) == {"loss_recon"} and n_enc == 1 and "align_mse" not in logged  # no target pass

    # without the decoder the pixels are predicted from H's output by LN + linear head alone
    method, batch, losses, _, z_pred, _ = run("method.use_decoder=false")
    assert len(method.decoder.blocks) == 0 and set(losses) == {"loss_recon", "loss_align"}
    images, mask = batch["views"][0], batch["mask"]
    _, ids_masked, _ = split_by_mask(mask)
    target = gather_tokens(normalized_pixel_targets(images, method.backbone.patch_size), ids_masked)
    expected = F.mse_loss(method.decoder.head(method.decoder.norm(z_pred)), target)
    assert losses["loss_recon"].item() == pytest.approx(expected.item(), rel=1e-6)


def test_loss_falls_on_real_images(fashion_info, tmp_path):
    # 60 steps of a tiny CAE on 320 Fashion-MNIST images; both losses measured on the same fixed batches
    # (same images, same masks, eval mode) before and after, so batch-to-batch noise does not enter
    cfg = smoke_config("cae", "method.target=pixels", "data.subset=320", "train.epochs=6", "train.lr=2e-3", "train.log_every=1", "train.ckpt_every=1000")
    torch.manual_seed(0)
    untrained = build_method(cfg, fashion_info).eval()
    loader, *_ = build_pretrain_loader(cfg, untrained.data_spec())
    batches = [b for _, b in zip(range(3), loader)]

    @torch.no_grad()
    def losses(method):
        out = [method.training_step(b) for b in batches]
        return {k: sum(o[k].item() for o in out) / len(out) for k in out[0]}

    record = pretrain(cfg, tmp_path / "run")
    assert record["status"] == "finished"
    before, after = losses(untrained), losses(load_method(tmp_path / "run")[0])
    assert after["loss_recon"] < 0.97 * before["loss_recon"], (before, after)  # masked pixels predicted better
    assert after["loss_align"] < 0.5 * before["loss_align"], (before, after)  # H's output moves into F's space
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert rows and all(r["loss_align"] == pytest.approx(2.0 * r["align_mse"], rel=1e-5) for r in rows)


def test_bad_options_are_one_clear_line(fashion_info):
    with pytest.raises(UserError, match="method.target"):
        build_method(smoke_config("cae", "method.target=rgb"), fashion_info)
    with pytest.raises(UserError, match="use_decoder=false"):
        build_method(smoke_config("cae", "method.decoder_depth=0"), fashion_info)
    with pytest.raises(UserError, match="CAE.prepare"):  # "auto" is resolved by the trainer, not here
        build_method(smoke_config("cae", "method.target=tokens"), fashion_info)


@pytest.fixture(scope="module")
def tokenizer_path(tmp_path_factory):
    """A valid, untrained tokenizer file (64 codes, one per 7x7 patch of 28x28 Fashion-MNIST): what is
    tested here is which codes CAE predicts; training tokenizers is test_tokenizer's business."""
    torch.manual_seed(0)
    tokenizer = Tokenizer(img_size=28, patch_size=7, in_chans=1, vocab_size=64, hidden_dim=16, code_dim=8, num_res_blocks=1, data="fashion_mnist")
    return save_tokenizer(tokenizer, tmp_path_factory.mktemp("tok") / TOKENIZER_FILE)


def test_token_targets_are_the_tokenizer_codes_of_masked_patches(tokenizer_path, fashion_info, monkeypatch, tmp_path):
    cfg = smoke_config("cae", "method.target=tokens", f"method.tokenizer={tokenizer_path}")
    assert CAE.prepare(cfg, tmp_path)["method"]["tokenizer"] == str(tokenizer_path.resolve())
    pixels = smoke_config("cae", "method.target=pixels")
    assert CAE.prepare(pixels, tmp_path) == pixels  # pixels: no tokenizer trained
    method, batch = build(fashion_info, "method.target=tokens", f"method.tokenizer={tokenizer_path}")
    mask = batch["mask"]
    assert method.decoder.head.out_features == method.tokenizer.vocab_size
    decoded = []
    record_calls(method.decoder, decoded)
    clean = method.training_step(batch)["loss_recon"]
    # cross-entropy of each masked patch's logits against that patch's code (ids ascending, as in mask order)
    codes = method.tokenizer.tokenize(batch["views"][0])[mask].reshape(len(mask), -1)  # (B, N_mask)
    assert clean.item() == pytest.approx(F.cross_entropy(decoded[0].flatten(0, 1), codes.flatten()).item(), rel=1e-6)
    tokenize = method.tokenizer.tokenize

    def shifted(where):  # change the codes at some positions
        return lambda images: torch.where(where, (tokenize(images) + 1) % method.tokenizer.vocab_size, tokenize(images))

    monkeypatch.setattr(method.tokenizer, "tokenize", shifted(~mask))
    assert torch.allclose(method.training_step(batch)["loss_recon"], clean)  # visible codes play no part
    monkeypatch.setattr(method.tokenizer, "tokenize", shifted(mask))
    assert not torch.allclose(method.training_step(batch)["loss_recon"], clean)
    monkeypatch.setattr(method.tokenizer, "tokenize", tokenize)
    losses = method.training_step(batch)
    sum(losses.values()).backward()
    assert all(p.grad is None for p in method.tokenizer.parameters())  # the tokenizer is frozen
    method.train()
    assert not method.tokenizer.training


def test_official_recipe_details(fashion_info):
    """Crop scale 0.08-1 without jitter, drop path rising to the encoder's rate in regressor and decoder,
    xavier_uniform Linears (the official model re-initialises every Linear), token targets by default."""
    method, _ = build(fashion_info, "model.drop_path=0.1", "method.decoder_depth=2")
    (view,) = method.data_spec().augmentation
    assert tuple(view.crop_scale) == (0.08, 1.0) and view.jitter is None
    assert method.data_spec().mask.fixed_count  # CAE's generator: exactly the target in every sample
    assert [b.drop_path.drop_prob for b in method.regressor.blocks[1:]] == [pytest.approx(0.1)]
    assert method.decoder.blocks[1].drop_path1.drop_prob == pytest.approx(0.1)
    for linear in (method.backbone.blocks[0].attn.qkv, method.regressor.blocks[0].attn.q, method.decoder.head):
        bound = (6 / sum(linear.weight.shape)) ** 0.5  # xavier_uniform's bound
        assert 0.9 * bound < linear.weight.abs().max() <= bound
    assert CAE.option_defaults()["target"] == "tokens"
