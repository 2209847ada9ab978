"""The site's Flower ClientApp: every route of ``shared.wire`` answered by a
``client.site_worker.SiteWorker`` through the release gate (``client.release``).

Which site this process is: the SuperNode's ``--node-config 'site-config="/path/site.toml"'``
(deployment), or in Flower's simulation the run config's ``site-configs`` (site TOML paths
joined by ``,``) indexed by the node's ``partition-id``. Workers are cached per process by
config path and file times, so a simulation's long-lived actors load a site once.
"""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from client.release import answer
from client.site_worker import SiteWorker
from shared import wire
from shared.config import load_site_config

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
