"""`fedmets certs`: a pilot's keys and certificates, made with ``cryptography``.

For a pilot without a hospital PKI, the coordinating centre creates in ``OUT/``:

- ``ca.crt`` / ``ca.key``: a self-signed certificate authority, valid :data:`CA_VALID_DAYS`
  (keep ``ca.key`` off the SuperLink host);
- ``server.pem`` / ``server.key``: the SuperLink's TLS certificate, signed by the CA, valid
  :data:`VALID_DAYS`, with the given host names and IP addresses as subjectAltNames (gRPC
  checks them); :func:`renew_server_certificate` issues the next one from the same CA, so the
  sites (which trust the CA) need nothing new;
- with ``sites`` (a rehearsal on one machine): ``sites/<site>`` / ``sites/<site>.pub``, SuperNode
  key pairs (``fedmets.shared.identity.make_site_keys``); in a deployment each hospital makes
  its own (``fedmets site keys``).

Hospitals with their own PKI use their CA and server certificate instead (docs/deployment.md).
"""

from __future__ import annotations

import datetime as dt
import ipaddress
import re
from collections.abc import Sequence
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedmets.shared.files import check_writable, write_atomically
from fedmets.shared.identity import check_site_id, make_site_keys

VALID_DAYS = 365
CA_VALID_DAYS = 3650
LOOPBACK = ("localhost", "127.0.0.1")


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "fedmets pilot"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _write(path: Path, data: bytes, private: bool = False) -> None:
    """``data`` to ``path`` atomically; a private file is mode 600 before it is in place."""

    def write(partial: Path) -> None:
        partial.write_bytes(data)
        if private:
            partial.chmod(0o600)

    write_atomically(path, write)


def _pem_key(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.TraditionalOpenSSL,
        serialization.NoEncryption(),
    )


LABEL = r"[a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?"
HOST_NAME = re.compile(rf"^(?=.{{1,253}}$){LABEL}(\.{LABEL})*$", re.I)
"""A host name: dot-separated labels of letters, digits, inner hyphens and (as container
names have them) underscores."""


def check_hosts(hosts: Sequence[str]) -> None:
    """ValueError naming each of ``hosts`` that is neither an IP address nor a host name (a
    scheme, port, path or space typed with it): its certificate would match no address."""
    bad = []
    for host in hosts:
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if not HOST_NAME.match(host):
                bad.append(repr(host))
    if bad:
        raise ValueError(
            f"--host {', '.join(bad)}: not a host name or IP address (e.g. fl.example.org or"
            " 10.0.0.5, without scheme, port or path)"
        )


def _san(hosts: Sequence[str]) -> x509.SubjectAlternativeName:
    names: list[x509.GeneralName] = []
    for host in hosts:
        try:
            names.append(x509.IPAddress(ipaddress.ip_address(host)))
        except ValueError:
            names.append(x509.DNSName(host))
    return x509.SubjectAlternativeName(names)


def make_certificates(
    out: Path,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    sites: Sequence[str] = (),
    days: int = VALID_DAYS,
    ca_days: int = CA_VALID_DAYS,
) -> dict[str, Path]:
    """Write the CA (valid ``ca_days``), the server certificate for ``hosts`` (valid ``days``)
    and a key pair per site into ``out``; return the paths by role (``ca``, ``ca_key``,
    ``server_cert``, ``server_key``, ``site:<id>``, ``site:<id>.pub``). Before anything is
    written: ValueError for a site that is no site id or a host that is no host name or IP
    address, FileExistsError when ``out`` holds a
    CA, server certificate or one of the site keys already (every hospital trusts the CA: a
    new one would cut them all off); OSError ``--out: cannot write ...`` when ``out`` is a file
    or cannot be written."""
    out = Path(out)
    check_hosts(hosts)
    for site in sites:
        check_site_id(site)
    names = ("ca.crt", "ca.key", "server.pem", "server.key")
    made = [out / n for n in names] + [out / "sites" / s for s in sites]
    existing = [str(path) for path in made if path.exists()]
    if existing:
        raise FileExistsError(
            f"{', '.join(existing)}: already made; a pilot's CA is made once, since every "
            "hospital trusts it: renew the server certificate with --renew-server CA_KEY, add "
            "a site's key pair with `fedmets site keys`, or give a new --out"
        )
    check_writable(out, "--out")  # a file there, or no right to write: named, no errno
    now = dt.datetime.now(dt.UTC)
    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca_cert = (
        x509.CertificateBuilder()
        .subject_name(_name("fedmets pilot CA"))
        .issuer_name(_name("fedmets pilot CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=ca_days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    paths = {"ca": out / "ca.crt", "ca_key": out / "ca.key"}
    _write(paths["ca"], ca_cert.public_bytes(serialization.Encoding.PEM))
    _write(paths["ca_key"], _pem_key(ca_key), private=True)
    paths |= _server_certificate(out, ca_cert, ca_key, hosts, days)
    for site in sites:
        paths[f"site:{site}"], paths[f"site:{site}.pub"] = make_site_keys(out / "sites", site)
    return paths


def renew_server_certificate(
    out: Path, ca_key: Path, hosts: Sequence[str], days: int = VALID_DAYS
) -> dict[str, Path]:
    """A new ``out/server.pem`` / ``server.key`` for ``hosts`` from the CA of ``out/ca.crt``
    and its key ``ca_key`` (restart the SuperLink with them; the SuperNodes, which trust the
    CA, and their registrations stay as they are). ValueError when the key is not the CA's
    or a host is no host name or IP address."""
    out = Path(out)
    check_hosts(hosts)
    if not (out / "ca.crt").is_file():
        raise FileNotFoundError(
            f"{out / 'ca.crt'}: not found; --renew-server renews the server certificate in the"
            " folder `fedmets certs` wrote (--out)"
        )
    ca_cert = x509.load_pem_x509_certificate((out / "ca.crt").read_bytes())
    key = serialization.load_pem_private_key(Path(ca_key).read_bytes(), password=None)
    if key.public_key() != ca_cert.public_key():
        raise ValueError(f"{ca_key} is not the key of {out / 'ca.crt'}")
    return _server_certificate(out, ca_cert, key, hosts, days)


def _server_certificate(
    out: Path, ca_cert: x509.Certificate, ca_key, hosts: Sequence[str], days: int
) -> dict[str, Path]:
    """Write the SuperLink's key and certificate for ``hosts`` and :data:`LOOPBACK` (the
    centre's own ``flwr`` and its proxy reach the SuperLink there), signed by the CA."""
    hosts = [*hosts, *(h for h in LOOPBACK if h not in hosts)]
    now = dt.datetime.now(dt.UTC)
    server_key = ec.generate_private_key(ec.SECP384R1())
    server_cert = (
        x509.CertificateBuilder()
        .subject_name(_name(hosts[0]))
        .issuer_name(ca_cert.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(_san(hosts), critical=False)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    paths = {"server_cert": out / "server.pem", "server_key": out / "server.key"}
    _write(paths["server_key"], _pem_key(server_key), private=True)
    _write(paths["server_cert"], server_cert.public_bytes(serialization.Encoding.PEM))
    return paths
