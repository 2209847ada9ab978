"""Bound site identities: a site proves its site id with its SuperNode key.

Each hospital makes its own key pair (``fedmets site keys``: ECDSA P-384, OpenSSH, the format
``flower-supernode --auth-supernode-private-key`` and ``flwr supernode register`` take) and
sends only the public key to the coordinating centre, which lists it under its site id in the
federation config (``[federation.identities]``). At every census the centre sends a fresh random
challenge; the site service signs :func:`statement` (protocol, run, site id, challenge) with the
private key (``[service] identity_key``), and the centre checks the signature against the key
listed for the site id the reply claims (:func:`identity_problem`). A node that claims another
site's id cannot sign for it, and an old signature does not fit a new challenge.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec

from fedmets.shared.wire import PROTOCOL_VERSION

CHALLENGE_BYTES = 32


def new_challenge() -> str:
    """A census challenge: 32 random bytes from the OS, as hex."""
    return secrets.token_hex(CHALLENGE_BYTES)


def statement(run: str, site_id: str, challenge: str) -> bytes:
    """What a site signs at a census."""
    return (
        f"fedmets census|protocol {PROTOCOL_VERSION}|run {run}|site {site_id}|{challenge}".encode()
    )


def check_site_id(site: str) -> None:
    """ValueError naming ``--site`` when ``site`` is not a site id."""
    from fedmets.shared.config import NAME_PATTERN, PATTERN_MEANINGS

    if not re.match(NAME_PATTERN, site):
        raise ValueError(
            f"--site {site!r}: not a site id ({PATTERN_MEANINGS[NAME_PATTERN]}, 2-32 "
            "characters): use the site_id of this site's site.toml"
        )


def make_site_keys(folder: Path, site: str) -> tuple[Path, Path]:
    """A new key pair for ``site``: ``folder/<site>`` (private, OpenSSH, mode 600) and
    ``folder/<site>.pub`` (``ecdsa-sha2-nistp384 AAAA... <site>``, what the centre registers
    and lists). An existing private key is never overwritten (FileExistsError); ValueError
    when ``site`` is not a site id (``site_id`` in site.toml: lowercase letters, digits, - and
    _), before anything is written."""
    check_site_id(site)
    path = Path(folder) / site
    if path.exists():
        raise FileExistsError(f"{path} exists: a site key is made once (delete it to replace it)")
    key = ec.generate_private_key(ec.SECP384R1())
    private = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )
    public = key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    descriptor = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(descriptor, "wb") as handle:
        handle.write(private)
    public_path = path.with_name(f"{site}.pub")
    public_path.write_bytes(public + f" {site}\n".encode())
    return path, public_path


def load_private_key(path: Path) -> ec.EllipticCurvePrivateKey:
    """The site's private key at ``path``; ValueError names the file when it is missing,
    unreadable or not an ECDSA key in OpenSSH or PEM format (one line, no errno)."""
    try:
        data = Path(path).read_bytes()
        if data.startswith(b"-----BEGIN OPENSSH PRIVATE KEY"):
            key = serialization.load_ssh_private_key(data, password=None)
        else:
            key = serialization.load_pem_private_key(data, password=None)
    except FileNotFoundError as error:
        raise ValueError(f"[service] identity_key {path}: file not found") from error
    except OSError as error:  # the system's words, without errno's "[Errno 13] ..."
        reason = error.strerror or str(error)
        raise ValueError(f"[service] identity_key {path}: cannot read it: {reason}") from error
    except (ValueError, TypeError) as error:
        raise ValueError(f"[service] identity_key {path}: not a readable key ({error})") from error
    if not isinstance(key, ec.EllipticCurvePrivateKey):
        raise ValueError(f"[service] identity_key {path}: not an ECDSA key")
    return key


def load_public_key(text: str) -> ec.EllipticCurvePublicKey:
    """An OpenSSH public key line (``ecdsa-sha2-nistp384 AAAA... comment``); ValueError when
    it is not an ECDSA key."""
    key = serialization.load_ssh_public_key(text.strip().encode())
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise ValueError("not an ECDSA public key (ssh-keygen -t ecdsa -b 384)")
    return key


def sign(key: ec.EllipticCurvePrivateKey, run: str, site_id: str, challenge: str) -> str:
    """The site's signature (DER, hex) of :func:`statement`."""
    return key.sign(statement(run, site_id, challenge), ec.ECDSA(hashes.SHA384())).hex()


def identity_problem(
    identities: Mapping[str, str], run: str, challenge: str, reply: Mapping[str, Any]
) -> str | None:
    """Why a census ``reply`` does not prove the site id it claims with the key listed in
    ``identities`` (site id -> OpenSSH public key) for ``challenge``; None when it does."""
    site = reply.get("site_id")
    if site not in identities:
        return f"claims site id {site!r}, which [federation.identities] does not list"
    signature = reply.get("identity")
    if not isinstance(signature, str):
        return f"claims site id {site!r} without a signature (its [service] identity_key unset)"
    try:
        load_public_key(identities[site]).verify(
            bytes.fromhex(signature), statement(run, site, challenge), ec.ECDSA(hashes.SHA384())
        )
    except (InvalidSignature, ValueError):
        return f"claims site id {site!r}, but its signature does not verify with {site}'s key"
    return None
