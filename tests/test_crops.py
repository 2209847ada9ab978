"""fedmets.client.crops.CropDataset: the seeded augmentation stream and where the crops are held."""

import numpy as np
import pytest
import torch

from fedmets.client.crops import CropDataset, load_crops
from fedmets.shared.config import load_site_config
from fedmets.simulation.site_files import write_site_config
from fedmets.simulation.synth import IMAGE_MODALITIES


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


def test_a_model_larger_than_its_crops_is_refused_not_upsampled(tmp_path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "crop.npz"
    mask = (rng.random((32, 32, 32)) > 0.5).astype(np.uint8)
    np.savez(
        path, ct=rng.integers(-200, 300, (32, 32, 32)).astype(np.int16), tumour=mask, ring=mask
    )
    assert load_crops([path], 32).shape == (1, 2, 32, 32, 32)
    assert load_crops([path], 32 // 2).shape == (1, 2, 16, 16, 16)  # downsampled: allowed
    with pytest.raises(
        ValueError,
        match=r"crop.npz: the crop is 32x32x32 voxels, smaller than"
        r" the 64\^3 .*crop_voxels = \[64, 64, 64\]",
    ):
        load_crops([path], 64)
    assert load_crops([path], 64, fit="crop").shape == (1, 2, 64, 64, 64)  # native, zero-padded


def test_a_site_config_can_ask_for_native_crops(tmp_path) -> None:
    path = write_site_config(
        tmp_path / "a",
        "hospital_a",
        mode="images",
        modalities=IMAGE_MODALITIES,
        seed=1,
        crop_voxels=96,
    )
    assert load_site_config(path).preprocess.crop_voxels == [96, 96, 96]
    default = write_site_config(
        tmp_path / "b", "hospital_b", mode="images", modalities=IMAGE_MODALITIES, seed=1
    )
    assert load_site_config(default).preprocess.crop_voxels == [64, 64, 64]
