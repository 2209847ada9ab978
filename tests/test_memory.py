"""Memory-aware image training (fedmets.client.memory): gradient accumulation gives the whole
batch's update, activation checkpointing gives the same values, the planner keeps the first plan
that fits, and on a GPU the measured plan stays inside its budget."""

import numpy as np
import pytest
import torch
from torch.utils.data import DataLoader

from fedmets.client.crops import CropDataset
from fedmets.client.memory import (
    CUDA_CONTEXT_BYTES,
    GIB,
    MemoryBudgetError,
    MemoryPlan,
    choose_plan,
    lane_budget_bytes,
    measure_step_peak,
    micro_batches,
    plan_image_training,
    split_budget,
)
from fedmets.client.training import WholeBatches, _autocast, _backward, train_image_model
from fedmets.shared.image_models import build_image_model
from fedmets.shared.image_presets import BACKBONES, IMAGE_PRESETS
from fedmets.shared.reproducibility import set_seed


def _crops(n: int = 12, side: int = 32) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    return rng.random((n, 2, side, side, side), dtype=np.float32), np.arange(n) % 3 == 0


def _history(backbone: str, plan: MemoryPlan | None) -> dict:
    images, labels = _crops()
    set_seed(5)
    model = build_image_model(IMAGE_PRESETS["cpu-small"][backbone])
    return train_image_model(
        model,
        CropDataset(images, labels, augment=True, seed=5),
        epochs=2,
        lr=1e-3,
        pos_weight=2.0,
        seed=5,
        device="cpu",
        batch_size=6,
        proximal_mu=0.1,
        memory=plan,
    )


@pytest.mark.parametrize("backbone", BACKBONES)
def test_accumulated_micro_batches_give_the_whole_batch_gradient(backbone: str) -> None:
    images, labels = _crops(6)
    x, y = torch.from_numpy(images), torch.from_numpy(labels.astype(np.float32))
    set_seed(1)
    model = build_image_model(IMAGE_PRESETS["cpu-small"][backbone])  # training mode: dropout
    anchor = [p.detach() + 0.01 for p in model.parameters()]
    loss_fn = torch.nn.BCEWithLogitsLoss(pos_weight=torch.tensor(2.0))
    autocast, scaler = _autocast(torch.device("cpu"))

    def gradient(micro: int | None) -> tuple[float, list[torch.Tensor]]:
        model.zero_grad()
        torch.manual_seed(2)  # the same dropout masks: they are drawn sample by sample
        loss, _ = _backward(model, x, y, loss_fn, autocast, scaler, micro, anchor, 0.1)
        return loss, [p.grad.clone() for p in model.parameters()]

    whole_loss, whole = gradient(None)
    # 6 = 3 + 3, and 6 = 4 + 2: chunk losses weighted by their share (unweighted: twice the
    # gradient; equal weights for 4 + 2: another one)
    for micro in (3, 4):
        loss, chunked = gradient(micro)
        assert loss == pytest.approx(whole_loss, rel=1e-5)
        worst = max(float((a - b).abs().max()) for a, b in zip(whole, chunked, strict=True))
        scale = max(float(a.abs().max()) for a in whole)
        # float32 sums in another order (1.2e-5 of the scale on one torch thread): a wrong
        # weighting of the chunks is off by a share of the whole gradient
        assert worst <= 1e-4 * scale, (micro, worst, scale)


def test_training_with_accumulation_follows_the_whole_batch_run() -> None:
    whole = _history("resnet3d", None)
    chunked = _history("resnet3d", MemoryPlan(6, 4, False))
    # the first epoch's mean loss: its batches start from the same weights up to rounding
    assert chunked["train_loss"][0] == pytest.approx(whole["train_loss"][0], rel=1e-5)
    assert chunked["train_loss"][1] == pytest.approx(whole["train_loss"][1], rel=1e-2)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_checkpointing_gives_the_same_values_and_gradients(backbone: str) -> None:
    set_seed(0)
    model = build_image_model(IMAGE_PRESETS["cpu-small"][backbone]).eval()  # no dropout draws
    x = torch.rand(2, 2, 32, 32, 32)
    plain = model(x)
    plain.sum().backward()
    grads = [p.grad.clone() for p in model.parameters()]
    model.zero_grad()
    model.checkpoint_activations(True)
    assert all("forward" in vars(stage) for stage in model._stages)
    again = model(x)
    again.sum().backward()
    assert torch.equal(plain, again)
    assert all(torch.equal(a, p.grad) for a, p in zip(grads, model.parameters(), strict=True))
    model.checkpoint_activations(False)
    assert not any("forward" in vars(stage) for stage in model._stages)
    assert set(model.state_dict()) == set(build_image_model(model.cfg).state_dict())


def test_training_under_a_checkpointing_plan_leaves_plain_stages() -> None:
    images, labels = _crops(4)
    model = build_image_model(IMAGE_PRESETS["cpu-small"]["resnet3d"])
    train_image_model(
        model,
        CropDataset(images, labels),
        epochs=1,
        lr=1e-3,
        pos_weight=1.0,
        seed=0,
        device="cpu",
        batch_size=2,
        memory=MemoryPlan(2, 1, True),
    )
    assert not any("forward" in vars(stage) for stage in model._stages)


def test_micro_batches_halve_down_to_one() -> None:
    assert micro_batches(16) == [16, 8, 4, 2, 1]
    assert micro_batches(6) == [6, 3, 2, 1]
    assert micro_batches(1) == [1]


def test_the_planner_keeps_the_first_plan_that_fits() -> None:
    def peak(micro: int, checkpointing: bool) -> int | None:
        """A model whose activations take 1 GiB per sample (0.25 with checkpointing) over
        2 GiB of weights; more than 12 GiB is out of memory."""
        used = 2 * GIB + micro * (GIB // 4 if checkpointing else GIB)
        return None if used > 12 * GIB else used

    assert choose_plan(8, 11 * GIB, peak) == MemoryPlan(8, 8, False, 10 * GIB, 11 * GIB)
    plan = choose_plan(16, 7 * GIB, peak)  # 16 and 8 do not fit, 4 does
    assert (plan.micro_batch, plan.checkpointing, plan.accumulation) == (4, False, 4)
    assert plan.describe() == "batch 16 = 4 x 4, peak 6.0 of 7.0 GiB"
    plan = choose_plan(16, int(2.6 * GIB), peak)  # not even one sample: checkpointing
    assert (plan.micro_batch, plan.checkpointing) == (2, True)
    with pytest.raises(MemoryBudgetError, match=r"2.10 GiB.*smallest peak: 2.25 GiB"):
        choose_plan(16, int(2.1 * GIB), peak)


def test_trainings_at_once_share_what_their_cuda_contexts_leave() -> None:
    """Each process that trains beside others takes a CUDA context (~0.5 GiB) besides its
    share: the shares and the contexts together stay within what the device has free."""
    assert CUDA_CONTEXT_BYTES == GIB // 2
    assert split_budget(24 * GIB, None, 4) == int(5.5 * GIB)  # (24 - 4 x 0.5) / 4
    assert split_budget(24 * GIB, 16.0, 4) == 4 * GIB  # the site's cap binds
    assert split_budget(24 * GIB, 24.0, 4) == int(5.5 * GIB)  # the free memory binds
    assert split_budget(24 * GIB, None, 1) == int(23.5 * GIB)
    for free, gib, lanes in [(24 * GIB, None, 5), (80 * GIB, 40.0, 8), (int(4.2 * GIB), 3.0, 8)]:
        share = split_budget(free, gib, lanes)
        assert lanes * (share + CUDA_CONTEXT_BYTES) <= free
        assert gib is None or lanes * share <= gib * GIB
    with pytest.raises(MemoryBudgetError, match=r"8 trainings at once.*4.0 GiB\) leave nothing"):
        split_budget(4 * GIB, None, 8)
    assert lane_budget_bytes(torch.device("cpu"), 8.0, 4) is None  # no budget on the CPU


def test_no_plan_is_measured_on_the_cpu() -> None:
    model = build_image_model(IMAGE_PRESETS["cpu-small"]["swin3d"])
    plan = plan_image_training(model, (2, 32, 32, 32), 8, torch.device("cpu"), None)
    assert plan == MemoryPlan(8, 8, False)
    assert plan.describe() == "batch 8 = 1 x 8"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_a_measured_plan_fits_its_budget_on_the_gpu() -> None:
    device = torch.device("cuda")
    model = build_image_model(IMAGE_PRESETS["cpu-small"]["swin3d"]).to(device)
    whole = measure_step_peak(model, (2, 64, 64, 64), 8, False)
    budget = int(whole * 0.7)  # the whole batch does not fit
    plan = plan_image_training(model, (2, 64, 64, 64), 8, device, budget)
    assert plan.micro_batch < 8 or plan.checkpointing
    assert plan.peak_bytes <= budget


@pytest.mark.parametrize(("n", "batch"), [(13, 4), (12, 4), (9, 8), (1, 4), (72, 71)])
def test_every_sample_is_trained_in_the_loaders_order(n: int, batch: int) -> None:
    """The training batches: the order a shuffled, seeded DataLoader gives, each sample once
    (a lone last one in the batch before it, never dropped)."""
    generator = torch.Generator().manual_seed(5)
    sampler = WholeBatches(n, batch, generator)
    ours = [b.tolist() for b in DataLoader(range(n), batch_sampler=sampler, generator=generator)]
    loader = DataLoader(range(n), batch, shuffle=True, generator=torch.Generator().manual_seed(5))
    assert [i for b in ours for i in b] == [i for b in loader for i in b.tolist()]
    assert len(ours) == len(sampler) and min(map(len, ours)) > (1 if n > 1 else 0)
    assert max(map(len, ours)) <= batch + 1
