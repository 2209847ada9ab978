"""Deployment with real processes on loopback (see test_deployment.py): a run a site has not
approved is refused there, and answered after ``fedmets site approve`` (which pins the app
bundle, built with ``flwr build``, that relays it); a registered node that
claims another site's id is left out (bound identities); a site crashes while both folds run at
once and rejoins (its site service runs on); what the server received is what each site's
audit log says it sent, and every log's hash chain is intact."""

from __future__ import annotations

import json
import shutil
import subprocess

import pytest
from deployment import RUN_TIMEOUT_S, federation_toml, start_all_and_wait, wait_for
from test_protocol import SITES

from fedmets.client.audit import verify
from fedmets.client.release import site_audit_path
from fedmets.shared.app_digest import fab_digest
from fedmets.shared.config import load_site_config
from fedmets.shared.wire import REPLY_KINDS
from fedmets.simulation.loopback import flower_bin, stop_process

pytestmark = pytest.mark.slow  # real flower-superlink / flower-supernode processes


def _impostor(federation) -> None:
    """A registered hospital whose site service says it is site_a (site_c's data copied)."""
    site_c = federation.sites["site_c"]
    folder = federation.root / "impostor"
    shutil.copytree(site_c.parent, folder)
    toml = folder / site_c.name
    toml.write_text(toml.read_text().replace('site_id = "site_c"', 'site_id = "site_a"'))
    federation.add_site("impostor", toml)
    federation.register("impostor")


def test_approval_identities_and_a_crashed_site_that_rejoins_with_every_reply_audited(
    federation,
):
    root = federation.root
    _impostor(federation)
    start_all_and_wait(federation)
    identities = federation.identities()
    assert sorted(identities) == ["site_a", "site_b", "site_c"]

    # the run, before site_b and site_c approved it: refused there; the impostor left out
    # both folds at once: site_c crashes while their requests reach it in batches
    toml = federation_toml(
        root, "dropout", min_sites=2, identities=identities, round_timeout_s=30, parallel_folds=2
    )
    out = root / "run-unapproved"
    run = federation.run(toml, out, approving=["site_a", "impostor"])
    try:
        run.wait(timeout=RUN_TIMEOUT_S)
    finally:
        stop_process(run)
    error = (out / "error.txt").read_text()
    assert "1 answering site(s) proved their ids" in error and "min_sites is 2" in error
    for site in ("site_b", "site_c"):
        audit = site_audit_path(load_site_config(federation.sites[site])).read_text()
        refusal = json.loads(audit.splitlines()[-1])
        assert (refusal["run"], refusal["rule"], refusal["sent"]) == (
            "dropout",
            "policy.approval",
            False,
        )

    # site_c approves the same run and the app bundle with the real commands (site_b through
    # the harness): the run is answered, and goes on without the impostor
    subprocess.run(
        [flower_bin("flwr"), "build", "--app", str(federation.app)], cwd=root, check=True, text=True
    )
    (fab,) = root.glob("*.fab")
    approve = [
        flower_bin("fedmets"),
        "site",
        "approve",
        "--config",
        str(federation.sites["site_c"]),
        "--app",
        str(fab),
    ]
    done = subprocess.run([*approve, "--run-config", str(toml)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    out = root / "run-dropout"
    run = federation.run(toml, out, approving=["site_a", "site_b", "impostor"])
    try:
        wait_for(out / "server.log", "fusion: 3 networks", run)
        federation.kill_supernode("site_c")
        wait_for(out / "server.log", "site site_c is offline", run)
        federation.start_supernode("site_c")
        assert run.wait(timeout=RUN_TIMEOUT_S) == 0
    finally:
        stop_process(run)
    result = json.loads((out / "federated.json").read_text())
    assert result["app_sha256"] == fab_digest(fab)  # the results name the app that ran
    assert "site_c" in {d["site"] for d in result["dropouts"]}
    assert "site site_c rejoined" in (out / "server.log").read_text()
    assert (
        "refused: it claims site id 'site_a', but its signature does not verify"
        in (out / "server.log").read_text()
    )
    per_site = result["models"]["none/radiomics+clinical"]["per_site"]
    assert set(per_site) == {"site_a", "site_b", "site_c"}
    # every request site_c answered came through the app it pinned, as its log names it
    audit = site_audit_path(load_site_config(federation.sites["site_c"])).read_text()
    entries = [json.loads(line) for line in audit.splitlines()]
    answered = [e for e in entries if e.get("run") == "dropout" and e["sent"]]
    assert answered and {e["app_sha256"] for e in answered} == {fab_digest(fab)}

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
                key = (entry["site"], entry["route"], entry["fold"], entry["round"])
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
