"""Site and federation config validation: the shipped examples pass, each mistake is named."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import typer
from conftest import CliResult, run_fedmets

from fedmets.cli import app
from fedmets.shared.config import (
    ConfigError,
    FederationConfig,
    SiteConfig,
    check_config_file,
    check_paths,
    load_federation_config,
    load_site_config,
)
from fedmets.simulation.simulate import logistic_config

REPO = Path(__file__).resolve().parents[1]
EXAMPLES = sorted((REPO / "site_configs").glob("*.toml"))

SITE = """\
site_id = "hospital_b"
seed = 3

[data]
root = "data"
manifest = "manifest.csv"
mode = "images"
modalities = ["ct", "tumour_mask", "clinical"]

[radiomics]
peritumoral_margin_mm = 5.0
"""

FEDERATION = """\
[run]
name = "demo"
output_dir = "runs"

[strategy]
name = "fedavg"

[dp]
mode = "off"
"""


def write(folder: Path, text: str, name: str = "config.toml") -> Path:
    path = folder / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return path


def run_cli(*args: str, cwd: Path = REPO) -> CliResult:
    return run_fedmets("config", "check", *args, cwd=cwd)


# ---- valid configs ------------------------------------------------------------------------------


def test_examples_exist() -> None:
    names = {path.name for path in EXAMPLES}
    assert {f"hospital_{x}.toml" for x in "abcd"} | {"federation.toml"} <= names


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda path: path.name)
def test_example_validates(path: Path) -> None:
    kind, problems = check_config_file(path, check_paths=False)
    assert problems == []
    assert kind == ("federation" if path.name.startswith("federation") else "site")


def _keys_shown(path: Path) -> set[str]:
    """``section.key`` for every key a TOML file sets or shows commented out (``# key = ...``
    under its ``[section]`` or ``# [section]`` header; a sub-table is its section's key)."""
    shown, section = set(), ""
    for line in path.read_text().splitlines():
        if header := re.fullmatch(r"#?\s*\[([a-z_.]+)\]\s*", line):
            name, _, sub = header.group(1).partition(".")
            section = name
            if sub:
                shown.add(f"{name}.{sub}")
        elif key := re.match(r"#?\s*([a-z_]+)\s*=", line):
            shown.add(f"{section}.{key.group(1)}")
    return shown


def test_the_full_federation_example_shows_every_key() -> None:
    """docs/deployment.md: site_configs/federation.toml holds the full settings, every key
    commented; a key added to FederationConfig must be shown there too."""
    keys = {
        f"{section}.{key}"
        for section, field in FederationConfig.model_fields.items()
        for key in field.annotation.model_fields
    }
    assert keys - _keys_shown(REPO / "site_configs" / "federation.toml") == set()


def test_examples_pass_cli_schema_only() -> None:
    result = run_cli("--schema-only", *(str(path.relative_to(REPO)) for path in EXAMPLES))
    assert result.returncode == 0, result.stderr
    assert "hospital_a.toml" in result.stdout
    assert result.stderr == ""


def test_site_paths_resolved_against_toml_folder(tmp_path: Path) -> None:
    path = write(tmp_path / "configs", SITE + '[paths]\ncache = "../cache"\n')
    cfg = load_site_config(path)
    assert isinstance(cfg, SiteConfig)
    assert cfg.source == path.resolve()
    assert cfg.data.root == (tmp_path / "configs" / "data").resolve()
    assert cfg.data.manifest == cfg.data.root / "manifest.csv"
    assert cfg.data.rtstruct_roi_pattern == "^(gtvp|gtv-?1|gtv_?primary|gtv)$"
    assert cfg.paths.cache == (tmp_path / "cache").resolve()
    assert cfg.paths.output == (tmp_path / "configs" / "output").resolve()
    assert cfg.compute.device == "auto" and cfg.compute.workers == 2
    assert cfg.radiomics.params == "default"
    assert cfg.data.clinical_columns == {}
    assert cfg.data.radiomics_pattern.startswith("^(original|wavelet|log|")


def test_a_utf8_bom_is_accepted(tmp_path: Path) -> None:
    """Windows Notepad saves UTF-8 with a byte-order mark."""
    path = tmp_path / "site.toml"
    path.write_bytes(b"\xef\xbb\xbf" + SITE.encode())
    assert check_config_file(path, check_paths=False) == ("site", [])
    assert load_site_config(path).site_id == "hospital_b"


def test_tabular_keys(tmp_path: Path) -> None:
    text = SITE.replace('mode = "images"', 'mode = "tabular"').replace(
        '["ct", "tumour_mask", "clinical"]',
        '["radiomics_table", "clinical"]\nradiomics_pattern = "_[xy]$"\n'
        'clinical_columns = {t_stage = "tstage", hpv = "overall_hpv_status"}',
    )
    cfg = load_site_config(write(tmp_path, text))
    assert cfg.data.radiomics_pattern == "_[xy]$"
    assert cfg.data.clinical_columns == {"t_stage": "tstage", "hpv": "overall_hpv_status"}


def test_radiomics_presets_and_preprocess_settings(tmp_path: Path) -> None:
    cfg = load_site_config(write(tmp_path, SITE))
    assert cfg.preprocess.spacing_mm == [1.0, 1.0, 1.0]
    assert cfg.preprocess.hu_window == [-1000.0, 1000.0]
    assert cfg.preprocess.crop_voxels == [64, 64, 64]
    assert (cfg.preprocess.air_threshold_hu, cfg.preprocess.bone_threshold_hu) == (-200.0, 300.0)
    text = (
        SITE
        + 'params = "fast"\n[preprocess]\nspacing_mm = [0.8, 0.8, 2]\nhu_window = [-200, 400]\n'
    )
    cfg = load_site_config(write(tmp_path, text))
    assert cfg.radiomics.params == "fast"
    assert cfg.preprocess.spacing_mm == [0.8, 0.8, 2.0]  # integers accepted as numbers
    assert cfg.preprocess.hu_window == [-200.0, 400.0]


def test_federation_defaults(tmp_path: Path) -> None:
    cfg = load_federation_config(write(tmp_path, '[run]\nname = "demo"\n'))
    assert cfg.stages.image is True
    assert cfg.strategy.name == "fedavg"
    assert cfg.cv.folds == 5
    assert cfg.dp.mode == "off"
    assert cfg.run.output_dir.is_absolute()


def test_path_checks_pass_when_data_exists(tmp_path: Path) -> None:
    write(tmp_path, "patient_id,dm\n", "data/manifest.csv")
    write(tmp_path, "imageType: {}\n", "params.yaml")
    path = write(tmp_path, SITE + 'params = "params.yaml"\n')
    assert check_config_file(path) == ("site", [])
    assert load_site_config(path).radiomics.params == (tmp_path / "params.yaml").resolve()


# ---- invalid configs ----------------------------------------------------------------------------

INVALID = {
    "unknown top-level key": (
        SITE.replace("seed = 3", "seed = 3\ncolour = 1"),
        "colour: unknown key (allowed here: site_id, display_name, seed, data, compute, paths,"
        " radiomics, preprocess, policy, service)",
    ),
    "the old privacy section": (
        SITE + "[privacy]\nmin_patients = 5\n",
        "privacy: unknown key (allowed here: site_id, display_name, seed, data, compute, paths,"
        " radiomics, preprocess, policy, service)",
    ),
    "policy floor of one patient": (
        SITE + "[policy]\nmin_patients = 1\n",
        "policy.min_patients: must be >= 2, got 1",
    ),
    "policy learning-rate range reversed": (
        SITE + "[policy]\nmin_lr = 0.5\nmax_lr = 0.1\n",
        "policy.min_lr: must be <= max_lr (0.1), got 0.5",
    ),
    "policy randomness unknown": (
        SITE + '[policy]\nrandomness = "fixed"\n',
        "policy.randomness: must be one of 'secure', 'seeded', got 'fixed'",
    ),
    "unknown nested key": (
        SITE + "[compute]\ngpus = 2\n",
        "compute.gpus: unknown key (allowed here: device, workers, patient_timeout_s,"
        " gpu_memory_gib, parallel_folds)",
    ),
    "missing required key": (
        SITE.replace('manifest = "manifest.csv"\n', ""),
        "data.manifest: required key is missing",
    ),
    "wrong type": (SITE.replace("seed = 3", 'seed = "abc"'), "seed: must be an integer, got 'abc'"),
    "bool for int": (
        SITE + "[compute]\nworkers = true\n",
        "compute.workers: must be an integer, got true",
    ),
    "bad enum value": (
        SITE.replace('mode = "images"', 'mode = "imagez"'),
        "data.mode: must be one of 'images', 'tabular', got 'imagez'",
    ),
    "bad modality": (
        SITE.replace('"clinical"]', '"pet"]'),
        "data.modalities[2]: must be one of 'ct', 'tumour_mask', 'organ_mask', 'clinical',"
        " 'radiomics_table', got 'pet'",
    ),
    "bad site_id": (
        SITE.replace('"hospital_b"', '"Hospital B"'),
        "site_id: must match ^[a-z0-9][a-z0-9_-]{1,31}$ (lowercase letters, digits, - and _),"
        " got 'Hospital B'",
    ),
    "bad device": (
        SITE + '[compute]\ndevice = "gpu"\n',
        "compute.device: must match ^(auto|cpu|cuda|cuda:[0-9]+)$ ('auto', 'cpu', 'cuda' or"
        " 'cuda:N'), got 'gpu'",
    ),
    "margin too large": (
        SITE.replace("= 5.0", "= 31"),
        "radiomics.peritumoral_margin_mm: must be <= 30, got 31",
    ),
    "params not a string": (
        SITE + "params = 3\n",
        "radiomics.params: must be 'default', 'fast' or the path of a parameter file, got 3",
    ),
    "spacing not 3 numbers": (
        SITE + "[preprocess]\nspacing_mm = [1, 1]\n",
        "preprocess.spacing_mm: must be a list of 3 numbers (x, y, z) in mm, got [1, 1]",
    ),
    "spacing not positive": (
        SITE + "[preprocess]\nspacing_mm = [1, 0, 1]\n",
        "preprocess.spacing_mm[1]: must be > 0, got 0",
    ),
    "hu window reversed": (
        SITE + "[preprocess]\nhu_window = [300, -100]\n",
        "preprocess.hu_window: lowest must be < highest, got [300.0, -100.0]",
    ),
    "hu window one number": (
        SITE + "[preprocess]\nhu_window = [300]\n",
        "preprocess.hu_window: must be a list of 2 numbers (lowest, highest) in HU, got [300]",
    ),
    "crop voxels not integers": (
        SITE + "[preprocess]\ncrop_voxels = [64, 64.5, 64]\n",
        "preprocess.crop_voxels[1]: must be an integer, got 64.5",
    ),
    "air threshold above 0 HU": (
        SITE + "[preprocess]\nair_threshold_hu = 50\n",
        "preprocess.air_threshold_hu: must be <= 0, got 50",
    ),
    "bad interpolator": (
        SITE + '[preprocess]\nct_interpolator = "cubic"\n',
        "preprocess.ct_interpolator: must be one of 'bspline', 'linear', got 'cubic'",
    ),
    "unknown preprocess key": (
        SITE + "[preprocess]\nspacing = 1\n",
        "preprocess.spacing: unknown key (allowed here: spacing_mm, ct_interpolator, hu_window,"
        " crop_margin_mm, crop_voxels, body_threshold_hu, air_threshold_hu, bone_threshold_hu)",
    ),
    "images mode without tumour_mask": (
        SITE.replace('"tumour_mask", ', ""),
        "data.modalities: mode 'images' needs 'tumour_mask' here",
    ),
    "tabular mode with images": (
        SITE.replace('mode = "images"', 'mode = "tabular"'),
        "data.modalities: mode 'tabular' needs 'radiomics_table' here;"
        " mode 'tabular' must not list 'ct' and 'tumour_mask'",
    ),
    "bad rtstruct pattern": (
        SITE.replace('mode = "images"', 'mode = "images"\nrtstruct_roi_pattern = "(gtv"'),
        "data.rtstruct_roi_pattern: not a valid regular expression (missing ), unterminated"
        " subpattern at position 0), got '(gtv'",
    ),
    "unknown clinical_columns key": (
        SITE.replace('mode = "images"', 'mode = "images"\nclinical_columns = {tstage = "T"}'),
        "data.clinical_columns.tstage: unknown key (allowed here: age, sex, smoking, alcohol,"
        " t_stage, n_stage, hpv, subsite)",
    ),
    "clinical_columns value not a string": (
        SITE.replace('mode = "images"', 'mode = "images"\nclinical_columns = {age = 3}'),
        "data.clinical_columns.age: must be a string, got 3",
    ),
    "bad radiomics pattern": (
        SITE.replace('mode = "images"', 'mode = "images"\nradiomics_pattern = "[x"'),
        "data.radiomics_pattern: not a valid regular expression (unterminated character set at"
        " position 0), got '[x'",
    ),
    "duplicate modality": (
        SITE.replace('"clinical"]', '"clinical", "ct"]'),
        "data.modalities: lists 'ct' more than once",
    ),
    "fedprox with mu 0": (
        FEDERATION.replace('"fedavg"', '"fedprox"'),
        "strategy.proximal_mu: must be > 0 when strategy.name is 'fedprox', got 0",
    ),
    "dp on without epsilon": (
        FEDERATION.replace('"off"', '"sample"'),
        "dp.epsilon: required when dp.mode is 'sample'",
    ),
    "dp delta out of range": (FEDERATION + "delta = 1\n", "dp.delta: must be < 1, got 1"),
    "removed stages key": (
        FEDERATION + '[stages]\nenabled = ["census", "folds"]\n',
        "stages.enabled: unknown key (allowed here: image, final_model, image_rounds,"
        " fusion_rounds, local_epochs, fusion_local_epochs)",
    ),
    "image stage not a boolean": (
        FEDERATION + '[stages]\nimage = "no"\n',
        "stages.image: must be true or false, got 'no'",
    ),
    "removed strategy key": (
        FEDERATION.replace("[strategy]\n", "[strategy]\nfraction_train = 1.0\n"),
        "strategy.fraction_train: unknown key (allowed here: name, proximal_mu,"
        " server_learning_rate, secure_aggregation)",
    ),
    "main network choice under late fusion": (
        FEDERATION + '[model]\nfusion = "late"\nmain_radiomics = [0, 12]\n',
        "model.main_radiomics: a choice of the main model's network needs dp.mode 'off' (under"
        " DP nothing is chosen on validation), model.fusion 'joint' and model.fusion_members 1",
    ),
    "main network wider than the selection": (
        FEDERATION + "[model]\nmain_radiomics = [0, 40]\n",
        "model.main_radiomics: at most selection.top_k (36) radiomics columns, got [0, 40]",
    ),
    "float for int": (FEDERATION + "[cv]\nfolds = 1.5\n", "cv.folds: must be an integer, got 1.5"),
    "run seed past what the sites take": (  # sent in requests: shared.wire's seeds are int64
        FEDERATION.replace("[run]\n", f"[run]\nseed = {2**63}\n", 1),
        f"run.seed: must be <= {2**63 - 1}, got {2**63}",
    ),
    "table expected": (
        "selection = 3\n" + FEDERATION,
        "selection: must be a table, got 3",
    ),
    "neither kind": (
        'name = "demo"\n',
        "cannot tell whether this is a site config (needs site_id) or a federation config"
        " (needs [run])",
    ),
    "identity given as a file path": (
        FEDERATION + '[federation.identities]\nhospital_a = "keys/hospital_a.pub"\n',
        "federation.identities.hospital_a: not an OpenSSH ECDSA public key (Invalid line"
        " format): give the line of the site's .pub file (fedmets site keys), not its path",
    ),
    "identity of no site id": (
        FEDERATION + '[federation.identities]\n"Hospital A" = "k"\n',
        "federation.identities: 'Hospital A' is not a site id (lowercase letters, digits, - and _)",
    ),
    "unknown covariate": (
        FEDERATION + '[harmonisation]\ncovariates = ["age", "stage"]\n',
        "harmonisation.covariates: 'stage': not in the clinical schema (age, sex, smoking,"
        " alcohol, t_stage, n_stage, hpv, subsite)",
    ),
    "TOML syntax error": (
        SITE.replace("seed = 3", "seed = = 3"),
        "line 2, column 8: invalid TOML (Invalid value)",
    ),
}


@pytest.mark.parametrize(("text", "problem"), INVALID.values(), ids=INVALID.keys())
def test_invalid_config_names_problem(tmp_path: Path, text: str, problem: str) -> None:
    path = write(tmp_path, text)
    _, problems = check_config_file(path, check_paths=False)
    assert problems == [f"{path}: {problem}"]


def test_negative_margin_message_uses_file_as_given(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, SITE.replace("= 5.0", "= -3"), "site_configs/hospital_b.toml")
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ConfigError) as caught:
        load_site_config("site_configs/hospital_b.toml")
    expected = "site_configs/hospital_b.toml: radiomics.peritumoral_margin_mm: must be > 0, got -3"
    assert caught.value.problems == [expected]
    assert str(caught.value) == expected
    assert caught.value.path == Path("site_configs/hospital_b.toml")


def test_file_not_found(tmp_path: Path) -> None:
    missing = tmp_path / "nope.toml"
    assert check_config_file(missing) == ("unknown", [f"{missing}: file not found"])
    with pytest.raises(ConfigError, match="file not found"):
        load_federation_config(missing)


def test_missing_data_root(tmp_path: Path) -> None:
    path = write(tmp_path, SITE)
    root = (tmp_path / "data").resolve()
    assert check_config_file(path) == (
        "site",
        [
            f"{path}: data.root: folder not found: {root}",
            f"{path}: data.manifest: file not found: {root / 'manifest.csv'}",
        ],
    )
    assert check_config_file(path, check_paths=False) == ("site", [])


def test_missing_manifest_and_params(tmp_path: Path) -> None:
    (tmp_path / "data").mkdir()
    path = write(tmp_path, SITE + 'params = "params.yaml"\n')
    cfg = load_site_config(path)
    assert check_paths(cfg, "site.toml") == [
        f"site.toml: data.manifest: file not found: {(tmp_path / 'data/manifest.csv').resolve()}",
        f"site.toml: radiomics.params: file not found: {(tmp_path / 'params.yaml').resolve()}",
    ]


def test_a_manifest_or_params_that_is_a_folder_is_named_a_folder(tmp_path: Path) -> None:
    """data.manifest (or radiomics.params) naming a folder: "a folder", not "file not found"."""
    (tmp_path / "data" / "manifest.csv").mkdir(parents=True)
    (tmp_path / "params").mkdir()
    path = write(tmp_path, SITE + 'params = "params"\n')
    done = run_fedmets("config", "check", path)
    assert done.returncode == 1 and "not found" not in done.stderr
    assert done.stderr.splitlines() == [
        f"{path}: data.manifest: a folder, not a file (give the manifest CSV):"
        f" {(tmp_path / 'data' / 'manifest.csv').resolve()}",
        f"{path}: radiomics.params: a folder, not a file (give the PyRadiomics parameter file):"
        f" {(tmp_path / 'params').resolve()}",
    ]


def test_a_missing_identity_key_is_a_path_problem(tmp_path: Path) -> None:
    """``[service] identity_key`` naming no file: ``config check`` says so (``site serve``
    would refuse to start), naming ``fedmets site keys``; ``--schema-only`` does not look."""
    write(tmp_path, "patient_id,dm\n", "data/manifest.csv")
    path = write(tmp_path, SITE + '\n[service]\nidentity_key = "keys/hospital_b"\n')
    key = (tmp_path / "keys" / "hospital_b").resolve()
    assert check_config_file(path) == (
        "site",
        [
            f"{path}: service.identity_key: file not found: {key} (make it with "
            "`fedmets site keys --site hospital_b --out FOLDER`)"
        ],
    )
    assert check_config_file(path, check_paths=False) == ("site", [])
    key.parent.mkdir()
    key.write_text("a key\n")
    assert check_config_file(path) == ("site", [])
    path.write_text(path.read_text() + 'socket_group = "no-such-group-9"\n')
    assert check_config_file(path) == (
        "site",
        [f"{path}: service.socket_group: no group 'no-such-group-9' on this machine"],
    )


def test_several_problems_all_reported(tmp_path: Path) -> None:
    text = (
        SITE.replace("seed = 3", "seed = -1\nextra = 1")
        .replace('mode = "images"', 'mode = "pixels"')
        .replace("= 5.0", "= 0")
    )
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_site_config(path)
    assert caught.value.problems == [
        f"{path}: seed: must be >= 0, got -1",
        f"{path}: data.mode: must be one of 'images', 'tabular', got 'pixels'",
        f"{path}: radiomics.peritumoral_margin_mm: must be > 0, got 0",
        f"{path}: extra: unknown key (allowed here: site_id, display_name, seed, data, compute,"
        " paths, radiomics, preprocess, policy, service)",
    ]
    assert str(caught.value) == "\n".join(caught.value.problems)


def test_wrong_loader_for_kind(tmp_path: Path) -> None:
    """A site's config where a run's is asked for (``site approve --run-config site.toml``),
    or the reverse, is one problem naming both kinds, not a list of unknown keys."""
    site, run = write(tmp_path, SITE, "site.toml"), write(tmp_path, FEDERATION, "run.toml")
    with pytest.raises(ConfigError) as caught:
        load_federation_config(site)
    assert caught.value.problems == [
        f"{site}: a site config (it has site_id), not a federation one"
    ]
    with pytest.raises(ConfigError) as caught:
        load_site_config(run)
    assert caught.value.problems == [f"{run}: a federation config (it has [run]), not a site one"]


# ---- CLI ----------------------------------------------------------------------------------------


def test_cli_reports_every_file_and_exits_1(tmp_path: Path) -> None:
    write(tmp_path, FEDERATION, "good.toml")
    write(tmp_path, SITE.replace("= 5.0", "= -3"), "bad.toml")
    result = run_cli("bad.toml", "missing.toml", "good.toml", cwd=tmp_path)
    assert result.returncode == 1
    for name in ("good.toml", "bad.toml", "missing.toml"):
        assert name in result.stdout
    assert result.stderr.splitlines() == [
        "bad.toml: radiomics.peritumoral_margin_mm: must be > 0, got -3",
        "missing.toml: file not found",
    ]


def test_cli_checks_paths_unless_schema_only(tmp_path: Path) -> None:
    path = write(tmp_path, SITE)
    assert run_cli(str(path)).returncode == 1
    assert run_cli("--schema-only", str(path)).returncode == 0


def test_the_logistic_baseline_chooses_no_network() -> None:
    """The plain baseline stays a logistic regression when the run chooses its main model's
    network (``[model] main_radiomics``, ``main_hidden``)."""
    fed = FederationConfig.model_validate(
        {"run": {"name": "choice"}, "model": {"main_radiomics": [0, 12], "main_hidden": [[8]]}}
    )
    plain = logistic_config(fed).model
    assert (plain.fusion_hidden, plain.main_radiomics, plain.main_hidden) == ([], [], [])


def _commands(group, path=()):
    """(words, click command) of every command under the click ``group``."""
    for name, command in group.commands.items():
        if hasattr(command, "commands"):
            yield from _commands(command, (*path, name))
        else:
            yield (*path, name), command


def test_every_help_shows_its_text_whole() -> None:
    """``--help`` of every command, as a log gets it (no terminal): the config sections its
    texts name ("[cv] folds") and their placeholders ("<paths.output>") are not taken for
    markup, and long defaults are not cut."""
    for words, command in _commands(typer.main.get_command(app)):
        shown = run_fedmets(*words, "--help")
        assert shown.returncode == 0, (words, shown.stderr)
        texts = [command.help or ""] + [getattr(p, "help", None) or "" for p in command.params]
        for kept in re.findall(r"\[[a-z_.]+\]|<[^<>\s]+>", " ".join(texts)):
            assert kept in shown.stdout, (words, kept)
        assert "…" not in shown.stdout, words
    assert "[default: swin3d,resnet3d,densenet3d]" in run_fedmets("study", "--help").stdout
