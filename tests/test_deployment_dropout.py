"""Deployment with real processes on loopback (see test_deployment.py): a site crashes during
a run and rejoins (its site service runs on); what the server received is what each site's
audit log says it sent, and every log's hash chain is intact."""

from __future__ import annotations

import json

import pytest
from deployment import RUN_TIMEOUT_S, federation_toml, start_all_and_wait, wait_for
from test_protocol import SITES

from fedmets.client.audit import verify
from fedmets.client.release import site_audit_path
from fedmets.shared.config import load_site_config
from fedmets.shared.wire import REPLY_KINDS
from fedmets.simulation.loopback import stop_process

pytestmark = pytest.mark.slow  # real flower-superlink / flower-supernode processes


def test_run_survives_a_crashed_site_that_rejoins_and_every_reply_is_audited(federation):
    root = federation.root
    start_all_and_wait(federation)
    out = root / "run-dropout"
    run = federation.run(federation_toml(root, "dropout", min_sites=2), out)
    try:
        wait_for(out / "server.log", "fold 1/2: selection", run)
        wait_for(out / "server.log", "fusion: 3 networks", run)
        federation.kill_supernode("site_c")
        wait_for(out / "server.log", "fold 2/2: selection", run)
        federation.start_supernode("site_c")
        assert run.wait(timeout=RUN_TIMEOUT_S) == 0
    finally:
        stop_process(run)
    result = json.loads((out / "federated.json").read_text())
    assert "site_c" in {d["site"] for d in result["dropouts"]}
    assert "site site_c rejoined" in (out / "server.log").read_text()
    per_site = result["models"]["none/radiomics+clinical"]["per_site"]
    assert set(per_site) == {"site_a", "site_b", "site_c"}

    # the wire audit: what the server received is what each site logged as sent, in a chain
    # of hashes that no line breaks
    received = [json.loads(line) for line in (out / "received.jsonl").read_text().splitlines()]
    sent = {}
    for site, toml in federation.sites.items():
        audit = site_audit_path(load_site_config(toml))
        assert verify(audit).broken is None, site
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
