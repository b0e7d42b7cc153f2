"""SimSiam equals the official simsiam.builder.SimSiam and main_simsiam.py's loss on the same tiny
weights and images; the official code has no ViT, so its base encoder was the same tiny timm ViT with an
``fc`` (numbers and their source in official_numbers.json; how they were measured: docs/fidelity.md).
The gradients check the stop-gradient: without it the projector's gradient changes."""
from tests.reference import tiny


def test_loss_and_gradients_match_official_simsiam():
    setup = tiny.official("simsiam")["setup"]
    method = tiny.tiny_method("simsiam", proj_dim=setup["proj_dim"], pred_dim=setup["pred_dim"])
    loss = method.training_step({"views": tiny.tiny_images(setup["images_seed"], n_views=2)})["loss_simsiam"]
    loss.backward()
    tiny.assert_matches_official("simsiam", loss, method)
