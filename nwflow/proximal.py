r"""OT conditional flow matching in proximal form: semi-discrete OT to a finite data set.

Book: Part II, chapter 7 (``book/part2_papers/07_proximal_ot_cfm``), after Fukumizu, Huang,
Bao, Xu and Chandramoorthy, "Flow Matching from Viewpoint of Proximal Operators"
(arXiv 2602.12683).

Source x0 ~ N(0, I_D); target the discrete measure sum_j b_j delta_{x^(j)} (uniform b by
default). The optimal (Brenier) map is T = grad phi with the piecewise-linear convex potential

.. math::

    \varphi(x_0) = \max_j \big(\langle x_0, x^{(j)}\rangle - g_j\big), \qquad
    T(x_0) = x^{(j)} \text{ on } L_j

where the dual weights g make every Laguerre cell L_j = {x0 : j attains the max} carry mass
b_j (:func:`semidiscrete_dual`). Its convex conjugate, the extended Brenier potential, is
finite only on the convex hull of the data:

.. math::

    \psi(y) = \varphi^*(y) = \min\Big\{\sum_j \lambda_j g_j : \lambda \in \Delta_n, \quad
    \sum_j \lambda_j x^{(j)} = y\Big\}.

OT-CFM moves x0 in a straight line, x_t = (1 - t) x0 + t T(x0). With h(t) = (1 - t) / t (the
bandwidth of the kernel smoother at sigma_min = 0) the end point of the trajectory through x
is a proximal operator and the velocity follows:

.. math::

    x_1(x, t) = \operatorname{prox}_{h\psi}(x/t), \qquad
    v(x, t) = \frac{\operatorname{prox}_{h\psi}(x/t) - x}{1 - t}.

prox_{h psi}(z) = sum_j lambda_j x^(j) with lambda the solution of the simplex QP

.. math::

    \min_{\lambda \in \Delta_n}\, \sum_j \lambda_j g_j
    + \frac{1}{2h}\Big\lVert \sum_j \lambda_j x^{(j)} - z \Big\rVert^2,

whose dual is the D-dimensional problem min_u phi(u) + (h / 2) ||u - z / h||^2 (Moreau:
prox_{h psi}(z) + h prox_{phi / h}(z / h) = z; the optimal u is the trajectory's origin x0).
It is solved here by Newton's method on the log-sum-exp smoothed dual, phi_eps(u) =
eps log sum_j exp((<u, x^(j)> - g_j) / eps), followed down eps -> 0 and finished by an exact
active-set (KKT) solve; the duality gap certifies the result (see :func:`prox_conjugate`).
With eps > 0 kept, the same code returns the prox of psi_eps = (phi_eps)*, a soft average
of the data points.

Everything is computed in float64 and returned in the input dtype. The D x D Newton systems
make this a tool for low-dimensional geometry (D of a few tens at most).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nwflow._checks import (
    check_float_tensor,
    check_nonnegative_real,
    check_per_row,
    check_points,
    check_positive_int,
    check_positive_real,
    check_same_device,
)
from nwflow._precision import WIDE
from nwflow._stream import softmax_mean
from nwflow.path import time_per_row

__all__ = [
    "SemiDiscreteDual",
    "standard_normal_qmc",
    "laguerre_index",
    "laguerre_masses",
    "brenier_potential",
    "brenier_map",
    "semidiscrete_dual",
    "conjugate_potential",
    "prox_conjugate",
    "proximal_target",
    "proximal_velocity",
]


# -- input handling -------------------------------------------------------------------
def _weights_g(g: object, support: torch.Tensor) -> torch.Tensor:
    g = check_float_tensor(g, "g")
    if g.shape != (support.shape[0],):
        raise ValueError(f"g must have shape ({support.shape[0]},) (one weight per support point), "
                         f"got {tuple(g.shape)}")
    check_same_device(support, g, "support", "g")
    return g.to(WIDE)


def _points(x: object, support: torch.Tensor, name: str) -> torch.Tensor:
    """Query points (B, D) in the support's dimension and on its device."""
    x = check_points(x, name, dim=support.shape[1], min_rows=0)
    check_same_device(support, x, "support", name)
    return x


def _scores(x0: torch.Tensor, X: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """a_j(x0) = <x0, x^(j)> - g_j, (B, n), float64."""
    return x0.to(WIDE) @ X.T - g


# -- the Brenier potential and its cells ------------------------------------------------
def standard_normal_qmc(n: int, d: int, seed: int = 0, dtype: torch.dtype = WIDE) -> torch.Tensor:
    r"""n quasi-Monte Carlo points of N(0, I_d): a scrambled Sobol sequence mapped by the inverse CDF.

    .. math:: x_{ik} = \sqrt{2}\, \operatorname{erf}^{-1}(2 u_{ik} - 1),
        \qquad u_i \in (0, 1)^d \text{ (Sobol)}

    coordinate-wise; the uniforms are kept inside (0, 1) so no point is infinite. Cell masses
    estimated with them converge faster than with i.i.d. draws (the integrands are indicators
    of convex cells). Shapes: returns (n, d) in ``dtype``. Chapter 7.
    """
    n = check_positive_int(n, "n")
    d = check_positive_int(d, "d")
    engine = torch.quasirandom.SobolEngine(d, scramble=True, seed=seed)
    u = engine.draw(n, dtype=WIDE).clamp(1e-12, 1.0 - 1e-12)
    return (math.sqrt(2.0) * torch.erfinv(2.0 * u - 1.0)).to(dtype)


def laguerre_index(x0: torch.Tensor, support: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    r"""The Laguerre (power) cell of each source point.

    .. math:: j^\star(x_0) = \mathop{\mathrm{arg\,max}}_j \big(\langle x_0, x^{(j)}\rangle - g_j\big),
        \qquad L_j = \{x_0 : j \text{ attains the max}\}

    With g_j = ||x^(j)||^2 / 2 the cells are the Voronoi cells of the data. Shapes: x0 (B, D),
    support (n, D), g (n,); returns (B,) int64. Chapter 7, eq. (brenier-discrete).
    """
    X = check_points(support, "support", rows="n")
    return _scores(_points(x0, X, "x0"), X.to(WIDE), _weights_g(g, X)).argmax(dim=1)


def laguerre_masses(x0: torch.Tensor, support: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    r"""Fraction of the sample ``x0`` in each Laguerre cell: a Monte Carlo estimate of mu(L_j).

    .. math:: \hat\mu(L_j) = \frac{1}{B} \sum_{i=1}^{B} \mathbf{1}\big[j^\star(x_0^{(i)}) = j\big]

    for x0 ~ mu, with j* of :func:`laguerre_index`. Shapes: x0 (B, D), support (n, D), g (n,);
    returns (n,) float64, summing to 1. Chapter 7.
    """
    idx = laguerre_index(x0, support, g)
    return torch.bincount(idx, minlength=support.shape[0]).to(WIDE) / idx.numel()


def brenier_potential(x0: torch.Tensor, support: torch.Tensor, g: torch.Tensor,
                      eps: float = 0.0) -> torch.Tensor:
    r"""The Brenier potential of the discrete target, or its log-sum-exp smoothing (eps > 0).

    .. math:: \varphi(x_0) = \max_j \big(\langle x_0, x^{(j)}\rangle - g_j\big), \qquad
        \varphi_\varepsilon(x_0) = \varepsilon \log \sum_j e^{(\langle x_0, x^{(j)}\rangle - g_j)/\varepsilon}

    phi_eps lies in [phi, phi + eps log n]. Shapes: x0 (B, D), support (n, D), g (n,).
    Returns (B,) in x0's dtype. Chapter 7, eqs. (brenier-discrete) and (nw-soft-brenier).
    """
    X = check_points(support, "support", rows="n")
    eps = check_nonnegative_real(eps, "eps")
    a = _scores(_points(x0, X, "x0"), X.to(WIDE), _weights_g(g, X))
    out = a.amax(dim=1) if eps == 0 else eps * torch.logsumexp(a / eps, dim=1)
    return out.to(x0.dtype)


def brenier_map(x0: torch.Tensor, support: torch.Tensor, g: torch.Tensor, eps: float = 0.0) -> torch.Tensor:
    r"""The Brenier (OT) map T = grad phi, or with eps > 0 the soft average grad phi_eps.

    .. math:: T(x_0) = \nabla\varphi(x_0) = x^{(j^\star(x_0))}, \qquad
        \nabla\varphi_\varepsilon(x_0) = \sum_j \operatorname{softmax}_j\Big(
        \frac{\langle x_0, x^{(j)}\rangle - g_j}{\varepsilon}\Big)\, x^{(j)}

    with j* of :func:`laguerre_index`. With g_j = ||x^(j)||^2 / 2 and eps = h^2 at x0 = x / t
    this soft average is the Nadaraya-Watson posterior mean of Part I. Shapes: x0 (B, D),
    support (n, D), g (n,); returns (B, D) in x0's dtype. Chapter 7, eqs. (brenier-discrete)
    and (nw-soft-brenier).
    """
    X = check_points(support, "support", rows="n")
    eps = check_nonnegative_real(eps, "eps")
    x0 = _points(x0, X, "x0")
    a = _scores(x0, X.to(WIDE), _weights_g(g, X))
    if eps == 0:
        return X[a.argmax(dim=1)].to(x0.dtype)
    return softmax_mean(a / eps, X.to(WIDE)).to(x0.dtype)


# -- semi-discrete OT: the dual weights ---------------------------------------------------
@dataclass(frozen=True)
class SemiDiscreteDual:
    r"""Result of :func:`semidiscrete_dual`: the dual weights and their measured accuracy.

    .. math:: e = \max_j \big\lvert \hat\mu(L_j) - b_j \big\rvert, \qquad
        s = \max_j \sqrt{b_j (1 - b_j) / n_{\rm check}}

    (``max_mass_error`` e and ``mc_std`` s, with the cell masses of :func:`laguerre_masses`).
    Shapes and fields, Chapter 7:

    - ``g``: (n,) dual weights (mean zero: g is defined up to a constant).
    - ``target``: (n,) the prescribed masses b.
    - ``masses``: (n,) Laguerre cell masses on an independent i.i.d. check sample.
    - ``max_mass_error``: max_j |masses_j - b_j| on the check sample.
    - ``mc_std``: the check sample's Monte Carlo standard error, max_j sqrt(b_j (1 - b_j) / n_check).
    - ``train_max_mass_error``: the same error on the quasi-Monte Carlo sample used to fit g.
    - ``n_samples``, ``n_check``, ``eps``, ``newton_steps``.
    """

    g: torch.Tensor
    target: torch.Tensor
    masses: torch.Tensor
    max_mass_error: float
    mc_std: float
    train_max_mass_error: float
    n_samples: int
    n_check: int
    eps: float
    newton_steps: int


def semidiscrete_dual(
    support: torch.Tensor,
    weights: torch.Tensor | None = None,
    n_samples: int = 2**16,
    n_check: int = 2**18,
    eps: float = 1e-3,
    seed: int = 0,
    max_newton: int = 200,
) -> SemiDiscreteDual:
    r"""Dual weights g of semi-discrete OT from N(0, I_D) to sum_j b_j delta_{x^(j)}.

    g minimises the convex dual

    .. math::

        K(g) = \mathbb{E}_{x_0}\Big[\max_j \big(\langle x_0, x^{(j)}\rangle - g_j\big)\Big]
        + \sum_j b_j g_j, \qquad \frac{\partial K}{\partial g_j} = b_j - \mu\big(L_j(g)\big),

    so at the optimum every Laguerre cell has mass b_j. The expectation is replaced by a
    scrambled-Sobol sample z_1..z_N of N = ``n_samples`` Gaussian points and the max by its
    log-sum-exp smoothing at temperature eps_k:

    .. math::

        K_\varepsilon(g) = \frac{\varepsilon}{N} \sum_i \log \sum_j
        e^{(\langle z_i, x^{(j)}\rangle - g_j)/\varepsilon} + \sum_j b_j g_j, \qquad
        \nabla^2 K_\varepsilon = \frac{1}{\varepsilon}\Big(\operatorname{diag}(\bar\pi)
        - \frac{1}{N} \pi^\top \pi\Big),

    with pi (N, n) the soft cell assignments pi_ij = softmax_j((<z_i, x^(j)> - g_j) / eps) and
    pi-bar their mean over i. Newton's method (with backtracking) is run for eps_k = s, s / 4,
    s / 16, ..., down to ``eps`` * s, where s is the spread (standard deviation) of
    <x0, x^(j)> - g_j.

    The achieved accuracy is measured, not assumed: the hard cell masses on an independent
    i.i.d. sample of ``n_check`` points (``max_mass_error``, with its Monte Carlo standard
    error ``mc_std``). Shapes: support (n, D); weights (n,) positive (uniform when None).
    Chapter 7.
    """
    X = check_points(support, "support", rows="n")
    n, d = X.shape
    n_samples = check_positive_int(n_samples, "n_samples")
    n_check = check_positive_int(n_check, "n_check")
    max_newton = check_positive_int(max_newton, "max_newton")
    eps = check_positive_real(eps, "eps")  # the final smoothing temperature (relative to the spread)
    if weights is None:
        b = torch.full((n,), 1.0 / n, dtype=WIDE, device=X.device)
    else:
        b = check_float_tensor(weights, "weights").to(device=X.device, dtype=WIDE)
        if b.shape != (n,) or bool((b <= 0).any()):
            raise ValueError(f"weights must be a positive ({n},) tensor")
        b = b / b.sum()
    Xf = X.to(WIDE)
    z = standard_normal_qmc(n_samples, d, seed=seed).to(X.device)
    S = z @ Xf.T                                    # (N, n) scores <x0_i, x^(j)>
    g = 0.5 * Xf.square().sum(dim=1)                # start from the Voronoi cells
    g = g - g.mean()
    spread = float((S - g).std())
    temps = []
    e = spread
    while e > eps * spread:
        temps.append(e)
        e *= 0.25
    temps.append(eps * spread)

    def dual(gv: torch.Tensor, temp: float) -> tuple[float, torch.Tensor]:
        """K_eps(g) and the soft cell assignments pi (N, n)."""
        A = (S - gv) / temp
        lse = torch.logsumexp(A, dim=1)
        return temp * float(lse.mean()) + float(b @ gv), A.sub_(lse[:, None]).exp_()

    steps = 0
    for temp in temps:
        k0, pi = dual(g, temp)
        for _ in range(max_newton):
            m = pi.mean(dim=0)
            grad = b - m
            if float(grad.abs().max()) < 1e-12:
                break
            hess = (torch.diag(m) - pi.T @ pi / n_samples) / temp
            # The dual is invariant under g -> g + c 1 (H 1 = 0, grad is orthogonal to 1): fix the gauge.
            hess = hess + torch.full_like(hess, float(torch.diagonal(hess).mean()) / n)
            step = -torch.linalg.solve(hess, grad)
            slope = float(grad @ step)
            alpha = 1.0
            while True:
                k1, pi1 = dual(g + alpha * step, temp)
                if k1 <= k0 + 0.25 * alpha * slope or alpha < 1e-10:
                    break
                alpha *= 0.5
            g, k0, pi = g + alpha * step, k1, pi1
            steps += 1
            if alpha * float(step.abs().max()) < 1e-13 * (1.0 + float(g.abs().max())):
                break
    g = g - g.mean()
    train_err = float((torch.bincount((S - g).argmax(dim=1), minlength=n).to(WIDE) / n_samples - b)
                      .abs().max())
    gen = torch.Generator(device="cpu").manual_seed(seed + 1)
    check = torch.randn(n_check, d, generator=gen, dtype=WIDE).to(X.device)
    masses = laguerre_masses(check, Xf, g)
    return SemiDiscreteDual(
        g=g.to(X.dtype), target=b, masses=masses,
        max_mass_error=float((masses - b).abs().max()),
        mc_std=float(torch.sqrt(b * (1 - b) / n_check).max()),
        train_max_mass_error=train_err, n_samples=n_samples, n_check=n_check, eps=eps,
        newton_steps=steps,
    )


# -- the conjugate (extended Brenier potential) -------------------------------------------
def conjugate_potential(y: torch.Tensor, support: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    r"""The extended Brenier potential psi = phi*, the convex conjugate of :func:`brenier_potential`.

    .. math:: \psi(y) = \varphi^*(y) = \min\Big\{ \sum_j \lambda_j g_j :
        \lambda \in \Delta_n,\ \sum_j \lambda_j x^{(j)} = y \Big\}

    The lower convex envelope of the points (x^(j), g_j) over the convex hull of the data,
    +inf outside it: the extended Brenier potential. One small linear program per row
    (scipy's HiGHS). Shapes: y (B, D) -> (B,), float64. Chapter 7.
    """
    import numpy as np
    from scipy.optimize import linprog

    X = check_points(support, "support", rows="n")
    gv = _weights_g(g, X).cpu().numpy()
    y = _points(y, X, "y")
    A_eq = np.vstack([X.to(WIDE).cpu().numpy().T, np.ones((1, X.shape[0]))])
    out = np.empty(y.shape[0])
    for i, row in enumerate(y.to(WIDE).cpu().numpy()):
        res = linprog(gv, A_eq=A_eq, b_eq=np.append(row, 1.0), bounds=(0, None), method="highs")
        if res.status == 2:         # infeasible: y is outside the convex hull
            out[i] = math.inf
        elif res.status == 0:
            out[i] = res.fun
        else:
            raise RuntimeError(f"conjugate_potential: the linear program for row {i} failed: {res.message}")
    return torch.from_numpy(out).to(X.device)


# -- the prox ---------------------------------------------------------------------------
def _newton_dual(w: torch.Tensor, c: torch.Tensor, X: torch.Tensor, g: torch.Tensor, u: torch.Tensor,
                 eps: torch.Tensor, eps_final: torch.Tensor, shrink: float = 0.1, max_iter: int = 100
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """Minimise F(u) = phi_eps(u) + (c / 2) ||u - w||^2 row by row from the start ``u``,
    following eps from ``eps`` down to ``eps_final`` (per row, geometric steps of ``shrink``).
    Returns (u (B, D), soft weights pi (B, n) at eps_final).

    grad F = sum_j pi_j x^(j) + c (u - w); Hess F = c I + Cov_pi(x^(j)) / eps: strongly convex,
    so damped Newton converges from anywhere; the continuation keeps every stage's start
    close to its solution.
    """
    B, D = w.shape
    eye = torch.eye(D, dtype=WIDE, device=w.device)
    u = u.clone()
    eps = torch.maximum(eps, eps_final)

    def objective(uu: torch.Tensor, ww: torch.Tensor, cc: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        return e * torch.logsumexp((uu @ X.T - g) / e[:, None], dim=1) + 0.5 * cc * (uu - ww).square().sum(1)

    while True:
        # intermediate stages only need a start inside the next stage's quadratic region
        final = bool((eps <= eps_final).all())
        active = torch.ones(B, dtype=torch.bool, device=w.device)
        for _ in range(max_iter):
            ua, wa, ca, ea = u[active], w[active], c[active], eps[active]
            # The weights pi themselves enter the Hessian (Cov_pi), so they are formed here
            # rather than only their mean through softmax_mean.
            pi = torch.softmax((ua @ X.T - g) / ea[:, None], dim=1)
            y = pi @ X
            grad = y + ca[:, None] * (ua - wa)
            cov = (pi[:, None, :] * X.T) @ X - y[:, :, None] * y[:, None, :]
            hess = ca[:, None, None] * eye + cov / ea[:, None, None]
            step = -torch.linalg.solve(hess, grad[:, :, None])[:, :, 0]
            dec2 = -(grad * step).sum(dim=1)                  # Newton decrement squared
            f0 = objective(ua, wa, ca, ea)
            # Armijo backtracking, row by row; the slack absorbs rounding in F
            slack = 1e-14 * (1.0 + f0.abs())
            alpha = torch.ones_like(ca)
            todo = torch.ones_like(ca, dtype=torch.bool)
            for _ in range(60):
                r = todo.nonzero()[:, 0]
                f1 = objective(ua[r] + alpha[r, None] * step[r], wa[r], ca[r], ea[r])
                bad = f1 > f0[r] - 0.25 * alpha[r] * dec2[r] + slack[r]
                todo[r[~bad]] = False
                if not bool(bad.any()):
                    break
                alpha[r[bad]] *= 0.5
            u[active] = ua + alpha[:, None] * step
            if final:   # to the rounding level of u: Newton converges quadratically here
                done = step.norm(dim=1) <= 1e-13 * (1.0 + ua.norm(dim=1))
            else:
                done = dec2 <= 1e-6 * ea + slack
            idx = active.nonzero()[:, 0]
            active[idx[done]] = False
            if not bool(active.any()):
                break
        if final:
            break
        eps = torch.maximum(eps * shrink, eps_final)
    return u, torch.softmax((u @ X.T - g) / eps[:, None], dim=1)


def _polish(w: torch.Tensor, c: torch.Tensor, X: torch.Tensor, g: torch.Tensor,
            pi: torch.Tensor, tau: float) -> torch.Tensor:
    """Exact active-set solve from near-optimal soft weights pi; returns lambda (B, n).

    Candidates: the (at most D + 1) largest weights, down to ``tau`` times the largest. On them the
    KKT conditions are linear: with y = sum_A lambda_j x^(j) and u = w - y / c,
    a_j(u) = <u, x^(j)> - g_j = s for j in A and sum_A lambda_j = 1. Rows whose system is
    singular get NaN; the caller certifies every row by its duality gap.
    """
    B, D = w.shape
    n = X.shape[0]
    k = min(n, D + 1)
    top, idx = pi.topk(k, dim=1)
    mask = (top >= tau * top[:, :1]).to(WIDE)                   # (B, k)
    XA = X[idx]                                                   # (B, k, D)
    gram = XA @ XA.transpose(1, 2) / c[:, None, None]
    M = torch.zeros(B, k + 1, k + 1, dtype=WIDE, device=w.device)
    M[:, :k, :k] = mask[:, :, None] * mask[:, None, :] * gram + torch.diag_embed(1.0 - mask)
    M[:, :k, k] = mask
    M[:, k, :k] = mask
    rhs = torch.zeros(B, k + 1, dtype=WIDE, device=w.device)
    rhs[:, :k] = mask * ((XA @ w[:, :, None])[:, :, 0] - g[idx])
    rhs[:, k] = 1.0
    sol, info = torch.linalg.solve_ex(M, rhs[:, :, None])
    lam_top = sol[:, :k, 0] * mask
    lam_top[info != 0] = math.nan
    return torch.zeros(B, n, dtype=WIDE, device=w.device).scatter(1, idx, lam_top)


def _gap(w: torch.Tensor, c: torch.Tensor, X: torch.Tensor, g: torch.Tensor,
         lam: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Duality gap of a primal point lambda and the dual point u = w - y / c it induces.

    gap = max_j a_j(u) - sum_j lambda_j a_j(u) = sum_j lambda_j (max a - a_j) >= 0 (zero iff
    lambda lives on the maximisers), and ||y - y*||^2 <= 2 h gap since the primal is
    1/h-strongly convex in y (h = c). Returns (gap (B,), the scale (B,) whose 1e-16 is the
    rounding level of the scores: max_j ||x^(j)|| (||w|| + ||y|| / c) + max_j |g_j|).
    """
    y = lam @ X
    u = w - y / c[:, None]
    a = u @ X.T - g
    scale = X.norm(dim=1).max() * (w.norm(dim=1) + y.norm(dim=1) / c) + g.abs().max()
    return (lam * (a.amax(dim=1, keepdim=True) - a)).sum(dim=1), scale


def _vertex_weights(X: torch.Tensor, g: torch.Tensor, y: torch.Tensor, pi: torch.Tensor) -> torch.Tensor:
    """Weights lambda >= 0 on the atoms that carry soft weight, with X^T lambda = y and
    minimal <g, lambda>: a vertex of that polytope, so at most D + 1 atoms (one small LP per
    row, scipy's HiGHS). NaN rows where the LP fails. For the rare degenerate rows where more
    than D + 1 atoms tie at the optimum (e.g. a regular polygon with equal dual weights)."""
    import numpy as np
    from scipy.optimize import linprog

    out = torch.full_like(pi, math.nan)
    Xn, gn = X.cpu().numpy(), g.cpu().numpy()
    for i in range(pi.shape[0]):
        S = (pi[i] >= 1e-12 * pi[i].max()).nonzero()[:, 0].cpu().numpy()
        A_eq = np.vstack([Xn[S].T, np.ones((1, len(S)))])
        res = linprog(gn[S], A_eq=A_eq, b_eq=np.append(y[i].cpu().numpy(), 1.0), bounds=(0, None),
                      method="highs")
        if res.status == 0:
            row = torch.zeros(pi.shape[1], dtype=WIDE)
            row[torch.from_numpy(S)] = torch.from_numpy(res.x)
            out[i] = row.to(pi.device)
    return out


# Stages of the eps -> 0 continuation (relative to each row's score spread): after each,
# the active-set solve is tried and the rows it certifies leave.
_STAGES = (1e-3, 1e-6, 1e-9, 1e-13)
_CUTOFFS = (1e-2, 1e-5, 1e-10)
_EXACT = 1e-12       # a row leaves the continuation once its gap is below this times its scale
_ACCEPT = 1e-6       # error bound accepted at the end, relative to 1 + max ||x^(j)|| + ||z||


def _prox_dual_form(w: torch.Tensor, c: torch.Tensor, X: torch.Tensor, g: torch.Tensor,
                    eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """prox_{c psi_eps}(c w) for rows (w, c): returns (y (B, D), lambda (B, n), error bound (B,))."""
    B = w.shape[0]
    u = w - X.mean(dim=0) / c[:, None]             # the prox of h psi for h -> infinity
    a0 = u @ X.T - g
    spread = a0.amax(dim=1) - a0.amin(dim=1) + a0.abs().amax(dim=1) + 1e-300
    if eps > 0:
        target = torch.full((B,), eps, dtype=WIDE, device=w.device)
        _, pi = _newton_dual(w, c, X, g, u, spread, target)
        return pi @ X, pi, torch.zeros(B, dtype=WIDE, device=w.device)
    lam = torch.full((B, X.shape[0]), math.nan, dtype=WIDE, device=w.device)
    gap = torch.full((B,), math.inf, dtype=WIDE, device=w.device)
    rows = torch.arange(B, device=w.device)
    start = spread
    for stage in _STAGES:
        wr, cr = w[rows], c[rows]
        u_r, pi = _newton_dual(wr, cr, X, g, u[rows], start[rows], stage * spread[rows])
        u[rows] = u_r
        # the soft weights themselves, then active sets read off them at several cut-offs:
        # keep whichever primal point certifies best
        cand = pi
        gap_c, level = _gap(wr, cr, X, g, pi)
        for tau in _CUTOFFS:
            lam_t = _polish(wr, cr, X, g, pi, tau)
            ok = torch.isfinite(lam_t).all(dim=1) & (lam_t >= -1e-9).all(dim=1)
            lam_t = torch.where(ok[:, None], lam_t.clamp_min(0.0), pi)
            lam_t = lam_t / lam_t.sum(dim=1, keepdim=True)
            gap_t, level_t = _gap(wr, cr, X, g, lam_t)
            better = gap_t < gap_c
            cand = torch.where(better[:, None], lam_t, cand)
            gap_c = torch.where(better, gap_t, gap_c)
            level = torch.where(better, level_t, level)
        lam[rows], gap[rows] = cand, gap_c
        certified = gap_c <= _EXACT * level
        start = torch.zeros_like(spread)
        start[rows] = stage * spread[rows]
        rows = rows[~certified]
        if rows.numel() == 0:
            break
    if rows.numel():
        # degenerate rows: a vertex representation of the dual's y = z - h u on the atoms that
        # carry weight (at most D + 1 of them), then the exact KKT solve on its support
        wr, cr = w[rows], c[rows]
        u_r, pi = _newton_dual(wr, cr, X, g, u[rows], start[rows], _STAGES[-1] * spread[rows])
        red = _vertex_weights(X, g, cr[:, None] * (wr - u_r), pi)
        red = torch.where(torch.isfinite(red), red, pi)
        cand = _polish(wr, cr, X, g, red, 1e-300)
        ok = torch.isfinite(cand).all(dim=1) & (cand >= -1e-9).all(dim=1)
        cand = torch.where(ok[:, None], cand.clamp_min(0.0), pi)
        cand = cand / cand.sum(dim=1, keepdim=True)
        gap_c, _ = _gap(wr, cr, X, g, cand)
        better = gap_c < gap[rows]
        lam[rows[better]], gap[rows[better]] = cand[better], gap_c[better]
    bound = torch.sqrt(2.0 * c * gap.clamp_min(0.0))
    tol = _ACCEPT * (1.0 + X.norm(dim=1).max() + c * w.norm(dim=1))
    if not bool((bound <= tol).all()):
        worst = int((bound / tol).argmax())
        raise RuntimeError(f"prox_conjugate: could not certify row {worst} "
                           f"(duality gap {float(gap[worst]):.3e}, error bound {float(bound[worst]):.3e})")
    return lam @ X, lam, bound


def prox_conjugate(z: torch.Tensor, h: float | torch.Tensor, support: torch.Tensor, g: torch.Tensor,
                   eps: float = 0.0, return_info: bool = False):
    r"""The proximal map of h psi, psi = phi* (:func:`conjugate_potential`).

    .. math::

        \operatorname{prox}_{h\psi}(z) = \mathop{\mathrm{arg\,min}}_y\, \psi(y)
        + \frac{\lVert y - z\rVert^2}{2h} = \sum_j \lambda_j x^{(j)}, \qquad
        \lambda = \mathop{\mathrm{arg\,min}}_{\lambda \in \Delta_n} \sum_j \lambda_j g_j
        + \frac{1}{2h} \Big\lVert \sum_j \lambda_j x^{(j)} - z \Big\rVert^2

    Computed through its dual (Moreau) and certified by the duality gap, with
    a_j(u) = <u, x^(j)> - g_j:

    .. math::

        \operatorname{prox}_{h\psi}(z) = z - h u, \quad
        u = \operatorname{prox}_{\varphi/h}(z/h); \qquad
        \mathrm{gap} = \max_j a_j(u) - \sum_j \lambda_j a_j(u), \quad
        \lVert y - y^\star \rVert \le \sqrt{2h\, \mathrm{gap}}

    The dual is solved by Newton on the smoothed dual with eps -> 0, then an exact active-set
    (KKT) solve on the atoms that carry weight; rows where more than D + 1 atoms tie
    (degenerate) get a vertex representation from a small LP first. The bound is typically
    1e-7 or less (the gap itself is at rounding level); a row whose bound exceeds
    1e-6 (1 + max_j ||x^(j)|| + ||z||) raises RuntimeError.

    With ``eps`` > 0: the prox of h psi_eps, psi_eps = (phi_eps)*, which is the soft average
    sum_j softmax_j(a_j(u) / eps) x^(j) at the smoothed dual point u; eps -> 0 recovers eps = 0.

    Shapes: z (B, D); h a positive number or (B,) tensor; support (n, D); g (n,).
    Returns y (B, D) in z's dtype, or with ``return_info`` (y, info) where info holds
    ``weights`` lambda (B, n) and ``error_bound`` (B,) (zeros when eps > 0). Chapter 7,
    eq. (simplex-qp).
    """
    X = check_points(support, "support", rows="n")
    z = _points(z, X, "z")
    gv = _weights_g(g, X)
    eps = check_nonnegative_real(eps, "eps")
    hv = check_per_row(h, z.shape[0], WIDE, z.device, "h")
    if hv.numel() and not bool((hv > 0).all()):
        raise ValueError(f"h must be positive, got values down to {float(hv.min())}")
    Xf = X.to(WIDE)
    y, lam, bound = _prox_dual_form(z.to(WIDE) / hv[:, None], hv, Xf, gv, eps)
    y = y.to(z.dtype)
    return (y, {"weights": lam, "error_bound": bound}) if return_info else y


def _flow_time(t: float | torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    # The path's t, except that t = 1 is refused for every sigma_min: the proximal form
    # divides by 1 - t.
    tt = time_per_row(t, x, dtype=WIDE)
    if tt.numel() and bool((tt >= 1).any()):
        raise ValueError("t must be in [0, 1) (the proximal form divides by 1 - t; the flow ends "
                         f"at t = 1), got values up to {float(tt.max())}")
    return tt


def proximal_target(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor, g: torch.Tensor,
                    eps: float = 0.0) -> torch.Tensor:
    r"""The end point of the OT trajectory through x at time t.

    .. math:: x_1(x, t) = \operatorname{prox}_{h(t)\psi}(x/t), \qquad h(t) = \frac{1 - t}{t}

    On the support of p_t it is the data point T(x0) of the trajectory's origin; elsewhere it
    lies on a face of the data's convex hull. Computed as the dual problem in the trajectory
    origin u (x0 on the path), which stays well scaled as t -> 0:

    .. math:: u = \mathop{\mathrm{arg\,min}}_u\, \varphi(u)
        + \frac{\lVert (1 - t) u - x \rVert^2}{2t(1 - t)}, \qquad x_1 = \frac{x - (1 - t) u}{t};

    at t = 0 it is the Brenier map, x1 = T(x) (smoothed when eps > 0). Shapes: x (B, D);
    t in [0, 1) a number, 0-d or (B,); support (n, D); g (n,); returns (B, D) in x's dtype.
    Chapter 7, eq. (prox-target).
    """
    X = check_points(support, "support", rows="n")
    x = _points(x, X, "x")
    gv = _weights_g(g, X)
    eps = check_nonnegative_real(eps, "eps")
    tt = _flow_time(t, x)
    Xf, xf = X.to(WIDE), x.to(WIDE)
    out = torch.empty_like(xf)
    start = tt == 0
    if bool(start.any()):
        out[start] = brenier_map(xf[start], Xf, gv, eps)
    rest = ~start
    if bool(rest.any()):
        tr = tt[rest]
        # prox_{h psi}(z) with z = x / t: the dual variable is w = z / h = x / (1 - t), c = h.
        out[rest], _, _ = _prox_dual_form(xf[rest] / (1.0 - tr)[:, None], (1.0 - tr) / tr, Xf, gv, eps)
    return out.to(x.dtype)


def proximal_velocity(x: torch.Tensor, t: float | torch.Tensor, support: torch.Tensor, g: torch.Tensor,
                      eps: float = 0.0) -> torch.Tensor:
    r"""The OT-CFM field in proximal form.

    .. math:: v(x, t) = \frac{\operatorname{prox}_{h(t)\psi}(x/t) - x}{1 - t}, \qquad
        h(t) = \frac{1 - t}{t}

    On the path x = (1 - t) x0 + t T(x0) it equals T(x0) - x0 (at t = 0: T(x) - x). With
    eps > 0 the field of the log-sum-exp smoothed potential. Shapes: x (B, D) -> (B, D);
    t in [0, 1) a number, 0-d or (B,); support (n, D); g (n,). Chapter 7, eq. (prox-field).
    """
    x1 = proximal_target(x, t, support, g, eps)
    tt = _flow_time(t, x)
    return ((x1.to(WIDE) - x.to(WIDE)) / (1.0 - tt)[:, None]).to(x.dtype)
