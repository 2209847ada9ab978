"""fedmets.client.crops.CropDataset: the seeded augmentation stream and where the crops are held."""

import numpy as np
import pytest
import torch

from fedmets.client.crops import CropDataset


@pytest.fixture
def crops() -> tuple[np.ndarray, np.ndarray]:
    """Six random crops (6, 2, 16, 16, 16) float32 in [0, 1] and labels (6,)."""
    rng = np.random.default_rng(0)
    return rng.random((6, 2, 16, 16, 16), dtype=np.float32), np.array([0, 1, 0, 0, 1, 0])


def _items(data: CropDataset) -> torch.Tensor:
    return torch.stack([data[i][0].cpu() for i in range(len(data))])


def test_unaugmented_items_are_the_crops_and_their_labels(crops) -> None:
    images, labels = crops
    data = CropDataset(images, labels, device="cpu")
    assert torch.equal(_items(data), torch.from_numpy(images))
    assert [float(data[i][1]) for i in range(len(data))] == labels.tolist()
    assert torch.isnan(CropDataset(images)[0][1])


def test_augmentation_is_a_stream_fixed_by_the_seed(crops) -> None:
    images, labels = crops
    first = _items(CropDataset(images, labels, augment=True, seed=3))
    again = _items(CropDataset(images, labels, augment=True, seed=3))
    other = _items(CropDataset(images, labels, augment=True, seed=4))
    assert first.shape == images.shape and first.dtype == torch.float32
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    changed = [not torch.equal(first[i], torch.from_numpy(images[i])) for i in range(6)]
    assert sum(changed) >= 3  # each item: 3 flips at p 0.5 and an affine at p 0.5
    assert first.min() >= -1e-6 and first.max() <= 1 + 1e-6  # resampled, border-padded


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_crops_held_on_the_gpu_give_the_cpu_stream(crops) -> None:
    images, labels = crops
    on_gpu = CropDataset(images, labels, augment=True, seed=3, device="cuda")
    assert on_gpu[0][0].device.type == "cuda"
    on_cpu = _items(CropDataset(images, labels, augment=True, seed=3))
    assert torch.allclose(_items(on_gpu), on_cpu, atol=1e-4)
