"""`fedmets site explain`: a run or fold the site kept no image model of is refused, naming the
ones it kept."""

import pytest

from fedmets.client.explain import explain_site
from fedmets.client.site_files import STATE_DIR
from fedmets.shared.config import load_site_config
from fedmets.simulation.site_files import write_site_config


def test_an_unknown_run_or_fold_names_the_ones_kept(tmp_path) -> None:
    toml = write_site_config(
        tmp_path, "hospital_a", mode="images", modalities=["ct", "tumour_mask"], seed=1
    )
    (tmp_path / "manifest.csv").write_text("patient_id\n")
    cfg = load_site_config(toml)
    state = cfg.paths.cache / STATE_DIR / "run1"
    state.mkdir(parents=True)
    for fold in (0, 1, -1):  # two folds and the final model
        (state / f"image-fold{fold}.npz").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"--run run2: .*runs: run1$"):
        explain_site(cfg, "run2")
    for fold in (-1, 2):
        with pytest.raises(FileNotFoundError, match=rf"--fold {fold}: .* folds 0, 1 \(the final"):
            explain_site(cfg, "run1", fold)
