"""A site's side of the federated protocol: one handler per route of ``fedmets.shared.wire``,
working on the site's own extracted features, crops and disk.

:class:`SiteWorker` answers a request payload with a reply payload (plain dicts, see
``fedmets.shared.wire``); ``fedmets.client.site_service`` serves it to Flower, and the simulation
calls it in process for the centralised and local-only baselines. A worker may also stand for
several sites pooled (the centralised baseline): each patient keeps its own site's fold.

Everything a site keeps between messages lives on its disk under
``<paths.cache>/federated/<run>/`` (a site's process may restart between messages): the fold
assignment, the deep features of each fold, the held-out scores of each fold, the model-input
cache. Nothing in a reply has a per-patient axis: sums over training rows, model weights,
histograms and counts only. What may leave is the site's ``[policy]``
(``fedmets.client.policy``): the folds are the site's own, histograms hold groups of
``min_bin_count`` patients (each at its mean score), small subsite groups are suppressed with a
complement, and a reply on fewer patients than ``min_patients`` (the larger of the site's and
the server's), or on a patient set that differs from an earlier one by fewer, is withheld
(:class:`Withheld`: its count alone is sent).

A deployed site answers through its long-lived site service (``fedmets.client.site_service``),
which loads this module once; the image routes import MONAI (``fedmets.client.crops``,
``fedmets.shared.image_models``) when they run, and DP-SGD imports Opacus
(``fedmets.client.privacy``) only when a request asks for it, so a tabular site never loads them.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import re
import zlib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import pandas as pd
import torch
from sklearn.ensemble import RandomForestClassifier
from sklearn.model_selection import StratifiedShuffleSplit

from fedmets.client.harmonise import keep_with_bundle, save_adjustments
from fedmets.client.policy import (
    TRAINING_ROUTES,
    DifferencingGuard,
    ScoreGroups,
    fold_seed,
    forest_standardisation,
    missing_fill,
    private_seed,
    release_families,
    score_groups,
    suppressed_groups,
)
from fedmets.client.privacy import (
    LEDGER_DIR,
    ledger_reply,
    plan_site_noise,
    record_release,
    site_ledger,
    train_private,
)
from fedmets.client.scoring import image_config, load_networks, standardised_groups
from fedmets.client.site_files import (
    FEATURES_FILE,
    REPORT_FILE,
    STATE_DIR,
    crop_path,
    save_fold_model,
)
from fedmets.client.training import (
    extract_deep_features,
    get_state,
    predict_proba,
    resolve_device,
    set_state,
    train_fusion,
    train_image_model,
)
from fedmets.shared import wire
from fedmets.shared.bundle import BUNDLE_FORMAT, bundle_digest, save_bundle
from fedmets.shared.clinical import decode_subsite, encoded_columns
from fedmets.shared.config import SiteConfig
from fedmets.shared.files import exclusive, write_array, write_arrays
from fedmets.shared.harmonisation import (
    BatchAdjustment,
    covariate_columns,
    covariate_design,
    design_statistics,
    impute,
    residual_sumsq,
)
from fedmets.shared.identity import load_private_key, sign
from fedmets.shared.model_names import base_model
from fedmets.shared.models import FusionNet, combine_scores, input_blocks
from fedmets.shared.privacy import PrivacyLedger, sample_rate_for, steps_per_epoch

if TYPE_CHECKING:
    from fedmets.shared.image_models import ImageClassifier

FINAL_ADJUSTMENTS = "combat-final.npz"
"""The final model's ComBat corrections in the run's state (``fedmets.client.harmonise``)."""
IMAGE_MODEL = "image"
"""Name of the image model's weights (``weights:image``)."""


class Withheld(Exception):
    """A well-formed request whose answer the site's policy does not release: ``reply`` is
    what is sent instead (the count alone), ``rule`` and ``reason`` go to the audit log."""

    def __init__(self, rule: str, reason: str, reply: dict) -> None:
        super().__init__(f"{rule}: {reason}")
        self.rule, self.reason, self.reply = rule, reason, reply


NOT_ABOUT_PATIENTS = frozenset({"query.ledger", "query.model_bundle"})
"""Routes whose replies say nothing about patients (the ledger's own epsilon; the hash of a
stored model bundle): not listed in the privacy ledger."""


class SiteNotReady(RuntimeError):
    """The site cannot take part yet (features not extracted, no labelled patient). Its
    message is what the centre hears of a request refused for it; ``detail`` (a patient's file,
    say) stays at the site: in :meth:`local`, for the site's own logs and errors."""

    def __init__(self, message: str, detail: str = "") -> None:
        super().__init__(message)
        self.detail = detail

    def local(self) -> str:
        """The message with its site-only ``detail``."""
        return f"{self}: {self.detail}" if self.detail else str(self)


@dataclass
class SiteData:
    """A site's usable patients (n,): ``ids``, ``labels`` 0/1, ``site`` (the site id per row),
    ``subsite``; ``radiomics`` (n, p) raw float (NaN where PyRadiomics gave none);
    ``clinical`` (n, q) encoded or None; ``crops`` crop.npz paths or None (tabular);
    ``quarantined``/``unlabelled`` counts; ``settings`` the extraction fingerprint."""

    ids: np.ndarray
    labels: np.ndarray
    site: np.ndarray
    subsite: np.ndarray
    radiomics: pd.DataFrame
    clinical: pd.DataFrame | None
    crops: list[Path] | None
    quarantined: int
    unlabelled: int
    settings: dict


def load_site_data(configs: Sequence[SiteConfig], unlabelled: bool = False) -> SiteData:
    """Features, labels and crops of the labelled patients of ``configs`` (one site, or
    several pooled in order); ``unlabelled``: every extracted patient, label -1 where none
    (for scoring new patients). SiteNotReady names what is missing."""
    parts = [_one_site(cfg, unlabelled) for cfg in configs]
    columns = [list(p["table"].columns) for p in parts]
    if any(c != columns[0] for c in columns):
        raise SiteNotReady("the pooled sites' feature columns differ")
    table = pd.concat([p["table"] for p in parts], ignore_index=True)
    radiomics = [c for c in table.columns if c not in ("patient_id", "label", *encoded_columns())]
    clinical = [c for c in encoded_columns() if c in table.columns]
    crops = None
    if all(p["crops"] is not None for p in parts):
        crops = [c for p in parts for c in p["crops"]]
    return SiteData(
        ids=table["patient_id"].to_numpy(dtype=str),
        labels=table["label"].fillna(-1).astype(int).to_numpy(),
        site=np.concatenate([np.full(len(p["table"]), p["site"]) for p in parts]),
        subsite=decode_subsite(table),
        radiomics=table[radiomics].astype(float).replace([np.inf, -np.inf], np.nan),
        clinical=table[clinical].astype(float) if clinical else None,
        crops=crops,
        quarantined=sum(p["quarantined"] for p in parts),
        unlabelled=sum(p["unlabelled"] for p in parts),
        settings=parts[0]["settings"],
    )


def _one_site(cfg: SiteConfig, keep_unlabelled: bool = False) -> dict:
    features = cfg.paths.output / FEATURES_FILE
    if not features.is_file():
        raise SiteNotReady(
            f"{cfg.site_id}: no extracted features at {features}; run "
            f"`fedmets site extract --config {cfg.source or 'SITE.toml'}` first"
        )
    table = pd.read_parquet(features)
    report_path = cfg.paths.output / REPORT_FILE
    report = json.loads(report_path.read_text(encoding="utf-8")) if report_path.is_file() else {}
    unlabelled = table["label"].isna()
    if not keep_unlabelled:
        table = table[~unlabelled].reset_index(drop=True)
    if table.empty:
        which = "patient" if keep_unlabelled else "labelled patient"
        raise SiteNotReady(f"{cfg.site_id}: no {which} in {features}")
    crops = None
    if cfg.data.mode == "images":
        crops = [crop_path(cfg, str(pid)) for pid in table["patient_id"]]
        missing = [str(p) for p in crops if not p.is_file()]
        if missing:
            raise SiteNotReady(  # which patient's stays at the site
                f"{cfg.site_id}: {len(missing)} crops missing: run `fedmets site extract` again",
                f"e.g. {missing[0]}",
            )
    counts = report.get("counts", {})
    return {
        "site": cfg.site_id,
        "table": table,
        "crops": crops,
        "quarantined": int(counts.get("quarantined", 0)) + int(counts.get("failed", 0)),
        "unlabelled": int(unlabelled.sum()),
        "settings": report.get("settings", {"mode": cfg.data.mode}),
    }


def site_policy_folder(cfg: SiteConfig) -> Path:
    """A site's own policy files (``<paths.output>/policy``: its fold seed per cohort)."""
    return cfg.paths.output / "policy"


def digest(value: object) -> str:
    """sha256 hex of ``value`` as canonical JSON."""
    text = json.dumps(value, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()


def site_seed(seed: int, site_id: str, *keys: int) -> int:
    """A 31-bit seed for ``site_id``'s own randomness, derived from the run's ``seed`` (keys
    mod 2**32: the final model's fold is -1)."""
    entropy = [seed, zlib.crc32(site_id.encode()), *(k % 2**32 for k in keys)]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] % 2**31)


def assign_folds(
    labels: np.ndarray, folds: int, val_fraction: float, seed: int
) -> tuple[np.ndarray, np.ndarray]:
    """Stratified fold of each patient (n,) in 0..folds-1, and per fold the inner validation
    rows among its training rows as a (folds, n) bool mask: positives then negatives, each
    shuffled, dealt round-robin to the folds (fold sizes and positives differ by at most one),
    then ``val_fraction`` of each class of the training rows (rounded) drawn for
    validation, and one row more or fewer (a negative where one is left, drawn after every
    fold's) so that each fold validates on ``val_fraction`` of its training rows rounded up.
    How many rows a fold validates (and fits) on then depends on its size alone: rounded
    class by class, it depended on the positives, and the counts every reply carries
    (``n``, never withheld) told a cohort's positives apart where the census withheld them
    (docs/privacy.md). Up, not to the nearest: the class-by-class count was at most that,
    and on the small validation sets of a federation one row fewer cost pooled AUC."""
    rng = np.random.default_rng(seed)
    fold = np.empty(len(labels), dtype=int)
    order = np.concatenate([rng.permutation(np.flatnonzero(labels == v)) for v in (1, 0)])
    fold[order] = (np.arange(len(order)) + rng.integers(folds)) % folds
    val = np.zeros((folds, len(labels)), dtype=bool)
    for f in range(folds):
        for value in (0, 1):
            rows = np.flatnonzero((fold != f) & (labels == value))
            take = int(round(val_fraction * len(rows)))
            val[f, rng.choice(rows, size=take, replace=False)] = True
    for f in range(folds):  # the total, label-free (after the draws above: they stay as they were)
        total = math.ceil(round(val_fraction * int((fold != f).sum()), 9))
        extra = total - int(val[f].sum())
        want = extra > 0  # rows to add (not yet validation) or to remove (validation)
        for value in (0, 1):
            rows = np.flatnonzero((fold != f) & (labels == value) & (val[f] != want))
            # a row added to validation leaves its class at least one fitting row
            take = min(abs(extra), max(len(rows) - 1, 0) if want else len(rows))
            val[f, rng.choice(rows, size=take, replace=False)] = want
            extra -= take if want else -take
    return fold, val


class SiteWorker:
    """Answers the protocol's requests for one site (``configs`` of length 1) or several sites
    pooled. ``state_root``: where per-run state goes (default ``<first site's paths.cache>/
    federated``)."""

    def __init__(
        self,
        configs: Sequence[SiteConfig],
        state_root: Path | None = None,
        ledger_root: Path | None = None,
    ) -> None:
        """``ledger_root``: where the privacy ledger lives (default the site's
        ``paths.output``; baselines pass their own so as not to spend a site's budget)."""
        self.configs = list(configs)
        self.site_id = self.configs[0].site_id if len(self.configs) == 1 else "pooled"
        self.state_root = Path(state_root or self.configs[0].paths.cache / STATE_DIR)
        self.ledger_root = Path(ledger_root or self.configs[0].paths.output)
        self.data = load_site_data(self.configs)
        self.policy = self.configs[0].policy
        self.route = ""  # the route being answered (see handle)
        self.device = resolve_device(self.configs[0].compute.device)
        key = self.configs[0].service.identity_key if len(self.configs) == 1 else None
        self.identity_key = load_private_key(key) if key else None
        self.require_approval = False  # a deployed site service sets it (fedmets.client.approval)
        # Each image training's GPU memory budget in bytes when several share the device
        # (fedmets.simulation.in_process.FoldPool); None: [compute] gpu_memory_gib.
        self.gpu_memory_bytes: int | None = None
        self._harmonised: tuple[tuple, SiteData] | None = None  # (file and mtime, the view)
        self._folds: tuple[tuple, tuple[np.ndarray, np.ndarray]] | None = None  # likewise
        self.handlers: dict[str, Callable[[dict], dict]] = {
            "query.census": self.census,
            "query.folds": self.folds,
            "query.moments": self.moments,
            "query.covariance": self.covariance,
            "query.combat_statistics": self.combat_statistics,
            "query.combat_variance": self.combat_variance,
            "query.combat_apply": self.combat_apply,
            "query.importance": self.importance,
            "train.image": self.train_image,
            "query.validate": self.validate,
            "query.deep_features": self.deep_features,
            "train.fusion": self.train_fusion,
            "query.train_scores": self.train_scores,
            "query.evaluation": self.evaluation,
            "query.ledger": self.ledger_summary,
            "query.permutation": self.permutation,
            "query.model_bundle": self.keep_bundle,
            "query.bundle_evaluation": self.bundle_evaluation,
        }

    # ---- plumbing ------------------------------------------------------------------------------

    def handle(self, route_name: str, request: Mapping[str, Any]) -> dict:
        """The reply payload to ``request`` on ``route_name``."""
        wire.route(route_name)
        self.route = route_name  # the statistic the handler's replies release (the guard's)
        with self._spending(request):
            reply = self.handlers[route_name](dict(request))
        if route_name not in NOT_ABOUT_PATIENTS:
            record_release(self.ledger(), route_name, request, reply)
        return reply

    def keep_bundle(self, request: dict) -> dict:
        """Keep the run's final model bundle (``fedmets.shared.bundle``) under
        ``<paths.output>/model/`` (a pooled worker: beside its state), replacing an earlier
        one atomically; reply its content hash, for the centre to check what was stored."""
        manifest = json.loads(request["manifest"])
        if manifest.get("format") != BUNDLE_FORMAT or manifest.get("run") != request["run"]:
            raise ValueError(
                f"{self.site_id}: not a {BUNDLE_FORMAT} bundle of run {request['run']}: "
                f"format {manifest.get('format')!r}, run {manifest.get('run')!r}"
            )
        arrays = request["weights:bundle"]
        root = self.configs[0].paths.output if len(self.configs) == 1 else self.state_root
        save_bundle(root / "model", manifest, arrays)
        digest = bundle_digest(manifest, arrays)
        keep_with_bundle(self._state(request) / FINAL_ADJUSTMENTS, root, digest)
        return {"bundle_sha256": digest}

    def bundle_evaluation(self, request: dict) -> dict:
        """A held-out site's evaluation of the bundle it kept (:meth:`keep_bundle`) on all its
        labelled patients (``fedmets.client.predict.evaluate_bundle``: grouped histograms,
        confusion counts at the bundle's threshold, Brier sum, the main model's calibration)."""
        from fedmets.client.predict import evaluate_bundle  # (predict imports this module)

        if len(self.configs) != 1:
            raise ValueError("a held-out evaluation is one site's")
        everyone = np.ones(len(self.data.ids), dtype=bool)
        self._admit_together(request, [], {self.route, "labels"}, len(everyone), [everyone])
        cfg = self.configs[0]
        return evaluate_bundle(cfg, cfg.paths.output / "model", int(request["bins"]))

    def ledger(self) -> PrivacyLedger:
        """The site's privacy ledger (``<ledger_root>/privacy/privacy-ledger.json``)."""
        policy = self.policy
        return site_ledger(self.ledger_root, self.site_id, policy.delta, policy.epsilon_budget)

    def _spending(self, request: Mapping[str, Any]) -> contextlib.AbstractContextManager:
        """Under sample-level DP, the site's budget held from a training's check to its record
        (a lock beside the ledger): a site's processes that train at once (a batch's lanes) take
        turns, so none trains on budget that another has already planned."""
        if str(request.get("dp_mode", "off")) != "sample":
            return contextlib.nullcontext()
        return exclusive(self.ledger_root / LEDGER_DIR / "dp-training")

    def ledger_summary(self, request: dict) -> dict:
        """The ledger's epsilon: about the site's DP spending, not a statistic of patients."""
        n = len(self.data.ids)
        if n < self.min_patients(request):
            raise Withheld("policy.min_patients", f"{n} patients", {"n": n})
        return ledger_reply(self.ledger(), n)

    def min_patients(self, request: Mapping[str, Any]) -> int:
        """The release floor: the larger of the site's and the server's."""
        own = max(cfg.policy.min_patients for cfg in self.configs)
        return max(own, int(request.get("min_patients", 1)))

    def policy_folder(self) -> Path:
        """Where the worker keeps the patient sets it released on (beside its ledger:
        ``<ledger_root>/policy``; baselines pass their own root). The fold seeds are each
        site's own (:func:`site_policy_folder`), so baselines see the sites' folds."""
        return self.ledger_root / "policy"

    def _state(self, request: Mapping[str, Any]) -> Path:
        run = str(request["run"])
        if not wire.RUN_NAME.match(run):
            raise ValueError(f"run name {run!r} is not a safe folder name")
        path = self.state_root / run
        path.mkdir(parents=True, exist_ok=True)
        return path

    def _partition(self, request: Mapping[str, Any]) -> tuple[np.ndarray, np.ndarray]:
        """The stored fold (n,) and inner-validation mask (folds, n); checked against the ids."""
        path = self._state(request) / "folds.npz"
        if not path.is_file():
            raise SiteNotReady(f"{self.site_id}: no fold assignment yet (query.folds first)")
        key = (str(path), path.stat().st_mtime_ns)  # read once per written assignment
        if self._folds is None or self._folds[0] != key:
            with np.load(path) as stored:
                if not np.array_equal(stored["ids"], self.data.ids):
                    raise SiteNotReady(
                        f"{self.site_id}: the patients changed since folds were made"
                    )
                fold, val = stored["fold"], stored["val"]
            fold.setflags(write=False)
            val.setflags(write=False)
            self._folds = (key, (fold, val))
        return self._folds[1]

    def _rows(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Row masks of the request's fold: ``train`` (all training rows), ``fit`` (the rows a
        training request trains on: training minus inner validation, or under DP, where no
        round is chosen on validation, all training rows), ``val`` and ``test``. The final
        model's fold (``wire.FINAL_FOLD``) trains on every patient: no validation, no test."""
        fold, val = self._partition(request)
        f = int(request["fold"])
        if f == wire.FINAL_FOLD:
            every, none = np.ones(len(fold), dtype=bool), np.zeros(len(fold), dtype=bool)
            return {"train": every, "fit": every, "val": none, "test": none}
        train = fold != f
        private = str(request.get("dp_mode", "off")) != "off"
        fit = train if private else train & ~val[f]
        return {"train": train, "fit": fit, "val": val[f], "test": fold == f}

    def _released(self, request: Mapping[str, Any], rows: np.ndarray, reply: dict) -> dict:
        """``reply``, computed on the patients of the bool mask ``rows`` (n,), when the policy
        lets it leave (:meth:`_admit` with the statistics it carries), else :class:`Withheld`
        with the count alone."""
        self._admit(request, rows, release_families(self.route, reply))
        return reply

    def _trained_released(self, request: Mapping[str, Any], rows: np.ndarray, reply: dict) -> dict:
        """A training reply over the fitting rows ``rows``: its weights when the policy lets
        them leave (else :class:`Withheld`), and its loss sums (label statistics: with a
        constant network a loss sum counts the positives) only when those may leave too, on
        rows that differ from the training rows by the inner-validation ones. With
        ``[policy] training_classes`` and no sample-level DP, the weights are admitted as the
        class sums a crafted network's weights can be (docs/privacy.md): on each class of the
        fitting rows and every set :meth:`_training_sets` names within each class."""
        losses = {k: v for k, v in reply.items() if k.split(":", 1)[0] == "train_loss_sum"}
        weights = {k: v for k, v in reply.items() if k not in losses}
        if self.policy.training_classes and str(request.get("dp_mode", "off")) != "sample":
            classes = [self.data.labels == 1, self.data.labels == 0]
            sets = [rows & c for c in classes] + self._training_sets(request, classes)
            families = {self.route, "labels", "features"}
            self._admit_together(request, [rows, *sets], families, int(reply["n"]))
        else:
            self._admit(request, rows, release_families(self.route, weights))
        if losses:
            with contextlib.suppress(Withheld):
                weights |= self._released(request, rows, {"n": reply["n"], **losses})
        return weights

    def _released_on_training(
        self, request: Mapping[str, Any], reply: dict, within: Sequence[np.ndarray] = ()
    ) -> dict:
        """``reply``, sums over the training rows of the request's fold (each of the bool
        masks ``within`` (n,) of them, else all), when the policy lets every set
        :meth:`_training_sets` names leave, else :class:`Withheld` with the count alone."""
        sets = self._training_sets(request, within)
        self._admit_together(request, sets, release_families(self.route, reply), reply["n"])
        return reply

    def _partition_sets(self, request: Mapping[str, Any], folds: bool = True) -> list[np.ndarray]:
        """The cohort and (``folds``) each of its folds (bool masks (n,)) in the request's run:
        the same statistic released over each fold's rows (any route, any crafted network)
        adds up to one over them, so the guard is given them with every such release; a cohort
        that changed by a patient since an earlier release then releases nothing fold-wise."""
        fold, _ = self._partition(request)
        cohort = [np.ones(len(fold), dtype=bool)]
        return cohort + ([fold == f for f in np.unique(fold)] if folds else [])

    def _training_sets(
        self, request: Mapping[str, Any], within: Sequence[np.ndarray] = ()
    ) -> list[np.ndarray]:
        """The patient sets (bool masks (n,), empty ones left out) that a sum over the
        training rows of the request's fold makes known, within each mask of ``within`` (a
        batch, a covariate level, a class; every patient's are :meth:`_admit_together`'s
        cohort and folds, given with every fold-wise release): those training rows, and
        with the other folds' releases of the same sum also the group's whole cohort (the k
        folds' training sets add up to k - 1 times it; the final model's fold is it) and
        each fold's held-out rows of it (the cohort minus that fold's training rows). The
        guard is given them all: a cohort that changed by a patient since an earlier
        release, or a fold holding fewer than the floor of the group, withholds the sum."""
        fold, _ = self._partition(request)
        train = self._rows(request)["train"]
        sets = [train]  # the cohort and its folds: every fold-wise release (_admit_together)
        for rows in within:
            sets += [train & rows, rows] + [rows & (fold == f) for f in np.unique(fold)]
        return [rows for rows in sets if rows.any()]

    def _admit(self, request: Mapping[str, Any], rows: np.ndarray, families: set[str]) -> None:
        """Return when statistics ``families`` may be released on the patients of ``rows``: at
        least the floor of them, and a patient set the same as each one those statistics were
        released on before or differing from it by at least the floor; else :class:`Withheld`
        with the count alone."""
        self._admit_together(request, [rows], families, int(rows.sum()))

    def _admit_together(
        self,
        request: Mapping[str, Any],
        groups: list[np.ndarray],
        families: set[str],
        n: int,
        shared: Sequence[np.ndarray] = (),
    ) -> None:
        """:meth:`_admit` for a reply that releases ``families`` on each of the bool masks
        ``groups`` at once (all admitted and recorded, or none); ``n`` the reply's count. A
        release of one fold's (its training, inner-validation, fitting or held-out rows) is
        admitted with the run's cohort and folds (:meth:`_partition_sets`; a training reply
        with the cohort alone: its weights are not admitted per class, docs/privacy.md
        "Training weights of a crafted network") and, while the fold is
        harmonised, its ComBat groups (:meth:`_harmonised_groups`). The cohort and folds
        (and ``shared``) are admitted as feature sums and label counts too, whatever the
        route (``fedmets.client.policy.SHARED_FAMILIES``)."""
        if "fold" in request:
            implied = self._partition_sets(request, folds=self.route not in TRAINING_ROUTES)
            groups = [*groups, *self._harmonised_groups(request)]
            shared = [*shared, *implied]
        floor = self.min_patients(request)
        small = [int(rows.sum()) for rows in [*groups, *shared] if rows.sum() < floor]
        if small:
            raise Withheld("policy.min_patients", f"{small[0]} patients, floor {floor}", {"n": n})
        guard = DifferencingGuard(self.policy_folder(), floor)
        problem = guard.admit_together(
            [self.data.ids[rows] for rows in groups],
            families,
            shared=[self.data.ids[rows] for rows in shared],
            present=self._present_patterns(request),
        )
        if problem:
            raise Withheld("policy.difference", problem, {"n": n})

    def _present_patterns(self, request: Mapping[str, Any]) -> list[np.ndarray]:
        """The patients (ids) who have each pattern's columns, one array per distinct pattern
        of missing values among the request's radiomics columns (every column without one
        left out): for the guard, a feature sum is one over each pattern's patients."""
        values = self.data.radiomics.to_numpy()
        if "radiomics_columns" in request:
            values = values[:, np.asarray(request["radiomics_columns"], dtype=int)]
        having = np.isfinite(values)
        patterns = np.unique(having[:, ~having.all(axis=0)], axis=1) if having.size else having
        return [self.data.ids[column] for column in patterns.T]

    # ---- census, folds, selection --------------------------------------------------------------

    def census(self, request: dict) -> dict:
        """Who the site is, its counts, schema and settings; its positives only while the
        whole cohort is a patient set the guard admits (a cohort a few patients larger than
        an earlier one would give those patients' labels)."""
        data = self.data
        reply = {
            "site_id": self.site_id,
            "protocol": wire.PROTOCOL_VERSION,
            "mode": "images" if data.crops is not None else "tabular",
            "n": len(data.ids),
            "positives": int(data.labels.sum()),
            "quarantined": data.quarantined,
            "unlabelled": data.unlabelled,
            "radiomics_columns": data.radiomics.shape[1],
            "clinical_columns": 0 if data.clinical is None else data.clinical.shape[1],
            "has_images": int(data.crops is not None),
            "schema_hash": digest(
                [list(data.radiomics.columns), [] if data.clinical is None else list(data.clinical)]
            ),
            "params_hash": digest(data.settings),
            "radiomics_names": list(data.radiomics.columns),
            "folds": self.policy.folds,
            "randomness": self.policy.randomness,
        }
        if self.identity_key is not None and "challenge" in request:
            challenge = request["challenge"]
            reply["identity"] = sign(self.identity_key, request["run"], self.site_id, challenge)
        try:
            self._admit(request, np.ones(len(data.ids), dtype=bool), {self.route, "labels"})
        except Withheld as held:
            del reply["positives"]
            raise Withheld(held.rule, f"positives: {held.reason}", reply) from None
        return reply

    def folds(self, request: dict) -> dict:
        """The site's own stratified folds (``[policy] folds`` and ``validation_fraction``,
        seeded by :func:`fedmets.client.policy.fold_seed`; pooled sites each their own), kept
        in the run's state; the fold sizes, and the positives per fold when every fold holds
        the floor of patients."""
        k = self.policy.folds
        fold = np.empty(len(self.data.ids), dtype=int)
        val = np.zeros((k, len(self.data.ids)), dtype=bool)
        for cfg in self.configs:  # each site its own stratified folds, from its own seed
            rows = np.flatnonzero(self.data.site == cfg.site_id)
            seed = fold_seed(cfg.policy, cfg.seed, self.data.ids[rows], site_policy_folder(cfg))
            site_fold, site_val = assign_folds(
                self.data.labels[rows], k, cfg.policy.validation_fraction, seed
            )
            fold[rows], val[:, rows] = site_fold, site_val
        write_arrays(
            self._state(request) / "folds.npz", {"ids": self.data.ids, "fold": fold, "val": val}
        )
        y = self.data.labels
        sizes = np.bincount(fold, minlength=k).astype(np.int64)
        reply = {"n": len(y), "fold_sizes": sizes}
        try:  # positives per fold: label counts of each fold's patients, which add up to the
            # cohort's (its positives, withheld by the census of a cohort one patient apart)
            cohort = np.ones(len(y), dtype=bool)
            folds = [fold == f for f in range(k)]
            self._admit_together(request, [cohort, *folds], {self.route, "labels"}, len(y))
        except Withheld:
            return reply
        reply["fold_positives"] = np.bincount(fold, weights=y, minlength=k).astype(np.int64)
        return reply

    def moments(self, request: dict) -> dict:
        """Sums over the fold's training rows; of the fold's harmonised radiomics when the
        request says ``harmonised`` (else any harmonisation kept for the fold is dropped)."""
        train = self._rows(request)["train"]
        path = self._harmonised_path(request)
        if request.get("harmonised") and not path.is_file():
            raise SiteNotReady(f"{self.site_id}: fold {request['fold']} is not harmonised yet")
        if not request.get("harmonised"):
            path.unlink(missing_ok=True)
            self._harmonised_groups_path(request).unlink(missing_ok=True)
        X = self._fold_data(request).radiomics.to_numpy()[train]
        reply = {
            "n": int(train.sum()),
            "positives": int(self.data.labels[train].sum()),
            "radiomics_count": np.isfinite(X).sum(axis=0).astype(np.float64),
            "radiomics_sum": np.nansum(X, axis=0),
        }
        if self.data.clinical is not None:
            C = self.data.clinical.to_numpy()[train]
            reply |= {"clinical_sum": C.sum(axis=0), "clinical_sumsq": (C**2).sum(axis=0)}
        return self._released_on_training(request, reply)

    def covariance(self, request: dict) -> dict:
        """Sums over the fold's training rows of the radiomics centred on the request's mean
        and of their cross-products; asked for the correlation ranking, also the sums over
        its DM+ patients (``label_products``), only when each class is a group the policy
        admits in every fold (:meth:`_training_sets`), else left out."""
        train = self._rows(request)["train"]
        mean = np.asarray(request["radiomics_mean"], dtype=np.float64)
        X = self._fold_data(request).radiomics.to_numpy()[train]
        fill = missing_fill(X, mean)  # the site's own mean, not the request's (policy.py)
        centred = np.where(np.isfinite(X), X, fill) - mean
        reply = {
            "n": int(train.sum()),
            "centred_sum": centred.sum(axis=0),
            "cross_products": centred.T @ centred,
        }
        self._released_on_training(request, reply)
        if request.get("label_products"):  # for the correlation ranking
            y = self.data.labels[train].astype(np.float64)
            products = {"positives": int(y.sum()), "label_products": centred.T @ y}
            classes = [self.data.labels == 1, self.data.labels == 0]
            with contextlib.suppress(Withheld):
                reply |= self._released_on_training(request, {"n": reply["n"], **products}, classes)
        return reply

    # ---- ComBat (fedmets.shared.harmonisation) -------------------------------------------------

    def _batches(self) -> list[str]:
        """The site's ComBat batches, in the order of its replies: each site one."""
        return [cfg.site_id for cfg in self.configs]

    def _combat_inputs(
        self, request: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Every row's raw radiomics with missing values at the column's own mean on the
        training rows (``fedmets.client.policy.missing_fill``: the request's mean let the centre
        move the present values past the missing ones) (n, p), its covariate design (n, q) and
        the row's training mask (n,)."""
        X = self.data.radiomics.to_numpy()
        mean = np.asarray(request["radiomics_mean"], dtype=np.float64)
        if mean.shape != (X.shape[1],):
            raise ValueError(
                f"{self.site_id}: radiomics_mean has shape {mean.shape}, the site has "
                f"{X.shape[1]} radiomics columns"
            )
        c = covariate_design(self.data.clinical, list(request["covariates"]))
        train = self._rows(request)["train"]
        return impute(X, missing_fill(X[train], mean)), c, train

    def combat_statistics(self, request: dict) -> dict:
        """Each batch's sums over its training rows (``design_statistics``), released when
        every group they give the sums of is one the policy admits (:meth:`_combat_groups`)."""
        y, c, train = self._combat_inputs(request)
        batches = self._batches()
        reply = {
            "n": int(train.sum()),
            **design_statistics(y[train], c[train], self.data.site[train], batches),
        }
        return self._released_on_training(request, reply, self._combat_groups(request, c))

    def _combat_groups(self, request: Mapping[str, Any], c: np.ndarray) -> list[np.ndarray]:
        """The patient groups (bool masks (n,)) whose feature sums ComBat's statistics give:
        every patient, each batch, and per category covariate each level (its indicator's
        patients and the rest) and its reference level (the patients of none of its
        indicators: the batches' sums minus the levels'). With the covariate effects the
        centre picks, residual sums of squares give the same sums, so both routes admit these
        groups."""
        groups = [np.ones(len(c), dtype=bool)] + [self.data.site == b for b in self._batches()]
        columns = covariate_columns(list(request["covariates"]))
        for name in request["covariates"]:
            indicators = [j for j, column in enumerate(columns) if column.startswith(f"{name}_")]
            for j in indicators:
                groups += [c[:, j] == 1, c[:, j] == 0]
            if indicators:
                groups.append((c[:, indicators] == 0).all(axis=1))
        return groups

    def combat_variance(self, request: dict) -> dict:
        """The residual sums of squares (p,) of the training rows at each batch's intercept
        (``batch_intercepts``, (b, p) in the order of :meth:`combat_statistics`)."""
        y, c, train = self._combat_inputs(request)
        intercepts = np.asarray(request["batch_intercepts"], dtype=np.float64)
        effects = self._effects(request, y, c)
        if intercepts.shape != (len(self._batches()), y.shape[1]):
            raise ValueError(
                f"{self.site_id}: batch_intercepts has shape {intercepts.shape}, expected "
                f"({len(self._batches())}, {y.shape[1]})"
            )
        sumsq = np.zeros(y.shape[1])
        for intercept, b in zip(intercepts, self._batches(), strict=True):
            rows = train & (self.data.site == b)
            sumsq += residual_sumsq(y[rows], c[rows], intercept, effects)
        reply = {"n": int(train.sum()), "residual_sumsq": sumsq}
        return self._released_on_training(request, reply, self._combat_groups(request, c))

    def combat_apply(self, request: dict) -> dict:
        """Fit each batch's empirical-Bayes location and scale on its training rows and
        harmonise all its rows (held-out ones too) with them, a missing value at its imputed
        value (:meth:`_combat_inputs`: the column's own mean on the training rows); kept for
        the fold's later requests (:meth:`_fold_data`) and, for the final model, for
        ``fedmets site predict`` (:func:`fedmets.client.harmonise.keep_adjustment`). Replies
        the count alone."""
        y, c, train = self._combat_inputs(request)
        effects = self._effects(request, y, c)
        grand_mean = np.asarray(request["grand_mean"], dtype=np.float64)
        variance = np.asarray(request["pooled_variance"], dtype=np.float64)
        if grand_mean.shape != variance.shape or variance.shape != (y.shape[1],):
            raise ValueError(f"{self.site_id}: grand_mean/pooled_variance are not ({y.shape[1]},)")
        if (variance <= 0).any():
            raise ValueError(f"{self.site_id}: pooled_variance must be > 0")
        harmonised = np.empty_like(y)
        adjustments = {}
        mean = np.asarray(request["radiomics_mean"], dtype=np.float64)
        for b in self._batches():
            rows, fit = self.data.site == b, train & (self.data.site == b)
            adjustment = BatchAdjustment.fit(y[fit], c[fit], grand_mean, effects, variance)
            # a missing value is harmonised at its imputed value with the patient's own
            # covariates, and kept: left missing, it stood outside the covariate shift the
            # centre chose while every present value took it, and a sum over the present
            # values then gave the covariates of the patients that lack the column
            harmonised[rows] = adjustment.apply(y[rows], c[rows], mean)
            adjustments[b] = adjustment
        write_array(self._harmonised_path(request), harmonised)
        # The centre's covariate effects ride in every later sum over these values (a crafted
        # effect on one level sets that level apart), so each such release is also one on the
        # ComBat groups (:meth:`_admit_together`).
        groups = self._training_sets(request, self._combat_groups(request, c))
        write_array(self._harmonised_groups_path(request), np.array(groups, dtype=bool))
        if int(request["fold"]) == wire.FINAL_FOLD:  # with the fill of missing values used
            save_adjustments(
                self._state(request) / FINAL_ADJUSTMENTS,
                adjustments,
                list(self.data.radiomics.columns),
                list(request["covariates"]),
                missing_fill(self.data.radiomics.to_numpy()[train], mean),
            )
        return self._released(request, train, {"n": int(train.sum())})

    def _effects(self, request: Mapping[str, Any], y: np.ndarray, c: np.ndarray) -> np.ndarray:
        effects = np.asarray(request["covariate_effects"], dtype=np.float64)
        if effects.shape != (c.shape[1], y.shape[1]):
            raise ValueError(
                f"{self.site_id}: covariate_effects has shape {effects.shape}, expected "
                f"({c.shape[1]}, {y.shape[1]})"
            )
        return effects

    def _harmonised_path(self, request: Mapping[str, Any]) -> Path:
        return self._state(request) / f"harmonised-fold{int(request['fold'])}.npy"

    def _harmonised_groups_path(self, request: Mapping[str, Any]) -> Path:
        """The patient sets (groups, n) bool of the fold's ComBat fit (:meth:`combat_apply`)."""
        return self._state(request) / f"harmonised-fold{int(request['fold'])}-groups.npy"

    def _harmonised_groups(self, request: Mapping[str, Any]) -> list[np.ndarray]:
        """The ComBat groups of the fold's harmonised values while the fold keeps them."""
        path = self._harmonised_groups_path(request)
        if not (self._harmonised_path(request).is_file() and path.is_file()):
            return []
        return list(np.load(path))

    def _fold_data(self, request: Mapping[str, Any]) -> SiteData:
        """The site's data with the fold's radiomics: harmonised (:meth:`combat_apply`) when
        they were, else as extracted."""
        path = self._harmonised_path(request)
        if not path.is_file():
            return self.data
        key = (str(path), path.stat().st_mtime_ns)
        if self._harmonised is None or self._harmonised[0] != key:
            radiomics = self.data.radiomics
            values = pd.DataFrame(np.load(path), columns=radiomics.columns, index=radiomics.index)
            self._harmonised = (key, replace(self.data, radiomics=values))
        return self._harmonised[1]

    def importance(self, request: dict) -> dict:
        """Random-forest importances (k_kept,) of the request's columns on the training rows;
        with ``resamples``, also each column's ``selection_frequency``: the share of forests,
        each on a random half of the training rows (stratified; halves of at least the floor
        of patients, drawn from the site's own randomness), that rank it in their ``top_k``."""
        train = self._rows(request)["train"]
        data = self._fold_data(request)
        columns = np.asarray(request["radiomics_columns"], dtype=int)
        values = data.radiomics.to_numpy()[:, columns]
        mean, scale, fill = forest_standardisation(  # no crafted threshold (policy.py)
            values[train], request["radiomics_mean"], request["radiomics_scale"]
        )
        # a missing value at the site's own mean, not the centre's (policy.py)
        filled = replace(data, radiomics=pd.DataFrame(np.where(np.isnan(values), fill, values)))
        standardise = {
            "radiomics_columns": np.arange(len(columns)),
            "radiomics_mean": mean,
            "radiomics_scale": scale,
        }
        X = standardised_groups(filled, standardise, None)["radiomics"][train]
        y = self.data.labels[train]
        reply: dict[str, Any] = {"n": int(train.sum()), "positives": int(y.sum())}
        if 0 < y.sum() < len(y):
            seed = site_seed(int(request["seed"]), self.site_id, int(request["fold"]))
            reply["importances"] = _forest(X, y, int(request["trees"]), seed)
            resamples = int(request.get("resamples", 0))
            halves_hold = len(y) // 2 >= self.min_patients(request)
            if resamples and halves_hold and min(y.sum(), len(y) - y.sum()) >= 2:
                top_k = int(request["top_k"])
                counts = np.zeros(X.shape[1])
                draw = private_seed(  # secure randomness: the centre cannot know the halves
                    self.policy, seed, self.site_id, int(request["fold"]) % 2**32, 1
                )
                halves = StratifiedShuffleSplit(
                    resamples, train_size=0.5, random_state=draw % 2**32
                )
                for b, (half, _) in enumerate(halves.split(X, y)):
                    scores = _forest(X[half], y[half], int(request["trees"]), seed + 1 + b)
                    counts[np.argsort(-scores, kind="stable")[:top_k]] += 1
                reply["selection_frequency"] = counts / resamples
        return self._released(request, train, reply)

    # ---- image model ---------------------------------------------------------------------------

    def _images(self, request: Mapping[str, Any]) -> np.ndarray:
        """Model inputs (n, C, S, S, S) float32, cached on disk per input setting (made by the
        first of a site's processes to need them; the others wait for it)."""
        if self.data.crops is None:
            raise SiteNotReady(f"{self.site_id}: a tabular site has no images")
        cfg = image_config(request)
        key = digest(
            [cfg.crop_voxels, str(request["mask_channel"]), [str(p) for p in self.data.crops]]
        )
        path = self.state_root / f"inputs-{key[:16]}.npy"
        with exclusive(path):
            if not path.is_file():
                from fedmets.client.crops import load_crops

                images = load_crops(self.data.crops, cfg.crop_voxels, request["mask_channel"])
                write_array(path, images)
        return np.load(path)

    def _image_model(self, request: Mapping[str, Any]) -> ImageClassifier:
        from fedmets.shared.image_models import build_image_model

        model = build_image_model(image_config(request))
        set_state(model, request[wire.WEIGHTS_PREFIX + IMAGE_MODEL])
        return model

    def _dp_noise(self, request: Mapping[str, Any], n: int, networks: int) -> float | None:
        """The DP-SGD noise multiplier of a sample-level DP training request (None without
        DP; a site whose policy requires DP refuses such requests at its gate);
        PrivacyBudgetExceeded before anything is trained when this message's trainings would
        take the site over its budget. The noise is planned so that the run's
        ``dp_releases`` trainings end at ``dp_epsilon``; every round recomputes the same."""
        if str(request.get("dp_mode", "off")) != "sample":
            return None
        batch, epochs = int(request["batch"]), int(request["epochs"])
        z = plan_site_noise(
            float(request["dp_epsilon"]),
            self.policy.delta,
            n,
            batch,
            epochs,
            int(request["dp_releases"]),
        )
        step = (z, sample_rate_for(n, batch), epochs * steps_per_epoch(n, batch))
        self.ledger().check([step] * networks)
        return z

    def _private(self, request: Mapping[str, Any], **kwargs: Any) -> dict:
        """``fedmets.client.privacy.train_private`` with the request's settings and the ledger."""
        return train_private(
            lr=float(request["lr"]),
            batch_size=int(request["batch"]),
            epochs=int(request["epochs"]),
            pos_weight=float(request["pos_weight"]),
            max_grad_norm=float(request["max_grad_norm"]),
            proximal_mu=float(request["proximal_mu"]),
            device=self.device,
            ledger=self.ledger(),
            fold=int(request["fold"]),
            round=int(request["round"]),
            run=str(request["run"]),
            delta=self.policy.delta,
            **kwargs,
        )

    def train_image(self, request: dict) -> dict:
        from fedmets.client.crops import CropDataset

        rows = self._rows(request)["fit"]
        n = int(rows.sum())
        if n < self.min_patients(request) or len(set(self.data.labels[rows])) < 2:
            return {"n": n}
        noise = self._dp_noise(request, n, 1)
        model = self._image_model(request)
        images = self._images(request)
        seed = site_seed(int(request["seed"]), self.site_id, int(request["fold"]))
        data = CropDataset(
            images[rows], self.data.labels[rows], augment=True, seed=seed, device=self.device
        )
        if noise is not None:
            history = self._private(
                request,
                model=model,
                data=data,
                seed=self._private_seed(request),
                noise_multiplier=noise,
                stage="image",
                model_name=IMAGE_MODEL,
            )
            reply = {"n": n, wire.WEIGHTS_PREFIX + IMAGE_MODEL: history["state"]}
            return self._released(request, rows, reply)
        from fedmets.client.memory import device_budget_bytes, plan_image_training

        budget = self.gpu_memory_bytes or device_budget_bytes(
            self.device, self.configs[0].compute.gpu_memory_gib
        )
        plan = plan_image_training(
            model, tuple(images.shape[1:]), int(request["batch"]), self.device, budget
        )
        history = train_image_model(
            model,
            data,
            epochs=int(request["epochs"]),
            lr=float(request["lr"]),
            pos_weight=float(request["pos_weight"]),
            seed=seed,
            device=self.device,
            batch_size=int(request["batch"]),
            proximal_mu=float(request["proximal_mu"]),
            memory=plan,
        )
        reply = {
            "n": n,
            wire.WEIGHTS_PREFIX + IMAGE_MODEL: get_state(model),
            "train_loss_sum": self._training_loss(history, request),
        }
        return self._trained_released(request, rows, reply)

    def deep_features(self, request: dict) -> dict:
        """Extract and keep the deep features (n, D) of every patient with the request's image
        model (the fold's model, kept beside them); reply the count of the fold's training
        rows with their sums, sums of squares and cross-products ((D,), (D,), (D, D)), or,
        under sample-level DP, the count alone: those sums are exact whatever network
        computed them, and a network the centre crafts can pass one patient's image through
        them (docs/privacy.md), so under DP no statistic of the deep features leaves."""
        from fedmets.client.crops import CropDataset

        model = self._image_model(request)
        deep = extract_deep_features(model, CropDataset(self._images(request)), self.device)
        write_array(self._state(request) / f"deep-fold{int(request['fold'])}.npy", deep)
        settings = {k: str(request[k]) for k in ("backbone", "image_preset", "mask_channel")}
        save_fold_model(
            self._state(request),
            int(request["fold"]),
            request[wire.WEIGHTS_PREFIX + IMAGE_MODEL],
            settings,
        )
        train = self._rows(request)["train"]
        n = int(train.sum())
        if str(request.get("dp_mode", "off")) == "sample":
            return {"n": n}
        rows = deep[train].astype(np.float64)
        reply = {
            "n": n,
            "deep_sum": rows.sum(axis=0),
            "deep_sumsq": (rows**2).sum(axis=0),
            "deep_cross": rows.T @ rows,
        }
        return self._released_on_training(request, reply)

    # ---- fusion --------------------------------------------------------------------------------

    def _groups(self, request: Mapping[str, Any]) -> dict[str, np.ndarray]:
        """Standardised feature groups of every row (``fedmets.client.scoring``), deep ones
        when the fold's deep features exist."""
        deep_file = self._state(request) / f"deep-fold{int(request['fold'])}.npy"
        deep = np.load(deep_file) if deep_file.is_file() else None
        return standardised_groups(self._fold_data(request), request, deep)

    def _fusion_models(
        self, request: Mapping[str, Any], groups: Mapping[str, np.ndarray]
    ) -> dict[str, tuple[FusionNet, np.ndarray]]:
        """Each ``weights:<network>`` of the request as (loaded FusionNet, its input matrix)."""
        states = {
            key.removeprefix(wire.WEIGHTS_PREFIX): state
            for key, state in request.items()
            if key.startswith(wire.WEIGHTS_PREFIX)
        }
        return load_networks(states, groups, request)

    def train_fusion(self, request: dict) -> dict:
        rows = self._rows(request)["fit"]
        n = int(rows.sum())
        if n < self.min_patients(request) or len(set(self.data.labels[rows])) < 2:
            return {"n": n}
        y = self.data.labels[rows]
        reply: dict[str, Any] = {"n": n}
        seed = site_seed(int(request["seed"]), self.site_id, int(request["fold"]))
        models = self._fusion_models(request, self._groups(request))
        noise = self._dp_noise(request, n, len(models))
        for name, (net, X) in models.items():
            if noise is not None:
                history = self._private(
                    request,
                    model=net,
                    data=(X[rows], y),
                    seed=self._private_seed(request),
                    noise_multiplier=noise,
                    weight_decay=float(request["weight_decay"]),
                    stage="fusion",
                    model_name=name,
                )
                reply[wire.WEIGHTS_PREFIX + name] = history["state"]
                continue
            history = train_fusion(
                net,
                X[rows],
                y,
                epochs=int(request["epochs"]),
                lr=float(request["lr"]),
                pos_weight=float(request["pos_weight"]),
                seed=seed,
                batch_size=int(request["batch"]),
                weight_decay=float(request["weight_decay"]),
                proximal_mu=float(request["proximal_mu"]),
            )
            reply[wire.WEIGHTS_PREFIX + name] = get_state(net)
            reply[f"train_loss_sum:{name}"] = self._training_loss(history, request)
        return self._trained_released(request, rows, reply)

    def validate(self, request: dict) -> dict:
        rows = self._rows(request)["val"]
        n = int(rows.sum())
        if n < self.min_patients(request):
            return {"n": n}
        y = self.data.labels[rows]
        pos_weight = float(request["pos_weight"])
        reply: dict[str, Any] = {"n": n}
        if request["stage"] == "image":
            model = self._image_model(request)
            images = np.asarray(self._images(request)[rows])
            probs = extract_probabilities(model, images, self.device)
            reply[f"val_loss_sum:{IMAGE_MODEL}"] = self._score_groups(y, probs).loss_sum(pos_weight)
            return self._released(request, rows, reply)
        groups = self._groups(request)
        for name, (net, X) in self._fusion_models(request, groups).items():
            probs = predict_proba(net, X[rows])
            reply[f"val_loss_sum:{name}"] = self._score_groups(y, probs).loss_sum(pos_weight)
            if "bins" in request:
                pos, neg = self._histograms(y, probs, request)
                reply[f"val_hist_pos:{name}"], reply[f"val_hist_neg:{name}"] = pos, neg
        return self._released(request, rows, reply)

    def permutation(self, request: dict) -> dict:
        """Permutation importance of the request's fusion network on this site's held-out rows
        of the fold: the summed weighted-BCE increase (on score groups) when one input block (a
        radiomics column, a clinical variable, the deep features) is shuffled across those rows,
        averaged over ``repeats`` shuffles; (blocks,) in ``fedmets.shared.models.input_blocks``
        order. With ``randomness = "secure"`` the shuffles are the site's own draw: a centre
        that knew them would know which patients each block's loss change compares."""
        rows = self._rows(request)["test"]
        n = int(rows.sum())
        if n < self.min_patients(request):
            return {"n": n}
        (name, (net, X)), *_ = self._fusion_models(request, self._groups(request)).items()
        X, y = X[rows], self.data.labels[rows]
        pos_weight = float(request["pos_weight"])

        def loss_sum(inputs: np.ndarray) -> float:
            return self._score_groups(y, predict_proba(net, inputs)).loss_sum(pos_weight)

        clinical = [] if self.data.clinical is None else list(self.data.clinical.columns)
        blocks = input_blocks(net.group_dims, clinical)
        seed = site_seed(int(request["seed"]), self.site_id)
        if self.policy.randomness == "secure":  # shuffles the centre cannot replay
            seed = private_seed(self.policy, seed, self.site_id)
        rng = np.random.default_rng(seed)
        base = loss_sum(X)
        increase = np.zeros(len(blocks))
        for _ in range(int(request["repeats"])):
            for b, (_, columns) in enumerate(blocks):
                shuffled = X.copy()
                shuffled[:, columns] = X[rng.permutation(n)][:, columns]
                increase[b] += loss_sum(shuffled) - base
        reply = {
            "n": n,
            "base_loss_sum": base,
            "loss_increase_sum": increase / int(request["repeats"]),
        }
        return self._released(request, rows, reply)

    def train_scores(self, request: dict) -> dict:
        """Histograms of the training rows' scores of each of the request's ``models`` (default:
        one per network's model), made from its networks (``fedmets.shared.models.
        combine_scores``: ensembles, late fusion under ``fusion``), for the thresholds; the
        held-out rows' scores are kept on the site's disk for :meth:`evaluation` (the final
        model's: every patient's, ``scores-fold-1.npz``, its in-run scores)."""
        rows = self._rows(request)
        final = int(request["fold"]) == wire.FINAL_FOLD
        kept = rows["train"] if final else rows["test"]
        y = self.data.labels
        reply: dict[str, Any] = {"n": int(rows["train"].sum())}
        held_out = {}
        networks = self._fusion_models(request, self._groups(request))
        scores = {name: predict_proba(net, X) for name, (net, X) in networks.items()}
        every = list(dict.fromkeys(base_model(name) for name in networks))
        models = combine_scores(
            scores, list(request.get("models", every)), request.get("fusion", "joint")
        )
        for name, scores in models.items():
            pos, neg = self._histograms(y[rows["train"]], scores[rows["train"]], request)
            reply[f"hist_pos:{name}"], reply[f"hist_neg:{name}"] = pos, neg
            held_out[name] = scores[kept]
        fold = int(request["fold"])
        write_arrays(
            self._state(request) / f"scores-fold{fold}.npz",
            {"rows": np.flatnonzero(kept), **{_safe(k): v for k, v in held_out.items()}},
        )
        return self._released(request, rows["train"], reply)

    def evaluation(self, request: dict) -> dict:
        """Out-of-fold results per model, over the whole site and per subsite group: score
        histograms, the confusion counts at each fold's threshold and the Brier sum, all of
        them on the policy's score groups (:class:`ScoreGroups`)."""
        thresholds = {
            k.removeprefix("thresholds:"): np.asarray(v, dtype=float)
            for k, v in request.items()
            if k.startswith("thresholds:")
        }
        folds = len(next(iter(thresholds.values())))
        fold, scores = self.out_of_fold(str(request["run"]), list(thresholds), folds)
        cut = {name: np.full(len(fold), np.nan) for name in thresholds}
        for name, values in thresholds.items():
            cut[name][fold >= 0] = values[fold[fold >= 0]]
        scored = fold >= 0
        groups = self._evaluation_groups(request, scored)
        reply: dict[str, Any] = {
            "n": int(scored.sum()),
            "suppressed": len(set(self.data.subsite)) - (len(groups) - 1),
        }
        for suffix, rows in groups.items():
            y = self.data.labels[rows]
            for name in thresholds:
                grouped = self._score_groups(y, scores[name][rows])
                pos, neg = grouped.histograms(int(request["bins"]))
                reply[f"hist_pos:{name}{suffix}"], reply[f"hist_neg:{name}{suffix}"] = pos, neg
                reply[f"confusion:{name}{suffix}"] = grouped.confusion(cut[name][rows])
                reply[f"brier_sum:{name}{suffix}"] = grouped.brier_sum()
            if suffix:
                reply[f"group_n:{suffix[1:]}"] = int(rows.sum())
        return reply

    def _evaluation_groups(
        self, request: Mapping[str, Any], scored: np.ndarray
    ) -> dict[str, np.ndarray]:
        """The patient sets (bool masks (n,)) the evaluation releases its statistics on (they
        carry labels): every scored patient (key "") and each subsite group ("@<subsite>")
        that is neither under the floor nor one the differencing guard withholds, with
        complementary suppression over all of them. The whole minus the released groups is a
        release too: it is no small set, and when the guard would withhold it the smallest
        released group joins it. All admitted together; :class:`Withheld` when the whole is
        not."""
        floor = self.min_patients(request)
        families = {self.route, "labels"}
        subsites = {
            f"@{s}": scored & (self.data.subsite == s) for s in sorted(set(self.data.subsite))
        }
        sizes = {g: int(rows.sum()) for g, rows in subsites.items()}
        guard = DifferencingGuard(self.policy_folder(), floor)

        def withheld_by_guard(rows: np.ndarray) -> bool:
            return rows.any() and guard.problem([self.data.ids[rows]], families) is not None

        withheld: set[str] = set()
        while True:  # what the guard withholds is suppressed, and the suppression redone
            hidden = suppressed_groups(sizes, floor, sorted(withheld))
            groups = {"": scored} | {g: r for g, r in subsites.items() if g not in hidden}
            released = [g for g in groups if g]
            rest = scored & ~np.any([groups[g] for g in released] or [~scored], axis=0)
            refused = {g for g in released if withheld_by_guard(groups[g])}
            if not refused and released and withheld_by_guard(rest):
                refused = {min(released, key=lambda g: sizes[g])}
            if not refused:
                break
            withheld |= refused
        sets = [*groups.values(), rest] if rest.any() else list(groups.values())
        # the scored patients are folds the centre chose: with other runs, sums over the cohort
        self._admit_together(
            request, sets, families, int(scored.sum()), shared=self._partition_sets(request)
        )
        return groups

    def out_of_fold(
        self, run: str, models: Sequence[str], folds: int
    ) -> tuple[np.ndarray, dict[str, np.ndarray]]:
        """The held-out scores that run ``run`` kept on this site's disk
        (:meth:`train_scores`): each patient's fold (n,), -1 where none was scored, and per
        model its out-of-fold DM probabilities (n,), NaN where none. Local only: this is what
        never leaves the site, read by the evaluation and by the centralised study, which
        holds its pooled worker in process."""
        state = self._state({"run": run})
        self._partition({"run": run})  # SiteNotReady when the patients changed since the run
        n = len(self.data.ids)
        fold = np.full(n, -1)
        scores = {name: np.full(n, np.nan) for name in models}
        for f in range(folds):
            path = state / f"scores-fold{f}.npz"
            if not path.is_file():
                continue
            with np.load(path) as stored:
                fold[stored["rows"]] = f
                for name in models:
                    scores[name][stored["rows"]] = stored[_safe(name)]
        return fold, scores

    def _training_loss(self, history: Mapping[str, Any], request: Mapping[str, Any]) -> float:
        """The summed weighted BCE of the last local epoch, in the policy's score groups: the
        scores the model gave its training samples as it trained on them
        (``history["last_scores"]``), each at its group's mean."""
        groups = self._score_groups(history["last_labels"], history["last_scores"])
        return groups.loss_sum(float(request["pos_weight"]))

    def _score_groups(self, y: np.ndarray, scores: np.ndarray) -> ScoreGroups:
        """Labels ``y`` (n,) and scores (n,) in the policy's score groups
        (``fedmets.client.policy.score_groups``)."""
        return score_groups(y, scores, self.policy)

    def _histograms(
        self, y: np.ndarray, scores: np.ndarray, request: Mapping[str, Any]
    ) -> tuple[np.ndarray, np.ndarray]:
        """Class-conditional score counts (bins,) int64 each over the request's ``bins``, in
        the policy's score groups."""
        return self._score_groups(y, scores).histograms(int(request["bins"]))

    def _private_seed(self, request: Mapping[str, Any]) -> int:
        """The seed of a DP-SGD training's noise and sampling (``fedmets.client.policy``)."""
        keys = (int(request["fold"]), int(request["round"]))
        return private_seed(self.policy, int(request["seed"]), self.site_id, *keys)


def _forest(X: np.ndarray, y: np.ndarray, trees: int, seed: int) -> np.ndarray:
    """Impurity importances (columns,) of a class-balanced random forest on ``X``, ``y``."""
    forest = RandomForestClassifier(
        n_estimators=trees, class_weight="balanced", random_state=seed % 2**32, n_jobs=1
    )
    return forest.fit(X, y).feature_importances_.astype(np.float64)


@torch.no_grad()
def extract_probabilities(
    model: ImageClassifier, images: np.ndarray, device: torch.device
) -> np.ndarray:
    """Eval-mode DM probabilities (n,) of an image model on inputs (n, C, S, S, S)."""
    model.to(device).eval()
    out = [
        torch.sigmoid(model(torch.from_numpy(np.ascontiguousarray(batch)).to(device))).cpu()
        for batch in np.array_split(images, max(1, len(images) // 16))
    ]
    return torch.cat(out).double().numpy()


def _safe(name: str) -> str:
    """A model key as an npz entry name."""
    return re.sub(r"[^A-Za-z0-9]", "_", name)
