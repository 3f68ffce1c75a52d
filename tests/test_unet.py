"""Tests for nwflow.models.unet.UNet: shapes, time handling, per-sample independence, trainability."""

from __future__ import annotations

import pytest
import torch

from nwflow.models.unet import UNet


def _randomise_output(model: UNet, seed: int = 0) -> None:
    # The output convolution starts at zero; give it weights so the tests see the network.
    g = torch.Generator().manual_seed(seed)
    conv = model.out[-1]
    with torch.no_grad():
        conv.weight.copy_(0.1 * torch.randn(conv.weight.shape, generator=g))
        conv.bias.copy_(0.1 * torch.randn(conv.bias.shape, generator=g))


@pytest.mark.parametrize("size,mults", [(8, (1, 2, 2)), (16, (1, 2)), (4, (1,))])
def test_shape_and_zero_init(size, mults):
    torch.manual_seed(0)
    model = UNet(channels=3, base=8, mults=mults, time_dim=16)
    x = torch.randn(5, 3, size, size)
    out = model(x, torch.rand(5))
    assert out.shape == x.shape
    assert bool((out == 0).all())  # zero-initialised output layer: the zero field


def test_time_forms_agree_and_time_matters():
    torch.manual_seed(1)
    model = UNet(channels=2, base=8, mults=(1, 2), time_dim=16)
    _randomise_output(model)
    x = torch.randn(4, 2, 8, 8)
    with torch.no_grad():
        a = model(x, 0.3)
        b = model(x, torch.tensor(0.3))
        c = model(x, torch.full((4,), 0.3))
        d = model(x, 0.9)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    torch.testing.assert_close(a, c, rtol=0, atol=0)
    assert float((d - a).abs().max()) > 1e-4


def test_rows_do_not_interact():
    # GroupNorm normalises each sample on its own: changing one row leaves the others alone.
    torch.manual_seed(2)
    model = UNet(channels=3, base=8, mults=(1, 2), time_dim=16)
    _randomise_output(model)
    x = torch.randn(3, 3, 8, 8)
    t = torch.tensor([0.1, 0.5, 0.9])
    y = x.clone()
    y[1] = torch.randn(3, 8, 8)
    with torch.no_grad():
        a, b = model(x, t), model(y, t)
    torch.testing.assert_close(a[[0, 2]], b[[0, 2]], rtol=1e-6, atol=1e-6)
    assert float((a[1] - b[1]).abs().max()) > 1e-4


def test_learns_a_time_dependent_field():
    # Fit v(x, t) = x / 2 + 2 (1 - t) for a few Adam steps: the loss must fall well below its start.
    torch.manual_seed(3)
    model = UNet(channels=1, base=8, mults=(1, 2), time_dim=16)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    g = torch.Generator().manual_seed(4)
    losses = []
    for _ in range(40):
        x = torch.randn(8, 1, 8, 8, generator=g)
        t = torch.rand(8, generator=g)
        target = 0.5 * x + 2.0 * (1 - t[:, None, None, None])
        loss = (model(x, t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert sum(losses[-5:]) < 0.5 * sum(losses[:5])


def test_bad_inputs():
    model = UNet(channels=3, base=8, mults=(1, 2, 2), time_dim=16)
    with pytest.raises(ValueError, match="x must have shape"):
        model(torch.zeros(2, 1, 8, 8), 0.5)
    with pytest.raises(ValueError, match="divisible by 4"):
        model(torch.zeros(2, 3, 6, 6), 0.5)
    with pytest.raises(ValueError, match="t must be"):
        model(torch.zeros(2, 3, 8, 8), torch.zeros(3))
    with pytest.raises(ValueError, match="mults"):
        UNet(mults=())
    with pytest.raises(ValueError, match="base"):
        UNet(base=0)
    with pytest.raises(ValueError, match="time_dim"):
        UNet(time_dim=15)
