"""The site's Flower ClientApp: a relay. Every route of ``fedmets.shared.wire`` goes to the
site's service (``fedmets.client.site_service``), which answers through the hospital's own gate;
the ClientApp itself reads no patient file and imports no torch.

Which site this process serves:
- deployment: the SuperNode's ``--node-config 'site-service="/path/site-service.sock"'``, the
  socket of ``fedmets site serve`` (``fedmets.client.service_channel``);
- Flower's simulation: the run config's ``site-configs`` (site TOML paths joined by ``,``)
  indexed by the node's ``partition-id``, each served by a ``SiteService`` in this process
  (cached: a simulation's long-lived actors load a site once).

Secure aggregation: Flower's ``secaggplus_mod`` runs SecAgg+'s four stages on messages of type
``"train"`` (``fedmets.shared.wire.SECURE_MESSAGE_TYPE``) here, in the relay. Its key-exchange
replies are sent to the service's audit log; its masking stage calls :func:`secure_train`,
whose gated reply (the service answers the training route named in the request) the mod masks.
The masking runs in the centre's code, so the site's gate treats that reply as released in
clear (docs/privacy.md).
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage

from fedmets.client.service_channel import ServiceClient
from fedmets.shared import wire
from fedmets.shared.app_digest import running_app_digest

if TYPE_CHECKING:
    from fedmets.client.site_service import SiteService

app = ClientApp()


@lru_cache(maxsize=8)
def _in_process(path: Path) -> SiteService:
    from fedmets.client.site_service import SiteService  # simulation only: loads torch

    return SiteService(path)


def site_service(context: Context) -> ServiceClient | SiteService:
    """This SuperNode's site service (see the module docstring)."""
    if "site-service" in context.node_config:
        socket = Path(str(context.node_config["site-service"]))
        return ServiceClient(socket, app=running_app_digest())
    configs = str(context.run_config.get("site-configs", "")).split(",")
    partition = int(context.node_config.get("partition-id", -1))
    if not 0 <= partition < len(configs) or not configs[partition]:
        raise RuntimeError(
            "no site service: start `fedmets site serve --config site.toml` and the SuperNode "
            "with --node-config 'site-service=\"/path/to/site-service.sock\"'"
        )
    return _in_process(Path(configs[partition]).resolve())


def _serve(msg: Message, context: Context) -> Message:
    route_name = msg.metadata.message_type
    reply = site_service(context).answer(route_name, msg.content)
    return Message(reply, reply_to=msg)


@app.query(wire.BATCH_MESSAGE_TYPE.split(".", 1)[1])
def _serve_batch(msg: Message, context: Context) -> Message:
    """The requests of folds run at once, in one message (``fedmets.shared.wire.to_batch``)."""
    return Message(site_service(context).answer_batch(msg.content), reply_to=msg)


for _name in wire.ROUTES:
    _kind, _action = _name.split(".", 1)
    register = app.train if _kind == "train" else app.query
    register(_action)(_serve)


def audit_key_exchange(msg: Message, context: Context, call_next: Any) -> Message:
    """A mod outside ``secaggplus_mod``: its key-exchange replies go to the site's audit log
    (the masked vector is logged by the site's gate in :func:`secure_train`)."""
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)  # the mod pops it
    reply = call_next(msg, context)
    if stage != Stage.COLLECT_MASKED_VECTORS and reply.has_content():
        sent = reply.content.config_records[RECORD_KEY_CONFIGS]
        site_service(context).log_key_exchange(str(stage), sent)
    return reply


@app.train(mods=[audit_key_exchange, secaggplus_mod])
def secure_train(msg: Message, context: Context) -> Message:
    """SecAgg+'s masking stage: the site's gated reply to the training route in the request;
    the mod masks the returned vector before anything leaves."""
    return Message(site_service(context).secure(msg.content), reply_to=msg)
