"""The site service (``fedmets site serve``, ``fedmets.client.site_service``) and the ClientApp's
relay to it (``fedmets.client.service_channel``): the gate answers over a socket only its user
can open, whatever the request, and the relay that runs the centre's app loads no torch.
Real processes (``fedmets site serve`` beside SuperNodes) are in the deployment tests."""

from __future__ import annotations

import json
import stat
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from conftest import run_fedmets
from test_layers import modules_loaded

from fedmets.client import site_service
from fedmets.client.audit import verify
from fedmets.client.release import answer, site_audit_path
from fedmets.client.service_channel import ServiceClient, ServiceRefused
from fedmets.client.site_service import SiteService, start_service
from fedmets.client.site_worker import SiteWorker
from fedmets.shared import wire
from fedmets.shared.config import load_site_config
from fedmets.shared.identity import make_site_keys
from fedmets.simulation.feature_sites import write_feature_sites


@pytest.fixture(scope="module")
def served(tmp_path_factory) -> Iterator[tuple[Path, ServiceClient]]:
    """One tabular site (2 folds) served on its socket: (site TOML, a relay's client)."""
    (toml,) = write_feature_sites(tmp_path_factory.mktemp("service") / "sites", [40], folds=2)
    socket = load_site_config(toml).service_socket
    server = start_service(SiteService(toml), socket, say=lambda _: None)
    yield toml, ServiceClient(socket)
    server.stop(grace=None)


def _ask(client: ServiceClient, route: str, request: dict) -> dict:
    records = wire.to_records(route, request, reply=False)
    return wire.from_records(client.answer(route, records))


def test_the_socket_is_the_service_users_alone(served) -> None:
    toml, client = served
    mode = stat.S_IMODE(load_site_config(toml).service_socket.stat().st_mode)
    assert mode == 0o600
    assert client.site_id() == "site_000"


def test_the_service_answers_as_the_gate_in_process(served, tmp_path) -> None:
    toml, client = served
    request = {"protocol": wire.PROTOCOL_VERSION, "run": "service"}
    relayed = _ask(client, "query.census", request)
    in_process = answer(SiteWorker([load_site_config(toml)]), "query.census", request)
    assert relayed == in_process
    assert relayed["n"] == 40


def test_a_request_outside_the_policy_is_refused_and_logged(served) -> None:
    toml, client = served
    with pytest.raises(ServiceRefused, match="policy.folds"):
        _ask(client, "query.folds", {"folds": 5, "run": "service-refused"})
    with pytest.raises(ServiceRefused, match="unknown route"):  # not in the wire declaration
        client.answer("query.everything", wire.to_records("query.ledger", {}, reply=False))
    audit = site_audit_path(load_site_config(toml)).read_text().splitlines()
    refused = [json.loads(line) for line in audit if "service-refused" in line]
    assert refused and not refused[-1]["sent"] and refused[-1]["rule"] == "policy.folds"


def test_a_second_service_on_a_live_socket_is_refused(served) -> None:
    toml, _ = served
    with pytest.raises(RuntimeError, match="already serves"):
        start_service(SiteService(toml), load_site_config(toml).service_socket)


def test_a_file_at_the_socket_path_is_never_removed(served, tmp_path) -> None:
    toml, _ = served
    kept = tmp_path / "site.toml"
    kept.write_text("a hospital's file\n")
    with pytest.raises(RuntimeError, match="is not a socket"):
        start_service(SiteService(toml), kept)
    assert kept.read_text() == "a hospital's file\n"


def test_no_service_behind_the_socket_says_how_to_start_one(tmp_path) -> None:
    with pytest.raises(RuntimeError, match="fedmets site serve"):
        ServiceClient(tmp_path / "none.sock").site_id()


def test_an_identity_key_that_is_no_key_stops_the_service_at_start(tmp_path, monkeypatch) -> None:
    """``[service] identity_key`` naming no file (or no key) is the hospital's configuration
    error, not a data state: ``site serve`` refuses to start, in one line naming the file and
    ``fedmets site keys`` (no errno), rather than serve and fail every request later."""

    def no_serving(*_args, **_kwargs):
        raise AssertionError("the service started serving")

    monkeypatch.setattr(site_service, "start_service", no_serving)
    (toml,) = write_feature_sites(tmp_path / "sites", [20], folds=2)
    base = toml.read_text()
    not_a_key = tmp_path / "notes.txt"
    not_a_key.write_text("not a key\n")
    for key, reason in (("keys/site_000", "file not found"), (not_a_key, "not a readable key")):
        toml.write_text(base + f'\n[service]\nidentity_key = "{key}"\n')
        done = run_fedmets("site", "serve", "--config", toml)
        assert done.returncode == 1, done.stderr
        assert done.stderr.startswith("error: [service] identity_key "), done.stderr
        assert reason in done.stderr and "fedmets site keys --site site_000" in done.stderr
        assert "Errno" not in done.stderr and len(done.stderr.splitlines()) == 1
    private, _ = make_site_keys(tmp_path / "keys", "site_000")  # a real key: it serves
    toml.write_text(base + f'\n[service]\nidentity_key = "{private}"\n')
    done = run_fedmets("site", "serve", "--config", toml)
    assert "the service started serving" in done.stderr


def test_a_socket_group_that_does_not_exist_stops_the_service_at_start(tmp_path) -> None:
    """``[service] socket_group`` naming no group: one line naming the key, before the site's
    data is loaded (was: ``"getgrnam(): name not found: 'x'"`` once the data was loaded)."""
    (toml,) = write_feature_sites(tmp_path / "sites", [20], folds=2)
    toml.write_text(toml.read_text() + '\n[service]\nsocket_group = "no-such-group-9"\n')
    done = run_fedmets("site", "serve", "--config", toml)
    assert done.returncode == 1 and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(
        "error: [service] socket_group 'no-such-group-9': no such group on this machine"
    )
    assert "labelled patients loaded" not in done.stdout


def test_the_relay_loads_no_torch_and_no_site_code() -> None:
    """The ClientApp a deployed SuperNode starts for every message imports Flower and the
    channel only: no torch, scikit-learn or pandas, and not the site's worker or gate."""
    heavy = {"torch", "sklearn", "pandas", "monai", "radiomics"}
    site = {"fedmets.client.site_worker", "fedmets.client.release", "fedmets.client.site_service"}
    assert modules_loaded("fedmets.client.client_app", heavy | site) == []


@pytest.mark.slow
def test_a_batch_is_answered_in_lanes_as_its_requests_one_by_one(tmp_path_factory) -> None:
    """A batch (the folds a centre runs at once) at a site that answers two at a time: each
    item is gated as if it had come alone (the same replies, a refusal for the one outside
    the policy), and the audit log keeps one chained line per item."""
    root = tmp_path_factory.mktemp("lanes")  # a socket path under 108 bytes
    (toml,) = write_feature_sites(root / "sites", [40], folds=2)
    text = toml.read_text().replace("[compute]\n", "[compute]\nparallel_folds = 2\n")
    toml.write_text(text)
    service = SiteService(toml)
    server = start_service(service, load_site_config(toml).service_socket, say=lambda _: None)
    client = ServiceClient(load_site_config(toml).service_socket)
    try:
        _ask(client, "query.folds", {"folds": 2, "run": "lanes"})
        items = [
            ("query.moments", {"fold": 0, "run": "lanes"}),
            ("query.moments", {"fold": 1, "run": "lanes"}),
            ("query.folds", {"folds": 5, "run": "lanes"}),
            ("query.census", {"protocol": wire.PROTOCOL_VERSION, "run": "lanes"}),
        ]
        replies = wire.from_batch(client.answer_batch(wire.to_batch(items, reply=False)))
        assert service._lanes is not None and service._lanes.lanes == 2
    finally:
        server.stop(grace=None)
        service.close()
    worker = SiteWorker([load_site_config(toml)])
    for (route, request), (replied_route, reply) in zip(items, replies, strict=True):
        assert replied_route == route
        if request.get("folds") == 5:
            assert reply.startswith("refused: ") and "policy.folds" in reply
            continue
        alone = answer(worker, route, request)
        assert reply.keys() == alone.keys()
        for key, value in alone.items():
            assert np.array_equal(reply[key], value), key
    check = verify(site_audit_path(load_site_config(toml)))
    assert (check.lines, check.broken) == (1 + 4 + 3, None)  # folds, the batch, alone
