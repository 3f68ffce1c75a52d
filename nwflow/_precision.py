"""The precision policy every exact computation follows (one place, one set of constants).

- Inputs in half precision are computed in fp32 (the logits need the range); fp32 and
  fp64 are computed as given (:func:`compute_dtype`).
- Per-row coefficients (t / sigma_t^2, t^2 / (2 sigma_t^2), 1 / sigma_t) and every exact
  refinement are formed in the wide dtype, float64 (:data:`WIDE`), on every device the
  library supports (CPU and CUDA).
- Matrix products inside exact code paths run in full fp32: no TF32, no bf16 passes,
  even when the caller enabled them (:func:`exact_matmul`).
- The reduced-precision screen (Part III, chapter 9) rounds queries and keys to a half dtype
  for one matrix product whose rounding is bounded a priori; it is on by default only where
  that product is fast (:func:`reduced_dtype`): fp16 on CUDA tensor cores, bf16 on CPUs with
  bf16 dot-product instructions. Nothing it returns is used without that bound.
- Work-space: one (B, chunk) logit block is at most :data:`DEFAULT_CHUNK_BYTES`
  (:func:`chunk_rows` turns a budget into a number of support rows).
"""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["WIDE", "DEFAULT_CHUNK_BYTES", "WIDE_BYTES", "REDUCED", "ERROR_FACTOR", "compute_dtype",
           "exact_matmul", "chunk_rows", "reduced_dtype"]

# float64 everywhere: the library runs on CPU and CUDA, both of which have it.
WIDE = torch.float64
# Budget for one (B, chunk) logit block. 256 MiB keeps the extra peak memory far below
# 1 GiB at n = 400,000, D = 768 while leaving CIFAR-sized problems unchunked.
DEFAULT_CHUNK_BYTES = 256 * 2**20
# Work-space of one block of a float64 pass (the support widened block by block).
WIDE_BYTES = 32 * 2**20
# The half dtypes the reduced-precision screen can use.
REDUCED = (torch.bfloat16, torch.float16)
# Safety factor on the rounding error of a logit formed in the compute dtype (two vector
# products and a subtraction: a few units of eps times the magnitudes involved); the
# convention of every logit bound (nwflow._accuracy, nwflow._reduced).
ERROR_FACTOR = 4.0


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """fp32 and fp64 stay as they are; half precision (fp16, bf16) is computed in fp32."""
    return dtype if dtype in (torch.float32, torch.float64) else torch.float32


@functools.cache
def _cpu_flags() -> frozenset[str]:
    """The CPU's feature flags (Linux; empty elsewhere)."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    return frozenset(word for line in text.splitlines() if line.startswith("flags") for word in line.split())


def reduced_dtype(device: torch.device) -> torch.dtype | None:
    """The half dtype whose matrix product pays on ``device``, or None (the screen stays off).

    - CUDA, compute capability 7.0 or newer: float16 (tensor cores; 11 significant bits, so a
      bound 8x tighter than bf16's, with the range handled by power-of-two scaling).
    - CPU with ``avx512_bf16`` or ``amx_bf16``: bfloat16 (issue 13 measured 3.4x fp32's speed
      on such a CPU).
    - Any other CPU: None. On an AVX2 CPU with torch 2.13 a bf16 product of 20,000 x 3,072 by
      3,072 x 64 took 5.1 s against fp32's 0.21 s (2 threads): the screen would cost 25x what
      it saves.
    """
    if device.type == "cuda":
        return torch.float16 if torch.cuda.get_device_capability(device) >= (7, 0) else None
    if device.type == "cpu" and _cpu_flags() & {"avx512_bf16", "amx_bf16"}:
        return torch.bfloat16
    return None


def chunk_rows(budget_bytes: int, row_bytes: int) -> int:
    """How many rows of ``row_bytes`` fit in ``budget_bytes`` (at least one)."""
    return max(1, budget_bytes // max(row_bytes, 1))


@contextlib.contextmanager
def exact_matmul() -> Iterator[None]:
    """Full fp32 precision for matrix products inside the block (no TF32, no bf16 passes), and
    fp32 accumulation for half-precision products.

    The logits scale like 1 / sigma_t^2, so a 10-bit-mantissa product near t = 1 would
    scramble the weights. Inside, ``torch.get_float32_matmul_precision()`` is "highest"
    (on torch >= 2.9 that also sets the per-backend cuBLAS and oneDNN matmul precisions to
    "ieee"). On exit the caller's settings come back, both the global one and, where torch
    has them, the per-backend ones (so callers of either API are restored).
    """
    backends = [torch.backends.cuda.matmul, getattr(getattr(torch.backends, "mkldnn", None), "matmul", None)]
    saved = [(b, b.fp32_precision) for b in backends if b is not None and hasattr(b, "fp32_precision")]
    # Half-precision products (the reduced-precision screen) accumulate in fp32: cuBLAS may
    # otherwise reduce in half precision, which the screen's bound does not cover.
    cuda = torch.backends.cuda.matmul
    reductions = [(name, getattr(cuda, name)) for name in ("allow_fp16_reduced_precision_reduction",
                                                          "allow_bf16_reduced_precision_reduction")
                  if hasattr(cuda, name)]
    for name, _ in reductions:
        setattr(cuda, name, False)
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
        for name, value in reductions:
            setattr(cuda, name, value)
