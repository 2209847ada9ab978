"""``fedmets.shared.run_plan``: the settings a run's config plans for the requests a site's
policy bounds are the settings the run sends (so ``fedmets site approve``, which checks the
plan against the policy, sees what the site will be asked)."""

from __future__ import annotations

import numpy as np
import pytest
from test_protocol import _cfg, sites  # noqa: F401 (the sites fixture)

from fedmets.client.site_worker import SiteWorker
from fedmets.server.protocol import FederatedProtocol
from fedmets.shared import wire
from fedmets.shared.config import load_site_config
from fedmets.shared.run_plan import POLICY_FIELDS, policy_requests
from fedmets.simulation.in_process import InProcessLink


class _RecordingLink(InProcessLink):
    """Keeps every (route, request) it sends, batches too."""

    def __init__(self, workers) -> None:
        super().__init__(workers)
        self.sent: list[tuple[str, dict]] = []

    def ask(self, route, requests):
        self.sent += [(route, request) for request in requests.values()]
        return super().ask(route, requests)

    def ask_batch(self, items):
        self.sent += [item for batch in items.values() for item in batch]
        return super().ask_batch(items)


def _plain(value):
    return np.asarray(value).tolist()


@pytest.mark.parametrize(
    "sections",
    [
        {"model": {"main_radiomics": [3, 6], "main_hidden": [[4], [8, 4]]}},
        pytest.param({"dp": {"mode": "sample", "epsilon": 50.0}}, marks=pytest.mark.slow),
        {"model": {"fusion": "late"}},
    ],
    ids=["main-candidates", "dp-sgd", "late-fusion"],
)
def test_the_planned_settings_are_those_the_run_sends(sites, sections) -> None:  # noqa: F811
    """Every policy-bounded setting of every request of a run (stability ranking, the final
    model; the main model's candidate networks, DP-SGD or late fusion) is one the plan holds
    for that route, every network a request carries is planned, and every planned route is
    asked."""
    cfg = _cfg(
        cv={"folds": 3},
        stages={"fusion_rounds": 1, "final_model": True},
        selection={"ranking": "stability", "stability_resamples": 3},
        **sections,
    )
    link = _RecordingLink({s: SiteWorker([load_site_config(p)]) for s, p in sites.items()})
    FederatedProtocol(link, cfg, "planned").run_all()
    plan: dict[str, list[dict]] = {}
    for route, request in policy_requests(cfg, images=False, clinical=True):
        plan.setdefault(route, []).append(request)
    checked = set()
    for route, request in link.sent:
        bounded = [f for f in (*POLICY_FIELDS, "folds", "dp_mode") if f in request]
        networks = {k for k in request if k.startswith(wire.WEIGHTS_PREFIX)}
        if not bounded and not networks:
            continue
        assert route in plan, (route, bounded, sorted(networks)[:3])
        for field in bounded:
            planned = [_plain(p[field]) for p in plan[route] if field in p]
            assert _plain(request[field]) in planned, (route, field, request[field], planned)
            checked.add((route, field))
        planned_networks = set().union(*plan[route])
        assert networks <= planned_networks, (route, sorted(networks - planned_networks))
    assert set(plan) <= {route for route, _ in link.sent}  # nothing planned that is not asked
    assert {("query.importance", "resamples"), ("train.fusion", "hidden")} <= checked
    assert {"query.folds", "query.importance", "train.fusion", "query.evaluation"} <= {
        route for route, _ in checked
    }
