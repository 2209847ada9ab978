"""`fedmets report`: the HTML run report from a simulation's metrics.json (fixture copied from a
tiny 3-site image-mode simulation) and from a deployed run's federated.json alone; every image
is an embedded PNG; the page renders in headless Chromium."""

import base64
import copy
import json
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from conftest import run_fedmets
from typer.testing import CliRunner

from fedmets.server.report import binned_roc, write_report

FIXTURE = Path(__file__).parent / "data" / "sim_metrics.json"
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
EVIL = "<script>alert('x')</script>"


def _drop_none(value):
    if isinstance(value, dict):
        return {k: _drop_none(v) for k, v in value.items() if v is not None}
    return value


# The shape of fedmets.server.privacy.privacy_report (metrics.json "privacy_ledger")
LEDGER = {
    "sites": {
        site: {
            "epsilon": 2.75 if site == "hospital_a" else 1.5,
            "delta": 2e-6,
            "budget": 8.0,
            "releases": 6,
            "stages": {"image": {"epsilon": 2.75, "releases": 6}},
            "not_covered": ["moments", "histograms"],
        }
        for site in ("hospital_a", "hospital_b", "hospital_c")
    },
    "server": {"epsilon": 4.0, "delta": 1e-5, "budget": None, "releases": 12, "stages": {}},
    "worst_site_epsilon": 2.75,
    "note": "sample-level epsilon protects one patient of a site",
    "mode": "sample",
}


def make_sim_run(root: Path, metrics: dict | None = None) -> Path:
    """A simulation run folder: metrics.json, federation.toml, federated/federated.json and
    federated/server.log, as `fedmets simulate` leaves them."""
    metrics = metrics or json.loads(FIXTURE.read_text())
    run = root / "run"
    (run / "federated").mkdir(parents=True)
    (run / "metrics.json").write_text(json.dumps(metrics))
    (run / "federation.toml").write_text(tomli_w.dumps(_drop_none(metrics["config"]["federation"])))
    (run / "federated" / "federated.json").write_text(json.dumps(server_json(metrics)))
    (run / "federated" / "server.log").write_text(
        "2026-01-01 00:00:00,000 census: 3 sites, 48 patients\n"
    )
    return run


def server_json(metrics: dict) -> dict:
    """What the ServerApp writes to federated.json for the same run."""
    fed = metrics["federated"]
    return {
        "run": metrics["config"]["federation"]["run"]["name"],
        "models": fed["models"],
        "main_model": metrics["main_model"],
        "backbone": metrics["config"]["federation"]["model"]["backbone"],
        "census": metrics["census"],
        "folds": fed["folds"],
        "dropouts": metrics["dropouts"],
        "timing_s": fed["timing_s"],
        "config": metrics["config"]["federation"],
        "importance": fed.get("importance"),
        "secure_aggregation": False,
        "model": {"bundle": "run/federated/model", "rounds": {metrics["main_model"]: 3}},
    }


class _Images(HTMLParser):
    def __init__(self) -> None:
        super().__init__()
        self.sources: list[str] = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs).get("src") or "")


def assert_no_broken_images(page: Path) -> int:
    """Every <img src> is a data: URI of a PNG or a file beside the page; returns the count."""
    parser = _Images()
    parser.feed(page.read_text(encoding="utf-8"))
    for src in parser.sources:
        if src.startswith("data:"):
            assert src.startswith("data:image/png;base64,"), src[:40]
            data = base64.b64decode(src.split(",", 1)[1], validate=True)
            assert data.startswith(PNG_SIGNATURE)
        else:
            assert src and (page.parent / src).is_file(), src
    return len(parser.sources)


def assert_site_roc_image(page: Path, panels: int) -> None:
    """The per-site ROC figure is embedded, equals roc_per_site.png beside the page and is a
    real picture: ``panels`` side by side (wider than high), not one colour."""
    import matplotlib.image

    parser = _Images()
    parser.feed(page.read_text(encoding="utf-8"))
    png = (page.parent / "roc_per_site.png").read_bytes()
    embedded = "data:image/png;base64," + base64.b64encode(png).decode("ascii")
    assert embedded in parser.sources
    pixels = matplotlib.image.imread(page.parent / "roc_per_site.png")
    height, width = pixels.shape[:2]
    assert width > panels * 250 and width > 2 * height
    assert pixels[..., :3].std() > 0.05


def _without_roc(value):
    """The results as a run written before ROC points were stored."""
    if isinstance(value, dict):
        return {k: _without_roc(v) for k, v in value.items() if k != "roc"}
    return value


def test_report_from_simulation_run(tmp_path):
    metrics = json.loads(FIXTURE.read_text())
    metrics["dropouts"] = [{"route": "train.image", "site": EVIL, "fold": 0}]
    metrics["app_sha256"] = "5e" * 32
    run = make_sim_run(tmp_path, metrics)
    page = write_report(run)
    assert page == run / "report" / "report.html"
    text = page.read_text(encoding="utf-8")
    assert f"federated run: sha256 <code>{'5e' * 32}</code>, the app digest" in text
    assert assert_no_broken_images(page) == 6
    for name in ("roc_pooled", "calibration", "roc_per_site", "auc_per_site", "ablation"):
        assert (run / "report" / f"{name}.png").read_bytes().startswith(PNG_SIGNATURE)
    assert (run / "report" / "training.png").read_bytes().startswith(PNG_SIGNATURE)
    assert_site_roc_image(page, panels=3)
    assert "ROC per site of the main model" in text and "not ROC curves" not in text
    assert "predates stored ROC points" not in text  # the exact histogram ROC, not binned
    headline = metrics["federated"]["pooled"]
    assert f"{headline['auc']:.3f} [{headline['auc_ci'][0]:.3f}" in text
    assert f"{metrics['oracle_auc']:.3f}" in text
    for heading in (
        "Results of the main model",
        "Ablation: feature groups",
        "Results by tumour subsite",
        "Image backbones",
        "Differential privacy",
        "Training per stage and round",
        "Data quality per site",
        "Dropouts",
        "Configuration",
        "Software versions",
        "Server log",
    ):
        assert heading in text, heading
    assert "local-only" in text and "centralised" in text
    assert "Only one image backbone ran in this run: <b>swin3d" in text
    assert "DP off" in text and "no privacy budget was spent" in text
    assert "larynx" in text and "oropharynx" in text  # centralised has both, federated one
    assert "torch" in text and "importlib.metadata" in text
    assert EVIL not in text and "&lt;script&gt;" in text  # strings from the JSON are escaped


def test_optional_sections(tmp_path):
    """A second backbone, DP results and a privacy ledger each get their section."""
    metrics = json.loads(FIXTURE.read_text())
    for setting in ("federated", "centralized"):
        models = metrics[setting]["models"]
        for key in [k for k in models if k.startswith("swin3d/")]:
            models[key.replace("swin3d/", "resnet3d/")] = copy.deepcopy(models[key])
    metrics["config"]["federation"]["dp"].update(mode="sample", epsilon=3.0)
    metrics["dp"] = {
        "settings": {"delta": 1e-5},
        "results": [
            {"epsilon": 1.0, "auc_mean": 0.61, "auc_sd": 0.01},
            {"epsilon": 8.0, "auc_mean": 0.7, "auc_sd": 0.01},
            {"epsilon": None, "auc_mean": 0.72, "auc_sd": 0.02},  # infinity: no DP
        ],
    }
    metrics["privacy_ledger"] = LEDGER
    text = write_report(make_sim_run(tmp_path, metrics)).read_text(encoding="utf-8")
    assert "Backbones: resnet3d, swin3d" in text
    assert "resnet3d/deep+radiomics+clinical" in text
    assert "DP trade-off" in text and "DP off" not in text
    assert (tmp_path / "run" / "report" / "dp_tradeoff.png").is_file()
    assert "2e-06" in text  # delta of the ledger, not rounded to 0
    assert "image: &epsilon; 2.75 (6 releases)" in text
    assert "worst site &epsilon; 2.75" in text and "server (client-level)" in text
    assert "moments, histograms" in text  # released without DP
    assert "No model bundle in this run" in text


def test_the_final_model_section_shows_its_card_and_held_out_sites(tmp_path):
    """The bundle's model card and where it was kept; --holdout and --loso tables."""
    metrics = json.loads(FIXTURE.read_text())
    main = metrics["main_model"]
    pooled = metrics["federated"]["pooled"]
    site = {**pooled, "calibration_slope": 0.8125, "calibration_intercept": -0.25}
    sites = list(metrics["federated"]["per_site"])
    metrics["holdout"] = {
        "training_sites": sites[1:],
        "held_out": sites[:1],
        "main_model": main,
        "cross_validated": pooled,
        "per_site": {sites[0]: site},
        "pooled": site,
        "bundle": "holdout/model",
        "seconds": 1.0,
    }
    metrics["loso"] = {
        "main_model": main,
        "per_site": dict.fromkeys(sites, site),
        "pooled": pooled,
        "runs": {},
    }
    metrics["model"] = {"sites": dict.fromkeys(sites, "stored")}
    run = make_sim_run(tmp_path, metrics)
    (run / "federated" / "model").mkdir(parents=True)
    (run / "federated" / "model" / "MODEL_CARD.md").write_text("# Model card: <main>\n")
    text = write_report(run).read_text(encoding="utf-8")
    assert "# Model card: &lt;main&gt;" in text  # the card, escaped
    assert f"{sites[0]} stored" in text
    assert "Held-out sites" in text and "Leave one site out" in text
    assert "0.812" in text and "-0.250" in text


def test_server_output_only(tmp_path):
    """A deployed run's server folder (federated.json + server.log, no baselines) renders."""
    metrics = json.loads(FIXTURE.read_text())
    folder = tmp_path / "server-out"
    folder.mkdir()
    server = server_json(metrics) | {"privacy": LEDGER}  # the ServerApp's name for the ledger
    server["selection_stability"] = {  # top level in federated.json, under federated in metrics
        "folds": 3,
        "mean_jaccard": 0.4321,
        "in_every_fold": 2,
        "in_any_fold": 9,
    }
    (folder / "federated.json").write_text(json.dumps(server))
    (folder / "server.log").write_text("census: 3 sites\n")
    page = write_report(folder)
    text = page.read_text(encoding="utf-8")
    assert assert_no_broken_images(page) >= 4
    assert "No centralised baseline in this run" in text
    assert "No local-only baseline in this run" in text
    assert "centralised AUC [95% CI]" not in text  # no baseline columns in the ablation
    assert "server output" in text and "Server log" in text
    assert "mean pairwise Jaccard 0.43" in text
    main = metrics["federated"]["models"][metrics["main_model"]]["pooled"]
    assert f"{main['auc']:.3f}" in text
    assert "[dp]" in text  # the federation config, rendered as TOML
    assert "worst site &epsilon; 2.75" in text


def test_cli_report(tmp_path):
    from fedmets.cli import app

    run = make_sim_run(tmp_path)
    result = CliRunner().invoke(app, ["report", str(run)])
    assert result.exit_code == 0, result.output
    assert (run / "report" / "report.html").is_file()
    missing = CliRunner().invoke(app, ["report", str(tmp_path / "nothing")])
    assert missing.exit_code == 1 and "nothing: folder not found" in missing.output
    a_file = CliRunner().invoke(app, ["report", str(run / "metrics.json")])
    assert a_file.exit_code == 1
    assert f"a file, not a run folder (give {run})" in a_file.output.replace("\n", "")
    # typed results (fedmets.server.results): a key the writers do not declare is refused
    metrics = json.loads((run / "metrics.json").read_text())
    metrics["federated"]["pooled"]["auroc"] = 0.7
    drifted = make_sim_run(tmp_path / "drifted", metrics)
    refused = CliRunner().invoke(app, ["report", str(drifted)])
    assert refused.exit_code == 1 and "federated.pooled.auroc" in refused.output
    assert "metrics.json: not the results of a run" in refused.output.replace("\n", "")
    (drifted / "metrics.json").write_text("{}")  # one line naming the keys, not pydantic's
    empty = CliRunner().invoke(app, ["report", str(drifted)])
    assert empty.exit_code == 1 and "errors.pydantic.dev" not in empty.output
    assert "config (field required); federated (field required)" in empty.output
    (drifted / "metrics.json").write_text('{"federated": {"pooled"')  # cut short by a copy
    damaged = CliRunner().invoke(app, ["report", str(drifted)])
    assert damaged.exit_code == 1
    assert "metrics.json: not readable JSON" in damaged.output.replace("\n", "")


def test_a_study_run_is_named_as_one(tmp_path):
    """``fedmets report`` on a ``fedmets study`` folder: one line saying what it is and where
    its figures are, not the keys a simulation's metrics.json would have."""
    run = tmp_path / "study"
    run.mkdir()
    config = {"mode": "tabular", "threshold_rule": "Youden J", "folds": 2}
    (run / "metrics.json").write_text(json.dumps({"config": config, "models": {}}))
    done = run_fedmets("report", run)
    said = done.stderr.replace("\n", "")
    assert done.returncode == 1 and "Traceback" not in said
    assert said.startswith(f"error: {run / 'metrics.json'}: the results of `fedmets study`")
    assert "roc.png" in said and "field required" not in said


def test_report_of_a_failed_deployed_run_shows_its_error(tmp_path):
    """A deployed run that stopped (the ServerApp wrote error.txt, no federated.json): the
    report says so with error.txt's first line, not that no results file was found."""
    for out, where in ((tmp_path / "a", "."), (tmp_path / "b", "federated")):
        (out / where).mkdir(parents=True)
        (out / where / "error.txt").write_text(
            "census: 1 site(s) answered, fewer than federation.min_sites = 2\nmore\n"
        )
        done = run_fedmets("report", out)
        assert done.returncode == 1 and "Traceback" not in done.stderr
        said = done.stderr.replace("\n", "")
        assert said.startswith(
            f"error: {out}: the run failed and wrote no results: census: 1 site(s) answered,"
            " fewer than federation.min_sites = 2 (all of it in"
        )
        assert "more" not in said and "neither metrics.json" not in said


def test_run_without_roc_points_falls_back_to_the_binned_pooled_roc(tmp_path):
    """An older run (no ROC points): the pooled ROC is rebuilt from the reliability bins and
    there is no per-site ROC figure; the forest plot remains."""
    metrics = _without_roc(json.loads(FIXTURE.read_text()))
    page = write_report(make_sim_run(tmp_path, metrics))
    text = page.read_text(encoding="utf-8")
    assert assert_no_broken_images(page) == 5
    assert "predates stored ROC points" in text
    assert (page.parent / "roc_pooled.png").is_file() and (
        page.parent / "auc_per_site.png"
    ).is_file()
    assert not (page.parent / "roc_per_site.png").exists()


def test_binned_roc_matches_mann_whitney():
    """The ROC rebuilt from reliability bins has the area of the bin-tied Mann-Whitney AUC."""
    calibration = {"prob_true": [0.0, 0.25, 0.5, 1.0], "prob_pred": [0.1, 0.3, 0.6, 0.9],
                   "counts": [4, 8, 4, 2]}  # fmt: skip
    fpr, tpr, area = binned_roc(calibration)
    pos, neg = np.array([0, 2, 2, 2]), np.array([4, 6, 2, 0])
    pairs = sum(pos[i] * (neg[:i].sum() + 0.5 * neg[i]) for i in range(4)) / (pos.sum() * neg.sum())
    assert area == pytest.approx(pairs)
    assert (fpr[0], tpr[0], fpr[-1], tpr[-1]) == (0, 0, 1, 1)
    assert binned_roc({"prob_true": [1.0], "prob_pred": [0.5], "counts": [3]}) is None


def _chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        if found := shutil.which(name):
            return found
    return "/usr/bin/chromium" if Path("/usr/bin/chromium").is_file() else None


@pytest.mark.skipif(
    _chromium() is None,
    reason="no chromium binary (apt-get install chromium; scripts/install.sh tries as root)",
)
def test_report_renders_in_chromium(tmp_path):
    import matplotlib.image

    page = write_report(make_sim_run(tmp_path))
    shot = tmp_path / "report.png"
    command = [
        _chromium(),
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        f"--screenshot={shot}",
        "--window-size=1280,4000",
        page.as_uri(),
    ]
    done = subprocess.run(command, capture_output=True, text=True, timeout=120)
    assert shot.is_file(), done.stderr[-2000:]
    assert shot.stat().st_size > 20_000
    pixels = matplotlib.image.imread(shot)
    assert pixels.shape[:2] == (4000, 1280)
    flat = pixels[..., :3].reshape(-1, 3)
    assert len(np.unique(flat[:: max(1, len(flat) // 200_000)], axis=0)) > 50  # not one colour
    assert pixels[:, :, :3].std() > 0.05


def test_simulation_without_baselines(tmp_path):
    """`fedmets simulate --no-baselines`: metrics.json without centralised, local-only or
    ablation sections."""
    metrics = json.loads(FIXTURE.read_text())
    for key in ("centralized", "local_only", "ablation"):
        metrics.pop(key)
    page = write_report(make_sim_run(tmp_path, metrics))
    text = page.read_text(encoding="utf-8")
    assert assert_no_broken_images(page) == 6
    assert_site_roc_image(page, panels=3)  # the federated curve alone per site
    assert "No centralised baseline in this run" in text and "simulation" in text
    assert "swin3d/deep+clinical" in text  # the ablation from the federated models alone
