"""One call that makes a run repeatable from its seed."""

from __future__ import annotations

import os

import torch
from monai.utils import set_determinism


def set_seed(seed: int, deterministic: bool = True) -> None:
    """Seed Python's ``random``, NumPy's global generator and torch (CPU and every CUDA device)
    with ``seed`` (MONAI's ``set_determinism``; cuDNN autotuning off).

    With ``deterministic``, torch is asked for deterministic kernels everywhere; an operation
    that has none (some CUDA backward passes, e.g. 3-D adaptive average pooling) warns instead
    of failing, so GPU runs repeat closely but not always bit for bit, while CPU runs repeat
    exactly. cuBLAS needs ``CUBLAS_WORKSPACE_CONFIG`` before its first use: it is set here
    unless already set, so call this before touching CUDA.
    """
    if deterministic:
        os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    set_determinism(seed=seed)
    torch.use_deterministic_algorithms(deterministic, warn_only=True)
