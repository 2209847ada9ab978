"""The coordinating centre's Flower ServerApp: runs ``fedmets.server.protocol.FederatedProtocol``
over the connected SuperNodes and writes the results.

Run config (``pyproject.toml`` ``[tool.flwr.app.config]``, override with ``flwr run
--run-config``): ``federation-config`` (the federation TOML, relative to the app folder or
absolute), ``out`` (results folder; default ``[run] output_dir / [run] name``) and ``resume``
(continue from ``OUT/checkpoints/`` after a stop; otherwise they are cleared). Writes
``OUT/federated.json`` (results and run record), ``OUT/server.log`` (progress),
``OUT/received.jsonl`` (what each site sent: fields and sizes, never values) and
``OUT/checkpoints/`` (every finished step and training round) and, with ``[stages] final_model``,
``OUT/model/`` (the model bundle, ``fedmets.server.bundle``; then sent to every site to keep).
One run at a time works in ``OUT`` (:data:`RUN_LOCK`): ending ``flwr run`` ends only its log
stream, the run goes on at the SuperLink, so a resume started then is refused until that run is
stopped (``flwr stop``).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from logging import INFO, WARNING
from pathlib import Path
from typing import Any

from flwr.app import Context, Message
from flwr.common.logger import log
from flwr.serverapp import Grid, ServerApp

from fedmets.server.bundle import deliver_bundle, evaluate_held_out, write_bundle
from fedmets.server.checkpoints import CheckpointError
from fedmets.server.fold_lanes import fold_lanes
from fedmets.server.protocol import FederatedProtocol, ProtocolError, census_request
from fedmets.server.report import write_report
from fedmets.server.results import to_jsonable
from fedmets.server.secure_aggregation import SecureRound, secure_round
from fedmets.shared import wire
from fedmets.shared.app_digest import running_app_digest
from fedmets.shared.config import FederationConfig, load_federation_config
from fedmets.shared.files import InUse, sole_user, write_json
from fedmets.shared.identity import identity_problem

app = ServerApp()
APP_DIR = Path(__file__).resolve().parent.parent
NODE_POLL_S = 1.0
PULL_INTERVAL_S = (0.1, 1.0)
"""Seconds between looks for replies: the first, and the most (each wait half again as long as
the one before). A quick reply is seen within 0.1 s; a long wait asks the SuperLink about once
a second, not ten times (each look costs the SuperLink a database query: a deployed run of the
tests' federation used 15% less CPU in all, 2026-12-06)."""
RUN_LOCK = "run"
"""``OUT/.run.lock``: held by the run working in ``OUT`` (named in it) while it lives; a second
run in the same folder is refused (``fedmets.shared.files.sole_user``)."""


class FlowerLink:
    """``fedmets.server.protocol.SiteLink`` over a Flower Grid: sites are SuperNodes, named by their
    node id until the census tells their site ids.

    Each ``ask`` goes to the SuperNodes connected at that moment: a site whose node is gone is
    not waited for (the protocol records it as a dropout), and a node that connects later (a
    restarted SuperNode, or a new node id for a known site) is asked for its census first and
    rejoins under its site id. Every reply received is described (fields, kinds, shapes, bytes;
    never values) in ``received.jsonl`` beside the results, for the wire audit.

    ``secure_aggregation``: this link can run a training round through SecAgg+
    (:meth:`ask_secure`, ``fedmets.server.secure_aggregation``). :meth:`ask_batch` sends the
    requests of folds run at once (``fedmets.server.fold_lanes``) and, ``batch_validation``,
    a training round's validation with the next round's training: every message round costs a
    ClientApp process at each site and Flower's polling."""

    secure_aggregation = True
    batch_validation = True

    def __init__(self, grid: Grid, cfg: FederationConfig, say: Any, received: Path) -> None:
        self.grid = grid
        self.cfg = cfg
        self.timeout = cfg.federation.round_timeout_s
        self.say = say
        self.received = received
        self.named = False
        deadline = time.monotonic() + self.timeout
        while True:
            ids = sorted(grid.get_node_ids())
            if len(ids) >= cfg.federation.min_sites or time.monotonic() > deadline:
                break
            time.sleep(NODE_POLL_S)
        if len(ids) < cfg.federation.min_sites:
            raise ProtocolError(
                f"{len(ids)} SuperNodes connected after {self.timeout:.0f} s; min_sites is "
                f"{cfg.federation.min_sites}"
            )
        self.nodes: dict[str, int] = {f"node-{i}": i for i in ids}
        self.offline: set[str] = set()
        self.refused: set[int] = set()  # nodes whose census did not prove their site id

    def sites(self) -> list[str]:
        return sorted(self.nodes)

    def rename(self, names: Mapping[str, str]) -> None:
        self.nodes = {names.get(key, key): node for key, node in self.nodes.items()}
        self.named = True

    def refuse(self, key: str) -> None:
        self.refused.add(self.nodes.pop(key))

    def ask(self, route: str, requests: Mapping[str, dict]) -> dict[str, dict]:
        return self._send(route, self._online(requests))

    def ask_secure(
        self, route: str, requests: Mapping[str, dict], weight_cap: float, round_id: int = 1
    ) -> SecureRound:
        """The connected sites train on ``route`` under SecAgg+ (see
        ``fedmets.server.secure_aggregation.secure_round``); each site's masked reply is described
        in ``received.jsonl`` (its weight and the size of its vector, nothing else)."""
        targets = self._online(requests)
        outcome = secure_round(
            self.grid,
            {site: self.nodes[site] for site in targets},
            route,
            targets,
            weight_cap=weight_cap,
            timeout=self.timeout,
            round_id=round_id,
            say=self.say,
        )
        for site, weight in outcome.weights.items():
            fields = wire.describe_masked(targets[site], weight)
            self._log_receipt(route, site, targets[site], {"n": weight}, fields)
        return outcome

    def _online(self, requests: Mapping[str, dict]) -> dict[str, dict]:
        """The requests of the sites whose node is connected now (rejoins and new nodes
        admitted, sites gone offline said)."""
        connected = set(self.grid.get_node_ids())
        if self.named:
            new = connected - set(self.nodes.values()) - self.refused
            self._admit(new, next(iter(requests.values())))
        for site, node in self.nodes.items():
            if node in connected and site in self.offline:
                self.offline.discard(site)
                self.say(f"  site {site} rejoined (node {node})")
            elif node not in connected and site not in self.offline:
                self.offline.add(site)
                self.say(f"  site {site} is offline (node {node})", WARNING)
        return {s: r for s, r in requests.items() if self.nodes.get(s) in connected}

    def _admit(self, new_nodes: set[int], request: Mapping[str, Any]) -> None:
        """Ask nodes not seen before for their census; known sites rejoin on their new node,
        once its signature proves the site id (``[federation] identities``)."""
        if not new_nodes:
            return
        census = {
            "run": request["run"],
            "min_patients": request["min_patients"],
            **census_request(self.cfg),
        }
        challenge = census["challenge"]
        keys = {f"node-{n}": n for n in new_nodes}
        self.nodes.update(keys)
        replies = self._send("query.census", {k: census for k in keys})
        identities = self.cfg.federation.identities
        for key in keys:
            node = self.nodes.pop(key)
            reply = replies.get(key, {})
            site = reply.get("site_id")
            problem = identities and identity_problem(identities, census["run"], challenge, reply)
            if site is not None and problem:
                self.refused.add(node)
                self.say(f"  node {node} refused: it {problem}", WARNING)
            elif site in self.nodes:
                self.nodes[site] = node
                self.offline.discard(site)
                self.say(f"  site {site} rejoined (node {node})")
            elif site is not None:
                self.say(f"  node {node} says it is site {site}, not in this run: ignored", WARNING)

    def _exchange(self, messages: list[Message], timeout: float | None = None) -> list[Message]:
        """``grid.send_and_receive``, but looking for replies at :data:`PULL_INTERVAL_S`
        (Flower 1.42's deployed grid looks every 3 s; its simulation every 0.1 s), for
        ``timeout`` seconds (default ``round_timeout_s``)."""
        waiting = set(self.grid.push_messages(messages))
        deadline = time.monotonic() + (timeout or self.timeout)
        replies: list[Message] = []
        interval, longest = PULL_INTERVAL_S
        while waiting and time.monotonic() < deadline:
            pulled = list(self.grid.pull_messages(waiting))
            replies += pulled
            waiting -= {reply.metadata.reply_to_message_id for reply in pulled}
            if waiting:
                time.sleep(interval)
                interval = min(interval * 1.5, longest)
        return replies

    def _send(self, route: str, requests: Mapping[str, dict]) -> dict[str, dict]:
        by_node = {self.nodes[site]: site for site in requests}
        messages = [
            Message(
                content=wire.to_records(route, request, reply=False),
                dst_node_id=self.nodes[site],
                message_type=route,
            )
            for site, request in requests.items()
        ]
        replies = {}
        for reply in self._exchange(messages):
            site = by_node.get(reply.metadata.src_node_id)
            if site is None:
                continue
            if reply.has_error():
                self.say(f"  {site}: {route} failed: {reply.error.reason}", WARNING)
                continue
            try:
                replies[site] = wire.from_records(reply.content)
            except wire.WireError as error:  # another wire version, or crafted: this site only
                self.say(f"  {site}: {route} reply not readable ({error}): dropped", WARNING)
                continue
            self._log_receipt(route, site, requests[site], replies[site])
        return replies

    def ask_batch(
        self, items: Mapping[str, Sequence[tuple[str, dict]]]
    ) -> dict[str, list[dict | None]]:
        """Each connected site's items in one batch message (``wire.to_batch``), waiting
        ``round_timeout_s`` per item of the longest batch; per site that answered, each item's
        reply (described in ``received.jsonl``) or None where the site refused it (said)."""
        online = self._online({site: batch[0][1] for site, batch in items.items()})
        by_node = {self.nodes[site]: site for site in online}
        messages = [
            Message(
                content=wire.to_batch(items[site], reply=False),
                dst_node_id=self.nodes[site],
                message_type=wire.BATCH_MESSAGE_TYPE,
            )
            for site in online
        ]
        longest = max((len(items[site]) for site in online), default=1)
        replies: dict[str, list[dict | None]] = {}
        for reply in self._exchange(messages, self.timeout * longest):
            site = by_node.get(reply.metadata.src_node_id)
            if site is None:
                continue
            if reply.has_error():
                reason = reply.error.reason
                self.say(f"  {site}: batch of {len(items[site])} failed: {reason}", WARNING)
                continue
            try:
                back = wire.from_batch(reply.content)
            except wire.WireError:
                back = []
            if len(back) != len(items[site]):
                self.say(f"  {site}: no reply to each item of its batch: dropped", WARNING)
                continue
            answers = replies[site] = []
            for (route, request), (_, answer) in zip(items[site], back, strict=True):
                if isinstance(answer, str):
                    self.say(f"  {site}: {route} {answer}", WARNING)
                    answers.append(None)
                else:
                    self._log_receipt(route, site, request, answer)
                    answers.append(answer)
        return replies

    def _log_receipt(
        self, route: str, site: str, request: dict, reply: dict, masked: dict | None = None
    ) -> None:
        """One line of ``received.jsonl``; ``masked``: the fields of a SecAgg+ reply (its
        weight in clear, the masked vector that was summed with the others' unread)."""
        entry = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "site": reply.get("site_id", site) if route == "query.census" else site,
            "run": str(request.get("run", "")),
            "route": route,
            "fold": request.get("fold"),
            "round": request.get("round"),
            "patients": reply.get("n"),
            "fields": masked or wire.describe(route, reply),
        }
        if masked is not None:
            entry["transport"] = "secagg+"
        with self.received.open("a", encoding="utf-8") as log_file:
            log_file.write(json.dumps(entry) + "\n")


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Load the federation config, run the protocol, write the results."""
    cfg_path = Path(str(context.run_config["federation-config"]))
    if not cfg_path.is_absolute():
        cfg_path = APP_DIR / cfg_path
    cfg = load_federation_config(cfg_path)
    out = Path(str(context.run_config.get("out") or cfg.run.output_dir / cfg.run.name))
    out.mkdir(parents=True, exist_ok=True)
    resume = str(context.run_config.get("resume", "false")).lower() in ("true", "1", "yes")
    handler = logging.FileHandler(out / "server.log", encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
    logger = logging.getLogger("fedmets.server")
    logger.setLevel(INFO)
    logger.addHandler(handler)

    def say(message: str, level: int = INFO) -> None:
        log(level, "[fedmets] %s", message)
        logger.log(level, message)

    holder = f"run {context.run_id} (process {os.getpid()}, since {time.strftime('%F %T')})"
    try:
        with sole_user(out / RUN_LOCK, holder):
            _run(grid, cfg, out, resume, say)
    except InUse as running:
        say(
            f"run {context.run_id} refused: {out} is in use by {running}. Only one run at a "
            f"time works in a results folder: stop that one first (`flwr stop RUN_ID`; ending "
            f"`flwr run` only ends its log stream), then resume this one.",
            WARNING,
        )
        raise
    except (ProtocolError, CheckpointError) as error:
        say(f"run stopped: {error}", WARNING)
        (out / "error.txt").write_text(f"{error}\n", encoding="utf-8")
        raise
    finally:
        logger.removeHandler(handler)
        handler.close()


def _run(grid: Grid, cfg: FederationConfig, out: Path, resume: bool, say: Callable) -> None:
    """The run of ``cfg`` over ``grid`` into ``out`` (from its checkpoints with ``resume``)."""
    link = FlowerLink(grid, cfg, say, out / "received.jsonl")
    checkpoints = out / "checkpoints"
    if not resume and checkpoints.exists():
        shutil.rmtree(checkpoints)
    runner = None
    if cfg.federation.parallel_folds > 1:
        runner = fold_lanes(link, cfg, cfg.run.name, checkpoints, out / "privacy", say)
    results = FederatedProtocol(
        link, cfg, cfg.run.name, say, checkpoints, out / "privacy", fold_runner=runner
    ).run_all()
    results["config"] = cfg.model_dump(mode="json")
    results["app_sha256"] = running_app_digest() or None  # None: run from a source checkout
    final = results.pop("final")
    if final is not None:
        bundle = write_bundle(out / "model", {**results, "final": final}, cfg)
        say(f"final model: {bundle}")
        results["model"] = {
            "bundle": str(bundle),
            "rounds": final["rounds"],
            "sites": deliver_bundle(link, bundle, cfg.run.name, say),
        }
        if cfg.federation.held_out:
            results["holdout"] = evaluate_held_out(link, bundle, results, cfg, say)
    write_json(out / "federated.json", to_jsonable(results), indent=1)
    say(f"results written to {out / 'federated.json'}")
    try:
        say(f"report: {write_report(out)}")
    except Exception as error:  # noqa: BLE001 - a report never fails a finished run
        say(f"report not written: {error}", WARNING)
