"""nwflow._precision: the dtype policy and work-space budgets (exact_matmul: tests/test_empirical.py)."""

import torch

from nwflow._precision import WIDE, chunk_rows, compute_dtype


def test_compute_dtype_widens_half_precision_only():
    assert compute_dtype(torch.float16) == torch.float32
    assert compute_dtype(torch.bfloat16) == torch.float32
    assert compute_dtype(torch.float32) == torch.float32
    assert compute_dtype(torch.float64) == torch.float64
    assert WIDE == torch.float64


def test_chunk_rows_fits_the_budget_and_is_at_least_one():
    assert chunk_rows(1000, 10) == 100
    assert chunk_rows(1000, 3) == 333 and 333 * 3 <= 1000 < 334 * 3
    assert chunk_rows(5, 10) == 1
    assert chunk_rows(10, 0) == 10
