"""Tabular mode: a site whose features are one CSV (radiomics + clinical) is checked and
"extracted" from it. The real Head-Neck-PET-CT table split by centre, and bad synthetic tables."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
from conftest import CliResult, run_fedmets

from fedmets.client.extract import extract_site
from fedmets.client.site_check import check_site
from fedmets.client.site_files import FEATURES_FILE, REPORT_FILE
from fedmets.client.tabular import load_feature_table
from fedmets.shared.clinical import encode_clinical, encoded_columns
from fedmets.shared.config import load_site_config
from fedmets.simulation.simulate import extract_missing

REPO = Path(__file__).resolve().parents[1]
REAL = REPO.parent / "shared" / "data" / "real"
REAL_TABLE = REAL / "head_neck_pet_ct_gtvp_radiomics_dm.csv"
CENTRES = {"chus": 72, "chum": 56, "hgj": 55, "hmr": 18}
# Radiomics columns of the real table without the _x (CT) / _y (PET) suffix.
UNSUFFIXED = {
    "original_ngtdm_Busyness",
    "original_ngtdm_Coarseness",
    "original_ngtdm_Complexity",
    "original_ngtdm_Contrast",
    "original_ngtdm_Strength",
    "original_shape_VoxelVolume",
    "original_firstorder_TotalEnergy",
}

needs_real = pytest.mark.skipif(
    not REAL_TABLE.is_file(), reason=f"real data table not present: {REAL_TABLE}"
)


def fedmets(*args: str) -> CliResult:
    return run_fedmets(*args, cwd=REPO)


# ---- the real table, split by centre ------------------------------------------------------------


@pytest.fixture(scope="module")
def real_sites(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The real table split by its centre column, then checked and extracted site by site."""
    out = tmp_path_factory.mktemp("real") / "sites"
    split = fedmets(
        "split", str(REAL_TABLE), "--out", str(out), "--scheme", "column", "--column", "centre",
        "--label", "Distant", "--id", "id",
    )  # fmt: skip
    assert split.returncode == 0, split.stderr
    for site in CENTRES:
        config = str(out / site / "site.toml")
        for command in ("check", "extract"):
            done = fedmets("site", command, "--config", config)
            assert done.returncode == 0, (site, command, done.stdout, done.stderr)
            assert "quarantined: patient" not in done.stderr
    return out


@needs_real
def test_real_table_sites_check_and_extract_every_patient(real_sites: Path) -> None:
    for site, size in CENTRES.items():
        check = json.loads((real_sites / site / "output" / "site_check.json").read_text())
        assert (check["n_patients"], check["n_usable"], check["quarantined"]) == (size, size, {})
        report = json.loads((real_sites / site / "output" / REPORT_FILE).read_text())
        assert report["counts"] == {
            "total": size,
            "quarantined": 0,
            "usable": size,
            "extracted": size,
            "cached": 0,
            "failed": 0,
        }
        assert report["features_per_region"] == {
            "tumour": 0,
            "ring": 0,
            "radiomics": 203,
            "clinical": len(encoded_columns()),
        }
        assert report["clinical_sources"] == {
            "age": "age",
            "sex": "sex",
            "smoking": None,
            "alcohol": None,
            "t_stage": "tstage",
            "n_stage": "nstage",
            "hpv": "overall_hpv_status",
            "subsite": "site",
        }


@needs_real
def test_real_table_features_layout_identical_across_sites(real_sites: Path) -> None:
    source = pd.read_csv(REAL_TABLE).set_index("id")
    tables = {s: pd.read_parquet(real_sites / s / "output" / FEATURES_FILE) for s in CENTRES}
    columns = list(tables["chus"].columns)
    radiomics = columns[2 : -len(encoded_columns())]
    assert columns[:2] == ["patient_id", "label"]
    assert columns[-len(encoded_columns()) :] == encoded_columns()
    assert len([c for c in radiomics if c.endswith("_x")]) == 98
    assert len([c for c in radiomics if c.endswith("_y")]) == 98
    assert {c for c in radiomics if not c.endswith(("_x", "_y"))} == UNSUFFIXED
    for site, table in tables.items():
        assert list(table.columns) == columns
        assert len(table) == CENTRES[site]
        rows = source.loc[list(table["patient_id"])]
        assert rows["centre"].str.lower().eq(site).all()
        assert list(table["label"]) == list(rows["Distant"])
        pd.testing.assert_frame_equal(
            table[radiomics], rows[radiomics].reset_index(drop=True), check_names=False
        )
    pooled = pd.concat(tables.values()).set_index("patient_id")
    assert len(pooled) == 201 and pooled["subsite_oropharynx"].eq(1).all()
    # 'Tx' (cannot be assessed) is a missing T stage; 'm' is sex M: both patients kept.
    (tx,) = source.index[source["tstage"] == "Tx"]
    assert pooled.loc[tx, "t_stage_missing"] == 1
    assert pooled.loc[tx, [c for c in columns if c.startswith("t_stage_t")]].eq(0).all()
    (lower_m,) = source.index[source["sex"] == "m"]
    assert pooled.loc[lower_m, "sex_male"] == 1
    no_hpv = source.index[source["overall_hpv_status"].isna()]
    assert pooled.loc[no_hpv, "hpv_missing"].eq(1).all() and len(no_hpv) == 106
    assert pooled.loc[source.index[source["overall_hpv_status"] == "+"], "hpv_positive"].eq(1).all()
    assert pooled["smoking_missing"].eq(1).all() and pooled["alcohol_missing"].eq(1).all()


# ---- synthetic tables ---------------------------------------------------------------------------

HEADER = "pid,DM,age,gender,T,hpv_status,original_firstorder_Mean,wavelet-LLH_glcm_Idm,notes\n"
GOOD_ROWS = [
    "A1,0,61,M,T2,+,1.5,0.25,x",
    "A2,1,70,f,t4b,-,2.5,0.5,",
    "A3,0,55,male,,,3.5,0.75,",
]
BAD_ROWS = [
    "D1,0,60,M,T1,+,1.0,0.1,",  # line 5 (the header: line 1): id repeated on line 9
    "L2,2,60,M,T1,+,1.0,0.1,",  # line 6: label 2
    "N3,1,60,M,T1,+,,0.1,",  # line 7: empty radiomics cell
    "U4,0,60,X,T1,+,1.0,0.1,",  # line 8: unknown sex
    "D1,1,61,F,T2,-,2.0,0.2,",  # line 9
]


def tabular_site(folder: Path, rows: list[str], *, header: str = HEADER, data: str = "") -> Path:
    """A tabular site folder with features.csv and site.toml; returns the TOML path."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "features.csv").write_text(header + "\n".join(rows) + "\n", encoding="utf-8")
    toml = folder / "site.toml"
    toml.write_text(
        'site_id = "tab"\n\n[data]\nroot = "."\nmanifest = "features.csv"\nmode = "tabular"\n'
        'modalities = ["radiomics_table", "clinical"]\nid_column = "pid"\nlabel_column = "DM"\n'
        f'{data}\n[paths]\ncache = "cache"\noutput = "output"\n',
        encoding="utf-8",
    )
    return toml


def test_bad_rows_are_quarantined_with_their_message_and_the_others_kept(tmp_path: Path) -> None:
    cfg = load_site_config(tabular_site(tmp_path / "site", GOOD_ROWS + BAD_ROWS))
    report = check_site(cfg)
    assert (report.n_patients, report.usable, report.site_problems) == (8, ["A1", "A2", "A3"], [])
    assert report.quarantined == {
        "D1": ["features.csv: pid: id used by lines 5 and 9; ids must be unique"],
        "L2": ["features.csv line 6: DM: label must be 0 or 1, got '2'"],
        "N3": ["features.csv line 7: original_firstorder_Mean: radiomics value is missing"],
        "U4": ["features.csv line 8: gender (sex): unknown category 'X' (known: M, F)"],
    }
    extracted = extract_site(cfg)
    assert extracted == json.loads((cfg.paths.output / REPORT_FILE).read_text())
    assert extracted["quarantined"] == report.quarantined
    assert extracted["counts"] == {
        "total": 8,
        "quarantined": 4,
        "usable": 3,
        "extracted": 3,
        "cached": 0,
        "failed": 0,
    }
    table = pd.read_parquet(cfg.paths.output / FEATURES_FILE)
    radiomics = ["original_firstorder_Mean", "wavelet-LLH_glcm_Idm"]
    assert list(table.columns) == ["patient_id", "label", *radiomics, *encoded_columns()]
    assert list(table["patient_id"]) == ["A1", "A2", "A3"]
    assert list(table["label"]) == [0, 1, 0]
    assert table[radiomics].to_numpy().tolist() == [[1.5, 0.25], [2.5, 0.5], [3.5, 0.75]]
    schema = pd.DataFrame(
        {
            "age": ["61", "70", "55"],
            "sex": ["M", "F", "M"],
            "smoking": [None] * 3,
            "alcohol": [None] * 3,
            "t_stage": ["T2", "T4", None],
            "n_stage": [None] * 3,
            "hpv": ["positive", "negative", None],
            "subsite": [None] * 3,
        }
    )
    pd.testing.assert_frame_equal(table[encoded_columns()], encode_clinical(schema))


def test_non_finite_radiomics_empty_id_and_missing_label(tmp_path: Path) -> None:
    rows = [*GOOD_ROWS, "I1,0,60,M,T1,+,inf,0.1,", ",0,60,M,T1,+,1.0,0.1,", "E3,,60,M,T1,+,1,1,"]
    loaded = load_feature_table(load_site_config(tabular_site(tmp_path / "site", rows)))
    assert loaded.quarantined == {
        "I1": [
            "features.csv line 5: original_firstorder_Mean: radiomics value must be a finite"
            " number, got 'inf'"
        ],
        "(line 6)": ["features.csv line 6: pid: empty id cell"],
        "E3": ["features.csv line 7: DM: label is missing (must be 0 or 1)"],
    }
    assert list(loaded.features["patient_id"]) == ["A1", "A2", "A3"]


def test_a_list_of_new_patients_may_leave_out_the_label_column(tmp_path: Path) -> None:
    """New patients to score (``labelled=False``, `site predict --manifest`) have no outcome
    yet: their table may lack the label column; a training site's table may not."""
    rows = [row.replace(",0,", ",", 1).replace(",1,", ",", 1) for row in GOOD_ROWS]
    cfg = load_site_config(tabular_site(tmp_path / "site", rows, header=HEADER.replace("DM,", "")))
    new = load_feature_table(cfg, labelled=False)
    assert (new.quarantined, new.site_problems) == ({}, [])
    assert list(new.features["patient_id"]) == ["A1", "A2", "A3"]
    assert new.features["label"].isna().all()
    assert "data.label_column: column 'DM' not found" in load_feature_table(cfg).site_problems[0]


def test_a_wide_table_without_its_label_column_names_the_nearest_not_every_column(
    tmp_path: Path,
) -> None:
    """A feature table of hundreds of columns: the message names the columns like the one
    missing, not all of them (a narrow manifest's message lists every column)."""
    header = HEADER.replace("DM,", "DMet,").replace("notes", ",".join(f"f{i}" for i in range(30)))
    cfg = load_site_config(tabular_site(tmp_path / "site", GOOD_ROWS, header=header))
    (problem,) = load_feature_table(cfg).site_problems
    assert problem.endswith(
        "data.label_column: column 'DM' not found (38 columns found, the nearest: 'DMet')"
    )
    header = HEADER.replace("DM,", "outcome,").replace(
        "notes", ",".join(f"f{i}" for i in range(30))
    )
    cfg = load_site_config(tabular_site(tmp_path / "other", GOOD_ROWS, header=header))
    assert load_feature_table(cfg).site_problems[0].endswith("(38 columns found, none named alike)")


def test_a_simulation_says_how_its_extraction_goes_and_whom_it_left_out(tmp_path: Path) -> None:
    """`fedmets simulate` / `study` extract a site whose features are missing: its progress,
    its counts and each quarantined patient are said, not only written to its report."""
    cfg = load_site_config(tabular_site(tmp_path / "site", [*GOOD_ROWS, BAD_ROWS[1]]))
    said: list[str] = []
    assert extract_missing([cfg], say=said.append) == ["tab"]
    assert said[:3] == [
        "extracting tab (features missing)",
        "  tab: 4/4 patients",
        "  tab: 3 patients with features, 1 quarantined, 0 failed"
        f" ({cfg.paths.output / REPORT_FILE})",
    ]
    assert said[3:] == [
        "  quarantined: patient L2: features.csv line 5: DM: label must be 0 or 1, got '2'"
    ]
    assert extract_missing([cfg], say=said.append) == []  # extracted now: nothing said

    """Header cells are stripped like data cells; rows of empty cells (Excel leftovers) are
    skipped like blank lines, not counted as patients."""
    header = HEADER.replace("pid,DM,", " pid , DM,")
    rows = [GOOD_ROWS[0], ",,,,,,,,", *GOOD_ROWS[1:], " , ,,,,,,,,,,,"]
    loaded = load_feature_table(
        load_site_config(tabular_site(tmp_path / "site", rows, header=header))
    )
    assert (loaded.n_rows, loaded.quarantined, loaded.site_problems) == (3, {}, [])
    assert list(loaded.features["patient_id"]) == ["A1", "A2", "A3"]


def test_clinical_columns_mapping_and_out_of_range_age(tmp_path: Path) -> None:
    header = HEADER.replace("age,", "age_years,").replace(",T,", ",stage_t,")
    rows = [*GOOD_ROWS, "O1,0,12,M,T1,+,1.0,0.1,"]
    mapping = 'clinical_columns = {age = "age_years", t_stage = "stage_t"}\n'
    cfg = load_site_config(tabular_site(tmp_path / "site", rows, header=header, data=mapping))
    loaded = load_feature_table(cfg)
    assert loaded.quarantined == {
        "O1": ["features.csv line 5: age_years (age): must be between 18 and 100 years, got 12"]
    }
    assert loaded.clinical_sources["t_stage"] == "stage_t"
    assert loaded.features["t_stage_t4"].tolist() == [0.0, 1.0, 0.0]


SITE_PROBLEMS = {
    "no id column": (HEADER.replace("pid,", "key,"), "", "data.id_column: column 'pid' not found"),
    "no radiomics column": (
        HEADER.replace("original_", "orig_").replace("wavelet-", "wave_"),
        "",
        "data.radiomics_pattern: no column with numbers matches",
    ),
    "no required clinical column": (
        HEADER.replace("gender,", "g,"),
        "",
        "sex: no column for this required clinical field (looked for sex, gender); name it in"
        " data.clinical_columns.sex",
    ),
    "mapped column absent": (
        HEADER,
        'clinical_columns = {hpv = "p16_status"}\n',
        "data.clinical_columns.hpv: column 'p16_status' not found",
    ),
    "repeated column name": (
        HEADER.replace(",notes", ",age"),
        "",
        "repeated column name(s) in the header: 'age'; each column needs its own name",
    ),
    "semicolon-separated": (
        HEADER.replace(",", ";"),
        "",
        "the header row is separated by semicolons (;), not commas",
    ),
    "an xlsx workbook named .csv": (  # a ZIP file's first bytes
        "PK\x03\x04" + HEADER,
        "",
        'a spreadsheet workbook (Excel or LibreOffice), not CSV text: save the sheet as "CSV',
    ),
}


@pytest.mark.parametrize(("header", "data", "problem"), SITE_PROBLEMS.values(), ids=SITE_PROBLEMS)
def test_site_level_problems_stop_the_site(
    tmp_path: Path, header: str, data: str, problem: str
) -> None:
    toml = tabular_site(tmp_path / "site", GOOD_ROWS, header=header, data=data)
    report = check_site(load_site_config(toml))
    assert report.usable == [] and report.quarantined == {}
    (message,) = report.site_problems
    assert f"{toml.parent / 'features.csv'}: {problem}" in message
    done = fedmets("site", "extract", "--config", str(toml))
    assert done.returncode == 1 and problem in " ".join(done.stderr.split())


def test_all_rows_bad_gives_a_site_problem(tmp_path: Path) -> None:
    toml = tabular_site(tmp_path / "site", BAD_ROWS[1:4])
    done = fedmets("site", "check", "--config", str(toml))
    assert done.returncode == 1
    assert "no usable patient: all 3 are quarantined" in done.stderr
