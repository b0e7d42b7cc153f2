"""MixedAE's defining behaviour: mixing by M, TopK homologous attention, same-source contrastive
positives, symmetric reconstruction with segment embeddings, and MAE-on-mixed-input when all
homologous parts are off."""
import math

import pytest
import torch
from timm.models.vision_transformer import Attention

import methods.mixedae as mixedae
from methods.mixedae import (
    HomologousAttention,
    draw_sources,
    homologous_contrastive_loss,
    homologous_positives,
    mix_images,
    topk_attention_weights,
)
from ssl_bench.backbone import ViTBackbone, patchify
from ssl_bench.build import build_method
from ssl_bench.data.pipeline import build_pretrain_loader
from ssl_bench.errors import UserError
from ssl_bench.registry import get_method
from ssl_bench.trainer import pretrain
from tests.conftest import smoke_config

OFF = ("method.homo_attention=false", "method.homo_contrastive=false", "method.segment_embed=false")


def build(fashion_info, *overrides, seed=0):
    cfg = smoke_config("mixedae", "train.batch_size=8", *overrides)
    torch.manual_seed(seed)
    method = build_method(cfg, fashion_info)
    loader, *_ = build_pretrain_loader(cfg, method.data_spec())
    return method, next(iter(loader))


@pytest.fixture
def mixedae_and_batch(fashion_info):
    return build(fashion_info)


# -- mixing ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("group", [2, 4])
def test_each_mixed_patch_comes_from_the_source_m_names(group):
    torch.manual_seed(0)
    images = torch.randn(2 * group, 1, 28, 28)
    sources = draw_sources(2, 16, group)
    # every source owns N / G positions of each mixed image
    assert all(torch.bincount(row, minlength=group).tolist() == [16 // group] * group for row in sources)
    mixed, src = patchify(mix_images(images, sources, 7), 7), patchify(images, 7)
    for j in range(2):
        for p in range(16):
            assert torch.equal(mixed[j, p], src[j * group + int(sources[j, p]), p])


def test_encoder_receives_the_mixed_image(mixedae_and_batch, monkeypatch):
    method, batch = mixedae_and_batch
    torch.manual_seed(3)
    sources = draw_sources(4, 16, 2)
    monkeypatch.setattr(mixedae, "draw_sources", lambda *a: sources)
    seen = []
    method.backbone.vit.patch_embed.register_forward_hook(lambda m, inp, out: seen.append(inp[0]))
    method.training_step(batch)
    assert torch.equal(seen[0], mix_images(batch["views"][0], sources, 7))


# -- homologous attention ---------------------------------------------------------------------------
def test_topk_attention_keeps_exactly_k_keys():
    torch.manual_seed(0)
    q, k = torch.randn(2, 3, 9, 8), torch.randn(2, 3, 9, 8)
    scores = q @ k.transpose(-2, -1)
    for K in range(1, 10):
        w = topk_attention_weights(q, k, K, 1.0)
        assert ((w > 0).sum(-1) == K).all()
        assert torch.allclose(w.sum(-1), torch.ones(2, 3, 9))
        # the kept keys are the K highest-scoring ones
        assert (scores.masked_fill(w == 0, math.inf).amin(-1) >= scores.masked_fill(w > 0, -math.inf).amax(-1)).all()
    # all scores tied: still exactly K keys, not every key
    assert ((topk_attention_weights(torch.zeros(1, 1, 9, 8), k[:1, :1], 4, 1.0) > 0).sum(-1) == 4).all()


def test_topk_attention_equals_dense_when_k_is_sequence_length():
    torch.manual_seed(0)
    dense = Attention(32, num_heads=2, qkv_bias=True).eval()
    x = torch.randn(3, 9, 32)
    expected = dense(x)
    homologous = HomologousAttention(dense).eval()
    assert set(homologous.state_dict()) == set(dense.state_dict())
    for topk in (None, 9, 50):
        homologous.topk = topk
        assert torch.allclose(homologous(x), expected, atol=1e-5)
    homologous.topk = 8
    assert not torch.allclose(homologous(x), expected, atol=1e-3)


def test_topk_during_training_only_and_encoder_stays_a_plain_vit(mixedae_and_batch):
    method, batch = mixedae_and_batch
    used = []
    for m in method.backbone.modules():
        if isinstance(m, HomologousAttention):
            m.register_forward_hook(lambda mod, inp, out: used.append((mod.topk, inp[0].shape[1])))
    method.training_step(batch)
    # 2 blocks, sequence = cls + 8 visible patches, r = 0.5 -> K = ceil(0.5 * 9) = 5
    assert used == [(5, 9), (5, 9)]
    used.clear()
    method.eval()
    images = batch["views"][0]
    cls, patches = method.encoder(images)
    assert [k for k, _ in used] == [None, None]  # dense attention outside training_step
    plain = ViTBackbone(**method.encoder.signature())
    plain.load_state_dict(method.encoder.state_dict())  # strict: same keys as a plain ViT
    plain_cls, plain_patches = plain.eval()(images)
    assert torch.allclose(cls, plain_cls, atol=1e-5) and torch.allclose(patches, plain_patches, atol=1e-5)


# -- homologous contrastive ------------------------------------------------------------------------
def test_homologous_positives_are_exactly_the_same_source_patches():
    labels = torch.tensor([[0, 1, 1, 0, 2], [1, 1, 1, 0, 0]])
    positives = homologous_positives(labels)
    for m in range(2):
        for i in range(5):
            assert {j for j in range(5) if positives[m, i, j]} == {j for j in range(5) if j != i and labels[m, j] == labels[m, i]}


def test_homologous_contrastive_matches_infonce_formula():
    torch.manual_seed(0)
    feats, labels, tau = torch.randn(2, 6, 16), torch.tensor([[0, 1, 0, 1, 1, 2], [1, 0, 0, 1, 0, 1]]), 0.3
    z = torch.nn.functional.normalize(feats, dim=-1)
    terms = []
    for m in range(2):
        for i in range(6):
            pos = [j for j in range(6) if j != i and labels[m, j] == labels[m, i]]
            if not pos:  # source 2 has a single patch: no positive, not an anchor
                continue
            denom = sum(torch.exp(z[m, i] @ z[m, j] / tau) for j in range(6) if j != i)
            terms.append(-sum(torch.log(torch.exp(z[m, i] @ z[m, p] / tau) / denom) for p in pos) / len(pos))
    expected = torch.stack(terms).mean()
    assert torch.allclose(homologous_contrastive_loss(feats, labels, tau), expected, atol=1e-5)
    # features clustered by source: low loss; the same features under other labels: high
    centres = torch.eye(16)[:3] * 5
    clustered = centres[labels] + 0.1 * torch.randn(2, 6, 16)
    shuffled = labels[:, torch.tensor([1, 0, 3, 2, 5, 4])]
    assert homologous_contrastive_loss(clustered, labels, tau) + 0.3 < homologous_contrastive_loss(clustered, shuffled, tau)


def test_contrastive_labels_are_the_sources_of_the_visible_patches(mixedae_and_batch, monkeypatch):
    method, batch = mixedae_and_batch
    torch.manual_seed(3)
    sources = draw_sources(4, 16, 2)
    monkeypatch.setattr(mixedae, "draw_sources", lambda *a: sources)
    seen = []
    real = mixedae.homologous_contrastive_loss
    monkeypatch.setattr(mixedae, "homologous_contrastive_loss", lambda f, lab, t: seen.append((f, lab)) or real(f, lab, t))
    losses = method.training_step(batch)
    features, labels = seen[0]
    mask = batch["mask"][::2]
    for j in range(4):
        assert labels[j].tolist() == sources[j][~mask[j]].tolist()  # visible patches, in order
    assert features.shape == (4, 8, method.backbone.embed_dim)
    assert torch.allclose(losses["loss_homo_contrastive"], 0.1 * real(features, labels, 0.25))


# -- symmetric reconstruction and segment embeddings ---------------------------------------------------
def test_symmetric_mixing_reconstructs_every_image_of_the_group(mixedae_and_batch, monkeypatch):
    method, batch = mixedae_and_batch
    images, mask = batch["views"][0], batch["mask"][::2]
    torch.manual_seed(3)
    sources = draw_sources(4, 16, 2)
    monkeypatch.setattr(mixedae, "draw_sources", lambda *a: sources)
    oracle = method.reconstruction_target(images)  # (8, N, P): every image of the batch
    shown = (~mask).repeat_interleave(2, 0) & (sources.repeat_interleave(2, 0) == torch.arange(2).repeat(4)[:, None])

    def loss_with(pred):
        monkeypatch.setattr(method.decoder, "forward", lambda latent, ids, seg=None: pred)
        return float(method.training_step(batch)["loss_recon"])

    assert loss_with(oracle) < 1e-10  # row b of the decoder output is scored against image b
    assert loss_with(oracle[torch.tensor([1, 0, 3, 2, 5, 4, 7, 6])]) > 0.1  # rows swapped within groups
    # every image is a target, on exactly the patches the encoder did not show of it
    pred = (oracle + 1.0).requires_grad_()
    monkeypatch.setattr(method.decoder, "forward", lambda latent, ids, seg=None: pred)
    method.training_step(batch)["loss_recon"].backward()
    assert torch.equal(pred.grad.abs().sum(-1) > 0, ~shown)
    assert (~shown).any(dim=1).all()


def test_segment_embeddings_tell_the_decoder_which_source(mixedae_and_batch):
    method, batch = mixedae_and_batch
    method.eval()
    preds = []
    method.decoder.register_forward_hook(lambda m, inp, out: preds.append(out))
    method.training_step(batch)
    assert preds[0].shape[0] == 8  # one decoder pass per source: G per mixed image
    assert not torch.allclose(preds[0][0::2], preds[0][1::2], atol=1e-4)
    with torch.no_grad():
        method.segment_embed.zero_()
    method.training_step(batch)
    assert torch.allclose(preds[1][0::2], preds[1][1::2], atol=1e-6)  # nothing else tells them apart


# -- the whole method ----------------------------------------------------------------------------------
def test_all_homologous_parts_off_is_mae_on_the_mixed_input(fashion_info):
    method, batch = build(fashion_info, *OFF, "method.mask_ratio=0.75")
    mae = build_method(smoke_config("mae", "train.batch_size=8"), fashion_info)
    mae.load_state_dict(method.state_dict())  # strict: exactly MAE's parameters
    method.eval(), mae.eval()
    torch.manual_seed(5)
    losses = method.training_step(batch)
    torch.manual_seed(5)
    mixed = mix_images(batch["views"][0], draw_sources(4, 16, 2), 7)
    expected = mae.training_step({"views": [mixed], "mask": batch["mask"][::2]})
    assert set(losses) == {"loss_recon"} and torch.allclose(losses["loss_recon"], expected["loss_recon"])
    # switching homologous attention back on changes the computation
    attn, _ = build(fashion_info, "method.homo_contrastive=false", "method.segment_embed=false", "method.mask_ratio=0.75")
    attn.load_state_dict(method.state_dict())
    torch.manual_seed(5)
    assert not torch.allclose(attn.eval().training_step(batch)["loss_recon"], expected["loss_recon"])


def test_loss_falls_on_real_images(tmp_path):
    cfg = smoke_config("mixedae", "data.subset=320", "train.epochs=6", "train.log_every=1")
    record = pretrain(cfg, tmp_path / "run")
    curve = [v for _, v in record["loss"]["loss"]["curve"]]
    first, last = sum(curve[:5]) / 5, sum(curve[-5:]) / 5
    assert record["status"] == "finished" and last < 0.85 * first, (first, last)


def test_mixing_without_extra_masking(fashion_info):
    method, batch = build(fashion_info, "method.mix_ratio=0.25", "method.mask_ratio=0")
    assert method.data_spec().mask is None and "mask" not in batch
    losses = method.training_step(batch)  # 2 mixed images of 4 sources, all 16 patches visible
    assert all(torch.isfinite(v) for v in losses.values())


def test_bad_options_raise_one_clear_error(fashion_info):
    with pytest.raises(UserError, match="mix_ratio"):
        build(fashion_info, "method.mix_ratio=0.3")
    with pytest.raises(UserError, match="batch_size"):
        get_method("mixedae").prepare(smoke_config("mixedae", "method.mix_ratio=0.25", "train.batch_size=30"), None)


def test_unverified_choices_are_named_options(fashion_info):
    """No official code: r, K, tau, the loss weight, the segment embeddings' place and the post-mixing mask
    ratio are options (defaults: the values used so far); "both" also feeds the encoder a per-source embedding."""
    from methods.mixedae import MixedAE

    defaults = MixedAE.option_defaults()
    assert {k: defaults[k] for k in ("mix_ratio", "topk_ratio", "temperature", "contrastive_weight", "segment_embed_place", "mask_ratio")} == {
        "mix_ratio": 0.5, "topk_ratio": None, "temperature": 0.25, "contrastive_weight": 0.1, "segment_embed_place": "decoder", "mask_ratio": 0.5}
    method, batch = build(fashion_info, "method.segment_embed_place=both")
    seen = []
    method.backbone.blocks[0].register_forward_pre_hook(lambda m, args: seen.append(args[0].detach()))
    torch.manual_seed(5)  # the same mixing masks in both steps
    sum(method.training_step(batch).values()).backward()
    assert method.encoder_segment_embed.grad is not None and method.encoder_segment_embed.grad.abs().sum() > 0
    with torch.no_grad():  # without the embedding the encoder's input changes
        method.encoder_segment_embed.zero_()
    torch.manual_seed(5)
    method.training_step(batch)
    assert seen[0].shape == seen[1].shape and not torch.allclose(seen[0], seen[1])
    with pytest.raises(UserError, match="segment_embed_place"):
        build(fashion_info, "method.segment_embed_place=encoder")
