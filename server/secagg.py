"""A SecAgg+ demonstrator (Flower's legacy path): the server sees only the sum of the sites'
masked, quantised updates, never one site's, and the weighted average equals plain FedAvg.

Flower 1.42 runs SecAgg+ only through the legacy API (see ``../shared/notes/flower-1.42.md``):
a ``NumPyClient`` behind ``secaggplus_mod`` on the ClientApp, and on the ServerApp a
``LegacyContext`` with ``flwr.server.strategy.FedAvg`` driven by
``DefaultWorkflow(fit_workflow=SecAggPlusWorkflow(...))``. This module builds such a pair of
apps for a tiny model (one weight matrix and one bias) where each simulated site ``i`` returns
known parameters ``base + (i + 1) * step`` with ``10 * (i + 1)`` examples, runs one round in
Flower's simulation engine, and writes what the strategy aggregated to a JSON file, so a test
can compare it with the FedAvg of the parameters that were sent.

A site listed in ``drop`` fails during its fit (after the SecAgg+ key exchange): SecAgg+
reconstructs its mask from the other sites' shares and the round still completes over the
sites that answered. Not wired into the protocol (``server.protocol`` speaks the Message API);
a demonstrator of what SecAgg+ costs and guarantees, kept honest by its test.

SecAgg+ scales each site's parameters by ``examples / max_weight``, clips them to
``[-clipping_range, clipping_range]`` and quantises them to ``quantization_range`` levels
before masking: the aggregate differs from FedAvg by about ``2 * clipping_range /
quantization_range`` (3.8e-6 by default) divided by ``sum(examples) / max_weight`` per value --
below 1e-4 here (60-100 examples, max_weight 1000). Parameters beyond the clipping range would
be clipped: fine for weights, not for arbitrary statistics.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

SHAPES = {"w": (4, 3), "b": (3,)}


def site_parameters(site: int, seed: int = 0) -> tuple[list[np.ndarray], int]:
    """What simulated site ``site`` sends back: parameters and its number of examples."""
    rng = np.random.default_rng(seed)
    base = [rng.uniform(-1, 1, size=s).astype(np.float32) for s in SHAPES.values()]
    step = [rng.uniform(-0.1, 0.1, size=s).astype(np.float32) for s in SHAPES.values()]
    return [b + (site + 1) * d for b, d in zip(base, step, strict=True)], 10 * (site + 1)


def fedavg(sites: Sequence[int], seed: int = 0) -> list[np.ndarray]:
    """Plain FedAvg (weighted by examples) of the parameters of ``sites``."""
    params, weights = zip(*(site_parameters(s, seed) for s in sites), strict=True)
    total = float(sum(weights))
    return [
        sum(w / total * p[i].astype(np.float64) for p, w in zip(params, weights, strict=True))
        for i in range(len(SHAPES))
    ]


def build_apps(n_sites: int, out: Path, drop: Sequence[int] = (), seed: int = 0):
    """(ServerApp, ClientApp) of a one-round SecAgg+ FedAvg over ``n_sites`` simulated sites;
    the aggregate and the sites that took part go to ``out`` (JSON)."""
    from flwr.client import NumPyClient
    from flwr.client.mod import secaggplus_mod
    from flwr.clientapp import ClientApp
    from flwr.common import Context, ndarrays_to_parameters, parameters_to_ndarrays
    from flwr.server import LegacyContext, ServerApp, ServerConfig
    from flwr.server.strategy import FedAvg
    from flwr.server.workflow import DefaultWorkflow, SecAggPlusWorkflow

    class Site(NumPyClient):
        def __init__(self, site: int) -> None:
            self.site = site

        def get_parameters(self, config):
            return site_parameters(self.site, seed)[0]

        def fit(self, parameters, config):
            if self.site in drop:
                raise RuntimeError(f"site {self.site} drops out mid-round")
            params, n = site_parameters(self.site, seed)
            return params, n, {}

    def client_fn(context: Context):
        return Site(int(context.node_config["partition-id"])).to_client()

    class Recording(FedAvg):
        def aggregate_fit(self, server_round, results, failures):
            parameters, metrics = super().aggregate_fit(server_round, results, failures)
            if parameters is not None:
                arrays = parameters_to_ndarrays(parameters)
                out.write_text(
                    json.dumps(
                        {
                            "aggregate": [a.tolist() for a in arrays],
                            "results": len(results),
                            "failures": len(failures),
                        }
                    )
                )
            return parameters, metrics

    server_app = ServerApp()

    @server_app.main()
    def main(grid, context: Context) -> None:
        strategy = Recording(
            fraction_fit=1.0,
            fraction_evaluate=0.0,
            min_fit_clients=n_sites,
            min_available_clients=n_sites,
            accept_failures=True,
            initial_parameters=ndarrays_to_parameters(
                [np.zeros(s, np.float32) for s in SHAPES.values()]
            ),
        )
        legacy = LegacyContext(
            context=context, config=ServerConfig(num_rounds=1), strategy=strategy
        )
        workflow = DefaultWorkflow(
            fit_workflow=SecAggPlusWorkflow(
                num_shares=n_sites, reconstruction_threshold=max(2, n_sites - 1)
            )
        )
        workflow(grid, legacy)

    client_app = ClientApp(client_fn=client_fn, mods=[secaggplus_mod])
    return server_app, client_app


def run_demo(n_sites: int, out: Path, drop: Sequence[int] = (), seed: int = 0) -> dict:
    """Run the SecAgg+ round in Flower's simulation engine (one CPU per site) and return
    ``{"aggregate": [...], "expected": [...], "max_error": float, "results", "failures"}``."""
    from flwr.simulation import run_simulation

    os.environ.setdefault("RAY_DEDUP_LOGS", "0")
    server_app, client_app = build_apps(n_sites, out, drop, seed)
    run_simulation(
        server_app=server_app,
        client_app=client_app,
        num_supernodes=n_sites,
        backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}},
    )
    if not out.is_file():
        raise RuntimeError("the SecAgg+ round produced no aggregate")
    result = json.loads(out.read_text())
    expected = fedavg([s for s in range(n_sites) if s not in drop], seed)
    result["expected"] = [e.tolist() for e in expected]
    result["max_error"] = float(
        max(
            np.max(np.abs(np.asarray(a) - e))
            for a, e in zip(result["aggregate"], expected, strict=True)
        )
    )
    return result
