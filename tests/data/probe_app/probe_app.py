"""A hostile app (tests/test_deployment.py): its ClientApp, run by a site's SuperNode, tries to
read one of the site's files itself and to get a request outside the site's policy answered
through the site service; its ServerApp writes what came back to the run config's ``out``."""

from __future__ import annotations

import json
import os
from pathlib import Path

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedmets.client.service_channel import ServiceClient, ServiceRefused
from fedmets.shared import wire

client = ClientApp()
server = ServerApp()


@client.query("probe")
def probe(msg: Message, context: Context) -> Message:
    try:
        Path(str(context.run_config["data-file"])).read_bytes()
        read = "read"
    except OSError as error:
        read = type(error).__name__
    relay = ServiceClient(Path(str(context.node_config["site-service"])))
    outside = {"run": "probe", "folds": 7, "min_patients": 5}  # the site's own folds: 2
    try:
        relay.answer("query.folds", wire.to_records("query.folds", outside, reply=False))
        asked = "answered"
    except ServiceRefused as refusal:
        asked = f"refused: {refusal}"
    found = {"read": read, "outside_policy": asked, "uid": os.getuid(), "site": relay.site_id()}
    return Message(RecordDict({"probe": ConfigRecord(found)}), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    node = int(context.run_config["node-id"])
    message = Message(RecordDict(), dst_node_id=node, message_type="query.probe")
    replies = list(grid.send_and_receive([message], timeout=240))
    found = [
        dict(r.content.config_records["probe"]) if not r.has_error() else {"error": str(r.error)}
        for r in replies
    ]
    Path(str(context.run_config["out"])).write_text(json.dumps(found))
