"""Test-wide settings: one intra-op torch thread per test process.

The suite runs on small shared CI machines (2 cores) while in-process daemons and simulations use torch from
several threads; torch's default thread pool then oversubscribes the cores and some tests slow down tenfold.
"""

from __future__ import annotations

import torch

torch.set_num_threads(1)
