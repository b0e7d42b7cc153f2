"""MoCo v3 equals the official moco.builder.MoCo_ViT + vits.py on the same tiny weights and images
(numbers and their source in official_numbers.json; how they were measured: docs/fidelity.md). The
official model computed its own sin-cos table, so the row-first layout of init="moco" is checked too."""
from tests.reference import tiny


def test_loss_and_gradients_match_official_mocov3():
    setup = tiny.official("mocov3")["setup"]
    method = tiny.tiny_method("mocov3", mlp_dim=setup["mlp_dim"], out_dim=setup["out_dim"], temperature=setup["temperature"])
    assert not any(p.requires_grad for p in method.backbone.vit.patch_embed.parameters())  # stop_grad_conv1
    loss = method.training_step({"views": tiny.tiny_images(setup["images_seed"], n_views=2)})["loss_contrastive"]
    loss.backward()
    tiny.assert_matches_official("mocov3", loss, method)
