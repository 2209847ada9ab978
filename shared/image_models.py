"""The 3-D image classifiers of the study, on tumour crops (stage 1 trains them, stage 2 reads
their deep features).

A MONAI encoder (``swin3d``: the Swin UNETR encoder ``SwinTransformer``; ``resnet3d``:
``ResNet`` with basic blocks; ``densenet3d``: ``DenseNet``), global average pooling to a feature
vector of :attr:`ImageClassifier.feature_dim` values, dropout and one linear unit giving the DM
logit.

Input ``x``: float32 (B, C, S, S, S), S = ``crop_voxels``; channel 0 is the CT in normalised HU
(window scaled to about [0, 1] or [-1, 1]), channel 1 (when ``in_channels`` is 2) the
peritumoral ring mask (0/1). Outputs are logits: apply a sigmoid for a probability.

Every normalisation layer is federation- and DP-friendly: LayerNorm in Swin, GroupNorm in the
CNNs -- no BatchNorm, so no running statistics to average across sites and no mixing of
samples within a batch (per-sample gradients stay per sample).

Kept apart from the fusion network (``fedmets.shared.models``) so that a process that trains or
evaluates only the fusion network never imports MONAI.
"""

from __future__ import annotations

from collections.abc import Callable
from functools import partial
from typing import Any

import torch
import torch.utils.checkpoint
from monai.networks.nets import DenseNet, ResNet
from monai.networks.nets.densenet import _DenseBlock
from monai.networks.nets.resnet import ResNetBlock
from monai.networks.nets.swin_unetr import SwinTransformer
from torch import nn

from fedmets.shared.image_presets import ImageModelConfig


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


class _ResidualBlock(ResNetBlock):
    """MONAI's basic residual block with the shortcut added out of place: MONAI adds it in place
    (``out += residual``) onto the output of a layer whose gradient Opacus hooks, which autograd
    forbids, so DP-SGD could not train ``resnet3d``. Same layers, same arithmetic."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C_in, D, H, W) -> (B, planes, D', H', W')."""
        out = self.bn2(self.conv2(self.act(self.bn1(self.conv1(x)))))
        residual = x if self.downsample is None else self.downsample(x)
        return self.act(out + residual)


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
        block=_ResidualBlock,
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

    def __init__(
        self,
        cfg: ImageModelConfig,
        encoder: nn.Module,
        feature_dim: int,
        stages: list[nn.Module],
    ) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = encoder
        self.feature_dim = feature_dim
        self.dropout = nn.Dropout(cfg.dropout)
        self.head = nn.Linear(feature_dim, 1)
        self._stages = stages  # the encoder's stages (a plain list: not registered twice)

    def checkpoint_activations(self, on: bool) -> None:
        """Activation checkpointing of the encoder's stages: in training, each stage keeps only
        its input and recomputes its activations in the backward pass (less memory, about a
        third more compute; same weights, same results). Off by default."""
        for stage in self._stages:
            if on:
                stage.forward = partial(checkpoint, type(stage).forward.__get__(stage))
            else:
                stage.__dict__.pop("forward", None)

    def deep_features(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S, S) -> (B, D) pooled encoder features; call ``eval()`` before
        extracting (Swin's stochastic depth, when ``drop_path`` > 0, acts in training mode)."""
        return self.encoder(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """(B, C, S, S, S) -> (B,) DM logits."""
        return self.head(self.dropout(self.encoder(x))).squeeze(-1)


def build_image_model(cfg: ImageModelConfig) -> ImageClassifier:
    """A freshly initialised classifier for ``cfg`` (weights drawn from torch's global
    generator: call :func:`fedmets.shared.reproducibility.set_seed` first)."""
    if cfg.backbone == "swin3d":
        encoder = _SwinEncoder(cfg)
        swin = encoder.swin
        stages = [swin.layers1[0], swin.layers2[0], swin.layers3[0], swin.layers4[0]]
        return ImageClassifier(cfg, encoder, encoder.feature_dim, stages)
    if cfg.backbone == "resnet3d":
        net, width = _resnet_encoder(cfg)
        return ImageClassifier(cfg, net, width, [net.layer1, net.layer2, net.layer3, net.layer4])
    net, width = _densenet_encoder(cfg)
    blocks = [m for m in net.features.children() if isinstance(m, _DenseBlock)]
    return ImageClassifier(cfg, net, width, blocks)


def checkpoint(forward: Callable[..., torch.Tensor], *args: Any) -> torch.Tensor:
    """``forward(*args)`` under activation checkpointing while gradients are recorded."""
    if torch.is_grad_enabled():
        return torch.utils.checkpoint.checkpoint(forward, *args, use_reentrant=False)
    return forward(*args)
