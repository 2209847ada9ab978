"""Image training that fits a GPU memory budget: micro-batch size, gradient accumulation and
activation checkpointing, chosen so that the effective batch stays the one asked for.

:func:`plan_image_training` measures one training step (forward and backward under the
training's autocast, AdamW state included) of the model at each candidate micro-batch on the
device, and keeps the first plan, in this order, whose peak fits the budget:

1. the whole batch, no checkpointing;
2. halved micro-batches (gradient accumulation over ``batch / micro`` chunks), no
   checkpointing, down to one sample;
3. the same micro-batches again with activation checkpointing
   (``ImageClassifier.checkpoint_activations``).

No plan fits: :class:`MemoryBudgetError` names the smallest peak measured. Accumulation gives
the same update as the whole batch up to rounding (``fedmets.client.training._fit``); checkpointing
gives the same values and costs about a third more compute. On the CPU nothing is measured:
the whole batch is used.

The budget is the site's ``[compute] gpu_memory_gib`` when set, else what the device has free
now. It bounds what PyTorch reserves on the device for the whole training (weights, AdamW
state, the crops held there, activations); the CUDA context (about half a GiB) comes on top.
Trainings run at once, each in a process of its own (``fedmets study --parallel-folds``, a
site's ``[compute] parallel_folds``), share it: :func:`lane_budget_bytes`.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

GIB = 2**30
CUDA_CONTEXT_BYTES = GIB // 2
"""What a process's CUDA context takes on the device besides PyTorch's own reservations (about
half a GiB on recent GPUs): each process that trains beside others takes one
(:func:`split_budget`)."""


class MemoryBudgetError(RuntimeError):
    """Not even one sample per step with checkpointing fits the budget."""


@dataclass(frozen=True)
class MemoryPlan:
    """How one image training runs: ``micro_batch`` samples per forward pass, the optimiser
    stepping every ``batch // micro_batch`` passes (ceil), ``checkpointing`` on or off;
    ``peak_bytes`` measured for that plan (None when nothing was measured: CPU) against
    ``budget_bytes``."""

    batch: int
    micro_batch: int
    checkpointing: bool
    peak_bytes: int | None = None
    budget_bytes: int | None = None

    @property
    def accumulation(self) -> int:
        """Forward/backward passes per optimiser step."""
        return -(-self.batch // self.micro_batch)

    def describe(self) -> str:
        """One line for logs: ``batch 16 = 4 x 4, checkpointing, peak 9.1 of 24.0 GiB``."""
        text = f"batch {self.batch} = {self.accumulation} x {self.micro_batch}"
        if self.checkpointing:
            text += ", checkpointing"
        if self.peak_bytes is not None and self.budget_bytes is not None:
            text += f", peak {self.peak_bytes / GIB:.1f} of {self.budget_bytes / GIB:.1f} GiB"
        return text


def device_budget_bytes(device: torch.device, gib: float | None = None) -> int | None:
    """The training's memory budget in bytes on ``device``: ``gib`` GiB when given (capped by
    what is free for this process: the device's free memory plus what PyTorch already reserved
    here), else all of that; None on the CPU."""
    if device.type != "cuda":
        return None
    free, _ = torch.cuda.mem_get_info(device)
    free += torch.cuda.memory_reserved(device)
    return free if gib is None else min(free, int(gib * GIB))


def lane_budget_bytes(device: torch.device, gib: float | None, lanes: int) -> int | None:
    """Each of ``lanes`` trainings' budget in bytes when they share ``device``, each in a
    process of its own started after this call (:func:`split_budget` of what is free for this
    process and ``gib``); None on the CPU."""
    free = device_budget_bytes(device)
    return None if free is None else split_budget(free, gib, lanes)


def split_budget(free_bytes: int, gib: float | None, lanes: int) -> int:
    """Each of ``lanes`` processes' share of the device: what is free less a CUDA context per
    process (:data:`CUDA_CONTEXT_BYTES`), capped by ``gib`` GiB in all when given, split
    evenly. MemoryBudgetError when the contexts leave nothing to train in."""
    usable = free_bytes - lanes * CUDA_CONTEXT_BYTES
    if gib is not None:
        usable = min(usable, int(gib * GIB))
    if usable < lanes:
        contexts = lanes * CUDA_CONTEXT_BYTES / GIB
        raise MemoryBudgetError(
            f"{lanes} trainings at once: their CUDA contexts ({contexts:.1f} GiB) leave nothing "
            f"of the {free_bytes / GIB:.1f} GiB free on the device; run fewer at once "
            "(parallel_folds)"
        )
    return usable // lanes


def micro_batches(batch: int) -> list[int]:
    """Candidate micro-batch sizes, largest first: ``batch``, then halved down to 1."""
    sizes, size = [], batch
    while size > 1:
        sizes.append(size)
        size = -(-size // 2)
    return [*sizes, 1]


def choose_plan(
    batch: int, budget_bytes: int, peak: Callable[[int, bool], int | None]
) -> MemoryPlan:
    """The first plan (see the module docstring) whose ``peak(micro_batch, checkpointing)``
    (bytes; None: out of memory) is within ``budget_bytes``."""
    lowest = None
    for checkpointing in (False, True):
        for micro in micro_batches(batch):
            used = peak(micro, checkpointing)
            if used is not None and used <= budget_bytes:
                return MemoryPlan(batch, micro, checkpointing, used, budget_bytes)
            if used is not None:
                lowest = used if lowest is None else min(lowest, used)
    seen = "out of memory at every size" if lowest is None else f"{lowest / GIB:.2f} GiB"
    raise MemoryBudgetError(
        f"no micro-batch fits the GPU memory budget of {budget_bytes / GIB:.2f} GiB, even one "
        f"sample with activation checkpointing (smallest peak: {seen}); raise [compute] "
        "gpu_memory_gib, free the GPU, or choose a smaller image preset"
    )


def measure_step_peak(
    model: nn.Module, input_shape: tuple[int, ...], micro: int, checkpointing: bool
) -> int | None:
    """Peak bytes PyTorch reserved on the model's CUDA device through one AdamW training step
    on a random batch (``micro``, *``input_shape``) under the training's autocast: everything
    the process holds there (weights, optimiser state, crops already on the device,
    activations), the CUDA context aside; None when it ran out of memory. The model's weights
    are restored."""
    from fedmets.client.training import _autocast  # the training's own mixed precision

    device = next(model.parameters()).device
    saved = {k: v.detach().clone() for k, v in model.state_dict().items()}
    model.train()
    model.checkpoint_activations(checkpointing)
    optimiser = torch.optim.AdamW(model.parameters(), lr=0.0)
    autocast, _ = _autocast(device)
    torch.cuda.synchronize(device)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats(device)
    try:
        x = torch.rand(micro, *input_shape, device=device)
        with autocast:
            logits = model(x)
        logits.float().sum().backward()
        optimiser.step()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_reserved(device)
    except torch.cuda.OutOfMemoryError:
        return None
    finally:
        optimiser.zero_grad(set_to_none=True)
        del optimiser
        model.checkpoint_activations(False)
        model.load_state_dict(saved)
        torch.cuda.empty_cache()


def plan_image_training(
    model: nn.Module,
    input_shape: tuple[int, ...],
    batch: int,
    device: torch.device,
    budget_bytes: int | None,
) -> MemoryPlan:
    """The plan for training ``model`` (an ``ImageClassifier``, moved to ``device`` here) on
    items of ``input_shape`` (C, S, S, S) at effective batch ``batch`` within
    ``budget_bytes``; the whole batch when there is no budget (CPU)."""
    if device.type != "cuda" or budget_bytes is None:
        return MemoryPlan(batch, batch, False)
    model.to(device)
    return choose_plan(
        batch,
        budget_bytes,
        lambda micro, checkpointing: measure_step_peak(model, input_shape, micro, checkpointing),
    )
