"""Deployment with real processes on loopback: a TLS SuperLink with SuperNode authentication
behind the centre's proxy (nginx: the Fleet API only), three hospital SuperNodes (tabular
sites), `flwr run` of the fedmets app: refused connections, a hospital's `flwr` refused at the
proxy, and a run stopped by too few sites. A crashed site with the wire audit, and a stopped and
resumed server, are in test_deployment_dropout.py and test_deployment_resume.py (each module
runs its own federation, side by side under pytest-xdist; helpers in deployment.py)."""

from __future__ import annotations

import json
import subprocess
import time

import pytest
from deployment import RUN_TIMEOUT_S, federation_toml, start_all_and_wait, wait_for

from fedmets.shared.identity import make_site_keys
from fedmets.simulation.loopback import stop_process

pytestmark = pytest.mark.slow  # real flower-superlink / flower-supernode processes


def test_unregistered_and_plaintext_supernodes_are_refused(federation) -> None:
    stranger_key, _ = make_site_keys(federation.root / "strangers", "stranger")
    federation.start_supernode("site_a", key=stranger_key)
    stranger = federation.supernodes.pop("site_a")
    assert stranger.wait(timeout=120) != 0
    federation.start_supernode("site_b", tls=False)
    plaintext = federation.supernodes.pop("site_b")
    try:
        plaintext.wait(timeout=60)
    except subprocess.TimeoutExpired:
        pass  # still retrying: it never got in
    finally:
        stop_process(plaintext)
    nodes = federation.flwr("supernode", "list", "--format", "json")
    listed = json.loads(nodes.stdout)
    assert all(n.get("status") != "online" for n in listed.get("nodes", [])), listed


def test_a_hospital_reaches_the_fleet_api_only(federation) -> None:
    """The SuperNodes connect through the proxy; a hospital's `flwr` (the CA it holds, the
    address it knows) is refused there, while the centre's, on the SuperLink host, works."""
    start_all_and_wait(federation)
    for command in (
        ("supernode", "list", "site", "--format", "json"),
        ("ls", "site", "--format", "json"),
        ("supernode", "register", str(federation.certs["site:site_a.pub"]), "site"),
    ):
        refused = federation.flwr(*command)
        said = refused.stdout + refused.stderr
        assert "403" in said and '"success": true' not in said, (command, said)
    access = (federation.root / "proxy" / "access.log").read_text()
    assert '"POST /v1/control/' in access and '" 403 ' in access
    assert '"POST /v1/fleet/' in access  # the SuperNodes' traffic goes through the proxy
    listed = json.loads(federation.flwr("supernode", "list", "--format", "json").stdout)
    online = [n for n in listed["nodes"] if n.get("status") == "online"]
    assert len(online) == len(federation.sites)  # still connected, through the proxy


def test_too_few_sites_stop_the_run_after_the_round_timeout(federation) -> None:
    root = federation.root
    start_all_and_wait(federation)
    out = root / "run-too-few"
    # 45 s: a census right after the SuperNodes start has taken over 20 s on 2 busy cores
    run = federation.run(federation_toml(root, "toofew", min_sites=3, round_timeout_s=45), out)
    try:
        wait_for(out / "server.log", "fold 1/2: selection", run)
        federation.kill_supernode("site_b")
        killed = time.monotonic()
        run.wait(timeout=RUN_TIMEOUT_S)  # `flwr run` exits 0 even when the ServerApp fails
        stopped_after = time.monotonic() - killed
    finally:
        stop_process(run)
    error = (out / "error.txt").read_text()
    assert "of 3 sites answered" in error and "min_sites is 3" in error
    assert not (out / "federated.json").exists()
    assert stopped_after < 150  # round timeout 45 s: it never waits forever
