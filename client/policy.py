"""The site's release policy: what may leave this hospital, decided by its own ``[policy]``
(``fedmets.shared.config.PolicySection``) and enforced on every request, whatever the
coordinating centre asks and whatever app code it uploaded. The release gate
(``fedmets.client.release``) calls it before and after the site worker answers.

Rules (each named in refusals and in the audit log by the string in brackets):

- a request is well formed: only the route's declared fields, of the declared types and
  ranges (``wire.declaration``, :func:`fedmets.shared.wire.check_request`);
- the folds are the site's: ``folds`` must equal the site's own count, a fold index must be
  one of them or the final model's (``wire.FINAL_FOLD``: every patient) (``policy.folds``);
  the assignment itself comes from a seed the site draws once per
  cohort (:func:`fold_seed`), never from the request;
- the work a request asks for is bounded by the site's data (``policy.size``): at most as
  many covariates as the clinical schema has columns, and radiomics column indices at most
  as many as the site's columns, each one of them; at most ``max_forest_trees`` trees of
  one importance request (``trees`` x (1 + ``resamples``)); an evaluation's thresholds
  one for each of the site's folds, each under a model key (``wire.MODEL_KEY``); at most
  ``max_networks`` networks (``weights:*``) a request; a model bundle to keep, distinct
  model keys and at most ``max_networks`` fusion networks;
- training and scoring within bounds: ``policy.min_batch``, ``policy.max_epochs``,
  ``policy.lr``, ``policy.network`` (fusion widths and layers, the run's and each variant
  network's), ``policy.max_trees``,
  ``policy.max_repeats``, ``policy.max_bins``;
- ``policy.require_dp``: training and every route that releases anything computed from a
  model's outputs answer only in runs whose sites train under DP-SGD (``dp_mode = "sample"``:
  the noise is the site's own; client-level DP is added by the centre), in which the deep
  features route replies its count alone (the site worker), nothing is validated, and each
  score group sits at its cell of the ``max_bins`` grid (:func:`score_groups`);
- ``policy.max_scorings``: with ``require_dp``, each model-output route answers a run at most
  that many times a fold (:class:`ScoringCount`, counted by the gate), and a reply scores at
  most :data:`DP_MODELS` models: a DP run asks each once, for its ablations at most;
- ``policy.min_patients``: nothing is released on fewer patients than the floor (the larger of
  the site's and the request's);
- ``policy.difference``: the :class:`DifferencingGuard` remembers, per statistic, every
  patient set the site released it on, across runs, and withholds a release on a set that
  differs from an earlier one by fewer than the floor (the same statistic on two sets that
  differ by one patient gives that patient's value), or that lets a linear combination of
  the statistic's sums over all its sets be one over fewer than the floor
  (``fedmets.client.combined_sets``); a sum over a fold's training rows is a
  release on the cohort and every held-out fold too (the site worker gives the guard those
  sets), and every route's sums of feature values are one statistic (``FEATURE_FIELDS``);
- ``policy.min_bin_count``: every statistic of scores and labels (histograms, confusion
  counts, Brier, loss sums, calibration) is computed on groups of that many patients by score,
  each patient at its group's mean (:class:`ScoreGroups`): no such release separates one
  patient's label from its group's;
- ``policy.max_failures``: a run whose requests the site failed to answer that many times
  (an error in the worker, or a reply the wire rules refuse: either can depend on the
  patients' values, e.g. an overflow for the patients above a threshold the centre set) is
  refused from then on (:class:`FailureCount`); a failure reaches the centre as its error
  type alone, the message stays in the site's audit log;
- ``policy.suppression``: subsite groups under the floor (or withheld by the guard) are
  suppressed, and then more groups until the suppressed patients are none or at least the
  floor (:func:`suppressed_groups`), so that the whole site minus the released groups is never
  a small group (nor one the guard withholds).

A request that breaks a rule is refused (:class:`PolicyRefused`, nothing computed); a
well-formed request whose answer would break ``policy.min_patients`` or ``policy.difference``
is answered with its count alone (withheld), as a too-small site always was.
"""

from __future__ import annotations

import hashlib
import json
import secrets
import zlib
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from fedmets.client.combined_sets import smallest_isolated
from fedmets.shared import wire
from fedmets.shared.config import PolicySection
from fedmets.shared.files import exclusive, write_json
from fedmets.shared.model_names import base_model, group_subsets, network_variant

TRAINING_ROUTES = ("train.image", "train.fusion")
MODEL_OUTPUT_ROUTES = (
    "query.validate",
    "query.deep_features",
    "query.train_scores",
    "query.permutation",
    "query.evaluation",
    "query.bundle_evaluation",
)
"""Routes whose replies are computed from a model's outputs (scores, losses, features)."""
DP_MODELS = len(group_subsets())
"""The most models a run under DP scores in one request: its ablations, one model per subset of
the input groups (7)."""


class PolicyRefused(RuntimeError):
    """A request the site's policy refuses; ``rule`` names the rule (see the module
    docstring), the message what was asked and what the policy allows."""

    def __init__(self, rule: str, message: str) -> None:
        super().__init__(f"{rule}: {message}")
        self.rule, self.message = rule, message

    def __reduce__(self):  # picklable across processes (the simulation's baseline workers)
        return type(self), (self.rule, self.message)


def failures_used_up(run: str, max_failures: int) -> PolicyRefused:
    """The refusal of a request of a run past its failures: the same words whatever the
    count (failures past ``max_failures``, of requests answered at once, are refused unsaid:
    a count in the message would tell how many of them failed)."""
    return PolicyRefused(
        "policy.max_failures",
        f"run {run!r} used up the failures this site allows (max_failures {max_failures}); "
        "it answers no more of this run",
    )


class FailureCount:
    """The requests of each run the site failed to answer (``folder/failed-requests.json``:
    run -> count), kept across restarts under a file lock (the site's processes share it)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "failed-requests.json"

    def _read(self) -> dict[str, int]:
        return json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}

    def check(self, run: str, policy: PolicySection) -> None:
        """PolicyRefused (``policy.max_failures``) when ``run`` has used up its failures."""
        if self._read().get(run, 0) >= policy.max_failures:
            raise failures_used_up(run, policy.max_failures)

    def count(self, run: str) -> int:
        """The failures of ``run`` so far (the file is replaced whole: no lock to read it)."""
        return self._read().get(run, 0)

    def record(self, run: str) -> int:
        """Count one more failure of ``run``; the run's count so far."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(self.path):
            counts = self._read()
            counts[run] = counts.get(run, 0) + 1
            write_json(self.path, counts)
        return counts[run]


class ScoringCount:
    """The replies of each model-output route each run got on each fold at a site with
    ``require_dp`` (``folder/scorings.json``: run -> "route@fold" -> count), kept across
    restarts under a file lock (the site's processes share it; a batch's lanes take turns)."""

    def __init__(self, folder: Path) -> None:
        self.path = Path(folder) / "scorings.json"

    def admit(self, route_name: str, request: Mapping[str, Any], policy: PolicySection) -> None:
        """Count ``request`` as one more reply of its run on its route and fold, or refuse it
        (PolicyRefused, ``policy.max_scorings``, nothing counted) when the run already had
        ``policy.max_scorings`` of them. Counted when admitted: a request that then fails or
        is withheld counts too."""
        run, fold = str(request.get("run", "")), request.get("fold")
        key = f"{route_name}@{'all' if fold is None else int(fold)}"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with exclusive(self.path):
            saved = self.path.is_file()
            counts = json.loads(self.path.read_text(encoding="utf-8")) if saved else {}
            done = counts.get(run, {}).get(key, 0)
            if done >= policy.max_scorings:
                raise PolicyRefused(
                    "policy.max_scorings",
                    f"run {run!r} had {done} {route_name} replies on fold "
                    f"{key.split('@')[1]}, the most this site gives a run under DP "
                    f"(max_scorings {policy.max_scorings})",
                )
            counts.setdefault(run, {})[key] = done + 1
            write_json(self.path, counts)


def check_request(
    route_name: str,
    request: Mapping[str, Any],
    policy: PolicySection,
    radiomics_columns: int | None = None,
) -> None:
    """Refuse ``request`` on ``route_name`` (PolicyRefused) when it breaks its declaration
    or a bound of ``policy``; return when it may be answered. ``radiomics_columns``: the
    site's count of radiomics columns (the request's column indices are then bounded by it)."""
    problems = wire.check_request(route_name, request)
    if problems:
        raise PolicyRefused("wire.declaration", f"{route_name}: {'; '.join(problems)}")
    check_bounds(route_name, request, policy, radiomics_columns)


def check_bounds(
    route_name: str,
    request: Mapping[str, Any],
    policy: PolicySection,
    radiomics_columns: int | None = None,
) -> None:
    """:func:`check_request` without the wire declaration: ``request``'s settings against
    ``policy``'s bounds (also what ``fedmets site approve`` asks of a run's planned settings,
    ``fedmets.shared.run_plan.policy_requests``)."""

    def refuse(rule: str, message: str) -> None:
        raise PolicyRefused(rule, f"{route_name}: {message}")

    # The work a request asks for, bounded by the site's data, not by the message's size: a
    # covariate list costs the square of its length (every level's patient sets, compared two
    # at a time), and each column index a row of every patient's values.
    from fedmets.shared.clinical import CLINICAL_COLUMNS  # (pandas: not for the CLI's imports)

    if len(request.get("covariates", ())) > len(CLINICAL_COLUMNS):
        refuse(
            "policy.size",
            f"{len(request['covariates'])} covariates: the clinical schema has "
            f"{len(CLINICAL_COLUMNS)} columns",
        )
    columns = np.asarray(request.get("radiomics_columns", []))
    if radiomics_columns is not None and (
        columns.size > radiomics_columns or (columns.size and columns.max() >= radiomics_columns)
    ):
        refuse(
            "policy.size",
            f"{columns.size} radiomics column indices up to {columns.max()}: this site has "
            f"{radiomics_columns} columns",
        )

    forests = 1 + request.get("resamples", 0)  # the stability ranking's forests on halves
    if "trees" in request and request["trees"] * forests > policy.max_forest_trees:
        refuse(
            "policy.size",
            f"{request['trees']} trees x {forests} forests: this site fits at most "
            f"{policy.max_forest_trees} trees a request (max_forest_trees)",
        )
    networks = sum(key.startswith(wire.WEIGHTS_PREFIX) for key in request)
    if networks > policy.max_networks:
        refuse(
            "policy.size",
            f"{networks} networks: this site trains or scores at most {policy.max_networks} "
            "a request (max_networks)",
        )
    if route_name == "query.model_bundle":  # what its held-out evaluation scores, and sends
        _check_bundle_size(request, policy, refuse)
    for key, value in request.items():  # the evaluation's thresholds: one a fold, a model's
        if key.startswith("thresholds:") and (
            not wire.MODEL_KEY.match(key.removeprefix("thresholds:"))
            or np.shape(value) != (policy.folds,)
        ):
            refuse(
                "policy.size",
                f"{key[:80]!r} of shape {np.shape(value)}: thresholds are one for each of this "
                f"site's {policy.folds} folds, under a model key",
            )
    if "folds" in request and request["folds"] != policy.folds:
        refuse(
            "policy.folds",
            f"this site cross-validates with its own {policy.folds} folds; the request asked "
            f"for {request['folds']}",
        )
    if "fold" in request and route_name != "query.folds":
        if not (0 <= request["fold"] < policy.folds or request["fold"] == wire.FINAL_FOLD):
            refuse("policy.folds", f"fold {request['fold']} is not one of this site's folds")
    bounds = (
        ("batch", "policy.min_batch", lambda v: v >= policy.min_batch, f">= {policy.min_batch}"),
        (
            "epochs",
            "policy.max_epochs",
            lambda v: v <= policy.max_epochs,
            f"<= {policy.max_epochs}",
        ),
        (
            "lr",
            "policy.lr",
            lambda v: policy.min_lr <= v <= policy.max_lr,
            f"in [{policy.min_lr:g}, {policy.max_lr:g}]",
        ),
        ("trees", "policy.max_trees", lambda v: v <= policy.max_trees, f"<= {policy.max_trees}"),
        (
            "repeats",
            "policy.max_repeats",
            lambda v: v <= policy.max_repeats,
            f"<= {policy.max_repeats}",
        ),
        ("bins", "policy.max_bins", lambda v: v <= policy.max_bins, f"<= {policy.max_bins}"),
    )
    for field, rule, allowed, wanted in bounds:
        if field in request and not allowed(request[field]):
            refuse(rule, f"{field} {request[field]!r} is outside this site's bound ({wanted})")
    networks = {"hidden": np.asarray(request.get("hidden", [])).reshape(-1)}
    for key in request:
        if key.startswith(wire.WEIGHTS_PREFIX):
            try:
                variant = network_variant(key.removeprefix(wire.WEIGHTS_PREFIX))
            except ValueError as error:
                refuse("wire.declaration", str(error))
            if variant.hidden is not None:
                networks[f"{key} hidden"] = np.asarray(variant.hidden)
    for what, value in networks.items():
        widths = [int(w) for w in value]
        if len(widths) > policy.max_layers or any(w > policy.max_width for w in widths):
            refuse(
                "policy.network",
                f"{what} {widths}: this site trains at most {policy.max_layers} hidden layers "
                f"of at most {policy.max_width} units",
            )
    private = request.get("dp_mode", "off") == "sample"
    if policy.require_dp and route_name in TRAINING_ROUTES + MODEL_OUTPUT_ROUTES and not private:
        refuse(
            "policy.require_dp",
            "this site trains and releases model outputs only in runs under sample-level DP "
            "(dp_mode 'sample': DP-SGD with the site's own noise)",
        )
    scored = scored_models(route_name, request)
    if policy.require_dp and scored > DP_MODELS:
        refuse(
            "policy.max_scorings",
            f"{scored} models scored in one request: a run under DP scores at most "
            f"{DP_MODELS}, one per subset of the input groups",
        )
    if policy.require_dp and route_name == "query.validate":
        refuse(
            "policy.require_dp",
            "a run under DP validates nothing (it keeps each network's last round): this site "
            "answers no validation",
        )


def scored_models(route_name: str, request: Mapping[str, Any]) -> int:
    """How many models' scores a reply to ``request`` releases statistics of: training
    scores, the models it names (else its networks' models); an evaluation, the models it
    gives thresholds for; 0 on a route that scores nothing; else 1 (a held-out evaluation
    scores the kept bundle's models, bounded when the bundle is kept: ``_check_bundle_size``)."""
    if route_name not in MODEL_OUTPUT_ROUTES:
        return 0
    if route_name == "query.train_scores":
        names = request.get("models")
        if names is None:
            prefix = wire.WEIGHTS_PREFIX
            names = [base_model(k[len(prefix) :]) for k in request if k.startswith(prefix)]
        return len(set(map(str, names)))
    if route_name == "query.evaluation":
        return sum(str(k).startswith("thresholds:") for k in request)
    return 1


def _check_bundle_size(request: Mapping[str, Any], policy: PolicySection, refuse) -> None:
    """``policy.size`` of a model bundle to keep: ``query.bundle_evaluation`` scores each of its
    models with all its networks and replies two histograms of ``bins`` for each, so its models
    are distinct model keys (``wire.MODEL_KEY``: at most 156) and its fusion networks
    (``fusion/<network>/<parameter>`` arrays) at most ``max_networks``, as a request's."""
    models = json.loads(request.get("manifest", "{}")).get("models")
    if not isinstance(models, list) or not all(
        isinstance(m, str) and wire.MODEL_KEY.match(m) for m in models
    ):
        refuse("policy.size", f"the bundle's models {str(models)[:80]}: not a list of model keys")
    if len(set(models)) < len(models):
        refuse("policy.size", f"the bundle lists a model twice ({len(models)} entries)")
    if policy.require_dp and len(models) > DP_MODELS:
        refuse(
            "policy.max_scorings",
            f"a bundle of {len(models)} models: a site under DP scores at most {DP_MODELS} a "
            "request (query.bundle_evaluation scores every model of the bundle it keeps)",
        )
    arrays = request.get(wire.WEIGHTS_PREFIX + "bundle", {})
    networks = {k.rsplit("/", 1)[0] for k in arrays if str(k).startswith("fusion/")}
    if len(networks) > policy.max_networks:
        refuse(
            "policy.size",
            f"a bundle of {len(networks)} networks: this site scores at most "
            f"{policy.max_networks} a request (max_networks)",
        )


def fold_seed(policy: PolicySection, site_seed: int, ids: np.ndarray, folder: Path) -> int:
    """The seed of the site's fold assignment: with ``randomness = "secure"`` drawn once per
    cohort (the sorted patient ids' digest) from the OS's CSPRNG and kept in
    ``folder/fold-seeds.json``, so every run of the same cohort gets the same folds and no
    request can change them; with ``"seeded"`` derived from the site config's ``seed``."""
    if policy.randomness == "seeded":
        return int(np.random.SeedSequence([site_seed, 1]).generate_state(1)[0])
    cohort = hashlib.sha256("\n".join(sorted(map(str, ids))).encode()).hexdigest()
    path = Path(folder) / "fold-seeds.json"
    with exclusive(path):
        seeds = json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}
        if cohort not in seeds:
            seeds[cohort] = secrets.randbits(63)
            write_json(path, seeds)
    return int(seeds[cohort])


def private_seed(policy: PolicySection, seed: int, site_id: str, *keys: int) -> int:
    """The seed of a DP-SGD training's noise and sampling: fresh from the OS's CSPRNG with
    ``randomness = "secure"`` (the centre, which picks the request's ``seed``, cannot replay
    it); derived from ``seed``, the site and ``keys`` with ``"seeded"``. A secure seed is at
    least 2^62, so that it sets the whole state of DP-SGD's generators
    (``fedmets.client.privacy.seeded_generator``), never only a 32-bit seed."""
    if policy.randomness == "secure":
        return (1 << 62) | secrets.randbits(62)
    entropy = [seed, zlib.crc32(site_id.encode()), *keys]
    return int(np.random.SeedSequence(entropy).generate_state(1)[0] % 2**31)


LABEL_FIELDS = (
    "positives",
    "fold_positives",
    "label_products",
    "hist_pos",
    "val_hist_pos",
    "confusion",
    "brier_sum",
    "calibration",
    "train_loss_sum",
    "val_loss_sum",
    "base_loss_sum",
    "loss_increase_sum",
)
"""Reply fields (and families) that carry label counts, directly or through a sum of losses
or errors (a constant network's loss sum gives the positives): one statistic whatever the
route."""
FEATURE_FIELDS = (
    "radiomics_sum",
    "clinical_sum",
    "clinical_sumsq",
    "centred_sum",
    "cross_products",
    "label_products",
    "batch_covariate_sum",
    "batch_response_sum",
    "covariate_gram",
    "covariate_response",
    "residual_sumsq",
)
"""Reply fields that are sums of the patients' radiomics or clinical values (or their
squares and products): whatever the route, one such sum on one set can be subtracted from
another's (a covariance's centred sum plus n times the mean it was centred on is the moments'
radiomics sum; a ComBat batch's response sum is too)."""


def release_families(route_name: str, reply: Mapping[str, Any]) -> set[str]:
    """The statistics a reply releases, for the differencing guard: its route's own (a route
    computes the same statistic on whatever rows it is asked about), ``labels`` when it
    carries label counts and ``features`` when it carries sums of feature values (which every
    such route releases alike)."""
    families = {route_name}
    if any(key.split(":", 1)[0] in LABEL_FIELDS for key in reply):
        families.add("labels")
    if any(key in FEATURE_FIELDS for key in reply):
        families.add("features")
    return families


FEATURES = "features"
"""The family of every sum of feature values (:func:`release_families`)."""
SHARED_FAMILIES = frozenset({FEATURES, "labels"})
"""The statistics every release on the cohort or its folds is recorded as too
(:meth:`DifferencingGuard.admit_together`'s ``shared``): with crafted weights, a training
reply's weights, a loss sum or a Brier sum is a sum of feature values and a count of labels."""


def _digest(members: Sequence[str]) -> str:
    """The record's key of a patient set (its sorted ids)."""
    return hashlib.sha256("\n".join(members).encode()).hexdigest()


class DifferencingGuard:
    """The patient sets a site has released each statistic on (``folder/released-sets.json``,
    every run on the cohort, by :func:`release_families`), and the rule that a new release of
    a statistic is on the same set as each earlier release of it or on a set that differs from
    it by at least ``floor`` patients, and no linear combination of the statistic's sums over
    all its sets, earlier and new, is a sum over fewer than ``floor`` patients
    (``fedmets.client.combined_sets``: three sets no two of which are close can still
    isolate one patient). Not for a training route's weights, whose fitting rows (each
    fold's training rows less its inner-validation ones) combine with the cohort into a sum
    over the validation rows: as for pairs, they are not taken for feature sums, or a small
    site could not train outside DP (docs/privacy.md). Different statistics on overlapping
    sets cannot be subtracted from each other, so they are not compared. The site also gives
    the guard the sets that several releases together make known (a fold's training rows:
    the cohort and every held-out fold, ``SiteWorker._training_sets``)."""

    def __init__(self, folder: Path, floor: int) -> None:
        self.path = Path(folder) / "released-sets.json"
        self.floor = floor

    def _sets(self) -> dict[str, dict[str, list[str]]]:
        if not self.path.is_file():
            return {}
        return json.loads(self.path.read_text(encoding="utf-8"))

    def admit_together(
        self,
        sets: Sequence[np.ndarray],
        families: set[str],
        shared: Sequence[np.ndarray] = (),
        present: Sequence[np.ndarray] = (),
    ) -> str | None:
        """Record the patient sets (arrays of ids) of one reply for each of ``families`` and
        return None when they may be released on, else why not: each against the earlier
        releases and against the reply's other sets; all recorded, or none (a refused reply
        releases nothing, so it must not narrow later ones). ``shared``: sets (the cohort, its
        folds) that the reply makes known whatever statistic it is, recorded for
        :data:`SHARED_FAMILIES` too (a crafted network's weights or loss sums are feature sums
        and label counts, so a cohort one patient apart from one a moments or census reply was
        on must not get them). ``present``: for each pattern of missing radiomics values,
        the patients (ids) who have those columns: a feature sum over a set is one over its
        patients with the column (a missing value sits at the column's mean, which the site
        releases), so each set's share of each is a release of :data:`FEATURES` too, under
        a family of its own pattern. Processes answering at once (folds run in parallel)
        take turns on the record."""
        with exclusive(self.path):
            return self._admit_together(sets, families, shared=shared, present=present)

    def problem(self, sets: Sequence[np.ndarray], families: set[str]) -> str | None:
        """Why :meth:`admit_together` would refuse ``sets`` now (None: it would admit them),
        recording nothing."""
        with exclusive(self.path):
            return self._admit_together(sets, families, record=False)

    def _admit_together(
        self,
        sets: Sequence[np.ndarray],
        families: set[str],
        record: bool = True,
        shared: Sequence[np.ndarray] = (),
        present: Sequence[np.ndarray] = (),
    ) -> str | None:
        known = self._sets()
        pending: dict[str, list[str]] = {}
        where: dict[str, set[str]] = {}  # each pending set's families
        items = [(ids, set(families)) for ids in sets]
        items += [(ids, set(families) | SHARED_FAMILIES) for ids in shared]
        whole = len(items)  # the reply's own sets, compared with each other whatever family
        for having in present:  # each set's patients with a pattern's columns
            family = f"{FEATURES}@{_digest(sorted(map(str, having)))[:16]}"
            for ids, set_families in items[:whole]:
                kept = np.intersect1d(np.asarray(ids, dtype=str), np.asarray(having, dtype=str))
                if FEATURES in set_families and 0 < len(kept) < self.floor:
                    return (
                        f"{FEATURES}: {len(kept)} of the {len(ids)} patients have every "
                        f"column the sum is over (a missing value sits at the column's mean); "
                        f"the floor is {self.floor}"
                    )
                if FEATURES in set_families and len(kept):
                    items.append((kept, {family}))
        for number, (ids, set_families) in enumerate(items):
            members = sorted(map(str, ids))
            key = _digest(members)
            new = set(members)
            for family in sorted(set_families):
                # a pattern's share is compared within its family alone: against its own set
                # it differs by patients whose value is the column's public mean
                mates = {k: v for k, v in pending.items() if number < whole or family in where[k]}
                earlier = {**known.get(family, {}), **mates}
                for digest, other in earlier.items():
                    differ = len(new.symmetric_difference(other))
                    if digest != key and differ < self.floor:
                        return (
                            f"{family}: the {len(new)} patients differ by {differ} from a set "
                            f"this site already released it on ({len(other)} patients); the "
                            f"floor is {self.floor}"
                        )
            pending[key] = members
            where.setdefault(key, set()).update(set_families)
        for family in sorted(set().union(*where.values()) - set(TRAINING_ROUTES)):
            new_sets = [k for k in pending if family in where[k] and k not in known.get(family, {})]
            if not new_sets:
                continue
            combined = [*known.get(family, {}).values(), *(pending[k] for k in new_sets)]
            isolated = smallest_isolated(combined, self.floor)
            if isolated is not None:
                return (
                    f"{family}: with the sets this site already released it on, a combination "
                    f"of sums over them would be one over {isolated} patients; the floor is "
                    f"{self.floor}"
                )
        if not record or all(
            key in known.get(family, {}) for key in pending for family in where[key]
        ):
            return None
        for key, members in pending.items():
            for family in where[key]:
                known.setdefault(family, {})[key] = members
        write_json(self.path, known)
        return None


FOREST_SCALE_RANGE = 300.0
"""How far (in the column's own SD on the forest's rows) the centre's mean may lie from the
site's, and by what factor its scale may differ from the site's SD, before the site brings them
within (:func:`forest_standardisation`)."""


def forest_standardisation(
    values: np.ndarray, mean: np.ndarray, scale: np.ndarray
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The request's radiomics ``mean`` and ``scale`` (k,) for a forest on ``values`` (rows,
    k: the raw values of the rows it is fitted on), each brought within
    :data:`FOREST_SCALE_RANGE` of the column's own mean and SD on those rows (columns without
    two non-missing values or with SD 0 as sent). A forest sees its inputs only through their
    order, so an honest standardisation (the pooled mean and SD) changes nothing; but a
    crafted one makes the inputs' bound (``fedmets.client.scoring.INPUT_BOUND``) or float32
    rounding merge every value on one side of a threshold t, and then the importance of the
    column is 0 exactly when no patient is past t: bisecting t gives a patient's value. Within
    the range no input reaches the bound (a value lies at most sqrt(rows) SD from the mean:
    300 x (sqrt(rows) + 300) < 10^6 for fewer than 9 million rows) and float32 keeps values
    1e-4 SD apart distinct.

    Also the raw value (k,) a missing value takes: the column's own mean on the forest's rows
    (the request's mean where no value is present), never the request's. At the request's
    mean, the centre placed the patients with a missing value where it chose, and the forest
    changed exactly when that point crossed another patient's value: sliding it gave every
    value of the column (bisection, each to sklearn's 1e-7 SD tie threshold)."""
    values = np.asarray(values, dtype=np.float64)
    mean = np.asarray(mean, dtype=np.float64)
    scale = np.asarray(scale, dtype=np.float64)
    finite = np.isfinite(values)
    present = finite.sum(axis=0)
    centre = np.where(finite, values, 0.0).sum(axis=0) / np.maximum(present, 1)
    deviations = np.where(finite, values - centre, 0.0)
    sd = np.sqrt((deviations**2).sum(axis=0) / np.maximum(present, 1))
    own = (present >= 2) & (sd > 0)
    r = FOREST_SCALE_RANGE
    with np.errstate(all="ignore"):
        bounded_mean = np.clip(mean, centre - r * sd, centre + r * sd)
        bounded_scale = np.clip(scale, sd / r, sd * r)
    fill = np.where(present > 0, centre, mean)
    return np.where(own, bounded_mean, mean), np.where(own, bounded_scale, scale), fill


def missing_fill(values: np.ndarray, fallback: np.ndarray) -> np.ndarray:
    """The raw value (p,) a missing value of each column of ``values`` (rows, p: the rows a
    sum is over) takes in a sum of feature values: the column's own mean on those rows (the
    ``fallback``, the request's mean, where no value is present: every row then holds it).
    Never the request's mean: there, a missing value sat still while the centre moved every
    present one (centred on its mean), so two requests' cross-products differed by the sum
    of each other column over the patients a column is missing for (and the ComBat routes'
    covariate products by their clinical values): one patient's row where one lacked a
    value (docs/privacy.md)."""
    values = np.asarray(values, dtype=np.float64)
    finite = np.isfinite(values)
    present = finite.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        own = np.where(finite, values, 0.0).sum(axis=0) / present
    return np.where(present > 0, own, np.asarray(fallback, dtype=np.float64))


class ScoreGroups:
    """Patients sorted by score (whatever their labels) in consecutive groups of ``min_count``
    (``policy.min_bin_count``; a short last group joins the one before): the only form in which
    a score-and-label statistic leaves the site. Each group is known by its mean score and its
    class counts, so every statistic below is a sum over whole groups: one patient's label is
    never separable from its group's, whatever scores a crafted model gives (a network that
    scores one patient apart still lands it in a group of ``min_count``). The grouping depends
    on the scores only, never on the request's bins or thresholds, so two statistics of the
    same scores cannot be differenced into a smaller group.

    ``grid``: each group's mean is placed at the centre of its cell of ``grid`` equal cells of
    [0, 1] (what :func:`score_groups` does at a site with ``require_dp``): every statistic is
    then a function of the groups' class counts and cells (the confusion counts also of the
    thresholds of the folds their members are in), so a sum (Brier, a loss) says no more than
    a histogram on that grid (an exact sum over a group of patients whose scores the centre
    crafted gives the one score it does not know).

    ``mean`` (G,) the groups' mean scores, ``pos``/``neg`` (G,) int64 their DM+ / DM- counts,
    ``members`` the row indices of each group (site-side only). ValueError when a score is not
    finite (the request fails: a failure the run's ``max_failures`` counts)."""

    def __init__(
        self, y: np.ndarray, scores: np.ndarray, min_count: int, grid: int | None = None
    ) -> None:
        y = np.asarray(y).astype(bool)
        s = np.asarray(scores, dtype=float)
        if not np.isfinite(s).all():  # a crafted network's failure: no group holds it
            raise ValueError("the model's scores are not all finite")
        order = np.argsort(s, kind="stable")
        starts = list(range(0, len(s), max(min_count, 1)))
        if len(starts) > 1 and len(s) - starts[-1] < min_count:
            starts.pop()  # a short last group joins the one before
        self.members = [order[a:b] for a, b in zip(starts, [*starts[1:], len(s)], strict=True)]
        self.mean = np.array([s[m].mean() for m in self.members], dtype=float)
        if grid is not None:
            self.mean = (np.minimum(np.floor(self.mean * grid), grid - 1) + 0.5) / grid
        self.pos = np.array([y[m].sum() for m in self.members], dtype=np.int64)
        self.neg = np.array([len(m) for m in self.members], dtype=np.int64) - self.pos
        self.size = len(s)

    def histograms(self, bins: int) -> tuple[np.ndarray, np.ndarray]:
        """Class-conditional counts (bins,) int64 over ``bins`` equal-width bins of [0, 1],
        each group's counts in the bin of its mean score: every non-empty bin holds at least
        ``min_count`` patients, and a finer grid places a group more precisely but never
        splits it."""
        where = np.minimum((self.mean * bins).astype(int), bins - 1)
        return np.bincount(where, self.pos, bins).astype(np.int64), np.bincount(
            where, self.neg, bins
        ).astype(np.int64)

    def confusion(self, thresholds: float | np.ndarray) -> np.ndarray:
        """(TP, FN, TN, FP) int64 with each group called DM+ as a whole when its mean score
        reaches its threshold: ``thresholds`` one number, or (n,) one per patient (each
        fold's own), a group's being its members' mean."""
        t = np.broadcast_to(np.asarray(thresholds, dtype=float), (self.size,))
        called = self.mean >= np.array([t[m].mean() for m in self.members])
        return np.array(
            [
                self.pos[called].sum(),
                self.pos[~called].sum(),
                self.neg[~called].sum(),
                self.neg[called].sum(),
            ],
            dtype=np.int64,
        )

    def brier_sum(self) -> float:
        """Summed squared error with each patient at its group's mean score."""
        m = self.mean
        return float((self.pos * (1 - m) ** 2 + self.neg * m**2).sum())

    def loss_sum(self, pos_weight: float) -> float:
        """Summed weighted binary cross-entropy (DM+ terms times ``pos_weight``, scores clipped
        to [1e-7, 1 - 1e-7] as in training) with each patient at its group's mean score."""
        m = np.clip(self.mean, 1e-7, 1 - 1e-7)
        return float(-(pos_weight * self.pos * np.log(m) + self.neg * np.log1p(-m)).sum())

    def calibration(self) -> tuple[float, float] | None:
        """Calibration slope and intercept (``calibration_slope_intercept``) fitted on the
        groups: each patient at its group's mean score. None with one class."""
        from fedmets.shared.metrics import calibration_slope_intercept  # scikit-learn

        return calibration_slope_intercept(
            np.r_[np.ones(len(self.mean)), np.zeros(len(self.mean))],
            np.r_[self.mean, self.mean],
            weights=np.r_[self.pos, self.neg],
        )


def score_groups(y: np.ndarray, scores: np.ndarray, policy: PolicySection) -> ScoreGroups:
    """Labels ``y`` (n,) and scores (n,) in ``policy``'s groups of ``min_bin_count`` patients
    by score, the form every score-and-label statistic leaves in; at a site with
    ``require_dp`` each group at the centre of its cell of the ``max_bins`` grid."""
    grid = policy.max_bins if policy.require_dp else None
    return ScoreGroups(y, scores, policy.min_bin_count, grid)


def suppressed_groups(
    sizes: Mapping[str, int], floor: int, withheld: Sequence[str] = ()
) -> set[str]:
    """Groups (name -> patients) to leave out: those under ``floor`` and those ``withheld``
    (by the differencing guard), then the smallest of the rest, one at a time, while the
    suppressed patients number between 1 and ``floor`` - 1 (complementary suppression: the
    whole minus the released groups is then no small set)."""
    out = {g for g, n in sizes.items() if n < floor} | set(withheld)
    rest = sorted((n, g) for g, n in sizes.items() if g not in out)
    while 0 < sum(sizes[g] for g in out) < floor and rest:
        out.add(rest.pop(0)[1])
    return out
