"""MAE equals the official models_mae.py on the same tiny weights, images and noise (numbers and their
source in official_numbers.json; how they were measured: docs/fidelity.md)."""
from ssl_bench.masking import RandomMaskGenerator
from tests.reference import tiny


def test_loss_and_gradients_match_official_mae():
    setup = tiny.official("mae")["setup"]
    method = tiny.tiny_method(
        "mae", mask_ratio=setup["mask_ratio"], decoder_dim=setup["decoder_dim"], decoder_depth=setup["decoder_depth"],
        decoder_heads=setup["decoder_heads"], norm_pix_loss=setup["norm_pix_loss"],
    )
    # our generator's count (at 4x4 and 0.7 the official int(N * (1 - r)) masks 12, round(r * N) 11)
    num_masked = RandomMaskGenerator(method.backbone.grid_size, setup["mask_ratio"]).num_masked
    assert num_masked == setup["num_masked"]
    mask = tiny.mask_from_noise(tiny.tiny_noise(setup["noise_seed"]), num_masked)  # the patches the official noise masks
    loss = method.training_step({"views": tiny.tiny_images(setup["images_seed"]), "mask": mask})["loss_recon"]
    loss.backward()
    tiny.assert_matches_official("mae", loss, method)
