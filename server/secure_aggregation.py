"""SecAgg+ for the protocol's training rounds over a Flower Grid: the server learns the weighted
average of the sites' updates, never one site's.

Flower 1.42 runs SecAgg+ through its legacy API only (``../shared/notes/flower-1.42.md``):
``SecAggPlusWorkflow`` drives a legacy ``Strategy`` inside a ``LegacyContext``. One training
round of ``fedmets.server.protocol`` becomes one run of that workflow, started here with the state
``DefaultWorkflow`` would have set up before a fit round (current round, global parameters):

1. *setup*: the sites get SecAgg+'s settings and answer with two public keys each;
2. *share keys*: each site gets the others' public keys and returns its secrets' Shamir shares,
   encrypted for each of the others;
3. *collect masked vectors*: each site gets its shares and the training request
   (``fedmets.shared.wire.to_fitins``: weights, standardisation vectors, settings), trains, and
   sends its vector (``fedmets.shared.wire.to_fitres``: update and per-patient sums) scaled by its
   weight (training patients ``n``), quantised and masked -- plus the weight in clear;
4. *unmask*: the sites that are left send the shares that remove the masks of the sum.

:class:`_OneRound` is the legacy strategy: it hands out the prepared ``FitIns`` and keeps what
``aggregate_fit`` receives, the average and each site's weight (the per-site parameters the
workflow passes are that same average: the server never holds one site's vector).
:class:`_Guarded` stops a round early where Flower 1.42 would fail later or reveal too much:

- a site lost during *setup* or *share keys*: Flower's unmask stage would then ask the others
  for shares of a key the lost site never shared, and fail after every site has trained. The
  round stops before anyone trains and :func:`secure_round` runs it again without that site.
- fewer than 2 sites with a positive weight after *collect masked vectors*: the "sum" would be
  one site's update. The round stops before unmasking (the protocol stops the run).

A site lost during training (*collect masked vectors*) is what SecAgg+ is built for: its
pairwise masks are rebuilt from the others' shares and the round completes over the rest, as
long as every site keeps at least :func:`reconstruction_threshold` live neighbours.

Precision. SecAgg+ scales each vector by ``weight / max_weight``, clips it to
``[-CLIPPING_RANGE, CLIPPING_RANGE]`` and rounds it stochastically to ``QUANTIZATION_RANGE``
levels before masking; :func:`error_bound` is what that costs per value of the average.
Updates (not weights) are sent, so clipping only bites on an update above 8 in one parameter.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Context, RecordDict
from flwr.common import FitIns, FitRes, Parameters, Scalar, parameters_to_ndarrays
from flwr.server import LegacyContext, ServerConfig
from flwr.server.client_manager import ClientManager
from flwr.server.client_proxy import ClientProxy
from flwr.server.compat.grid_client_proxy import GridClientProxy
from flwr.server.strategy import Strategy
from flwr.server.workflow import SecAggPlusWorkflow
from flwr.server.workflow.constant import MAIN_CONFIGS_RECORD, MAIN_PARAMS_RECORD, Key
from flwr.serverapp import Grid

from fedmets.shared import wire

CLIPPING_RANGE = 8.0
QUANTIZATION_RANGE = 2**22
MODULUS_RANGE = 2**32
"""SecAgg+'s quantisation (Flower's defaults): sums of up to ``MODULUS_RANGE /
QUANTIZATION_RANGE`` = 1024 sites cannot overflow."""


def reconstruction_threshold(sites: int) -> int:
    """Shares that rebuild a site's secret: a strict majority of the round's sites, at least 2.
    Fewer colluding parties than that learn nothing of a site's masks; a round survives
    ``sites - threshold`` dropouts (1 of 3 or 4, 2 of 5)."""
    return max(2, sites // 2 + 1)


def max_weight(largest_site: int) -> float:
    """SecAgg+'s ``max_weight`` (every site learns it): the smallest power of 2 at or above the
    largest site's patient count, so that no weight exceeds it and only its magnitude is told."""
    return float(2 ** math.ceil(math.log2(max(largest_site, 2))))


def error_bound(weights: Sequence[int], max_weight: float, largest: float = 1.0) -> float:
    """The most a value of the secure average can differ from the exact average weighted by
    ``weights`` (the sites' training patients), for values of at most ``largest`` in size:
    each site's scaled value is rounded to a step of ``2 * CLIPPING_RANGE /
    QUANTIZATION_RANGE`` and its weight to ``1 / QUANTIZATION_RANGE`` of ``max_weight``, and the
    sum is divided by the sum of the scaled weights."""
    used = [w for w in weights if w > 0]
    scaled = sum(w / max_weight for w in used) - len(used) / (2 * QUANTIZATION_RANGE)
    return len(used) * (2 * CLIPPING_RANGE + largest) / (QUANTIZATION_RANGE * scaled)


@dataclass
class SecureRound:
    """What one secure training round gave the server.

    ``aggregate``: the average as one reply payload (``fedmets.shared.wire.from_secure_average``;
    ``n`` the sum of the weights), None when the round stopped (``halted`` says why). ``weights``:
    the weight each site sent in clear, for every site whose masked vector is in the sum (0: it
    could not train and sent zeros). ``lost``: site -> the SecAgg+ stage it dropped out in,
    for sites whose vector is not in the sum."""

    aggregate: dict[str, Any] | None
    weights: dict[str, int] = field(default_factory=dict)
    lost: dict[str, str] = field(default_factory=dict)
    halted: str | None = None
    attempts: int = 1


class _OneRound(Strategy):
    """The legacy strategy the workflow drives for one round: the prepared FitIns per node out;
    the secure average and each node's weight in."""

    def __init__(self, instructions: Mapping[int, tuple[ClientProxy, FitIns]]) -> None:
        self.instructions = dict(instructions)
        self.average: list[np.ndarray] | None = None
        self.weights: dict[int, int] = {}

    def initialize_parameters(self, client_manager: ClientManager) -> Parameters | None:
        return None

    def configure_fit(
        self, server_round: int, parameters: Parameters, client_manager: ClientManager
    ) -> list[tuple[ClientProxy, FitIns]]:
        return list(self.instructions.values())

    def aggregate_fit(
        self,
        server_round: int,
        results: list[tuple[ClientProxy, FitRes]],
        failures: list[tuple[ClientProxy, FitRes] | BaseException],
    ) -> tuple[Parameters | None, dict[str, Scalar]]:
        # SecAggPlusWorkflow sets every result's parameters to the unmasked average
        self.weights = {proxy.node_id: int(res.num_examples) for proxy, res in results}
        if results:
            self.average = parameters_to_ndarrays(results[0][1].parameters)
        return None, {}

    def configure_evaluate(self, server_round, parameters, client_manager):  # noqa: ANN001, ANN201
        return []

    def aggregate_evaluate(self, server_round, results, failures):  # noqa: ANN001, ANN201
        return None, {}

    def evaluate(self, server_round, parameters):  # noqa: ANN001, ANN201
        return None


class _Guarded(SecAggPlusWorkflow):
    """SecAggPlusWorkflow that notes at which stage each node dropped out and stops early (see
    the module docstring): ``halted`` says why, ``retry`` whether to run again without the
    nodes in ``lost``."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lost: dict[int, str] = {}
        self.halted: str | None = None
        self.retry = False

    def _lost(self, before: set[int], state: Any, stage: str) -> bool:
        gone = set(before) - set(state.active_node_ids)
        for node in gone:
            self.lost.setdefault(node, stage)
        return bool(gone)

    def _stop(self, reason: str) -> bool:
        self.halted = self.halted or reason
        return False

    def setup_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().setup_stage(grid, context, state)
        if self._lost(state.sampled_node_ids, state, "setup"):
            self.retry = True
            return self._stop("a site was lost before the keys were shared")
        return ok or self._stop("SecAgg+ setup failed (fewer than 2 sites?)")

    def share_keys_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        before = set(state.active_node_ids)
        ok = super().share_keys_stage(grid, context, state)
        if self._lost(before, state, "share keys"):
            self.retry = True
            return self._stop("a site was lost while the keys were shared")
        return ok or self._stop("too few sites left for the reconstruction threshold")

    def collect_masked_vectors_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        before = set(state.active_node_ids)
        ok = super().collect_masked_vectors_stage(grid, context, state)
        self._lost(before, state, "training")
        if not ok:
            return self._stop("too many sites lost in training for the reconstruction threshold")
        trained = [res.num_examples for _, res in state.legacy_results if res.num_examples > 0]
        if len(trained) < 2:
            return self._stop(
                f"{len(trained)} site(s) trained: a secure sum needs 2, or it is one site's update"
            )
        return True

    def unmask_stage(self, grid: Grid, context: LegacyContext, state: Any) -> bool:
        ok = super().unmask_stage(grid, context, state)  # the lost here are in the sum
        return ok or self._stop("too few shares to remove the masks")


def _attempt(
    grid: Grid,
    nodes: Mapping[str, int],
    route: str,
    requests: Mapping[str, Mapping[str, Any]],
    weight_cap: float,
    timeout: float,
    round_id: int,
) -> tuple[SecureRound, bool]:
    """One run of the workflow over ``nodes`` (site -> node id); (outcome, retry)."""
    by_node = {node: site for site, node in nodes.items()}
    instructions = {
        node: (GridClientProxy(node, grid, grid.run.run_id), wire.to_fitins(route, requests[site]))
        for site, node in nodes.items()
    }
    strategy = _OneRound(instructions)
    state = RecordDict()
    state[MAIN_CONFIGS_RECORD] = ConfigRecord({Key.CURRENT_ROUND: round_id})
    state[MAIN_PARAMS_RECORD] = ArrayRecord()
    context = LegacyContext(
        Context(run_id=grid.run.run_id, node_id=0, node_config={}, state=state, run_config={}),
        config=ServerConfig(num_rounds=1),
        strategy=strategy,
    )
    for proxy, _ in instructions.values():  # for the workflow's log ("sampled 3 out of 3")
        context.client_manager.register(proxy)
    workflow = _Guarded(
        num_shares=1.0,  # every site is every other's neighbour (a handful of hospitals)
        reconstruction_threshold=reconstruction_threshold(len(nodes)),
        max_weight=weight_cap,
        clipping_range=CLIPPING_RANGE,
        quantization_range=QUANTIZATION_RANGE,
        modulus_range=MODULUS_RANGE,
        timeout=timeout,
    )
    workflow(grid, context)
    weights = {by_node[n]: w for n, w in strategy.weights.items()}
    lost = {by_node[n]: stage for n, stage in workflow.lost.items() if by_node[n] not in weights}
    if strategy.average is None or workflow.halted:
        return SecureRound(None, weights, lost, workflow.halted or "no aggregate"), workflow.retry
    request = next(iter(requests.values()))
    aggregate = wire.from_secure_average(request, strategy.average, sum(weights.values()))
    return SecureRound(aggregate, weights, lost), False


def secure_round(
    grid: Grid,
    nodes: Mapping[str, int],
    route: str,
    requests: Mapping[str, Mapping[str, Any]],
    *,
    weight_cap: float,
    timeout: float,
    round_id: int = 1,
    say: Callable[[str], None] | None = None,
) -> SecureRound:
    """``route`` (a training route) answered by every site of ``nodes`` through SecAgg+; the
    same request goes to every site except for its bookkeeping fields. A site lost before the
    keys were shared is left out and the round run again (nothing was trained yet)."""
    nodes = dict(nodes)
    lost: dict[str, str] = {}
    attempts = 0
    while True:
        attempts += 1
        if len(nodes) < 2:
            return SecureRound(None, {}, lost, f"{len(nodes)} site(s) left: SecAgg+ needs 2")
        outcome, retry = _attempt(
            grid,
            nodes,
            route,
            {s: requests[s] for s in nodes},
            weight_cap,
            timeout,
            round_id,
        )
        lost.update(outcome.lost)
        outcome.lost, outcome.attempts = lost, attempts
        if not retry or not outcome.lost:
            return outcome
        if say:
            say(f"  SecAgg+ round restarted without {', '.join(sorted(outcome.lost))}")
        nodes = {s: n for s, n in nodes.items() if s not in lost}
