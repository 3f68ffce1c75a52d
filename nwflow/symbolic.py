r"""The closed form, derived by sympy (book, Part I, chapters 1 and 2).

Each function below performs a step of the derivation with sympy (expanding, splitting
terms, differentiating, solving, taking limits) and returns the resulting expression; no
result is typed in. The only inputs are the definitions: the Gaussian path
x_t = sigma_t x0 + t x1 with sigma_t = 1 - (1 - sigma_min) t, the isotropic Gaussian
density (from ``sympy.stats``) and a uniform prior over a finite support.
Chapter 2 displays the results; ``tests/test_symbolic.py`` simplifies the identities to
zero and lambdifies every result against nwflow's numerical code.

Vectors are explicit column matrices of component symbols (``vector("x", d)``) and the
support is a list of n such vectors (``support(n, d)``), so each statement is checked in
a concrete but arbitrary dimension d and support size n; the algebra does not depend on
them. ``scale`` arguments default to the path's sigma_t; pass the generic positive symbol
:data:`sigma` to keep expressions short (then :func:`on_path` substitutes sigma_t).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import numpy as np
import sympy as sp
from sympy.stats import Normal, density

from nwflow._checks import check_instance, check_positive_int

__all__ = [
    "t", "sigma_min", "sigma", "h", "sigma_t",
    "vector", "support", "dot", "sqnorm", "on_path",
    "gaussian_log_likelihood", "conditional_path", "conditional_velocity", "conditional_target",
    "posterior_logits", "split_logits", "softmax", "posterior_weights", "posterior_mean",
    "marginal_velocity", "velocity_from_mean", "log_marginal_density", "score",
    "tweedie_mean", "velocity_from_score", "nw_logits", "nw_bandwidth",
    "attention_query", "attention_key", "attention_logits",
    "weights_limit_t0", "mean_limit_t0", "logit_gap_rate_t1", "logit_gap_limit_t1",
    "continuity_residual", "lambdify_field",
]

# Flow time in (0, 1), the path's final noise, a generic noise scale and a bandwidth.
t = sp.Symbol("t", positive=True)
sigma_min = sp.Symbol("sigma_min", nonnegative=True)
sigma = sp.Symbol("sigma", positive=True)
h = sp.Symbol("h", positive=True)
#: The noise scale of the Gaussian OT path, sigma_t = 1 - (1 - sigma_min) t (chapter 1).
sigma_t = 1 - (1 - sigma_min) * t


# -- vectors ---------------------------------------------------------------------------
def vector(name: str, d: int) -> sp.Matrix:
    """A (d, 1) column of real symbols ``name_1 .. name_d``."""
    check_positive_int(d, "d")
    if not check_instance(name, "name", str):
        raise ValueError(f"name must be a non-empty str, got {name!r}")
    return sp.Matrix(sp.symbols(f"{name}_1:{d + 1}", real=True))


def support(n: int, d: int, name: str = "y") -> list[sp.Matrix]:
    """The support {x^(1..n)} as n symbolic (d, 1) vectors ``name_j_k``."""
    check_positive_int(n, "n")
    return [vector(f"{name}_{j}", d) for j in range(1, n + 1)]


def dot(a: sp.Matrix, b: sp.Matrix) -> sp.Expr:
    """Inner product <a, b> of two column vectors."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape, got {a.shape} and {b.shape}")
    return (a.T * b)[0, 0]


def sqnorm(a: sp.Matrix) -> sp.Expr:
    """Squared norm ||a||^2."""
    return dot(a, a)


def on_path(expr: sp.Expr | sp.Matrix) -> sp.Expr | sp.Matrix:
    """Substitute the path's noise scale sigma_t for the generic symbol sigma."""
    return expr.subs(sigma, sigma_t)


def _free(v: sp.Matrix) -> set[sp.Symbol]:
    return set(v.free_symbols)


# -- the path (chapter 1) --------------------------------------------------------------
def gaussian_log_likelihood(x: sp.Matrix, mean: sp.Matrix, scale: sp.Expr) -> sp.Expr:
    """log N(x; mean, scale^2 I), the sum of the components' log densities (``sympy.stats``).

    Expanded: -||x - mean||^2 / (2 scale^2) - (d / 2) log(2 pi scale^2).
    """
    if x.shape != mean.shape:
        raise ValueError(f"x and mean must have the same shape, got {x.shape} and {mean.shape}")
    terms = [sp.log(density(Normal(f"Z{k}", mean[k], scale))(x[k])) for k in range(x.shape[0])]
    return sp.expand_log(sp.Add(*terms), force=True)


def conditional_path(x0: sp.Matrix, x1: sp.Matrix) -> sp.Matrix:
    """The definition x_t = sigma_t x0 + t x1 (noise x0 at t = 0, data x1 at t = 1)."""
    return sigma_t * x0 + t * x1


def conditional_velocity(x0: sp.Matrix, x1: sp.Matrix) -> sp.Matrix:
    """d x_t / dt, differentiated by sympy: x1 - (1 - sigma_min) x0, constant in t."""
    return sp.simplify(sp.diff(conditional_path(x0, x1), t))


def conditional_target(x: sp.Matrix, x1: sp.Matrix) -> sp.Matrix:
    """The conditional velocity at the point x = x_t: solve x_t = x for x0 and substitute.

    Result: u(x | x1, t) = (x1 - (1 - sigma_min) x) / sigma_t.
    """
    x0 = vector("z", x.shape[0])
    solution = sp.solve(list(conditional_path(x0, x1) - x), list(x0), dict=True)
    if len(solution) != 1:
        raise ArithmeticError("x_t = x does not determine x0 uniquely")
    return sp.simplify(conditional_velocity(x0, x1).subs(solution[0]))


# -- the posterior over the support (chapter 2) ----------------------------------------
def posterior_logits(x: sp.Matrix, Y: Sequence[sp.Matrix], scale: sp.Expr = sigma_t) -> list[sp.Expr]:
    """Bayes with a uniform prior: log(1/n) + log N(x; t x^(j), scale^2 I), one per support point.

    The posterior is softmax of these: P(x1 = x^(j) | x_t = x) = exp(l_j) / sum_k exp(l_k).
    """
    prior = sp.log(sp.Rational(1, len(Y)))
    return [prior + gaussian_log_likelihood(x, t * y, scale) for y in Y]


def split_logits(logits: Sequence[sp.Expr], Y: Sequence[sp.Matrix]) -> tuple[list[sp.Expr], list[sp.Expr]]:
    """Split each expanded logit into the terms that involve x^(j) and the rest.

    Returns (kept, dropped). When every ``dropped[j]`` is the same expression it cancels in
    the softmax, and the posterior is softmax(kept): for the Gaussian path
    kept_j = (t <x, x^(j)> - t^2 ||x^(j)||^2 / 2) / sigma^2 and the dropped part carries
    -||x||^2 / (2 sigma^2), the normalising constant and the prior.
    """
    if len(logits) != len(Y):
        raise ValueError(f"logits and Y must have the same length, got {len(logits)} and {len(Y)}")
    kept, dropped = [], []
    for logit, y in zip(logits, Y, strict=True):
        expanded = sp.expand(logit)
        terms = sp.Add.make_args(expanded)
        k = sp.Add(*[a for a in terms if a.free_symbols & _free(y)])
        kept.append(k)
        dropped.append(sp.expand(expanded - k))
    return kept, dropped


def softmax(logits: Sequence[sp.Expr]) -> list[sp.Expr]:
    """softmax_j(l) = exp(l_j) / sum_k exp(l_k)."""
    z = sp.Add(*[sp.exp(logit) for logit in logits])
    return [sp.exp(logit) / z for logit in logits]


def posterior_weights(x: sp.Matrix, Y: Sequence[sp.Matrix], scale: sp.Expr = sigma_t) -> list[sp.Expr]:
    """w_j(x, t): softmax of the logits after dropping their j-independent part (:func:`split_logits`).

    The split is done with the generic symbol sigma (short expressions), then ``scale`` is
    substituted.
    """
    kept, _ = split_logits(posterior_logits(x, Y, sigma), Y)
    return [w.subs(sigma, scale) for w in softmax(kept)]


def posterior_mean(x: sp.Matrix, Y: Sequence[sp.Matrix], scale: sp.Expr = sigma_t) -> sp.Matrix:
    """m(x, t) = sum_j w_j x^(j) = E[x1 | x_t = x]."""
    w = posterior_weights(x, Y, scale)
    return sp.Matrix.hstack(*Y) * sp.Matrix(w)


def marginal_velocity(x: sp.Matrix, Y: Sequence[sp.Matrix], scale: sp.Expr = sigma_t) -> sp.Matrix:
    """u(x, t) = E[u(x | x1, t) | x_t = x] = sum_j w_j u(x | x^(j), t), the posterior expectation."""
    w = posterior_weights(x, Y, scale)
    return sp.Matrix.hstack(*[conditional_target(x, y) for y in Y]) * sp.Matrix(w)


def velocity_from_mean(x: sp.Matrix, Y: Sequence[sp.Matrix], scale: sp.Expr = sigma_t) -> sp.Matrix:
    """The expectation of an affine target: u = A m + b.

    The conditional target is affine in x1 (A = its Jacobian in x1, b = its value at
    x1 = 0, both found by sympy), and the weights sum to one, so the expectation moves
    inside: u(x, t) = (m(x, t) - (1 - sigma_min) x) / sigma_t.
    """
    x1 = vector("w", x.shape[0])
    target = conditional_target(x, x1)
    A = target.jacobian(x1)
    if any(sp.diff(A, v) != sp.zeros(*A.shape) for v in x1):
        raise ArithmeticError("the conditional target is not affine in x1")
    b = target.subs({s: 0 for s in x1})
    return sp.simplify(A) * posterior_mean(x, Y, scale) + sp.simplify(b)


def log_marginal_density(x: sp.Matrix, Y: Sequence[sp.Matrix], scale: sp.Expr = sigma) -> sp.Expr:
    """log p_t(x) = log( (1/n) sum_j N(x; t x^(j), scale^2 I) )."""
    return sp.log(sp.Add(*[sp.exp(logit) for logit in posterior_logits(x, Y, scale)]))


def score(x: sp.Matrix, Y: Sequence[sp.Matrix], scale: sp.Expr = sigma) -> sp.Matrix:
    """grad_x log p_t(x), differentiated by sympy component by component."""
    logp = log_marginal_density(x, Y, scale)
    return sp.Matrix([sp.diff(logp, xk) for xk in x])


def tweedie_mean(x: sp.Matrix, s: sp.Matrix, scale: sp.Expr = sigma) -> sp.Matrix:
    """Tweedie: solve  s = (t m - x) / scale^2  for m, i.e. m = (x + scale^2 s) / t.

    ``s`` is a score vector (symbolic or :func:`score`); chapter 2 checks that this m equals
    the posterior mean.
    """
    m = vector("m", x.shape[0])
    solution = sp.solve(list(s - (t * m - x) / scale**2), list(m), dict=True)
    return sp.Matrix([solution[0][mk] for mk in m])


def velocity_from_score(x: sp.Matrix) -> sp.Matrix:
    """The velocity in terms of a score vector s: substitute Tweedie's m into u = A m + b.

    Result: u = x / t + (sigma_t / t) s, for every sigma_min.
    """
    d = x.shape[0]
    s = vector("s", d)
    m = tweedie_mean(x, s, sigma_t)
    x1 = vector("w", d)
    target = conditional_target(x, x1)
    return sp.simplify(target.subs(dict(zip(x1, m, strict=True))))


# -- Nadaraya-Watson and attention forms (chapter 2) ----------------------------------
def nw_logits(xq: sp.Matrix, Y: Sequence[sp.Matrix], bandwidth: sp.Expr = h) -> list[sp.Expr]:
    """Gaussian-kernel Nadaraya-Watson logits at the query xq: -||xq - x^(j)||^2 / (2 bandwidth^2)."""
    return [-sqnorm(xq - y) / (2 * bandwidth**2) for y in Y]


def nw_bandwidth(d: int = 1, scale: sp.Expr = sigma) -> sp.Expr:
    """Solve ||x - t y||^2 / scale^2 = ||x~ - y||^2 / h^2 for h > 0 with the rescaled query x~ = x / t.

    Result: h(t) = scale / t, for every x and y (checked in dimension ``d``).
    """
    x, y = vector("x", d), vector("y", d)
    equation = sp.Eq(sqnorm(x - t * y) / scale**2, sqnorm(x / t - y) / h**2)
    solutions = [sp.simplify(s) for s in sp.solve(equation, h)]
    positive = [s for s in solutions if s.is_positive]
    if len(positive) != 1:
        raise ArithmeticError(f"expected one positive bandwidth, got {solutions}")
    return positive[0]


def attention_query(x: sp.Matrix, scale: sp.Expr = sigma_t) -> sp.Matrix:
    """q = [t x / scale^2, -t^2 / (2 scale^2)], the only part that depends on x and t."""
    return sp.Matrix.vstack(t * x / scale**2, sp.Matrix([-t**2 / (2 * scale**2)]))


def attention_key(y: sp.Matrix) -> sp.Matrix:
    """k_j = [x^(j), ||x^(j)||^2]: depends on the support only, so it can be cached."""
    return sp.Matrix.vstack(y, sp.Matrix([sqnorm(y)]))


def attention_logits(x: sp.Matrix, Y: Sequence[sp.Matrix], scale: sp.Expr = sigma_t) -> list[sp.Expr]:
    """<q, k_j> for each support point (values v_j = x^(j))."""
    q = attention_query(x, sigma)
    return [sp.expand(dot(q, attention_key(y))).subs(sigma, scale) for y in Y]


# -- limits (chapter 2) ----------------------------------------------------------------
def weights_limit_t0(x: sp.Matrix, Y: Sequence[sp.Matrix]) -> list[sp.Expr]:
    """lim_{t -> 0} w_j(x, t): every support point weighs 1/n, whatever x is."""
    return [sp.limit(w, t, 0, "+") for w in posterior_weights(x, Y)]


def mean_limit_t0(x: sp.Matrix, Y: Sequence[sp.Matrix]) -> sp.Matrix:
    """lim_{t -> 0} m(x, t): the support mean."""
    return posterior_mean(x, Y).applyfunc(lambda e: sp.limit(e, t, 0, "+"))


def _logit_gap(x: sp.Matrix, Y: Sequence[sp.Matrix], j: int, k: int, scale: sp.Expr) -> sp.Expr:
    kept, _ = split_logits(posterior_logits(x, Y, sigma), Y)
    return (kept[j] - kept[k]).subs(sigma, scale)


def logit_gap_rate_t1(x: sp.Matrix, Y: Sequence[sp.Matrix], j: int, k: int) -> sp.Expr:
    """With sigma_min = 0: lim_{t -> 1} (1 - t)^2 (l_j - l_k) = (||x - x^(k)||^2 - ||x - x^(j)||^2) / 2.

    The gap between two logits grows like 1 / (1 - t)^2 with the sign of that difference
    of squared distances, so the softmax tends to the nearest support point.
    """
    gap = _logit_gap(x, Y, j, k, sigma_t.subs(sigma_min, 0))
    return sp.factor(sp.limit((1 - t) ** 2 * gap, t, 1, "-"))


def logit_gap_limit_t1(x: sp.Matrix, Y: Sequence[sp.Matrix], j: int, k: int) -> sp.Expr:
    """With sigma_min > 0: lim_{t -> 1} (l_j - l_k) = (||x - x^(k)||^2 - ||x - x^(j)||^2) / (2 sigma_min^2).

    Finite: at t = 1 the weights are a Nadaraya-Watson smoother with bandwidth sigma_min.
    """
    return sp.factor(sp.limit(_logit_gap(x, Y, j, k, sigma_t), t, 1))


# -- the continuity equation (chapter 1) -----------------------------------------------
def continuity_residual(log_p: sp.Expr, u: sp.Matrix, x: sp.Matrix) -> sp.Expr:
    """(d p / dt + div(p u)) / p = d log p / dt + div u + <u, grad log p>.

    Zero exactly when the field u transports the density p (the continuity equation);
    written with log p so that sympy simplifies it quickly.
    """
    grad = [sp.diff(log_p, xk) for xk in x]
    return (sp.diff(log_p, t) + sp.Add(*[sp.diff(u[k], x[k]) for k in range(x.shape[0])])
            + sp.Add(*[u[k] * grad[k] for k in range(x.shape[0])]))


# -- numerical evaluation --------------------------------------------------------------
def lambdify_field(
    expr: sp.Matrix | Sequence[sp.Expr] | sp.Expr, x: sp.Matrix, Y: Sequence[sp.Matrix]
) -> Callable[..., np.ndarray]:
    """A numpy function f(xs, ys, t, sigma_min) of a symbolic result.

    ``xs`` (B, d) queries, ``ys`` (n, d) support values, ``t`` a number or (B,) array,
    ``sigma_min`` a number. An expression that still holds the generic ``sigma`` is
    evaluated on the path (sigma = sigma_t). Returns (B, k) for a vector or a list of k
    expressions, (B,) for a scalar; float64.
    """
    items = list(expr) if isinstance(expr, (sp.MatrixBase, list, tuple)) else [expr]
    items = [on_path(sp.sympify(e)) for e in items]
    d, n = x.shape[0], len(Y)
    ysyms = [s for y in Y for s in y]
    extra = set().union(*(e.free_symbols for e in items)) - {t, sigma_min, *x, *ysyms}
    if extra:
        raise ValueError(f"expr has symbols other than t, sigma_min, x and Y: {sorted(map(str, extra))}")
    f = sp.lambdify([t, sigma_min, *x, *ysyms], items, modules="numpy")
    scalar = not isinstance(expr, (sp.MatrixBase, list, tuple))

    def numeric(xs: np.ndarray, ys: np.ndarray, tv: float | np.ndarray, sm: float = 0.0) -> np.ndarray:
        xs = np.asarray(xs, dtype=np.float64)
        ys = np.asarray(ys, dtype=np.float64)
        if xs.ndim != 2 or xs.shape[1] != d:
            raise ValueError(f"xs must have shape (B, {d}), got {xs.shape}")
        if ys.shape != (n, d):
            raise ValueError(f"ys must have shape ({n}, {d}), got {ys.shape}")
        tv = np.broadcast_to(np.asarray(tv, dtype=np.float64), (xs.shape[0],))
        out = f(tv, float(sm), *xs.T, *ys.reshape(-1))
        cols = [np.broadcast_to(np.asarray(c, dtype=np.float64), (xs.shape[0],)) for c in out]
        result = np.stack(cols, axis=1)
        return result[:, 0] if scalar else result

    return numeric
