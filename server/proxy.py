"""The centre's reverse proxy (nginx) in front of the SuperLink: the hospitals reach the Fleet
API and nothing else.

Flower 1.42 serves its Fleet (``/v1/fleet/``), Control (``/v1/control/``) and Runtime APIs over
HTTPS on one port, and the open-source Control API has no login: whoever reaches that port and
trusts the CA could list and start runs or register keys. So the SuperLink listens on loopback
only (``--host 127.0.0.1``), where the centre's operators run ``flwr``, and nginx, on the address
the hospitals use, terminates TLS with the SuperLink's certificate and forwards ``/v1/fleet/``
alone to it (verifying the SuperLink's certificate against the CA); every other path gets 403.
SuperNode authentication still happens at the SuperLink (nginx passes the signed headers on).

:func:`nginx_config` writes a complete configuration for ``nginx -c FILE`` (its pid, logs and
temporary files under one folder); ``fedmets proxy-config`` prints it.
"""

from __future__ import annotations

from pathlib import Path

FLEET_PREFIX = "/v1/fleet/"
UPSTREAM_NAME = "localhost"
"""The name nginx checks the SuperLink's certificate against (it lists localhost)."""


def nginx_config(
    listen: str,
    superlink_port: int,
    certificate: Path,
    key: Path,
    ca: Path,
    folder: Path,
) -> str:
    """nginx.conf: TLS on ``listen`` (``host:port``) with ``certificate``/``key``,
    ``/v1/fleet/`` forwarded to ``https://127.0.0.1:superlink_port`` (checked against ``ca``),
    everything else 403; pid, logs and temporary files under ``folder``."""
    folder = Path(folder).resolve()
    return f"""# fedmets: the hospitals reach the SuperLink's Fleet API only (fedmets.server.proxy)
daemon off;
worker_processes 1;
pid {folder}/nginx.pid;
error_log {folder}/error.log warn;

events {{
    worker_connections 256;
}}

http {{
    access_log {folder}/access.log;
    client_body_temp_path {folder}/client_body;
    proxy_temp_path {folder}/proxy;
    fastcgi_temp_path {folder}/fastcgi;
    uwsgi_temp_path {folder}/uwsgi;
    scgi_temp_path {folder}/scgi;

    server {{
        listen {listen} ssl;
        ssl_certificate {Path(certificate).resolve()};
        ssl_certificate_key {Path(key).resolve()};
        ssl_protocols TLSv1.2 TLSv1.3;

        location {FLEET_PREFIX} {{
            proxy_pass https://127.0.0.1:{superlink_port};
            proxy_http_version 1.1;
            proxy_ssl_trusted_certificate {Path(ca).resolve()};
            proxy_ssl_verify on;
            proxy_ssl_name {UPSTREAM_NAME};
            proxy_ssl_server_name on;
            proxy_request_buffering off;  # model weights stream through, no temporary files
            proxy_buffering off;
            client_max_body_size 0;
            proxy_read_timeout 600s;
            proxy_send_timeout 600s;
        }}

        location / {{
            return 403 "fedmets: only the Fleet API is served here\\n";
        }}
    }}
}}
"""


def write_nginx_config(path: Path, superlink_port: int, listen: str, certs: dict) -> Path:
    """Write :func:`nginx_config` for the certificates of ``fedmets certs`` (``certs``: the
    paths by role, ``server_cert``, ``server_key``, ``ca``) to ``path``; its working folder is
    ``path``'s folder. Returns ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = nginx_config(
        listen, superlink_port, certs["server_cert"], certs["server_key"], certs["ca"], path.parent
    )
    path.write_text(text, encoding="utf-8")
    return path
