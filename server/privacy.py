"""Client-level differential privacy at the server, and the federation's privacy report.

:class:`ClientLevelDP` aggregates through Flower's own strategy wrapper,
``flwr.serverapp.strategy.DifferentialPrivacyServerSideFixedClipping`` around ``FedAvg``
(Geyer et al. 2017, McMahan et al. 2018), once per model and per round: the protocol's
messages carry several networks (``weights:<model>``), so for each model the sites' states
become the train replies the wrapper expects (one ``ArrayRecord`` of the float entries and one
``MetricRecord`` with ``num-examples`` = 1 per site), the round's global weights are set as its
``current_arrays`` (what its ``configure_train`` records: the protocol has already sent the
round's messages on its own routes), and its ``aggregate_train`` does:

1. each site's update ``new - global`` (float parameters only; integer buffers keep the global
   value) is clipped to L2 norm ``clip`` over all float parameters together
   (``compute_clip_model_update``);
2. the clipped updates are averaged by ``FedAvg`` with equal weights (a site-size weighting
   would give a large site more than ``clip / n`` influence, breaking the sensitivity bound:
   Flower's accounted strategy refuses unequal weights for the same reason);
3. Gaussian noise of standard deviation ``noise_multiplier * clip / n_sites`` is added to every
   float entry of the average (``compute_stdv``, ``add_gaussian_noise_inplace``; Flower draws
   from numpy's global generator, so each aggregation runs it on this object's own seeded
   stream, and the global generator is left as it was).

What it protects: one whole site's contribution to the released global model (add/remove one
site), not one patient -- every patient of the site is covered together. Epsilon is Opacus'
RDP accountant over the server's ledger (Flower's ``accountant=`` is not used: it accounts one
wrapper, with no sampling amplification, while the ledger composes every model, fold and round
of the run, persists across processes and feeds the privacy report): each aggregation is one
step of the sampled Gaussian mechanism with ``sample_rate`` = fraction of sites sampled (1.0:
every site every round), so ``rounds`` steps per model and fold, every model (ablation networks
included) and every fold composed. With four sites the noise needed for a useful epsilon
swamps the average: see ``docs/privacy.md``.

:func:`privacy_report` gathers the sites' ledger summaries (and the server's) into one report.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import (
    DEFAULT_TTL,
    Array,
    ArrayRecord,
    Message,
    MessageType,
    Metadata,
    MetricRecord,
    RecordDict,
)
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg

from fedmets.shared.privacy import PrivacyLedger, epsilon_of, plan_noise_multiplier

State = Mapping[str, np.ndarray]
MECHANISM = "gaussian"
SERVER = "server"
WEIGHT_KEY = "num-examples"  # FedAvg's weighting key: 1 per site (client-level DP)


def float_keys(state: State) -> list[str]:
    """Names of the floating-point entries of ``state`` (the ones clipped and noised)."""
    return [k for k, v in state.items() if np.asarray(v).dtype.kind == "f"]


def _float_record(state: State, keys: Sequence[str]) -> ArrayRecord:
    """The float entries of ``state`` (in ``keys``' order), as float64, in an ArrayRecord."""
    return ArrayRecord({k: Array(np.asarray(state[k], dtype=np.float64)) for k in keys})


def _site_reply(node: int, state: State, keys: Sequence[str], round: int) -> Message:
    """One site's state as the train reply the wrapper expects: one ArrayRecord (the float
    entries) and one MetricRecord whose weight is 1 (client-level DP: each site counts once).
    Its metadata is given directly: ``Message(..., reply_to=...)`` and instruction messages
    need Flower's runtime identity, which an aggregation outside a ServerApp has not got; the
    wrapper only reads the content (and ``src_node_id`` when logging an error reply)."""
    content = RecordDict(
        {"arrays": _float_record(state, keys), "metrics": MetricRecord({WEIGHT_KEY: 1})}
    )
    metadata = Metadata(
        run_id=0,
        message_id="",
        src_node_id=node,
        dst_node_id=0,
        reply_to_message_id="",
        group_id=str(round),
        created_at=0.0,
        ttl=DEFAULT_TTL,
        message_type=MessageType.TRAIN,
    )
    return Message(content, metadata=metadata)


@contextmanager
def _own_stream(noise: np.random.RandomState) -> Iterator[None]:
    """Run the wrapper's noise (drawn from numpy's global generator) on ``noise``; the global
    generator is put back afterwards, and ``noise`` moves on by what was drawn."""
    saved = np.random.get_state()  # noqa: NPY002
    np.random.set_state(noise.get_state())  # noqa: NPY002
    try:
        yield
    finally:
        noise.set_state(np.random.get_state())  # noqa: NPY002
        np.random.set_state(saved)  # noqa: NPY002


@contextmanager
def _flower_warnings_only() -> Iterator[None]:
    """Flower's wrapper and FedAvg log several INFO lines per call (one call per model and
    round here); the protocol's own log says what was aggregated."""
    logger = logging.getLogger("flwr")
    level = logger.level
    logger.setLevel(logging.WARNING)
    try:
        yield
    finally:
        logger.setLevel(level)


class ClientLevelDP:
    """Clip, average and noise the sites' states with Flower's
    ``DifferentialPrivacyServerSideFixedClipping(FedAvg)``, and account every release.

    ``noise_multiplier``: z; ``clip``: the L2 bound on a site's update; ``delta``: the delta
    epsilon is reported at; ``ledger_dir``: where the server's ledger lives (its ``who`` is
    ``"server"``); ``budget``: PrivacyBudgetExceeded before a release that would go beyond;
    ``sample_rate``: the fraction of sites sampled per round; ``seed``: the noise stream's
    seed (Flower draws from numpy's global generator; :func:`_own_stream` gives it this
    object's ``np.random.RandomState(seed)`` for each aggregation, so runs are reproducible
    and nothing else's randomness moves)."""

    def __init__(
        self,
        noise_multiplier: float,
        clip: float,
        delta: float,
        ledger_dir: str | Path,
        budget: float | None = None,
        sample_rate: float = 1.0,
        seed: int = 0,
    ) -> None:
        if noise_multiplier <= 0 or clip <= 0:
            raise ValueError("client-level DP needs noise_multiplier > 0 and clip > 0")
        if not 0 < sample_rate <= 1:
            raise ValueError(f"sample_rate must be in (0, 1], got {sample_rate}")
        self.noise_multiplier = float(noise_multiplier)
        self.clip = float(clip)
        self.sample_rate = float(sample_rate)
        self.ledger = PrivacyLedger(ledger_dir, SERVER, delta, budget)
        self.noise = np.random.RandomState(seed)  # noqa: NPY002 -- Flower uses the legacy API

    @classmethod
    def for_target(
        cls,
        target_epsilon: float,
        releases: int,
        clip: float,
        delta: float,
        ledger_dir: str | Path,
        sample_rate: float = 1.0,
        seed: int = 0,
        repeats: int = 1,
    ) -> ClientLevelDP:
        """Noise chosen so that ``releases`` aggregations (e.g. folds x (image rounds + fusion
        rounds x networks)) end at ``target_epsilon``. The budget is what ``repeats`` times
        those releases spend (``target_epsilon`` itself for 1; e.g. per-fold planning over
        all folds: ``dp.epsilon_scope = "fold"``)."""
        z = plan_noise_multiplier(target_epsilon, delta, sample_rate, releases)
        budget = (
            target_epsilon
            if repeats == 1
            else epsilon_of([(z, sample_rate, releases * repeats)], delta) * (1 + 1e-9)
        )  # (the slack: the ledger sums the same steps one release at a time)
        return cls(z, clip, delta, ledger_dir, budget, sample_rate, seed)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (every release in the server's ledger)."""
        return self.ledger.epsilon()

    def strategy(self, n_sites: int) -> DifferentialPrivacyServerSideFixedClipping:
        """Flower's server-side fixed-clipping wrapper around an equal-weight ``FedAvg`` that
        takes every one of ``n_sites`` sites (one per model and round: it holds that round's
        global weights)."""
        fedavg = FedAvg(
            fraction_train=1.0,
            min_train_nodes=n_sites,
            min_available_nodes=n_sites,
            weighted_by_key=WEIGHT_KEY,
        )
        return DifferentialPrivacyServerSideFixedClipping(
            fedavg, self.noise_multiplier, self.clip, n_sites
        )

    def aggregate(
        self,
        global_state: State,
        states: Sequence[State],
        *,
        stage: str,
        fold: int | None = None,
        round: int | None = None,
        run: str | None = None,
        model: str | None = None,
    ) -> dict[str, np.ndarray]:
        """The next global state of one model: Flower's wrapper clips each site's update
        against ``global_state``, averages with equal weights and adds Gaussian noise (float
        entries only; integer entries stay the global ones); the release is checked against
        the budget first and then recorded. Hand the result to ``Aggregator.step(global,
        [result], [1.0])`` for FedAdam (post-processing)."""
        if not states:
            raise ValueError("no site states to aggregate")
        step = [(self.noise_multiplier, self.sample_rate, 1)]
        self.ledger.check(step)
        keys = float_keys(global_state)
        out = {k: np.asarray(v).copy() for k, v in global_state.items()}
        if keys:
            server_round = round if round is not None else 1
            dp = self.strategy(len(states))
            # The round's global weights, the clipping reference: what the wrapper's
            # configure_train records before FedAvg samples nodes and builds the instruction
            # messages (which the protocol has already sent on its own routes, and which need
            # Flower's runtime identity). ``current_arrays`` is a public attribute of the
            # wrapper, though not in its documented parameters.
            dp.current_arrays = _float_record(global_state, keys)
            replies = [
                _site_reply(node, state, keys, server_round)
                for node, state in enumerate(states, start=1)
            ]
            with _own_stream(self.noise), _flower_warnings_only():
                arrays, _ = dp.aggregate_train(server_round, replies)
            if arrays is None:
                raise RuntimeError(f"Flower's DP wrapper did not aggregate {model or stage}")
            for k in keys:
                out[k] = arrays[k].numpy().astype(np.asarray(global_state[k]).dtype)
        self.ledger.record(
            stage=stage,
            mechanism=MECHANISM,
            noise_multiplier=self.noise_multiplier,
            sample_rate=self.sample_rate,
            steps=1,
            max_grad_norm=self.clip,
            fold=fold,
            round=round,
            run=run,
            model=model,
        )
        return out


def privacy_report(
    sites: Mapping[str, Mapping[str, Any]],
    server: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """One report from the ledgers' summaries (``PrivacyLedger.summary()``: a site's own, or
    rebuilt from its ``query.ledger`` reply by :func:`summary_from_reply`), per site and the
    server's: per site the total epsilon over every fold, round and model (the composition of
    its whole history: every fold re-trains on overlapping patients), per stage the epsilon of
    that stage alone, and what was released without DP."""
    report: dict[str, Any] = {"sites": {}, "server": None}
    for site, summary in sorted(sites.items()):
        report["sites"][site] = {
            "epsilon": summary["epsilon"],
            "delta": summary["delta"],
            "budget": summary.get("budget"),
            "releases": summary.get("releases"),
            "stages": {
                name: {k: stage[k] for k in ("epsilon", "releases") if k in stage}
                for name, stage in summary.get("stages", {}).items()
            },
            "not_covered": summary.get("not_covered", []),
        }
    if server is not None:
        report["server"] = dict(server)
    site_eps = [s["epsilon"] for s in report["sites"].values()]
    report["worst_site_epsilon"] = max(site_eps) if site_eps else None
    report["note"] = (
        "sample-level epsilon protects one patient of a site (composition over every fold, "
        "round and network of that site); client-level epsilon protects one whole site's "
        "contribution to the global models; releases listed under not_covered (statistics, "
        "losses, histograms, thresholds) are outside both guarantees"
    )
    return report


def summary_from_reply(reply: Mapping[str, Any]) -> dict[str, Any]:
    """A ledger summary rebuilt from a site's ``query.ledger`` reply (``epsilon``, ``delta``,
    ``epsilon:<stage>``, ``releases:<stage>``, ``uncovered:<stage>`` counts)."""
    stages: dict[str, dict[str, Any]] = {}
    for key, value in reply.items():
        if ":" not in key:
            continue
        field, stage = key.split(":", 1)
        slot = stages.setdefault(stage, {"epsilon": 0.0, "releases": 0, "uncovered": 0})
        if field == "epsilon":
            slot["epsilon"] = float(value)
        elif field in ("releases", "uncovered"):
            slot[field] = int(value)
    return {
        "epsilon": float(reply["epsilon"]),
        "delta": float(reply["delta"]),
        "budget": float(reply["budget"]) if reply.get("budget", 0) > 0 else None,
        "releases": sum(s["releases"] for s in stages.values()),
        "stages": stages,
        "not_covered": sorted(s for s, v in stages.items() if v["uncovered"]),
    }
