"""nwflow.attention: the exact field as one Gaussian-kernel attention head."""

import pytest
import torch

import nwflow
from nwflow.attention import GaussianKernelAttention


def _mixture(n, d, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    centres = torch.randn(4, d, generator=g, dtype=torch.float64)
    X = centres[torch.randint(0, 4, (n,), generator=g)] + 0.3 * torch.randn(n, d, generator=g,
                                                                               dtype=torch.float64)
    return X.to(dtype)


def _reference(x, t, X, sigma_min):
    """Posterior mean and velocity in float64 from explicit distances (independent of the module)."""
    x, X = x.double().flatten(1), X.double().flatten(1)
    t = torch.as_tensor(t, dtype=torch.float64).expand(x.shape[0])[:, None]
    s = 1.0 - (1.0 - sigma_min) * t
    d2 = ((x[:, None, :] - t[:, :, None] * X[None]) ** 2).sum(-1)
    w = torch.softmax(-d2 / (2 * s**2), dim=1)
    m = w @ X
    return w, m, (m - (1 - sigma_min) * x) / s


def _worst(a, b):
    return float(((a.double() - b.double()).norm(dim=1) / b.double().norm(dim=1)).max())


@pytest.mark.parametrize("sigma_min", [0.0, 0.01])
def test_equals_velocity_fp64(sigma_min):
    X = _mixture(300, 5, torch.float64)
    g = torch.Generator().manual_seed(1)
    head = GaussianKernelAttention(X, sigma_min=sigma_min)
    times = [0.0, 0.3, 0.7, 0.95, 0.999, torch.tensor(0.5, dtype=torch.float64),
             torch.rand(16, generator=g, dtype=torch.float64)]
    for t in times:
        x = torch.randn(16, 5, generator=g, dtype=torch.float64)
        assert _worst(head(x, t), nwflow.velocity(x, t, X, sigma_min=sigma_min)) <= 1e-12
        assert _worst(head.posterior_mean(x, t), nwflow.posterior_mean(x, t, X, sigma_min=sigma_min)) <= 1e-12


@pytest.mark.parametrize("sigma_min", [0.0, 0.01])
def test_fp32(sigma_min):
    """In fp32 the head is plain softmax(q K^T) V. Where the logits are modest (t <= 0.5 on
    unit-scale data) it equals nwflow.velocity to 1e-6; nearer t = 1 its error grows like
    eps |logits| (the engine refines those rows), but stays within the fp32 target 1e-4."""
    X = _mixture(300, 5, torch.float32)
    g = torch.Generator().manual_seed(1)
    head = GaussianKernelAttention(X, sigma_min=sigma_min)
    for t in [0.0, 0.1, 0.3, 0.5, torch.tensor(0.4), torch.rand(64, generator=g) * 0.5]:
        x = torch.randn(64, 5, generator=g)
        assert _worst(head(x, t), nwflow.velocity(x, t, X, sigma_min=sigma_min)) <= 1e-6, t
    for t in [0.7, 0.9, 0.95, 0.99, 0.999]:
        x = torch.randn(64, 5, generator=g)
        _, _, u_ref = _reference(x, t, X, sigma_min)
        assert _worst(head(x, t), u_ref) <= 1e-4, t


@pytest.mark.parametrize("sigma_min", [0.0, 0.01])
def test_matches_float64_reference_and_weights(sigma_min):
    X = _mixture(200, 3, torch.float64, seed=3)
    x = torch.randn(8, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(4))
    t = torch.linspace(0.05, 0.99, 8, dtype=torch.float64)
    head = GaussianKernelAttention(X, sigma_min=sigma_min)
    u, w = head(x, t, return_weights=True)
    w_ref, m_ref, u_ref = _reference(x, t, X, sigma_min)
    torch.testing.assert_close(w, w_ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(u, u_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(head.posterior_weights(x, t), w_ref, rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(w.sum(1), torch.ones(8, dtype=torch.float64), rtol=0, atol=1e-12)


def test_query_key_layout_and_norm_cancellation():
    """Logits <q, k_j> differ from the posterior logits by the row constant ||x||^2 / (2 sigma^2)."""
    X = _mixture(50, 4, torch.float64)
    head = GaussianKernelAttention(X)
    x = torch.randn(6, 4, dtype=torch.float64)
    t = 0.6
    s = 1 - t
    q = head.query(x, t)
    assert q.shape == (6, 5) and head.keys.shape == (50, 5)
    torch.testing.assert_close(q[:, :4], t * x / s**2)
    torch.testing.assert_close(q[:, 4], torch.full((6,), -t**2 / (2 * s**2), dtype=torch.float64))
    torch.testing.assert_close(head.keys[:, 4], (X**2).sum(1))
    torch.testing.assert_close(head.values, X)
    posterior_logits = -torch.cdist(x, t * X) ** 2 / (2 * s**2)
    shift = head.attention_logits(x, t) - posterior_logits
    torch.testing.assert_close(shift, ((x**2).sum(1) / (2 * s**2))[:, None].expand(6, 50),
                               rtol=1e-10, atol=1e-9)


def test_scaled_dot_product_attention_with_unit_scale_is_the_posterior_mean():
    X = _mixture(120, 6, torch.float64)
    head = GaussianKernelAttention(X, sigma_min=0.01)
    x = torch.randn(10, 6, dtype=torch.float64)
    q = head.query(x, 0.8)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = torch.nn.functional.scaled_dot_product_attention(
            q[None], head.keys[None], head.values[None], scale=1.0)[0]
    torch.testing.assert_close(out, head.posterior_mean(x, 0.8), rtol=1e-12, atol=1e-12)


def test_images_buffers_and_state_dict():
    X = torch.randn(20, 3, 4, 4, dtype=torch.float64)
    head = GaussianKernelAttention(X)
    x = torch.randn(5, 3, 4, 4, dtype=torch.float64)
    u = head(x, 0.4)
    assert u.shape == x.shape
    torch.testing.assert_close(u, nwflow.velocity(x, 0.4, X), rtol=1e-12, atol=1e-12)
    assert set(dict(head.named_buffers())) == {"keys"}
    clone = GaussianKernelAttention(torch.zeros_like(X))
    clone.load_state_dict(head.state_dict())
    torch.testing.assert_close(clone(x, 0.4), u)
    assert head.n == 20 and "n=20" in repr(head)


@pytest.mark.parametrize("sigma_min", [0.0, 0.01])
def test_differentiable_in_x_and_t(sigma_min):
    # A layer is trained through: autograd must see the whole head (no in-place softmax).
    X = _mixture(40, 3, torch.float64)
    head = GaussianKernelAttention(X, sigma_min=sigma_min)
    x = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    t = torch.tensor([0.1, 0.3, 0.5, 0.7, 0.9], dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda x, t: head(x, t), (x, t))
    # The Jacobian in x against its closed form ((t / sigma^2) Cov_w(X) - (1 - sigma_min) I) / sigma.
    w, m, _ = _reference(x.detach(), t.detach(), X, sigma_min)
    full = torch.autograd.functional.jacobian(lambda x: head(x, t.detach()), x.detach())  # (B, D, B, D)
    J = torch.stack([full[b, :, b] for b in range(5)])
    s = 1.0 - (1.0 - sigma_min) * t.detach()
    centred = X[None] - m[:, None]                                       # (B, n, D)
    cov = torch.einsum("bn,bni,bnj->bij", w, centred, centred)
    eye = torch.eye(3, dtype=torch.float64)
    expect = ((t.detach() / s**2)[:, None, None] * cov - (1.0 - sigma_min) * eye) / s[:, None, None]
    torch.testing.assert_close(J, expect, rtol=1e-10, atol=1e-12)


def test_bad_input():
    X = torch.randn(10, 3)
    head = GaussianKernelAttention(X)
    with pytest.raises(ValueError, match="t = 1 with sigma_min = 0"):
        head(torch.randn(2, 3), 1.0)
    with pytest.raises(ValueError, match=r"^t must be in \[0, 1\], got values in"):
        head(torch.randn(2, 3), -0.1)
    with pytest.raises(ValueError, match="^x must have shape"):
        head(torch.randn(2, 4), 0.5)
    with pytest.raises(TypeError, match=r"^x must have the support's dtype \(torch.float32\), got"):
        head(torch.randn(2, 3, dtype=torch.float64), 0.5)
    with pytest.raises(ValueError, match="^x contains NaN"):
        head(torch.full((2, 3), float("nan")), 0.5)
    with pytest.raises(ValueError, match="^support is empty"):
        GaussianKernelAttention(torch.zeros(0, 3))
    with pytest.raises(TypeError, match="^support must be a floating-point"):
        GaussianKernelAttention(torch.zeros(4, 3, dtype=torch.int64))
    with pytest.raises(ValueError, match="^support contains NaN"):
        GaussianKernelAttention(torch.tensor([[0.0, float("inf")]]))
    with pytest.raises(ValueError, match=r"^sigma_min must be a real number in \[0, 1\), got"):
        GaussianKernelAttention(X, sigma_min=-0.1)
