"""The shared head pieces: the momentum (EMA) update every momentum network moves by."""
import pytest
import torch
from torch import nn

from ssl_bench.heads import build_mlp, ema_update_, momentum_copy
from tests.conftest import ON_CUDA


@pytest.mark.parametrize("device", ["cpu", ON_CUDA])
def test_ema_update_is_lerp_of_every_parameter_bit_for_bit_and_leaves_buffers(device):
    """One multi-tensor op for all parameters gives each tensor exactly what its own ``lerp_`` gives (so
    exact resume and the official-loss comparisons are unchanged), and no gradient reaches the target."""
    torch.manual_seed(0)
    online = nn.Sequential(nn.Linear(7, 5), build_mlp(5, 11, 3, 3, last_bn_affine=False)).to(device)
    target = momentum_copy(online)
    with torch.no_grad():
        for p in online.parameters():
            p.add_(torch.randn_like(p))  # the online network has moved since the copy
    x = torch.randn(4, 7, device=device)
    online(x).square().sum().backward()  # gradients on the online side must not matter
    buffers = [b.clone() for b in target.buffers()]
    expected = [t.detach().clone().lerp_(o.detach(), 1 - 0.996) for t, o in zip(target.parameters(), online.parameters())]

    ema_update_(target, online, 0.996)

    got = list(target.parameters())
    assert len(got) == len(expected) > 4
    for t, e in zip(got, expected):
        assert torch.equal(t, e) and not t.requires_grad and t.grad_fn is None
    assert all(torch.equal(b, b0) for b, b0 in zip(target.buffers(), buffers))
    assert not all(torch.equal(t, o) for t, o in zip(got, online.parameters()))  # it moved towards, not onto


def test_ema_update_refuses_networks_of_different_shapes():
    with pytest.raises(ValueError):
        ema_update_(nn.Linear(3, 2), nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 2)), 0.9)
