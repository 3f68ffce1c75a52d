import math

import pytest
import torch

from nwflow.models import TimeEmbedding, VelocityMLP


def test_time_embedding_matches_formula():
    emb = TimeEmbedding(dim=8, max_freq=1000.0)
    t = torch.tensor([0.0, 0.25, 1.0], dtype=torch.float64)
    freqs = [10.0 ** (3.0 * k / 3) for k in range(4)]  # logspace(0, 3, 4)
    expected = torch.tensor(
        [[math.sin(2 * math.pi * f * s) for f in freqs] + [math.cos(2 * math.pi * f * s) for f in freqs]
         for s in t.tolist()], dtype=torch.float64)
    torch.testing.assert_close(emb(t), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("t", [0.3, torch.tensor(0.3), torch.full((5,), 0.3)])
def test_mlp_shapes_and_time_forms_agree(t):
    torch.manual_seed(0)
    model = VelocityMLP(12, hidden=16, depth=2)
    x = torch.randn(5, 3, 2, 2)
    out = model(x, t)
    assert out.shape == x.shape
    torch.testing.assert_close(out, model(x, 0.3))


def test_mlp_depends_on_time():
    torch.manual_seed(0)
    model = VelocityMLP(2, hidden=16, depth=2)
    x = torch.randn(4, 2)
    assert not torch.allclose(model(x, 0.1), model(x, 0.9))


def test_mlp_bad_input():
    with pytest.raises(ValueError, match="dim"):
        VelocityMLP(0)
    with pytest.raises(ValueError, match="depth"):
        VelocityMLP(2, depth=0)
    model = VelocityMLP(3)
    with pytest.raises(ValueError, match="x must have 3"):
        model(torch.randn(2, 4), 0.5)
    with pytest.raises(ValueError, match="t must be"):
        model(torch.randn(2, 3), torch.zeros(3))
