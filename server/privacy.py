"""Client-level differential privacy at the server, and the federation's privacy report.

:class:`ClientLevelDP` is what Flower's ``DifferentialPrivacyServerSideFixedClipping`` does
(Geyer et al. 2017, McMahan et al. 2018), built on Flower's own functions
(``flwr.supercore.differential_privacy``: ``compute_clip_model_update``, ``compute_stdv``,
``get_norm``) and applied to this project's ``{name: array}`` states:

1. each site's update ``new - global`` (float parameters only; integer buffers keep the global
   value) is clipped to L2 norm ``clip`` over all float parameters together;
2. the clipped updates are averaged with equal weights (a site-size weighting would give a
   large site more than ``clip / n`` influence, breaking the sensitivity bound: Flower's
   accounted strategy refuses unequal weights for the same reason);
3. Gaussian noise of standard deviation ``noise_multiplier * clip / n_sites`` is added to every
   float entry of the average (Flower's ``compute_stdv``).

What it protects: one whole site's contribution to the released global model (add/remove one
site), not one patient -- every patient of the site is covered together. Epsilon is Opacus'
RDP accountant over the server's ledger: each aggregation is one step of the sampled Gaussian
mechanism with ``sample_rate`` = fraction of sites sampled (1.0: every site every round), so
``rounds`` steps per model and fold, every model (ablation networks included) and every fold
composed. With four sites the noise needed for a useful epsilon swamps the average: see
``docs/privacy.md``.

:func:`privacy_report` gathers the sites' ledger summaries (and the server's) into one report.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from flwr.supercore.differential_privacy import compute_clip_model_update, compute_stdv, get_norm

from shared.privacy import PrivacyLedger, plan_noise_multiplier

State = Mapping[str, np.ndarray]
MECHANISM = "gaussian"
SERVER = "server"


def float_keys(state: State) -> list[str]:
    """Names of the floating-point entries of ``state`` (the ones clipped and noised)."""
    return [k for k, v in state.items() if np.asarray(v).dtype.kind == "f"]


def update_norm(global_state: State, state: State) -> float:
    """L2 norm of ``state - global_state`` over every float entry together."""
    keys = float_keys(global_state)
    return get_norm([np.asarray(state[k], np.float64) - global_state[k] for k in keys])


def clip_update(global_state: State, state: State, clip: float) -> dict[str, np.ndarray]:
    """``global + update * min(1, clip / ||update||)``: the site's state with its update
    clipped to L2 norm ``clip`` (Flower's ``compute_clip_model_update``); integer entries are
    the global ones."""
    keys = float_keys(global_state)
    new = [np.asarray(state[k], dtype=np.float64).copy() for k in keys]
    old = [np.asarray(global_state[k], dtype=np.float64) for k in keys]
    compute_clip_model_update(new, old, clip)
    out = {k: np.asarray(v).copy() for k, v in global_state.items()}
    for k, v in zip(keys, new, strict=True):
        out[k] = v.astype(np.asarray(global_state[k]).dtype)
    return out


def noise_std(noise_multiplier: float, clip: float, n_sites: int) -> float:
    """Standard deviation of the noise on the average: ``noise_multiplier * clip / n_sites``
    (Flower's ``compute_stdv``)."""
    return compute_stdv(noise_multiplier, clip, n_sites)


class ClientLevelDP:
    """Clip, average and noise the sites' states, and account every release.

    ``noise_multiplier``: z; ``clip``: the L2 bound on a site's update; ``delta``: the delta
    epsilon is reported at; ``ledger_dir``: where the server's ledger lives (its ``who`` is
    ``"server"``); ``budget``: PrivacyBudgetExceeded before a release that would go beyond;
    ``sample_rate``: the fraction of sites sampled per round; ``seed``: the noise generator's
    seed (Flower draws from numpy's global generator; a seeded Generator keeps runs
    reproducible)."""

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
        self.rng = np.random.default_rng(seed)

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
    ) -> ClientLevelDP:
        """Noise chosen so that ``releases`` aggregations (e.g. folds x (image rounds + fusion
        rounds x networks)) end at ``target_epsilon``, which is also the budget."""
        z = plan_noise_multiplier(target_epsilon, delta, sample_rate, releases)
        return cls(z, clip, delta, ledger_dir, target_epsilon, sample_rate, seed)

    @property
    def epsilon(self) -> float:
        """Epsilon spent so far (every release in the server's ledger)."""
        return self.ledger.epsilon()

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
        """The next global state: the equal-weight mean of the clipped states plus Gaussian
        noise; the release is checked against the budget first and then recorded. Hand the
        result to ``Aggregator.step(global, [result], [1.0])`` for FedAdam (post-processing)."""
        if not states:
            raise ValueError("no site states to aggregate")
        step = [(self.noise_multiplier, self.sample_rate, 1)]
        self.ledger.check(step)
        clipped = [clip_update(global_state, s, self.clip) for s in states]
        std = noise_std(self.noise_multiplier, self.clip, len(states))
        out = {k: np.asarray(v).copy() for k, v in global_state.items()}
        for k in float_keys(global_state):
            mean = np.mean([np.asarray(c[k], dtype=np.float64) for c in clipped], axis=0)
            noisy = mean + self.rng.normal(0.0, std, size=mean.shape)
            out[k] = noisy.astype(np.asarray(global_state[k]).dtype)
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
