"""A ``fedmets.server.protocol.SiteLink`` that calls site workers in this process: the centralised
(all sites pooled into one worker) and local-only (one site alone) baselines run the federated
protocol's very code without a network. Requests and replies still pass ``fedmets.shared.wire``'s
encoding and the site's release gate.

It cannot run SecAgg+ (``secure_aggregation = False``): Flower's SecAgg+ needs a Flower Grid and
SuperNodes; with ``[strategy] secure_aggregation`` the protocol says so and aggregates in clear
(the baselines it serves have one site each: there is no sum to hide a site in)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from fedmets.client.release import answer
from fedmets.client.site_worker import SiteWorker
from fedmets.server.protocol import FederatedProtocol
from fedmets.shared import wire
from fedmets.shared.config import FederationConfig


class InProcessLink:
    """Site id -> worker; every request is encoded and decoded as on the wire."""

    secure_aggregation = False

    def __init__(self, workers: Mapping[str, SiteWorker]) -> None:
        self.workers = dict(workers)

    def sites(self) -> list[str]:
        return sorted(self.workers)

    def rename(self, names: Mapping[str, str]) -> None:
        self.workers = {names.get(k, k): w for k, w in self.workers.items()}

    def refuse(self, key: str) -> None:
        del self.workers[key]

    def ask(self, route: str, requests: Mapping[str, dict[str, Any]]) -> dict[str, dict]:
        replies = {}
        for site, request in requests.items():
            sent = wire.from_records(wire.to_records(route, request, reply=False))
            reply = answer(self.workers[site], route, sent)
            replies[site] = wire.from_records(wire.to_records(route, reply, reply=True))
        return replies


def one_site_config(fed: FederationConfig) -> FederationConfig:
    """``fed`` for one in-process site (min_sites 1, no secure aggregation: one site's "sum" is
    its own update, and the in-process link aggregates in clear; no final model: the
    baselines and the study compare cross-validated results)."""
    data = fed.model_dump(mode="json")
    data["federation"]["min_sites"] = 1
    data["strategy"]["secure_aggregation"] = False
    data["stages"]["final_model"] = False
    return FederationConfig.model_validate(data)


def run_in_process(
    worker: SiteWorker,
    fed: FederationConfig,
    run: str,
    state: Path,
    log: Callable[[str], None] | None = None,
) -> dict:
    """The federated protocol of ``fed`` (as :func:`one_site_config`) over ``worker`` alone:
    the centralised study and baseline (every site pooled in one worker, each patient keeping
    its site's fold) and the local-only baselines (one site). The server's privacy ledger goes
    to ``state/server-privacy``. Returns the protocol's result (``FederatedProtocol.run_all``)."""
    protocol = FederatedProtocol(
        InProcessLink({worker.site_id: worker}),
        one_site_config(fed),
        run,
        log,
        privacy_dir=Path(state) / "server-privacy",
    )
    return protocol.run_all()
