"""Site and federation configuration: pydantic models, TOML loaders and plain-English errors.

A site config (one TOML file per hospital) says where that hospital's data lives and how to run
locally; a federation config says which stages to run and how to aggregate them. Relative paths
in either file are resolved against the folder of the TOML file (``data.manifest`` against
``data.root``), so loaded configs hold absolute paths only.
"""

from __future__ import annotations

import grp
import hashlib
import json
import re
import tomllib
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import (
    AfterValidator,
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    ValidationError,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import ErrorDetails, PydanticCustomError

from fedmets.shared.clinical import CLINICAL_COLUMNS
from fedmets.shared.image_presets import Backbone

NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{1,31}$"
DEVICE_PATTERN = r"^(auto|cpu|cuda|cuda:[0-9]+)$"
PATTERN_MEANINGS = {
    NAME_PATTERN: "lowercase letters, digits, - and _",
    DEVICE_PATTERN: "'auto', 'cpu', 'cuda' or 'cuda:N'",
}

Modality = Literal["ct", "tumour_mask", "organ_mask", "clinical", "radiomics_table"]
ImagePreset = Literal["cpu-small", "paper", "gpu"]  # fedmets.shared.image_presets.IMAGE_PRESETS
IMAGE_MODALITIES = ("ct", "tumour_mask", "organ_mask")
# RTSTRUCT ROI names taken as the primary tumour (matched ignoring case).
DEFAULT_ROI_PATTERN = r"^(gtvp|gtv-?1|gtv_?primary|gtv)$"
# Tabular mode: feature-table columns taken as radiomics (matched ignoring case): PyRadiomics
# image-type prefixes, and fedmets' own tumour_*/ring_* columns.
DEFAULT_RADIOMICS_PATTERN = (
    r"^(original|wavelet|log|square|squareroot|logarithm|exponential|gradient|lbp)[-_]"
    r"|^(tumour|ring)_"
)


class ConfigError(Exception):
    """A config file that could not be read or validated; ``problems`` holds one line each."""

    def __init__(self, path: str | Path, problems: list[str]) -> None:
        self.path = Path(path)
        self.problems = problems
        super().__init__("\n".join(problems))


def _rule_error(message: str, key: str | None = None) -> PydanticCustomError:
    """A rule violation whose message is shown as is; ``key`` names the field of a model rule."""
    context = {"message": message} if key is None else {"message": message, "key": key}
    return PydanticCustomError("fedmets_rule", "{message}", context)


def _resolve_path(value: Path, info: ValidationInfo) -> Path:
    """Make ``value`` absolute against the TOML file's folder (the working directory if none)."""
    base_dir = (info.context or {}).get("base_dir", Path.cwd())
    return (Path(base_dir) / value.expanduser()).resolve()


# A path in a config file, made absolute on load.
ConfigPath = Annotated[Path, Field(strict=False), AfterValidator(_resolve_path)]


class _Section(BaseModel):
    """Base of every config model: unknown keys are errors and TOML types must match exactly."""

    model_config = ConfigDict(extra="forbid", strict=True, validate_default=True)


def _section(**kwargs: Any) -> Any:
    """A sub-table that may be left out: its defaults are validated (and paths resolved) too."""
    return Field(default_factory=dict, validate_default=True, **kwargs)


# ---- site config ------------------------------------------------------------------------------


class DataSection(_Section):
    """``[data]``: where the hospital's cohort lives and which inputs it has."""

    root: ConfigPath
    manifest: Annotated[Path, Field(strict=False)]
    mode: Literal["images", "tabular"] = "images"
    modalities: list[Modality] = ["ct", "tumour_mask", "organ_mask", "clinical"]
    id_column: str = Field("patient_id", min_length=1)
    label_column: str = Field("dm", min_length=1)
    rtstruct_roi_pattern: str = Field(DEFAULT_ROI_PATTERN, min_length=1)
    radiomics_pattern: str = Field(DEFAULT_RADIOMICS_PATTERN, min_length=1)
    # Tabular mode: clinical schema column -> column of the feature table.
    clinical_columns: dict[str, Annotated[str, Field(min_length=1)]] = {}

    @field_validator("rtstruct_roi_pattern", "radiomics_pattern")
    @classmethod
    def _compiles(cls, pattern: str) -> str:
        try:
            re.compile(pattern)
        except re.error as error:
            raise _rule_error(
                f"not a valid regular expression ({error}), got {pattern!r}"
            ) from None
        return pattern

    @field_validator("clinical_columns")
    @classmethod
    def _schema_names(cls, mapping: dict[str, str]) -> dict[str, str]:
        unknown = [name for name in mapping if name not in CLINICAL_COLUMNS]
        allowed = f"(allowed here: {', '.join(CLINICAL_COLUMNS)})"
        if len(unknown) == 1:
            raise _rule_error(f"unknown key {allowed}", unknown[0])
        if unknown:
            raise _rule_error(f"unknown keys {_quoted(unknown)} {allowed}")
        return mapping

    @field_validator("modalities")
    @classmethod
    def _no_duplicate_modalities(cls, modalities: list[str]) -> list[str]:
        repeated = sorted({m for m in modalities if modalities.count(m) > 1})
        if repeated:
            raise _rule_error(f"lists {_quoted(repeated)} more than once")
        return modalities

    @model_validator(mode="after")
    def _resolve_manifest_and_check_mode(self) -> DataSection:
        self.manifest = (self.root / self.manifest.expanduser()).resolve()
        if self.mode == "images":
            missing = [m for m in ("ct", "tumour_mask") if m not in self.modalities]
            if missing:
                raise _rule_error(f"mode 'images' needs {_quoted(missing)} here", "modalities")
        else:
            problems = []
            if "radiomics_table" not in self.modalities:
                problems.append("mode 'tabular' needs 'radiomics_table' here")
            images = [m for m in IMAGE_MODALITIES if m in self.modalities]
            if images:
                problems.append(f"mode 'tabular' must not list {_quoted(images)}")
            if problems:
                raise _rule_error("; ".join(problems), "modalities")
        return self


class ComputeSection(_Section):
    """``[compute]``: local hardware."""

    device: str = Field("auto", pattern=DEVICE_PATTERN)
    workers: int = Field(2, ge=1, le=256)
    # Longest one patient's extraction may take (seconds): the worker still on it is stopped,
    # and the patient, tried again alone, fails (a file that sends a reader into an endless
    # loop cannot hold up the site).
    patient_timeout_s: float = Field(1800.0, gt=0)
    # GPU memory an image training may use (GiB; default: what the device has free). Micro-
    # batches, gradient accumulation and activation checkpointing fit it (fedmets.client.memory).
    gpu_memory_gib: float | None = Field(None, ge=0.5)
    # How many requests of one batch (the folds a centre runs at once) the site answers at
    # once, each in a process of its own with 1/N of the cores and of the GPU memory budget
    # (fedmets.client.site_lanes); 1: one after another.
    parallel_folds: int = Field(1, ge=1, le=64)


class PathsSection(_Section):
    """``[paths]``: where the site writes its cache and outputs."""

    cache: ConfigPath = Path("cache")
    output: ConfigPath = Path("output")


class RadiomicsSection(_Section):
    """``[radiomics]``: feature extraction settings."""

    # "default" (~1500 features per region) and "fast" (~300) name the parameter files shipped
    # in client/resources; anything else is the path of a PyRadiomics parameter file.
    params: Literal["default", "fast"] | Path = "default"
    peritumoral_margin_mm: float = Field(5.0, gt=0, le=30)

    @field_validator("params", mode="before")
    @classmethod
    def _resolve_params(cls, value: object, info: ValidationInfo) -> object:
        if value in ("default", "fast") or isinstance(value, Path):
            return value
        if not isinstance(value, str) or not value:
            raise _rule_error(
                f"must be 'default', 'fast' or the path of a parameter file, got {_show(value)}"
            )
        return _resolve_path(Path(value), info)


class PreprocessSection(_Section):
    """``[preprocess]``: the grid images are resampled to, the HU window, the crops around the
    tumour and the HU thresholds that define the peritumoral ring (HU and mm throughout)."""

    spacing_mm: list[Annotated[float, Field(gt=0, le=10)]] = [1.0, 1.0, 1.0]  # x, y, z
    ct_interpolator: Literal["bspline", "linear"] = "bspline"
    hu_window: list[Annotated[float, Field(ge=-2000, le=5000)]] = [-1000.0, 1000.0]
    crop_margin_mm: float = Field(10.0, ge=0, le=100)
    crop_voxels: list[Annotated[int, Field(ge=8, le=512)]] = [64, 64, 64]  # x, y, z
    body_threshold_hu: float = Field(-500.0, ge=-1000, le=0)
    air_threshold_hu: float = Field(-200.0, ge=-1000, le=0)
    bone_threshold_hu: float = Field(300.0, ge=0, le=3000)

    @field_validator("spacing_mm", "hu_window", "crop_voxels", mode="before")
    @classmethod
    def _list_length(cls, value: object, info: ValidationInfo) -> object:
        count, what = {
            "spacing_mm": (3, "3 numbers (x, y, z) in mm"),
            "hu_window": (2, "2 numbers (lowest, highest) in HU"),
            "crop_voxels": (3, "3 integers (x, y, z)"),
        }[info.field_name]
        if not isinstance(value, list) or len(value) != count:
            raise _rule_error(f"must be a list of {what}, got {_show(value)}")
        return value

    @model_validator(mode="after")
    def _ordered(self) -> PreprocessSection:
        low, high = self.hu_window
        if low >= high:
            raise _rule_error(f"lowest must be < highest, got {_show(self.hu_window)}", "hu_window")
        return self


class PolicySection(_Section):
    """``[policy]``: what this site lets leave it, whatever the coordinating centre asks
    (``fedmets.client.policy`` enforces it; docs/privacy.md). The defaults protect a site
    that sets nothing."""

    # Fewest patients behind anything released, and fewest by which two released patient
    # sets may differ (the differencing guard); the centre may only ask for more.
    min_patients: int = Field(5, ge=2)
    # Train, score and explain only in differentially private runs, and validate nothing (a DP
    # run keeps each network's last round); needs an epsilon_budget (the centre picks each
    # run's epsilon, and so its noise).
    require_dp: bool = False
    epsilon_budget: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    # With require_dp: the replies of each model-output route (training scores, evaluation,
    # permutation importance, deep features, a held-out site's evaluation of the bundle) that
    # one run gets on one fold. A DP run asks each once (again where it was stopped in that
    # step and resumed); each reply of a crafted network's scores answers questions of the
    # centre's choosing, so this bounds how many a run the hospital approved can ask.
    max_scorings: int = Field(2, ge=1)
    # The site's own cross-validation: a request for another number of folds is refused.
    folds: int = Field(5, ge=2, le=10)
    validation_fraction: float = Field(0.2, gt=0, lt=0.5)
    # "secure": the fold seed (drawn once per cohort, kept on disk), DP-SGD's noise and
    # sampling and permutation importance's shuffles come from the operating system's CSPRNG;
    # "seeded": from ``seed`` (simulation and tests only: the centre may then know them; every
    # run records which).
    randomness: Literal["secure", "seeded"] = "secure"
    # Score histograms: at most this many bins, and every non-empty bin holds at least
    # min_bin_count patients (the patients sorted by score form groups of min_bin_count, each
    # counted in the bin of its mean score).
    max_bins: int = Field(1000, ge=2, le=10000)
    min_bin_count: int = Field(5, ge=1)
    # Training requests: batch, epochs per round, learning rate, fusion network size,
    # random-forest trees, permutation repeats.
    min_batch: int = Field(8, ge=1)
    max_epochs: int = Field(20, ge=1)
    min_lr: float = Field(1e-6, gt=0)
    max_lr: float = Field(0.1, gt=0)
    max_width: int = Field(256, ge=1)
    max_layers: int = Field(4, ge=0)
    max_trees: int = Field(1000, ge=1)
    # Most trees one importance request fits: trees x (1 + resamples), the stability ranking's
    # forests on halves included (the default run's 200 x 21 = 4,200).
    max_forest_trees: int = Field(20000, ge=1)
    # Most networks one request carries (each trained or scored): an honest run's models (at
    # most 7) times fusion_members (at most 20), and the main model's candidates.
    max_networks: int = Field(256, ge=1)
    max_repeats: int = Field(10, ge=1)
    # Admit a training reply outside sample-level DP as the class sums a crafted network's
    # weights can carry: every class must hold min_patients in the fitting rows, the cohort and
    # each fold (as the correlation ranking's label products), else the weights are withheld.
    training_classes: bool = False
    # Requests of one run the site may fail to answer (an error, or a reply the wire rules
    # refuse) before it refuses the rest of that run: a failure that depends on the patients'
    # values answers a yes/no question about them.
    max_failures: int = Field(3, ge=1)
    # Answer a run only once the hospital approved it (``fedmets site approve``: its name and
    # its federation config's fingerprint). Unset: required under ``fedmets site serve`` (a
    # deployed site), not in ``fedmets simulate``.
    require_approval: bool | None = None

    @model_validator(mode="after")
    def _ordered(self) -> PolicySection:
        if self.min_lr > self.max_lr:
            raise _rule_error(f"must be <= max_lr ({self.max_lr}), got {self.min_lr}", "min_lr")
        if self.require_dp and self.epsilon_budget is None:
            raise _rule_error(
                "required when require_dp is true: each run's epsilon, and so its noise, is "
                "the centre's choice, and only the site's budget bounds what it spends",
                "epsilon_budget",
            )
        return self


class ServiceSection(_Section):
    """``[service]``: the site service (``fedmets site serve``) and the socket its SuperNode's
    ClientApp reaches it on."""

    # Unix domain socket (default: <paths.output>/site-service.sock).
    socket: ConfigPath | None = None
    # Group that may open the socket (mode 0660; e.g. the SuperNode user's); none: only the
    # service's own user (0600).
    socket_group: str | None = Field(None, min_length=1)
    # The site's private key (``fedmets site keys``; the SuperNode's authentication key):
    # the service signs each census challenge with it, so that the centre can check the site
    # id against the public key it registered. None: census replies unsigned (simulation).
    identity_key: ConfigPath | None = None


class SiteConfig(_Section):
    """One hospital's site config."""

    site_id: str = Field(pattern=NAME_PATTERN)
    display_name: str | None = None
    seed: int = Field(0, ge=0)
    data: DataSection
    compute: ComputeSection = _section()
    paths: PathsSection = _section()
    radiomics: RadiomicsSection = _section()
    preprocess: PreprocessSection = _section()
    policy: PolicySection = _section()
    service: ServiceSection = _section()

    _source: Path | None = PrivateAttr(None)

    @property
    def source(self) -> Path | None:
        """The TOML file this config was loaded from (``None`` if built in code)."""
        return self._source

    @property
    def service_socket(self) -> Path:
        """Where the site service listens (``[service] socket``)."""
        return self.service.socket or self.paths.output / "site-service.sock"


# ---- federation config ------------------------------------------------------------------------


class RunSection(_Section):
    """``[run]``: names the run and where the server writes its results."""

    name: str = Field(pattern=NAME_PATTERN)
    output_dir: ConfigPath = Path("runs")
    seed: int = Field(0, ge=0, le=2**63 - 1)  # sent in requests (int64 on the wire)


class FederationSection(_Section):
    """``[federation]``: how many sites must take part, how long a round may take, and what
    a site's model update may be."""

    min_sites: int = Field(2, ge=1)
    round_timeout_s: float = Field(600.0, gt=0)
    min_patients: int = Field(5, ge=1)
    # Largest L2 distance (over every parameter) of a site's trained model from the global one
    # it got; none: no bound (an update must still be finite and of the global model's shapes).
    max_update_norm: float | None = Field(None, gt=0)
    # Site id -> its SuperNode public key (the ``.pub`` line ``fedmets site keys`` wrote). When
    # set, a census reply counts only if signed with the key of the site id it claims
    # (``fedmets.shared.identity``); other nodes are refused.
    identities: dict[str, str] = {}
    # Site ids that take no part in training: after the final model each receives the bundle
    # and releases its evaluation of it (``query.bundle_evaluation``: results["holdout"]).
    held_out: list[str] = []
    # Cross-validation folds run at once (fedmets.server.fold_lanes): their requests reach each
    # site together, in batch messages, which the site answers up to its own [compute]
    # parallel_folds at once. Needs dp.mode "off" and no secure aggregation.
    parallel_folds: int = Field(1, ge=1, le=64)

    @field_validator("identities")
    @classmethod
    def _keys_parse(cls, identities: dict[str, str]) -> dict[str, str]:
        from fedmets.shared.identity import load_public_key

        for site, key in identities.items():
            if not re.match(NAME_PATTERN, site):
                raise _rule_error(f"{site!r} is not a site id ({PATTERN_MEANINGS[NAME_PATTERN]})")
            try:
                load_public_key(key)
            except ValueError as error:
                raise _rule_error(
                    f"not an OpenSSH ECDSA public key ({error}): give the line of the site's "
                    ".pub file (fedmets site keys), not its path",
                    key=site,
                ) from None
        return identities


class StagesSection(_Section):
    """``[stages]``: whether the image stage runs, and how many rounds and epochs. Census,
    folds, selection, fusion and evaluation always run."""

    # Train the image model and fuse its deep features (when every site has crops); false:
    # radiomics and clinical only.
    image: bool = True
    # After cross-validation, train the final model on every patient (each network for the
    # median of the rounds the folds chose) and write the model bundle (docs/model.md).
    final_model: bool = True
    image_rounds: int = Field(5, ge=1)
    fusion_rounds: int = Field(20, ge=1)
    local_epochs: int = Field(1, ge=1)
    fusion_local_epochs: int = Field(5, ge=1)


class StrategySection(_Section):
    """``[strategy]``: the server's aggregation strategy."""

    name: Literal["fedavg", "fedprox", "fedadam"] = "fedavg"
    proximal_mu: float = Field(0.0, ge=0)
    server_learning_rate: float = Field(0.01, gt=0)
    # SecAgg+ for the training rounds' weights (Flower runs only; see docs/privacy.md).
    secure_aggregation: bool = False

    @model_validator(mode="after")
    def _fedprox_needs_mu(self) -> StrategySection:
        if self.name == "fedprox" and self.proximal_mu <= 0:
            raise _rule_error(
                f"must be > 0 when strategy.name is 'fedprox', got {_show(self.proximal_mu)}",
                "proximal_mu",
            )
        return self


class CvSection(_Section):
    """``[cv]``: cross-validation folds (each site draws its own fold assignment: its
    ``[policy] folds`` must equal this)."""

    folds: int = Field(5, ge=2, le=10)


class SelectionSection(_Section):
    """``[selection]``: radiomics feature selection."""

    correlation_threshold: float = Field(0.9, gt=0, le=1)
    top_k: int = Field(36, ge=1)
    # How the filtered columns are ranked: "forest", random-forest importances (the study's
    # method; each site fits a forest); "correlation", |Pearson r| with the DM label from
    # pooled sums (exactly the pooled ranking; the choice under DP, see docs/privacy.md).
    # "stability": each site fits a forest on each of ``stability_resamples`` random halves of
    # its training rows; the columns ranked by how often they are in a forest's top_k
    # (averaged over the sites by training patients; ties by the mean forest importance).
    ranking: Literal["forest", "correlation", "stability"] = "forest"
    rf_trees: int = Field(200, ge=10)
    stability_resamples: int = Field(20, ge=2, le=200)


class HarmonisationSection(_Section):
    """``[harmonisation]``: scanner and protocol effects on the radiomics features, removed per
    fold on its training rows before selection (``fedmets.shared.harmonisation``)."""

    # "combat": federated ComBat, each site one batch (location and scale, empirical Bayes);
    # "none": the features as extracted.
    method: Literal["none", "combat"] = "none"
    # Clinical schema columns whose effect on the features is kept (never the label); left
    # out when the sites have no clinical data.
    covariates: list[str] = Field(["age", "sex", "t_stage"])

    @field_validator("covariates")
    @classmethod
    def _schema_columns(cls, value: list[str]) -> list[str]:
        unknown = sorted(set(value) - set(CLINICAL_COLUMNS))
        if unknown:
            raise _rule_error(
                f"{_quoted(unknown)}: not in the clinical schema ({', '.join(CLINICAL_COLUMNS)})"
            )
        return value


class ModelSection(_Section):
    """``[model]``: the image backbone and the fusion network, and how sites train them."""

    backbone: Backbone = "swin3d"
    image_preset: ImagePreset = "cpu-small"
    mask_channel: Literal["ring", "tumour", "none"] = "ring"
    image_lr: float = Field(1e-3, gt=0)
    image_batch: int = Field(8, ge=1)
    fusion_hidden: list[Annotated[int, Field(ge=1)]] = Field([32])  # [] = logistic regression
    fusion_dropout: float = Field(0.3, ge=0, lt=1)
    fusion_lr: float = Field(1e-3, gt=0)
    fusion_batch: int = Field(32, ge=1)
    fusion_weight_decay: float = Field(1e-3, ge=0)
    fusion_group_dropout: float = Field(0.3, ge=0, lt=1)
    deep_components: int = Field(8, ge=0)  # whitened PCA of the deep features; 0 = all, scaled
    # What picks each fusion network's round: the pooled weighted BCE of the inner-validation
    # rows ("loss": sums on the sites' score groups) or their pooled AUC ("auc": from the
    # sites' grouped validation-score histograms). docs/federated.md: why.
    fusion_monitor: Literal["auc", "loss"] = "loss"
    # Models of several feature groups: "joint", one network on the concatenated groups; "late",
    # the mean logit of the single-group models (fedmets.shared.model_names.FusionMode).
    fusion: Literal["joint", "late"] = "joint"
    # Networks per model, each from its own initial weights and early-stopped on its own; the
    # model's score is their mean probability (an ensemble; 1 = one network).
    fusion_members: int = Field(1, ge=1, le=20)
    # The main model's network, chosen per fold on the pooled inner-validation figure
    # (fusion_monitor; training rows only) among every combination of: how many of the
    # top-ranked selected radiomics columns it reads (0: none), and its hidden widths ([]: a
    # logistic model). Either list empty: the run's setting (selection.top_k, fusion_hidden);
    # both empty: no choice. The final model keeps the network chosen in most folds.
    main_radiomics: list[Annotated[int, Field(ge=0)]] = Field([])
    main_hidden: list[list[Annotated[int, Field(ge=1)]]] = Field([])


class EvaluationSection(_Section):
    """``[evaluation]``: how held-out folds are scored."""

    # Score-histogram bins on [0, 1] (a site's [policy] max_bins bounds it; 1000 by default).
    histogram_bins: int = Field(1000, ge=10, le=10000)


class DpSection(_Section):
    """``[dp]``: differential privacy (off unless ``mode`` says otherwise)."""

    mode: Literal["off", "sample", "client"] = "off"
    epsilon: float | None = Field(None, gt=0)
    delta: float = Field(1e-5, gt=0, lt=1)
    max_grad_norm: float = Field(1.0, gt=0)
    # Train the ablation networks too: each is one more release of the same patients, so
    # with it the budget is split over every network (see docs/privacy.md).
    ablation: bool = False
    # What epsilon bounds: "run", every fold's training composed (what the sites spend on
    # the cross-validation); "fold", each fold's training alone (what a model trained once on
    # all the data would cost; the ledgers still compose every fold). See docs/privacy.md.
    epsilon_scope: Literal["run", "fold"] = "run"

    @model_validator(mode="after")
    def _epsilon_when_on(self) -> DpSection:
        if self.mode != "off" and self.epsilon is None:
            raise _rule_error(f"required when dp.mode is '{self.mode}'", "epsilon")
        return self


class SimulationSection(_Section):
    """``[simulation]``: what each simulated site gets on a researcher's one machine (``fedmets
    simulate`` only; a deployed site uses its own hardware)."""

    # Share of one GPU per simulated SuperNode (Flower's client-resources-num-gpus: 0.5 puts
    # two sites on a GPU at once); 0: the sites see no GPU and train on the CPU.
    gpus_per_site: float = Field(0.0, ge=0, le=8)


class FederationConfig(_Section):
    """A federated run: stages, strategy, cross-validation, selection and privacy settings."""

    run: RunSection
    federation: FederationSection = _section()
    stages: StagesSection = _section()
    strategy: StrategySection = _section()
    cv: CvSection = _section()
    selection: SelectionSection = _section()
    harmonisation: HarmonisationSection = _section()
    model: ModelSection = _section()
    evaluation: EvaluationSection = _section()
    dp: DpSection = _section()
    simulation: SimulationSection = _section()

    _source: Path | None = PrivateAttr(None)

    @model_validator(mode="after")
    def _held_out_needs_a_final_model(self) -> FederationConfig:
        if self.federation.held_out and (not self.stages.final_model or self.dp.mode != "off"):
            raise _rule_error(
                "held-out sites evaluate the final model: it needs stages.final_model = true "
                "and dp.mode 'off' (no final model is trained under DP)",
                "federation.held_out",
            )
        return self

    @model_validator(mode="after")
    def _main_candidates_fit(self) -> FederationConfig:
        model = self.model
        if not (model.main_radiomics or model.main_hidden):
            return self
        if self.dp.mode != "off" or model.fusion != "joint" or model.fusion_members != 1:
            raise _rule_error(
                "a choice of the main model's network needs dp.mode 'off' (under DP nothing is "
                "chosen on validation), model.fusion 'joint' and model.fusion_members 1",
                "model.main_radiomics",
            )
        if any(k > self.selection.top_k for k in model.main_radiomics):
            raise _rule_error(
                f"at most selection.top_k ({self.selection.top_k}) radiomics columns, got "
                f"{model.main_radiomics}",
                "model.main_radiomics",
            )
        return self

    @model_validator(mode="after")
    def _parallel_folds_fit(self) -> FederationConfig:
        if self.federation.parallel_folds > 1 and (
            self.dp.mode != "off" or self.strategy.secure_aggregation
        ):
            raise _rule_error(
                "folds at once need dp.mode 'off' (each fold would spend the budget on its own "
                "ledger) and strategy.secure_aggregation false (a batch cannot go through "
                "SecAgg+)",
                "federation.parallel_folds",
            )
        return self

    @model_validator(mode="after")
    def _secure_aggregation_fits(self) -> FederationConfig:
        if not self.strategy.secure_aggregation:
            return self
        if self.dp.mode == "client":
            raise _rule_error(
                "cannot be true with dp.mode 'client': client-level DP clips each site's "
                "update at the server, which secure aggregation hides (use dp.mode 'sample', "
                "DP-SGD at the sites, or turn one of them off)",
                "strategy.secure_aggregation",
            )
        if self.federation.min_sites < 2:
            raise _rule_error(
                "needs federation.min_sites >= 2: a secure sum over one site is that site's "
                f"update (got min_sites {self.federation.min_sites})",
                "strategy.secure_aggregation",
            )
        return self

    @property
    def source(self) -> Path | None:
        """The TOML file this config was loaded from (``None`` if built in code)."""
        return self._source

    def fingerprint(self) -> str:
        """SHA-256 (hex) of the settings, the same wherever the file is loaded (the output
        folder, resolved on the machine that reads it, left out): what a site approves and a
        model bundle records."""
        settings = self.model_dump(mode="json", exclude={"run": {"output_dir"}})
        return hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()


# ---- loading ----------------------------------------------------------------------------------

ConfigModel = TypeVar("ConfigModel", SiteConfig, FederationConfig)


def load_site_config(path: str | Path) -> SiteConfig:
    """Read and validate a site config; raise ConfigError listing every problem."""
    return _load(SiteConfig, path, _read_toml(path))


def load_federation_config(path: str | Path) -> FederationConfig:
    """Read and validate a federation config; raise ConfigError listing every problem."""
    return _load(FederationConfig, path, _read_toml(path))


def check_paths(cfg: SiteConfig, source: str | Path) -> list[str]:
    """Problems for the site's paths that must already exist; ``source`` prefixes each line."""
    problems = []
    if not cfg.data.root.is_dir():
        found = "not a folder" if cfg.data.root.exists() else "folder not found"
        problems.append(f"{source}: data.root: {found}: {cfg.data.root}")
    files = {"data.manifest": (cfg.data.manifest, "the manifest CSV")}
    if isinstance(cfg.radiomics.params, Path):
        files["radiomics.params"] = (cfg.radiomics.params, "the PyRadiomics parameter file")
    for key, (path, what) in files.items():
        if path.is_dir():
            problems.append(f"{source}: {key}: a folder, not a file (give {what}): {path}")
        elif not path.is_file():
            problems.append(f"{source}: {key}: file not found: {path}")
    return problems


# check_config_file's ``check_paths`` flag hides the function above inside it.
_check_site_paths = check_paths


def check_config_file(path: str | Path, check_paths: bool = True) -> tuple[str, list[str]]:
    """Tell whether ``path`` is a "site" or "federation" config and list its problems.

    The kind is "unknown" when the file cannot be read or has neither ``site_id`` nor ``[run]``.
    With ``check_paths`` a valid site config's data paths must also exist, and its ``[service]
    identity_key`` file when set (``fedmets site serve`` refuses to start without it), and
    its ``socket_group``.
    """
    try:
        data = _read_toml(path)
    except ConfigError as error:
        return "unknown", error.problems
    if "site_id" in data:
        kind, model = "site", SiteConfig
    elif isinstance(data.get("run"), dict):
        kind, model = "federation", FederationConfig
    else:
        return "unknown", [
            f"{path}: cannot tell whether this is a site config (needs site_id)"
            " or a federation config (needs [run])"
        ]
    try:
        cfg = _load(model, path, data)
    except ConfigError as error:
        return kind, error.problems
    if kind == "site" and check_paths:
        problems = _check_site_paths(cfg, path)
        key = cfg.service.identity_key  # the site service's, so not in check_paths
        if key is not None and not key.is_file():
            found = "a folder, not a file" if key.is_dir() else "file not found"
            problems.append(
                f"{path}: service.identity_key: {found}: {key} (make it with `fedmets site "
                f"keys --site {cfg.site_id} --out FOLDER`)"
            )
        group = cfg.service.socket_group
        if group is not None and group not in {g.gr_name for g in grp.getgrall()}:
            problems.append(f"{path}: service.socket_group: no group {group!r} on this machine")
        return kind, problems
    return kind, []


def _read_toml(path: str | Path) -> dict[str, Any]:
    """Parse a TOML file, turning every way it can fail into a ConfigError."""
    try:
        text = Path(path).read_bytes().decode("utf-8-sig")  # a BOM (Windows Notepad) is fine
    except FileNotFoundError:
        raise ConfigError(path, [f"{path}: file not found"]) from None
    except IsADirectoryError:
        raise ConfigError(path, [f"{path}: is a folder, not a file"]) from None
    except UnicodeDecodeError:
        raise ConfigError(path, [f"{path}: not UTF-8 text"]) from None
    except OSError as error:
        raise ConfigError(path, [f"{path}: cannot read ({error.strerror})"]) from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ConfigError(path, [f"{path}: {_toml_error(str(error), text)}"]) from None


def _toml_error(message: str, text: str) -> str:
    """Rephrase tomllib's message as "line L, column C: invalid TOML (...)"."""
    where = re.search(r" \(at line (\d+), column (\d+)\)$", message)
    if where:
        line, column = where.groups()
        message = message[: where.start()]
    else:  # "(at end of document)"
        message = message.removesuffix(" (at end of document)")
        lines = text.splitlines() or [""]
        line, column = str(len(lines)), str(len(lines[-1]) + 1)
    return f"line {line}, column {column}: invalid TOML ({message})"


def _load(model: type[ConfigModel], path: str | Path, data: dict[str, Any]) -> ConfigModel:
    """Validate parsed TOML against ``model``, resolving paths against the file's folder. The
    other kind of config (a site's given for a run's, or the reverse) is one problem, not a
    list of unknown keys."""
    source = Path(path).resolve()
    wanted, other = ("site", "federation") if model is SiteConfig else ("federation", "site")
    marker = {"site": "site_id", "federation": "run"}  # the key each kind must have
    if marker[other] in data and marker[wanted] not in data:
        found = "site_id" if other == "site" else "[run]"
        raise ConfigError(path, [f"{path}: a {other} config (it has {found}), not a {wanted} one"])
    try:
        cfg = model.model_validate(data, context={"base_dir": source.parent})
    except ValidationError as error:
        problems = [f"{path}: {_problem(model, detail)}" for detail in error.errors()]
        raise ConfigError(path, problems) from None
    cfg._source = source
    return cfg


# ---- error messages ---------------------------------------------------------------------------

_TYPE_NAMES = {
    "int_type": "an integer",
    "float_type": "a number",
    "string_type": "a string",
    "bool_type": "true or false",
    "list_type": "a list",
    "model_type": "a table",
    "dict_type": "a table",
    "path_type": "a path (a string)",
}


def _problem(model: type[BaseModel], detail: ErrorDetails) -> str:
    """One pydantic error as "<dotted.key>: <what is wrong>"."""
    loc, kind, ctx, value = detail["loc"], detail["type"], detail.get("ctx", {}), detail["input"]
    got = f"got {_show(value)}"
    if kind == "fedmets_rule":
        loc = (*loc, ctx["key"]) if "key" in ctx else loc
        message = ctx["message"]
    elif kind in _TYPE_NAMES:
        message = f"must be {_TYPE_NAMES[kind]}, {got}"
    elif kind == "missing":
        message = "required key is missing"
    elif kind == "extra_forbidden":
        allowed = ", ".join(_model_at(model, loc[:-1]).model_fields)
        message = f"unknown key (allowed here: {allowed})"
    elif kind in ("literal_error", "enum"):
        message = f"must be one of {ctx['expected'].replace(' or ', ', ')}, {got}"
    elif kind == "string_pattern_mismatch":
        pattern = ctx["pattern"]
        meaning = f" ({PATTERN_MEANINGS[pattern]})" if pattern in PATTERN_MEANINGS else ""
        message = f"must match {pattern}{meaning}, {got}"
    elif kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        symbol, bound = {
            "greater_than": (">", "gt"),
            "greater_than_equal": (">=", "ge"),
            "less_than": ("<", "lt"),
            "less_than_equal": ("<=", "le"),
        }[kind]
        message = f"must be {symbol} {_show(ctx[bound])}, {got}"
    elif kind in ("too_short", "string_too_short") and ctx.get("min_length") == 1:
        message = "must not be empty"
    else:
        message = f"{detail['msg']}, {got}"
    return f"{_dotted(loc)}: {message}"


def _dotted(loc: tuple[int | str, ...]) -> str:
    """('data', 'modalities', 2) -> 'data.modalities[2]'."""
    key = ""
    for part in loc:
        key += f"[{part}]" if isinstance(part, int) else f".{part}" if key else str(part)
    return key or "(top level)"


def _model_at(model: type[BaseModel], loc: tuple[int | str, ...]) -> type[BaseModel]:
    """The section model found by following the table names in ``loc`` from ``model``."""
    for part in loc:
        model = model.model_fields[str(part)].annotation
    return model


def _show(value: object) -> str:
    """A value as the user would have written it in TOML."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float) and value.is_integer() and abs(value) < 1e15:
        return str(int(value))
    if isinstance(value, dict):
        return "a table"
    return repr(value)


def _quoted(names: list[str]) -> str:
    """['a', 'b', 'c'] -> "'a', 'b' and 'c'"."""
    quoted = [f"'{name}'" for name in names]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " and " + quoted[-1]
