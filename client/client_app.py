"""The site's Flower ClientApp: every route of ``fedmets.shared.wire`` answered by a
``fedmets.client.site_worker.SiteWorker`` through the release gate (``fedmets.client.release``).

Which site this process is: the SuperNode's ``--node-config 'site-config="/path/site.toml"'``
(deployment), or in Flower's simulation the run config's ``site-configs`` (site TOML paths
joined by ``,``) indexed by the node's ``partition-id``. Workers are cached per process by
config path and file times, so a simulation's long-lived actors load a site once.

Secure aggregation: Flower's ``secaggplus_mod`` runs SecAgg+'s four stages on messages of type
``"train"`` (``fedmets.shared.wire.SECURE_MESSAGE_TYPE``). Its key-exchange stages never reach
fedmets; its masking stage calls :func:`secure_train`, which answers the training route named in the
request through the same release gate and hands the mod the vector to mask
(``fedmets.shared.wire.to_fitres``). The mod keeps its keys in the SuperNode's context between
stages.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

from flwr.app import Context, Message
from flwr.client.mod import secaggplus_mod
from flwr.clientapp import ClientApp
from flwr.common.secure_aggregation.secaggplus_constants import RECORD_KEY_CONFIGS, Key, Stage
from flwr.compat.common import recorddict_compat

from fedmets.client.release import answer, log_key_exchange
from fedmets.shared import wire
from fedmets.shared.config import load_site_config

if TYPE_CHECKING:
    from fedmets.client.site_worker import SiteWorker

app = ClientApp()


def site_config_path(context: Context) -> Path:
    """The site TOML of this SuperNode (see the module docstring)."""
    if "site-config" in context.node_config:
        return Path(str(context.node_config["site-config"]))
    configs = str(context.run_config.get("site-configs", "")).split(",")
    partition = int(context.node_config.get("partition-id", -1))
    if not 0 <= partition < len(configs) or not configs[partition]:
        raise RuntimeError(
            "no site config: start flower-supernode with --node-config "
            "'site-config=\"/path/to/site.toml\"'"
        )
    return Path(configs[partition])


@lru_cache(maxsize=8)
def _worker(path: Path, stamp: tuple[float, ...]) -> SiteWorker:
    # Imported here: SecAgg+'s key-exchange messages (a fresh process each, when deployed)
    # never load the worker and its torch / scikit-learn imports.
    from fedmets.client.site_worker import SiteWorker

    return SiteWorker([load_site_config(path)])


def worker_for(context: Context) -> SiteWorker:
    """The site worker of this SuperNode (reloaded when its config or features change)."""
    path = site_config_path(context).resolve()
    cfg = load_site_config(path)
    features = cfg.paths.output / "features.parquet"
    stamp = (path.stat().st_mtime, features.stat().st_mtime if features.is_file() else 0.0)
    return _worker(path, stamp)


def _serve(msg: Message, context: Context) -> Message:
    route_name = msg.metadata.message_type
    request = wire.from_records(msg.content)
    reply = answer(worker_for(context), route_name, request)
    return Message(wire.to_records(route_name, reply, reply=True), reply_to=msg)


for _name in wire.ROUTES:
    _kind, _action = _name.split(".", 1)
    register = app.train if _kind == "train" else app.query
    register(_action)(_serve)


def audit_key_exchange(msg: Message, context: Context, call_next: Any) -> Message:
    """A mod outside ``secaggplus_mod``: its key-exchange replies go to the site's audit log
    (the masked vector is logged by the release gate in :func:`secure_train`)."""
    stage = msg.content.config_records[RECORD_KEY_CONFIGS].get(Key.STAGE)  # the mod pops it
    reply = call_next(msg, context)
    if stage != Stage.COLLECT_MASKED_VECTORS and reply.has_content():
        cfg = load_site_config(site_config_path(context))
        log_key_exchange(cfg, str(stage), reply.content.config_records[RECORD_KEY_CONFIGS])
    return reply


@app.train(mods=[audit_key_exchange, secaggplus_mod])
def secure_train(msg: Message, context: Context) -> Message:
    """SecAgg+'s masking stage: the training route of the request, checked and logged as
    masked by the release gate; the mod masks the returned vector before anything leaves."""
    route_name, request = wire.from_fitins(
        recorddict_compat.recorddict_to_fitins(msg.content, keep_input=True)
    )
    reply = answer(worker_for(context), route_name, request, masked=True)
    fitres = wire.to_fitres(route_name, request, reply)
    return Message(recorddict_compat.fitres_to_recorddict(fitres, keep_input=False), reply_to=msg)
