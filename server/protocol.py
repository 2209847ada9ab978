"""The federated protocol, driven from the server: census, folds, per fold federated selection,
FedAvg training of the image model and of the fusion networks, thresholds, and the pooled
evaluation from histograms.

The protocol talks to the sites through a :class:`SiteLink` (``ask(route, requests)``), so the
same code runs over Flower (``fedmets.server.server_app``) and in process (the simulation's
centralised and local-only baselines). Every request and reply is a ``fedmets.shared.wire`` payload.

Per fold ``f`` (the sites' own stratified folds; training rows = every other fold):

0. with ``[harmonisation] method = "combat"``: ``query.combat_statistics``,
   ``query.combat_variance``, ``query.combat_apply`` -> every site's radiomics harmonised
   for the fold (federated ComBat, ``fedmets.shared.harmonisation``), read by every later step;
1. ``query.moments`` -> pooled radiomics means (over non-missing values) and clinical means/SDs;
2. ``query.covariance`` (centred at those means, missing values at the mean) -> the pooled
   covariance: constant columns dropped, then ``fedmets.shared.selection.correlation_filter`` on the
   pooled correlation -- exactly the filter of the pooled training rows;
3. ranking (``[selection] ranking``): ``query.importance`` -> random-forest importances per
   site, averaged weighted by training patients (with ``"stability"`` ranked by how often the
   sites' forests on random halves put a column in their top k); or |r| with the label from
   the covariance replies' label products (exactly the pooled correlation) -> the ``top_k``
   columns (how alike the folds' sets are: ``selection_stability``);
4. image model (image mode): ``image_rounds`` rounds of ``train.image`` + aggregation +
   ``query.validate`` on the sites' inner validation rows; the round with the lowest pooled
   validation loss is kept; ``query.deep_features`` -> pooled deep-feature means/SDs and
   PCA (under sample-level DP the sites release none: the features enter unscaled);
5. fusion: one network per feature-group subset (the ablations), ``fusion_rounds`` rounds of
   ``train.fusion`` + aggregation + validation, best round kept per network (the highest pooled
   validation AUC from the sites' validation-score histograms with ``[model] fusion_monitor =
   "auc"``, else the lowest loss; under DP: no validation, the last round's network, trained on
   all the training rows);
6. ``query.train_scores`` -> pooled training-score histograms -> Youden threshold per network.

Finally ``query.evaluation`` returns each site's out-of-fold histograms, confusion counts at
each fold's threshold and Brier sums: pooled, per-site and per-subsite metrics follow.

With ``[strategy] secure_aggregation`` and a link that can (``link.secure_aggregation``: the
Flower link), every training round goes through SecAgg+ (``fedmets.server.secure_aggregation``): the
server receives only the weighted average of the sites' updates and of their training-loss sums
per patient, and aggregates it as it would the sites' replies. A link that cannot (the in-process
link of the centralised and local-only baselines) aggregates in clear, and says so.
"""

from __future__ import annotations

import contextlib
import json
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from fedmets.server.aggregation import Aggregator
from fedmets.server.checkpoints import check_config, load_checkpoint, save_checkpoint
from fedmets.server.privacy import ClientLevelDP, privacy_report, summary_from_reply
from fedmets.server.secure_aggregation import max_weight
from fedmets.shared import wire
from fedmets.shared.clinical import CLINICAL_COLUMNS, encoded_columns
from fedmets.shared.config import FederationConfig
from fedmets.shared.harmonisation import fit_location, pooled_variance
from fedmets.shared.identity import identity_problem, new_challenge
from fedmets.shared.image_presets import DP_SGD_BACKBONES, IMAGE_PRESETS, ImageModelConfig
from fedmets.shared.metrics import (
    auc_ci_from_histograms,
    calibration_from_histograms,
    metrics_from_histograms,
    roc_from_histograms,
    youden_from_histograms,
)
from fedmets.shared.model_names import network_dims, network_hidden
from fedmets.shared.models import FusionNet, input_blocks
from fedmets.shared.reproducibility import set_seed
from fedmets.shared.run_plan import (
    IMPORTANCE_REPEATS,
    main_candidates,
    main_model,
    planned_models,
    planned_networks,
)
from fedmets.shared.selection import correlation_filter, correlation_from_sums

IMAGE = "image"
CENSUS_FIELDS = frozenset(
    {
        "site_id",
        "protocol",
        "mode",
        "n",
        "radiomics_columns",
        "radiomics_names",
        "clinical_columns",
        "has_images",
        "schema_hash",
        "params_hash",
        "folds",
        "randomness",
    }
)
"""What every site's census reply holds (its positives may be withheld)."""
Payload = dict[str, Any]
GLOBAL_RNG = threading.Lock()
"""Held while the global generators are seeded and drawn from (initial weights): the protocols
of folds run at once (``fedmets.server.fold_lanes``) share one process."""


class ProtocolError(RuntimeError):
    """The run cannot go on: sites disagree, too few answered, nothing to train on."""


class SiteLink(Protocol):
    """How the protocol reaches the sites."""

    def sites(self) -> list[str]:
        """The ids of the sites currently taking part."""
        ...

    def ask(self, route: str, requests: Mapping[str, Payload]) -> dict[str, Payload]:
        """Send ``requests[site]`` on ``route`` to each site; the replies of the sites that
        answered in time (missing ones are dropouts, recorded by the protocol)."""
        ...

    def rename(self, names: Mapping[str, str]) -> None:
        """Call the sites by the ids their census gave (``old key -> site id``)."""
        ...

    def refuse(self, key: str) -> None:
        """Leave the site (or node) ``key`` out of the run: its census did not prove its id."""
        ...

    # Links that can run a training round through SecAgg+ set ``secure_aggregation = True``
    # and have ``ask_secure(route, requests, weight_cap, round_id) ->
    # fedmets.server.secure_aggregation.SecureRound``; a link without the attribute cannot.
    # Links whose message rounds cost time (Flower) set ``batch_validation = True`` and have
    # ``ask_batch`` (``fedmets.server.fold_lanes.BatchLink``): a training round's validation
    # then goes with the next round's training, in one message per site.


@dataclass(frozen=True)
class CensusTaken:
    """What a run's ``query.census`` and ``query.folds`` found (its training sites' census
    replies, its held-out sites', each site's fold sizes), for the protocols of its folds run
    at once over the same link: they ask neither again."""

    census: dict[str, Payload]
    held_out: dict[str, Payload]
    fold_sizes: dict[str, np.ndarray]


FoldRunner = Callable[[Sequence[int], CensusTaken], dict[int, dict]]
"""Runs the given cross-validation folds elsewhere, at once (each a protocol of the same config,
run name and checkpoints folder calling :meth:`FederatedProtocol.run_folds`, given the run's
census where it asks over the run's own link); returns what ``run_folds`` returns for each."""


def merged_dropouts(record: list[dict], saved: Sequence[dict]) -> list[dict]:
    """``record``, then the dropouts of a checkpoint's ``saved`` list that it lacks (each as
    often as ``saved`` holds it beyond ``record``). A checkpoint saves the whole list of the
    protocol that made it: for folds one after another ``record`` is its start (the result is
    ``saved``); folds run at once (``fedmets.server.fold_lanes``) each saved their own, which
    add up."""
    have = Counter(map(_dropout_key, record))
    merged = list(record)
    for dropout in saved:
        key = _dropout_key(dropout)
        if have[key]:
            have[key] -= 1
        else:
            merged.append(dropout)
    return merged


def _dropout_key(dropout: Mapping[str, Any]) -> str:
    """A dropout as its checkpoint holds it (numpy numbers as plain ones)."""
    return json.dumps(dropout, sort_keys=True, default=lambda v: v.item())


@dataclass
class RunRecord:
    """What the run did, for the report: census, folds, selection, training curves, thresholds,
    dropouts, timing."""

    census: dict[str, Payload] = field(default_factory=dict)
    held_out: dict[str, Payload] = field(default_factory=dict)  # census of held-out sites
    folds: list[dict] = field(default_factory=list)
    dropouts: list[dict] = field(default_factory=list)
    timing_s: dict[str, float] = field(default_factory=dict)


def census_request(cfg: FederationConfig) -> Payload:
    """A census request: the protocol version, a fresh challenge for the sites to sign
    (``fedmets.shared.identity``), the run config's fingerprint (for the sites' approval)."""
    return {
        "protocol": wire.PROTOCOL_VERSION,
        "challenge": new_challenge(),
        "config_sha256": cfg.fingerprint(),
    }


class FederatedProtocol:
    """Runs the protocol of ``cfg`` over ``link``; ``log`` receives progress lines."""

    def __init__(
        self,
        link: SiteLink,
        cfg: FederationConfig,
        run: str,
        log: Callable[[str], None] | None = None,
        checkpoints: Path | None = None,
        privacy_dir: Path | None = None,
        fold_runner: FoldRunner | None = None,
    ) -> None:
        """``checkpoints``: a folder where every finished step (and every training round) is
        saved; a protocol given a folder that already holds some resumes after the last one.
        ``privacy_dir``: the server's privacy ledger under client-level DP (default: a fresh
        temporary folder). ``fold_runner``: runs the folds elsewhere, at once, into
        ``checkpoints`` (:data:`FoldRunner`); this protocol then resumes each fold from them."""
        if fold_runner is not None and checkpoints is None:
            raise ValueError("a fold_runner needs a checkpoints folder to hand the folds over")
        if fold_runner is not None and cfg.dp.mode != "off":
            raise ValueError(
                f"dp.mode {cfg.dp.mode!r}: folds run at once would each spend the budget on "
                "their own ledger; run them in sequence"
            )
        self.link = link
        self.cfg = cfg
        self.run = run
        self.say = log or (lambda message: None)
        self.record = RunRecord()
        self.base = {"run": run, "min_patients": cfg.federation.min_patients}
        self.checkpoints = Path(checkpoints) if checkpoints else None
        if self.checkpoints:
            self.checkpoints.mkdir(parents=True, exist_ok=True)
            check_config(self.checkpoints, cfg.model_dump(mode="json"))
        self.privacy_dir = privacy_dir
        self.client_dp: ClientLevelDP | None = None
        self.dp_request: Payload = {"dp_mode": "off"}
        self.secure = cfg.strategy.secure_aggregation and getattr(link, "secure_aggregation", False)
        self.secure_rounds = 0
        self.held_out: list[str] = []  # [federation] held_out sites present at the census
        self.fold_sizes: dict[str, np.ndarray] = {}  # site -> patients per fold (query.folds)
        self.candidates: list[str] = []  # the main model's variant networks ([model] main_*)
        self.fold_runner = fold_runner

    # ---- checkpoints ---------------------------------------------------------------------------

    def _load(self, key: str) -> Any:
        """The checkpoint ``key`` (and the run record saved with it), or None."""
        path = self.checkpoints / f"{key}.npz" if self.checkpoints else None
        if path is None or not path.is_file():
            return None
        saved = load_checkpoint(path)
        self.record.dropouts = merged_dropouts(self.record.dropouts, saved["dropouts"])
        return saved["value"]

    def _save(self, key: str, value: Any) -> None:
        if self.checkpoints is not None:
            path = self.checkpoints / f"{key}.npz"
            save_checkpoint(path, {"value": value, "dropouts": self.record.dropouts})

    def _step(self, key: str, compute: Callable[[], Any]) -> Any:
        """``compute()``, or its checkpointed result when resuming. Its seconds add up in
        ``timing_s`` under the stage's name (``fold3-image`` -> ``image``)."""
        saved = self._load(key)
        if saved is not None:
            self.say(f"  resumed {key} from its checkpoint")
            return saved
        tic = time.perf_counter()
        value = compute()
        stage = key.split("-", 1)[-1]
        spent = self.record.timing_s.get(stage, 0.0) + time.perf_counter() - tic
        self.record.timing_s[stage] = round(spent, 1)
        self._save(key, value)
        return value

    # ---- messaging -----------------------------------------------------------------------------

    def _ask(
        self,
        route: str,
        payload: Payload | Mapping[str, Payload],
        only: Sequence[str] | None = None,
        **where: Any,
    ) -> dict:
        """Ask every training site (not the held-out ones), or those of ``only`` (the same
        ``payload``, or per-site payloads keyed by site id); record dropouts; ProtocolError
        when fewer than ``min_sites`` answered."""
        sites = self._asked_sites(only)
        requests = self._requests(sites, payload)
        return self._checked(route, sites, requests, self.link.ask(route, requests), where)

    def _ask_together(self, asks: Sequence[tuple[str, Payload, dict]]) -> list[dict]:
        """Each ``(route, payload, where)`` of ``asks`` to every training site, all of them in
        one message per site (the link's ``ask_batch``; each item gated at the site as if it
        came alone): per ask, what :meth:`_ask` would return."""
        sites = self._asked_sites(None)
        asked = [(route, self._requests(sites, payload), where) for route, payload, where in asks]
        back = self.link.ask_batch({s: [(route, r[s]) for route, r, _ in asked] for s in sites})
        results = []
        for i, (route, sent, where) in enumerate(asked):
            replies = {s: got[i] for s, got in back.items() if got[i] is not None}
            results.append(self._checked(route, sites, sent, replies, where))
        return results

    def _asked_sites(self, only: Sequence[str] | None) -> list[str]:
        """The sites a request goes to: those of ``only``, else every training site."""
        return [
            s
            for s in self.link.sites()
            if (s in only if only is not None else s not in self.held_out)
        ]

    def _requests(
        self, sites: list[str], payload: Payload | Mapping[str, Payload]
    ) -> dict[str, Payload]:
        """Each site's request: the run's base fields and ``payload`` (or its own, when
        ``payload`` holds one per site)."""
        per_site = payload if set(payload) == set(sites) and sites else None
        return {s: {**self.base, **(per_site[s] if per_site else payload)} for s in sites}

    def _checked(
        self,
        route: str,
        sites: list[str],
        requests: dict[str, Payload],
        replies: dict[str, Payload],
        where: dict,
    ) -> dict:
        """``replies`` to ``requests`` less the unusable ones; the sites that did not answer
        or sent an unusable reply recorded as dropouts; ProtocolError when fewer than
        ``min_sites`` are left."""
        for site in sorted(set(sites) - set(replies)):
            self.record.dropouts.append({"route": route, "site": site, **where})
            self.say(f"  site {site} did not answer {route} {where or ''}: dropped")
        for site in sorted(replies):
            problems = wire.received_problems(
                route, replies[site], requests[site], self.cfg.federation.min_patients
            )
            census = self.record.census.get(site, {}).get("n")
            count = replies[site].get("n")
            trained = route.startswith("train.")  # n bounded by its rows: _valid_updates
            if not trained and census is not None and isinstance(count, int) and count > census:
                problems.append(f"n: {count} patients, more than its census {census}")
            if problems:
                del replies[site]
                self.record.dropouts.append(
                    {"route": route, "site": site, **where, "rule": "reply"}
                )
                self.say(
                    f"  site {site} left out of {route} {where or ''}: its reply is not usable: "
                    + "; ".join(problems[:3])
                )
        if len(replies) < self.cfg.federation.min_sites:
            raise ProtocolError(
                f"{route}: {len(replies)} of {len(sites)} sites answered "
                f"({', '.join(sorted(replies)) or 'none'}); min_sites is "
                f"{self.cfg.federation.min_sites}"
            )
        return replies

    def _ask_secure(self, route: str, payload: Payload, **where: Any) -> tuple[dict, list[str]]:
        """A training round through SecAgg+: ``({"secure sum": the average as one reply},
        the sites that trained)``; dropouts recorded with the SecAgg+ stage they were lost
        in; ProtocolError when the round stopped or fewer than ``min_sites`` took part."""
        sites = [s for s in self.link.sites() if s not in self.held_out]
        requests = {s: {**self.base, **payload} for s in sites}
        largest = max((c["n"] for c in self.record.census.values()), default=1)
        self.secure_rounds += 1
        outcome = self.link.ask_secure(
            route, requests, weight_cap=max_weight(largest), round_id=self.secure_rounds
        )
        missing = outcome.lost if outcome.aggregate is None else set(sites) - set(outcome.weights)
        for site in sorted(missing):
            stage = outcome.lost.get(site, "offline")
            self.record.dropouts.append({"route": route, "site": site, **where, "secagg": stage})
            self.say(f"  site {site} dropped out of secure {route} ({stage}) {where}")
        if outcome.aggregate is None:
            raise ProtocolError(f"{route}: secure aggregation stopped {where}: {outcome.halted}")
        if len(outcome.weights) < self.cfg.federation.min_sites:
            raise ProtocolError(
                f"{route}: {len(outcome.weights)} of {len(sites)} sites answered "
                f"({', '.join(sorted(outcome.weights))}); min_sites is "
                f"{self.cfg.federation.min_sites}"
            )
        trained = sorted(s for s, w in outcome.weights.items() if w > 0)
        return {"secure sum": outcome.aggregate}, trained

    # ---- the run -------------------------------------------------------------------------------

    def _prepare(
        self, taken: CensusTaken | None = None
    ) -> tuple[bool, str | None, list[str], list[str]]:
        """The census (``taken``: the run's, not asked again), then what every fold trains:
        (images, backbone, models, networks); the sites' folds drawn and the privacy plan
        made."""
        if self.cfg.strategy.secure_aggregation and not self.secure:
            self.say(
                f"secure_aggregation: {type(self.link).__name__} cannot run SecAgg+; the "
                "training rounds are aggregated in clear"
            )
        census = self.census() if taken is None else self._adopt(taken)
        images = self.cfg.stages.image and all(c["has_images"] for c in census.values())
        clinical = all(c["clinical_columns"] > 0 for c in census.values())
        backbone = self.cfg.model.backbone if images else None
        models = planned_models(self.cfg, images, clinical)
        if self.cfg.dp.mode != "off" and not self.cfg.dp.ablation:
            self.say(
                f"dp.mode {self.cfg.dp.mode!r}: the main model {models[0]} alone is trained "
                "(each ablation network would spend the same patients' budget; dp.ablation)"
            )
        networks = planned_networks(self.cfg, models)
        self.candidates = main_candidates(self.cfg, main_model(models))
        if self.candidates:
            self.say(
                f"main model {main_model(models)}: its network chosen per fold among "
                f"{self.candidates}"
            )
        if taken is None:
            self.folds()
        self._plan_privacy(images, len(networks))
        return images, backbone, models, networks

    def _adopt(self, taken: CensusTaken) -> dict[str, Payload]:
        """The run's census and fold sizes as this protocol's own (its link already knows the
        sites by their proven ids, and has left out those the census refused)."""
        self.record.census = dict(taken.census)
        self.record.held_out = dict(taken.held_out)
        self.held_out = sorted(taken.held_out)
        self.fold_sizes = dict(taken.fold_sizes)
        return self.record.census

    def census_taken(self) -> CensusTaken:
        """This protocol's census and fold sizes (after its :meth:`census` and :meth:`folds`)."""
        return CensusTaken(self.record.census, self.record.held_out, self.fold_sizes)

    @contextlib.contextmanager
    def _muted(self) -> Iterator[None]:
        """No progress lines inside the block."""
        say, self.say = self.say, lambda message: None
        try:
            yield
        finally:
            self.say = say

    def run_folds(self, folds: Sequence[int], taken: CensusTaken | None = None) -> dict[int, dict]:
        """Only the cross-validation folds ``folds`` (after the census, or with the run's:
        ``taken``), each to the end of its steps, saved in the checkpoints folder: a
        :data:`FoldRunner`'s work. Returns per fold ``seconds`` and ``timing_s`` (seconds per
        stage)."""
        with self._muted():  # the parent protocol has said it all
            images, _, models, networks = self._prepare(taken)
        done = {}
        for fold in folds:
            self.record.timing_s = {}
            tic = time.perf_counter()
            self.run_fold(fold, models, networks, images)
            done[fold] = {
                "seconds": round(time.perf_counter() - tic, 1),
                "timing_s": dict(self.record.timing_s),
            }
        return done

    def run_all(self) -> dict:
        """The whole protocol; returns the results (``models``: per model pooled, per-site
        and per-subsite metrics) with the run record."""
        started = time.perf_counter()
        images, backbone, models, networks = self._prepare()
        thresholds = {m: np.full(self.cfg.cv.folds, np.nan) for m in models}
        folds = range(self.cfg.cv.folds)
        elsewhere = self.fold_runner(folds, self.census_taken()) if self.fold_runner else {}
        for ran in elsewhere.values():
            for stage, seconds in ran["timing_s"].items():
                spent = self.record.timing_s.get(stage, 0.0) + seconds
                self.record.timing_s[stage] = round(spent, 1)
        for fold in range(self.cfg.cv.folds):
            tic = time.perf_counter()
            with self._muted() if fold in elsewhere else contextlib.nullcontext():
                fold_record = self.run_fold(fold, models, networks, images)  # resumed
            for m, t in fold_record["thresholds"].items():
                thresholds[m][fold] = t
            here = round(time.perf_counter() - tic, 1)
            fold_record["seconds"] = elsewhere[fold]["seconds"] if fold in elsewhere else here
            self.record.folds.append(fold_record)
        results = self.evaluate(thresholds)
        final = None
        if self.cfg.stages.final_model and self.cfg.dp.mode != "off":
            self.say("final model: not trained under DP (its releases are not in the plan)")
        elif self.cfg.stages.final_model:
            final = self.final_model(models, networks, images)
        importance = _mean_importance([f["importance"] for f in self.record.folds])
        ledgers = self._ask("query.ledger", {})
        privacy = privacy_report(
            {s: summary_from_reply(r) for s, r in ledgers.items() if "epsilon" in r},
            server=self.client_dp.ledger.summary() if self.client_dp else None,
        )
        privacy["mode"] = self.cfg.dp.mode
        self.record.timing_s["total"] = round(time.perf_counter() - started, 1)
        return {
            "importance": importance,
            "privacy": privacy,
            "run": self.run,
            "models": results,
            "main_model": main_model(models),
            "backbone": backbone,
            "census": self.record.census,
            "folds": self.record.folds,
            "selection_stability": selection_stability(
                [f["selection"]["selected"] for f in self.record.folds]
            ),
            "dropouts": self.record.dropouts,
            "secure_aggregation": self.secure,
            "timing_s": self.record.timing_s,
            "final": final,
        }

    def _plan_privacy(self, images: bool, networks: int) -> None:
        """The DP settings every training request carries, and the server's client-level
        mechanism. Sample-level: the sites plan their DP-SGD noise so that all of a stage's
        trainings over every fold end at the stage's epsilon (half of ``[dp] epsilon`` each
        with an image stage: the two compose to at most the whole). Client-level: the noise
        is planned so that every aggregation of the run ends at ``[dp] epsilon``."""
        dp, folds, stages = self.cfg.dp, self.cfg.cv.folds, self.cfg.stages
        if dp.mode == "off":
            return
        trainings = folds if dp.epsilon_scope == "run" else 1  # planned to reach epsilon
        self.dp_request = {"dp_mode": dp.mode, "max_grad_norm": dp.max_grad_norm}
        if dp.mode == "sample":
            if images and self.cfg.model.backbone not in DP_SGD_BACKBONES:
                raise ValueError(
                    f"dp.mode 'sample' trains the image model with DP-SGD, which needs "
                    f"model.backbone in {DP_SGD_BACKBONES}, not {self.cfg.model.backbone!r}: "
                    "Opacus computes per-sample gradients layer by layer, and Swin's window "
                    "attention runs its layers on windows folded into the batch axis (or "
                    "set stages.image = false)"
                )
            self.dp_request["dp_epsilon"] = dp.epsilon / 2 if images else dp.epsilon
            self.dp_releases = {
                IMAGE: trainings * stages.image_rounds,
                "fusion": trainings * stages.fusion_rounds * networks,
            }
            return
        releases = trainings * (
            (stages.image_rounds if images else 0) + stages.fusion_rounds * networks
        )
        ledger_dir = self.privacy_dir or Path(tempfile.mkdtemp(prefix="fedmets-privacy-"))
        self.client_dp = ClientLevelDP.for_target(
            dp.epsilon,
            releases,
            dp.max_grad_norm,
            dp.delta,
            ledger_dir,
            seed=self.cfg.run.seed,
            repeats=folds // trainings,
        )
        self.say(
            f"client-level DP: noise multiplier {self.client_dp.noise_multiplier:.3f} over "
            f"{releases} aggregations for epsilon {dp.epsilon} (delta {dp.delta})"
        )

    def census(self) -> dict[str, Payload]:
        """Ask every site for its counts and hashes; leave out a node whose signature does not
        prove the site id it claims (``[federation] identities``); refuse a run whose sites
        disagree."""
        request = census_request(self.cfg)
        challenge = request["challenge"]
        replies = self._ask("query.census", request)
        for key in sorted(replies):
            missing = sorted(CENSUS_FIELDS - set(replies[key]))
            if missing:
                self.say(f"  site {key} left out of query.census: it lacks {', '.join(missing)}")
                self.record.dropouts.append(
                    {"route": "query.census", "site": key, "rule": "reply", "missing": missing}
                )
                del replies[key]
        unusable = {d["site"] for d in self.record.dropouts if d.get("rule") == "reply"}
        for key in sorted(unusable & set(self.link.sites())):  # not asked again in this run
            self.link.refuse(key)
        identities = self.cfg.federation.identities
        for key in sorted(replies) if identities else []:
            problem = identity_problem(identities, self.run, challenge, replies[key])
            if problem:
                self.say(f"  {key} refused: it {problem}")
                self.record.dropouts.append(
                    {"route": "query.census", "site": key, "refused": problem}
                )
                self.link.refuse(key)
                del replies[key]
        if len(replies) < self.cfg.federation.min_sites:
            raise ProtocolError(
                f"query.census: {len(replies)} answering site(s) proved their ids "
                f"({', '.join(sorted(r['site_id'] for r in replies.values())) or 'none'}); "
                f"min_sites is {self.cfg.federation.min_sites}"
            )
        for site, reply in replies.items():
            if reply["protocol"] != wire.PROTOCOL_VERSION:
                raise ProtocolError(
                    f"site {site} speaks protocol {reply['protocol']}, the server "
                    f"{wire.PROTOCOL_VERSION}: update fedmets at that site"
                )
        names = {key: reply["site_id"] for key, reply in replies.items()}
        if len(set(names.values())) < len(names):
            raise ProtocolError(f"two SuperNodes claim the same site id: {sorted(names.values())}")
        self.link.rename(names)
        replies = {names[key]: reply for key, reply in replies.items()}
        reference = min(replies)
        for key, what in (
            ("schema_hash", "feature schema (radiomics and clinical columns)"),
            ("params_hash", "extraction settings (radiomics parameters, margin, preprocessing)"),
            ("mode", "data mode"),
        ):
            differing = sorted(s for s in replies if replies[s][key] != replies[reference][key])
            if differing:
                raise ProtocolError(
                    f"sites {', '.join(differing)} differ from {reference} in their {what}: "
                    f"{key} {replies[differing[0]][key]!s:.16} vs "
                    f"{replies[reference][key]!s:.16}; extract every site with the same "
                    f"fedmets version and settings"
                )
        self.held_out = sorted(s for s in replies if s in self.cfg.federation.held_out)
        if self.held_out:  # they check the schema with the others, and train nothing
            self.record.held_out = {s: replies.pop(s) for s in self.held_out}
            self.say(f"held out, to evaluate the final model only: {', '.join(self.held_out)}")
        if len(replies) < self.cfg.federation.min_sites:
            raise ProtocolError(
                f"{len(replies)} training sites besides the held-out ones; min_sites is "
                f"{self.cfg.federation.min_sites}"
            )
        other_folds = sorted(s for s, r in replies.items() if r["folds"] != self.cfg.cv.folds)
        if other_folds:
            raise ProtocolError(
                f"sites {', '.join(other_folds)} cross-validate with "
                f"{replies[other_folds[0]]['folds']} folds ([policy] folds), the run with "
                f"{self.cfg.cv.folds} ([cv] folds): the folds are each site's own"
            )
        self.record.census = replies
        total = sum(r["n"] for r in replies.values())
        sizes = ", ".join(f"{s} {r['n']}" for s, r in sorted(replies.items()))
        held = sorted(s for s, r in replies.items() if "positives" not in r)
        positives = sum(r.get("positives", 0) for r in replies.values())
        self.say(
            f"census: {len(replies)} sites, {total} patients, {positives} DM+"
            f"{' (not counting ' + ', '.join(held) + ')' if held else ''} ({sizes})"
        )
        seeded = sorted(s for s, r in replies.items() if r["randomness"] == "seeded")
        if seeded:
            self.say(
                f"sites {', '.join(seeded)} draw folds and DP noise from their config seed "
                "(policy randomness 'seeded': for simulations and tests)"
            )
        return replies

    def folds(self) -> None:
        """Each site's fold sizes (kept: a training reply counts at most the patients outside
        its fold); ProtocolError for a site whose folds do not add up to its census count."""
        replies = self._ask("query.folds", {"folds": self.cfg.cv.folds})
        for site, reply in sorted(replies.items()):
            sizes = np.asarray(reply["fold_sizes"], dtype=int)
            census = self.record.census[site]["n"]
            if sizes.sum() != census or len(sizes) != self.cfg.cv.folds:
                raise ProtocolError(
                    f"site {site}: its {len(sizes)} folds hold {sizes.sum()} patients, its "
                    f"census {census} in {self.cfg.cv.folds} folds; restart that site"
                )
            self.fold_sizes[site] = sizes
            self.say(f"folds: {site} sizes {sizes.tolist()}")

    def run_fold(self, fold: int, models: list[str], networks: list[str], images: bool) -> dict:
        """One fold: :meth:`fit` on its training rows, then the main model's permutation
        importance on its held-out rows (None under late fusion, where the main model is no
        network). Returns the fold's record."""
        self.say(f"fold {fold + 1}/{self.cfg.cv.folds}: selection")
        record, fitted = self.fit(fold, models, networks, images)
        main = record.get("main_network", main_model(models))
        if main not in fitted["fusion"]:
            record["importance"] = None
            return record
        record["importance"] = self._step(
            f"fold{fold}-importance",
            lambda: self.permutation_importance(
                fold,
                main,
                fitted["fusion"][main],
                fitted["dims"],
                fitted["standardise"],
                record["pos_weight"],
            ),
        )
        return record

    def final_model(self, models: list[str], networks: list[str], images: bool) -> dict:
        """The final model: :meth:`fit` on every patient of every site (``wire.FINAL_FOLD``),
        each network (and the image model) trained for the median of the rounds the folds
        chose, nothing validated. Returns its record and what it fitted (``standardise``,
        ``image`` and ``fusion`` weights, ``dims``), for the model bundle."""
        self.say("final model: every patient of every site")
        rounds = {
            name: max(1, int(round(float(np.median([r["best_round"] for r in chosen])))))
            for name, chosen in _chosen_rounds(self.record.folds).items()
        }
        if self.candidates:
            auc = self.cfg.model.fusion_monitor == "auc"
            kept = _most_chosen(self.record.folds, self.candidates, higher_is_better=auc)
            networks = [n for n in networks if n not in self.candidates or n == kept]
            self.say(f"  main model's network: {kept} (chosen in most folds)")
        record, fitted = self.fit(wire.FINAL_FOLD, models, networks, images, rounds)
        return {"record": record, "rounds": rounds, **fitted}

    def fit(
        self,
        fold: int,
        models: list[str],
        networks: list[str],
        images: bool,
        rounds: dict[str, int] | None = None,
    ) -> tuple[dict, dict]:
        """Everything fitted on a fold's training rows: selection, the image model,
        deep-feature statistics, the fusion ``networks`` (``fedmets.shared.model_names.
        fusion_networks``) and the thresholds of the ``models`` they make. ``rounds``
        (network or ``"image"`` -> rounds): train each that long and keep its last round,
        unvalidated (the final model); else each keeps its best validated round. Returns
        (the record, {``combat``, ``standardise``, ``image``, ``fusion``, ``dims``})."""
        prefix = "final" if fold == wire.FINAL_FOLD else f"fold{fold}"
        where = {"fold": fold}
        standardise, pos_weight, selection, combat = self._step(
            f"{prefix}-selection", lambda: self.select(fold, where)
        )
        record: dict[str, Any] = {"fold": fold, "selection": selection, "pos_weight": pos_weight}
        dims = {"radiomics": len(standardise["radiomics_columns"])}
        if "clinical_mean" in standardise:
            dims["clinical"] = len(standardise["clinical_mean"])
        image_weights = None
        if images:
            image_weights, record["image"] = self._step(
                f"{prefix}-image", lambda: self.train_image(fold, pos_weight, rounds)
            )
            deep = self._step(f"{prefix}-deep", lambda: self.deep_statistics(fold, image_weights))
            standardise |= deep
            dims["deep"] = (
                deep["deep_projection"].shape[1]
                if "deep_projection" in deep
                else len(deep["deep_mean"])
            )
        fusion_weights, record["fusion"] = self._step(
            f"{prefix}-fusion",
            lambda: self.train_fusion(fold, networks, dims, standardise, pos_weight, rounds),
        )
        trained = [c for c in self.candidates if c in fusion_weights]
        if len(trained) > 1:  # the final model trains the one kept (final_model)
            chosen, record["main_candidates"] = self._choose_main(trained, record["fusion"])
            fusion_weights = {
                n: w for n, w in fusion_weights.items() if n not in trained or n == chosen
            }
        if trained:
            record["main_network"] = next(c for c in trained if c in fusion_weights)
        record["thresholds"] = self._step(
            f"{prefix}-thresholds",
            lambda: self.thresholds(fold, fusion_weights, standardise, models),
        )
        fitted = {
            "combat": combat,
            "standardise": standardise,
            "image": image_weights,
            "fusion": fusion_weights,
            "dims": dims,
        }
        return record, fitted

    def permutation_importance(
        self,
        fold: int,
        model: str,
        weights: dict[str, np.ndarray],
        dims: dict[str, int],
        standardise: Payload,
        pos_weight: float,
    ) -> dict:
        """Pooled permutation importance of ``model``'s input blocks on the fold's held-out
        rows: the sites' summed loss increases over their held-out patients (mean weighted BCE
        increase per patient; radiomics blocks named by their column)."""
        replies = self._ask(
            "query.permutation",
            {
                **standardise,
                **self._fusion_settings(),
                "fold": fold,
                "pos_weight": pos_weight,
                "repeats": IMPORTANCE_REPEATS,
                "seed": self._seed(fold, 3),
                "dp_mode": self.cfg.dp.mode,
                wire.WEIGHTS_PREFIX + model: weights,
            },
            fold=fold,
        )
        usable = [r for r in replies.values() if "loss_increase_sum" in r]
        blocks = input_blocks(network_dims(model, dims), encoded_columns())
        if not usable:
            return {"model": model, "blocks": [], "importance": [], "patients": 0}
        n = sum(r["n"] for r in usable)
        increase = sum(r["loss_increase_sum"] for r in usable) / n
        names = self.record.census[min(self.record.census)].get("radiomics_names", [])
        selected = standardise["radiomics_columns"]
        labels = []
        for name, _ in blocks:
            if name.startswith("radiomics:") and len(names):
                name = f"radiomics:{names[int(selected[int(name.split(':')[1])])]}"
            labels.append(name)
        return {
            "model": model,
            "blocks": labels,
            "importance": [float(v) for v in increase],
            "patients": int(n),
        }

    # ---- selection -----------------------------------------------------------------------------

    def select(self, fold: int, where: dict) -> tuple[Payload, float, dict, dict | None]:
        """ComBat harmonisation (``[harmonisation] method``), then pooled standardisation,
        correlation filter and ranking on the fold's training rows -> the standardisation
        payload of the selected columns, the positive-class weight, the selection's record and
        the pooled ComBat fit of the selected columns (None without harmonisation)."""
        moments = self._moments(fold, where, harmonised=False)
        harmonisation = None
        if self.cfg.harmonisation.method == "combat":
            harmonisation = self._combat(fold, where, _pooled_mean(moments))
            moments = self._moments(fold, where, harmonised=True)
        n = sum(r["n"] for r in moments.values())
        positives = sum(r["positives"] for r in moments.values())
        if positives == 0 or positives == n:
            raise ProtocolError(f"fold {fold}: the training rows have one class only")
        pos_weight = (n - positives) / positives
        mean = _pooled_mean(moments)
        standardise: Payload = {}
        if all("clinical_sum" in r for r in moments.values()):
            c_mean = sum(r["clinical_sum"] for r in moments.values()) / n
            c_var = sum(r["clinical_sumsq"] for r in moments.values()) / n - c_mean**2
            c_sd = np.sqrt(np.maximum(c_var * n / max(n - 1, 1), 0.0))
            standardise |= {
                "clinical_mean": c_mean,
                "clinical_scale": np.where(c_sd > 0, c_sd, 1.0),
            }

        by_correlation = self.cfg.selection.ranking == "correlation"
        cov_request = {"fold": fold, "radiomics_mean": mean, "label_products": by_correlation}
        cov_replies = self._usable(
            self._ask("query.covariance", cov_request, **where), "cross_products"
        )
        m = sum(r["n"] for r in cov_replies.values())
        sums = sum(r["centred_sum"] for r in cov_replies.values())
        cross = sum(r["cross_products"] for r in cov_replies.values())
        cov = (cross - np.outer(sums, sums) / m) / (m - 1)
        sd = np.sqrt(np.maximum(np.diag(cov), 0.0))
        varying = np.flatnonzero(sd > 1e-12 * np.maximum(np.abs(mean), 1.0))
        corr = correlation_from_sums(m, sums[varying], cross[np.ix_(varying, varying)])
        kept = varying[correlation_filter(corr, self.cfg.selection.correlation_threshold)]

        frequency, ranking = None, self.cfg.selection.ranking
        labelled = {s: r for s, r in cov_replies.items() if "label_products" in r}
        if by_correlation and labelled:
            importance = self._label_correlation(labelled, kept)
            ranked_by = labelled
        else:
            if by_correlation:  # each site's DM+ or DM- patients under its floor in a fold
                ranking = "forest"
                self.say(
                    f"  fold {fold}: no site released its label products (each class must "
                    "hold a site's min_patients in every fold): ranked by forest instead"
                )
            importance, ranked_by, frequency = self._forest_importance(fold, kept, mean, sd, where)
        if frequency is None:
            order = np.argsort(-importance, kind="stable")
        else:  # most often in a resample's top_k; ties by the mean importance
            order = np.lexsort((-importance, -frequency))
        order = order[: self.cfg.selection.top_k]
        selected = kept[order]
        standardise |= {
            "radiomics_columns": selected,
            "radiomics_mean": mean[selected],
            "radiomics_scale": sd[selected],
        }
        self.say(
            f"  {len(mean)} radiomics columns -> {len(varying)} varying -> {len(kept)} after "
            f"|r| <= {self.cfg.selection.correlation_threshold} -> top {len(selected)} "
            f"(ranked by {ranking}, {len(ranked_by)} sites)"
        )
        selection = {
            "columns": int(len(mean)),
            "varying": int(len(varying)),
            "after_correlation_filter": int(len(kept)),
            "ranking": ranking,
            "selected": selected.tolist(),
            "importance": importance[order].round(6).tolist(),
            "ranked_by": sorted(ranked_by),
        }
        if frequency is not None:
            selection["selection_frequency"] = frequency[order].round(4).tolist()
        combat = None
        if harmonisation is not None:
            selection["harmonisation"] = harmonisation.pop("record")
            combat = {k: v[..., selected] for k, v in harmonisation.items()}
        return standardise, pos_weight, selection, combat

    def _moments(self, fold: int, where: dict, harmonised: bool) -> dict[str, Payload]:
        request = {"fold": fold, "harmonised": harmonised}
        return self._usable(self._ask("query.moments", request, **where), "radiomics_sum")

    def _combat(self, fold: int, where: dict, mean: np.ndarray) -> dict:
        """Federated ComBat on the fold's training rows (``fedmets.shared.harmonisation``):
        the sites' design sums -> the least-squares location; their residual sums of squares
        -> the pooled variance; every site then fits its own empirical-Bayes location and scale
        on its training rows and harmonises its rows. The covariates are ``[harmonisation]
        covariates`` (none without clinical data); when a site's policy withholds the sums over
        a categorical covariate's groups (a group under its floor, or one that moved by fewer
        than the floor from an earlier fold's), the fold keeps the numeric covariates only. A
        site that still withholds its sums (too few patients) is left out of the pooled fit
        and harmonised with it as a new batch, as ComBat treats one. Returns the pooled fit
        (``grand_mean``, ``effects``, ``variance``, ``mean``: (p,), (q, p), (p,), (p,)) and
        its ``record``."""
        clinical = all(c["clinical_columns"] > 0 for c in self.record.census.values())
        covariates = list(self.cfg.harmonisation.covariates) if clinical else []
        numeric = [c for c in covariates if CLINICAL_COLUMNS[c].kind == "numeric"]
        while True:
            request = {"fold": fold, "radiomics_mean": mean, "covariates": covariates}
            stats = self._ask("query.combat_statistics", request, **where)
            sites = sorted(s for s, r in stats.items() if "batch_n" in r)
            withheld = sorted(set(stats) - set(sites))
            if not withheld or covariates == numeric:
                break
            self.say(
                f"  ComBat: sites {', '.join(withheld)} withheld the sums of the categorical "
                f"covariates' groups (policy): asked again with {numeric or 'no covariates'}"
            )
            covariates = numeric
        if not sites:
            raise ProtocolError(f"fold {fold}: every site withheld its ComBat sums")
        if withheld:
            self.say(
                f"  ComBat: sites {', '.join(withheld)} withheld their sums (policy): "
                "harmonised as new batches of the others' fit"
            )
        location = fit_location([stats[s] for s in sites])
        first = np.cumsum([0] + [len(stats[s]["batch_n"]) for s in sites])
        variance_requests = {
            s: {
                **request,
                "batch_intercepts": location.intercepts[first[i] : first[i + 1]],
                "covariate_effects": location.effects,
            }
            for i, s in enumerate(sites)
        }
        residuals = self._ask("query.combat_variance", variance_requests, sites, **where)
        self._all_answered("query.combat_variance", residuals, sites, "residual_sumsq")
        total = int(sum(stats[s]["batch_n"].sum() for s in sites))
        variance = pooled_variance([residuals[s]["residual_sumsq"] for s in sites], total)
        applied = self._ask(
            "query.combat_apply",
            {
                **request,
                "grand_mean": location.grand_mean,
                "covariate_effects": location.effects,
                "pooled_variance": variance,
            },
            **where,
        )
        self._all_answered("query.combat_apply", applied, sorted(stats), "n")
        self.say(
            f"  ComBat: fitted on {len(sites)} sites ({total} patients), covariates "
            f"{covariates or 'none'}"
        )
        return {
            "grand_mean": location.grand_mean,
            "effects": location.effects,
            "variance": variance,
            "mean": mean,
            "record": {
                "method": "combat",
                "covariates": covariates,
                "sites": sites,
                "new_batches": withheld,
            },
        }

    @staticmethod
    def _all_answered(route: str, replies: dict, sites: list[str], needed: str) -> None:
        missing = sorted(s for s in sites if needed not in replies.get(s, {}))
        if missing:
            raise ProtocolError(
                f"{route}: sites {', '.join(missing)} did not answer; ComBat needs every site "
                "of its fit"
            )

    def _forest_importance(
        self, fold: int, kept: np.ndarray, mean: np.ndarray, sd: np.ndarray, where: dict
    ) -> tuple[np.ndarray, dict[str, Payload], np.ndarray | None]:
        """Random-forest importances of the ``kept`` columns (k,): each site's forest on its
        standardised training rows, averaged weighted by its training patients; the sites that
        ranked; with the stability ranking also the columns' selection frequencies (k,), the
        same average of each site's share of forests on random halves that put them in their
        top_k (else None)."""
        selection = self.cfg.selection
        stability = selection.ranking == "stability"
        request = {
            "fold": fold,
            "radiomics_columns": kept,
            "radiomics_mean": mean[kept],
            "radiomics_scale": sd[kept],
            "trees": selection.rf_trees,
            "seed": self.cfg.run.seed,
        }
        if stability:
            request |= {"resamples": selection.stability_resamples, "top_k": selection.top_k}
        ranking = self._ask("query.importance", request, **where)
        ranked = {s: r for s, r in ranking.items() if "importances" in r}
        if not ranked:
            raise ProtocolError(f"fold {fold}: no site could rank features (one class each)")
        weights = np.array([r["n"] for r in ranked.values()], dtype=float)
        importance = np.average(
            [r["importances"] for r in ranked.values()], axis=0, weights=weights
        )
        frequency = None
        if stability:
            resampled = {s: r for s, r in ranked.items() if "selection_frequency" in r}
            if not resampled:
                raise ProtocolError(f"fold {fold}: no site could resample (too few events)")
            frequency = np.average(
                [r["selection_frequency"] for r in resampled.values()],
                axis=0,
                weights=[r["n"] for r in resampled.values()],
            )
        return importance, ranked, frequency

    @staticmethod
    def _label_correlation(replies: dict[str, Payload], kept: np.ndarray) -> np.ndarray:
        """|Pearson r| of each ``kept`` column with the DM label (k,), from the covariance
        replies that carry the sums of centred values times the label: exactly the
        correlation on the pooled training rows of those sites."""
        n = sum(r["n"] for r in replies.values())
        positives = sum(r["positives"] for r in replies.values())
        products = sum(r["label_products"] for r in replies.values())
        sums = sum(r["centred_sum"] for r in replies.values())
        squares = sum(np.diag(r["cross_products"]) for r in replies.values())
        if not 0 < positives < n:
            raise ProtocolError("the covariance replies hold one class only: no label correlation")
        sd = np.sqrt(np.maximum((squares - sums**2 / n) / (n - 1), 0.0))
        label_sd = np.sqrt(positives * (n - positives) / n / (n - 1))
        covariance = (products - sums * positives / n) / (n - 1)
        with np.errstate(divide="ignore", invalid="ignore"):
            r = np.abs(covariance[kept]) / (sd[kept] * label_sd)
        return np.nan_to_num(r)

    def _usable(self, replies: dict[str, Payload], needed: str) -> dict[str, Payload]:
        """The replies that carry ``needed`` (the others held back: too few patients)."""
        usable = {s: r for s, r in replies.items() if needed in r}
        if not usable:
            raise ProtocolError(f"no site released {needed} (each under min_patients)")
        return usable

    # ---- training ------------------------------------------------------------------------------

    def _image_config(self) -> ImageModelConfig:
        model = self.cfg.model
        cfg = IMAGE_PRESETS[model.image_preset][model.backbone]
        channels = 1 if model.mask_channel == "none" else 2
        return ImageModelConfig.model_validate({**cfg.model_dump(), "in_channels": channels})

    def _image_settings(self) -> Payload:
        model = self.cfg.model
        return {
            "backbone": model.backbone,
            "image_preset": model.image_preset,
            "mask_channel": model.mask_channel,
        }

    def _seed(self, *keys: int) -> int:
        """A 31-bit seed from the run seed and ``keys`` (the final fold's -1 taken mod 2**32)."""
        entropy = [self.cfg.run.seed, *(k % 2**32 for k in keys)]
        return int(np.random.SeedSequence(entropy).generate_state(1)[0] % 2**31)

    def _federated_rounds(
        self,
        stage: str,
        fold: int,
        rounds: int,
        initial: dict[str, dict[str, np.ndarray]],
        train_request: Payload,
        validate_request: Payload,
        keep: dict[str, int] | None = None,
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
        """``rounds`` rounds of ``train.<stage>`` + aggregation + validation of every model in
        ``initial`` (name -> state); returns the best-validation state per model (under DP the
        last round's: no validation) and the curves. ``keep`` (model -> round, at most
        ``rounds``): nothing validated, each model's state after its round is kept.

        Over a link whose message rounds cost time (``batch_validation``: Flower), a round's
        validation goes to the sites with the next round's training, in one message: both
        take the same global model, so the results are those of asking them one by one, in
        about half the message rounds."""
        strategy = self.cfg.strategy
        aggregators = {m: Aggregator(strategy.name, strategy.server_learning_rate) for m in initial}
        current = {m: dict(state) for m, state in initial.items()}
        best = {m: (np.inf, current[m], 0) for m in initial}
        curves: dict[str, dict[str, list]] = {
            m: {"train_loss": [], "val_loss": [], "val_auc": [], "sites": []} for m in initial
        }
        by_auc = stage != IMAGE and self.cfg.model.fusion_monitor == "auc"
        progress = f"{'final' if fold == wire.FINAL_FOLD else f'fold{fold}'}-{stage}-rounds"
        start = 1
        saved = self._load(progress)
        if saved is not None:
            start, current, best, curves, aggregators = saved
            self.say(f"  {stage}: resuming at round {start}/{rounds}")
        sample_dp = self.dp_request["dp_mode"] == "sample"
        # Under DP nothing is validated: choosing a round on validation scores would be a
        # selection outside the guarantee, and the noise inflates the weights (and the loss)
        # long before it spoils the ranking, so the last round is kept (the sites train on
        # every training row instead: ``SiteWorker._rows``).
        validated = keep is None and self.cfg.dp.mode == "off"
        together = validated and not self.secure and getattr(self.link, "batch_validation", False)
        shown = IMAGE if stage == IMAGE else main_model(list(initial))
        # the last trained round, when its validation waits for the next round's training
        pending = len(curves[shown]["train_loss"]) > len(curves[shown]["val_loss"])
        loss_keys = {
            m: "train_loss_sum" if stage == IMAGE else f"train_loss_sum:{m}" for m in initial
        }

        def validation_ask(r: int) -> tuple[str, Payload, dict]:
            """The validation of the global models after round ``r`` (``current``)."""
            weights = {wire.WEIGHTS_PREFIX + m: s for m, s in current.items()}
            bins = {"bins": self.cfg.evaluation.histogram_bins} if by_auc else {}
            payload = {**validate_request, **weights, **bins, "fold": fold, "stage": stage}
            where = {"fold": fold, "round": r, "stage": f"validate {stage}"}
            return "query.validate", {**payload, "dp_mode": "off"}, where

        def validate_alone(r: int) -> dict[str, Payload]:
            route, payload, where = validation_ask(r)
            return self._ask(route, payload, **where)

        def settle(r: int, replies: dict[str, Payload] | None) -> None:
            """Round ``r``'s validation (``replies``; None: not asked) into the curves and the
            kept states (``current`` is still round ``r``'s), and its progress line."""
            validation = None if replies is None else _pooled_validation(replies, current)
            for m in initial:  # nothing validated: the latest round is kept
                loss, auc = (float("nan"), None) if validation is None else validation[m]
                curves[m]["val_loss"].append(loss)
                curves[m]["val_auc"].append(auc)
                score = -auc if by_auc and auc is not None else loss  # lower is better
                if keep is not None:
                    if r == keep[m]:
                        best[m] = (score, current[m], r)
                elif validation is None or score < best[m][0]:  # ties: the earlier round
                    best[m] = (score, current[m], r)
            if stage == IMAGE or r == rounds or r % 5 == 0:
                self._say_round(stage, r, rounds, curves[shown], keep is not None, sample_dp)

        for r in range(start, rounds + 1):
            weights = {wire.WEIGHTS_PREFIX + m: s for m, s in current.items()}
            request = {
                **train_request,
                **weights,
                "fold": fold,
                "round": r,
                "seed": self._seed(fold, r, len(stage)),
                **self.dp_request,
                **({"dp_releases": self.dp_releases[stage]} if sample_dp else {}),
            }
            where = {"fold": fold, "round": r, "stage": stage}
            if pending and not together:  # a stopped run's last round, resumed elsewhere
                settle(r - 1, validate_alone(r - 1))
                pending = False
            if self.secure:  # the loss sums (not released under DP-SGD) ride in the masked sum
                if not sample_dp:
                    request[wire.SECURE_SUMS] = [loss_keys[m] for m in sorted(initial)]
                trained, sites = self._ask_secure(f"train.{stage}", request, **where)
            else:
                train = (f"train.{stage}", request, where)
                if pending:
                    replies, checked = self._ask_together([train, validation_ask(r - 1)])
                    settle(r - 1, checked)
                    pending = False
                else:
                    replies = self._ask(train[0], request, **where)
                trained = {s: rep for s, rep in replies.items() if len(rep) > 1}
                trained = self._valid_updates(
                    f"train.{stage}", trained, current, where, len(replies)
                )
                sites = sorted(trained)
            if not trained:
                raise ProtocolError(f"{stage} round {r}: no site could train (too few patients)")
            n_fit = [trained[s]["n"] for s in sorted(trained)]
            for m in initial:
                states = [trained[s][wire.WEIGHTS_PREFIX + m] for s in sorted(trained)]
                if self.client_dp is not None:  # clipped, averaged, noised, accounted
                    noisy = self.client_dp.aggregate(
                        current[m], states, stage=stage, fold=fold, round=r, run=self.run, model=m
                    )
                    current[m] = aggregators[m].step(current[m], [noisy], [1.0])
                else:
                    current[m] = aggregators[m].step(current[m], states, n_fit)
                sent = [rep for rep in trained.values() if loss_keys[m] in rep]
                curves[m]["train_loss"].append(  # NaN under DP-SGD: losses are not released
                    float(sum(rep[loss_keys[m]] for rep in sent) / sum(rep["n"] for rep in sent))
                    if sent
                    else float("nan")
                )
                curves[m]["sites"].append(sites)
            if together:
                pending = True  # asked with the next round's training (or alone after the last)
            else:
                settle(r, validate_alone(r) if validated else None)
            self._save(progress, (r + 1, current, best, curves, aggregators))
        if pending:
            settle(rounds, validate_alone(rounds))
        for m in initial:
            curves[m]["best_round"] = best[m][2]
        return {m: best[m][1] for m in initial}, curves

    def _say_round(
        self, stage: str, r: int, rounds: int, curve: dict[str, list], kept: bool, sample_dp: bool
    ) -> None:
        """The progress line of round ``r`` from the shown model's ``curve`` (its latest
        entries: round ``r``'s); ``kept``: the final model's rounds, not validated."""
        latest = {k: curve[k][-1] for k in ("train_loss", "val_loss", "val_auc")}
        trained_shown = (
            f"train loss {latest['train_loss']:.4f}"
            if np.isfinite(latest["train_loss"])
            else "no train loss (each site's inner-validation rows under its floor: "
            "the training rows' loss would give theirs)"
        )
        if sample_dp:
            losses_shown = "losses not released under DP-SGD"
        elif np.isnan(latest["val_loss"]):  # say why, and what is kept instead
            losses_shown = f"{trained_shown}, " + (
                "not validated (the final model: the folds' median round)"
                if kept
                else "not validated under DP (the last round is kept)"
                if self.cfg.dp.mode != "off"
                else "no validation loss: no site's inner-validation rows reached its "
                "floor (min_patients), so the last round is kept"
            )
        else:
            losses_shown = f"{trained_shown}, validation loss {latest['val_loss']:.4f}"
            if latest["val_auc"] is not None:
                losses_shown += f", AUC {latest['val_auc']:.3f}"
        self.say(
            f"  {stage} round {r}/{rounds}: {losses_shown} ({len(curve['sites'][-1])} sites"
            f"{', SecAgg+' if self.secure else ''})"
        )

    def _training_rows(self, site: str, fold: int) -> int:
        """The patients of ``site`` outside ``fold`` (all of them for the final model's fold
        -1, or before its folds are known): what one of its training replies may count."""
        census = int(self.record.census.get(site, {}).get("n", 0))
        sizes = self.fold_sizes.get(site)
        return census if fold < 0 or sizes is None else census - int(sizes[fold])

    def _valid_updates(
        self,
        route: str,
        trained: dict[str, Payload],
        current: dict[str, dict],
        where: dict,
        answered: int,
    ) -> dict[str, Payload]:
        """The training replies whose updates the server takes: each model's state has the
        global model's tensors, shapes and types (its values are finite: ``_checked``), and
        lies within ``[federation] max_update_norm`` (L2 over all tensors) of the global state;
        ``n`` is a whole number from 1 to the site's patients outside the fold
        (:meth:`_training_rows`).
        A site breaking a rule is left out of this round (logged, recorded as a dropout with
        the rule); ProtocolError when fewer than ``min_sites`` of the ``answered`` sites
        remain."""
        bound = self.cfg.federation.max_update_norm
        valid = {}
        for site, reply in sorted(trained.items()):
            rows = self._training_rows(site, int(where["fold"]))
            n = reply.get("n")
            problem = None
            if not (np.ndim(n) == 0 and float(n).is_integer() and 1 <= n <= rows):
                problem = ("update.n", f"n {n!r} is not a count from 1 to its {rows} training rows")
            for model, state in current.items():
                if problem:
                    break
                update = reply.get(wire.WEIGHTS_PREFIX + model, {})
                if set(update) != set(state) or any(
                    np.shape(update[k]) != np.shape(state[k]) for k in state
                ):
                    problem = ("update.shape", f"{model}: tensors or shapes differ from the model")
                elif any(np.asarray(update[k]).dtype != np.asarray(state[k]).dtype for k in state):
                    problem = ("update.dtype", f"{model}: tensor types differ from the model's")
                elif bound is not None:
                    distance = float(
                        np.sqrt(sum(np.sum((update[k] - state[k]) ** 2) for k in state))
                    )
                    if distance > bound:
                        problem = (
                            "update.norm",
                            f"{model}: moved {distance:.3g} from the global model (bound {bound})",
                        )
            if problem:
                rule, reason = problem
                self.record.dropouts.append({"route": route, "site": site, **where, "rule": rule})
                self.say(f"  site {site} left out of {route} {where}: {rule}: {reason}")
                continue
            valid[site] = reply
        left_out = len(trained) - len(valid)
        if left_out and answered - left_out < self.cfg.federation.min_sites:
            raise ProtocolError(
                f"{route}: {left_out} of {answered} sites sent an invalid update "
                f"({', '.join(sorted(set(trained) - set(valid)))}); min_sites is "
                f"{self.cfg.federation.min_sites}"
            )
        return valid

    def train_image(
        self, fold: int, pos_weight: float, rounds: dict[str, int] | None = None
    ) -> tuple[dict[str, np.ndarray], dict]:
        """Federated rounds of the image model (``rounds[IMAGE]`` of them, unvalidated, when
        given); the kept weights and the curves."""
        from fedmets.shared.image_models import build_image_model  # MONAI: image runs only

        with GLOBAL_RNG:
            set_seed(self._seed(fold, 1))
            model = build_image_model(self._image_config())
        initial = {IMAGE: {k: v.detach().numpy().copy() for k, v in model.state_dict().items()}}
        settings = self._image_settings()
        keep = None if rounds is None else {IMAGE: rounds[IMAGE]}
        best, curves = self._federated_rounds(
            IMAGE,
            fold,
            self.cfg.stages.image_rounds if keep is None else keep[IMAGE],
            initial,
            {
                **settings,
                "epochs": self.cfg.stages.local_epochs,
                "lr": self.cfg.model.image_lr,
                "batch": self.cfg.model.image_batch,
                "proximal_mu": self.cfg.strategy.proximal_mu,
                "pos_weight": pos_weight,
            },
            {**settings, "pos_weight": pos_weight},
            keep,
        )
        self.say(f"  image model: best round {curves[IMAGE]['best_round']}")
        return best[IMAGE], curves[IMAGE]

    def deep_statistics(self, fold: int, weights: dict[str, np.ndarray]) -> Payload:
        """Each site extracts and keeps its deep features with ``weights`` (the fold's image
        model); the pooled training rows' mean and SD of each (D,), and their whitened PCA
        projection (D, c) when ``[model] deep_components`` asks for one. Under sample-level
        DP the sites release no statistic of them: mean 0 and SD 1 (the features enter the
        fusion networks as the image model gives them)."""
        replies = self._ask(
            "query.deep_features",
            {
                **self._image_settings(),
                "fold": fold,
                "dp_mode": self.cfg.dp.mode,
                wire.WEIGHTS_PREFIX + IMAGE: weights,
            },
            fold=fold,
        )
        if self.cfg.dp.mode == "sample":
            dim = weights["head.weight"].shape[-1]
            return {"deep_mean": np.zeros(dim), "deep_scale": np.ones(dim)}
        replies = self._usable(replies, "deep_sum")
        n = sum(r["n"] for r in replies.values())
        sums = sum(r["deep_sum"] for r in replies.values())
        mean = sums / n
        var = sum(r["deep_sumsq"] for r in replies.values()) / n - mean**2
        sd = np.sqrt(np.maximum(var * n / max(n - 1, 1), 0.0))
        out = {"deep_mean": mean, "deep_scale": np.where(sd > 1e-8, sd, 1.0)}
        components = min(self.cfg.model.deep_components, len(mean), n - 1)
        if components > 0:  # whitened PCA of the pooled training rows' covariance
            cross = sum(r["deep_cross"] for r in replies.values())
            cov = (cross - np.outer(sums, sums) / n) / (n - 1)
            values, vectors = np.linalg.eigh(cov)
            top = np.argsort(values)[::-1][:components]
            scale = np.sqrt(np.maximum(values[top], 1e-12))
            out["deep_projection"] = vectors[:, top] / scale
        return out

    def _choose_main(self, candidates: list[str], curves: dict) -> tuple[str, dict]:
        """The candidate with the best pooled inner-validation figure at its kept round (the
        lowest loss, or with ``fusion_monitor = "auc"`` the highest AUC; ties: the earlier
        candidate), and each candidate's figure. Training rows only: the fold's held-out rows
        play no part."""
        auc = self.cfg.model.fusion_monitor == "auc"
        figures = {}
        for name in candidates:
            curve = curves[name]["val_auc" if auc else "val_loss"]
            value = curve[curves[name]["best_round"] - 1] if curve else float("nan")
            figures[name] = float(value) if value is not None else float("nan")
        usable = [n for n in candidates if np.isfinite(figures[n])]
        if not usable:
            raise ProtocolError("no inner-validation figure to choose the main model's network")
        chosen = (max if auc else min)(usable, key=lambda n: figures[n])
        shown = ", ".join(f"{n.split('#', 1)[1]} {figures[n]:.4f}" for n in candidates)
        self.say(f"  main model: {chosen.split('#', 1)[1]} chosen ({shown})")
        return chosen, figures

    def _fusion_settings(self) -> Payload:
        model = self.cfg.model
        return {
            "hidden": np.asarray(model.fusion_hidden, dtype=np.int64),  # [] stays integer
            "dropout": model.fusion_dropout,
            "group_dropout": model.fusion_group_dropout,
        }

    def train_fusion(
        self,
        fold: int,
        networks: list[str],
        dims: dict[str, int],
        standardise: Payload,
        pos_weight: float,
        rounds: dict[str, int] | None = None,
    ) -> tuple[dict[str, dict[str, np.ndarray]], dict]:
        """Federated rounds of every fusion network (each from its own seeded initial
        weights); the best round's weights (with ``rounds``: each network's weights after its
        round, unvalidated) and the curves, per network."""
        model = self.cfg.model
        initial = {}
        for i, name in enumerate(networks):
            settings = self._fusion_settings()
            settings["hidden"] = network_hidden(name, settings["hidden"])
            with GLOBAL_RNG:
                set_seed(self._seed(fold, 2, i))
                net = FusionNet(network_dims(name, dims), **settings)
            initial[name] = {k: v.detach().numpy().copy() for k, v in net.state_dict().items()}
        self.say(f"  fusion: {len(networks)} networks ({', '.join(networks)})")
        keep = None if rounds is None else {n: rounds[n] for n in networks}
        best, curves = self._federated_rounds(
            "fusion",
            fold,
            self.cfg.stages.fusion_rounds if keep is None else max(keep.values()),
            initial,
            {
                **standardise,
                **self._fusion_settings(),
                "epochs": self.cfg.stages.fusion_local_epochs,
                "lr": model.fusion_lr,
                "batch": model.fusion_batch,
                "weight_decay": model.fusion_weight_decay,
                "proximal_mu": self.cfg.strategy.proximal_mu,
                "pos_weight": pos_weight,
            },
            {**standardise, **self._fusion_settings(), "pos_weight": pos_weight},
            keep,
        )
        return best, curves

    def thresholds(
        self,
        fold: int,
        weights: dict[str, dict[str, np.ndarray]],
        standardise: Payload,
        models: list[str],
    ) -> dict[str, float]:
        """Youden threshold per model (made from the networks of ``weights``) from the pooled
        training-score histograms."""
        bins = self.cfg.evaluation.histogram_bins
        replies = self._usable(
            self._ask(
                "query.train_scores",
                {
                    **standardise,
                    **self._fusion_settings(),
                    "fold": fold,
                    "bins": bins,
                    "dp_mode": self.cfg.dp.mode,
                    "models": models,
                    "fusion": self.cfg.model.fusion,
                    **{wire.WEIGHTS_PREFIX + m: s for m, s in weights.items()},
                },
                fold=fold,
            ),
            f"hist_pos:{models[0]}",
        )
        edges = np.linspace(0.0, 1.0, bins + 1)
        out = {}
        for m in models:
            pos = sum(r[f"hist_pos:{m}"] for r in replies.values())
            neg = sum(r[f"hist_neg:{m}"] for r in replies.values())
            out[m] = youden_from_histograms(pos, neg, edges)
        return out

    # ---- evaluation ----------------------------------------------------------------------------

    def evaluate(self, thresholds: dict[str, np.ndarray]) -> dict:
        """Pooled, per-site and per-subsite out-of-fold metrics of every model; the main
        model's pooled and per-site results also hold their ROC points."""
        bins = self.cfg.evaluation.histogram_bins
        replies = self._ask(
            "query.evaluation",
            {
                "bins": bins,
                "dp_mode": self.cfg.dp.mode,
                **{f"thresholds:{m}": t for m, t in thresholds.items()},
            },
        )
        edges = np.linspace(0.0, 1.0, bins + 1)
        main = main_model(list(thresholds))
        results = {}
        for m in thresholds:
            per_site = {
                s: metrics_from_replies([r], m, edges, with_roc=m == main)
                for s, r in sorted(replies.items())
                if f"hist_pos:{m}" in r
            }
            subsites = sorted(
                {
                    k.split(":", 1)[1]
                    for r in replies.values()
                    for k in r
                    if k.startswith("group_n:")
                }
            )
            results[m] = {
                "pooled": metrics_from_replies(
                    list(replies.values()), m, edges, with_calibration=True, with_roc=m == main
                ),
                "per_site": per_site,
                "per_subsite": {
                    name: metrics_from_replies(list(replies.values()), f"{m}@{name}", edges)
                    for name in subsites
                },
            }
        return results


def selection_stability(selected: list[list[int]]) -> dict:
    """How alike the folds' selected radiomics sets are: the mean Jaccard index over pairs of
    folds (1: the same set every fold), the columns selected in every fold and in any."""
    sets = [set(s) for s in selected]
    pairs = [
        len(a & b) / len(a | b) if a | b else 1.0 for i, a in enumerate(sets) for b in sets[i + 1 :]
    ]
    return {
        "folds": len(sets),
        "mean_jaccard": round(float(np.mean(pairs)), 4) if pairs else None,
        "in_every_fold": len(set.intersection(*sets)) if sets else 0,
        "in_any_fold": len(set.union(*sets)) if sets else 0,
    }


def _pooled_mean(moments: dict[str, Payload]) -> np.ndarray:
    """The pooled radiomics means (p,) over the non-missing values of ``query.moments``
    replies (0 for a column without any)."""
    count = sum(r["radiomics_count"] for r in moments.values())
    total = np.where(count > 0, sum(r["radiomics_sum"] for r in moments.values()), 0.0)
    return total / np.maximum(count, 1)


def _chosen_rounds(folds: list[dict]) -> dict[str, list[dict]]:
    """Each trained network's (and the image model's, ``IMAGE``) curves over the folds."""
    chosen: dict[str, list[dict]] = {}
    for fold in folds:
        if fold.get("image"):
            chosen.setdefault(IMAGE, []).append(fold["image"])
        for name, curves in fold["fusion"].items():
            chosen.setdefault(name, []).append(curves)
    return chosen


def _most_chosen(folds: list[dict], candidates: list[str], higher_is_better: bool) -> str:
    """The candidate the folds chose most often (``main_network``); ties go to the better mean
    inner-validation figure over the folds (``main_candidates``), then to the earlier one."""
    chosen = [fold["main_network"] for fold in folds]

    def rank(candidate: str) -> tuple[int, float, int]:
        mean = float(np.nanmean([fold["main_candidates"][candidate] for fold in folds]))
        return (
            chosen.count(candidate),
            mean if higher_is_better else -mean,
            -candidates.index(candidate),
        )

    return max(candidates, key=rank)


def _mean_importance(per_fold: list[dict]) -> dict:
    """Each block's permutation importance averaged over the folds it appears in (radiomics
    blocks differ between folds: each fold selects its own columns), highest first."""
    per_fold = [fold for fold in per_fold if fold is not None]
    if not per_fold:
        return {"model": None, "measure": "not computed: late fusion has no main network"}
    values: dict[str, list[float]] = {}
    for fold in per_fold:
        for name, value in zip(fold["blocks"], fold["importance"], strict=True):
            values.setdefault(name, []).append(value)
    ranked = sorted(values.items(), key=lambda item: -float(np.mean(item[1])))
    return {
        "model": per_fold[0]["model"] if per_fold else None,
        "measure": "mean weighted-BCE increase per held-out patient when the block is shuffled",
        "blocks": [
            {"name": name, "importance": float(np.mean(v)), "folds": len(v)} for name, v in ranked
        ],
    }


def _validation_auc(replies: list[Payload], model: str) -> float | None:
    """Pooled AUC of ``model`` from the sites' summed validation-score histograms; None when
    they were not asked for or hold one class only."""
    have = [r for r in replies if f"val_hist_pos:{model}" in r]
    if not have:
        return None
    pos = sum(r[f"val_hist_pos:{model}"] for r in have)
    neg = sum(r[f"val_hist_neg:{model}"] for r in have)
    edges = np.linspace(0.0, 1.0, len(pos) + 1)
    return metrics_from_histograms(pos, neg, edges, threshold=0.5)["auc"]


def metrics_from_replies(
    replies: list[Payload],
    key: str,
    edges: np.ndarray,
    with_calibration: bool = False,
    with_roc: bool = False,
) -> dict | None:
    """Metrics of model (or model@subsite) ``key`` from the sites' summed evaluation replies:
    AUC and its DeLong CI from the histograms, ACC/SEN/SPE from the confusion counts at each
    fold's threshold, Brier from the summed squared errors (both on the sites' score groups);
    ``with_roc``: ``roc``, the histograms' ROC points ``{"fpr": [...], "tpr": [...]}`` to 4
    decimals (None without both classes)."""
    have = [r for r in replies if f"hist_pos:{key}" in r]
    if not have:
        return None
    pos = sum(r[f"hist_pos:{key}"] for r in have)
    neg = sum(r[f"hist_neg:{key}"] for r in have)
    tp, fn, tn, fp = (int(v) for v in sum(r[f"confusion:{key}"] for r in have))
    n = tp + fn + tn + fp
    base = metrics_from_histograms(pos, neg, edges, threshold=0.5)
    result = {
        "n": n,
        "positives": tp + fn,
        "sites": len(have),
        "auc": base["auc"],
        "auc_ci": auc_ci_from_histograms(pos, neg),
        "auc_note": base["auc_note"],
        "acc": (tp + tn) / n,
        "sen": tp / (tp + fn) if tp + fn else None,
        "spe": tn / (tn + fp) if tn + fp else None,
        "brier": sum(r[f"brier_sum:{key}"] for r in have) / n,
    }
    if with_calibration:
        result["calibration"] = calibration_from_histograms(pos, neg, edges)
    if with_roc:
        result["roc"] = None
        if base["auc"] is not None:
            fpr, tpr, _ = roc_from_histograms(pos, neg)
            result["roc"] = {"fpr": np.round(fpr, 4).tolist(), "tpr": np.round(tpr, 4).tolist()}
    return result


def _pooled_validation(
    replies: Mapping[str, Payload], models: Mapping[str, Any]
) -> dict[str, tuple[float, float | None]] | None:
    """(pooled inner-validation loss, pooled validation AUC or None) of each of ``models``
    from the sites' ``query.validate`` replies; the AUC from their validation-score
    histograms (``[evaluation] histogram_bins``), when asked. None when no site could
    validate."""
    checked = [rep for rep in replies.values() if len(rep) > 1]
    n_val = sum(rep["n"] for rep in checked)
    if not n_val:
        return None
    return {
        m: (
            float(sum(rep[f"val_loss_sum:{m}"] for rep in checked) / n_val),
            _validation_auc(checked, m),
        )
        for m in models
    }
