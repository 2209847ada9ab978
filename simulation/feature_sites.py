"""Synthetic tabular sites for protocol benchmarks: each site folder gets a site.toml (tabular
mode) and a ready ``output/features.parquet`` (radiomics-like columns driven by latent factors,
the encoded clinical columns, labels), so no extraction is needed. Not a cohort for science:
for that use ``fedmets synth`` (images, the documented risk model)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from fedmets.shared.clinical import encoded_columns
from fedmets.simulation.site_files import write_site_config

LATENT = 4


def feature_table(
    n: int, prevalence: float, columns: int, rng: np.random.Generator, prefix: str
) -> pd.DataFrame:
    """A features.parquet table of ``n`` patients: ``columns`` radiomics columns (each a scaled
    latent factor plus noise), age and sex encoded, a label from the first latent factor."""
    latent = rng.normal(size=(n, LATENT))
    score = latent[:, 0] + 0.7 * rng.normal(size=n)
    label = score > np.quantile(score, 1 - prevalence)
    radiomics = {
        f"tumour_original_f{j:03d}": (latent[:, j % LATENT] + rng.normal(scale=1 + j / 20, size=n))
        * 10 ** (j % 5)
        for j in range(columns)
    }
    clinical = pd.DataFrame(0.0, index=range(n), columns=encoded_columns())
    clinical["age"] = rng.normal(62, 9, n) + 3 * label
    clinical["sex_male"] = (rng.random(n) < 0.75).astype(float)
    ids = pd.DataFrame({"patient_id": [f"{prefix}-{i:04d}" for i in range(n)], "label": label})
    return pd.concat([ids, pd.DataFrame(radiomics), clinical], axis=1).astype({"label": float})


def write_feature_sites(
    root: Path,
    sizes: Sequence[int],
    prevalence: float = 0.2,
    columns: int = 60,
    seed: int = 0,
    folds: int = 5,
) -> list[Path]:
    """``len(sizes)`` tabular sites ``site_000``... under ``root`` cross-validating with
    ``folds`` folds (``[policy] folds``); returns their site TOMLs."""
    rng = np.random.default_rng(seed)
    paths = []
    for i, n in enumerate(sizes):
        site = f"site_{i:03d}"
        folder = Path(root) / site
        (folder / "output").mkdir(parents=True, exist_ok=True)
        table = feature_table(n, prevalence, columns, rng, site)
        table.to_parquet(folder / "output" / "features.parquet")
        (folder / "features.csv").write_text("features are in output/features.parquet\n")
        paths.append(
            write_site_config(
                folder,
                site,
                mode="tabular",
                modalities=["radiomics_table", "clinical"],
                seed=i,
                manifest="features.csv",
                policy={"folds": folds},
            )
        )
    return paths
