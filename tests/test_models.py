import random
from typing import get_args

import numpy as np
import pytest
import torch
from pydantic import ValidationError
from sklearn.metrics import roc_auc_score
from torch import nn

from fedmets.shared import wire
from fedmets.shared.config import FederationConfig, ModelSection
from fedmets.shared.image_models import build_image_model
from fedmets.shared.image_presets import BACKBONES, IMAGE_PRESETS, ImageModelConfig, at_crop_size
from fedmets.shared.model_names import (
    FUSION_GROUPS,
    Variant,
    base_model,
    fusion_networks,
    group_subsets,
    model_groups,
    network_dims,
    network_hidden,
    network_variant,
    single_group_models,
    variant_name,
)
from fedmets.shared.models import FusionNet, combine_scores, count_parameters, positive_class_weight
from fedmets.shared.reproducibility import set_seed

SMALL = IMAGE_PRESETS["cpu-small"]


def _documented_feature_dim(cfg: ImageModelConfig) -> int:
    """D as the ImageClassifier docstring states it."""
    if cfg.backbone == "swin3d":
        return cfg.embed_dim * 16
    if cfg.backbone == "resnet3d":
        return cfg.widths[-1]
    channels = cfg.init_features
    for i, layers in enumerate(cfg.depths):  # dense blocks, halved by each transition
        channels += layers * cfg.growth_rate
        channels = channels // 2 if i < len(cfg.depths) - 1 else channels
    return channels


@pytest.mark.parametrize("backbone", BACKBONES)
def test_shapes(backbone: str) -> None:
    cfg = SMALL[backbone]
    model = build_image_model(cfg)
    x = torch.randn(2, cfg.in_channels, cfg.crop_voxels, cfg.crop_voxels, cfg.crop_voxels)
    assert model(x).shape == (2,)
    features = model.deep_features(x)
    assert features.shape == (2, model.feature_dim) == (2, _documented_feature_dim(cfg))
    ct_only = build_image_model(
        ImageModelConfig.model_validate({**cfg.model_dump(), "in_channels": 1})
    )
    assert ct_only(x[:, :1]).shape == (2,)


def test_the_wire_and_the_configs_know_the_presets_by_their_names() -> None:
    """The wire's rules (pydantic-free, for the relay) and ``[model]`` name the backbones and
    presets that ``fedmets.shared.image_presets`` defines, no more and no fewer."""
    assert wire.BACKBONE_NAMES == set(BACKBONES)
    assert wire.IMAGE_PRESET_NAMES == set(IMAGE_PRESETS)
    assert set(get_args(ModelSection.model_fields["image_preset"].annotation)) == set(IMAGE_PRESETS)


def test_preset_parameter_budgets() -> None:
    counts = {
        preset: {b: count_parameters(build_image_model(cfg)) for b, cfg in configs.items()}
        for preset, configs in IMAGE_PRESETS.items()
    }
    assert counts["cpu-small"]["swin3d"] < 2_000_000 < counts["gpu"]["swin3d"]
    for preset, by_backbone in counts.items():
        swin = by_backbone["swin3d"]
        for backbone in ("resnet3d", "densenet3d"):
            assert swin / 3 < by_backbone[backbone] < 3 * swin, (preset, backbone, by_backbone)
    assert IMAGE_PRESETS["cpu-small"]["swin3d"].crop_voxels == 32
    assert IMAGE_PRESETS["gpu"]["swin3d"].crop_voxels == 96
    assert IMAGE_PRESETS["gpu"]["swin3d"].embed_dim == 48


def test_at_crop_size_keeps_the_networks_and_validates_the_side() -> None:
    """The ``paper`` image preset's way to a 64^3 model: same widths and parameter count."""
    small = IMAGE_PRESETS["cpu-small"]
    larger = at_crop_size(small, 64)
    for backbone, cfg in larger.items():
        assert cfg.crop_voxels == 64
        assert cfg.model_dump(exclude={"crop_voxels"}) == small[backbone].model_dump(
            exclude={"crop_voxels"}
        )
    model = build_image_model(larger["densenet3d"])
    assert count_parameters(model) == count_parameters(build_image_model(small["densenet3d"]))
    assert model(torch.zeros(1, 2, 64, 64, 64)).shape == (1,)
    with pytest.raises(ValidationError, match="multiple of 32"):
        at_crop_size(small, 48)
    assert IMAGE_PRESETS["paper"] == larger  # the paper preset: these networks at 64^3


def _all_models() -> list[nn.Module]:
    images = [
        build_image_model(cfg) for configs in IMAGE_PRESETS.values() for cfg in configs.values()
    ]
    fusion = [FusionNet({"deep": 8, "clinical": 3}, norm=norm) for norm in ("layer", "none")]
    return images + fusion


def test_no_batchnorm_and_opacus_accepts_every_model() -> None:
    validators = pytest.importorskip("opacus.validators")
    for model in _all_models():
        batch_norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        assert not batch_norms
        assert not [b for b in model.buffers() if b.dtype.is_floating_point]  # no running stats
        validators.ModuleValidator.validate(model, strict=True)


def test_cnn_norms_are_group_norms_and_swin_norms_layer_norms() -> None:
    for backbone, cfg in SMALL.items():
        norms = {type(m) for m in build_image_model(cfg).modules() if "Norm" in type(m).__name__}
        assert norms == ({nn.LayerNorm} if backbone == "swin3d" else {nn.GroupNorm})


def _one_step(cfg: ImageModelConfig, seed: int) -> tuple[dict, torch.Tensor, list[torch.Tensor]]:
    """Initial weights, outputs after one AdamW step, and that step's gradients."""
    set_seed(seed)
    model = build_image_model(cfg)
    initial = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(2, cfg.in_channels, cfg.crop_voxels, cfg.crop_voxels, cfg.crop_voxels)
    optimiser = torch.optim.AdamW(model.parameters(), lr=1e-3)
    loss = nn.functional.binary_cross_entropy_with_logits(model(x), torch.tensor([0.0, 1.0]))
    loss.backward()
    optimiser.step()
    grads = [p.grad.clone() for p in model.parameters()]
    return initial, model(x).detach(), grads


@pytest.mark.parametrize("backbone", BACKBONES)
def test_same_seed_same_weights_outputs_and_gradients(backbone: str) -> None:
    cfg = SMALL[backbone]
    first, second, other = _one_step(cfg, 3), _one_step(cfg, 3), _one_step(cfg, 4)
    assert first[0].keys() == second[0].keys()
    assert all(torch.equal(first[0][k], second[0][k]) for k in first[0])
    assert torch.equal(first[1], second[1])
    assert all(torch.equal(a, b) for a, b in zip(first[2], second[2], strict=True))
    assert not all(torch.equal(first[0][k], other[0][k]) for k in first[0])


def test_set_seed_seeds_python_numpy_and_torch() -> None:
    def draws() -> tuple[float, float, float]:
        legacy_numpy = np.random.rand()  # noqa: NPY002 - the global generator set_seed seeds
        return random.random(), legacy_numpy, torch.rand(1).item()

    set_seed(11)
    first = draws()
    set_seed(11)
    assert draws() == first
    set_seed(12)
    assert draws() != first


def test_swin_features_without_gradients_match_the_training_path() -> None:
    set_seed(0)
    model = build_image_model(SMALL["swin3d"]).eval()
    x = torch.randn(2, 2, 32, 32, 32)
    with torch.no_grad():
        fused = model.deep_features(x)  # scaled_dot_product_attention path
    torch.testing.assert_close(fused, model.deep_features(x).detach(), atol=1e-5, rtol=1e-4)


def test_swin_overfits_eight_crops() -> None:
    set_seed(0)
    cfg = ImageModelConfig(
        backbone="swin3d", embed_dim=12, num_heads=(1, 2, 4, 8), depths=(1, 1, 1, 1)
    )
    model = build_image_model(cfg)
    x = torch.randn(8, 2, 32, 32, 32)
    y = torch.tensor([0.0, 1.0] * 4)
    optimiser = torch.optim.AdamW(model.parameters(), lr=2e-3)
    losses = []
    for _ in range(20):
        optimiser.zero_grad()
        loss = nn.functional.binary_cross_entropy_with_logits(model(x), y)
        loss.backward()
        optimiser.step()
        losses.append(loss.item())
    assert losses[-1] < 0.1 * losses[0]


def test_fusion_net_learns_a_separable_problem() -> None:
    set_seed(1)
    dims = {"deep": 16, "radiomics": 12, "clinical": 5}
    groups = {g: torch.randn(256, d) for g, d in dims.items()}
    signal = groups["radiomics"][:, 0] - groups["clinical"][:, 1] + 0.5 * groups["deep"][:, 2]
    y = (signal > 0).float()
    model = FusionNet(dims, hidden=(32, 16), dropout=0.1)
    x = model.concat(groups)
    loss_fn = nn.BCEWithLogitsLoss(pos_weight=torch.tensor(positive_class_weight(y.numpy())))
    optimiser = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for _ in range(300):
        optimiser.zero_grad()
        loss_fn(model(x), y).backward()
        optimiser.step()
    with torch.no_grad():
        assert roc_auc_score(y.numpy(), model.eval()(x).numpy()) > 0.9


def test_fusion_net_without_hidden_layers_is_a_logistic_regression() -> None:
    model = FusionNet({"radiomics": 12, "clinical": 5}, hidden=())
    assert [type(m) for m in model.net] == [nn.Linear]
    assert sum(p.numel() for p in model.parameters()) == 12 + 5 + 1
    cfg = FederationConfig.model_validate({"run": {"name": "lr"}, "model": {"fusion_hidden": []}})
    assert cfg.model.fusion_hidden == []


@pytest.mark.parametrize("subset", group_subsets())
def test_fusion_net_takes_any_subset_of_groups(subset: tuple[str, ...]) -> None:
    dims = {"deep": 6, "radiomics": 4, "clinical": 3}
    model = FusionNet({g: dims[g] for g in reversed(subset)}, hidden=(8,))
    assert model.input_groups == subset  # always in FUSION_GROUPS order
    groups = {g: torch.full((5, d), float(i)) for i, (g, d) in enumerate(dims.items())}
    x = model.concat(groups)  # groups not in the subset are ignored
    assert x.shape == (5, sum(dims[g] for g in subset))
    assert x[0].tolist() == [float(FUSION_GROUPS.index(g)) for g in subset for _ in range(dims[g])]
    assert model(x).shape == (5,)


def test_group_subsets_are_the_seven_ablations() -> None:
    subsets = group_subsets()
    assert len(subsets) == len(set(subsets)) == 7
    assert FUSION_GROUPS in subsets and ("clinical",) in subsets


def test_fusion_net_refuses_bad_groups() -> None:
    with pytest.raises(ValueError, match="groups among"):
        FusionNet({"genomics": 3})
    with pytest.raises(ValueError, match="groups among"):
        FusionNet({})
    model = FusionNet({"deep": 4, "clinical": 2})
    with pytest.raises(ValueError, match="width 3"):
        model.concat({"deep": torch.zeros(2, 4), "clinical": torch.zeros(2, 3)})
    with pytest.raises(ValueError, match="missing"):
        model.concat({"deep": torch.zeros(2, 4)})
    assert not [
        m for m in FusionNet({"deep": 4}, norm="none").modules() if isinstance(m, nn.LayerNorm)
    ]


def _tiny_densenet() -> nn.Module:
    cfg = ImageModelConfig(
        backbone="densenet3d", init_features=8, growth_rate=8, depths=(1, 1, 1, 1), norm_groups=4
    )
    return build_image_model(cfg)  # dropout 0: per-sample gradients add up to the batch's


@pytest.mark.parametrize(
    ("make", "shape"),
    [
        (lambda: FusionNet({"radiomics": 6, "clinical": 3}, hidden=(8, 4), dropout=0.0), (9,)),
        (_tiny_densenet, (2, 32, 32, 32)),
    ],
)
def test_opacus_per_sample_gradients(make, shape: tuple[int, ...]) -> None:
    grad_sample = pytest.importorskip("opacus.grad_sample")
    set_seed(2)
    model = make()
    wrapped = grad_sample.GradSampleModule(model, loss_reduction="sum")
    x = torch.randn(3, *shape, requires_grad=True)  # Opacus's backward hooks expect an input grad
    wrapped(x).sum().backward()
    for p in model.parameters():
        assert p.grad_sample.shape == (3, *p.shape)
        torch.testing.assert_close(p.grad_sample.sum(0), p.grad, atol=1e-5, rtol=1e-4)


def test_positive_class_weight() -> None:
    assert positive_class_weight([0, 0, 0, 1]) == pytest.approx(3.0)
    assert positive_class_weight(np.array([1, 1, 0])) == pytest.approx(0.5)
    with pytest.raises(ValueError):
        positive_class_weight([0, 0, 0])


def test_config_rules() -> None:
    with pytest.raises(ValidationError, match="multiple of 32"):
        ImageModelConfig(backbone="resnet3d", crop_voxels=48)
    with pytest.raises(ValidationError, match="divide"):
        ImageModelConfig(backbone="swin3d", embed_dim=12, num_heads=(5, 2, 4, 8))
    with pytest.raises(ValidationError, match="4 depths"):
        ImageModelConfig(backbone="resnet3d", depths=(1, 1, 1))
    with pytest.raises(ValidationError):
        ImageModelConfig(backbone="swin3d", kernel=3)
    with pytest.raises(ValidationError):
        ImageModelConfig(backbone="vit3d")


def test_fusion_net_group_dropout() -> None:
    set_seed(4)
    dims = {"deep": 40, "radiomics": 6, "clinical": 3}
    model = FusionNet(dims, (8,), dropout=0.0, group_dropout=0.5)
    assert model.net[0].in_features == 40 + 6 + 3
    x = model.concat({g: torch.randn(64, d) for g, d in dims.items()})
    model.eval()
    torch.testing.assert_close(model(x), model(x))  # no group dropout in eval mode
    model.train()
    dropped = model(x)
    assert dropped.shape == (64,) and not torch.allclose(dropped, model.eval()(x))
    # group dropout needs two groups or more
    only_clinical = FusionNet({"clinical": 3}, (4,), dropout=0.0, group_dropout=0.9).train()
    assert torch.allclose(only_clinical(x[:, -3:]), only_clinical.eval()(x[:, -3:]))  # one group
    with pytest.raises(ValueError, match="group_dropout"):
        FusionNet(dims, group_dropout=1.0)


def test_fusion_networks_for_ensembles_and_late_fusion() -> None:
    models = ["none/radiomics", "none/clinical", "swin3d/deep", "swin3d/deep+clinical"]
    assert fusion_networks(models, "joint", 1) == models  # what a run without ensembles trains
    assert fusion_networks(models, "joint", 2) == models + [f"{m}~1" for m in models]
    # late: only single-group networks, those the fused models need among them
    assert fusion_networks(["swin3d/deep+clinical"], "late", 2) == [
        "swin3d/deep",
        "none/clinical",
        "swin3d/deep~1",
        "none/clinical~1",
    ]
    assert model_groups("swin3d/deep+clinical~1") == ("deep", "clinical")
    assert single_group_models("resnet3d/deep+radiomics") == ["resnet3d/deep", "none/radiomics"]


def test_a_variant_network_is_named_for_its_architecture() -> None:
    """A candidate of the main model's network: its name declares its radiomics width and
    hidden layers, it counts for its model, and ``#r0`` drops the radiomics group."""
    name = variant_name("swin3d/deep+radiomics+clinical", 12, [16, 8])
    assert name == "swin3d/deep+radiomics+clinical#r12#h16-8"
    assert network_variant(name) == Variant(radiomics=12, hidden=(16, 8))
    assert network_variant("none/radiomics#r4#h") == Variant(4, ())
    assert network_variant("none/radiomics~1") == Variant()
    assert base_model(name) == "swin3d/deep+radiomics+clinical"
    assert network_hidden(name, [32]) == [16, 8] and network_hidden("none/clinical", [32]) == [32]
    dims = {"deep": 8, "radiomics": 36, "clinical": 5}
    assert network_dims(name, dims) == {"deep": 8, "radiomics": 12, "clinical": 5}
    none = variant_name("none/radiomics+clinical", 0, [])
    assert model_groups(none) == ("clinical",) and network_dims(none, dims) == {"clinical": 5}
    scores = {none: np.full(3, 0.2), "none/clinical": np.full(3, 0.7)}
    combined = combine_scores(scores, ["none/radiomics+clinical", "none/clinical"], "joint")
    np.testing.assert_allclose(combined["none/radiomics+clinical"], 0.2)
    with pytest.raises(ValueError, match="not a variant"):
        network_variant("none/radiomics#q3")


def test_combine_scores_averages_members_and_fuses_late() -> None:
    rng = np.random.default_rng(0)
    scores = {k: rng.uniform(0.01, 0.99, 20) for k in ("none/radiomics", "none/radiomics~1")}
    scores["swin3d/deep"] = rng.uniform(0.01, 0.99, 20)
    mean = (scores["none/radiomics"] + scores["none/radiomics~1"]) / 2
    joint = combine_scores(scores, ["none/radiomics"], "joint")
    np.testing.assert_allclose(joint["none/radiomics"], mean)
    late = combine_scores(scores, ["none/radiomics", "swin3d/deep+radiomics"], "late")
    logit = np.log(mean / (1 - mean)) + np.log(scores["swin3d/deep"] / (1 - scores["swin3d/deep"]))
    np.testing.assert_allclose(late["swin3d/deep+radiomics"], 1 / (1 + np.exp(-logit / 2)))
    saturated = combine_scores(
        {"swin3d/deep": np.ones(3), "none/radiomics": np.zeros(3)},
        ["swin3d/deep+radiomics"],
        "late",
    )
    assert np.isfinite(saturated["swin3d/deep+radiomics"]).all()
