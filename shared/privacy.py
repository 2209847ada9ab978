"""Differential-privacy accounting shared by the sites and the server: the privacy ledger.

A :class:`PrivacyLedger` is a JSON file listing every release that touched the data it
protects, one entry each:

- a *covered* release (``mechanism`` ``"dp-sgd"`` at a site, ``"gaussian"`` for the server's
  client-level noise) carries the Gaussian mechanism's parameters -- ``noise_multiplier``,
  ``sample_rate``, ``steps`` -- and ``epsilon`` after it (the composition of every covered
  release so far, at the ledger's ``delta``);
- a release that is *not covered* by differential privacy (``mechanism`` ``"none"``: moments,
  covariance, forest importances, deep-feature sums, losses, histograms, ...) is listed too, so
  that the report says what the epsilon does not protect.

Epsilon is Opacus' Rényi-DP accountant (``opacus.accountants.RDPAccountant``) run over the
whole history, in file order: the history list of ``(noise_multiplier, sample_rate, steps)`` is
exactly the accountant's own ``history``. The file is re-read on every call (a site's process
restarts per message) and written atomically; nothing lives in memory only.
"""

from __future__ import annotations

import contextlib
import json
import math
import time
import warnings
from collections.abc import Iterable, Iterator, Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from fedmets.shared.files import exclusive, write_json

LEDGER_FILE = "privacy-ledger.json"
LEDGER_VERSION = 1
COVERED = ("dp-sgd", "gaussian")
"""Mechanisms whose releases the accountant composes; anything else is "not covered"."""
NOT_COVERED = "none"

Step = tuple[float, float, int]
"""One accountant history item: (noise_multiplier, sample_rate, steps)."""


class PrivacyBudgetExceeded(RuntimeError):
    """A planned release would take the protected party's epsilon over its budget."""

    def __init__(self, who: str, spent: float, planned: float, budget: float, delta: float):
        self.who, self.spent, self.planned, self.budget, self.delta = (
            who,
            spent,
            planned,
            budget,
            delta,
        )
        super().__init__(
            f"{who}: privacy budget exceeded: epsilon spent so far {spent:.3f}, after the "
            f"planned training it would be {planned:.3f}, the budget is {budget:.3f} "
            f"(delta {delta:g}); nothing was trained or released. Raise the noise, train "
            f"fewer steps, or raise the budget (a site's: [policy] epsilon_budget in its "
            f"config; the centre's: the run's [dp] epsilon)."
        )


def epsilon_of(history: Iterable[Step], delta: float) -> float:
    """Epsilon of composing ``history`` at ``delta`` with Opacus' RDP accountant (0 if empty;
    inf if any step has no noise): what ``RDPAccountant`` with this history returns, with each
    distinct (noise, rate)'s per-step RDP computed once per process (:func:`_rdp_per_step`),
    since a ledger re-composes its whole history for every planned release."""
    steps = [(float(z), float(q), int(n)) for z, q, n in history if int(n) > 0]
    if not steps:
        return 0.0
    if any(z <= 0 for z, _, _ in steps):
        return math.inf
    from opacus.accountants import RDPAccountant  # imports all of Opacus: only when needed
    from opacus.accountants.analysis.rdp import get_privacy_spent

    rdp = sum(_rdp_per_step(z, q) * n for z, q, n in steps)
    with warnings.catch_warnings():  # the bound at the largest order is valid, only looser
        warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
        epsilon, _ = get_privacy_spent(orders=RDPAccountant.DEFAULT_ALPHAS, rdp=rdp, delta=delta)
    return float(epsilon)


@lru_cache(maxsize=4096)
def _rdp_per_step(noise_multiplier: float, sample_rate: float) -> np.ndarray:
    """RDP of one step of the sampled Gaussian mechanism at each of Opacus' default orders,
    shape (orders,) (``opacus.accountants.analysis.rdp.compute_rdp`` with ``steps=1``)."""
    from opacus.accountants import RDPAccountant
    from opacus.accountants.analysis.rdp import compute_rdp

    rdp = compute_rdp(
        q=sample_rate,
        noise_multiplier=noise_multiplier,
        steps=1,
        orders=RDPAccountant.DEFAULT_ALPHAS,
    )
    rdp.setflags(write=False)
    return rdp


def steps_per_epoch(n: int, batch_size: int) -> int:
    """DP-SGD steps in one epoch of ``n`` rows at ``batch_size`` (Opacus' Poisson loader: as
    many as the plain loader has batches, ceil(n / batch))."""
    return max(1, math.ceil(n / batch_size))


def sample_rate_for(n: int, batch_size: int) -> float:
    """Poisson sampling rate of Opacus' loader for ``n`` rows at ``batch_size``:
    1 / ceil(n / batch)."""
    return 1.0 / steps_per_epoch(n, batch_size)


def plan_noise_multiplier(
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    spent: Sequence[Step] = (),
    tolerance: float = 0.01,
) -> float:
    """The smallest noise multiplier (to ``tolerance`` in epsilon) such that ``steps`` more
    steps at ``sample_rate``, composed after the ``spent`` history, end at most at
    ``target_epsilon``. Without history this is Opacus' ``get_noise_multiplier``.
    ValueError when ``spent`` alone already reaches the target."""
    if not spent:
        return _opacus_noise_multiplier(
            float(target_epsilon), float(delta), float(sample_rate), int(steps), float(tolerance)
        )
    already = epsilon_of(spent, delta)
    if already >= target_epsilon:
        raise ValueError(
            f"epsilon already spent ({already:.3f}) reaches the target {target_epsilon:.3f}"
        )

    def eps(z: float) -> float:
        return epsilon_of([*spent, (z, sample_rate, int(steps))], delta)

    low, high = 0.0, 10.0
    eps_high = eps(high)
    while eps_high > target_epsilon:
        low, high = high, 2 * high
        eps_high = eps(high)
    while target_epsilon - eps_high > tolerance and high - low > 1e-9:
        mid = (low + high) / 2
        eps_mid = eps(mid)
        if eps_mid < target_epsilon:
            high, eps_high = mid, eps_mid
        else:
            low = mid
    return float(high)


@lru_cache(maxsize=1024)
def _opacus_noise_multiplier(
    target_epsilon: float, delta: float, sample_rate: float, steps: int, tolerance: float
) -> float:
    """Opacus' ``get_noise_multiplier`` (a bisection of about 13 accountant calls, up to
    ~0.3 s each at sample rates near 1/2), once per process for each plan: every round of a
    run asks the same plan again (a site service and the server are long-lived processes)."""
    from opacus.accountants.utils import get_noise_multiplier

    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            epsilon_tolerance=tolerance,
        )
    )


class PrivacyLedger:
    """The release ledger of one protected party (a site's patients, or the federation's sites
    for the server's client-level DP), stored as ``folder/privacy-ledger.json``.

    ``who``: the site id (or ``"server"``); ``delta``: the delta every epsilon is reported at;
    ``budget``: the epsilon the party will not go beyond (None: unlimited, still accounted).
    A new object re-reads the file: epsilon accumulates across processes and runs. The file
    keeps ``who`` and ``delta``; a different one is refused (ValueError) rather than mixed.
    """

    def __init__(
        self,
        folder: str | Path,
        who: str,
        delta: float,
        budget: float | None = None,
    ) -> None:
        if not 0 < delta < 1:
            raise ValueError(f"delta must be in (0, 1), got {delta}")
        if budget is not None and budget <= 0:
            raise ValueError(f"the epsilon budget must be > 0, got {budget}")
        self.folder = Path(folder)
        self.path = self.folder / LEDGER_FILE
        self.who = who
        self.delta = float(delta)
        self.budget = None if budget is None else float(budget)
        self.entries = self._read()

    def _read(self) -> list[dict[str, Any]]:
        """The entries stored in the file (none when there is none yet)."""
        if not self.path.is_file():
            return []
        stored = json.loads(self.path.read_text(encoding="utf-8"))
        if stored.get("who") != self.who:
            raise ValueError(
                f"{self.path} is the ledger of {stored.get('who')!r}, not {self.who!r}"
            )
        if not math.isclose(float(stored.get("delta", -1)), self.delta):
            raise ValueError(
                f"{self.path} accounts at delta {stored.get('delta')}, not {self.delta}: "
                "keep one delta per ledger"
            )
        return list(stored.get("entries", []))

    @contextlib.contextmanager
    def _appending(self) -> Iterator[None]:
        """Re-read the file, let the block append, save: processes recording at once (folds
        run in parallel) take turns, and none overwrites another's entries."""
        with exclusive(self.path):
            self.entries = self._read()
            yield
            self.save()

    # ---- accounting ----------------------------------------------------------------------------

    def history(self, stage: str | None = None) -> list[Step]:
        """The accountant history (noise_multiplier, sample_rate, steps) of the covered
        releases (of ``stage`` only, if given), in order."""
        return [
            (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
            for e in self.entries
            if e["mechanism"] in COVERED and (stage is None or e["stage"] == stage)
        ]

    def epsilon(self, planned: Sequence[Step] = (), stage: str | None = None) -> float:
        """Epsilon spent (over every covered release; ``stage``: that stage's only), or what it
        would be after the ``planned`` steps too."""
        return epsilon_of([*self.history(stage), *planned], self.delta)

    def check(self, planned: Sequence[Step]) -> float:
        """The epsilon the ``planned`` steps would reach; PrivacyBudgetExceeded (naming the
        party, spent and planned epsilon and the budget) if above the budget."""
        planned_eps = self.epsilon(planned)
        if self.budget is not None and planned_eps > self.budget:
            raise PrivacyBudgetExceeded(
                self.who, self.epsilon(), planned_eps, self.budget, self.delta
            )
        return planned_eps

    # ---- recording -----------------------------------------------------------------------------

    def record(
        self,
        *,
        stage: str,
        mechanism: str,
        noise_multiplier: float,
        sample_rate: float,
        steps: int,
        max_grad_norm: float,
        fold: int | None = None,
        round: int | None = None,
        run: str | None = None,
        model: str | None = None,
    ) -> dict[str, Any]:
        """Append a covered release and save; returns the entry (with ``epsilon`` after it)."""
        if mechanism not in COVERED:
            raise ValueError(f"mechanism must be one of {COVERED}, got {mechanism!r}")
        entry = {
            **self._where(stage, fold, round, run, model),
            "mechanism": mechanism,
            "covered": True,
            "noise_multiplier": float(noise_multiplier),
            "sample_rate": float(sample_rate),
            "steps": int(steps),
            "max_grad_norm": float(max_grad_norm),
        }
        with self._appending():
            self.entries.append(entry)
            entry["epsilon"] = self.epsilon()
            entry["delta"] = self.delta
        return entry

    def record_uncovered(
        self,
        *,
        stage: str,
        release: str,
        fold: int | None = None,
        round: int | None = None,
        run: str | None = None,
        patients: int | None = None,
    ) -> dict[str, Any]:
        """Append a release that differential privacy does NOT cover (``release``: what was
        sent, e.g. ``"query.moments[n,radiomics_sum]"``) and save. A repeat of the same
        release (run, stage, fold, release) increments that entry's ``times`` instead."""
        with self._appending():
            for entry in reversed(self.entries):
                same = (entry.get("run"), entry["stage"], entry.get("fold"), entry.get("release"))
                if not entry["covered"] and same == (run, stage, fold, release):
                    entry["times"] = int(entry.get("times", 1)) + 1
                    entry["epsilon"] = self.epsilon()
                    return entry
            entry = {
                **self._where(stage, fold, round, run, None),
                "mechanism": NOT_COVERED,
                "covered": False,
                "release": release,
                "patients": None if patients is None else int(patients),
                "times": 1,
                "epsilon": self.epsilon(),
                "delta": self.delta,
            }
            self.entries.append(entry)
        return entry

    @staticmethod
    def _where(
        stage: str, fold: int | None, round_: int | None, run: str | None, model: str | None
    ) -> dict[str, Any]:
        entry: dict[str, Any] = {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "stage": stage}
        for key, value in (("run", run), ("fold", fold), ("round", round_), ("model", model)):
            if value is not None:
                entry[key] = value
        return entry

    def save(self) -> None:
        """Write the ledger atomically (a temporary file renamed over the old one)."""
        write_json(
            self.path,
            {
                "version": LEDGER_VERSION,
                "who": self.who,
                "delta": self.delta,
                "budget": self.budget,
                "accountant": "opacus.accountants.RDPAccountant",
                "entries": self.entries,
            },
            indent=1,
        )

    # ---- reporting -----------------------------------------------------------------------------

    def summary(self, run: str | None = None) -> dict[str, Any]:
        """What the ledger says (entries of ``run`` only, if given; epsilon always over the
        whole history of those entries): ``epsilon`` total, per stage ``epsilon`` (that stage's
        releases composed alone), ``releases`` (covered) and ``not_covered`` (a list of the
        release kinds), plus ``delta`` and ``budget``."""
        return summarise(
            [e for e in self.entries if run is None or e.get("run") == run],
            self.delta,
            self.budget,
        )


def summarise(
    entries: Sequence[Mapping[str, Any]], delta: float, budget: float | None = None
) -> dict[str, Any]:
    """:meth:`PrivacyLedger.summary` of a list of ledger entries."""

    def history(selected: Iterable[Mapping[str, Any]]) -> list[Step]:
        return [
            (float(e["noise_multiplier"]), float(e["sample_rate"]), int(e["steps"]))
            for e in selected
            if e["mechanism"] in COVERED
        ]

    stages: dict[str, dict[str, Any]] = {}
    for e in entries:
        stage = stages.setdefault(
            e["stage"], {"epsilon": 0.0, "releases": 0, "steps": 0, "not_covered": []}
        )
        if e["mechanism"] in COVERED:
            stage["releases"] += 1
            stage["steps"] += int(e["steps"])
        elif e.get("release") not in stage["not_covered"]:
            stage["not_covered"].append(e.get("release"))
    for name, stage in stages.items():
        stage["epsilon"] = epsilon_of(history(e for e in entries if e["stage"] == name), delta)
    return {
        "epsilon": epsilon_of(history(entries), delta),
        "delta": delta,
        "budget": budget,
        "releases": sum(s["releases"] for s in stages.values()),
        "stages": stages,
        "not_covered": sorted({r for s in stages.values() for r in s["not_covered"] if r}),
    }
