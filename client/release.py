"""The site's gate: every request passes the site's policy (``fedmets.client.policy``: its
declaration in ``fedmets.shared.wire`` and the hospital's ``[policy]`` bounds), every reply the
wire rules of ``fedmets.shared.wire``, and both are written to the site's audit log before
anything may leave.

The audit log, ``<paths.output>/audit/wire-audit.jsonl``, holds one JSON line per request: UTC
time, run, route, the request's settings (scalars as sent, arrays by shape, model weights by
size and SHA-256), the number of patients behind the reply, and per reply field its kind,
shape, dtype and size in bytes (never the values). A refused request (nothing computed) has
``"sent": false`` and ``rule``; a withheld reply (its count alone sent) has ``withheld`` and
``rule``; a request the worker failed to answer has ``"rule": "failed"`` and the error in
``problems`` (the centre hears its type alone: :class:`RequestFailed`); a request refused on
the site's data (a policy rule that needs it, the DP budget: ``policy.epsilon_budget``, a site
not ready) has ``"sent": false``, the reason and its rule where it has one. Each line carries the
hash of the one before it (``fedmets.client.audit``: ``fedmets site audit verify``). Hospital
IT reads it to see what left the site (``docs/hospital_guide.md``).

Under secure aggregation (``masked=True``) the weights and the
requested sums leave only inside SecAgg+'s masked vector: the entry then says
``"transport": "secagg+"``, ``fields`` holds the weight ``n`` (in clear) and the ``masked``
vector (its size, the reply fields inside it), and ``not_sent`` the reply fields that did not
leave at all. SecAgg+'s key exchange (public keys, encrypted shares, the shares that unmask the
sum) is logged too, one entry per stage (fields of kind ``key``).
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmets.client.approval import check_approved
from fedmets.client.audit import append_entry
from fedmets.client.policy import (
    MODEL_OUTPUT_ROUTES,
    FailureCount,
    PolicyRefused,
    ScoringCount,
    check_request,
    failures_used_up,
)
from fedmets.shared import wire
from fedmets.shared.config import SiteConfig
from fedmets.shared.privacy import PrivacyBudgetExceeded

if TYPE_CHECKING:
    from fedmets.client.site_worker import SiteWorker

AUDIT_FILE = "wire-audit.jsonl"
BUDGET_RULE = "policy.epsilon_budget"
"""The audit log's rule of a DP training refused by the site's ``[policy] epsilon_budget``."""


class ReleaseRefused(RuntimeError):
    """A reply broke the wire rules; nothing was sent."""


class RequestFailed(RuntimeError):
    """The site could not answer a request; the message names the route and the error's type
    only (the error's own message may hold patient values: it stays in the audit log)."""


def answer(
    worker: SiteWorker,
    route_name: str,
    request: Mapping[str, Any],
    masked: bool = False,
    app: str | None = None,
) -> dict:
    """The worker's reply to ``request``: the request checked by the site's policy
    (``PolicyRefused``, logged, when it breaks it), the reply (or, when the policy withholds
    it, the count alone) checked against the wire rules and logged; raises ReleaseRefused (and
    logs the refusal) when it breaks them. ``masked``: the reply goes to SecAgg+
    (``fedmets.shared.wire.to_fitres``), so it must also fit the masked vector's layout.
    ``app``: the digest of the app bundle that relayed the request, as its relay reports it
    (``fedmets.shared.app_digest``; "" from a source checkout), logged and checked against
    the run's approval; None in process (no relay)."""
    from fedmets.client.site_worker import SiteNotReady, Withheld

    failures = FailureCount(worker.policy_folder())
    run = str(request.get("run", ""))
    try:
        check_request(route_name, request, worker.policy, worker.data.radiomics.shape[1])
        if worker.require_approval:
            check_approved(worker.configs[0], route_name, request, app)
        failures.check(run, worker.policy)
        if worker.policy.require_dp and route_name in MODEL_OUTPUT_ROUTES:
            ScoringCount(worker.policy_folder()).admit(route_name, request, worker.policy)
    except PolicyRefused as refusal:
        _log(worker, route_name, request, {}, [str(refusal)], masked, refusal.rule, app=app)
        raise
    withheld = None
    try:
        reply = worker.handle(route_name, request)
        if not wire.reply_is_finite(route_name, reply):
            # a failure, told as any other (a score that is not finite fails as ValueError):
            # which way a crafted network failed on the site's data would be another bit
            raise ValueError(wire.NOT_FINITE)
    except Withheld as held:
        reply, withheld = held.reply, held
    except (PolicyRefused, PrivacyBudgetExceeded, SiteNotReady) as refusal:  # on the data
        budget = isinstance(refusal, PrivacyBudgetExceeded)
        rule = BUDGET_RULE if budget else getattr(refusal, "rule", None)
        said = refusal.local() if isinstance(refusal, SiteNotReady) else str(refusal)
        _log(worker, route_name, request, {}, [said], masked, rule, app=app)
        raise
    except Exception as error:
        count = failures.record(run)
        message = f"{type(error).__name__}: {error}"
        _log(worker, route_name, request, {}, [message], masked, "failed", app=app)
        _refuse_past_failures(worker, route_name, request, count, masked, app)
        raise RequestFailed(
            f"{worker.site_id}: {route_name} failed ({type(error).__name__}; the site's audit "
            f"log has the message; failure {count} of run {run!r}, max_failures "
            f"{worker.policy.max_failures})"
        ) from error
    problems = wire.check_reply(route_name, reply, worker.min_patients(request))
    if masked and not problems:
        problems = wire.check_masked(route_name, request, reply)
    if not problems:
        # Requests of a run answered at once (a batch's lanes) all passed the check above
        # before any of them failed: one that ends after the run used up its failures is
        # refused too, answered or failed (and logged as refused, not sent), so that no more
        # than max_failures failures (and no answer after them) reach the centre, as when
        # they come one by one.
        _refuse_past_failures(worker, route_name, request, failures.count(run), masked, app, 1)
    _log(worker, route_name, request, reply, problems, masked, withheld=withheld, app=app)
    if problems:
        _refuse_past_failures(worker, route_name, request, failures.record(run), masked, app)
        raise ReleaseRefused(f"{worker.site_id}: {route_name} reply refused: {'; '.join(problems)}")
    return reply


def _refuse_past_failures(
    worker: SiteWorker,
    route_name: str,
    request: Mapping[str, Any],
    count: int,
    masked: bool,
    app: str | None,
    allowed: int = 0,
) -> None:
    """PolicyRefused (``policy.max_failures``, logged) when the run's failures ``count``
    (this request's own among them, if it failed) are past ``max_failures`` (``allowed``: 1
    for an answered request, which may not follow the last allowed failure)."""
    limit = worker.policy.max_failures
    if count + allowed > limit:  # the same words whether this request failed or not
        refusal = failures_used_up(str(request.get("run", "")), limit)
        _log(worker, route_name, request, {}, [str(refusal)], masked, refusal.rule, app=app)
        raise refusal


def audit_path(worker: SiteWorker) -> Path:
    """Where ``worker``'s site writes its audit log (a pooled worker: beside its state)."""
    if len(worker.configs) > 1:
        return worker.state_root / "audit" / AUDIT_FILE
    return site_audit_path(worker.configs[0])


def site_audit_path(cfg: SiteConfig) -> Path:
    """Where the site of ``cfg`` writes its audit log."""
    return cfg.paths.output / "audit" / AUDIT_FILE


def log_key_exchange(cfg: SiteConfig, stage: str, sent: Mapping[str, Any]) -> None:
    """Log a SecAgg+ key-exchange reply (``setup``: two public keys; ``share_keys``: this
    site's secrets' shares, each encrypted for one other site; ``unmask``: the shares that
    remove the masks of the sum): per field its size in bytes, never the values."""
    fields = {}
    for key, value in sent.items():
        items = value if isinstance(value, list) else [value]
        size = sum(len(v) if isinstance(v, bytes) else 8 for v in items)
        fields[key] = {"kind": str(wire.Kind.KEY), "items": len(items), "bytes": size}
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "site": cfg.site_id,
        "route": "train",
        "transport": "secagg+",
        "secagg_stage": stage,
        "sent": True,
        "fields": fields,
    }
    append_entry(site_audit_path(cfg), entry)


def _plain(value: Any) -> Any:
    """``value`` as the audit log's JSON can hold it: a numpy scalar or array (what a crafted
    request's layout may decode to) as its Python value(s)."""
    return value.tolist() if isinstance(value, np.generic | np.ndarray) else value


def _log(
    worker: SiteWorker,
    route_name: str,
    request: Mapping[str, Any],
    reply: Mapping[str, Any],
    problems: list[str],
    masked: bool = False,
    rule: str | None = None,
    withheld: Exception | None = None,
    app: str | None = None,
) -> None:
    entry = {
        "time": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "site": worker.site_id,
        "run": str(request.get("run", "")),
        "route": route_name,
        "fold": _plain(request.get("fold")),
        "round": _plain(request.get("round")),
        "request": wire.describe_request(route_name, request),
        "patients": reply.get("n"),
        "sent": not problems,
        "problems": problems,
        "fields": wire.describe(route_name, reply),
    }
    if app is not None:
        entry["app_sha256"] = app
    if rule:
        entry["rule"] = rule
    if withheld is not None:
        entry["rule"], entry["withheld"] = withheld.rule, withheld.reason
    if masked:
        entry["transport"] = "secagg+"
        if not problems:
            weight = wire.masked_weight(route_name, request, reply)
            entry["fields"] = wire.describe_masked(request, weight)
            held = set(entry["fields"]["masked"]["holds"]) | {"n"}
            entry["not_sent"] = sorted(k for k in reply if k not in held)
    append_entry(audit_path(worker), entry)
