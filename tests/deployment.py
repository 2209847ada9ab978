"""What the deployment tests (``tests/test_deployment*.py``) share: a federation TOML for a
small run, waiting for a run's log, (re)starting every SuperNode. Each of those modules gets a
loopback federation of its own (the ``federation`` fixture in conftest.py), so pytest-xdist runs
them side by side. Each message starts a fresh ClientApp process, so the runs are kept small
(2 folds, 1 fusion round, tabular sites)."""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import pytest
import tomli_w
from test_protocol import _cfg

from fedmets.simulation.loopback import LoopbackFederation

RUN_TIMEOUT_S = 600


def federation_toml(root: Path, name: str, **federation) -> Path:
    """The deployment tests' federation (``test_protocol._cfg``: no final model, the
    ServerApp's final model and bundle are tested by ``test_simulate``; 2 folds, 1 fusion
    round)."""
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


def wait_for(path: Path, text: str, process: subprocess.Popen, timeout: float = 300) -> None:
    """Wait until ``path`` contains ``text`` (fails if ``process`` ends first)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if path.is_file() and text in path.read_text():
            return
        if process.poll() is not None:
            pytest.fail(f"the run ended before {text!r} appeared in {path}")
        time.sleep(0.5)
    pytest.fail(f"{text!r} did not appear in {path} within {timeout} s")


def wait_online(
    federation: LoopbackFederation, node_id: int, process: subprocess.Popen, timeout: float = 120
) -> None:
    """Wait until the SuperLink lists SuperNode ``node_id`` as online (fails if ``process``, the
    SuperNode, ends first). A message sent to a node registered but not yet online is refused
    by Flower ("destination SuperNode ... never existed")."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        listed = json.loads(federation.flwr("supernode", "list", "--format", "json").stdout)
        # ``flwr supernode register`` prints the id as a number, ``list`` as a string
        if any(
            n.get("node-id") == str(node_id) and n.get("status") == "online"
            for n in listed.get("nodes", [])
        ):
            return
        if process.poll() is not None:
            pytest.fail(f"SuperNode {node_id} ended before it was online")
        time.sleep(1)
    pytest.fail(f"SuperNode {node_id} was not online within {timeout} s")


def start_all_and_wait(federation: LoopbackFederation, timeout: float = 240) -> None:
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
