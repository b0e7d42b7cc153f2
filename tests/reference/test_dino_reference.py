"""DINO's head and loss equal the official DINOHead and DINOLoss (facebookresearch/dino, main_dino.py and
vision_transformer.py) on the same weights and inputs: the numbers in dino_official.json were measured by
running the official classes outside this repository on the tensors ``setup`` builds (seeded), with
``fill_`` giving both heads the same weights."""
import json
from pathlib import Path

import torch

OFFICIAL = json.loads((Path(__file__).parent / "dino_official.json").read_text())
SETUP = OFFICIAL["setup"]
# official parameter names (nn.utils.weight_norm) -> ours (nn.utils.parametrizations.weight_norm)
NAMES = {"last_layer.weight_g": "last_layer.parametrizations.weight.original0",
         "last_layer.weight_v": "last_layer.parametrizations.weight.original1"}


def fill_(named_parameters, seed: int) -> None:
    """Seeded weights for a DINO head, by (official) parameter name; the weight-norm scale g stays 1."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(named_parameters, key=lambda item: NAMES.get(item[0], item[0])):
            p.copy_(torch.ones_like(p) if name.endswith(("weight_g", "original0")) else 0.2 * torch.randn(p.shape, generator=g))


def setup():
    """Student cls features (V*B, D), teacher cls features (2B, D) and a centre (1, K), seeded."""
    s = SETUP
    g = torch.Generator().manual_seed(s["inputs_seed"])
    student = torch.randn(s["n_crops"] * s["batch"], s["in_dim"], generator=g)
    teacher = torch.randn(2 * s["batch"], s["in_dim"], generator=g)
    center = 0.1 * torch.randn(1, s["out_dim"], generator=g)
    return student, teacher, center


def test_head_loss_centre_and_gradients_match_the_official_dino():
    from ssl_bench.build import build_method
    from ssl_bench.data.datasets import load_dataset
    from tests.conftest import smoke_config

    s = SETUP
    cfg = smoke_config("dino", f"model.embed_dim={s['in_dim']}", "model.depth=1", "model.num_heads=2",
                       f"method.out_dim={s['out_dim']}", f"method.hidden_dim={s['hidden_dim']}",
                       f"method.bottleneck_dim={s['bottleneck_dim']}", f"method.n_local={s['n_crops'] - 2}")
    dino = build_method(cfg, load_dataset("fashion_mnist", None, "pretrain")[1])
    fill_(dino.head.named_parameters(), s["student_seed"])
    fill_(dino.teacher_head.named_parameters(), s["teacher_seed"])
    student_x, teacher_x, center = setup()
    dino.center.copy_(center)
    dino.teacher_temp = s["teacher_temp"]  # the official schedule's value at epoch s["epoch"]

    student_out, teacher_out = dino.head(student_x), dino.teacher_head(teacher_x)
    loss, _ = dino.dino_loss(student_out, teacher_out, s["n_crops"])
    dino.update_center(teacher_out)
    loss.backward()

    ref = OFFICIAL["numbers"]
    torch.testing.assert_close(loss.item(), ref["loss"], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(student_out.sum().item(), ref["student_out_sum"], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(dino.center[0], torch.tensor(ref["center_after"]), rtol=1e-5, atol=1e-6)
    grads = dict(dino.head.named_parameters())
    for name, norm in ref["grad_norm"].items():
        torch.testing.assert_close(grads[NAMES.get(name, name)].grad.norm().item(), norm, rtol=1e-4, atol=1e-7)
