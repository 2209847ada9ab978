"""The networks of the study: 3-D image classifiers on tumour crops and the fusion network.

Image model (stage 1 trains it on crops, stage 2 reads its deep features): a MONAI encoder
(``swin3d``: the Swin UNETR encoder ``SwinTransformer``; ``resnet3d``: ``ResNet`` with basic
blocks; ``densenet3d``: ``DenseNet``), global average pooling to a feature vector of
:attr:`ImageClassifier.feature_dim` values, dropout and one linear unit giving the DM logit.

Input ``x``: float32 (B, C, S, S, S), S = ``crop_voxels``; channel 0 is the CT in normalised HU
(window scaled to about [0, 1] or [-1, 1]), channel 1 (when ``in_channels`` is 2) the
peritumoral ring mask (0/1). Outputs are logits: apply a sigmoid for a probability.

Every normalisation layer is federation- and DP-friendly: LayerNorm in Swin, GroupNorm in the
CNNs -- no BatchNorm, so no running statistics to average across sites and no mixing of
samples within a batch (per-sample gradients stay per sample).

Fusion model (stage 3): :class:`FusionNet`, a fully connected network on the concatenation of
the feature groups it was built for, in the order of :data:`FUSION_GROUPS`.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from itertools import combinations
from typing import Any, Literal

import numpy as np
import torch
from monai.networks.nets import DenseNet, ResNet
from monai.networks.nets.swin_unetr import SwinTransformer
from pydantic import BaseModel, ConfigDict, Field, model_validator
from sklearn.utils.class_weight import compute_class_weight
from torch import nn

Backbone = Literal["swin3d", "resnet3d", "densenet3d"]
BACKBONES: tuple[str, ...] = Backbone.__args__

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


IMAGE_PRESETS: dict[str, dict[str, ImageModelConfig]] = {
    # 32^3 crops, ~0.7-0.9 M parameters per backbone: trains on a laptop CPU.
    "cpu-small": _presets(
        32,
        swin={"embed_dim": 16, "num_heads": (2, 4, 8, 16), "window_size": 4},
        resnet={"widths": (16, 32, 64, 128), "depths": (1, 1, 1, 1), "norm_groups": 8},
        densenet={"init_features": 16, "growth_rate": 8, "depths": (6, 12, 24, 16)},
    ),
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


class _SwinEncoder(nn.Module):
    """MONAI's Swin UNETR encoder; its last stage (LayerNorm-ed, embed_dim * 16 channels)
    average-pooled: (B, C, S, S, S) -> (B, embed_dim * 16)."""

    def __init__(self, cfg: ImageModelConfig) -> None:
        super().__init__()
        self.swin = SwinTransformer(
            in_chans=cfg.in_channels,
            embed_dim=cfg.embed_dim,
            window_size=(cfg.window_size,) * 3,
            patch_size=(cfg.patch_size,) * 3,
            depths=cfg.depths,
            num_heads=cfg.num_heads,
            drop_path_rate=cfg.drop_path,
            spatial_dims=3,
            use_flash_attention=True,  # fused attention where no gradient is needed
        )
        self.feature_dim = cfg.embed_dim * 2 ** len(cfg.depths)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.swin(x, normalize=True)[-1].mean(dim=(2, 3, 4))


class _ResNet(ResNet):
    """MONAI ResNet whose residual blocks use the ``norm`` given for the stem: MONAI 1.6 passes
    it to the stem only and builds the blocks with BatchNorm (Project-MONAI/MONAI#9028)."""

    def __init__(self, *, norm: str | tuple, **kwargs: Any) -> None:
        self._block_norm = norm  # read by _make_layer during ResNet.__init__
        super().__init__(norm=norm, **kwargs)

    def _make_layer(self, *args: Any, **kwargs: Any) -> nn.Sequential:
        kwargs["norm"] = self._block_norm
        return super()._make_layer(*args, **kwargs)


def _group_norm(cfg: ImageModelConfig) -> tuple[str, dict[str, int]]:
    return ("group", {"num_groups": cfg.norm_groups})


def _resnet_encoder(cfg: ImageModelConfig) -> tuple[nn.Module, int]:
    """Basic-block ResNet with GroupNorm, pooled: (B, C, S, S, S) -> (B, widths[-1])."""
    net = _ResNet(
        block="basic",
        layers=list(cfg.depths),
        block_inplanes=list(cfg.widths),
        spatial_dims=3,
        n_input_channels=cfg.in_channels,
        conv1_t_stride=cfg.stem_stride,
        feed_forward=False,
        norm=_group_norm(cfg),
    )
    return net, cfg.widths[-1]


def _densenet_encoder(cfg: ImageModelConfig) -> tuple[nn.Module, int]:
    """DenseNet with GroupNorm, pooled, its output layer removed: (B, C, S, S, S) -> (B, D)."""
    net = DenseNet(
        spatial_dims=3,
        in_channels=cfg.in_channels,
        out_channels=1,
        init_features=cfg.init_features,
        growth_rate=cfg.growth_rate,
        block_config=cfg.depths,
        act=("relu", {"inplace": False}),  # Opacus's per-sample gradient hooks need this
        norm=_group_norm(cfg),
    )
    feature_dim = net.class_layers.out.in_features
    net.class_layers.out = nn.Identity()
    return net, feature_dim


class ImageClassifier(nn.Module):
    """Encoder + global average pooling -> deep features (B, D); dropout + linear -> logits
    (B,). ``feature_dim`` is D: swin3d ``embed_dim * 16``, resnet3d ``widths[-1]``, densenet3d
    the channels after its last dense block."""

    def __init__(self, cfg: ImageModelConfig, encoder: nn.Module, feature_dim: int) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(feature_dim, 1)

    def deep_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S, S) -> (B, D) pooled encoder features; call ``eval()`` before
        extracting (Swin's stochastic depth, when ``drop_path`` > 0, acts in training mode)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S, S) -> (B,) DM logits."""
        return self.head(self.dropout(self.encoder(x))).squeeze(-1)


def build_image_model(cfg: ImageModelConfig) -> ImageClassifier:
    """A freshly initialised classifier for ``cfg`` (weights drawn from torch's global
    generator: call :func:`shared.reproducibility.set_seed` first)."""
    if cfg.backbone == "swin3d":
        encoder = _SwinEncoder(cfg)
        return ImageClassifier(cfg, encoder, encoder.feature_dim)
    if cfg.backbone == "resnet3d":
        return ImageClassifier(cfg, *_resnet_encoder(cfg))
    return ImageClassifier(cfg, *_densenet_encoder(cfg))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


FUSION_GROUPS: tuple[str, ...] = ("deep", "radiomics", "clinical")
"""Feature groups the fusion network can take, in the order they are concatenated."""


NO_IMAGE = "none"
"""Backbone part of the key of a model without deep features (``"none/radiomics"``)."""


def model_key(backbone: str | None, groups: Sequence[str]) -> str:
    """``"<backbone>/<group>+<group>"``, e.g. ``"swin3d/deep+radiomics+clinical"``,
    ``"none/clinical"``."""
    return f"{backbone or NO_IMAGE}/{'+'.join(groups)}"


def group_subsets() -> list[tuple[str, ...]]:
    """Every non-empty subset of :data:`FUSION_GROUPS` (singles, pairs, all): the ablations."""
    return [c for k in range(1, 4) for c in combinations(FUSION_GROUPS, k)]


class FusionNet(nn.Module):
    """Fully connected network: (B, F) -> (B,) DM logits, F = the summed widths of
    ``input_groups``. Each hidden layer is Linear -> LayerNorm (``norm="layer"``) or nothing
    (``norm="none"``) -> ReLU -> Dropout.

    Two optional guards against one wide group swamping the others on a small cohort:

    - ``bottleneck``: ``{group: k}``; that group's columns first pass through their own linear
      map to ``k`` values (a learnt per-group compression, e.g. 384 deep features -> 8) before
      the concatenation feeds the hidden layers; groups not named pass through unchanged.
    - ``group_dropout``: in training mode only, each group of each sample is replaced by zeros
      (the training mean of standardised inputs: "this group is missing") with this
      probability, so the network cannot lean on one group alone (modality dropout). No
      effect with a single group or in eval mode.
    """

    def __init__(
        self,
        group_dims: Mapping[str, int],
        hidden: Sequence[int] = (64, 32),
        dropout: float = 0.2,
        norm: Literal["layer", "none"] = "layer",
        bottleneck: Mapping[str, int] | None = None,
        group_dropout: float = 0.0,
    ) -> None:
        """``group_dims``: the width of each group used (a subset of :data:`FUSION_GROUPS`);
        ``bottleneck`` may name groups not used (ignored)."""
        super().__init__()
        unknown = sorted(set(group_dims) - set(FUSION_GROUPS))
        if unknown or not group_dims:
            raise ValueError(f"group_dims needs groups among {FUSION_GROUPS}, got {unknown}")
        if any(width < 1 for width in group_dims.values()):
            raise ValueError(f"every group needs a width >= 1, got {dict(group_dims)}")
        bottleneck = dict(bottleneck or {})
        if sorted(set(bottleneck) - set(FUSION_GROUPS)) or any(k < 1 for k in bottleneck.values()):
            raise ValueError(f"bottleneck needs widths >= 1 of groups among {FUSION_GROUPS}")
        if not 0 <= group_dropout < 1:
            raise ValueError(f"group_dropout must be in [0, 1), got {group_dropout}")
        self.input_groups = tuple(g for g in FUSION_GROUPS if g in group_dims)
        self.group_dims = {g: int(group_dims[g]) for g in self.input_groups}
        self.group_dropout = float(group_dropout)
        self.bottleneck = nn.ModuleDict(
            {
                g: nn.Linear(self.group_dims[g], int(bottleneck[g]))
                for g in self.input_groups
                if g in bottleneck
            }
        )
        layers: list[nn.Module] = []
        width = sum(int(bottleneck.get(g, d)) for g, d in self.group_dims.items())
        for size in hidden:
            layers.append(nn.Linear(width, size))
            if norm == "layer":
                layers.append(nn.LayerNorm(size))
            layers += [nn.ReLU(), nn.Dropout(dropout)]
            width = size
        layers.append(nn.Linear(width, 1))
        self.net = nn.Sequential(*layers)

    def concat(self, groups: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """Concatenate this network's groups (each (B, width)) in order -> (B, F); groups it
        was not built for are ignored."""
        missing = [g for g in self.input_groups if g not in groups]
        if missing:
            raise ValueError(f"missing feature groups {missing}")
        for g in self.input_groups:
            if groups[g].shape[-1] != self.group_dims[g]:
                raise ValueError(
                    f"group {g!r} has width {groups[g].shape[-1]}, expected {self.group_dims[g]}"
                )
        return torch.cat([groups[g] for g in self.input_groups], dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, F) -> (B,) logits."""
        if not len(self.bottleneck) and not (self.training and self.group_dropout > 0):
            return self.net(x).squeeze(-1)
        parts = list(torch.split(x, list(self.group_dims.values()), dim=-1))
        if self.training and self.group_dropout > 0 and len(parts) > 1:
            keep = torch.rand(x.shape[0], len(parts), device=x.device) >= self.group_dropout
            parts = [p * keep[:, i : i + 1].to(p.dtype) for i, p in enumerate(parts)]
        parts = [
            self.bottleneck[g](p) if g in self.bottleneck else p
            for g, p in zip(self.input_groups, parts, strict=True)
        ]
        return self.net(torch.cat(parts, dim=-1)).squeeze(-1)


def positive_class_weight(labels: np.ndarray | Sequence[int]) -> float:
    """``pos_weight`` for ``BCEWithLogitsLoss``: negatives / positives among 0/1 ``labels``
    (the ratio of scikit-learn's "balanced" class weights); both classes must occur."""
    y = np.asarray(labels)
    weights = compute_class_weight("balanced", classes=np.array([0, 1]), y=y)
    return float(weights[1] / weights[0])


def input_blocks(group_dims: Mapping[str, int], clinical_columns: Sequence[str]) -> list[tuple]:
    """The fusion input's blocks for permutation importance, as (name, column indices) in the
    concatenation order of :class:`FusionNet`: each radiomics column (``radiomics:<i>``, i its
    rank among the selected columns), each clinical variable (its encoded columns together,
    ``clinical:<variable>``), the deep features as one block (``deep``)."""
    from shared.clinical import encoded_variable

    blocks, start = [], 0
    for group in (g for g in FUSION_GROUPS if g in group_dims):
        width = int(group_dims[group])
        if group == "radiomics":
            blocks += [(f"radiomics:{i}", [start + i]) for i in range(width)]
        elif group == "clinical":
            variables: dict[str, list[int]] = {}
            for i, column in enumerate(clinical_columns):
                variables.setdefault(encoded_variable(column), []).append(start + i)
            blocks += [(f"clinical:{v}", cols) for v, cols in variables.items()]
        else:
            blocks.append(("deep", list(range(start, start + width))))
        start += width
    return blocks
