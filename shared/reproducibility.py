"""One call that makes a run repeatable from its seed."""

from __future__ import annotations

import os
import random

import numpy as np
import torch


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)
    with ``seed`` modulo 2**32, and turn cuDNN autotuning off -- what MONAI's
    ``set_determinism`` does, without importing MONAI (a fusion-only process never needs it).

    With ``deterministic``, torch is asked for deterministic kernels everywhere; an operation
    that has none (some CUDA backward passes, e.g. 3-D adaptive average pooling) warns instead
    of failing, so GPU runs repeat closely but not always bit for bit, while CPU runs repeat
    exactly. cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` before its first use: it is set here
    unless already set, so call this before touching CUDA.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    seed = int(seed) % 2**32
    random.seed(seed)
    np.random.seed(seed)  # noqa: NPY002 -- seeding the legacy global generator is the point
    torch.manual_seed(seed)
    torch.backends.cudnn.deterministic = True
    torch.backends.cudnn.benchmark = False
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
