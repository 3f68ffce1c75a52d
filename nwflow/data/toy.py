r"""Low-dimensional toy data sets: Gaussian mixtures, spherical shells, two moons, a circle.

Book: Part I (the closed form on toy data) and Part II (failure regimes, memorisation).

Every sampler draws i.i.d. points and is deterministic given ``seed`` (an int) or
``generator`` (a ``torch.Generator``); with neither it uses torch's global generator.
Random numbers are drawn on the CPU in float64 and the result is cast to ``dtype``,
so an fp32 and an fp64 call with the same seed give the same points up to rounding.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

from nwflow._checks import (
    check_choice,
    check_float_dtype,
    check_instance,
    check_int,
    check_nonnegative_int,
    check_nonnegative_real,
    check_points,
    check_positive_int,
    check_positive_real,
    check_real,
)

__all__ = [
    "GaussianMixture",
    "gaussian_mixture",
    "spherical_shells",
    "two_moons",
    "circle",
    "random_rotation",
]


# -- argument checks --------------------------------------------------------------------
def _rng(generator: torch.Generator | None, seed: int | None) -> torch.Generator | None:
    """The generator to draw from: ``generator``, a fresh one seeded with ``seed``, or None (global)."""
    if generator is not None and seed is not None:
        raise ValueError("pass either generator or seed, not both")
    if generator is not None:
        check_instance(generator, "generator", torch.Generator, "a torch.Generator")
        if generator.device.type != "cpu":
            raise ValueError(f"generator must be a CPU generator, got one on {generator.device}")
        return generator
    if seed is not None:
        return torch.Generator().manual_seed(check_nonnegative_int(seed, "seed"))
    return None


def _as_float64(value: object, name: str) -> torch.Tensor:
    """A finite float64 tensor from a tensor, array or nested sequence."""
    try:
        t = torch.as_tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError) as err:
        raise TypeError(f"{name} must be a tensor or a sequence of numbers: {err}") from None
    if t.numel() and not bool(torch.isfinite(t).all()):
        raise ValueError(f"{name} contains NaN or inf")
    return t


def _weights(weights: object, k: int, name: str = "weights") -> torch.Tensor:
    """Mixing proportions, (k,) non-negative, normalised to sum 1; uniform when None."""
    if weights is None:
        return torch.full((k,), 1.0 / k, dtype=torch.float64)
    w = _as_float64(weights, name)
    if w.shape != (k,):
        raise ValueError(f"{name} must have shape ({k},), got {tuple(w.shape)}")
    if bool((w < 0).any()) or float(w.sum()) <= 0:
        raise ValueError(f"{name} must be non-negative with a positive sum")
    return w / w.sum()


def random_rotation(d: int, generator: torch.Generator | None = None, seed: int | None = None,
                    dtype: torch.dtype = torch.float64) -> torch.Tensor:
    """A Haar-distributed random rotation (orthogonal, determinant +1), (d, d).

    QR of a standard Gaussian matrix with the signs of R's diagonal moved into Q gives a
    Haar orthogonal matrix (Mezzadri 2007); flipping one column when det = -1 makes it a
    rotation.
    """
    d = check_positive_int(d, "d")
    g = _rng(generator, seed)
    q, r = torch.linalg.qr(torch.randn(d, d, generator=g, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q.to(check_float_dtype(dtype))


# -- Gaussian mixtures ------------------------------------------------------------------
@dataclass(frozen=True)
class GaussianMixture:
    r"""A Gaussian mixture p(x) = sum_c pi_c N(x; mu_c, Sigma_c) in d dimensions.

    Fields (float64): ``means`` (k, d), ``covariances`` (k, d, d), ``weights`` (k,) summing
    to 1. Build one with :func:`gaussian_mixture` (``return_mixture=True``) or directly;
    :meth:`sample` draws fresh (e.g. held-out) points from the same mixture and
    :meth:`log_prob` evaluates its density.
    """

    means: torch.Tensor
    covariances: torch.Tensor
    weights: torch.Tensor

    def __post_init__(self) -> None:
        means = _as_float64(self.means, "means")
        if means.dim() != 2 or means.shape[0] < 1 or means.shape[1] < 1:
            raise ValueError(f"means must have shape (k, d), got {tuple(means.shape)}")
        k, d = means.shape
        cov = _as_float64(self.covariances, "covariances")
        if cov.shape != (k, d, d):
            raise ValueError(f"covariances must have shape ({k}, {d}, {d}), got {tuple(cov.shape)}")
        if not torch.allclose(cov, cov.transpose(1, 2), rtol=1e-10, atol=1e-12):
            raise ValueError("covariances must be symmetric")
        _, info = torch.linalg.cholesky_ex(cov)
        if bool((info != 0).any()):
            raise ValueError("covariances must be positive definite")
        object.__setattr__(self, "means", means)
        object.__setattr__(self, "covariances", cov)
        object.__setattr__(self, "weights", _weights(self.weights, k))

    @property
    def k(self) -> int:
        """Number of components."""
        return self.means.shape[0]

    @property
    def d(self) -> int:
        """Dimension."""
        return self.means.shape[1]

    def sample(self, n: int, generator: torch.Generator | None = None, seed: int | None = None,
               return_labels: bool = False, dtype: torch.dtype = torch.float32
               ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """n i.i.d. points (n, d): a component c ~ pi, then x = mu_c + L_c z with L_c L_c^T = Sigma_c.

        With ``return_labels`` also the components (n,) int64.
        """
        n = check_positive_int(n, "n")
        dtype = check_float_dtype(dtype)
        g = _rng(generator, seed)
        labels = torch.multinomial(self.weights, n, replacement=True, generator=g)
        z = torch.randn(n, self.d, generator=g, dtype=torch.float64)
        chol = torch.linalg.cholesky(self.covariances)
        x = self.means[labels] + torch.einsum("nij,nj->ni", chol[labels], z)
        x = x.to(dtype)
        return (x, labels) if return_labels else x

    def log_prob(self, x: torch.Tensor) -> torch.Tensor:
        """log p(x) for x of shape (B, d), computed in float64; returns (B,) float64."""
        x = check_points(x, "x", dim=self.d, min_rows=0)
        comp = torch.distributions.MultivariateNormal(self.means, covariance_matrix=self.covariances)
        per_comp = comp.log_prob(x.to(torch.float64)[:, None, :])          # (B, k)
        return torch.logsumexp(per_comp + self.weights.log(), dim=1)


def _component_covariances(
    k: int, d: int, scales: object, covariances: object, anisotropy: float,
    g: torch.Generator | None,
) -> torch.Tensor:
    """(k, d, d) covariances from explicit ``covariances`` or from ``scales`` and ``anisotropy``."""
    if covariances is not None:
        if scales is not None or anisotropy != 1.0:
            raise ValueError("pass covariances, or scales/anisotropy, not both")
        cov = _as_float64(covariances, "covariances")
        if cov.shape == (d, d):
            cov = cov.expand(k, d, d)
        return cov.clone()
    s = _as_float64(0.5 if scales is None else scales, "scales")
    if s.dim() == 0:
        s = s.expand(k, d)
    elif s.shape == (k,):
        s = s[:, None].expand(k, d)
    elif s.shape != (k, d):
        raise ValueError(f"scales must be a number, or have shape ({k},) or ({k}, {d}), got {tuple(s.shape)}")
    if bool((s <= 0).any()):
        raise ValueError("scales must be positive")
    if anisotropy == 1.0:
        return torch.diag_embed(s.square())
    # Axis stds fall geometrically from s to s / anisotropy; a random rotation per
    # component points the long axis in a random direction.
    decay = anisotropy ** (-torch.linspace(0.0, 1.0, d, dtype=torch.float64))
    cov = torch.empty(k, d, d, dtype=torch.float64)
    for c in range(k):
        q = random_rotation(d, generator=g)
        cov[c] = (q * (s[c] * decay).square()) @ q.T
    return 0.5 * (cov + cov.transpose(1, 2))


def gaussian_mixture(
    n: int,
    d: int = 2,
    k: int = 8,
    means: object = None,
    scales: object = None,
    covariances: object = None,
    anisotropy: float = 1.0,
    weights: object = None,
    radius: float = 4.0,
    layout: str = "circle",
    return_labels: bool = False,
    return_mixture: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
):
    r"""n i.i.d. samples of a k-component Gaussian mixture in d dimensions.

    p(x) = sum_c pi_c N(x; mu_c, Sigma_c).

    - ``means``: (k, d); when None, ``layout`` places them: ``"circle"`` puts them evenly on
      a circle of ``radius`` in the first two coordinates (the classic "8 Gaussians", needs
      d >= 2); ``"random"`` draws them uniformly on the sphere of ``radius`` in R^d.
    - Covariances: either ``covariances`` ((d, d) shared or (k, d, d), symmetric positive
      definite) or ``scales`` (a number, (k,) or (k, d) standard deviations; default 0.5)
      with ``anisotropy`` >= 1: each component's axis standard deviations fall
      geometrically from its scale to scale / anisotropy and are turned by a random
      rotation, giving strongly elongated components when anisotropy >> 1.
    - ``weights``: (k,) mixing proportions (normalised); uniform when None.

    Random draws happen in this order from one generator: means (if random), rotations
    (if anisotropic), then the samples. Returns ``x`` (n, d), plus ``labels`` (n,) int64
    when ``return_labels``, plus the :class:`GaussianMixture` when ``return_mixture``
    (use ``mixture.sample(m, seed=...)`` for held-out points). Book: Part I.
    """
    n = check_positive_int(n, "n")
    d = check_positive_int(d, "d")
    g = _rng(generator, seed)
    radius = check_nonnegative_real(radius, "radius")
    anisotropy = check_real(anisotropy, "anisotropy", low=1.0)
    if means is not None:
        mu = _as_float64(means, "means")
        if mu.dim() != 2 or mu.shape[1] != d:
            raise ValueError(f"means must have shape (k, {d}), got {tuple(mu.shape)}")
        k = mu.shape[0]
        if k < 1:
            raise ValueError("means must hold at least one component")
    else:
        k = check_positive_int(k, "k")
        if check_choice(layout, "layout", ("circle", "random")) == "circle":
            if d < 2:
                raise ValueError("layout='circle' needs d >= 2; use layout='random' for d = 1")
            angle = 2.0 * math.pi * torch.arange(k, dtype=torch.float64) / k
            mu = torch.zeros(k, d, dtype=torch.float64)
            mu[:, 0], mu[:, 1] = radius * torch.cos(angle), radius * torch.sin(angle)
        elif layout == "random":
            mu = torch.randn(k, d, generator=g, dtype=torch.float64)
            mu = radius * mu / torch.linalg.vector_norm(mu, dim=1, keepdim=True)
    cov = _component_covariances(k, d, scales, covariances, anisotropy, g)
    mixture = GaussianMixture(mu, cov, _weights(weights, k))
    x, labels = mixture.sample(n, generator=g, return_labels=True, dtype=dtype)
    out: tuple = (x,)
    if return_labels:
        out += (labels,)
    if return_mixture:
        out += (mixture,)
    return out[0] if len(out) == 1 else out


# -- shells, moons, circle --------------------------------------------------------------
def spherical_shells(
    n: int,
    d: int,
    radii: Sequence[float] = (1.0, 2.0, 3.0),
    noise: float = 0.05,
    weights: object = None,
    return_labels: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Concentric spheres in R^d: x = r_c u + noise * eps.

    A shell c ~ ``weights`` (uniform when None), a direction u uniform on the unit sphere
    S^{d-1} (a normalised Gaussian), and isotropic Gaussian noise eps ~ N(0, I_d).
    Returns (n, d), and the shell index (n,) int64 when ``return_labels``.
    """
    n = check_positive_int(n, "n")
    d = check_positive_int(d, "d")
    noise = check_nonnegative_real(noise, "noise")
    dtype = check_float_dtype(dtype)
    r = _as_float64(radii, "radii")
    if r.dim() != 1 or r.numel() < 1:
        raise ValueError(f"radii must be a non-empty sequence of numbers, got shape {tuple(r.shape)}")
    if bool((r <= 0).any()):
        raise ValueError("radii must be positive")
    w = _weights(weights, r.numel())
    g = _rng(generator, seed)
    labels = torch.multinomial(w, n, replacement=True, generator=g)
    u = torch.randn(n, d, generator=g, dtype=torch.float64)
    u = u / torch.linalg.vector_norm(u, dim=1, keepdim=True)
    x = r[labels, None] * u + noise * torch.randn(n, d, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    return (x, labels) if return_labels else x


def two_moons(
    n: int,
    noise: float = 0.05,
    return_labels: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Two interleaved half circles in R^2 (the scikit-learn layout), plus Gaussian noise.

    Label 0 (upper moon): (cos theta, sin theta); label 1 (lower moon):
    (1 - cos theta, 1/2 - sin theta); theta ~ U[0, pi], the moon ~ Bernoulli(1/2), then
    noise * N(0, I_2) is added. Returns (n, 2), and the moon (n,) int64 when ``return_labels``.
    """
    n = check_positive_int(n, "n")
    noise = check_nonnegative_real(noise, "noise")
    dtype = check_float_dtype(dtype)
    g = _rng(generator, seed)
    labels = torch.randint(0, 2, (n,), generator=g)
    theta = math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    upper = torch.stack([torch.cos(theta), torch.sin(theta)], dim=1)
    lower = torch.stack([1.0 - torch.cos(theta), 0.5 - torch.sin(theta)], dim=1)
    x = torch.where(labels[:, None] == 0, upper, lower)
    x = x + noise * torch.randn(n, 2, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    return (x, labels) if return_labels else x


def circle(
    n: int,
    radius: float = 1.0,
    noise: float = 0.0,
    dim: int = 2,
    rotation: torch.Tensor | None = None,
    return_angles: bool = False,
    generator: torch.Generator | None = None,
    seed: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    r"""Points on a circle of ``radius``: a one-dimensional manifold in R^dim.

    theta ~ U[0, 2 pi); the point (r cos theta, r sin theta) is padded with zeros to ``dim``
    coordinates and, when dim > 2, turned by ``rotation`` (a (dim, dim) orthogonal matrix;
    when None a random rotation drawn first from the same generator), so the circle lies in
    a tilted plane. Then noise * N(0, I_dim) is added (off-manifold noise).
    Returns (n, dim), and theta (n,) float64 when ``return_angles``.
    """
    n = check_positive_int(n, "n")
    radius = check_positive_real(radius, "radius")
    noise = check_nonnegative_real(noise, "noise")
    dim = check_int(dim, "dim", minimum=2)
    dtype = check_float_dtype(dtype)
    g = _rng(generator, seed)
    if rotation is not None:
        if dim == 2:
            raise ValueError("rotation only applies when dim > 2 (a rotated plane circle is still a circle)")
        rot = _as_float64(rotation, "rotation")
        if rot.shape != (dim, dim):
            raise ValueError(f"rotation must have shape ({dim}, {dim}), got {tuple(rot.shape)}")
        if not torch.allclose(rot @ rot.T, torch.eye(dim, dtype=torch.float64), atol=1e-6):
            raise ValueError("rotation must be orthogonal (rotation @ rotation.T = I)")
    elif dim > 2:
        rot = random_rotation(dim, generator=g)
    theta = 2.0 * math.pi * torch.rand(n, generator=g, dtype=torch.float64)
    x = torch.zeros(n, dim, dtype=torch.float64)
    x[:, 0], x[:, 1] = radius * torch.cos(theta), radius * torch.sin(theta)
    if dim > 2:
        x = x @ rot.T
    x = x + noise * torch.randn(n, dim, generator=g, dtype=torch.float64)
    x = x.to(dtype)
    return (x, theta) if return_angles else x
