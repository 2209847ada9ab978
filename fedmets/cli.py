"""`fedmets` command line. Each command imports its implementation lazily so that start-up stays
fast (no torch import for `config check`)."""

from __future__ import annotations

import contextlib
import os
import signal
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TextIO

LOG_WIDTH = 200
"""Console width when the output is not a terminal (a log file, CI): rich would otherwise lay
tables out for 80 columns and cut their cells. A set ``COLUMNS`` still wins."""


def _to_log(stream: TextIO) -> bool:
    """Whether ``stream`` goes to a log (no terminal) whose width no ``COLUMNS`` sets."""
    return not (stream.isatty() or "COLUMNS" in os.environ)


if _to_log(sys.stdout):
    # Typer's --help reads it when it first lays help out: the options' tables at 80 columns
    # would cut long defaults in a log ("swin3d,resnet3d,densene…")
    os.environ.setdefault("TERMINAL_WIDTH", str(LOG_WIDTH))

import typer  # noqa: E402
from rich.console import Console  # noqa: E402

app = typer.Typer(
    help="fedmets: federated distant-metastasis prediction for head-and-neck cancer.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    rich_markup_mode="markdown",
)
config_app = typer.Typer(
    help="Validate site and federation configuration files.", no_args_is_help=True
)
app.add_typer(config_app, name="config")
site_app = typer.Typer(help="Hospital-side commands on this site's own data.", no_args_is_help=True)
app.add_typer(site_app, name="site")
audit_app = typer.Typer(
    help="This site's audit log of what left it (a hash chain).", no_args_is_help=True
)
site_app.add_typer(audit_app, name="audit")


def _console(stderr: bool = False) -> Console:
    """A rich console for stdout or stderr: a terminal's own width, else :data:`LOG_WIDTH`."""
    return Console(
        stderr=stderr, width=LOG_WIDTH if _to_log(sys.stderr if stderr else sys.stdout) else None
    )


console = _console()
err_console = _console(stderr=True)


def _patient_progress():
    """A rich progress bar counting patients, with elapsed time and ETA; in a log (no terminal),
    plain progress lines instead (:class:`_LogProgress`)."""
    if not console.is_terminal:
        return _LogProgress(console)
    from rich.progress import BarColumn, Progress, TimeElapsedColumn, TimeRemainingColumn

    return Progress(
        "[progress.description]{task.description}",
        BarColumn(),
        "{task.completed}/{task.total} patients",
        TimeElapsedColumn(),
        "ETA",
        TimeRemainingColumn(),
        console=console,
    )


LOG_PROGRESS_S = 30.0
"""In a log, a task's progress line comes at most this often (besides its first and last)."""


@dataclass
class _LoggedTask:
    """One task of :class:`_LogProgress`: what it counts and when its last line was printed."""

    description: str
    total: int | None
    started: float
    shown: int | None = None  # the count of the last line printed
    shown_at: float = 0.0


class _LogProgress:
    """:func:`_patient_progress` for a log (nohup, cron, systemd), as rich's bar is drawn only at
    the end there: a plain line per task at its first and last step and every
    :data:`LOG_PROGRESS_S` seconds between, e.g. ``extracting site_a: 12/400 patients, 1m20s``.
    The same calls as rich's ``Progress`` (the options it does not use are ignored)."""

    def __init__(self, output: Console) -> None:
        self.output = output
        self.tasks: list[_LoggedTask] = []

    def __enter__(self) -> _LogProgress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        return None

    def add_task(self, description: str, total: int | None = None, **_: object) -> int:
        self.tasks.append(_LoggedTask(description, total, self.output.get_time()))
        return len(self.tasks) - 1

    def update(
        self, task_id: int, completed: int | None = None, total: int | None = None, **_: object
    ) -> None:
        task = self.tasks[task_id]
        task.total = task.total if total is None else total
        if completed is None or completed == task.shown:
            return
        now = self.output.get_time()
        if task.shown is None or completed == task.total or now - task.shown_at >= LOG_PROGRESS_S:
            task.shown, task.shown_at = completed, now
            of = "" if task.total is None else f"/{task.total}"
            elapsed = _duration(now - task.started)
            line = f"{task.description}: {completed}{of} patients, {elapsed}"
            self.output.print(line, markup=False, highlight=False, soft_wrap=True)


EXTRACTION_STOPPED = "the patients extracted so far are cached: the same command goes on from them"
SIMULATION_STOPPED = (
    "its Flower processes are stopped; the sites' extracted patients are cached: the same"
    " command with --overwrite starts the run again from them"
)


@contextlib.contextmanager
def _sigterm_as_ctrl_c(stopped: str) -> Iterator[None]:
    """In the block, SIGTERM (``kill``, ``systemctl stop``) stops the command as Ctrl-C does,
    with KeyboardInterrupt: its worker processes are shut down, not left running on their own.
    Either prints ``stopped: <stopped>`` (what is kept) before the exit (130)."""

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    except KeyboardInterrupt:
        err_console.print(f"stopped: {stopped}", markup=False, highlight=False, soft_wrap=True)
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _duration(seconds: float) -> str:
    """``45s``, ``1m20s``, ``2h03m``."""
    minutes, secs = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    if hours:
        return f"{hours}h{minutes:02d}m"
    return f"{minutes}m{secs:02d}s" if minutes else f"{secs}s"


@app.callback()
def _root() -> None:
    """fedmets command line."""


# ---- config -----------------------------------------------------------------------------------


@config_app.command("check")
def config_check(
    files: Annotated[list[str], typer.Argument(help="Site or federation TOML files.")],
    schema_only: Annotated[
        bool, typer.Option("--schema-only", help="Skip checking that data paths exist.")
    ] = False,
) -> None:
    """Validate config files; print every problem and exit 1 if any file has one."""
    from rich.table import Table
    from rich.text import Text

    from fedmets.shared.config import check_config_file

    table = Table()
    table.add_column("file", overflow="fold")  # never cut a path short
    table.add_column("kind")
    table.add_column("status")
    all_problems: list[str] = []
    for file in files:
        kind, problems = check_config_file(file, check_paths=not schema_only)
        status = Text(f"{len(problems)} problem(s)", "red") if problems else Text("ok", "green")
        table.add_row(Text(file), kind, status)
        all_problems += problems
    console.print(table)
    for problem in all_problems:
        err_console.print(problem, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1 if all_problems else 0)


# ---- synth ------------------------------------------------------------------------------------


@app.command()
def synth(
    out: Annotated[Path, typer.Option("--out", help="Folder to write the cohort to.")],
    preset: Annotated[str, typer.Option(help="tiny | quickstart | demo | paper")] = "demo",
    sites: Annotated[
        int | None, typer.Option(min=1, help="Number of sites (default: the preset's).")
    ] = None,
    seed: Annotated[int, typer.Option(help="Cohort seed: same seed, identical files.")] = 7,
    workers: Annotated[
        int, typer.Option(min=0, help="Parallel processes (default: all cores).")
    ] = 0,
    overwrite: Annotated[bool, typer.Option(help="Replace a non-empty --out folder.")] = False,
    crop_voxels: Annotated[
        int | None,
        typer.Option(
            min=32,
            max=256,
            help="Side of the sites' deep-model crops ([preprocess] crop_voxels; default 64):"
            " 96 for the gpu image preset, which reads 96^3 crops natively.",
        ),
    ] = None,
) -> None:
    """Generate a synthetic multi-site HNSCC cohort (CT, masks, manifests, site configs)."""
    import os
    import time

    from rich.text import Text

    from fedmets.simulation.synth import generate_cohort

    started = time.perf_counter()
    with _patient_progress() as progress:
        task = progress.add_task(f"rendering {preset} cohort", total=None)
        try:
            summary = generate_cohort(
                preset,
                sites,
                seed,
                out,
                workers=workers or os.cpu_count() or 1,
                overwrite=overwrite,
                on_patient_done=lambda done, total: progress.update(
                    task, completed=done, total=total
                ),
                crop_voxels=crop_voxels,
            )
        except (ValueError, OSError) as error:
            err_console.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
            raise typer.Exit(1) from error
    _print_cohort_summary(summary, out, time.perf_counter() - started)


def _print_cohort_summary(summary: dict, out: Path, seconds: float) -> None:
    """The cohort per site in two tables, each of which fits 80 columns (a log, CI) without a
    word split: its patients and labels, then its images."""
    from rich.table import Table

    oracle = summary["oracle_auc"]
    labels = Table(title=f"{summary['preset']} cohort, seed {summary['seed']}")
    images = Table(title="images")
    for table, columns in (
        (labels, ("site", "patients", "DM+", "prevalence", "oracle AUC")),
        (
            images,
            ("site", "in-plane mm", "slice mm", "contrast", "noise HU", "median GTV cc",
             "MB/patient"),
        ),
    ):  # fmt: skip
        for column in columns:
            justify = "left" if column == "site" else "right"
            table.add_column(column, justify=justify, overflow="fold")
    for site in summary["sites"]:
        spacing = site["spacing_mm"]
        labels.add_row(
            site["site_id"],
            str(site["n_patients"]),
            str(site["positives"]),
            f"{site['prevalence']:.1%}",
            "n/a" if site["oracle_auc"] is None else f"{site['oracle_auc']:.3f}",
        )
        images.add_row(
            site["site_id"],
            f"{spacing[0]:.2f}",
            f"{spacing[2]:.2f}",
            f"{site['contrast_share']:.0%}",
            f"{site['noise_hu']:.1f}",
            f"{site['median_volume_cc']:.1f}",
            f"{site['mb_per_patient']:.2f}",
        )
    labels.add_section()
    labels.add_row(
        "all",
        str(summary["n_patients"]),
        str(summary["positives"]),
        f"{summary['prevalence']:.1%}",
        f"{oracle['pooled']:.3f}",
    )
    images.add_section()
    images.add_row("all", "", "", "", "", "", f"{summary['mb_per_patient']:.2f}")
    console.print(_fit_columns(labels))
    console.print(_fit_columns(images))
    console.print(  # wrapped between words
        f"oracle AUC of the risk model's parts alone: image {oracle['image_part_only']:.3f},"
        f" clinical {oracle['clinical_part_only']:.3f}; written in {seconds:.1f} s to {out}."
        f" Site configs: {out}/<site>/site.toml",
        markup=False,
        highlight=False,
    )


# ---- split ------------------------------------------------------------------------------------


@app.command()
def split(
    input_path: Annotated[
        Path, typer.Argument(metavar="INPUT", help="Cohort folder or feature table CSV.")
    ],
    out: Annotated[Path, typer.Option("--out", help="New (empty) folder for the site folders.")],
    scheme: Annotated[str, typer.Option(help="iid | dirichlet | quantity | column")],
    sites: Annotated[
        int | None, typer.Option(help="Number of sites (not with --scheme column).")
    ] = None,
    alpha: Annotated[
        float, typer.Option(help="Dirichlet concentration; smaller = more skew.")
    ] = 0.5,
    column: Annotated[
        str | None, typer.Option(help="Column to split on for --scheme column.")
    ] = None,
    label: Annotated[str, typer.Option(help="Binary 0/1 label column.")] = "dm",
    id_column: Annotated[str, typer.Option("--id", help="Unique patient id column.")] = (
        "patient_id"
    ),
    seed: Annotated[int, typer.Option(help="Same seed, same split.")] = 0,
    min_per_site: Annotated[int, typer.Option(help="Fewest rows any site may get.")] = 2,
) -> None:
    """Re-partition a cohort folder or feature table into simulated federated sites."""
    from rich.table import Table
    from rich.text import Text

    from fedmets.simulation.site_files import split_input

    try:
        record = split_input(
            input_path,
            out,
            scheme,
            n_sites=sites,
            alpha=alpha,
            column=column,
            label_column=label,
            id_column=id_column,
            seed=seed,
            min_per_site=min_per_site,
        )
    except (ValueError, OSError) as error:
        message = Text.assemble(("error: ", "red"), str(error))
        err_console.print(message, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error
    table = Table(title=f"{scheme} split, seed {seed}")
    for name in ("site", "n", "positives", "prevalence"):
        table.add_column(name, justify="left" if name == "site" else "right")
    for site in record["sites"]:
        table.add_row(
            site["site_id"], str(site["n"]), str(site["positives"]), f"{site['prevalence']:.1%}"
        )
    console.print(table)
    if record["moved_rows"]:
        console.print(f"{record['moved_rows']} row(s) moved so every site has >= {min_per_site}.")
    console.print(
        f"{record['n_rows']} rows in {len(record['sites'])} site folders under {out}", markup=False
    )


# ---- site -------------------------------------------------------------------------------------

SITE_CHECK_FULL_TABLE = 40  # patients; above this the table lists only the quarantined ones


def _site_name(cfg) -> str:
    """A site as the hospital's own commands show it in rich markup (progress, table titles):
    its id, and its display name if set, escaped (a name may hold brackets)."""
    from rich.markup import escape

    return escape(f"{cfg.site_id} ({cfg.display_name})" if cfg.display_name else cfg.site_id)


def _load_site_config_or_exit(config: Path):
    """The site config at ``config`` with its paths checked; prints the problems and exits 1."""
    from fedmets.shared.config import ConfigError, check_paths, load_site_config

    try:
        cfg = load_site_config(config)
        problems = check_paths(cfg, config)
    except ConfigError as error:
        problems = error.problems
    for problem in problems:
        err_console.print(problem, markup=False, highlight=False, soft_wrap=True)
    if problems:
        raise typer.Exit(1)
    return cfg


def _writable_file_or_exit(path: Path, where: str) -> None:
    """Exit 1 with one line naming ``where`` (the option or config key) when the file ``path``
    cannot be written: a folder there, or a folder for it that cannot be made or written.
    Tried before the work whose result the file holds."""
    from fedmets.shared.files import check_writable

    if path.is_dir():
        message = f"{where}: cannot write {path}: a folder, not a file"
    else:
        try:
            check_writable(path.parent, where)
            return
        except OSError as error:
            message = str(error)
    err_console.print(message, markup=False, highlight=False, soft_wrap=True)
    raise typer.Exit(1)


def _load_federation_config_or_exit(config: Path):
    """The federation config at ``config``; prints its problems and exits 1."""
    from fedmets.shared.config import ConfigError, load_federation_config

    try:
        return load_federation_config(config)
    except ConfigError as error:
        for problem in error.problems:
            err_console.print(problem, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error


@site_app.command("check")
def site_check(
    config: Annotated[Path, typer.Option("--config", help="This site's TOML config.")],
    workers: Annotated[
        int | None, typer.Option(min=1, help="Parallel processes (default: compute.workers).")
    ] = None,
    report: Annotated[
        Path | None,
        typer.Option(help="JSON report path (default: <paths.output>/site_check.json)."),
    ] = None,
) -> None:
    """Check the site's manifest, images, masks and clinical data; quarantine bad patients.

    Exits 0 when at least one patient is usable, 1 when none is or the config is wrong."""
    import time

    from rich.progress import BarColumn, Progress, TimeElapsedColumn
    from rich.table import Table
    from rich.text import Text

    from fedmets.client.site_check import check_site

    cfg = _load_site_config_or_exit(config)
    path = report or cfg.paths.output / "site_check.json"
    _writable_file_or_exit(path, "--report" if report else "paths.output")

    started = time.perf_counter()
    with (
        _sigterm_as_ctrl_c("nothing was written; run the check again"),
        Progress(
            "[progress.description]{task.description}",
            BarColumn(),
            "{task.completed}/{task.total} patients",
            TimeElapsedColumn(),
            console=console,
            transient=True,
        ) as progress,
    ):
        task = progress.add_task(f"checking {_site_name(cfg)}", total=None)
        result = check_site(
            cfg,
            workers,
            on_patient_done=lambda done, total: progress.update(task, completed=done, total=total),
        )
    seconds = time.perf_counter() - started

    table = Table(title=f"site check: {_site_name(cfg)}")
    table.add_column("patient", overflow="fold")  # pseudonymised ids run long: never cut
    table.add_column("status")
    table.add_column("problems", overflow="fold")
    for patient_id, messages in result.quarantined.items():
        table.add_row(Text(patient_id), Text("quarantined", "red"), Text("\n".join(messages)))
    if result.n_patients <= SITE_CHECK_FULL_TABLE:
        for patient_id in result.usable:
            table.add_row(Text(patient_id), Text("ok", "green"), "")
    elif result.usable:
        table.add_row(Text(f"{len(result.usable)} others"), Text("ok", "green"), "")
    if result.quarantined or result.usable:
        console.print(table)
    for problem in result.site_problems:
        err_console.print(Text.assemble(("error: ", "red"), problem), soft_wrap=True)

    from fedmets.shared.files import write_json

    try:
        write_json(path, result.to_json(), indent=2)
    except OSError as error:
        where = "--report" if report else "paths.output"
        err_console.print(
            f"{where}: cannot write {path}: {error.strerror or error}",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from error
    patients = len(result.usable) + len(result.quarantined)  # rows sharing an id: one patient
    rows = f" ({result.n_patients} rows)" if result.n_patients != patients else ""
    _plain(
        f"{len(result.usable)} of {patients} patients{rows} usable,"
        f" {len(result.quarantined)} quarantined ({seconds:.1f} s). Report: {path}"
    )
    raise typer.Exit(0 if result.usable else 1)


# ---- site extract -----------------------------------------------------------------------------


@site_app.command("extract")
def site_extract(
    config: Annotated[Path, typer.Option("--config", help="This site's TOML config.")],
    workers: Annotated[
        int | None, typer.Option(min=1, help="Parallel processes (default: compute.workers).")
    ] = None,
) -> None:
    """Check the site, then extract PyRadiomics features of tumour and peritumoral ring for every
    usable patient (cached per patient) into <paths.output>/features.parquet.

    Exits 0 when at least one patient has features, 1 when none has or the config is wrong."""
    from rich.text import Text

    from fedmets.client.extract import extract_site

    cfg = _load_site_config_or_exit(config)

    with _sigterm_as_ctrl_c(EXTRACTION_STOPPED), _patient_progress() as progress:
        checking = progress.add_task(f"checking {_site_name(cfg)}", total=None)
        extracting = progress.add_task(f"extracting {_site_name(cfg)}", total=None, visible=False)

        def checked(done: int, total: int) -> None:
            progress.update(checking, completed=done, total=total)

        def extracted(done: int, total: int) -> None:
            progress.update(extracting, completed=done, total=total, visible=True)

        try:
            report = extract_site(cfg, workers, extracted, checked)
        except (ValueError, OSError) as error:
            err_console.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
            raise typer.Exit(1) from error

    for patient_id, reasons in report["quarantined"].items():
        for reason in reasons:
            err_console.print(
                f"quarantined: patient {patient_id}: {reason}",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
    for failure in report["failed"].values():
        err_console.print(
            f"failed: {failure['message']}", markup=False, highlight=False, soft_wrap=True
        )
    for problem in report["site_problems"]:
        err_console.print(Text.assemble(("error: ", "red"), problem), soft_wrap=True)
    counts, per_region = report["counts"], report["features_per_region"]
    with_features = counts["extracted"] + counts["cached"]
    radiomics = (
        f"{per_region['radiomics']} radiomics"
        if "radiomics" in per_region
        else f"{per_region['tumour']} tumour, {per_region['ring']} ring"
    )
    _plain(
        f"{with_features} patients in {report['features_file']} ({counts['extracted']} extracted,"
        f" {counts['cached']} cached), {counts['failed']} failed, {counts['quarantined']}"
        f" quarantined; features: {radiomics}, {per_region['clinical']} clinical;"
        f" {report['seconds']:.1f} s"
        f" ({report['patients_per_minute']:.1f} patients/min)."
        f" Report: {cfg.paths.output / 'extraction_report.json'}"
    )
    if not report["features_file_written"]:
        err_console.print(
            Text.assemble(
                ("error: ", "red"),
                f"no patient is usable: {report['features_file']} keeps the last extraction's"
                " patients",
            ),
            soft_wrap=True,
        )
    raise typer.Exit(0 if with_features else 1)


# ---- study ------------------------------------------------------------------------------------


@app.command()
def study(
    out: Annotated[Path, typer.Option("--out", help="Folder for metrics.json, OOF CSV, PNGs.")],
    cohort: Annotated[
        Path | None, typer.Option(help="Cohort folder of site configs (SITE/site.toml).")
    ] = None,
    table: Annotated[
        Path | None, typer.Option(help="Feature table CSV (tabular mode, no images).")
    ] = None,
    label: Annotated[str, typer.Option(help="Tabular mode: 0/1 label column.")] = "label",
    id_column: Annotated[str, typer.Option("--id", help="Tabular mode: patient id column.")] = (
        "patient_id"
    ),
    preset: Annotated[
        str, typer.Option(help="tiny | quickstart | demo | paper | gpu (as fedmets simulate)")
    ] = "demo",
    config: Annotated[
        Path | None, typer.Option(help="A federation TOML instead of the preset.")
    ] = None,
    folds: Annotated[
        int | None, typer.Option(min=2, max=10, help="Cross-validation folds ([cv] folds).")
    ] = None,
    fusion: Annotated[
        str | None,
        typer.Option(
            help="Models of several feature groups: joint (one fusion net on the concatenated"
            " groups) | late (mean logit of the single-group models). [model] fusion."
        ),
    ] = None,
    members: Annotated[
        int | None,
        typer.Option(
            min=1, max=20, help="Fusion networks per model, averaged ([model] fusion_members)."
        ),
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the training ([run] seed; default: the config's, 7 with a preset)."
        ),
    ] = None,
    repeats: Annotated[
        int,
        typer.Option(
            min=1,
            help="Repeated CV: repeat k redraws every site's folds from its seed + k and trains"
            " with seed + k (OUT/repeat-K/); the spread goes to OUT/repeats.json.",
        ),
    ] = 1,
    backbones: Annotated[
        str, typer.Option(help="Comma-separated image backbones; the first is the main one.")
    ] = "swin3d,resnet3d,densenet3d",
    device: Annotated[
        str | None, typer.Option(help="auto | cpu | cuda | cuda:N (default: each site's).")
    ] = None,
    workers: Annotated[
        int | None, typer.Option(min=1, help="Extraction processes (default: compute.workers).")
    ] = None,
    parallel_folds: Annotated[
        int,
        typer.Option(
            min=1,
            help="Folds trained at once, each in its own process with its share of the CPU"
            " cores and the GPU memory ([dp] mode off only).",
        ),
    ] = 1,
) -> None:
    """Centralised cross-validated study (the paper's reference): the federated protocol over
    every patient pooled in one site (simulate's centralised baseline), once per backbone, with
    exact out-of-fold metrics, ablations, paired DeLong tests and figures."""
    from rich.text import Text

    from fedmets.shared.config import ConfigError, FederationConfig, load_federation_config
    from fedmets.shared.image_presets import BACKBONES
    from fedmets.simulation.repeated_study import run_repeated_study
    from fedmets.simulation.simulate import PRESETS, federation_config, with_seed
    from fedmets.simulation.study import cohort_sites, run_study, table_site

    if (cohort is None) == (table is None):
        err_console.print("[red]error:[/red] give exactly one of --cohort and --table")
        raise typer.Exit(1)
    chosen = [b.strip() for b in backbones.split(",") if b.strip()]
    unknown = [b for b in chosen if b not in BACKBONES]
    unknown += [] if config or preset in PRESETS else [f"preset {preset}"]
    unknown += [] if fusion in (None, "joint", "late") else [f"fusion {fusion}"]
    if unknown:
        err_console.print(
            f"[red]error:[/red] unknown backbone, preset or fusion: {', '.join(unknown)}"
        )
        raise typer.Exit(1)

    def say(message: str) -> None:
        console.print(message, markup=False, highlight=False)

    try:
        if out.exists() and not out.is_dir():  # found before the cohort's extraction
            raise ValueError(f"--out: {out} is a file, not a folder for the study")
        name = "study"
        fed = with_seed(
            load_federation_config(config) if config else federation_config(preset, name), seed
        )
        settings = fed.model_dump(mode="json")
        settings["run"]["name"] = name
        settings["cv"]["folds"] = folds or fed.cv.folds
        if fusion:
            settings["model"]["fusion"] = fusion
        if members:
            settings["model"]["fusion_members"] = members
        fed = FederationConfig.model_validate(settings)
        if cohort:
            sites = cohort_sites(cohort, workers, say)
        else:
            sites = table_site(table, label, id_column, out)
        if repeats > 1:
            summary = run_repeated_study(
                sites, fed, out, repeats, chosen, device, say, parallel_folds
            )
        else:
            result = run_study(sites, fed, out, chosen, 0, device, say, parallel_folds)
    except (ValueError, OSError, ConfigError) as error:
        err_console.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
        raise typer.Exit(1) from error
    shown = "config" if config else preset
    if repeats > 1:
        _print_repeats(summary, shown, out)
    else:
        _print_study(result.metrics, shown, out)


def _fit_columns(table, output: Console | None = None):
    """``table`` with its columns' widths set so that no word is split where its words fit
    ``output``'s width (rich would narrow the widest columns alike, splitting a short header
    word such as "MB/patient" while another column has room): each column gets its longest
    word, and the room left goes to the columns with longer lines. A table that fits as it is,
    or whose words cannot fit, is left as it is."""
    from rich.measure import Measurement

    output = output or console
    options = output.options.update_width(10_000)  # the widths the words and lines want
    whole = Measurement.get(output, options, table)
    if whole.maximum <= output.width:
        return table
    ranges = [
        [Measurement.get(output, options, cell) for cell in (column.header, *column.cells)]
        for column in table.columns
    ]
    least = [max(r.minimum for r in cells) for cells in ranges]
    most = [max(r.maximum for r in cells) for cells in ranges]
    room = output.width - whole.minimum  # beyond every column's longest word
    if room < 0:
        return table
    wants = [high - low for low, high in zip(least, most, strict=True)]
    for column, low, want in zip(table.columns, least, wants, strict=True):
        column.width = low + (room * want // sum(wants) if sum(wants) else 0)
    return table


def _plain(text: str) -> None:
    """Print ``text`` as it is: no markup, no highlighting, long lines wrapped not cut."""
    console.print(text, markup=False, highlight=False, soft_wrap=True)


def _next_steps(text: str) -> None:
    """``next: text``, wrapped at 88 columns (plain text, for logs too)."""
    import textwrap

    _plain(textwrap.fill(f"next: {text}", width=88))


def _number(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.3f}"


def _print_study(metrics: dict, preset: str, out: Path) -> None:
    """The study's tables: every model's pooled metrics, then the paired comparisons."""
    from rich.table import Table

    cfg = metrics["config"]
    grid = Table(
        title=f"{cfg['folds']}-fold CV, {cfg['n_patients']} patients ({cfg['positives']} DM+),"
        f" preset {preset}, seed {cfg['seed']}"
    )
    for column in ("model", "AUC [95% CI]", "ACC", "SEN", "SPE", "Brier", "oracle AUC"):
        # overflow fold: a model's name ("swin3d/radiomics+clinical+deep") is never cut short
        grid.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for key, model in metrics["models"].items():
        pooled = model["pooled"]
        ci = pooled["auc_ci"]
        interval = "" if ci is None else f" [{ci[0]:.3f}, {ci[1]:.3f}]"
        grid.add_row(
            key,
            _number(pooled["auc"]) + interval,
            _number(pooled["acc"]),
            _number(pooled["sen"]),
            _number(pooled["spe"]),
            _number(pooled["brier"]),
            _number(pooled["oracle_auc"]),
        )
    console.print(grid)
    console.print(
        _paired_table(
            metrics,
            "versus_single_groups",
            "Fused models against their single groups (DeLong, paired)",
            ("fused model", "single group"),
        )
    )
    console.print(
        _paired_table(
            metrics,
            "versus_without_radiomics",
            "What the selected radiomics add: each model against itself without them (DeLong, "
            "paired)",
            ("model", "without radiomics"),
        )
    )
    backbones = _paired_table(
        metrics,
        "versus_other_backbones",
        "The first backbone against the others, same groups (DeLong, paired)",
        ("model", "against"),
    )
    if backbones.row_count:
        console.print(backbones)
    if metrics["oracle_auc"] is not None:
        console.print(
            f"oracle AUC (true risk): cohort {metrics['oracle_auc']:.3f},"
            f" patients used {_number(metrics['oracle_auc_used'])}"
        )
    _plain(
        f"{metrics['timing_s']['total']:.0f} s. Results: {out}/metrics.json,"
        f" oof_predictions.csv, roc.png, calibration.png, ablation.png"
    )


def _paired_table(metrics: dict, field: str, title: str, names: tuple[str, str]):
    """A table of every model's paired DeLong tests in ``field`` (model, other model, AUC
    difference with its 95% CI, p)."""
    from rich.table import Table

    table = Table(title=title)
    for column in (*names, "AUC difference [95% CI]", "p"):
        table.add_column(column, justify="right" if column == "p" else "left", overflow="fold")
    for key, model in metrics["models"].items():
        for other, test in model.get(field, {}).items():
            low, high = test["ci"]
            difference = f"{test['auc_difference']:+.3f} [{low:+.3f}, {high:+.3f}]"
            table.add_row(key, other, difference, f"{test['p']:.3f}")
    return table


def _print_repeats(summary: dict, preset: str, out: Path) -> None:
    """Repeated CV: each model's pooled AUC over the fold seeds, then each fused model's paired
    difference to its single groups over the same seeds."""
    from rich.table import Table

    seeds = summary["seeds"]
    grid = Table(
        title=f"{summary['folds']}-fold CV repeated {summary['repeats']} times (seeds"
        f" {seeds[0]}-{seeds[-1]}),"
        f" {summary['n_patients']} patients ({summary['positives']} DM+), preset {preset}"
    )
    for column in ("model", "AUC mean (SD)", "min - max", "per repeat"):
        grid.add_column(column, justify="left" if column == "model" else "right", overflow="fold")
    for key, model in summary["models"].items():
        grid.add_row(
            key,
            f"{model['auc_mean']:.3f} ({model['auc_sd']:.3f})",
            f"{model['auc_min']:.3f} - {model['auc_max']:.3f}",
            " ".join(f"{auc:.3f}" for auc in model["auc_per_repeat"]),
        )
    console.print(grid)
    versus = Table(title="Fused models against their single groups (DeLong, paired, per repeat)")
    for column in ("fused model", "single group"):
        versus.add_column(column, overflow="fold")
    for column in ("mean difference", "fused higher", "p per repeat"):
        versus.add_column(column, justify="right", overflow="fold")
    for key, model in summary["models"].items():
        for single, test in model.get("versus_single_groups", {}).items():
            versus.add_row(
                key,
                single,
                f"{test['difference_mean']:+.3f}",
                f"{test['repeats_above']}/{summary['repeats']}",
                " ".join(f"{p:.2f}" for p in test["p_per_repeat"]),
            )
    console.print(versus)
    if summary["oracle_auc_used"] is not None:
        console.print(
            f"oracle AUC (true risk) of the patients used: {summary['oracle_auc_used']:.3f}"
        )
    _plain(
        f"{summary['timing_s']['total']:.0f} s. Results: {out}/repeats.json; each repeat's"
        f" metrics.json, predictions and figures in {out}/repeat-<k>/"
    )


@site_app.command("predict")
def site_predict(
    config: Annotated[Path, typer.Option(help="This site's TOML file.")],
    model: Annotated[Path, typer.Option(help="The model bundle folder (a run's model/).")],
    out: Annotated[Path, typer.Option(help="Predictions CSV (written atomically).")],
    manifest: Annotated[
        Path | None,
        typer.Option(
            help="New patients (a manifest like the site's; labels may be empty or left out):"
            " checked and extracted first, only the radiomics features the bundle reads."
        ),
    ] = None,
) -> None:
    """Score this site's extracted patients (or the new patients of --manifest) with a federated
    model bundle, locally: each patient's DM risk, its class at the bundle's threshold, the input
    blocks that raised it and every model's risk."""

    from rich.text import Text

    from fedmets.client.predict import extract_new_patients, new_patients_site, predict_site
    from fedmets.client.site_files import REPORT_FILE
    from fedmets.client.site_worker import SiteNotReady

    cfg = _load_site_config_or_exit(config)
    _writable_file_or_exit(out, "--out")
    if manifest is not None and not manifest.is_file():
        problem = "a folder, not a file" if manifest.is_dir() else "not found"
        err_console.print(f"--manifest: {manifest}: {problem}", markup=False, soft_wrap=True)
        raise typer.Exit(1)
    site_output = cfg.paths.output
    try:
        if manifest is not None:
            new = new_patients_site(cfg, manifest)
            try:
                with _sigterm_as_ctrl_c(EXTRACTION_STOPPED), _patient_progress() as progress:
                    checking = progress.add_task(f"checking {manifest.name}", total=None)
                    extracting = progress.add_task(
                        f"extracting {manifest.name}", total=None, visible=False
                    )
                    extract_new_patients(
                        cfg,
                        model,
                        manifest,
                        lambda done, total: progress.update(
                            extracting, completed=done, total=total, visible=True
                        ),
                        lambda done, total: progress.update(checking, completed=done, total=total),
                    )
            finally:  # the patients it could not use, also when none was usable
                _say_extraction_problems(new.paths.output / REPORT_FILE)
            cfg = new
        table = predict_site(cfg, model, out, site_output=site_output)
    except (ValueError, SiteNotReady, OSError) as error:
        err_console.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
        raise typer.Exit(1) from error
    main = table["model"].iloc[0]
    _plain(
        f"{len(table)} patients scored by {main} (threshold {table['threshold'].iloc[0]:.3f}):"
        f" {int(table['dm_predicted'].sum())} predicted DM; {out}"
    )


def _say_extraction_problems(report_file: Path) -> None:
    """Print an extraction report's site problems, quarantined and failed patients (nothing
    when it was not written)."""
    import json

    if not report_file.is_file():
        return
    report = json.loads(report_file.read_text(encoding="utf-8"))
    for problem in report["site_problems"]:
        err_console.print(f"problem: {problem}", markup=False)
    for patient, problems in report["quarantined"].items():
        err_console.print(f"quarantined: {patient}: {'; '.join(problems)}", markup=False)
    for patient, failure in report["failed"].items():
        err_console.print(f"failed: {patient}: {failure['message']}", markup=False)


@site_app.command("serve")
def site_serve(
    config: Annotated[Path, typer.Option(help="This site's TOML file.")],
) -> None:
    """Serve this site to its SuperNode: the one process that reads the site's data, answering
    the federation's requests through the site's policy on the local socket of [service]
    socket (until Ctrl-C or SIGTERM; docs/hospital_guide.md)."""
    from fedmets.client.site_service import serve

    cfg = _load_site_config_or_exit(config)
    try:
        serve(cfg.source or config, say=lambda line: _plain(_stamped(line)))
    except (RuntimeError, OSError, KeyError) as error:
        err_console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error


@site_app.command("keys")
def site_keys(
    site: Annotated[str, typer.Option(help="This site's id (as in its site.toml).")],
    out: Annotated[Path, typer.Option(help="Folder for the key pair (keep it private).")],
) -> None:
    """Make this hospital's key pair, here: OUT/SITE (private, mode 600: the SuperNode's
    --auth-supernode-private-key and the service's [service] identity_key) and OUT/SITE.pub,
    the only file sent to the coordinating centre."""
    from fedmets.shared.files import check_writable
    from fedmets.shared.identity import check_site_id, make_site_keys

    try:
        check_site_id(site)
        check_writable(out, "--out")  # a file there, or no right to write it: named, no errno
        private, public = make_site_keys(out, site)
    except (FileExistsError, ValueError) as error:  # a key made before; not a site id
        err_console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error
    except OSError as error:
        reason = str(error)
        if error.strerror:  # the system's words, without errno's "[Errno 13] ..."
            reason = f"--out: cannot write {error.filename or out}: {error.strerror}"
        err_console.print(
            f"error: {reason}; --out is a folder of yours for the key pair (made if missing)",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1) from error
    _plain(f"private key (stays here)     {private}")
    _plain(f"public key (send the centre) {public}")
    _next_steps(
        "set [service] identity_key to the private key in site.toml, start the SuperNode with "
        "--auth-supernode-private-key on it; the centre registers the .pub (flwr supernode "
        "register) and lists it under [federation.identities]."
    )


@site_app.command("approve")
def site_approve(
    config: Annotated[Path, typer.Option(help="This site's TOML file.")],
    run_config: Annotated[Path, typer.Option(help="The run's federation config (TOML).")],
    app: Annotated[
        Path | None,
        typer.Option(help="The app bundle (.fab) reviewed: only it may relay the run."),
    ] = None,
) -> None:
    """Approve a run: its name and its federation config's fingerprint, and with --app the
    app bundle, which the site service then answers (while [policy] require_approval holds;
    docs/hospital_guide.md). Checks the run against the site's [policy] first, and says what a
    run under DP would spend of the site's privacy budget."""
    from fedmets.client.approval import (
        approvals_path,
        approve_run,
        budget_outlook,
        policy_conflicts,
    )
    from fedmets.shared.app_digest import fab_contents, fab_digest

    cfg = _load_site_config_or_exit(config)
    run = _load_federation_config_or_exit(run_config)
    try:
        conflicts, outlook = policy_conflicts(cfg, run), budget_outlook(cfg, run)
    except ValueError as error:  # a ledger of another site or delta
        err_console.print(f"error: {error}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error
    if conflicts:
        for line in [
            f"not approved: this site's [policy] ({config}) would refuse run {run.run.name}'s "
            "requests:",
            *(f"  {conflict}" for conflict in conflicts),
            "ask the centre for a run within these bounds, or widen the [policy] key named "
            "(docs/configuration.md), then approve again",
        ]:
            err_console.print(line, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1)
    if app is not None and not app.is_file():
        problem = "a folder, not a file" if app.is_dir() else "not found"
        err_console.print(
            f"--app {app}: {problem}: give the app bundle (.fab file) the centre sent you",
            markup=False,
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    try:
        digest = fab_digest(app) if app is not None else ""
    except (OSError, ValueError) as error:
        reason = getattr(error, "strerror", None) or error  # not errno's "[Errno 13] ..."
        err_console.print(f"--app {app}: {reason}", markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error
    try:
        record = approve_run(cfg, run, digest)
    except (OSError, ValueError) as error:
        message = f"{approvals_path(cfg)}: {getattr(error, 'strerror', None) or error}"
        err_console.print(message, markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error
    _plain(f"approved run {run.run.name} (config sha256 {record['config_sha256']})")
    if outlook is not None and outlook.startswith("warning:"):
        err_console.print(outlook, markup=False, highlight=False, soft_wrap=True)
    elif outlook is not None:
        _plain(outlook)
    if digest:
        _plain(f"pinned app {app.name} (app sha256 {digest}): {fab_contents(app)}")
    _plain(f"recorded in {approvals_path(cfg)}")


def _stamped(line: str) -> str:
    """``line`` after the UTC time (a service's log)."""
    import time

    return f"{time.strftime('%Y-%m-%dT%H:%M:%SZ', time.gmtime())} {line}"


def _audit_log(config: Path) -> Path:
    """The audit log of the site of ``config``; exits 1 when there is none yet."""
    from fedmets.client.release import site_audit_path

    path = site_audit_path(_load_site_config_or_exit(config))
    if not path.is_file():
        err_console.print(f"no audit log yet: {path}", markup=False, soft_wrap=True)
        raise typer.Exit(1)
    return path


@audit_app.command("verify")
def audit_verify(config: Annotated[Path, typer.Option(help="This site's TOML file.")]) -> None:
    """Check that no line of the audit log was edited, deleted, inserted or moved: each line
    holds the hash of the one before it. Exits 1 at the first broken line, naming it."""
    from fedmets.client.audit import verify

    path = _audit_log(config)
    check = verify(path)
    if check.broken is not None:
        err_console.print(
            f"{path}: line {check.broken} of {check.lines}: {check.reason}",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    _plain(f"{path}: {check.lines} lines, chain intact; head (last line) sha256 {check.head}")


@audit_app.command("show")
def audit_show(config: Annotated[Path, typer.Option(help="This site's TOML file.")]) -> None:
    """What left this site, per run and route: requests, answered, withheld (only the count
    left), refused, and the bytes sent; under each run, the app bundles (app sha256) that
    relayed its requests, to compare with the run's results (federated.json app_sha256)."""
    from itertools import groupby

    from rich import box
    from rich.table import Table

    from fedmets.client.audit import summarise

    path = _audit_log(config)
    try:
        summary = summarise(path)
    except ValueError as error:
        err_console.print(str(error), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error
    _plain(f"audit log: {path}")
    columns = ("route", "requests", "answered", "withheld", "refused", "bytes")
    # a table per run, light borders: a run's name and a route ("query.bundle_evaluation")
    # fit 80 columns (a log, CI) whole, not split mid-word
    for run, group in groupby(summary, key=lambda row: row["run"]):
        rows = list(group)
        table = Table(title=f"run {run}", box=box.SIMPLE_HEAD, show_edge=False, pad_edge=False)
        for column in columns:
            justify = "left" if column == "route" else "right"
            table.add_column(column, justify=justify, overflow="fold")
        for row in rows:
            table.add_row(*(str(row[c]) for c in columns))
        console.print(_fit_columns(table))
        for digest in sorted({app for row in rows for app in row["apps"]}):
            _plain(f"  app sha256 {digest}")  # 77 characters: whole at 80 columns


@site_app.command("recalibrate")
def site_recalibrate(
    config: Annotated[Path, typer.Option(help="This site's TOML file.")],
    model: Annotated[Path, typer.Option(help="The model bundle folder.")],
) -> None:
    """Fit the bundle's risk to this site's labelled patients (logistic recalibration: slope and
    intercept on the main model's log-odds), locally; `site predict` then applies it. At a site
    that trained the bundle, fitted on the run's out-of-fold risks it kept. Prints the
    calibration before and after (cross-validated)."""
    from rich.table import Table
    from rich.text import Text

    from fedmets.client.recalibration import RECALIBRATION_FILE, recalibrate
    from fedmets.client.site_worker import SiteNotReady

    cfg = _load_site_config_or_exit(config)
    try:
        fitted = recalibrate(cfg, model)
    except (ValueError, SiteNotReady, OSError) as error:
        err_console.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
        raise typer.Exit(1) from error
    table = Table(
        title=f"{_site_name(cfg)}: {fitted['model']}, {fitted['patients']} patients"
        f" ({fitted['events']} DM+), {fitted['fitted_on']} risks"
    )
    for column in ("risk", "calibration slope", "intercept", "Brier"):
        table.add_column(column, justify="left" if column == "risk" else "right")
    for label, key in (
        ("bundle", "before"),
        ("recalibrated (cross-validated)", "after_cross_validated"),
    ):
        row = fitted[key]
        table.add_row(
            label, _number(row["slope"]), _number(row["intercept"]), _number(row["brier"])
        )
    console.print(table)
    _plain(
        f"risk' = sigmoid({fitted['intercept']:.3f} + {fitted['slope']:.3f} x logit(risk)),"
        f" kept in {cfg.paths.output / RECALIBRATION_FILE}; `fedmets site predict` applies it"
    )


@site_app.command("explain")
def site_explain(
    config: Annotated[Path, typer.Option(help="This site's TOML file.")],
    run: Annotated[str, typer.Option(help="Name of the federated run (its [run] name).")],
    fold: Annotated[int, typer.Option(help="Cross-validation fold whose model to explain.")] = 0,
    patients: Annotated[
        int, typer.Option(min=1, help="Held-out patients of that fold to map.")
    ] = 3,
) -> None:
    """Occlusion maps of the fold's federated image model over this site's held-out patients,
    written as PNG slices with the tumour contour under <paths.output>/explain/ (never sent)."""
    from fedmets.client.explain import explain_site

    cfg = _load_site_config_or_exit(config)
    try:
        paths = explain_site(cfg, run, fold, patients)
    except FileNotFoundError as error:
        err_console.print(str(error), markup=False, highlight=False, soft_wrap=True)
        raise typer.Exit(1) from error
    for path in paths:
        console.print(str(path), markup=False, highlight=False, soft_wrap=True)


# ---- simulate ---------------------------------------------------------------------------------


@app.command()
def simulate(
    cohort: Annotated[Path, typer.Option(help="Cohort folder with one SITE/site.toml per site.")],
    out: Annotated[Path, typer.Option(help="Run folder (created).")],
    preset: Annotated[str, typer.Option(help="tiny | quickstart | demo | paper | gpu")] = "demo",
    config: Annotated[
        Path | None, typer.Option(help="A federation TOML instead of the preset.")
    ] = None,
    seed: Annotated[
        int | None,
        typer.Option(
            help="Seed of the training ([run] seed; default: the config's, 7 with a preset)."
        ),
    ] = None,
    workers: Annotated[int | None, typer.Option(help="Extraction processes.")] = None,
    baselines: Annotated[
        bool, typer.Option(help="Also run the centralised and local-only baselines.")
    ] = True,
    gpus_per_site: Annotated[
        float | None,
        typer.Option(
            min=0,
            max=8,
            help="Share of a GPU per simulated site (0.5: two sites per GPU); default: the"
            " federation config's [simulation] gpus_per_site (0: CPU only).",
        ),
    ] = None,
    holdout: Annotated[
        str | None,
        typer.Option(
            help="Comma-separated sites to hold out: also train without them and validate the"
            " final model at each (metrics.json holdout)."
        ),
    ] = None,
    loso: Annotated[
        bool, typer.Option(help="Leave each site out in turn (metrics.json loso).")
    ] = False,
    overwrite: Annotated[
        bool, typer.Option(help="Replace the run already in --out (its model and results).")
    ] = False,
) -> None:
    """Run the federated protocol on every site of COHORT in Flower's simulation engine, then the
    centralised and local-only baselines; write RUN/metrics.json and RUN/summary.txt."""
    from rich.text import Text

    from fedmets.shared.config import ConfigError
    from fedmets.simulation.simulate import simulate as run_simulation

    try:
        with _sigterm_as_ctrl_c(SIMULATION_STOPPED):
            metrics = run_simulation(
                cohort,
                out,
                preset,
                config,
                seed,
                workers,
                baselines,
                log=lambda m: console.print(m, markup=False, highlight=False, soft_wrap=True),
                gpus_per_site=gpus_per_site,
                holdout=[s.strip() for s in (holdout or "").split(",") if s.strip()],
                loso=loso,
                overwrite=overwrite,
            )
    except (ValueError, RuntimeError, ConfigError, OSError) as error:  # the run's own words
        err_console.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
        raise typer.Exit(1) from error
    from fedmets.simulation.simulate import summary_text

    console.print(summary_text(metrics), markup=False, highlight=False)
    console.print(f"metrics: {out / 'metrics.json'}")
    from fedmets.server.report import write_report

    console.print(f"report: {write_report(out)}", markup=False, highlight=False)


# ---- certs ------------------------------------------------------------------------------------


@app.command()
def certs(
    out: Annotated[Path, typer.Option(help="Folder for the CA and the server certificate.")],
    site: Annotated[
        list[str] | None,
        typer.Option("--site", help="Also a site key pair (a rehearsal on one machine)."),
    ] = None,
    host: Annotated[
        list[str] | None,
        typer.Option("--host", help="SuperLink host name or IP (repeatable; subjectAltName)."),
    ] = None,
    days: Annotated[int, typer.Option(help="Validity of the server certificate.")] = 365,
    ca_days: Annotated[int, typer.Option(help="Validity of the CA.")] = 3650,
    renew_server: Annotated[
        Path | None,
        typer.Option(
            "--renew-server",
            metavar="CA_KEY",
            help="Only a new server certificate from OUT/ca.crt and this CA key.",
        ),
    ] = None,
) -> None:
    """Create a pilot's CA and the SuperLink's TLS certificate, or renew the server
    certificate from the same CA (docs/deployment.md; hospitals with a PKI use theirs)."""
    from fedmets.server.certs import make_certificates, renew_server_certificate

    hosts = host or ["localhost", "127.0.0.1"]
    if renew_server is not None:
        try:
            paths = renew_server_certificate(out, renew_server, hosts, days)
        except (OSError, ValueError) as error:
            err_console.print(f"error: {error}", markup=False, soft_wrap=True)
            raise typer.Exit(1) from error
    else:
        try:
            paths = make_certificates(out, hosts, site or [], days, ca_days)
        except (OSError, ValueError) as error:
            reason = str(error)
            if isinstance(error, OSError) and error.strerror:  # not errno's "[Errno 13] ..."
                reason = f"--out: cannot write {error.filename or out}: {error.strerror}"
            err_console.print(f"error: {reason}", markup=False, highlight=False, soft_wrap=True)
            raise typer.Exit(1) from error
    for role, path in paths.items():
        _plain(f"{role:24s} {path}")
    _next_steps(
        "server.pem and server.key to the SuperLink host (--ssl-certfile, --ssl-keyfile), "
        "ca.crt to every hospital (--root-certificates); keep ca.key off the SuperLink host: it "
        "is needed only to renew (--renew-server CA_KEY)."
        if renew_server is None
        else "restart the SuperLink with the new server.pem and server.key; the SuperNodes "
        "reconnect through the same CA, nothing to re-register."
    )


@app.command("app-folder")
def app_folder(
    out: Annotated[Path, typer.Argument(help="The folder to write (new, or empty).")],
    overwrite: Annotated[
        bool, typer.Option(help="Replace OUT when it holds an app folder written before.")
    ] = False,
) -> None:
    """Write the Flower app alone (pyproject.toml and the folders its fab-include names) to
    OUT, for `flwr build --app OUT` and `flwr run OUT`: its bundle is this checkout's, but
    Flower no longer reads the checkout's .venv, cohorts and runs first (seconds per command)."""
    from fedmets.server.app_folder import write_app_folder

    problem = None
    if out.exists() and not out.is_dir():
        problem = "is a file"
    elif out.is_dir() and any(out.iterdir()):
        if not overwrite:
            problem = "is not empty (--overwrite replaces an app folder written before)"
        elif not (out / "pyproject.toml").is_file():
            problem = "is not empty and holds no app folder (no pyproject.toml): not replaced"
    if problem:
        err_console.print(f"error: {out} {problem}", markup=False, soft_wrap=True)
        raise typer.Exit(1)
    try:
        written = write_app_folder(out)
    except (OSError, ValueError) as error:
        err_console.print(f"error: {error}", markup=False, soft_wrap=True)
        raise typer.Exit(1) from error
    _plain(f"app folder: {written}")
    _next_steps(
        f"flwr build --app {written} (the bundle the hospitals approve), "
        f"flwr run {written} <connection> --stream --run-config '...'"
    )


@app.command("proxy-config")
def proxy_config(
    certs: Annotated[Path, typer.Option(help="The folder `fedmets certs` wrote.")],
    folder: Annotated[Path, typer.Option(help="nginx's folder for its pid, logs and temp files.")],
    listen: Annotated[str, typer.Option(help="Where the hospitals connect (host:port).")] = (
        "0.0.0.0:9091"
    ),
    superlink_port: Annotated[
        int,
        typer.Option(
            min=1, max=65535, help="The SuperLink's port on 127.0.0.1 (flower-superlink --port)."
        ),
    ] = 9093,
) -> None:
    """Print the nginx configuration of the centre's proxy: TLS on LISTEN, the Fleet API
    forwarded to the SuperLink on loopback, every other path refused (403), so that no
    hospital reaches the Control API (docs/deployment.md). Run it with nginx -c FILE."""
    import sys

    from fedmets.server.proxy import nginx_config

    host, _, port = listen.rpartition(":") if not listen.isdigit() else ("*", "", listen)
    if not host or not port.isdigit() or not 1 <= int(port) <= 65535:  # nginx would not start
        err_console.print(
            f"error: --listen {listen!r}: not HOST:PORT (or PORT) with a port from 1 to 65535"
            " (e.g. 0.0.0.0:9091)",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    certs = certs.resolve()
    missing = [n for n in ("server.pem", "server.key", "ca.crt") if not (certs / n).is_file()]
    if missing:  # nginx would start on none of them
        err_console.print(
            f"error: --certs {certs}: no {', '.join(missing)} (the folder `fedmets certs` wrote)",
            markup=False,
            soft_wrap=True,
        )
        raise typer.Exit(1)
    text = nginx_config(
        listen, superlink_port, certs / "server.pem", certs / "server.key", certs / "ca.crt", folder
    )
    sys.stdout.write(text)


# ---- report -----------------------------------------------------------------------------------


@app.command()
def report(
    run: Annotated[
        Path,
        typer.Argument(
            metavar="RUN", help="Simulation run folder (metrics.json) or server output folder."
        ),
    ],
) -> None:
    """Write RUN/report/report.html: one self-contained page (figures embedded, also written as
    PNG files beside it) with the results, ablations, training curves, site census, privacy,
    configuration and software versions of a run."""
    from rich.text import Text

    from fedmets.server.report import write_report

    try:
        path = write_report(run)
    except (OSError, ValueError) as error:
        err_console.print(Text.assemble(("error: ", "red"), str(error)), soft_wrap=True)
        raise typer.Exit(1) from error
    console.print(f"report: {path}", markup=False, highlight=False, soft_wrap=True)
