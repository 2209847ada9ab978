"""A real deployment on one machine: a SuperLink (TLS and SuperNode authentication by default),
per site a site service (``fedmets site serve``) and a SuperNode relaying to it, ``flwr run`` of
the fedmets app -- the processes a coordinating centre and its hospitals run, on loopback. Used
by the deployment tests and benchmarks, and by anyone rehearsing a deployment
(docs/deployment.md).

Every process gets ``FLWR_HOME=ROOT/flwr-home``, runtime dependency installation off, and a log
file under ``ROOT/logs/``. :meth:`LoopbackFederation.stop` ends them all (each in its own process
session, with its children and the processes they started in sessions of their own).
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterable, Mapping
from pathlib import Path

import tomli_w

from fedmets.client.approval import approve_run
from fedmets.client.service_channel import ServiceClient
from fedmets.server.app_folder import write_app_folder
from fedmets.server.certs import make_certificates
from fedmets.server.proxy import write_nginx_config
from fedmets.shared.config import load_federation_config, load_site_config
from fedmets.shared.identity import make_site_keys

START_TIMEOUT_S = 30.0
SERVICE_START_TIMEOUT_S = 180.0
"""A site service loads torch and the site's features before it answers (busy 2-core CI)."""


def free_port() -> int:
    """A free TCP port on 127.0.0.1."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def flower_env(home: Path) -> dict[str, str]:
    """The environment of every Flower process: FLWR_HOME, no runtime installs, this venv first
    on PATH."""
    env = dict(os.environ)
    env |= {
        "FLWR_HOME": str(home),
        "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
        "FLWR_DISABLE_UPDATE_CHECK": "1",
        "PYTHONUNBUFFERED": "1",
        "PATH": f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}",
    }
    return env


def flower_bin(name: str) -> str:
    """An executable (Flower's, ``fedmets``) of this Python environment."""
    candidate = Path(sys.executable).parent / name
    return str(candidate) if candidate.exists() else name


def wait_for_port(port: int, process: subprocess.Popen, timeout: float = START_TIMEOUT_S) -> None:
    """Return once 127.0.0.1:``port`` accepts connections; RuntimeError if ``process`` exits
    first or ``timeout`` passes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"{process.args[0]} exited with code {process.returncode}")
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.2)
    raise RuntimeError(f"{process.args[0]} did not open port {port} in {timeout:.0f} s")


def stop_process(process: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop ``process``, its process session (it was started with start_new_session) and every
    process it started in a session of its own: the SuperLink's SuperExec and, through it, the
    ServerApps of its runs. Those watch their parent's pid to end with it, which fails where
    nothing reaps orphans (a container's init: the orphan stays a zombie, its pid alive)."""
    if process.poll() is not None:
        return
    family = _descendants(process.pid)
    for pid in family:
        with _ignore_missing():
            os.kill(pid, sig)
    with _ignore_missing():
        os.killpg(process.pid, sig)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        with _ignore_missing():
            os.killpg(process.pid, signal.SIGKILL)
        process.wait()
    deadline = time.monotonic() + 15
    while (alive := [pid for pid in family if _running(pid)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    for pid in alive:
        with _ignore_missing():
            os.kill(pid, signal.SIGKILL)


def _stat(pid: int | str) -> tuple[str, int] | None:
    """``(state, parent pid)`` of process ``pid`` from Linux ``/proc``; None once it is gone."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return fields[0], int(fields[1])


def _descendants(pid: int) -> list[int]:
    """The pids of every living descendant of ``pid``, nearest first."""
    children: dict[int, list[int]] = {}
    for folder in Path("/proc").glob("[0-9]*"):
        if (stat := _stat(folder.name)) is not None:  # None: ended while listed
            children.setdefault(stat[1], []).append(int(folder.name))
    found, frontier = [], [pid]
    while frontier:
        frontier = [child for parent in frontier for child in children.get(parent, [])]
        found += frontier
    return found


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that has not ended (a zombie has)."""
    stat = _stat(pid)
    return stat is not None and stat[0] != "Z"


def sign_with(toml: Path, key: Path) -> None:
    """Set ``[service] identity_key`` of the site TOML ``toml`` to ``key``."""
    data = tomllib.loads(toml.read_text(encoding="utf-8"))
    data.setdefault("service", {})["identity_key"] = str(key)
    toml.write_text(tomli_w.dumps(data), encoding="utf-8")


class _ignore_missing:
    def __enter__(self) -> None:
        return None

    def __exit__(self, kind, value, traceback) -> bool:
        return kind is ProcessLookupError


class LoopbackFederation:
    """The SuperLink, and per site (``sites``: site id -> site TOML) its site service (``fedmets
    site serve``, started with the first SuperNode) and SuperNode, under ``root``."""

    def __init__(
        self,
        root: Path,
        sites: Mapping[str, Path],
        tls: bool = True,
        auth: bool = True,
        proxy: bool = True,
    ) -> None:
        """``proxy`` (needs ``tls``): the SuperNodes reach the SuperLink through nginx, which
        forwards the Fleet API only (``fedmets.server.proxy``); the centre's ``flwr`` connection
        (``pilot``) goes to the SuperLink itself, a hospital's (``site``) to the proxy."""
        if proxy and not tls:
            raise ValueError("the proxy terminates TLS: it needs tls=True")
        self.root = Path(root)
        self.sites = dict(sites)
        self.tls, self.auth, self.proxy = tls, auth, proxy
        self.home = self.root / "flwr-home"
        self.logs = self.root / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.home.mkdir(parents=True, exist_ok=True)
        self.env = flower_env(self.home)
        self.port = free_port()
        self.public_port = free_port() if proxy else self.port  # where the SuperNodes connect
        self.proxy_process: subprocess.Popen | None = None
        self.certs = make_certificates(self.root / "certs", sites=list(self.sites)) if tls else {}
        for site in self.sites if tls else []:
            sign_with(self.sites[site], self.certs[f"site:{site}"])
        self.superlink: subprocess.Popen | None = None
        self.supernodes: dict[str, subprocess.Popen] = {}
        self.services: dict[str, subprocess.Popen] = {}
        self.connection = "pilot"
        self.app = write_app_folder(self.root / "app")  # what `flwr run` submits
        entry = f'[superlink]\ndefault = "{self.connection}"\n\n[superlink.{self.connection}]\n'
        entry += f'address = "127.0.0.1:{self.port}"\n'
        entry += f'root-certificates = "{self.certs["ca"]}"\n' if tls else "insecure = true\n"
        if proxy:  # what a hospital holding ca.crt would configure: the public address
            entry += f'\n[superlink.site]\naddress = "127.0.0.1:{self.public_port}"\n'
            entry += f'root-certificates = "{self.certs["ca"]}"\n'
        (self.home / "config.toml").write_text(entry, encoding="utf-8")

    def _spawn(self, name: str, command: list[str]) -> subprocess.Popen:
        log = (self.logs / f"{name}.log").open("a", encoding="utf-8")
        return subprocess.Popen(
            command,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
            cwd=self.root,
        )

    def start_superlink(self) -> None:
        command = [
            flower_bin("flower-superlink"),
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--database",
            str(self.home / "state.db"),
            "--isolation",
            "subprocess",
            "--disable-runtime-dependency-installation",
        ]
        if self.tls:
            command += [
                "--ssl-ca-certfile",
                str(self.certs["ca"]),
                "--ssl-certfile",
                str(self.certs["server_cert"]),
                "--ssl-keyfile",
                str(self.certs["server_key"]),
            ]
        else:
            command.append("--insecure")
        if self.auth:
            command.append("--enable-supernode-auth")
        self.superlink = self._spawn("superlink", command)
        wait_for_port(self.port, self.superlink)
        if self.proxy and (self.proxy_process is None or self.proxy_process.poll() is not None):
            self.start_proxy()

    def start_proxy(self) -> None:
        """Start nginx in front of the SuperLink on ``public_port`` (``fedmets.server.proxy``)."""
        nginx = shutil.which("nginx") or shutil.which("nginx", path="/usr/sbin:/usr/local/sbin")
        if nginx is None:
            raise RuntimeError(
                "nginx not found: the rehearsal puts it in front of the SuperLink "
                "(scripts/install.sh installs Debian's nginx-light as root)"
            )
        config = write_nginx_config(
            self.root / "proxy" / "nginx.conf",
            self.port,
            f"127.0.0.1:{self.public_port}",
            self.certs,
        )
        self.proxy_process = self._spawn("proxy", [nginx, "-c", str(config), "-e", "stderr"])
        wait_for_port(self.public_port, self.proxy_process)

    def flwr(self, *args: str, timeout: float = 120) -> subprocess.CompletedProcess:
        """Run a ``flwr`` CLI command against this SuperLink (connection ``pilot``)."""
        return subprocess.run(
            [flower_bin("flwr"), *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd=self.root,
        )

    def add_site(self, name: str, toml: Path) -> None:
        """One more hospital ``name`` (its site TOML ``toml`` may claim any site id), with a
        key pair of its own that its service signs with; register it to let it connect."""
        self.sites[name] = Path(toml)
        private, public = make_site_keys(self.root / "certs" / "sites", name)
        self.certs[f"site:{name}"], self.certs[f"site:{name}.pub"] = private, public
        sign_with(self.sites[name], private)

    def identities(self) -> dict[str, str]:
        """Site id -> its public key, for ``[federation] identities`` (the sites made here)."""
        claimed = {name: load_site_config(toml).site_id for name, toml in self.sites.items()}
        return {
            site: self.certs[f"site:{name}.pub"].read_text()
            for name, site in claimed.items()
            if name == site
        }

    def register(self, site: str) -> None:
        """Allow-list ``site``'s public key (``flwr supernode register``)."""
        done = self.flwr("supernode", "register", str(self.certs[f"site:{site}.pub"]))
        if done.returncode != 0:
            raise RuntimeError(f"register {site}: {done.stdout}{done.stderr}")

    def start_service(self, site: str) -> Path:
        """Start ``site``'s site service unless it runs; returns its socket once it answers."""
        path = load_site_config(self.sites[site]).service_socket
        service = self.services.get(site)
        if service is None or service.poll() is not None:
            command = [flower_bin("fedmets"), "site", "serve", "--config", str(self.sites[site])]
            self.services[site] = service = self._spawn(f"service-{site}", command)
        deadline = time.monotonic() + SERVICE_START_TIMEOUT_S
        while True:
            try:
                ServiceClient(path).site_id()
                return path
            except RuntimeError:
                if service.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(
                        f"the site service of {site} did not start (logs/service-{site}.log)"
                    ) from None
                time.sleep(0.2)

    def start_supernode(self, site: str, key: Path | None = None, tls: bool | None = None) -> None:
        """Start ``site``'s SuperNode, relaying to its site service (started first if need be;
        its own key unless ``key`` is given; TLS as the link unless ``tls`` says otherwise)."""
        tls = self.tls if tls is None else tls
        service_socket = self.start_service(site)
        command = [
            flower_bin("flower-supernode"),
            "--superlink",
            f"127.0.0.1:{self.public_port}",
            "--port",
            str(free_port()),
            "--isolation",
            "subprocess",
            "--node-config",
            f'site-service="{service_socket}"',
        ]
        command += ["--root-certificates", str(self.certs["ca"])] if tls else ["--insecure"]
        if self.auth:
            command += ["--auth-supernode-private-key", str(key or self.certs[f"site:{site}"])]
        self.supernodes[site] = self._spawn(f"supernode-{site}", command)

    def kill_supernode(self, site: str) -> None:
        """SIGKILL ``site``'s SuperNode and its ClientApp processes (a crash)."""
        stop_process(self.supernodes.pop(site), signal.SIGKILL)

    def run(
        self,
        federation_toml: Path,
        out: Path,
        resume: bool = False,
        approving: Iterable[str] | None = None,
    ) -> subprocess.Popen:
        """Start ``flwr run`` of the fedmets app (returns the running process; its output goes
        to ``logs/flwr-run.log``), once the sites of ``approving`` (default: all) approved it
        (as ``fedmets site approve`` does)."""
        run_config = load_federation_config(federation_toml)
        for site in self.sites if approving is None else approving:
            approve_run(load_site_config(self.sites[site]), run_config)
        run_config = (
            f"federation-config='{federation_toml}' out='{out}' resume={str(resume).lower()}"
        )
        command = [flower_bin("flwr"), "run", str(self.app), self.connection]
        command += ["--run-config", run_config, "--stream"]
        return self._spawn("flwr-run", command)

    def stop(self) -> None:
        """Stop every SuperNode and site service, then the SuperLink (and their children)."""
        for site in list(self.supernodes):
            stop_process(self.supernodes.pop(site))
        for site in list(self.services):
            stop_process(self.services.pop(site))
        if self.superlink is not None:
            stop_process(self.superlink)
            self.superlink = None
        if self.proxy_process is not None:
            stop_process(self.proxy_process)
            self.proxy_process = None

    def __enter__(self) -> LoopbackFederation:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
