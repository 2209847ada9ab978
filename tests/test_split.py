"""`fedmets split`: partition schemes, site folder files and the command line."""

from __future__ import annotations

import json
import os
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from conftest import CliResult, run_fedmets

from fedmets.simulation.partition import SITE_ID_PATTERN, assign_sites, site_slug, summarise
from fedmets.simulation.site_files import split_input, write_site_config

REPO = Path(__file__).resolve().parents[1]
REAL_TABLE = REPO.parent / "shared" / "data" / "real" / "head_neck_pet_ct_gtvp_radiomics_dm.csv"


def _table(n: int = 300, prevalence: float = 0.2, seed: int = 0) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    dm = np.zeros(n, dtype=int)
    dm[rng.choice(n, round(n * prevalence), replace=False)] = 1
    return pd.DataFrame({"patient_id": [f"p{i:04d}" for i in range(n)], "dm": dm})


@pytest.fixture
def real_table() -> pd.DataFrame:
    if not REAL_TABLE.is_file():
        pytest.skip(f"real radiomics table not available at {REAL_TABLE}")
    return pd.read_csv(REAL_TABLE)


@pytest.fixture
def cohort(tmp_path: Path) -> Path:
    """A two-site cohort folder laid out like `fedmets synth` output, with empty image files."""
    root = tmp_path / "cohort"
    truth = []
    sizes = {"hospital_a": 14, "hospital_b": 10}
    for number, (site, n) in enumerate(sizes.items()):
        rows = []
        for i in range(n):
            pid = f"{site[-1]}{i:03d}"
            paths = {
                "ct_path": f"images/{pid}_ct.nii.gz",
                "tumour_mask_path": f"masks/{pid}_tumour.nii.gz",
                "organ_mask_path": f"masks/{pid}_organs.nii.gz",
            }
            for rel in paths.values():
                (root / site / rel).parent.mkdir(parents=True, exist_ok=True)
                (root / site / rel).touch()
            dm = int(i % 4 == number)
            rows.append({"patient_id": pid, **paths, "age": "" if i == 0 else 50 + i, "dm": dm})
            truth.append({"patient_id": pid, "site_id": site, "true_risk": 0.1 + 0.01 * i})
        pd.DataFrame(rows).to_csv(root / site / "manifest.csv", index=False)
        write_site_config(
            root / site, site, mode="images", modalities=["ct", "tumour_mask"], seed=number
        )
    (root / "ground_truth").mkdir()
    pd.DataFrame(truth).to_csv(root / "ground_truth" / "truth.csv", index=False)
    (root / "cohort.json").write_text(json.dumps({"preset": "fake", "seed": 0, "sites": []}))
    return root


def _run_cli(*args: str) -> CliResult:
    return run_fedmets("split", *args, cwd=REPO)


# ---- partition schemes -------------------------------------------------------------------------


def test_natural_split_reproduces_real_centres(real_table: pd.DataFrame) -> None:
    sites = assign_sites(real_table, "column", column="centre", label_column="Distant")
    assert sites.value_counts().to_dict() == {"chus": 72, "chum": 56, "hgj": 55, "hmr": 18}
    summary = summarise(real_table, sites, "Distant").set_index("site_id")
    expected = real_table.groupby(real_table["centre"].str.lower())["Distant"].sum()
    assert summary["positives"].to_dict() == expected.to_dict()
    assert summary["positives"].sum() == 19


def test_iid_equal_sizes_and_prevalence() -> None:
    table = _table(303, 0.2)
    sites = assign_sites(table, "iid", n_sites=5, seed=3)
    summary = summarise(table, sites)
    assert summary["n"].max() - summary["n"].min() <= 1
    expected = summary["n"] * table["dm"].mean()
    assert (summary["positives"] - expected).abs().max() <= 1.5


def test_dirichlet_small_alpha_skews_labels_more() -> None:
    table = _table(400, 0.25)

    def spread(alpha: float) -> float:
        return np.mean(
            [
                summarise(table, assign_sites(table, "dirichlet", n_sites=4, alpha=alpha, seed=s))[
                    "prevalence"
                ].std()
                for s in range(20)
            ]
        )

    assert spread(0.1) > 5 * spread(100.0)


def test_quantity_skews_sizes_but_not_labels() -> None:
    table = _table(400, 0.25)
    ratios = []
    for seed in range(10):
        summary = summarise(table, assign_sites(table, "quantity", n_sites=4, alpha=0.5, seed=seed))
        ratios.append(summary["n"].max() / summary["n"].min())
        expected = summary["n"] * table["dm"].mean()
        assert (summary["positives"] - expected).abs().max() <= 1.5
    assert np.median(ratios) > 3


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_seed_determines_split(scheme: str) -> None:
    table = _table(120)
    first = assign_sites(table, scheme, n_sites=4, seed=11)
    assert first.equals(assign_sites(table, scheme, n_sites=4, seed=11))
    assert not first.equals(assign_sites(table, scheme, n_sites=4, seed=12))


@pytest.mark.parametrize("scheme", ["iid", "dirichlet", "quantity"])
def test_every_row_assigned_once(scheme: str) -> None:
    table = _table(97).set_index("patient_id", drop=False)
    sites = assign_sites(table, scheme, n_sites=6, seed=1)
    assert sites.index.equals(table.index)
    assert sites.notna().all()
    assert set(sites) == {f"site_{i}" for i in range(1, 7)}
    assert summarise(table, sites)["n"].sum() == len(table)


def test_min_per_site_is_honoured_by_repair() -> None:
    table = _table(40, 0.3)
    moved = 0
    for seed in range(20):
        sites = assign_sites(table, "dirichlet", n_sites=10, alpha=0.05, seed=seed, min_per_site=3)
        assert sites.value_counts().min() >= 3 and len(sites.value_counts()) == 10
        moved += sites.attrs["moved_rows"]
    assert moved > 0  # the repair was actually needed


def test_natural_site_below_min_per_site_is_an_error() -> None:
    table = _table(10).assign(centre=["CHUS"] * 9 + ["HMR"])
    with pytest.raises(ValueError, match=r"below min_per_site=2 rows: hmr \(1\)"):
        assign_sites(table, "column", column="centre")


@pytest.mark.parametrize(
    ("change", "kwargs", "message"),
    [
        (None, {"scheme": "iid", "n_sites": 11}, "cannot make 11 sites of at least 2 rows"),
        (None, {"scheme": "column", "column": "hospital"}, "unknown column 'hospital'"),
        (None, {"scheme": "column"}, "needs a column"),
        (None, {"scheme": "stratified", "n_sites": 2}, "unknown scheme 'stratified'"),
        (None, {"scheme": "iid", "n_sites": 2, "label_column": "y"}, "label column 'y' not found"),
        ({"dm": [0, 1, 2] + [0] * 17}, {"scheme": "iid", "n_sites": 2}, "must be 0/1; 1 rows"),
        ({"dm": [np.nan] * 2 + [0] * 18}, {"scheme": "iid", "n_sites": 2}, "must be 0/1; 2 rows"),
        (
            {"centre": [None, ""] + ["a"] * 18},
            {"scheme": "column", "column": "centre"},
            "column 'centre' has no value in 2 rows",
        ),
        (None, {"scheme": "dirichlet", "n_sites": 2, "alpha": 0.0}, "alpha must be a positive"),
    ],
)
def test_impossible_requests_raise(change: dict | None, kwargs: dict, message: str) -> None:
    table = _table(20).assign(centre="a")
    if change:
        table = table.assign(**change)
    with pytest.raises(ValueError, match=message):
        assign_sites(table, **kwargs)


def test_site_slug() -> None:
    assert site_slug("CHUS") == "chus"
    for value in ["Hôpital Général #2", "A", 7, "x" * 50, "--?"]:
        assert SITE_ID_PATTERN.match(site_slug(value)), value


# ---- site files ---------------------------------------------------------------------------------


def test_site_config_schema(tmp_path: Path) -> None:
    path = write_site_config(
        tmp_path / "s", "site_1", mode="tabular", modalities=["radiomics_table"], seed=5
    )
    data = tomllib.loads(path.read_text())
    assert data["site_id"] == "site_1" and data["seed"] == 5
    assert data["data"] == {
        "root": ".",
        "manifest": "manifest.csv",
        "mode": "tabular",
        "modalities": ["radiomics_table"],
        "id_column": "patient_id",
        "label_column": "dm",
    }
    assert data["compute"] == {"device": "auto", "workers": 2}
    assert data["paths"] == {"cache": "cache", "output": "output"}
    assert data["radiomics"] == {"params": "default", "peritumoral_margin_mm": 5.0}


def test_site_config_loads_with_shared_config(tmp_path: Path) -> None:
    config = pytest.importorskip("fedmets.shared.config")
    path = write_site_config(
        tmp_path / "hospital_a",
        "hospital_a",
        mode="images",
        modalities=["ct", "tumour_mask", "organ_mask", "clinical"],
        seed=1101,
        workers=4,
        peritumoral_margin_mm=3.5,
    )
    cfg = config.load_site_config(path)
    assert cfg.data.root == path.parent.resolve()
    assert cfg.data.manifest == path.parent.resolve() / "manifest.csv"
    assert (cfg.seed, cfg.compute.workers, cfg.radiomics.peritumoral_margin_mm) == (1101, 4, 3.5)


def test_cohort_split_points_at_original_images(cohort: Path, tmp_path: Path) -> None:
    out = tmp_path / "resplit"
    record = split_input(cohort, out, "iid", n_sites=3, seed=4)
    pooled_ids = []
    for site in record["sites"]:
        site_dir = out / site["site_id"]
        manifest = pd.read_csv(site_dir / "manifest.csv", dtype=str, keep_default_na=False)
        assert len(manifest) == site["n"] and sum(site["source_sites"].values()) == site["n"]
        for column in ("ct_path", "tumour_mask_path", "organ_mask_path"):
            for pid, rel in zip(manifest["patient_id"], manifest[column], strict=True):
                assert not os.path.isabs(rel)
                target = site_dir / rel
                source = "hospital_a" if pid.startswith("a") else "hospital_b"
                assert target.is_file()
                assert target.resolve().parent.parent == (cohort / source).resolve()
        pooled_ids += list(manifest["patient_id"])
        assert tomllib.loads((site_dir / "site.toml").read_text())["data"]["mode"] == "images"
    assert sorted(pooled_ids) == sorted(pd.read_csv(cohort / "ground_truth/truth.csv").patient_id)
    assert not list(out.rglob("*.nii.gz"))  # nothing copied

    truth = pd.read_csv(out / "ground_truth" / "truth.csv")
    for site in record["sites"]:
        ids = pd.read_csv(out / site["site_id"] / "manifest.csv")["patient_id"]
        assert set(truth.loc[truth["site_id"] == site["site_id"], "patient_id"]) == set(ids)
    assert record["ground_truth"] == {"rows": 24, "unmatched_rows_dropped": 0}

    a000 = pd.concat(pd.read_csv(p, dtype=str, keep_default_na=False) for p in out.glob("*/m*.csv"))
    assert a000.set_index("patient_id").loc["a000", "age"] == ""  # missing values stay missing
    assert json.loads((out / "split.json").read_text()) == record


def test_cohort_site_configs_load(cohort: Path, tmp_path: Path) -> None:
    config = pytest.importorskip("fedmets.shared.config")
    split_input(cohort, tmp_path / "out", "quantity", n_sites=2, alpha=1.0)
    for path in (tmp_path / "out").glob("*/site.toml"):
        cfg = config.load_site_config(path)
        assert cfg.data.modalities == ["ct", "tumour_mask", "organ_mask", "clinical"]
        assert config.check_paths(cfg, path) == []


def test_a_cohorts_sites_keep_their_extraction_and_policy_settings(cohort: Path, tmp_path) -> None:
    """The new sites of a cohort split extract and cross-validate as the old ones did (the
    `tiny` preset's fast parameters, 32^3 crops and 3 folds), not at the defaults; a setting
    the old sites disagree on is left at the default and named in split.json."""
    from fedmets.shared.config import load_site_config

    for number, site in enumerate(("hospital_a", "hospital_b")):
        write_site_config(
            cohort / site,
            site,
            mode="images",
            modalities=["ct", "tumour_mask"],
            seed=number,
            radiomics_params="fast",
            crop_voxels=32,
            policy={"folds": 3, "min_patients": 4 + number},
        )
    record = split_input(cohort, tmp_path / "out", "iid", n_sites=2)
    for path in (tmp_path / "out").glob("*/site.toml"):
        cfg = load_site_config(path)
        assert cfg.radiomics.params == "fast" and cfg.preprocess.crop_voxels == [32, 32, 32]
        assert (cfg.policy.folds, cfg.policy.min_patients, cfg.policy.randomness) == (
            3,
            5,
            "seeded",
        )
    assert record["site_settings"]["differing"] == ["policy.min_patients"]


def test_split_refuses_non_empty_output(cohort: Path) -> None:
    with pytest.raises(ValueError, match="not empty"):
        split_input(cohort, cohort, "iid", n_sites=2)


def test_duplicate_ids_are_an_error(tmp_path: Path) -> None:
    path = tmp_path / "t.csv"
    _table(20).assign(patient_id="same").to_csv(path, index=False)
    with pytest.raises(ValueError, match="duplicated ids"):
        split_input(path, tmp_path / "out", "iid", n_sites=2)


def test_a_workbook_or_semicolon_table_is_named_as_such(tmp_path: Path) -> None:
    """A table saved as a workbook (renamed .csv) or with semicolons: the site check's words,
    not a codec error or "id column 'patient_id' not found"."""
    path = tmp_path / "t.csv"
    _table(20).to_csv(path, index=False, sep=";")
    with pytest.raises(ValueError, match=r"t\.csv: the header row is separated by semicolons"):
        split_input(path, tmp_path / "out", "iid", n_sites=2)
    path.write_bytes(b"PK\x03\x04\x14\x00\x06\x00\x08\x00\xec\x00")
    with pytest.raises(ValueError, match=r"t\.csv: a spreadsheet workbook"):
        split_input(path, tmp_path / "out", "iid", n_sites=2)


# ---- command line -------------------------------------------------------------------------------


def test_cli_splits_table(tmp_path: Path) -> None:
    path = tmp_path / "features.csv"
    _table(60).assign(centre=["x", "y", "z"] * 20, f1=np.arange(60) / 7).to_csv(path, index=False)
    result = _run_cli(
        str(path),
        "--out",
        str(tmp_path / "out"),
        "--scheme",
        "dirichlet",
        "--sites",
        "3",
        "--alpha",
        "1",
        "--seed",
        "2",
    )
    assert result.returncode == 0, result.stderr
    assert "site_3" in result.stdout
    written = pd.concat(pd.read_csv(p) for p in sorted((tmp_path / "out").glob("*/features.csv")))
    pd.testing.assert_frame_equal(
        written.sort_values("patient_id").reset_index(drop=True), pd.read_csv(path)
    )
    record = json.loads((tmp_path / "out" / "split.json").read_text())
    assert record["parameters"]["alpha"] == 1.0 and record["seed"] == 2
    data = tomllib.loads((tmp_path / "out" / "site_1" / "site.toml").read_text())["data"]
    assert (data["mode"], data["manifest"]) == ("tabular", "features.csv")


def test_cli_unknown_column_exits_1(tmp_path: Path) -> None:
    path = tmp_path / "features.csv"
    _table(20).to_csv(path, index=False)
    result = _run_cli(
        str(path), "--out", str(tmp_path / "out"), "--scheme", "column", "--column", "hospital"
    )
    assert result.returncode == 1
    assert "error: unknown column 'hospital'" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "out").exists()
