"""The runbook as written: ``scripts/pilot.sh`` (the commands of docs/deployment.md, one host,
two hospitals) runs a federation from certificates to results: each hospital makes its own
key, the centre registers it before the SuperNode starts, every process logs to its file, the
SuperNodes (each with its own FLWR_HOME and port) reach the SuperLink through the proxy, each
hospital approves the run and pins its app bundle, and the node-id to hospital table is printed."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
from deployment import federation_toml
from test_protocol import SITES, write_sites

from fedmets.shared.app_digest import fab_digest

pytestmark = pytest.mark.slow  # real processes, one whole run

PILOT = Path(__file__).resolve().parent.parent / "scripts" / "pilot.sh"


def test_the_pilot_script_runs_the_runbook_to_results(tmp_path) -> None:
    cohort = tmp_path / "cohort"
    write_sites(cohort, folds=2)
    shutil.rmtree(cohort / "site_c")  # two hospitals: the steps are the same for any number
    hospitals = sorted(set(SITES) - {"site_c"})
    # both folds at once: their requests reach each hospital's service in batch messages
    fed = federation_toml(tmp_path, "runbook", min_sites=2, round_timeout_s=120, parallel_folds=2)
    work = tmp_path / "work"
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    started = time.monotonic()
    done = subprocess.run(
        ["bash", str(PILOT), str(cohort), str(work), str(fed)],
        capture_output=True,
        text=True,
        timeout=900,
        env=env,
    )
    print(f"pilot: {time.monotonic() - started:.0f} s")
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    table = (work / "node-table.txt").read_text().splitlines()
    assert table[0].split() == ["node-id", "hospital"]
    assert sorted(line.split()[1] for line in table[1:]) == hospitals
    result = json.loads((work / "run" / "federated.json").read_text())
    assert sorted(result["models"]["none/radiomics+clinical"]["per_site"]) == hospitals
    assert not result["dropouts"]
    logs = {p.stem for p in (work / "logs").glob("*.log")}
    expected = {"superlink", "proxy", "flwr-run"}
    expected |= {f"{kind}-{site}" for kind in ("service", "supernode") for site in hospitals}
    assert expected <= logs
    access = (work / "centre" / "proxy" / "access.log").read_text()
    assert "/v1/fleet/pull-messages" in access  # the hospitals came in through the proxy
    (bundle,) = work.glob("*.fab")  # each hospital pinned the bundle; its relays named it
    for site in hospitals:
        service_log = (work / "logs" / f"service-{site}.log").read_text()
        assert f"(app {fab_digest(bundle)[:12]}): answered" in service_log
