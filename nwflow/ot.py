r"""Minibatch optimal-transport couplings and OT conditional flow matching (OT-CFM).

Book: Part II, chapter 7 (``book/part2_papers/07_proximal_ot_cfm``).

OT-CFM (Tong et al. 2024; Pooladian et al. 2023) pairs a minibatch of noise x0 with a
minibatch of data x1 by the optimal transport plan for the squared Euclidean cost (eq. (OT)),

.. math::

    P^\star = \arg\min_{P \in U(a, b)} \sum_{ij} P_{ij} \|x_0^i - x_1^j\|^2, \qquad
    U(a, b) = \{P \ge 0 : P \mathbf{1} = a,\ P^\top \mathbf{1} = b\},

computed exactly by POT's network simplex (``ot.emd``) or, as an option, with entropic
regularisation (``ot.sinkhorn``, stabilised). Pairs drawn from P* are trained on the path
x_t = sigma_t x0 + t x1 with the conditional target x1 - (1 - sigma_min) x0
(:mod:`nwflow.path`). The field such a set of pairs defines (a Nadaraya-Watson smoother
over the moving centres (1 - t) x0_i + t x1_i) is :func:`nwflow.rectified.pair_velocity`.
As the batch grows, the pairs approach the population OT coupling, whose field is the
proximal one of :mod:`nwflow.proximal`.

Minibatches of a finite data set repeat points: :func:`ot_pairs` solves the problem against
the distinct points with their multiplicities (the same optimum, a much smaller LP: a
minibatch of 4096 against 32 distinct points is a 4096 x 32 problem, not 4096 x 4096).
POT's warnings are turned into errors here, so nothing reaches stderr.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import torch

from nwflow._checks import (
    check_choice,
    check_float_tensor,
    check_points,
    check_positive_int,
    check_positive_real,
    check_same_device,
)
from nwflow._precision import WIDE

__all__ = ["squared_distances", "ot_plan", "ot_pairs"]

METHODS = ("exact", "sinkhorn")


def _pair_shapes(x0: torch.Tensor, x1: torch.Tensor) -> None:
    if x0.shape[1] != x1.shape[1]:
        raise ValueError(f"x0 and x1 must have the same dimension D, got {x0.shape[1]} and {x1.shape[1]}")
    check_same_device(x0, x1, "x0", "x1")


def _marginal(m: object, size: int, name: str) -> np.ndarray:
    if m is None:
        return np.full(size, 1.0 / size)
    m = check_float_tensor(m, name)
    if m.shape != (size,) or bool((m < 0).any()) or float(m.sum()) <= 0:
        raise ValueError(f"{name} must be a non-negative ({size},) tensor with a positive sum")
    arr = m.detach().to(torch.float64).cpu().numpy()
    return arr / arr.sum()


def squared_distances(x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
    r"""Cost matrix in float64, (B0, B1) for ``x0`` (B0, D) and ``x1`` (B1, D), never negative.

    .. math:: C_{ij} = \|x_0^i - x_1^j\|^2 = \|x_0^i\|^2 + \|x_1^j\|^2 - 2 \langle x_0^i, x_1^j \rangle

    Formed by the right-hand side (no (B0, B1, D) block) and clamped at 0. Chapter 7.
    """
    a = check_points(x0, "x0").to(WIDE)
    b = check_points(x1, "x1").to(WIDE)
    _pair_shapes(a, b)
    c = a.square().sum(1)[:, None] + b.square().sum(1)[None, :] - 2.0 * a @ b.T
    return c.clamp_min_(0.0)


def ot_plan(x0: torch.Tensor, x1: torch.Tensor, a: torch.Tensor | None = None, b: torch.Tensor | None = None,
            method: str = "exact", reg: float = 0.05, max_iter: int | None = None,
            tol: float = 1e-7) -> torch.Tensor:
    r"""The OT plan P (B0, B1) between sum_i a_i delta_{x0_i} and sum_j b_j delta_{x1_j}, eq. (OT).

    .. math:: P^\star = \arg\min_{P \in U(a, b)} \langle P, C \rangle, \qquad
        P_\varepsilon = \arg\min_{P \in U(a, b)}
        \Big\langle P, \frac{C}{\bar C} \Big\rangle - \varepsilon H(P)

    with C the cost of :func:`squared_distances`, C-bar its mean, epsilon = ``reg`` and
    H(P) = -sum_ij P_ij log P_ij (POT's entropy). Shapes: ``x0`` (B0, D), ``x1`` (B1, D),
    ``a`` (B0,), ``b`` (B1,).

    - ``method="exact"``: network simplex (``ot.emd``); the plan is a vertex of U(a, b), so
      for uniform a, b of equal size it is a permutation matrix / B.
    - ``method="sinkhorn"``: the entropic plan argmin <P, C> - reg H(P) with the cost C
      divided by its mean (so ``reg`` is dimensionless); stabilised (log-absorbing) iterations.
    - ``a``, ``b``: non-negative weights (normalised here); uniform when None.
    - ``max_iter``: solver iterations; None means 10^6 (exact) or 10^5 (Sinkhorn).
    - ``tol``: Sinkhorn stops when the marginal violation (POT's ``err``) is below it.
      Small ``reg`` converges slowly: about 1/reg times more iterations.

    Raises RuntimeError if the solver reports that it did not converge. Returns a float64
    tensor on x0's device whose rows sum to a and columns to b. Chapter 7.
    """
    import ot

    C = squared_distances(x0, x1)
    check_choice(method, "method", METHODS)
    if max_iter is None:
        max_iter = 1_000_000 if method == "exact" else 100_000
    max_iter = check_positive_int(max_iter, "max_iter")
    wa = _marginal(a, C.shape[0], "a")
    wb = _marginal(b, C.shape[1], "b")
    M = C.cpu().numpy()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")       # convergence is checked below instead
        if method == "exact":
            P, log = ot.emd(wa, wb, M, numItermax=int(max_iter), log=True)
            if log.get("result_code", 1) != 1:
                raise RuntimeError(f"ot.emd did not reach an optimum: {log.get('warning')}")
        else:
            reg = check_positive_real(reg, "reg")
            scale = float(M.mean()) or 1.0
            P, log = ot.sinkhorn(wa, wb, M / scale, reg, method="sinkhorn_stabilized",
                                 numItermax=int(max_iter), stopThr=float(tol), log=True)
            err = log["err"][-1] if log.get("err") else math.inf
            if not err <= tol:
                raise RuntimeError(f"ot.sinkhorn did not converge (marginal error {err:.2e}); "
                                   "raise max_iter or reg")
    return torch.as_tensor(np.asarray(P), dtype=torch.float64, device=x0.device)


def ot_pairs(x0: torch.Tensor, x1: torch.Tensor, method: str = "exact", reg: float = 0.05,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    r"""Re-pair two minibatches of equal size B by their OT plan: returns (x0, x1[sigma]).

    .. math:: \sigma^\star = \arg\min_{\sigma \in S_B} \sum_{i=1}^B
        \|x_0^i - x_1^{\sigma(i)}\|^2 \ \text{(exact)}, \qquad
        P(\sigma(i) = j) = \frac{P_{ij}}{\sum_{j'} P_{ij'}} \ \text{(Sinkhorn)}

    Exact: the optimal assignment sigma (every x0_i keeps one partner). Repeated rows of x1
    (minibatches drawn from a finite data set) are merged first: the plan is solved against
    the distinct points with their multiplicities as weights; the constraint matrix is
    totally unimodular, so the vertex optimum still sends each x0_i to a single point and
    is an optimal assignment of the full problem. Sinkhorn: each x0_i draws its partner from
    its row of the entropic plan (``generator`` for reproducibility).
    Shapes: x0, x1 (B, D). Returns two (B, D) tensors in x1's dtype. Chapter 7.
    """
    x0 = check_points(x0, "x0")
    x1 = check_points(x1, "x1")
    _pair_shapes(x0, x1)
    if x0.shape[0] != x1.shape[0]:
        raise ValueError(f"x0 and x1 must hold the same number of points, "
                         f"got {x0.shape[0]} and {x1.shape[0]}")
    if method == "exact":
        atoms, counts = torch.unique(x1, dim=0, return_counts=True)
        P = ot_plan(x0, atoms, b=counts.to(WIDE), method="exact")
        partner = P.argmax(dim=1)
        # the vertex optimum is integral: each row carries its whole mass 1/B to one atom
        if not torch.allclose(P.max(dim=1).values, torch.full_like(P[:, 0], 1.0 / x0.shape[0]),
                              rtol=1e-9, atol=0.0):
            raise RuntimeError("ot_pairs: the exact plan split a row; it is not an assignment")
        return x0, atoms[partner].to(x1.dtype)
    P = ot_plan(x0, x1, method=method, reg=reg)
    partner = torch.multinomial(P.cpu().clamp_min(0.0), 1, generator=generator)[:, 0].to(x1.device)
    return x0, x1[partner]
