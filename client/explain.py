"""Local explanations of the image model, made and kept at the site: occlusion-sensitivity
maps of a patient's CT crop, written as PNG slices with the tumour contour under
``<paths.output>/explain/<run>/``. Nothing here is ever sent.

The model is the federated image model of one cross-validation fold, as the site received it
(``query.deep_features`` stores it under the site's run state, with its settings). The map is
MONAI's ``OcclusionSensitivity``: the DM probability of the crop with a Gaussian-weighted cube
occluded at each position; shown is the drop from the unoccluded probability (red: the region
raised the predicted risk).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import torch
from monai.visualize import OcclusionSensitivity
from torch import nn

from fedmets.client.crops import load_crops
from fedmets.client.site_files import MODEL_FILE, SETTINGS_FILE, STATE_DIR, crop_path
from fedmets.client.training import set_state
from fedmets.shared.config import SiteConfig
from fedmets.shared.image_models import ImageClassifier, build_image_model
from fedmets.shared.image_presets import IMAGE_PRESETS, ImageModelConfig


class _ProbabilityColumn(nn.Module):
    """(B, C, S, S, S) -> (B, 1) logits, the layout OcclusionSensitivity expects."""

    def __init__(self, model: ImageClassifier) -> None:
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.model(x).unsqueeze(-1)


def load_fold_model(state_dir: Path, fold: int) -> tuple[ImageClassifier, dict]:
    """The fold's image model (eval mode) and its settings, as :func:`save_fold_model` kept."""
    path = state_dir / MODEL_FILE.format(fold=fold)
    if not path.is_file():
        raise FileNotFoundError(f"no image model of fold {fold} in {state_dir} (run a federation)")
    settings = json.loads((state_dir / SETTINGS_FILE.format(fold=fold)).read_text())
    base = IMAGE_PRESETS[settings["image_preset"]][settings["backbone"]]
    channels = 1 if settings["mask_channel"] == "none" else 2
    cfg = ImageModelConfig.model_validate({**base.model_dump(), "in_channels": channels})
    model = build_image_model(cfg)
    with np.load(path) as stored:
        set_state(model, {k: stored[k] for k in stored.files})
    return model.eval(), settings


@torch.no_grad()
def occlusion_map(model: ImageClassifier, image: np.ndarray, mask_size: int = 8) -> np.ndarray:
    """Risk drop (S, S, S) when each region of ``image`` (C, S, S, S) is occluded:
    p(image) - p(image with a cube of ``mask_size`` voxels occluded there)."""
    x = torch.from_numpy(np.ascontiguousarray(image, dtype=np.float32))[None]
    wrapped = _ProbabilityColumn(model).eval()
    base = torch.sigmoid(wrapped(x))[0, 0].item()
    occlusion = OcclusionSensitivity(
        wrapped,
        mask_size=mask_size,
        n_batch=32,
        verbose=False,
        overlap=0.25,
        activate=torch.sigmoid,
    )
    with warnings.catch_warnings():  # MONAI's indexing, deprecated by torch: not the site's
        warnings.filterwarnings("ignore", "Using a non-tuple sequence", UserWarning)
        occluded, _ = occlusion(x)  # (1, 1, S, S, S), a trailing class axis in some versions
    side = image.shape[-1]
    return base - occluded.reshape(-1, side, side, side).mean(axis=0).numpy()


def save_slices(
    ct: np.ndarray, tumour: np.ndarray, heat: np.ndarray, out: Path, title: str
) -> list[Path]:
    """PNGs of three axial slices (z) through the tumour (S, S, S fractions): the CT (scaled
    0-1) in grey, the occlusion map ``heat`` in colour (red: occluding it lowers the risk, i.e.
    the region raised it), the tumour contour in yellow."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib.figure import Figure

    out.mkdir(parents=True, exist_ok=True)
    rows = np.flatnonzero(tumour.reshape(len(tumour), -1).max(axis=1) > 0.5)
    centre = int(np.median(rows)) if len(rows) else len(ct) // 2
    span = max(1, int(rows.max() - rows.min()) // 3) if len(rows) else 2
    limit = float(np.abs(heat).max()) or 1.0
    paths = []
    for z in sorted({min(max(centre + k * span, 0), len(ct) - 1) for k in (-1, 0, 1)}):
        figure = Figure(figsize=(3.2, 3.2), dpi=100)
        ax = figure.add_subplot()
        ax.imshow(ct[z], cmap="gray", vmin=0, vmax=1)
        ax.imshow(heat[z], cmap="coolwarm", vmin=-limit, vmax=limit, alpha=0.45)
        if tumour[z].max() > 0.5:
            ax.contour(tumour[z], levels=[0.5], colors="yellow", linewidths=1)
        ax.set_title(f"{title}, slice {z}", fontsize=8)
        ax.axis("off")
        path = out / f"occlusion-z{z:03d}.png"
        figure.savefig(path, bbox_inches="tight")
        paths.append(path)
    return paths


def _check_fold(runs: Path, run: str, fold: int) -> None:
    """FileNotFoundError naming the runs or the cross-validation folds this site kept image
    models of, when ``run`` or its ``fold`` is not one of them (fold -1, the final model, has
    no held-out patient)."""
    kept = sorted(p.name for p in runs.glob("*") if p.is_dir() and any(p.glob("image-fold*")))
    if run not in kept:
        known = ", ".join(kept) if kept else "none yet (run a federation)"
        raise FileNotFoundError(f"--run {run}: no image model of this run in {runs}; runs: {known}")
    folds = sorted(
        int(n) for p in (runs / run).glob("image-fold*.npz") if (n := p.stem[10:]).isdigit()
    )
    if fold not in folds:
        shown = ", ".join(map(str, folds)) or "none"
        raise FileNotFoundError(
            f"--fold {fold}: run {run} has image models of cross-validation folds {shown}"
            " (the final model, fold -1, has no held-out patient to explain)"
        )


def explain_site(
    cfg: SiteConfig, run: str, fold: int = 0, patients: int = 3, mask_size: int = 8
) -> list[Path]:
    """Occlusion maps of the first ``patients`` held-out patients of ``fold`` of ``run`` at
    this site, with its fold model; PNGs under ``<paths.output>/explain/<run>/<patient>/``."""
    state = cfg.paths.cache / STATE_DIR / run
    _check_fold(cfg.paths.cache / STATE_DIR, run, fold)
    model, settings = load_fold_model(state, fold)
    with np.load(state / "folds.npz") as stored:
        ids, held_out = stored["ids"], np.flatnonzero(stored["fold"] == fold)
    side = model.cfg.crop_voxels
    paths = []
    for row in held_out[:patients]:
        pid = str(ids[row])
        crop = crop_path(cfg, pid)
        image = load_crops([crop], side, settings["mask_channel"])[0]
        tumour = load_crops([crop], side, "tumour")[0][1]
        heat = occlusion_map(model, image, mask_size)
        out = cfg.paths.output / "explain" / run / pid
        paths += save_slices(image[0], tumour, heat, out, f"{pid} (fold {fold})")
    return paths
