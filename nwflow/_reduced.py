r"""The reduced-precision screen's logits and their a-priori bound (Part III, chapter 9, rule 3).

One product in a half dtype (bf16 or fp16, accumulated in fp32) gives every logit of a row,

.. math:: \tilde l_j = 2^{e_q + e_K} \langle \mathrm{fl}(q / 2^{e_q}), \mathrm{fl}(K_j / 2^{e_K})\rangle
    - a \|x^{(j)} - c\|^2, \qquad K_j = \mathrm{fl}(x^{(j)} - c),

within the bound of :func:`logit_error` (powers of two keep the scaled operands below 1, so the
range of fp16 is no concern). :class:`ReducedKeys` holds the rounded keys of one support (built
once per field) and forms the product; :class:`nwflow.EmpiricalField` decides from the bound which
keys each row keeps (:func:`nwflow._accuracy.kept_keys`) and weighs them exactly.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from nwflow._precision import ERROR_FACTOR, WIDE, chunk_rows

__all__ = ["logit_error", "small_part", "ReducedKeys"]


def logit_error(q_norm: torch.Tensor, a: torch.Tensor, key_max: float, q_scale: torch.Tensor,
                key_scale: float, dim: int, low: torch.dtype, rounded_output: bool,
                q_small: torch.Tensor, key_small: float, center_norm: float = 0.0) -> torch.Tensor:
    r"""A-priori bound on each row's logit error in the reduced-precision screen, (B,) float64.

    The screen forms S_j = <q, K_j> with K_j = fl(x^(j) - c) from q_s = q / 2^{e_q} (per row) and
    K_s = K / 2^{e_K}, powers of two with ||q_s|| and max_j ||K_s|| below 1 (exact scalings: the
    range of fp16 is no concern), each rounded to the half dtype ``low`` (through fp32 at most,
    hence u + epsilon); the product accumulates in fp32. With u the unit roundoff of ``low``
    (2^-8 bf16, 2^-11 fp16), tau its smallest normal, epsilon the fp32 machine epsilon (twice its
    unit roundoff: truncating accumulators are covered too), gamma = D epsilon / (1 - D epsilon),
    q = ||q_s||, R = max_j ||K_s,j||, and sigma_q, sigma_K the norms of the components below tau
    (of q_s; the largest over the keys): a component that small may become subnormal or be
    flushed to zero, and moves by at most its size, the others by u of theirs:

    .. math::

        \rho_q = (u + \epsilon) q + \sigma_q, \quad \rho_K = (u + \epsilon) R + \sigma_K,

        |\tilde S_j - \langle q_s, K_{s,j}\rangle| \le E_s = \rho_q (R + \rho_K) + q \rho_K
            + \gamma (q + \rho_q)(R + \rho_K) + D \tau_{32}
            \;[+\, 2u (1 + \gamma)(q + \rho_q)(R + \rho_K) + \tau],

    the bracket when the product is rounded to ``low`` on output (the first terms: rounded
    inputs, by Cauchy-Schwarz; then any-order fp32 summation of the D exact products, each of
    which may be flushed below fp32's smallest normal tau_32). The logit
    l~_j = 2^{e_q + e_K} S~_j - a ||x^(j) - c||^2 is then within

    .. math:: s = 2^{e_q + e_K} E_s + 4 \epsilon (\|q\| (R_{\rm raw} + \|c\|) + a R_{\rm raw}^2)
        + (D + 4) \tau_{32} (1 + a)

    of the exact one, the middle term the fp32 rounding of the scaling and subtraction (the
    convention of :func:`nwflow._accuracy.logit_error_bound`), with ||c|| (``center_norm``) when
    <q, c> is added to give the streamed form, the last what underflow can cost the fp32 squared
    norms (data of size 1e-20 have squared norms below fp32's smallest normal). Shapes:
    ``q_norm`` ||q||, ``a`` and ``q_small`` sigma_q (B,) float64, ``q_scale`` 2^{e_q} (B,);
    ``key_max`` R_raw = max_j ||K_j||, ``key_scale`` 2^{e_K} and ``key_small`` sigma_K. Part III,
    chapter 9.
    """
    finfo, eps = torch.finfo(low), torch.finfo(torch.float32).eps
    u, tau = finfo.eps / 2.0, finfo.smallest_normal
    tiny32 = torch.finfo(torch.float32).smallest_normal
    gamma = dim * eps / (1.0 - dim * eps) if dim * eps < 0.5 else math.inf
    q, R = q_norm / q_scale, key_max / key_scale
    rho_q, rho_k = (u + eps) * q + q_small, (u + eps) * R + key_small
    size = (q + rho_q) * (R + rho_k)
    e_s = rho_q * (R + rho_k) + q * rho_k + gamma * size + dim * tiny32
    if rounded_output:
        e_s = e_s + 2.0 * u * (1.0 + gamma) * size + tau
    return (q_scale * key_scale * e_s
            + ERROR_FACTOR * eps * (q_norm * (key_max + center_norm) + a * key_max**2)
            + (dim + 4) * tiny32 * (1.0 + a))


def small_part(v: torch.Tensor, low: torch.dtype) -> torch.Tensor:
    """The norm of each row's components of ``v`` (r, D) below the smallest normal of ``low``, (r,)
    float64: the part that rounding to ``low`` may flush (:func:`logit_error`)."""
    tiny = torch.finfo(low).smallest_normal
    return torch.linalg.vector_norm(torch.where(v.abs() < tiny, v, 0.0).to(WIDE), dim=1)


@dataclass(frozen=True)
class ReducedKeys:
    """The centred keys K_j = fl(x^(j) - c) scaled by a power of two 2^-e_K and rounded to the half
    dtype ``low``, (n, D); ``scale`` 2^e_K; ``key_max`` a bound R on max_j ||K_j||; ``small`` the
    largest norm of a scaled key's components below ``low``'s smallest normal."""

    keys: torch.Tensor
    scale: float
    key_max: float
    small: float
    low: torch.dtype

    @classmethod
    def build(cls, support: torch.Tensor, center: torch.Tensor, centred_max2: float, low: torch.dtype,
              block_bytes: int) -> ReducedKeys:
        """From ``support`` (n, D), its centre c (D,) and max_j ||x^(j) - c||^2 as computed in the
        compute dtype (``centred_max2``), in blocks of ``block_bytes`` of support rows: n D half
        numbers of memory.

        R comes from the computed squared norms: a computed sum of D squares is within gamma_{D+1}
        of the exact one (any order), and the square root and squaring add 2 eps.
        """
        D, eps = support.shape[1], torch.finfo(torch.float32).eps
        gamma = (D + 1) * eps / (1.0 - (D + 1) * eps)  # below 1/3: the field checks D eps < 1/4
        key_max = math.sqrt(centred_max2 / (1.0 - gamma - 4.0 * eps))
        scale = math.ldexp(1.0, math.frexp(key_max)[1]) if key_max > 0 else 1.0
        keys = torch.empty(support.shape, dtype=low, device=support.device)
        rows = chunk_rows(block_bytes, D * support.element_size())
        small = 0.0
        for s in range(0, len(support), rows):
            # fl(x - c) in the compute dtype first (the bound's K_j), then the exact scaling,
            # then the rounding to the half dtype (through fp32 at most: u + eps in the bound).
            block = (support[s:s + rows] - center).mul_(1.0 / scale)
            keys[s:s + rows] = block
            small = max(small, float(small_part(block, low).max()))
        return cls(keys, scale, key_max, small, low)

    def logits(self, q: torch.Tensor, a: torch.Tensor, key_norms: torch.Tensor, center_norm: float
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """l~_j = <q, x^(j) - c> - a ||x^(j) - c||^2 (B, n) in q's dtype, a transposed view; the
        bound on each row's error (B,) (:func:`logit_error`); and the bound once <q, c> is added
        (``center_norm`` = ||c||: the streamed form). ``q`` (B, D), ``a`` (B,), ``key_norms`` (n,)
        the cached ||x^(j) - c||^2."""
        low = self.low
        q_norm = torch.linalg.vector_norm(q.to(WIDE), dim=1)
        # Per-row powers of two with ||q|| / 2^e_q in [1/2, 1): exact scalings.
        q_scale = torch.ldexp(torch.ones_like(q_norm), torch.frexp(q_norm)[1])
        q_s = q / q_scale[:, None].to(q.dtype)
        q_small = small_part(q_s, low)
        q_low = q_s.to(low)
        product, rounded = None, True
        if self.keys.device.type == "cuda":
            try:  # fp32 output where torch has it (no rounding of the products on output)
                product, rounded = torch.mm(self.keys, q_low.T.contiguous(), out_dtype=torch.float32), False
            except (RuntimeError, TypeError):
                product = None
        if product is None:
            product = self.keys @ q_low.T.contiguous()
        # (B, n) as a transposed view of the (n, B) block, as in EmpiricalField._logits.
        logits = product.T.to(q.dtype).mul_((q_scale * self.scale).to(q.dtype)[:, None])
        logits.addr_(a, key_norms, alpha=-1.0)
        a_w, D = a.to(WIDE), self.keys.shape[1]
        slack, streamed = (logit_error(q_norm, a_w, self.key_max, q_scale, self.scale, D, low, rounded,
                                       q_small, self.small, center_norm=c) for c in (0.0, center_norm))
        return logits, slack, streamed
