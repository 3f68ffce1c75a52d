"""Shared pytest configuration.

The test machines share two cores among several processes. With more than one intra-op
thread, every small torch operation waits at a thread barrier for a busy core (a 64 x 30
matrix product measured 10 ms instead of 0.05 ms), so the suite runs torch single-threaded;
pytest-xdist supplies the parallelism (``make unit`` runs two workers).
"""

import torch

torch.set_num_threads(1)
