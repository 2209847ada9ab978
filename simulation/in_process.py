"""A ``fedmets.server.protocol.SiteLink`` that calls site workers in this process: the centralised
(all sites pooled into one worker) and local-only (one site alone) baselines run the federated
protocol's very code without a network. Requests and replies still pass ``fedmets.shared.wire``'s
encoding and the site's release gate.

It cannot run SecAgg+ (``secure_aggregation = False``): Flower's SecAgg+ needs a Flower Grid and
SuperNodes; with ``[strategy] secure_aggregation`` the protocol says so and aggregates in clear
(the baselines it serves have one site each: there is no sum to hide a site in)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from fedmets.client.release import answer
from fedmets.client.site_worker import SiteWorker
from fedmets.shared import wire


class InProcessLink:
    """Site id -> worker; every request is encoded and decoded as on the wire."""

    secure_aggregation = False

    def __init__(self, workers: Mapping[str, SiteWorker]) -> None:
        self.workers = dict(workers)

    def sites(self) -> list[str]:
        return sorted(self.workers)

    def rename(self, names: Mapping[str, str]) -> None:
        self.workers = {names.get(k, k): w for k, w in self.workers.items()}

    def ask(self, route: str, requests: Mapping[str, dict[str, Any]]) -> dict[str, dict]:
        replies = {}
        for site, request in requests.items():
            sent = wire.from_records(wire.to_records(route, request, reply=False))
            reply = answer(self.workers[site], route, sent)
            replies[site] = wire.from_records(wire.to_records(route, reply, reply=True))
        return replies
