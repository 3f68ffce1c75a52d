"""The precision policy every exact computation follows (one place, one set of constants).

- Inputs in half precision are computed in fp32 (the logits need the range); fp32 and
  fp64 are computed as given (:func:`compute_dtype`).
- Per-row coefficients (t / sigma_t^2, t^2 / (2 sigma_t^2), 1 / sigma_t) and every exact
  refinement are formed in the wide dtype, float64 (:data:`WIDE`), on every device the
  library supports (CPU and CUDA).
- Matrix products inside exact code paths run in full fp32: no TF32, no bf16 passes,
  even when the caller enabled them (:func:`exact_matmul`).
- Work-space: one (B, chunk) logit block is at most :data:`DEFAULT_CHUNK_BYTES`
  (:func:`chunk_rows` turns a budget into a number of support rows).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

__all__ = ["WIDE", "DEFAULT_CHUNK_BYTES", "WIDE_BYTES", "compute_dtype", "exact_matmul", "chunk_rows"]

# float64 everywhere: the library runs on CPU and CUDA, both of which have it.
WIDE = torch.float64
# Budget for one (B, chunk) logit block. 256 MiB keeps the extra peak memory far below
# 1 GiB at n = 400,000, D = 768 while leaving CIFAR-sized problems unchunked.
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Work-space of one block of a float64 pass (the support widened block by block).
WIDE_BYTES = 32 * 2**20


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 and fp64 stay as they are; half precision (fp16, bf16) is computed in fp32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


def chunk_rows(budget_bytes: int, row_bytes: int) -> int:
    """How many rows of ``row_bytes`` fit in ``budget_bytes`` (at least one)."""
    return max(1, budget_bytes // max(row_bytes, 1))


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Full fp32 precision for matrix products inside the block (no TF32, no bf16 passes).

    The logits scale like 1 / sigma_t^2, so a 10-bit-mantissa product near t = 1 would
    scramble the weights. Inside, ``torch.get_float32_matmul_precision()`` is "highest"
    (on torch >= 2.9 that also sets the per-backend cuBLAS and oneDNN matmul precisions to
    "ieee"). On exit the caller's settings come back, both the global one and, where torch
    has them, the per-backend ones (so callers of either API are restored).
    """
    backends = [torch.backends.cuda.matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)]
    saved = [(b, b.fp32_precision) for b in backends if b is not None and hasattr(b, "fp32_precision")]
    try:
        previous = torch.get_float32_matmul_precision()
    except RuntimeError:  # backends set apart through the per-backend API: no global value
        previous = None
    torch.set_float32_matmul_precision("highest")
    try:
        yield
    finally:
        if previous is not None:
            torch.set_float32_matmul_precision(previous)
        for backend, value in saved:
            if backend.fp32_precision != value:
                backend.fp32_precision = value
