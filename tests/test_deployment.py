"""Deployment with real processes on loopback: a TLS SuperLink with SuperNode authentication
behind the centre's proxy (nginx: the Fleet API only), three hospital SuperNodes (tabular
sites), `flwr run` of the fedmets app: refused connections, a hospital's `flwr` refused at the
proxy, and a hostile app at a SuperNode that cannot read the data. Elsewhere, each module with
a federation of its own (side by side under pytest-xdist; helpers in deployment.py):
test_deployment_dropout.py (a run stopped by too few sites, then approved; a crashed site whose
run goes on after the round timeout; the wire audit), test_deployment_resume.py (a stopped,
resumed server), test_runbook.py (the runbook's script)."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time
import tomllib
from pathlib import Path

import pytest
import tomli_w
from deployment import start_all_and_wait, wait_online

from fedmets.shared.identity import make_site_keys
from fedmets.simulation.loopback import flower_bin, free_port, stop_process

pytestmark = pytest.mark.slow  # real flower-superlink / flower-supernode processes

DEPLOYED_SITES = ("site_a", "site_b")  # the conftest's ``federation``: no test here needs three

NOBODY = 65534  # the user (and group, "nogroup") the probe's SuperNode runs as
PROBE_APP = Path(__file__).resolve().parent / "data" / "probe_app"


def wait_for_socket(path: Path, service: subprocess.Popen, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while not path.is_socket():
        assert service.poll() is None and time.monotonic() < deadline, "the service did not start"
        time.sleep(0.2)


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


def _others_can_run(path: Path) -> bool:
    """Whether a user other than the owner can execute ``path`` (every folder above it
    searchable by others)."""
    path = path.resolve()
    return bool(path.stat().st_mode & 0o001) and all(p.stat().st_mode & 0o001 for p in path.parents)


def _python_for_others() -> str | None:
    """An interpreter of this Python's version that other users can run: this one, or the
    system's (a Python under /root is not); None without one."""
    version = f"python{sys.version_info.major}.{sys.version_info.minor}"
    for candidate in (Path(sys.executable), Path("/usr/bin") / version):
        if candidate.is_file() and _others_can_run(candidate):
            return str(candidate)
    return None


def _flower_for_others(folder: Path, python: str) -> Path:
    """Flower's node commands for a user who cannot run this environment's interpreter: each a
    script in ``folder`` that runs this environment's entry point with ``python``, with this
    environment's packages (their ``.pth`` files read) in place of the system's. Returns
    ``folder``."""
    packages = sysconfig.get_paths()["purelib"]
    folder.mkdir(mode=0o755)
    for name in ("flower-supernode", "flower-superexec", "flwr-clientapp"):
        code = (
            "import runpy, site, sys; "
            "sys.path[:] = [p for p in sys.path if 'dist-packages' not in p]; "
            f"site.addsitedir({packages!r}); sys.argv[0] = {name!r}; "
            f"runpy.run_path({flower_bin(name)!r}, run_name='__main__')"
        )
        script = folder / name
        script.write_text(f'#!/bin/sh\nexec {python} -c {shlex.quote(code)} "$@"\n')
        script.chmod(0o755)
    return folder


@pytest.mark.skipif(os.geteuid() != 0, reason="runs a SuperNode as another user: needs root")
@pytest.mark.skipif(
    _python_for_others() is None,
    reason="no Python of this version that other users can run (this one lives under /root, "
    "and the system has none); a hospital installs fedmets where the SuperNode's user can "
    "(docs/deployment.md)",
)
def test_the_uploaded_app_cannot_read_the_data_nor_pass_the_policy(federation) -> None:
    """A SuperNode run as a user without access to the site's files (``nobody``, the socket
    shared with its group), an app whose ClientApp tries to read a site file itself and to get
    a request outside the site's policy answered: the first fails, the service refuses the
    second."""
    root = federation.root
    shared = Path(tempfile.mkdtemp(prefix="fedmets-node-"))  # what the SuperNode's user may use
    started: list[subprocess.Popen] = []
    try:
        shared.chmod(0o755)
        commands = _flower_for_others(shared / "bin", _python_for_others())
        site = root / "probe-site"
        shutil.copytree(
            federation.sites["site_a"].parent, site, ignore=shutil.ignore_patterns("*.sock")
        )
        toml = site / "site.toml"
        data = tomllib.loads(toml.read_text())
        data["service"] = {"socket": str(shared / "site.sock"), "socket_group": "nogroup"}
        toml.write_text(tomli_w.dumps(data))
        service = subprocess.Popen(
            [flower_bin("fedmets"), "site", "serve", "--config", str(toml)],
            stdout=(root / "logs" / "service-probe.log").open("w"),
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        started.append(service)
        key, public = make_site_keys(shared / "keys", "probe")
        home = shared / "flwr-home"
        home.mkdir()
        for path in (shared / "keys", key, home):
            os.chown(path, NOBODY, NOBODY)
        shutil.copy(federation.certs["ca"], shared / "ca.crt")
        registered = federation.flwr("supernode", "register", str(public), "--format", "json")
        node = json.loads(registered.stdout)["node-id"]
        wait_for_socket(shared / "site.sock", service)
        started.append(
            subprocess.Popen(
                [
                    str(commands / "flower-supernode"),
                    *("--superlink", f"127.0.0.1:{federation.public_port}"),
                    *("--root-certificates", str(shared / "ca.crt")),
                    *("--auth-supernode-private-key", str(key)),
                    *("--isolation", "subprocess", "--port", str(free_port())),
                    *("--node-config", f'site-service="{shared / "site.sock"}"'),
                ],
                env={
                    **federation.env,
                    "FLWR_HOME": str(home),
                    "HOME": str(home),
                    "PATH": f"{commands}{os.pathsep}{federation.env.get('PATH', '')}",
                },
                stdout=(root / "logs" / "supernode-probe.log").open("w"),
                stderr=subprocess.STDOUT,
                start_new_session=True,
                user=NOBODY,
                group=NOBODY,
                extra_groups=[],
                cwd=shared,
            )
        )
        wait_online(federation, node, started[-1])
        out = root / "probe.json"
        features = site / "output" / "features.parquet"
        run_config = f"data-file='{features}' node-id='{node}' out='{out}'"
        ran = federation.flwr(
            "run", str(PROBE_APP), "--run-config", run_config, "--stream", timeout=300
        )
        assert out.is_file(), ran.stdout[-2000:] + ran.stderr[-2000:]
        (found,) = json.loads(out.read_text())
    finally:
        for process in started:
            stop_process(process)
        shutil.rmtree(shared, ignore_errors=True)
    assert found.get("uid") == NOBODY and found["site"] == "site_a", found
    assert found["read"] == "PermissionError"  # the uploaded code cannot open the site's files
    assert found["outside_policy"].startswith("refused: policy.folds")
