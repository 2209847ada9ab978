"""Deployment with real processes on loopback (see test_deployment.py): the coordinating
centre, running both folds at once, stops the run mid-way (``flwr stop``: its ServerApp ends
and frees the results folder), goes down, renews its server certificate, and resumes from its
checkpoints to the result of an uninterrupted run of the folds one after another (the
SuperNodes reconnect through the same CA)."""

from __future__ import annotations

import json
import time

import pytest
from deployment import RUN_TIMEOUT_S, federation_toml, start_all_and_wait

from fedmets.client.site_worker import SiteWorker
from fedmets.server.certs import renew_server_certificate
from fedmets.server.protocol import FederatedProtocol
from fedmets.server.server_app import RUN_LOCK
from fedmets.shared.config import load_federation_config, load_site_config
from fedmets.shared.files import InUse, sole_user
from fedmets.simulation.in_process import InProcessLink
from fedmets.simulation.loopback import stop_process

pytestmark = pytest.mark.slow  # real flower-superlink / flower-supernode processes

DEPLOYED_SITES = ("site_a", "site_b")
"""Two sites: a third adds nothing to stopping and resuming, and costs a ClientApp process
per message (the conftest's ``federation``)."""

RESUME_TOLERANCE = 0.01
"""Deployed (stopped, resumed) vs in-process metrics: the ClientApp processes may run torch
on another thread count, so sums can differ in the last bits and a score can cross a
histogram bin edge."""


def _free(path) -> bool:
    """Whether no process holds ``path``'s lock (``sole_user``)."""
    try:
        with sole_user(path, "test"):
            return True
    except InUse:
        return False


def test_a_stopped_server_resumes_to_the_uninterrupted_result(federation) -> None:
    root = federation.root
    start_all_and_wait(federation)
    # After the restart a SuperNode may first run a message the stopped run left queued (Flower
    # 1.42 runs it and refuses the reply) before it takes the census: on 2 busy cores that has
    # outlasted a 45 s round once. No site is lost here, so the round timeout is generous.
    # Both folds at once: their requests reach each site in batches (fedmets.server.fold_lanes),
    # and each fold resumes from its own checkpoints.
    fed_toml = federation_toml(root, "resume", min_sites=2, round_timeout_s=240, parallel_folds=2)
    out = root / "run-resume"
    run = federation.run(fed_toml, out)
    deadline = time.monotonic() + 300
    selected = [out / "checkpoints" / f"fold{fold}-selection.npz" for fold in (0, 1)]
    while not all(path.is_file() for path in selected):  # both folds past their selection
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.5)
    # the operator stops the run (docs/deployment.md step 6): its ServerApp ends, freeing OUT
    runs = json.loads(federation.flwr("ls", "--format", "json").stdout)["runs"]
    (run_id,) = [r["run-id"] for r in runs if r["status"].startswith("running")]
    stopped = federation.flwr("stop", run_id)
    assert stopped.returncode == 0, stopped.stdout + stopped.stderr
    deadline = time.monotonic() + 60
    while not _free(out / RUN_LOCK):
        assert time.monotonic() < deadline, "the stopped run's ServerApp still holds OUT"
        time.sleep(0.5)
    stop_process(run)  # flwr run's log stream
    stop_process(federation.superlink)  # the coordinating centre goes down
    served = federation.certs["server_cert"].read_bytes()
    renew_server_certificate(  # and comes back with a new certificate from the same CA
        federation.certs["ca"].parent, federation.certs["ca_key"], ["localhost", "127.0.0.1"]
    )
    assert federation.certs["server_cert"].read_bytes() != served
    stop_process(federation.proxy_process)  # the proxy serves the renewed certificate too
    federation.start_superlink()  # same database: the SuperNodes reconnect, none re-registered
    rerun = federation.run(fed_toml, out, resume=True)
    try:
        assert rerun.wait(timeout=RUN_TIMEOUT_S) == 0
    finally:
        stop_process(rerun)
    log = (out / "server.log").read_text()
    for fold in (0, 1):  # each fold resumed from its own checkpoints
        assert f"resumed fold{fold}-selection from its checkpoint" in log
        # and went on from there itself: the stopped run's ServerApp had ended (one left
        # running would hold OUT, and the resume would be refused)
        assert f"resumed fold{fold}-thresholds" not in log
    resumed = json.loads((out / "federated.json").read_text())
    workers = {s: SiteWorker([load_site_config(p)]) for s, p in federation.sites.items()}
    reference = FederatedProtocol(
        InProcessLink(workers), load_federation_config(fed_toml), "resume-reference"
    ).run_all()
    for model, metrics in reference["models"].items():
        for key in ("auc", "acc", "sen", "spe", "brier"):
            assert resumed["models"][model]["pooled"][key] == pytest.approx(
                metrics["pooled"][key], abs=RESUME_TOLERANCE
            ), (model, key)
