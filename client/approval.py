"""Runs the hospital approved: ``fedmets site approve --config site.toml --run-config FILE``
records a run's name and its federation config's fingerprint
(``fedmets.shared.config.FederationConfig.fingerprint``) in
``<paths.output>/policy/approved-runs.json``; while approval is required (``[policy]
require_approval``; unset: under ``fedmets site serve``), the site's gate refuses every request
of a run not recorded there, and a census whose declared fingerprint is not the approved one
(rule ``policy.approval``, logged in the audit log like every refusal).

With ``--app FILE.fab`` the approval also pins the app bundle the hospital reviewed (its
content digest, ``fedmets.shared.app_digest``): a request relayed by another app is refused.

The fingerprint and the digest are what the centre's code declares; they bind the approval to
the reviewed files for an honest centre, while the site's ``[policy]`` bounds every request
whatever is declared.
"""

from __future__ import annotations

import getpass
import json
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from fedmets.client.policy import PolicyRefused
from fedmets.shared.config import FederationConfig, SiteConfig
from fedmets.shared.files import write_json

APPROVALS_FILE = "approved-runs.json"


def approvals_path(cfg: SiteConfig) -> Path:
    """Where the site keeps the runs it approved."""
    return cfg.paths.output / "policy" / APPROVALS_FILE


def approved_runs(cfg: SiteConfig) -> dict[str, dict]:
    """Run name -> {``config_sha256``, ``app_sha256`` ("": any app), ``approved`` (UTC
    time), ``by`` (user)}."""
    path = approvals_path(cfg)
    if not path.is_file():
        return {}
    try:
        runs = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise ValueError(f"{path}: not readable JSON ({error}); restore it or remove it") from error
    if not isinstance(runs, dict) or not all(isinstance(r, dict) for r in runs.values()):
        raise ValueError(f"{path}: not a record of approved runs (run name -> approval)")
    return runs


def approve_run(cfg: SiteConfig, run_config: FederationConfig, app_sha256: str = "") -> dict:
    """Record ``run_config``'s run name and fingerprint as approved (replacing an earlier
    approval of that name), with ``app_sha256`` the app digest it pins ("": any app); returns
    the record."""
    runs = approved_runs(cfg)
    record = {
        "config_sha256": run_config.fingerprint(),
        "app_sha256": app_sha256,
        "approved": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "by": getpass.getuser(),
    }
    runs[run_config.run.name] = record
    write_json(approvals_path(cfg), runs, indent=1)
    return record


def policy_conflicts(cfg: SiteConfig, run_config: FederationConfig) -> list[str]:
    """What this site's ``[policy]`` would refuse of ``run_config``'s requests, one line a
    rule and route (``rule: route: what was asked and what the policy allows``; [] when
    nothing): its planned settings (``fedmets.shared.run_plan.policy_requests``, as for a
    federation whose every site has this site's kinds of data; a held-out site's evaluation
    of the bundle alone) through the site's own bounds (``fedmets.client.policy.check_bounds``);
    and, for a run that trains here under sample-level DP, a privacy ledger that already holds
    ``[policy] epsilon_budget`` (what else the run may spend: :func:`budget_outlook`)."""
    from fedmets.client.policy import check_bounds  # numpy, torch: not for the CLI's imports
    from fedmets.shared.run_plan import policy_requests

    images = cfg.data.mode == "images" and run_config.stages.image
    clinical = "clinical" in cfg.data.modalities
    held_out = cfg.site_id in run_config.federation.held_out
    conflicts = []
    for route, request in policy_requests(run_config, images, clinical, held_out):
        try:
            check_bounds(route, request, cfg.policy)
        except PolicyRefused as refused:
            conflicts.append(str(refused))
    budget = cfg.policy.epsilon_budget
    if _spends_budget(cfg, run_config) and budget is not None:
        spent = _ledger_epsilon(cfg)
        if spent >= budget:
            conflicts.append(
                f"policy.epsilon_budget: train.*: this site's privacy ledger holds epsilon "
                f"{spent:.3g}, its budget is {budget:g}: every DP training would be refused"
            )
    return conflicts


SUM_BOUND_DELTA = 5e-3
"""The largest delta at which composed epsilons stay under their sum (:func:`planned_epsilon`)."""


def planned_epsilon(run_config: FederationConfig) -> float:
    """The most epsilon (at the site's own delta) that ``run_config``'s sample-level DP
    trainings spend at a site that trains: the protocol plans each stage's noise (the image
    model's and the fusion networks', ``epsilon / 2`` each with an image stage) so that the
    stage's trainings end at its share of ``[dp] epsilon``, over the folds (``epsilon_scope =
    "run"``) or in each fold (``"fold"``). Composed (with the ledger's history too), they spend
    at most the sum of the parts: at the smallest of the parts' best RDP orders every other
    part's divergence is at most its own best order's (Renyi divergence grows with the
    order), and each conversion's delta term is positive for the orders accounted (1.1 to 63)
    when delta is at most :data:`SUM_BOUND_DELTA`, as a site's should be (well under one over
    its patients)."""
    assert run_config.dp.epsilon is not None  # a config with dp.mode on has one
    folds = run_config.cv.folds if run_config.dp.epsilon_scope == "fold" else 1
    return run_config.dp.epsilon * folds


def budget_outlook(cfg: SiteConfig, run_config: FederationConfig) -> str | None:
    """What ``run_config`` would spend of this site's privacy budget, in one line (None when
    the site trains nothing under sample-level DP in it): the ledger's epsilon now, the most
    the run adds (:func:`planned_epsilon`) and ``[policy] epsilon_budget``. It starts with
    ``warning:`` when the two together may pass the budget: the site's gate then refuses the
    training that would, mid-run (``policy.epsilon_budget`` in the audit log)."""
    if not _spends_budget(cfg, run_config):
        return None
    spent, most = _ledger_epsilon(cfg), planned_epsilon(run_config)
    budget = cfg.policy.epsilon_budget
    bounded = cfg.policy.delta <= SUM_BOUND_DELTA
    bound = "at most" if bounded else "about (delta above 5e-3)"
    line = (
        f"DP: run {run_config.run.name} spends {bound} epsilon {most:g} here ([dp] epsilon "
        f"{run_config.dp.epsilon:g}, epsilon_scope {run_config.dp.epsilon_scope!r}); this "
        f"site's ledger holds {spent:.3g}"
    )
    if budget is None:
        return f"{line}, no [policy] epsilon_budget set"
    line = f"{line} of its budget {budget:g}"
    if spent + most > budget:
        return (
            f"warning: {line}: the run may be refused mid-way, at the training that would "
            "pass the budget"
        )
    return f"{line}: {'at most' if bounded else 'about'} {spent + most:.3g} after it"


def _spends_budget(cfg: SiteConfig, run_config: FederationConfig) -> bool:
    """Whether ``run_config`` trains at this site under sample-level DP (a held-out site
    only evaluates the bundle)."""
    return run_config.dp.mode == "sample" and cfg.site_id not in run_config.federation.held_out


def _ledger_epsilon(cfg: SiteConfig) -> float:
    """The epsilon this site's privacy ledger has spent so far (0 without a ledger)."""
    from fedmets.client.privacy import site_ledger  # torch: not for the CLI's imports

    return site_ledger(cfg.paths.output, cfg.site_id, cfg.policy.delta, None).epsilon()


def approval_required(cfg: SiteConfig, served: bool) -> bool:
    """``[policy] require_approval``, or when unset whether the site runs as a service."""
    required = cfg.policy.require_approval
    return served if required is None else required


def check_approved(
    cfg: SiteConfig, route_name: str, request: Mapping[str, Any], app: str | None = None
) -> None:
    """PolicyRefused (``policy.approval``) unless the request's run is approved, for a census
    declared with the approved fingerprint, and, when the approval pins an app, relayed by
    that app (``app``: the digest the relay reports; None in process, where nothing relays)."""
    run = str(request.get("run", ""))
    record = approved_runs(cfg).get(run)
    how = (
        f"review its federation config and run `fedmets site approve --config "
        f"{cfg.source or 'site.toml'} --run-config FILE`"
    )
    if record is None:
        raise PolicyRefused("policy.approval", f"{route_name}: run {run!r} is not approved: {how}")
    declared = request.get("config_sha256")
    if route_name == "query.census" and declared != record["config_sha256"]:
        raise PolicyRefused(
            "policy.approval",
            f"{route_name}: run {run!r} was approved with config sha256 "
            f"{record['config_sha256'][:16]}, the centre declares {str(declared)[:16]}: {how}",
        )
    pinned = record.get("app_sha256", "")
    if pinned and app is not None and app != pinned:
        raise PolicyRefused(
            "policy.approval",
            f"{route_name}: run {run!r} was approved for app sha256 {pinned[:16]}, the request "
            f"came through app {app[:16] or '(not an installed bundle)'}: review the new app "
            f"bundle and approve again with --app FILE.fab",
        )
