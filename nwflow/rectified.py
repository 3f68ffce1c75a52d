r"""Rectified flows on fixed pairs: straight transport, the pair-optimal field, gradient variance.

Book: Part II, chapter 8 (``book/part2_papers/08_rectified_flow_memorisation``), after
Reu, Dromigny, Bronstein and Vargas, "Gradient Variance Reveals Failure Modes in Flow-Based
Generative Models" (NeurIPS 2025, arXiv 2510.18118).

A rectified flow regresses a field v(x, t) onto the displacement of *fixed* pairs
(x0_i, x1_i), i = 1..N (x0 noise, x1 data), along the straight interpolant, possibly blurred
by a constant noise of standard deviation sigma:

.. math::

    x_t = (1 - t)\, x_0^{(i)} + t\, x_1^{(i)} + \sigma \varepsilon, \quad \varepsilon \sim N(0, I),
    \qquad d_i = x_1^{(i)} - x_0^{(i)}

With sigma = 0 this is the book's path x_t = sigma_t x0 + t x1 with sigma_min = 0, taken on
fixed pairs instead of fresh noise. ``sigma`` here is that interpolant noise, constant in t;
it is not the path's sigma_t.

What lives here:

- Affine transport in closed form. For a map T(z) = b + B z the straight lines
  x_t = (1 - t) z + t T(z) are the trajectories of

  .. math:: v(x, t) = b + (B - I) \big((1 - t) I + t B\big)^{-1} (x - t b)

  B = M^{1/2} is the optimal-transport field from N(0, I) to N(mu, M) (b = mu):
  v = theta + Theta (I + t Theta)^{-1} (x - t theta) with theta = mu, Theta = M^{1/2} - I.
  B = M^{1/2} R with R orthogonal is a rotated-OT field: same end marginals, other pairs.
- The pair-optimal field, the minimiser over all fields of E_{i, t, eps} ||v(x_t, t) - d_i||^2:

  .. math:: v^\star_\sigma(x, t) = \sum_i w_i(x, t)\, d_i, \qquad
      w_i = \operatorname{softmax}_i\left(-\frac{\lVert x - c_i(t)\rVert^2}{2\sigma^2}\right), \qquad
      c_i(t) = (1 - t)\, x_0^{(i)} + t\, x_1^{(i)},

  a Nadaraya-Watson smoother over the moving centres c_i(t) with bandwidth sigma. It is the
  closed form of Part I with the support replaced by the centres: the weights are
  ``nwflow.posterior_weights`` at time tau = 1 / (1 + sigma), where the path's bandwidth
  h(tau) = sigma_tau / tau equals sigma. sigma = 0 is its limit, the nearest-line field.
- The variance over samples of the per-sample loss gradient, with respect to the prediction
  (g_i = 2 (v(x_t, t) - d_i)) or to a model's parameters.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from nwflow._checks import (
    check_callable,
    check_float_tensor,
    check_instance,
    check_int,
    check_nonnegative_real,
    check_positive_int,
    check_real,
    check_same_device,
    check_same_shape,
)
from nwflow._precision import WIDE, exact_matmul
from nwflow._stream import softmax_mean
from nwflow.empirical import posterior_weights
from nwflow.path import conditional_velocity, sample_xt, time_per_row
from nwflow.solvers import VelocityFn
from nwflow.train import BatchFn

__all__ = [
    "sqrtm_psd",
    "rotation_matrix",
    "gaussian_ot_map",
    "affine_map",
    "affine_velocity",
    "gaussian_ot_velocity",
    "rotated_ot_velocity",
    "interpolant",
    "pair_batch_fn",
    "pair_weights",
    "pair_velocity",
    "pair_separation",
    "pair_loss",
    "prediction_gradient_variance",
    "parameter_gradient_variance",
]

# -- argument checks ------------------------------------------------------------------
def _check_pairs(x0: object, x1: object) -> tuple[torch.Tensor, torch.Tensor]:
    x0 = check_float_tensor(x0, "x0")
    x1 = check_float_tensor(x1, "x1")
    check_same_shape(x0, x1, "x0", "x1")
    if x0.dim() < 2 or x0.shape[0] == 0:
        raise ValueError(f"x0 and x1 must have shape (N, *S) with N >= 1, got shape {tuple(x0.shape)}")
    _same_dtype_device(x0, x1, "x0", "x1")
    return x0, x1


def _same_dtype_device(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str) -> None:
    if a.dtype != b.dtype:
        raise TypeError(f"{name_b} must have the dtype of {name_a} ({a.dtype}), got {b.dtype}")
    check_same_device(a, b, name_a, name_b)


def _check_noise(noise: object, like: torch.Tensor, sigma: float) -> torch.Tensor | None:
    if noise is None:
        if sigma > 0.0:
            raise ValueError("noise is required when sigma > 0: pass a tensor of standard normals "
                             "shaped like x0 (explicit randomness keeps results reproducible)")
        return None
    noise = check_float_tensor(noise, "noise")
    check_same_shape(noise, like, "noise", "x0")
    return noise


def _check_affine(x: torch.Tensor, shift: object, matrix: object) -> tuple[torch.Tensor, torch.Tensor]:
    shift = check_float_tensor(shift, "shift")
    matrix = check_float_tensor(matrix, "matrix")
    d = shift.shape[0] if shift.dim() == 1 else 0
    if shift.dim() != 1 or matrix.shape != (d, d):
        raise ValueError(f"shift must have shape (d,) and matrix (d, d), got {tuple(shift.shape)} "
                         f"and {tuple(matrix.shape)}")
    if x.dim() != 2 or x.shape[1] != d:
        raise ValueError(f"x must have shape (B, {d}) to match shift, got {tuple(x.shape)}")
    return shift.to(device=x.device, dtype=WIDE), matrix.to(device=x.device, dtype=WIDE)


# -- Gaussian-to-Gaussian transport ---------------------------------------------------
def sqrtm_psd(cov: torch.Tensor) -> torch.Tensor:
    r"""The symmetric positive semi-definite square root M^{1/2} of a covariance M.

    .. math:: M = V \operatorname{diag}(\lambda)\, V^\top \;\Rightarrow\;
        M^{1/2} = V \operatorname{diag}\big(\sqrt{\max(\lambda, 0)}\big)\, V^\top

    by eigen-decomposition in float64 (rounding-level negative eigenvalues clipped to 0).
    Shapes: cov (d, d); returns (d, d) in the dtype of ``cov``. Raises ValueError when ``cov``
    is not symmetric PSD (to 1e-10 relative). Chapter 8, Gaussian-to-Gaussian transport.
    """
    cov = check_float_tensor(cov, "cov")
    if cov.dim() != 2 or cov.shape[0] != cov.shape[1] or cov.shape[0] == 0:
        raise ValueError(f"cov must be a square (d, d) matrix, got shape {tuple(cov.shape)}")
    c = cov.to(WIDE)
    scale = float(c.abs().max()) or 1.0
    if float((c - c.T).abs().max()) > 1e-10 * scale:
        raise ValueError("cov must be symmetric")
    lam, vec = torch.linalg.eigh(0.5 * (c + c.T))
    if float(lam.min()) < -1e-10 * scale:
        raise ValueError(f"cov must be positive semi-definite, its smallest eigenvalue is {float(lam.min())}")
    return ((vec * lam.clamp_min(0.0).sqrt()) @ vec.T).to(cov.dtype)


def rotation_matrix(dim: int, angle: float, plane: tuple[int, int] = (0, 1)) -> torch.Tensor:
    r"""The rotation by ``angle`` theta (radians) in the coordinate ``plane`` (i, j) of R^dim.

    .. math:: R e_i = \cos\theta\, e_i + \sin\theta\, e_j, \qquad
        R e_j = -\sin\theta\, e_i + \cos\theta\, e_j

    The other axes are fixed. In R^2, angle = pi gives R = -I (the R_180 of the crossing-lines
    example). Shapes: returns (dim, dim) float64. Chapter 8.
    """
    check_int(dim, "dim", minimum=2)
    angle = check_real(angle, "angle")
    i, j = plane
    if not (0 <= i < dim and 0 <= j < dim and i != j):
        raise ValueError(f"plane must be two distinct axes in [0, {dim}), got {plane}")
    r = torch.eye(int(dim), dtype=WIDE)
    # Exact zeros at multiples of pi / 2 (sin(pi) is 1.2e-16 in floating point), so that
    # angle = pi gives exactly -I in the plane.
    c, s = (0.0 if abs(v) < 1e-15 else v for v in (math.cos(angle), math.sin(angle)))
    r[i, i], r[j, j], r[j, i], r[i, j] = c, c, s, -s
    return r


def gaussian_ot_map(mean: torch.Tensor, cov: torch.Tensor,
                    rotation: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""The affine map from N(0, I) to N(mean, M), as (shift, matrix) = (mu, M^{1/2} R).

    .. math:: T(z) = \mu + M^{1/2} R\, z, \qquad z \sim N(0, I) \;\Rightarrow\; T(z) \sim N(\mu, M)

    With ``rotation`` R = None (the identity) it is the optimal-transport (Brenier) map; with an
    orthogonal R it is a rotated-OT map: R z ~ N(0, I) again, so the end marginal is the same
    N(mean, M) but every point gets another partner. Shapes: mean (d,), cov (d, d), rotation
    (d, d). Returns float64 (shift (d,), matrix (d, d)). Chapter 8.
    """
    mean = check_float_tensor(mean, "mean")
    if mean.dim() != 1:
        raise ValueError(f"mean must have shape (d,), got {tuple(mean.shape)}")
    root = sqrtm_psd(cov).to(WIDE)
    if root.shape[0] != mean.shape[0]:
        raise ValueError(f"cov is {tuple(root.shape)} but mean has {mean.shape[0]} entries")
    if rotation is None:
        return mean.to(WIDE), root
    rot = check_float_tensor(rotation, "rotation").to(WIDE)
    if rot.shape != root.shape:
        raise ValueError(f"rotation must have shape {tuple(root.shape)}, got {tuple(rot.shape)}")
    eye = torch.eye(rot.shape[0], dtype=WIDE, device=rot.device)
    if float((rot @ rot.T - eye).abs().max()) > 1e-8:
        raise ValueError("rotation must be orthogonal (R R^T = I)")
    return mean.to(WIDE), root @ rot.to(root.device)


def affine_map(z: torch.Tensor, shift: torch.Tensor, matrix: torch.Tensor) -> torch.Tensor:
    r"""An affine map applied to each row of z, with b = ``shift`` and B = ``matrix``.

    .. math:: T(z) = b + B z

    Shapes: z (B, d) rows, shift (d,), matrix (d, d); returns (B, d) in z's dtype. Chapter 8.
    """
    z = check_float_tensor(z, "z")
    b, m = _check_affine(z, shift, matrix)
    return (b + z.to(WIDE) @ m.T).to(z.dtype)


def affine_velocity(x: torch.Tensor, t: float | torch.Tensor, shift: torch.Tensor,
                    matrix: torch.Tensor) -> torch.Tensor:
    r"""The field whose trajectories are the straight lines x_t = (1 - t) z + t T(z), T(z) = b + B z.

    .. math:: v(x, t) = b + (B - I)\, A_t^{-1} (x - t b), \qquad A_t = (1 - t) I + t B

    Derivation: x_t = t b + A_t z, so z = A_t^{-1} (x_t - t b), and dx_t/dt = T(z) - z =
    b + (B - I) z. Every pair (z, T(z)) is then reproduced exactly and the regression loss on
    those pairs is zero. Shapes: x (B, d); t a number, 0-d or (B,) tensor in [0, 1]; shift (d,);
    matrix (d, d). Computed in float64 and returned in x's dtype. Raises ValueError where A_t is
    singular: there the lines of different z meet at the same time and no field exists (e.g.
    B = -I at t = 1/2). Chapter 8, eq. (affine-field).
    """
    x = check_float_tensor(x, "x")
    b, m = _check_affine(x, shift, matrix)
    tt = time_per_row(t, x, dtype=WIDE)
    d = b.shape[0]
    eye = torch.eye(d, dtype=WIDE, device=x.device)
    a = (1.0 - tt)[:, None, None] * eye + tt[:, None, None] * m          # (B, d, d)
    rhs = (x.to(WIDE) - tt[:, None] * b)[:, :, None]                       # (B, d, 1)
    # Singular (to float64 rounding) A_t: the lines of different z meet at this time.
    singular = ~(torch.linalg.cond(a) <= 1e12)  # NaN (the zero matrix) counts as singular
    if bool(singular.any()):
        bad = float(tt[singular.nonzero()[0, 0]])
        raise ValueError(f"(1 - t) I + t B is singular at t = {bad}: the straight lines of this map "
                         "meet there and the field is undefined")
    z = torch.linalg.solve(a, rhs)
    return (b + ((m - eye) @ z)[:, :, 0]).to(x.dtype)


def gaussian_ot_velocity(x: torch.Tensor, t: float | torch.Tensor, mean: torch.Tensor,
                         cov: torch.Tensor) -> torch.Tensor:
    r"""The OT field from N(0, I) to N(mean, M).

    .. math:: v_{\mathrm{OT}}(x, t) = \theta + \Theta\, (I + t\, \Theta)^{-1} (x - t\, \theta), \qquad
        \theta = \mu, \quad \Theta = M^{1/2} - I

    Its trajectories are the straight lines from z to mean + M^{1/2} z. Shapes: x (B, d),
    t a number, 0-d or (B,); mean (d,), cov (d, d); returns (B, d). Chapter 8, eq. (ot-field).
    """
    return affine_velocity(x, t, *gaussian_ot_map(mean, cov))


def rotated_ot_velocity(x: torch.Tensor, t: float | torch.Tensor, mean: torch.Tensor,
                        cov: torch.Tensor, rotation: torch.Tensor) -> torch.Tensor:
    r"""A rotated-OT field: straight lines from z to mean + M^{1/2} R z (R orthogonal).

    .. math:: v(x, t) = \mu + (M^{1/2} R - I) \big((1 - t) I + t M^{1/2} R\big)^{-1} (x - t \mu)

    the affine field of :func:`affine_velocity` with b = mu, B = M^{1/2} R. Same end
    marginals as :func:`gaussian_ot_velocity`, other pairs, longer lines; for R = -I in R^2
    (and M = I) all lines meet at t = 1/2 and the field is singular there. Shapes: x (B, d),
    t a number, 0-d or (B,); mean (d,), cov and rotation (d, d); returns (B, d). Chapter 8.
    """
    return affine_velocity(x, t, *gaussian_ot_map(mean, cov, rotation))


# -- pairs and the interpolant --------------------------------------------------------
def interpolant(x0: torch.Tensor, x1: torch.Tensor, t: float | torch.Tensor, sigma: float = 0.0,
                noise: torch.Tensor | None = None) -> torch.Tensor:
    r"""The (noisy) straight interpolant, ``noise`` being epsilon.

    .. math:: x_t = (1 - t)\, x_0 + t\, x_1 + \sigma \varepsilon, \qquad
        \frac{d x_t}{dt} = x_1 - x_0

    With sigma = 0 it is ``nwflow.sample_xt(x0, x1, t, sigma_min=0)``; with sigma > 0 pass
    ``noise`` (standard normals shaped like x0). Its time derivative is x1 - x0 whatever sigma
    (the noise is fixed along the line). Shapes: x0, x1 (B, *S); t a number, 0-d or (B,).
    Chapter 8 (the noisy interpolant of the gradient-variance section).
    """
    sigma = check_nonnegative_real(sigma, "sigma")
    x0 = check_float_tensor(x0, "x0")
    noise = _check_noise(noise, x0, sigma)
    xt = sample_xt(x0, x1, t, sigma_min=0.0)
    return xt if noise is None or sigma == 0.0 else xt + sigma * noise


def pair_batch_fn(x0: torch.Tensor, x1: torch.Tensor, batch_size: int, sigma: float = 0.0) -> BatchFn:
    r"""A ``batch_fn(step, generator) -> (x_t, t, target)`` for :func:`nwflow.train.train_velocity`.

    .. math:: i \sim \mathcal{U}\{1, \dots, N\}, \quad t \sim \mathcal{U}(0, 1), \quad
        \varepsilon \sim N(0, I): \qquad
        x_t = (1 - t)\, x_0^{(i)} + t\, x_1^{(i)} + \sigma \varepsilon, \quad
        d_i = x_1^{(i)} - x_0^{(i)}

    Each call draws i uniformly from the N fixed pairs, t ~ U(0, 1) and eps ~ N(0, I) (on the
    CPU from ``generator``, then moved to x0's device and dtype) and returns the interpolant
    x_t (B, *S), t (B,) and the target d_i = x1_i - x0_i (B, *S), B = ``batch_size``.
    Shapes: x0, x1 (N, *S). Chapter 8.
    """
    x0, x1 = _check_pairs(x0, x1)
    sigma = check_nonnegative_real(sigma, "sigma")
    check_positive_int(batch_size, "batch_size")
    target_all = conditional_velocity(x0, x1, sigma_min=0.0)
    n, shape = x0.shape[0], tuple(x0.shape[1:])

    def batch_fn(step: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        idx = torch.randint(n, (batch_size,), generator=generator).to(x0.device)
        t = torch.rand(batch_size, generator=generator, dtype=torch.float64).to(x0.device, x0.dtype)
        eps = torch.randn((batch_size,) + shape, generator=generator, dtype=torch.float64)
        xt = interpolant(x0[idx], x1[idx], t, sigma, eps.to(x0.device, x0.dtype))
        return xt, t, target_all[idx]

    return batch_fn


# -- the pair-optimal field -----------------------------------------------------------
def _pair_inputs(x: object, t: float | torch.Tensor, x0: object, x1: object, sigma: object
                 ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, float]:
    """Checked (x, x_flat (B, D), t (B,) wide, x0_flat, x1_flat (N, D), sigma)."""
    x0, x1 = _check_pairs(x0, x1)
    sigma = check_nonnegative_real(sigma, "sigma")
    x = check_float_tensor(x, "x")
    if tuple(x.shape[1:]) != tuple(x0.shape[1:]) or x.dim() != x0.dim():
        raise ValueError(f"x must have shape (B, {', '.join(map(str, x0.shape[1:]))}), "
                         f"got shape {tuple(x.shape)}")
    _same_dtype_device(x0, x, "x0", "x")
    tt = time_per_row(t, x, dtype=WIDE)
    flat = (x.reshape(x.shape[0], -1), x0.reshape(x0.shape[0], -1), x1.reshape(x1.shape[0], -1))
    return x, flat[0], tt, flat[1], flat[2], sigma


def _one_time(tt: torch.Tensor) -> bool:
    """All rows at the same time: then they share one set of centres."""
    return tt.numel() == 0 or bool((tt == tt[0]).all())


def pair_weights(x: torch.Tensor, t: float | torch.Tensor, x0: torch.Tensor, x1: torch.Tensor,
                 sigma: float) -> torch.Tensor:
    r"""Posterior weights over pairs, (B, N).

    .. math:: w_i(x, t) = \operatorname{softmax}_i\left(-\frac{\lVert x - c_i(t)\rVert^2}{2\sigma^2}\right),
        \qquad c_i(t) = (1 - t)\, x_0^{(i)} + t\, x_1^{(i)}

    For sigma > 0 they are Part I's posterior weights with the centres as the support,
    evaluated at tau = 1 / (1 + sigma) on the rescaled query tau x, where the bandwidth is sigma:

    .. math:: h(\tau) = \frac{\sigma_\tau}{\tau} = \sigma, \qquad
        -\frac{\lVert \tau x - \tau c_i\rVert^2}{2\sigma_\tau^2} = -\frac{\lVert x - c_i\rVert^2}{2\sigma^2};

    the exact engine of :mod:`nwflow.empirical` does the softmax when all rows share one t. A
    (B,) ``t`` with several values moves every row's centres differently; those logits are
    formed in float64 in the expanded two-GEMM form (same formula, no (B, N, D) block).
    sigma = 0 is the limit: the one-hot weight of the nearest centre (ties: the lowest index).
    Shapes: x (B, *S), x0 and x1 (N, *S). Chapter 8, eq. (pair-field).
    """
    x, xf, tt, a, b, sigma = _pair_inputs(x, t, x0, x1, sigma)
    if x.shape[0] == 0:
        return torch.empty(0, a.shape[0], dtype=x.dtype, device=x.device)
    if _one_time(tt):
        centres = sample_xt(a, b, float(tt[0]))
        if sigma > 0.0:
            tau = 1.0 / (1.0 + sigma)
            return posterior_weights(tau * xf, tau, centres, sigma_min=0.0)
        with exact_matmul():
            sq = torch.cdist(xf.to(WIDE), centres.to(WIDE)).square()
    else:
        sq = _moving_centre_distances(xf, tt, a, b)
    if sigma == 0.0:
        return nn.functional.one_hot(sq.argmin(dim=1), a.shape[0]).to(x.dtype)
    return torch.softmax(-sq / (2.0 * sigma**2), dim=1).to(x.dtype)


def _moving_centre_distances(xf: torch.Tensor, tt: torch.Tensor, a: torch.Tensor,
                             b: torch.Tensor) -> torch.Tensor:
    """||x_r - c_i(t_r)||^2 for per-row times, (B, N), float64, in the two-GEMM form.

    With d_i = b_i - a_i: ||x - a_i - t d_i||^2 = ||x||^2 - 2 <x, a_i> - 2 t <x, d_i>
    + ||a_i||^2 + 2 t <a_i, d_i> + t^2 ||d_i||^2, so no (B, N, D) block is formed even though
    every row sees its own centres.
    """
    x64, a64 = xf.to(WIDE), a.to(WIDE)
    d64 = conditional_velocity(a64, b.to(WIDE))
    t = tt[:, None]
    with exact_matmul():
        sq = (x64.square().sum(1, keepdim=True) - 2.0 * (x64 @ a64.T) - 2.0 * t * (x64 @ d64.T)
              + a64.square().sum(1) + 2.0 * t * (a64 * d64).sum(1) + t.square() * d64.square().sum(1))
    return sq.clamp_min_(0.0)


def pair_velocity(x: torch.Tensor, t: float | torch.Tensor, x0: torch.Tensor, x1: torch.Tensor,
                  sigma: float) -> torch.Tensor:
    r"""The pair-optimal field: the minimiser of the rectified-flow loss over the N pairs.

    .. math:: v^\star_\sigma(x, t) = \sum_i w_i(x, t)\, d_i, \qquad d_i = x_1^{(i)} - x_0^{(i)},

    .. math:: v^\star_\sigma = \mathop{\mathrm{arg\,min}}_v \frac{1}{N} \sum_i \int_0^1
        \mathbb{E}_\varepsilon \big\lVert v\big(c_i(t) + \sigma\varepsilon, t\big) - d_i \big\rVert^2 \, dt

    with the interpolant of noise ``sigma``: the conditional mean of the displacement given x_t = x, a
    Nadaraya-Watson smoother over the moving centres c_i(t) with bandwidth sigma (weights from
    :func:`pair_weights`). For sigma > 0 it transports the mixture (1/N) sum_i N(x0_i, sigma^2 I)
    exactly onto (1/N) sum_i N(x1_i, sigma^2 I); at sigma = 0 (the nearest-line field) it equals
    x1_i - x0_i on the line of pair i, so Euler steps from x0_i land on x1_i: memorisation.
    It is also the field of minibatch OT-CFM on Gaussian tubes, fed with OT pairs
    (:func:`nwflow.ot.ot_pairs`). The (B, N) weights are formed (N is a number of training
    pairs here), in float64 when the rows' times differ. Shapes: x (B, *S); t a number, 0-d or
    (B,); x0, x1 (N, *S); returns the shape of x. Chapter 8, eq. (pair-field).
    """
    x, xf, tt, a, b, sigma = _pair_inputs(x, t, x0, x1, sigma)
    d = conditional_velocity(a.to(WIDE), b.to(WIDE))                      # x1_i - x0_i, (N, D)
    if sigma > 0.0 and not _one_time(tt):
        # Every row has its own centres: the shared dense kernel mean of the wide logits.
        v = softmax_mean(-_moving_centre_distances(xf, tt, a, b) / (2.0 * sigma**2), d)
    else:
        # One set of centres (the engine's exact weights) or sigma = 0 (one-hot weights).
        with exact_matmul():
            v = pair_weights(x, tt, x0, x1, sigma).to(WIDE) @ d
    return v.to(x.dtype).reshape(x.shape)


def pair_separation(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    r"""How close each pair's line comes to another pair's line *at the same time*, (N,).

    .. math:: \delta_i = \min_{j \ne i}\, \min_{t \in [0, 1]} \lVert c_i(t) - c_j(t) \rVert, \qquad
        c_i(t) = (1 - t)\, x_0^{(i)} + t\, x_1^{(i)}

    With Da = x0_i - x0_j and Dd = d_i - d_j the squared distance is a quadratic in t:

    .. math:: \lVert c_i(t) - c_j(t) \rVert^2 = \lVert \Delta a \rVert^2
        + 2t \langle \Delta a, \Delta d \rangle + t^2 \lVert \Delta d \rVert^2, \qquad
        t^\star = \operatorname{clip}\Big(
        -\frac{\langle \Delta a, \Delta d \rangle}{\lVert \Delta d \rVert^2}, 0, 1\Big);

    the three inner products come from (N, N) Gram matrices in float64, never an (N, N, D)
    block. The pair field of noise sigma keeps pair i on its own line (memorises it) while
    sigma << delta_i, and averages it with its neighbour where sigma >~ delta_i. Lines that
    cross in space at *different* times do not count: in space-time they stay apart.
    Shapes: x0, x1 (N, *S) with N >= 2; returns x0's dtype. Chapter 8.
    """
    x0, x1 = _check_pairs(x0, x1)
    if x0.shape[0] < 2:
        raise ValueError("pair_separation needs at least 2 pairs")
    a = x0.reshape(x0.shape[0], -1).to(WIDE)
    d = x1.reshape(x1.shape[0], -1).to(WIDE) - a
    with exact_matmul():
        gaa, gad, gdd = a @ a.T, a @ d.T, d @ d.T
    na, nd, ad = gaa.diagonal(), gdd.diagonal(), gad.diagonal()
    sq_a = na[:, None] + na[None, :] - 2.0 * gaa
    cross = ad[:, None] + ad[None, :] - gad - gad.T
    sq_d = (nd[:, None] + nd[None, :] - 2.0 * gdd).clamp_min(0.0)
    # Parallel lines (sq_d = 0) keep a constant distance: any t, take 0.
    t_star = torch.where(sq_d > 0, -cross / torch.where(sq_d > 0, sq_d, 1.0), 0.0).clamp(0.0, 1.0)
    dist2 = (sq_a + 2.0 * t_star * cross + t_star.square() * sq_d).clamp_min(0.0)
    dist2.fill_diagonal_(math.inf)
    return dist2.min(dim=1).values.sqrt().to(x0.dtype)


# -- losses and gradient variance -----------------------------------------------------
def _residual(velocity_fn: VelocityFn, x0: torch.Tensor, x1: torch.Tensor, t: float | torch.Tensor,
              sigma: float, noise: torch.Tensor | None) -> torch.Tensor:
    """v(x_t, t) - (x1 - x0) per pair, flattened to (N, D)."""
    check_callable(velocity_fn, "velocity_fn")
    x0, x1 = _check_pairs(x0, x1)
    xt = interpolant(x0, x1, t, sigma, noise)
    tt = time_per_row(t, x0)
    v = velocity_fn(xt, tt)
    if v.shape != x0.shape:
        raise ValueError(f"velocity_fn returned shape {tuple(v.shape)}, expected {tuple(x0.shape)}")
    return (v - conditional_velocity(x0, x1, sigma_min=0.0)).reshape(x0.shape[0], -1)


def pair_loss(velocity_fn: VelocityFn, x0: torch.Tensor, x1: torch.Tensor, t: float | torch.Tensor,
              sigma: float = 0.0, noise: torch.Tensor | None = None) -> float:
    r"""The rectified-flow loss on given pairs.

    .. math:: L = \frac{1}{N} \sum_i \big\lVert v(x_t^{(i)}, t_i) - (x_1^{(i)} - x_0^{(i)}) \big\rVert^2,
        \qquad x_t^{(i)} = (1 - t_i)\, x_0^{(i)} + t_i\, x_1^{(i)} + \sigma \varepsilon_i

    x_t^i is the interpolant of pair i at its time t_i with ``noise_i`` as eps_i.
    ``velocity_fn(x, t)`` receives t as an (N,) tensor. Shapes: x0, x1 and noise (N, *S); t a
    number, 0-d or (N,); returns a float. Chapter 8.
    """
    with torch.no_grad():
        r = _residual(velocity_fn, x0, x1, t, check_nonnegative_real(sigma, "sigma"), noise)
    return float(r.to(WIDE).square().sum(dim=1).mean())


def prediction_gradient_variance(velocity_fn: VelocityFn, x0: torch.Tensor, x1: torch.Tensor,
                                 t: float | torch.Tensor, sigma: float = 0.0,
                                 noise: torch.Tensor | None = None) -> float:
    r"""Total variance over pairs of the loss gradient with respect to the prediction.

    .. math:: g_i = \frac{\partial}{\partial v} \lVert v - d_i \rVert^2 = 2\big(v(x_t^{(i)}, t_i) - d_i\big),
        \qquad \operatorname{tr}\operatorname{Cov}[g] = \frac{1}{N - 1} \sum_i \lVert g_i - \bar g \rVert^2,
        \quad \bar g = \frac{1}{N} \sum_j g_j

    for N >= 2, in float64. It is 0 exactly when every residual is the same vector, e.g. when
    the field reproduces every pair (the deterministic regime at its memorising optimum); for
    an affine field on its own pairs under the noisy interpolant its expectation is
    4 sigma^2 ||K_t||_F^2 with K_t = dv/dx (chapter 8, eq. (noisy-variance)). Shapes: x0, x1
    and noise (N, *S); t a number, 0-d or (N,). Chapter 8.
    """
    with torch.no_grad():
        g = 2.0 * _residual(velocity_fn, x0, x1, t, check_nonnegative_real(sigma, "sigma"), noise).to(WIDE)
    if g.shape[0] < 2:
        raise ValueError("the variance needs at least 2 pairs")
    return float((g - g.mean(dim=0)).square().sum() / (g.shape[0] - 1))


def parameter_gradient_variance(model: nn.Module, x0: torch.Tensor, x1: torch.Tensor,
                                t: float | torch.Tensor, sigma: float = 0.0,
                                noise: torch.Tensor | None = None) -> float:
    r"""Total variance over pairs of the per-sample loss gradient with respect to the parameters.

    .. math:: G_i = \nabla_\vartheta \big\lVert v_\vartheta(x_t^{(i)}, t_i) - d_i \big\rVert^2, \qquad
        \operatorname{tr}\operatorname{Cov}[G] = \frac{1}{N - 1} \sum_i \lVert G_i - \bar G \rVert^2

    one vector of all trainable parameters per pair, computed with ``torch.func.vmap`` over
    ``torch.func.grad``: the trace of the covariance of the stochastic gradient of a batch of
    one. ``model(x, t)`` takes x (B, *S) and t (B,). Shapes: x0, x1 and noise (N, *S), N >= 2;
    t a number, 0-d or (N,); returns a float. Chapter 8.
    """
    check_instance(model, "model", nn.Module, "a torch.nn.Module")
    x0, x1 = _check_pairs(x0, x1)
    sigma = check_nonnegative_real(sigma, "sigma")
    if x0.shape[0] < 2:
        raise ValueError("the variance needs at least 2 pairs")
    xt = interpolant(x0, x1, t, sigma, noise)
    tt = time_per_row(t, x0)
    target = conditional_velocity(x0, x1, sigma_min=0.0)
    params = {k: p.detach() for k, p in model.named_parameters() if p.requires_grad}
    buffers = {k: b.detach() for k, b in model.named_buffers()}

    def loss(p: dict[str, torch.Tensor], x: torch.Tensor, s: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        out = torch.func.functional_call(model, (p, buffers), (x[None], s[None]))
        return (out[0] - y).square().sum()

    grads = torch.func.vmap(torch.func.grad(loss), in_dims=(None, 0, 0, 0))(params, xt, tt, target)
    flat = torch.cat([g.reshape(x0.shape[0], -1).to(WIDE) for g in grads.values()], dim=1)
    return float((flat - flat.mean(dim=0)).square().sum() / (flat.shape[0] - 1))
