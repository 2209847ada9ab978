"""Deployment with real processes on loopback: a TLS SuperLink with SuperNode authentication,
three hospital SuperNodes (tabular sites), `flwr run` of the fedmets app. Refused connections,
a crashed and restarted site, too few sites, a stopped and resumed server, and the wire audit.

Each message starts a fresh ClientApp process, so these runs are kept small (2 folds, 1 fusion
round, tabular sites)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import tomli_w
from test_protocol import SITES, _cfg, write_sites

from fedmets.client.site_worker import SiteWorker
from fedmets.server.certs import make_site_keys
from fedmets.server.protocol import FederatedProtocol
from fedmets.shared.config import load_federation_config, load_site_config
from fedmets.shared.wire import REPLY_KINDS
from fedmets.simulation.in_process import InProcessLink
from fedmets.simulation.loopback import LoopbackFederation, stop_process

pytestmark = pytest.mark.slow  # real flower-superlink / flower-supernode processes

RUN_TIMEOUT_S = 600
RESUME_TOLERANCE = 0.01
"""Deployed (stopped, resumed) vs in-process metrics: the ClientApp processes may run torch
on another thread count, so sums can differ in the last bits and a score can cross a
histogram bin edge."""


def _federation(root: Path, name: str, **federation) -> Path:
    cfg = _cfg(
        cv={"folds": 2},
        stages={"fusion_rounds": 1},
        federation={"round_timeout_s": 45, **federation},
    )
    data = cfg.model_dump(mode="json", exclude_none=True)
    data["run"]["name"] = name
    path = root / f"{name}.toml"
    path.write_text(tomli_w.dumps(data))
    return path


def _wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``path`` contains ``text`` (fails if ``process`` ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before {text!r} appeared in {path}")
        time.sleep(0.5)
    pytest.fail(f"{text!r} did not appear in {path} within {timeout} s")


def _start_all_and_wait(federation: LoopbackFederation, timeout: float = 240) -> None:
    """(Re)start every site's SuperNode until all run and the SuperLink lists exactly them as
    online. A SuperNode restarted while its killed predecessor is still listed online (until
    its heartbeat expires) is refused and exits: it is started again a little later."""
    deadline = time.monotonic() + timeout
    online: list = []
    while time.monotonic() < deadline:
        for site in federation.sites:
            process = federation.supernodes.get(site)
            if process is None or process.poll() is not None:
                federation.supernodes.pop(site, None)
                federation.start_supernode(site)
        time.sleep(5)
        listed = json.loads(federation.flwr("supernode", "list", "--format", "json").stdout)
        online = [n for n in listed.get("nodes", []) if n.get("status") == "online"]
        alive = all(p.poll() is None for p in federation.supernodes.values())
        if alive and len(online) == len(federation.sites):
            return
    pytest.fail(f"SuperNodes online: {len(online)}, expected {len(federation.sites)}")


@pytest.fixture(scope="module")
def federation(tmp_path_factory):
    root = tmp_path_factory.mktemp("deployment")
    sites = write_sites(root / "sites", folds=2)
    with LoopbackFederation(root, sites) as fed:
        fed.start_superlink()
        for site in sites:
            fed.register(site)
        yield fed


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


def test_run_survives_a_crashed_site_that_rejoins_and_every_reply_is_audited(federation):
    root = federation.root
    _start_all_and_wait(federation)
    out = root / "run-dropout"
    run = federation.run(_federation(root, "dropout", min_sites=2), out)
    try:
        _wait_for(out / "server.log", "fold 1/2: selection", run)
        _wait_for(out / "server.log", "fusion: 3 networks", run)
        federation.kill_supernode("site_c")
        _wait_for(out / "server.log", "fold 2/2: selection", run)
        federation.start_supernode("site_c")
        assert run.wait(timeout=RUN_TIMEOUT_S) == 0
    finally:
        stop_process(run)
    result = json.loads((out / "federated.json").read_text())
    assert "site_c" in {d["site"] for d in result["dropouts"]}
    assert "site site_c rejoined" in (out / "server.log").read_text()
    per_site = result["models"]["none/radiomics+clinical"]["per_site"]
    assert set(per_site) == {"site_a", "site_b", "site_c"}

    # the wire audit: what the server received is what each site logged as sent
    received = [json.loads(line) for line in (out / "received.jsonl").read_text().splitlines()]
    sent = {}
    for site, toml in federation.sites.items():
        audit = load_site_config(toml).paths.output / "audit" / "wire-audit.jsonl"
        for line in audit.read_text().splitlines():
            entry = json.loads(line)
            if entry["run"] == "dropout":
                key = (site, entry["route"], entry["fold"], entry["round"])
                sent.setdefault(key, []).append(entry["fields"])
    assert received
    for entry in received:
        key = (entry["site"], entry["route"], entry["fold"], entry["round"])
        assert entry["fields"] in sent.get(key, []), key
        n_site = SITES[entry["site"]][0]
        for name, field in entry["fields"].items():
            assert field["kind"] in REPLY_KINDS, (key, name)
            assert n_site not in field.get("shape", []), (key, name, field)
        if any(f["kind"] != "count" for f in entry["fields"].values()):
            assert entry["patients"] >= 5


def test_too_few_sites_stop_the_run_after_the_round_timeout(federation) -> None:
    root = federation.root
    _start_all_and_wait(federation)
    out = root / "run-too-few"
    run = federation.run(_federation(root, "toofew", min_sites=3, round_timeout_s=20), out)
    try:
        _wait_for(out / "server.log", "fold 1/2: selection", run)
        federation.kill_supernode("site_b")
        killed = time.monotonic()
        run.wait(timeout=RUN_TIMEOUT_S)  # `flwr run` exits 0 even when the ServerApp fails
        stopped_after = time.monotonic() - killed
    finally:
        stop_process(run)
    error = (out / "error.txt").read_text()
    assert "of 3 sites answered" in error and "min_sites is 3" in error
    assert not (out / "federated.json").exists()
    assert stopped_after < 120  # round timeout 20 s: it never waits forever


def test_a_stopped_server_resumes_to_the_uninterrupted_result(federation) -> None:
    root = federation.root
    _start_all_and_wait(federation)
    # After the restart a SuperNode may first run a message the stopped run left queued (Flower
    # 1.42 runs it and refuses the reply) before it takes the census: on 2 busy cores that has
    # outlasted a 45 s round once. No site is lost here, so the round timeout is generous.
    fed_toml = _federation(root, "resume", min_sites=3, round_timeout_s=240)
    out = root / "run-resume"
    run = federation.run(fed_toml, out)
    deadline = time.monotonic() + 300
    while not (out / "checkpoints" / "fold0-thresholds.pkl").is_file():
        assert time.monotonic() < deadline and run.poll() is None
        time.sleep(0.5)
    stop_process(run)
    stop_process(federation.superlink)  # the coordinating centre goes down
    federation.start_superlink()  # same database: the SuperNodes reconnect
    rerun = federation.run(fed_toml, out, resume=True)
    try:
        assert rerun.wait(timeout=RUN_TIMEOUT_S) == 0
    finally:
        stop_process(rerun)
    assert "resumed fold0-thresholds from its checkpoint" in (out / "server.log").read_text()
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
