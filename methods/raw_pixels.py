"""Raw pixels: the second control row of every benchmark table.

No encoder at all: the probes read the normalised input pixels (``ssl_bench.backbone.PixelEncoder``). A
method whose kNN or linear score is not above this row has learnt nothing those probes could not get
from the images themselves. On Fashion-MNIST the pixels are a strong baseline (a linear probe reaches
about 84%), which is exactly why the row belongs in the table.

Like ``random_init`` it runs through the common trainer with 0 steps, so it has a run record and a
checkpoint (of no weights) that the evaluation harness reads like any other run. There is nothing to
fine-tune, so it is evaluated with the frozen-feature protocols only.
"""
from __future__ import annotations

from methods.random_init import RandomInit
from ssl_bench.backbone import PixelEncoder, ViTBackbone
from ssl_bench.registry import register_method


@register_method
class RawPixels(RandomInit):
    name = "raw_pixels"
    description = "Control: no encoder, the probes read the input pixels (no fine-tuning)"
    protocols = ("knn", "linear", "attentive")
    option_checks = {}

    def __init__(self, backbone: ViTBackbone):
        super().__init__(backbone)
        self.pixels = PixelEncoder(backbone.img_size, backbone.in_chans)

    @property
    def encoder(self) -> PixelEncoder:
        return self.pixels
