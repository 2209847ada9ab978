"""The site service: the one long-lived process of a hospital that reads its patient files.

``fedmets site serve --config site.toml`` holds the site's data, caches, privacy ledger, policy
and audit log (:class:`SiteService`: a ``fedmets.client.site_worker.SiteWorker`` behind the
release gate ``fedmets.client.release``) and answers the federation's requests over a Unix
domain socket (``fedmets.client.service_channel``; mode 0600, or 0660 for ``[service]
socket_group``). The SuperNode's ClientApp, which the coordinating centre uploads, only relays
messages to it: whatever that code asks, the hospital's installed gate decides what leaves, and
the SuperNode's user needs no access to the data. Flower's simulation calls the same
:class:`SiteService` in process, so both answer through one gate.
"""

from __future__ import annotations

import grp
import os
import signal
import stat
import threading
import time
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import grpc
from flwr.app import ConfigRecord, RecordDict
from flwr.compat.common import recorddict_compat

from fedmets.client.approval import approval_required
from fedmets.client.memory import lane_budget_bytes
from fedmets.client.policy import PolicyRefused
from fedmets.client.release import ReleaseRefused, answer, log_key_exchange
from fedmets.client.service_channel import (
    APP_KEY,
    CHANNEL_OPTIONS,
    METHODS,
    ROUTE_KEY,
    SERVICE,
    ServiceClient,
    decode,
    encode,
    target,
)
from fedmets.client.site_files import FEATURES_FILE
from fedmets.client.site_lanes import SiteLanes
from fedmets.client.site_worker import SiteNotReady, SiteWorker
from fedmets.shared import wire
from fedmets.shared.config import SiteConfig, load_site_config
from fedmets.shared.identity import load_private_key

REFUSALS = (PolicyRefused, ReleaseRefused, wire.WireError)
"""What the gate refuses: sent back as ``PERMISSION_DENIED`` with its message."""
MAX_SOCKET_PATH = 107
"""Longest Unix domain socket path on Linux, in bytes."""


class SiteService:
    """A site's worker and gate, loaded once and reloaded when the site config or its feature
    table change on disk (a re-extraction). One message at a time; a batch's items up to
    ``[compute] parallel_folds`` at once (:meth:`answer_batch`)."""

    def __init__(self, config_path: Path, served: bool = False) -> None:
        """``served``: a deployed service (``fedmets site serve``), where runs need the
        hospital's approval unless ``[policy] require_approval = false``."""
        self.config_path = Path(config_path).resolve()
        self.served = served
        self.cfg = load_site_config(self.config_path)
        self._worker: SiteWorker | None = None
        self._stamp: tuple[float, float] | None = None
        self.lock = threading.Lock()
        self.gpu_memory_bytes: int | None = None  # a lane's share (fedmets.client.site_lanes)
        self._lanes: SiteLanes | None = None

    @property
    def worker(self) -> SiteWorker:
        """The site's worker (loaded now when the config or features changed)."""
        features = self.cfg.paths.output / FEATURES_FILE
        stamp = (
            self.config_path.stat().st_mtime,
            features.stat().st_mtime if features.is_file() else 0.0,
        )
        if self._worker is None or stamp != self._stamp:
            self.cfg = load_site_config(self.config_path)
            self._worker, self._stamp = SiteWorker([self.cfg]), stamp
            self._worker.require_approval = approval_required(self.cfg, self.served)
            self._worker.gpu_memory_bytes = self.gpu_memory_bytes
        return self._worker

    def answer(self, route_name: str, request: RecordDict, app: str | None = None) -> RecordDict:
        """The gated reply to a request on ``route_name`` (``fedmets.client.release.answer``),
        relayed by the app of digest ``app`` (None in process)."""
        with self.lock:
            reply = answer(self.worker, route_name, wire.from_records(request), app=app)
        return wire.to_records(route_name, reply, reply=True)

    def answer_item(
        self, route_name: str, request: dict[str, Any], app: str | None = None
    ) -> dict[str, Any] | str:
        """The gated reply to one item of a batch, or the text of its refusal or failure (what
        a single request's error would carry)."""
        try:
            return answer(self.worker, route_name, request, app=app)
        except REFUSALS as refusal:
            return f"refused: {refusal}"
        except Exception as error:  # noqa: BLE001 - the centre hears it, as for one request
            return f"failed: {type(error).__name__}: {error}"

    def answer_batch(self, batch: RecordDict, app: str | None = None) -> RecordDict:
        """The replies to a batch's items (``fedmets.shared.wire.to_batch``), each gated as
        if it had come alone, up to the site's ``[compute] parallel_folds`` at once (each in
        a lane process, ``fedmets.client.site_lanes``)."""
        requests = wire.from_batch(batch)
        if any(isinstance(request, str) for _, request in requests):
            raise wire.WireError("a batch request holds a refusal")
        with self.lock:
            if min(self.worker.configs[0].compute.parallel_folds, len(requests)) > 1:
                answers = self._site_lanes().answer(requests, app)
            else:
                answers = [self.answer_item(route, request, app) for route, request in requests]
        return wire.to_batch(
            [(route, reply) for (route, _), reply in zip(requests, answers, strict=True)],
            reply=True,
        )

    def _site_lanes(self) -> SiteLanes:
        """The lane processes, started on the first batch (again when the cap changed or a
        lane died)."""
        lanes = self.cfg.compute.parallel_folds
        if self._lanes is None or self._lanes.lanes != lanes or self._lanes.broken:
            self.close()
            share = lane_budget_bytes(self.worker.device, self.cfg.compute.gpu_memory_gib, lanes)
            self._lanes = SiteLanes(self.config_path, self.served, lanes, share)
        return self._lanes

    def close(self) -> None:
        """Stop the lane processes, if any."""
        if self._lanes is not None:
            self._lanes.close()
            self._lanes = None

    def secure(self, fitins: RecordDict, app: str | None = None) -> RecordDict:
        """SecAgg+'s masking stage: the training route named in the request (a legacy FitIns
        record), gated and logged as masked; returns the FitRes record to mask."""
        route_name, request = wire.from_fitins(
            recorddict_compat.recorddict_to_fitins(fitins, keep_input=True)
        )
        with self.lock:
            reply = answer(self.worker, route_name, request, masked=True, app=app)
        fitres = wire.to_fitres(route_name, request, reply)
        return recorddict_compat.fitres_to_recorddict(fitres, keep_input=False)

    def log_key_exchange(self, stage: str, sent: Mapping[str, Any]) -> None:
        """Log a SecAgg+ key-exchange reply the relay sent (sizes, never values)."""
        with self.lock:
            log_key_exchange(self.cfg, stage, sent)

    def site_id(self) -> str:
        return self.cfg.site_id


def _handlers(service: SiteService, say: Callable[[str], None]) -> grpc.GenericRpcHandler:
    """The channel's four methods over ``service``; each request is logged in one line, with
    the first 12 hex digits of the digest of the app that relayed it."""

    def method(name: str) -> Callable[[bytes, grpc.ServicerContext], bytes]:
        def handle(data: bytes, context: grpc.ServicerContext) -> bytes:
            metadata = dict(context.invocation_metadata())
            route, app = metadata.get(ROUTE_KEY, ""), metadata.get(APP_KEY, "")
            call = f"{name} {route} (app {app[:12] or 'from a source checkout'})"
            started = time.perf_counter()
            try:
                records = decode(data)
                if name == "Answer":
                    reply = service.answer(route, records, app)
                elif name == "Batch":
                    reply = service.answer_batch(records, app)
                elif name == "Secure":
                    reply = service.secure(records, app)
                elif name == "KeyExchange":
                    service.log_key_exchange(route, dict(records.config_records["sent"]))
                    reply = RecordDict()
                else:
                    reply = RecordDict({"site": ConfigRecord({"site_id": service.site_id()})})
            except REFUSALS as refusal:
                say(f"{call}: refused: {refusal}")
                context.abort(grpc.StatusCode.PERMISSION_DENIED, str(refusal))
            except Exception as error:  # noqa: BLE001 - the relay reports it to the centre
                say(f"{call}: failed: {type(error).__name__}: {error}")
                context.abort(grpc.StatusCode.INTERNAL, f"{type(error).__name__}: {error}")
            if name != "Hello":
                say(f"{call}: answered in {time.perf_counter() - started:.1f} s")
            return encode(reply)

        return handle

    return grpc.method_handlers_generic_handler(
        SERVICE, {name: grpc.unary_unary_rpc_method_handler(method(name)) for name in METHODS}
    )


def start_service(
    service: SiteService, socket: Path, say: Callable[[str], None] = print
) -> grpc.Server:
    """Serve ``service`` on the Unix domain socket ``socket`` (created 0600, or 0660 with the
    site's ``[service] socket_group``); returns the started gRPC server. Refuses a socket that
    a running service already answers on, and a path that is not a socket (never removed)."""
    socket = Path(socket).resolve()
    if len(os.fsencode(socket)) > MAX_SOCKET_PATH:
        raise RuntimeError(
            f"socket path {socket} is longer than {MAX_SOCKET_PATH} bytes (a Unix socket's "
            "limit): set a shorter [service] socket"
        )
    socket.parent.mkdir(parents=True, exist_ok=True)
    if socket.exists():
        if not stat.S_ISSOCK(socket.stat().st_mode):
            raise RuntimeError(f"{socket} exists and is not a socket: set another [service] socket")
        try:
            other = ServiceClient(socket).site_id()
        except RuntimeError:
            socket.unlink()  # left by a service that stopped
        else:
            raise RuntimeError(f"the site service of {other} already serves on {socket}")
    server = grpc.server(ThreadPoolExecutor(max_workers=4), options=CHANNEL_OPTIONS)
    server.add_generic_rpc_handlers((_handlers(service, say),))
    umask = os.umask(0o177)  # the socket is born 0600: no moment when others may open it
    try:
        server.add_insecure_port(target(socket))
    finally:
        os.umask(umask)
    group = service.cfg.service.socket_group
    if group is not None:
        os.chown(socket, -1, grp.getgrnam(group).gr_gid)
        os.chmod(socket, 0o660)
    server.start()
    return server


def check_identity_key(cfg: SiteConfig) -> None:
    """RuntimeError, one line naming the file and ``fedmets site keys``, when ``[service]
    identity_key`` is set but is not a readable ECDSA private key. A configuration error of
    the hospital's, refused when the service starts: unlike data not yet extracted (the
    service starts "not ready" so that the census sees it), no request could be answered
    until the config changes."""
    key = cfg.service.identity_key
    if key is None:
        return
    try:
        load_private_key(key)
    except ValueError as error:
        raise RuntimeError(
            f"{error}: make the site's key pair with `fedmets site keys --site {cfg.site_id} "
            f"--out FOLDER` and set identity_key to FOLDER/{cfg.site_id}, or leave "
            "identity_key out (unsigned census replies)"
        ) from error


def check_socket_group(cfg: SiteConfig) -> None:
    """RuntimeError, one line naming the key, when ``[service] socket_group`` is set but no
    group of that name exists on this machine."""
    group = cfg.service.socket_group
    if group is None:
        return
    try:
        grp.getgrnam(group)
    except KeyError:
        raise RuntimeError(
            f"[service] socket_group {group!r}: no such group on this machine: create it"
            " (the SuperNode's user a member), or leave socket_group out (the socket is then"
            " the service's user's alone, mode 0600)"
        ) from None


def serve(config_path: Path, say: Callable[[str], None] = print) -> None:
    """``fedmets site serve``: load the site, serve it on its socket until SIGTERM or SIGINT.
    RuntimeError before serving when ``[service] identity_key`` is no usable key or its
    ``socket_group`` no group."""
    service = SiteService(config_path, served=True)
    check_identity_key(service.cfg)
    check_socket_group(service.cfg)
    socket = service.cfg.service_socket
    try:
        worker = service.worker
        say(f"{worker.site_id}: {len(worker.data.ids)} labelled patients loaded")
    except SiteNotReady as error:  # the service still starts; requests will say
        say(f"{service.cfg.site_id}: not ready: {error.local()}")
    except Exception as error:  # noqa: BLE001 - likewise
        say(f"{service.cfg.site_id}: not ready: {error}")
    server = start_service(service, socket, say)
    mode = oct(os.stat(socket).st_mode & 0o777)
    say(f"{service.cfg.site_id}: serving on {socket} (mode {mode[2:]}); stop with Ctrl-C")
    stopped = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stopped.set())
    stopped.wait()
    server.stop(grace=10).wait()
    service.close()
    socket.unlink(missing_ok=True)
    say(f"{service.cfg.site_id}: stopped")
