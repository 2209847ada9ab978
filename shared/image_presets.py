"""The image classifiers' settings (``fedmets.shared.image_models`` builds the networks): the
backbones, the crop-side rule and the named presets. Pydantic only, no torch or MONAI, so the
ServerApp and the command line read them without loading the networks' libraries."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

Backbone = Literal["swin3d", "resnet3d", "densenet3d"]
BACKBONES: tuple[str, ...] = Backbone.__args__
DP_SGD_BACKBONES: tuple[str, ...] = ("resnet3d", "densenet3d")
"""Backbones Opacus' DP-SGD can train (``fedmets.client.privacy``): not swin3d, whose window
attention runs its linear layers on windows folded into the batch axis."""

CROP_MULTIPLE = 32
"""Crops are cubes whose side is a multiple of this: each backbone halves the grid five times
(Swin: patch 2 and four patch mergings; DenseNet: stem, pooling and three transitions)."""


class ImageModelConfig(BaseModel):
    """How to build an image classifier. Fields marked for one backbone are ignored by the
    others; ``depths`` counts blocks per stage for every backbone (Swin transformer blocks,
    ResNet residual blocks, DenseNet dense layers)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    backbone: Backbone
    crop_voxels: int = Field(32, ge=CROP_MULTIPLE, le=512)  # cube side S in voxels
    in_channels: Literal[1, 2] = 2  # 1: CT; 2: CT + peritumoral ring mask
    dropout: float = Field(0.0, ge=0, lt=1)  # on the deep features, before the linear head
    depths: tuple[int, ...] = Field((2, 2, 2, 2), min_length=1)
    # swin3d
    embed_dim: int = Field(16, ge=1)  # stage-1 width; stage i has embed_dim * 2**i channels
    num_heads: tuple[int, ...] = (2, 4, 8, 16)  # attention heads per stage
    window_size: int = Field(4, ge=1)  # attention window side (voxels of the stage's grid)
    patch_size: int = Field(2, ge=1)
    drop_path: float = Field(0.0, ge=0, lt=1)  # stochastic depth rate of the last block
    # resnet3d
    widths: tuple[int, ...] = (16, 32, 64, 128)  # channels of the four stages
    stem_stride: Literal[1, 2] = 1  # stride of the 7^3 stem convolution
    # densenet3d
    init_features: int = Field(16, ge=1)
    growth_rate: int = Field(8, ge=1)
    # resnet3d and densenet3d
    norm_groups: int = Field(8, ge=1)  # GroupNorm groups; must divide every channel count

    @model_validator(mode="after")
    def _fits_backbone(self) -> ImageModelConfig:
        problems = []
        if self.crop_voxels % CROP_MULTIPLE:
            problems.append(f"crop_voxels must be a multiple of {CROP_MULTIPLE}")
        if self.backbone == "swin3d":
            if len(self.depths) != 4 or len(self.num_heads) != 4:
                problems.append("swin3d needs 4 depths and 4 num_heads (MONAI's 4 stages)")
            elif any(self.embed_dim * 2**i % h for i, h in enumerate(self.num_heads)):
                problems.append("num_heads[i] must divide embed_dim * 2**i")
        if self.backbone == "resnet3d" and (len(self.depths) != 4 or len(self.widths) != 4):
            problems.append("resnet3d needs 4 depths and 4 widths (MONAI's 4 stages)")
        if problems:
            raise ValueError("; ".join(problems))
        return self


def _presets(
    crop: int, swin: dict[str, Any], resnet: dict[str, Any], densenet: dict[str, Any]
) -> dict[str, ImageModelConfig]:
    """One config per backbone at ``crop``^3, CT + ring channels, dropout 0.2 before the head."""
    common = {"crop_voxels": crop, "in_channels": 2, "dropout": 0.2}
    return {
        "swin3d": ImageModelConfig(backbone="swin3d", **common, **swin),
        "resnet3d": ImageModelConfig(backbone="resnet3d", **common, **resnet),
        "densenet3d": ImageModelConfig(backbone="densenet3d", **common, **densenet),
    }


def at_crop_size(
    configs: dict[str, ImageModelConfig], crop_voxels: int
) -> dict[str, ImageModelConfig]:
    """The same backbone configs on ``crop_voxels``^3 crops (validated like any config)."""
    return {
        name: ImageModelConfig.model_validate({**cfg.model_dump(), "crop_voxels": crop_voxels})
        for name, cfg in configs.items()
    }


_CPU_SMALL = _presets(
    32,
    swin={"embed_dim": 16, "num_heads": (2, 4, 8, 16), "window_size": 4},
    resnet={"widths": (16, 32, 64, 128), "depths": (1, 1, 1, 1), "norm_groups": 8},
    densenet={"init_features": 16, "growth_rate": 8, "depths": (6, 12, 24, 16)},
)

IMAGE_PRESETS: dict[str, dict[str, ImageModelConfig]] = {
    # 32^3 crops, ~0.7-0.9 M parameters per backbone: trains on a laptop CPU.
    "cpu-small": _CPU_SMALL,
    # The cpu-small networks on 64^3 crops: the demo cohort's own crop (native, nothing
    # upsampled) and the seed paper's; a GPU's work (a Swin3D epoch is 80 s on 2 CPU cores).
    "paper": at_crop_size(_CPU_SMALL, 64),
    # 96^3 crops: the Swin UNETR encoder as published (feature size 48, window 7), a ResNet-18
    # layout at half width and DenseNet-121; 8-11 M parameters each.
    "gpu": _presets(
        96,
        swin={"embed_dim": 48, "num_heads": (3, 6, 12, 24), "window_size": 7},
        resnet={
            "widths": (32, 64, 128, 256),
            "depths": (2, 2, 2, 2),
            "stem_stride": 2,
            "norm_groups": 16,
        },
        densenet={
            "init_features": 64,
            "growth_rate": 32,
            "depths": (6, 12, 24, 16),
            "norm_groups": 16,
        },
    ),
}
"""Preset name -> backbone -> config. Change a field with
``ImageModelConfig.model_validate({**cfg.model_dump(), "in_channels": 1})``."""
