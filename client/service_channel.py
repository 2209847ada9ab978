"""The local channel between a site's ClientApp (the relay in the app bundle the coordinating
centre uploads) and the hospital's site service (``fedmets site serve``,
``fedmets.client.site_service``): gRPC over a Unix domain socket that only the SuperNode's user
can open.

Each call carries one Flower ``RecordDict``, serialised as Flower's own protobuf (numpy arrays
as ``np.save`` bytes, never pickles), and gets one back:

- ``Answer`` (the route name in the call's metadata): a request of ``fedmets.shared.wire`` ->
  the site gate's reply;
- ``Batch`` (metadata: its items' routes and counts): the requests of folds run at once
  (``fedmets.shared.wire.to_batch``) -> each item's gated reply or refusal;
- ``Secure``: SecAgg+'s masking stage (a legacy ``FitIns`` record) -> the gated ``FitRes``
  record whose vector the relay's SecAgg+ mod masks;
- ``KeyExchange`` (the SecAgg+ stage in the metadata): a key-exchange reply's config record,
  for the site's audit log -> nothing;
- ``Hello``: nothing -> the site id (is the service up, and whose is it).

A refusal by the site's policy or wire rules comes back as ``PERMISSION_DENIED`` with the
gate's message and is raised here as :class:`ServiceRefused`. This module imports no torch:
a deployed SuperNode runs the relay in a fresh process for every message.
"""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import grpc
from flwr.app import ConfigRecord, RecordDict
from flwr.common.serde import recorddict_from_proto, recorddict_to_proto
from flwr.proto.recorddict_pb2 import RecordDict as RecordDictProto

SERVICE = "fedmets.SiteService"
METHODS = ("Answer", "Batch", "Secure", "KeyExchange", "Hello")
ROUTE_KEY = "fedmets-route"
"""Call metadata: the wire route (``Answer``), the batch's routes (``Batch``) or the SecAgg+
stage (``KeyExchange``)."""
APP_KEY = "fedmets-app"
"""Call metadata: the digest of the app bundle the relay runs from
(``fedmets.shared.app_digest``; "" from a source checkout)."""
MAX_MESSAGE_BYTES = 1 << 30
"""Largest message either way (model weights: the `gpu` Swin3D is ~32 MB in float32)."""
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
]


class ServiceRefused(RuntimeError):
    """The site service refused a request or withheld its reply (its policy or wire rules)."""


def encode(records: RecordDict) -> bytes:
    """``records`` as Flower's protobuf bytes."""
    return recorddict_to_proto(records).SerializeToString()


def decode(data: bytes) -> RecordDict:
    """The RecordDict of :func:`encode`'s bytes."""
    return recorddict_from_proto(RecordDictProto.FromString(data))


def target(socket: Path) -> str:
    """gRPC's address of a Unix domain socket."""
    return f"unix:{Path(socket).resolve()}"


class ServiceClient:
    """The relay's side of the channel: the same calls as ``SiteService`` (answer, secure,
    log_key_exchange, site_id), each over the socket ``socket``, naming the app ``app`` (its
    digest) that relays them."""

    def __init__(self, socket: Path, app: str = "") -> None:
        self.socket = Path(socket)
        self.app = app

    def _call(self, method: str, records: RecordDict, route: str = "") -> RecordDict:
        with grpc.insecure_channel(target(self.socket), options=CHANNEL_OPTIONS) as channel:
            call = channel.unary_unary(f"/{SERVICE}/{method}")
            try:
                metadata = ((ROUTE_KEY, route), (APP_KEY, self.app))
                return decode(call(encode(records), metadata=metadata))
            except grpc.RpcError as error:
                if error.code() == grpc.StatusCode.PERMISSION_DENIED:
                    raise ServiceRefused(error.details()) from None
                if error.code() == grpc.StatusCode.UNAVAILABLE:
                    raise RuntimeError(
                        f"no site service at {self.socket} ({error.details()}): start "
                        "`fedmets site serve --config site.toml` (docs/hospital_guide.md)"
                    ) from None
                raise RuntimeError(f"site service {method}: {error.details()}") from None

    def answer(self, route_name: str, request: RecordDict) -> RecordDict:
        """The site's gated reply to ``request`` on ``route_name``."""
        return self._call("Answer", request, route_name)

    def answer_batch(self, batch: RecordDict) -> RecordDict:
        """The site's gated replies to the items of ``batch`` (``wire.to_batch``)."""
        routes = Counter(batch.config_records["batch"]["routes"])
        described = ", ".join(f"{route} x{count}" for route, count in sorted(routes.items()))
        return self._call("Batch", batch, f"of {sum(routes.values())}: {described}")

    def secure(self, fitins: RecordDict) -> RecordDict:
        """The site's gated reply to SecAgg+'s masking stage, as a FitRes record."""
        return self._call("Secure", fitins)

    def log_key_exchange(self, stage: str, sent: ConfigRecord) -> None:
        """Have the site log a SecAgg+ key-exchange reply (sizes, never values)."""
        self._call("KeyExchange", RecordDict({"sent": sent}), stage)

    def site_id(self) -> str:
        """The id of the site behind the socket."""
        return str(self._call("Hello", RecordDict())["site"]["site_id"])
