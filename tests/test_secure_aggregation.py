"""Secure aggregation (``[strategy] secure_aggregation``, Flower's SecAgg+) in the federated
protocol.

In process (fast): an in-memory Flower Grid hands the server's messages to the real ClientApp
(``secaggplus_mod`` and the relay to each site's service over its socket) and the server runs
the real ``SecAggPlusWorkflow``: the secure average equals the plain weighted average within
``error_bound``, sites that cannot train take part with weight 0, a site that fails in training
is dropped and its masks removed, a site lost before training makes the round restart without
it, one training site alone is never unmasked, and no reply of a secure round carries an array
in clear.

Flower's simulation engine (slow): a whole tiny run with secure aggregation, one of whose sites
fails every training round, gives the pooled AUCs of the same run aggregated in clear.
"""

from __future__ import annotations

import copy
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import tomli_w
from flwr.app import Context, Message, RecordDict
from flwr.app.error import Error
from flwr.common import parameters_to_ndarrays
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key
from flwr.serverapp import Grid
from flwr.supercore.run import Run
from flwr.supercore.task_identity import TaskIdentity

from fedmets.client.client_app import app
from fedmets.client.release import answer
from fedmets.client.site_service import SiteService, start_service
from fedmets.client.site_worker import SiteWorker
from fedmets.server.aggregation import weighted_average
from fedmets.server.checkpoints import load_checkpoint
from fedmets.server.protocol import FederatedProtocol, ProtocolError
from fedmets.server.secure_aggregation import error_bound, max_weight, secure_round
from fedmets.server.server_app import FlowerLink
from fedmets.shared import wire
from fedmets.shared.config import (
    ConfigError,
    FederationConfig,
    load_federation_config,
    load_site_config,
)
from fedmets.simulation.feature_sites import write_feature_sites
from fedmets.simulation.in_process import InProcessLink


def _cfg(**sections) -> FederationConfig:
    """The tiny federation of benchmarks/bench_deployment.py (2 folds, 2 fusion rounds)."""
    data = {
        "run": {"name": "secure", "seed": 1},
        "cv": {"folds": 2},
        "stages": {"fusion_rounds": 2, "fusion_local_epochs": 2},
        "selection": {"top_k": 10, "rf_trees": 20},
        "federation": {"min_sites": 2, "round_timeout_s": 120},
        "strategy": {"secure_aggregation": True},
    }
    for key, value in sections.items():
        data[key] = {**data.get(key, {}), **value}
    return FederationConfig.model_validate(data)


def _refuses_to_train(toml: Path) -> None:
    """The site refuses every training request (its policy allows one epoch a round, the run
    asks for two) and answers everything else: it fails after SecAgg+'s key exchange, in the
    masked-vector stage."""
    with toml.open("a") as handle:
        handle.write("max_epochs = 1\n")  # into [policy], the file's last table


# ---- config and wire ---------------------------------------------------------------------------


def test_config_refuses_client_dp_and_one_site(tmp_path) -> None:
    path = tmp_path / "federation.toml"
    base = '[run]\nname = "ab"\n[strategy]\nsecure_aggregation = true\n'
    path.write_text(base + '[dp]\nmode = "client"\nepsilon = 4.0\n')
    with pytest.raises(ConfigError, match=r"strategy.secure_aggregation: cannot be true with dp"):
        load_federation_config(path)
    path.write_text(base + "[federation]\nmin_sites = 1\n")
    with pytest.raises(ConfigError, match=r"strategy.secure_aggregation: needs federation.min"):
        load_federation_config(path)
    path.write_text(base + '[dp]\nmode = "sample"\nepsilon = 4.0\n')
    assert load_federation_config(path).strategy.secure_aggregation
    assert not FederationConfig.model_validate({"run": {"name": "ab"}}).strategy.secure_aggregation


def test_the_in_process_link_says_it_aggregates_in_clear() -> None:
    said: list[str] = []
    protocol = FederatedProtocol(InProcessLink({}), _cfg(), "secure", said.append)
    assert not protocol.secure and FlowerLink.secure_aggregation
    with pytest.raises(ProtocolError):  # no sites: stops at the census
        protocol.run_all()
    assert said[0].startswith("secure_aggregation: InProcessLink cannot run SecAgg+")


def _request() -> dict:
    rng = np.random.default_rng(0)
    return {
        "run": "r",
        "fold": 1,
        "round": 2,
        "min_patients": 5,
        "lr": 0.01,
        "hidden": [8],
        "radiomics_columns": np.array([3, 1, 7]),
        "radiomics_mean": rng.normal(size=3),
        "weights:none/b": {"w": rng.normal(size=(2, 3)).astype(np.float32), "i": np.arange(3)},
        "weights:none/a": {"w": rng.normal(size=4).astype(np.float32)},
        wire.SECURE_SUMS: ["train_loss_sum:none/a", "train_loss_sum:none/b"],
    }


def test_a_secure_request_and_reply_cross_the_wire_as_declared() -> None:
    request = _request()
    route, back = wire.from_fitins(wire.to_fitins("train.fusion", request))
    assert route == "train.fusion" and back["lr"] == 0.01 and back["run"] == "r"
    assert back[wire.SECURE_SUMS] == request[wire.SECURE_SUMS]
    np.testing.assert_array_equal(back["radiomics_columns"], [3, 1, 7])  # not a weight: sent too
    np.testing.assert_array_equal(back["weights:none/b"]["i"], np.arange(3))
    assert wire.secure_layout(back) == [
        ("weights:none/a", "w"),
        ("weights:none/b", "w"),  # the integer buffer keeps the global value: not sent
        ("train_loss_sum:none/a", None),
        ("train_loss_sum:none/a", wire.SENT),
        ("train_loss_sum:none/b", None),
        ("train_loss_sum:none/b", wire.SENT),
    ]
    with pytest.raises(wire.WireError, match="not a route of secure aggregation"):
        wire.to_fitins("query.validate", request)

    new = {k: {p: v + 0.5 for p, v in request[k].items()} for k in request if "weights:" in k}
    reply = {"n": 20, **new, "train_loss_sum:none/a": 10.0, "train_loss_sum:none/b": 4.0}
    fitres = wire.to_fitres("train.fusion", request, reply)
    assert fitres.num_examples == 20 and fitres.metrics == {}  # nothing else in clear
    vector = parameters_to_ndarrays(fitres.parameters)  # two updates, two sums per patient
    np.testing.assert_allclose(np.concatenate([v.ravel() for v in vector[:2]]), 0.5, rtol=1e-6)
    assert [float(v[0]) for v in vector[2:]] == [10.0 / 20, 1.0, 4.0 / 20, 1.0]
    one = wire.from_secure_average(request, vector, 20)  # the average of this site alone
    np.testing.assert_allclose(one["weights:none/b"]["w"], new["weights:none/b"]["w"], rtol=1e-6)
    np.testing.assert_array_equal(one["weights:none/b"]["i"], np.arange(3))
    assert one["train_loss_sum:none/a"] == 10.0 and one["n"] == 20

    zeros = wire.to_fitres("train.fusion", request, {"n": 3})  # could not train: weight 0
    assert zeros.num_examples == 0
    assert wire.check_masked("train.fusion", request, {**reply, "train_loss_sum:none/b": np.nan})
    other = {**reply, "n": 30, "train_loss_sum:none/a": 6.0, "train_loss_sum:none/b": 9.0}
    del reply["train_loss_sum:none/a"]  # held back by the site's policy: it adds 0, not sent
    held = parameters_to_ndarrays(wire.to_fitres("train.fusion", request, reply).parameters)
    assert [float(v[0]) for v in held[2:]] == [0.0, 0.0, 4.0 / 20, 1.0]
    sent = parameters_to_ndarrays(wire.to_fitres("train.fusion", request, other).parameters)
    average = [(20 * a + 30 * b) / 50 for a, b in zip(held, sent, strict=True)]
    both = wire.from_secure_average(request, average, 50)  # per patient of the sites that sent
    assert both["train_loss_sum:none/a"] / both["n"] == pytest.approx(6.0 / 30)  # not 6.0 / 50
    assert both["train_loss_sum:none/b"] / both["n"] == pytest.approx((4.0 + 9.0) / 50)
    none = wire.from_secure_average(request, held, 20)  # nobody sent it: no loss, not 0
    assert "train_loss_sum:none/a" not in none and "train_loss_sum:none/b" in none


# ---- SecAgg+ in process --------------------------------------------------------------------------


class LocalGrid(Grid):
    """A Flower Grid in memory: each message, copied as if serialised, goes to ``app`` with
    its node's Context; an exception becomes an error reply, as in Flower's runtime.
    ``fail``: node -> SecAgg+ stage at which that node fails. Every reply is kept."""

    def __init__(self, app, node_configs: dict[int, dict], fail: dict[int, str] | None = None):
        self.app = app
        self._run = Run.create_empty(1)
        self.contexts = {
            node: Context(
                run_id=1, node_id=node, node_config=cfg, state=RecordDict(), run_config={}
            )
            for node, cfg in node_configs.items()
        }
        self.fail = fail or {}
        self.replies: list[Message] = []
        self._ids = itertools.count(1)

    def set_run(self, run: Run) -> None:
        self._run = run

    @property
    def run(self) -> Run:
        return self._run

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        return Message(content, dst_node_id=dst_node_id, message_type=message_type)

    def get_node_ids(self):
        return list(self.contexts)

    def push_messages(self, messages):
        raise NotImplementedError

    def pull_messages(self, message_ids):
        raise NotImplementedError

    def send_and_receive(self, messages, *, timeout=None):
        replies = []
        for msg in messages:
            msg = copy.deepcopy(msg)
            node = msg.metadata.dst_node_id
            configs = msg.content.config_records.get(RECORD_KEY_CONFIGS, {})
            try:
                if self.fail.get(node) == configs.get(Key.STAGE, "-"):
                    raise ConnectionError(f"node {node} lost")
                reply = self.app(msg, self.contexts[node])
            except Exception as error:  # noqa: BLE001 - what the runtime does
                reply = Message(Error(code=1, reason=repr(error)), reply_to=msg)
            self.replies.append(reply)
            replies.append(reply)
        return replies


@pytest.fixture()
def task_identity(monkeypatch) -> None:
    """Messages built outside Flower's runtime need its process identity."""
    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)


SIZES = [60, 50, 8, 60]  # site_002: too few patients to train; site_003: refuses to train


@pytest.fixture(scope="module")
def selected(tmp_path_factory) -> Iterator[tuple[list[Path], dict]]:
    """Four tabular sites after census, folds and selection of fold 0 (in process), each then
    served by its site service on its socket (in this process, the gRPC channel the deployed
    relay uses): the site TOMLs and fold 0's first fusion request."""
    root = tmp_path_factory.mktemp("secure-round")
    tomls = write_feature_sites(root / "sites", SIZES, seed=3, folds=2)
    _refuses_to_train(tomls[3])
    cfg = _cfg()
    workers = {load_site_config(t).site_id: SiteWorker([load_site_config(t)]) for t in tomls}
    protocol = FederatedProtocol(InProcessLink(workers), cfg, "secure-round")
    protocol.census()
    protocol.folds()
    standardise, pos_weight, _, _ = protocol.select(0, {"fold": 0})
    captured = {}

    def capture(stage, fold, rounds, initial, train_request, validate_request, keep=None):
        captured.update(train_request)
        captured.update({wire.WEIGHTS_PREFIX + m: s for m, s in initial.items()})
        return initial, {m: {} for m in initial}

    protocol._federated_rounds = capture  # the request of the first round, not sent
    dims = {"radiomics": len(standardise["radiomics_columns"])}
    dims["clinical"] = len(standardise["clinical_mean"])
    models = ["none/radiomics", "none/clinical", "none/radiomics+clinical"]
    protocol.train_fusion(0, models, dims, standardise, pos_weight)
    request = {
        **protocol.base,
        **captured,
        "fold": 0,
        "round": 1,
        "seed": 11,
        "dp_mode": "off",
        wire.SECURE_SUMS: [f"train_loss_sum:{m}" for m in sorted(models)],
    }
    servers = [
        start_service(SiteService(t), load_site_config(t).service_socket, say=lambda _: None)
        for t in tomls
    ]
    yield tomls, request
    for server in servers:
        server.stop(grace=None)


def _secure(tomls, request, nodes=None, fail=None):
    """``secure_round`` over a LocalGrid of the sites (node 10 + i is site i): (outcome, grid)."""
    sockets = [str(load_site_config(t).service_socket) for t in tomls]
    grid = LocalGrid(app, {10 + i: {"site-service": p} for i, p in enumerate(sockets)}, fail)
    nodes = nodes if nodes is not None else range(len(tomls))
    outcome = secure_round(
        grid,
        {f"site_{i:03d}": 10 + i for i in nodes},
        "train.fusion",
        {f"site_{i:03d}": request for i in nodes},
        weight_cap=max_weight(max(SIZES)),
        timeout=60,
    )
    return outcome, grid


def _plain(tomls, request, sites) -> dict[str, dict]:
    """The replies the same sites give in clear (the same request, the same seeds)."""
    replies = {}
    for i in sites:
        worker = SiteWorker([load_site_config(tomls[i])])
        replies[f"site_{i:03d}"] = answer(worker, "train.fusion", copy.deepcopy(request))
    return replies


def test_secure_average_equals_the_weighted_average_within_the_bound(
    selected, task_identity
) -> None:
    tomls, request = selected
    outcome, grid = _secure(tomls, request)
    assert outcome.lost == {"site_003": "training"}  # failed after the key exchange
    assert outcome.weights["site_002"] == 0  # took part with zeros
    plain = _plain(tomls, request, [0, 1])
    assert {s: w for s, w in outcome.weights.items() if w} == {s: r["n"] for s, r in plain.items()}
    n = [r["n"] for r in plain.values()]
    assert outcome.aggregate["n"] == sum(n)
    for key in (k for k in request if k.startswith(wire.WEIGHTS_PREFIX)):
        expected = weighted_average([r[key] for r in plain.values()], n)
        largest = max(
            float(np.max(np.abs(r[key][p] - request[key][p])))
            for r in plain.values()
            for p in r[key]
        )
        bound = error_bound(n, max_weight(max(SIZES)), largest)
        assert 1e-7 < bound < 1e-4
        for name, value in expected.items():  # both sides end in float32
            atol = bound + 2 * np.finfo(np.float32).eps * float(np.max(np.abs(value)))
            np.testing.assert_allclose(outcome.aggregate[key][name], value, rtol=0, atol=atol)
        loss = f"train_loss_sum:{key.removeprefix(wire.WEIGHTS_PREFIX)}"
        losses = sum(r[loss] for r in plain.values())
        largest_mean = max(r[loss] / r["n"] for r in plain.values())
        assert outcome.aggregate[loss] == pytest.approx(
            losses, abs=error_bound(n, max_weight(max(SIZES)), largest_mean) * sum(n)
        )
    # the server never held one site's vector in clear: every reply's arrays were emptied
    trained = [r for r in grid.replies if r.has_content() and r.metadata.message_type == "train"]
    assert trained and all(
        len(record) == 0 for r in trained for record in r.content.array_records.values()
    )
    audit = tomls[2].parent / "output" / "audit" / "wire-audit.jsonl"
    entries = [json.loads(line) for line in audit.read_text().splitlines()]
    masked = [e for e in entries if e["route"] == "train.fusion"]
    assert masked[-1]["transport"] == "secagg+" and masked[-1]["fields"]["masked"]["zeros"]
    assert {e.get("secagg_stage") for e in entries} >= {"setup", "share_keys", "unmask"}


def test_a_site_lost_before_training_restarts_the_round_without_it(selected, task_identity) -> None:
    tomls, request = selected
    outcome, grid = _secure(tomls, request, nodes=[0, 1, 2], fail={12: "share_keys"})
    assert outcome.attempts == 2 and outcome.lost == {"site_002": "share keys"}
    assert outcome.aggregate is not None and set(outcome.weights) == {"site_000", "site_001"}
    trainings = [r for r in grid.replies if r.has_content() and "fitres.num_examples" in r.content]
    assert len(trainings) == 2  # the first attempt stopped before anyone trained


def test_one_training_site_is_never_unmasked(selected, task_identity) -> None:
    tomls, request = selected
    outcome, grid = _secure(tomls, request, nodes=[0, 2, 3])
    assert outcome.aggregate is None and "1 site(s) trained" in outcome.halted
    stages = [
        r.content.config_records[RECORD_KEY_CONFIGS]
        for r in grid.replies
        if r.has_content() and RECORD_KEY_CONFIGS in r.content.config_records
    ]
    assert not any(Key.SHARE_LIST in c for c in stages)  # no unmask stage was run


# ---- Flower's simulation engine ------------------------------------------------------------------


class _TolerantLink(InProcessLink):
    """In process, a site whose worker raises is dropped from that message (as Flower's error
    replies are), instead of stopping the run."""

    def ask(self, route, requests):
        replies = {}
        for site, request in requests.items():
            try:
                replies.update(super().ask(route, {site: request}))
            except Exception:  # noqa: BLE001
                continue
        return replies


def _simulate(root: Path, tomls: list[Path], cfg: FederationConfig) -> tuple[dict, dict]:
    """The run in Flower's simulation engine, then in process without secure aggregation:
    (secure results, plain results)."""
    from fedmets.simulation.simulate import run_flower_simulation

    fed = root / "federation.toml"
    fed.write_text(tomli_w.dumps(cfg.model_dump(mode="json", exclude_none=True)))
    configs = [load_site_config(t) for t in tomls]
    secure = run_flower_simulation(configs, fed, root / "run", lambda message: None)
    plain_cfg = FederationConfig.model_validate(
        {**cfg.model_dump(mode="json"), "strategy": {"secure_aggregation": False}}
    )
    workers = {c.site_id: SiteWorker([c]) for c in configs}
    plain = FederatedProtocol(
        _TolerantLink(workers), plain_cfg, "plain", None, root / "plain-checkpoints"
    ).run_all()
    return secure, plain


AUC_TOLERANCE = 0.01
"""Each secure average is within error_bound (~1e-5 here) of the plain one, but the sites then
train from it with Adam, whose steps are ~lr (1e-3) whatever the gradient's size, so the
models drift apart by up to ~lr per step (6.8e-4 seen); a pooled AUC moves only when a score
crosses one of the 10000 histogram bins. Seen: 1e-4."""


def _same_results(secure: dict, plain: dict, root: Path) -> None:
    assert secure["secure_aggregation"] and not plain["secure_aggregation"]
    for model, result in plain["models"].items():
        assert secure["models"][model]["pooled"]["auc"] == pytest.approx(
            result["pooled"]["auc"], abs=AUC_TOLERANCE
        ), model
    for fold_s, fold_p in zip(secure["folds"], plain["folds"], strict=True):
        for model, curves in fold_p["fusion"].items():
            ours = fold_s["fusion"][model]
            assert ours["sites"] == curves["sites"]
            np.testing.assert_allclose(ours["train_loss"], curves["train_loss"], atol=1e-3)
            np.testing.assert_allclose(ours["val_loss"], curves["val_loss"], atol=1e-3)
    for fold in range(2):
        checkpoint = f"fold{fold}-fusion.npz"
        ours = load_checkpoint(root / "run" / "federated" / "checkpoints" / checkpoint)["value"][0]
        theirs = load_checkpoint(root / "plain-checkpoints" / checkpoint)["value"][0]
        for model, state in theirs.items():
            for name, value in state.items():
                np.testing.assert_allclose(ours[model][name], value, atol=5e-3, err_msg=name)


@pytest.mark.slow
def test_a_secure_run_without_a_site_that_fails_in_training_gives_the_plain_results(
    tmp_path,
) -> None:
    """Through Flower's simulation engine: site_002 fails every training round after the key
    exchange; the run goes on with the other two, as the same run aggregated in clear does.
    site_000's floor of 12 holds its training losses back (its 30 training rows are 6 from its
    24 fitting rows): the curve is site_001's in both runs, not read low by a 0 in the sum."""
    tomls = write_feature_sites(tmp_path / "sites", [60, 60, 60], seed=3, folds=2)
    _refuses_to_train(tomls[2])
    with tomls[0].open("a") as handle:
        handle.write("min_patients = 12\n")  # into [policy], the file's last table
    secure, plain = _simulate(tmp_path, tomls, _cfg())
    _same_results(secure, plain, tmp_path)
    assert {(d["site"], d["route"], d["secagg"]) for d in secure["dropouts"]} == {
        ("site_002", "train.fusion", "training")
    }
    final_rounds = max(secure["model"]["rounds"].values())  # the final model's, after CV
    assert len(secure["dropouts"]) == 2 * 2 + final_rounds  # every round, CV and final
    received = [
        json.loads(line) for line in (tmp_path / "run" / "federated" / "received.jsonl").open()
    ]
    training = [e for e in received if e["route"] == "train.fusion"]
    assert {e["site"] for e in training} == {"site_000", "site_001"}
    assert len(training) == (2 * 2 + final_rounds) * 2  # (folds x rounds + final) x sites
    assert all(
        e["transport"] == "secagg+" and set(e["fields"]) == {"n", "masked"} for e in training
    )
    main = secure["models"]["none/radiomics+clinical"]
    assert set(main["per_site"]) == {"site_000", "site_001", "site_002"}  # evaluated all the same
