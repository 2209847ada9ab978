"""Partition a pooled table into simulated federated sites (pure functions, no file access)."""

from __future__ import annotations

import re
import unicodedata

import numpy as np
import pandas as pd

SCHEMES = ("iid", "dirichlet", "quantity", "column")
SITE_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_-]{1,31}$")


def assign_sites(
    table: pd.DataFrame,
    scheme: str,
    *,
    n_sites: int | None = None,
    label_column: str = "dm",
    seed: int = 0,
    alpha: float = 0.5,
    column: str | None = None,
    min_per_site: int = 2,
) -> pd.Series:
    """Site name per row (index aligned to table). iid: stratified by label, equal sizes;
    dirichlet: per-label proportions over sites ~ Dir(alpha) (label skew; small alpha = strong
    skew);
    quantity: site sizes ~ Dir(alpha) (size skew), labels stratified within each site;
    column: one site per distinct value of `column` (natural split, e.g. 'centre').

    Sites left with fewer than `min_per_site` rows get rows moved from the largest site until all
    have enough; `attrs["moved_rows"]` of the result counts those moves. Raises ValueError for
    requests that cannot be met."""
    if scheme not in SCHEMES:
        raise ValueError(f"unknown scheme {scheme!r}; choose one of {', '.join(SCHEMES)}")
    if len(table) == 0:
        raise ValueError("the table has no rows")
    if seed < 0:
        raise ValueError(f"seed must be >= 0, got {seed}")
    if min_per_site < 1:
        raise ValueError(f"min_per_site must be at least 1, got {min_per_site}")
    labels = label_values(table, label_column)
    if scheme == "column":
        if n_sites is not None:
            raise ValueError(
                "n_sites (--sites) does not apply to scheme 'column' (one site per value)"
            )
        return _natural_sites(table, column, min_per_site)

    if n_sites is None or n_sites < 1:
        raise ValueError(f"scheme {scheme!r} needs n_sites (--sites) >= 1, got {n_sites}")
    if n_sites * min_per_site > len(table):
        raise ValueError(
            f"cannot make {n_sites} sites of at least {min_per_site} rows from {len(table)} rows"
        )
    if scheme != "iid" and not (np.isfinite(alpha) and alpha > 0):
        raise ValueError(f"alpha must be a positive number, got {alpha}")

    rng = np.random.default_rng(seed)
    if scheme == "iid":
        base, extra = divmod(len(table), n_sites)
        sizes = rng.permutation([base + 1] * extra + [base] * (n_sites - extra))
        site_idx = _cut(_stratified_order(labels, rng), sizes)
    elif scheme == "quantity":
        spare = len(table) - n_sites * min_per_site
        sizes = min_per_site + _round_preserving_sum(rng.dirichlet([alpha] * n_sites) * spare)
        site_idx = _cut(_stratified_order(labels, rng), sizes)
    else:
        site_idx = _label_skew(labels, n_sites, alpha, rng)
    moved = _repair(site_idx, n_sites, min_per_site, rng)

    sites = pd.Series(
        [f"site_{i + 1}" for i in site_idx], index=table.index, name="site_id", dtype=object
    )
    sites.attrs["moved_rows"] = moved
    return sites


def label_values(table: pd.DataFrame, label_column: str) -> np.ndarray:
    """The label column as an int array of 0/1; ValueError if missing or not binary."""
    if label_column not in table.columns:
        raise ValueError(
            f"label column {label_column!r} not found; columns: {_list(table.columns)}"
        )
    raw = table[label_column]
    numeric = pd.to_numeric(raw, errors="coerce")
    bad = ~numeric.isin([0, 1])
    if bad.any():
        examples = ", ".join(repr(v) for v in raw[bad].astype(str).unique()[:3])
        raise ValueError(
            f"label column {label_column!r} must be 0/1; {int(bad.sum())} rows are not "
            f"(e.g. {examples})"
        )
    return numeric.to_numpy(dtype=int)


def site_slug(value: object) -> str:
    """Site name for a natural-split value: lower case, [a-z0-9_-], e.g. 'CHUS' -> 'chus'."""
    text = unicodedata.normalize("NFKD", str(value)).encode("ascii", "ignore").decode()
    slug = re.sub(r"[^a-z0-9_-]+", "-", text.strip().lower()).strip("-_")[:32].strip("-_")
    if not SITE_ID_PATTERN.match(slug):
        slug = f"site_{slug}"[:32].rstrip("-_")
    return slug


def summarise(table: pd.DataFrame, sites: pd.Series, label_column: str = "dm") -> pd.DataFrame:
    """One row per site (site_id, n, positives, prevalence), in natural site order."""
    frame = pd.DataFrame({"site_id": sites.to_numpy(), "y": label_values(table, label_column)})
    out = frame.groupby("site_id")["y"].agg(n="size", positives="sum").reset_index()
    out["prevalence"] = out["positives"] / out["n"]
    return out.sort_values("site_id", key=lambda s: s.map(_natural_key)).reset_index(drop=True)


def _natural_sites(table: pd.DataFrame, column: str | None, min_per_site: int) -> pd.Series:
    if column is None:
        raise ValueError("scheme 'column' needs a column to split on")
    if column not in table.columns:
        raise ValueError(f"unknown column {column!r}; columns: {_list(table.columns)}")
    values = table[column]
    missing = values.isna() | values.astype(str).str.strip().eq("")
    if missing.any():
        raise ValueError(f"column {column!r} has no value in {int(missing.sum())} rows")
    slugs = {value: site_slug(value) for value in values.unique()}
    by_slug: dict[str, list[object]] = {}
    for value, slug in slugs.items():
        by_slug.setdefault(slug, []).append(value)
    clashes = [f"{', '.join(map(repr, vs))} -> {s!r}" for s, vs in by_slug.items() if len(vs) > 1]
    if clashes:
        raise ValueError(f"values of {column!r} give the same site name: {'; '.join(clashes)}")
    sites = values.map(slugs).astype(object).rename("site_id")
    counts = sites.value_counts()
    small = counts[counts < min_per_site]
    if len(small):
        listed = ", ".join(f"{s} ({n})" for s, n in small.items())
        raise ValueError(f"natural sites below min_per_site={min_per_site} rows: {listed}")
    sites.attrs["moved_rows"] = 0
    return sites


def _stratified_order(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    """Row order in which every contiguous block has about the overall label mix."""
    idx_parts, key_parts = [], []
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        idx_parts.append(idx)
        key_parts.append((np.arange(len(idx)) + rng.random()) / len(idx))
    order = np.argsort(np.concatenate(key_parts), kind="stable")
    return np.concatenate(idx_parts)[order]


def _cut(order: np.ndarray, sizes: np.ndarray) -> np.ndarray:
    """Site index per row: consecutive blocks of `order` of the given sizes."""
    site_idx = np.empty(len(order), dtype=int)
    site_idx[order] = np.repeat(np.arange(len(sizes)), sizes)
    return site_idx


def _round_preserving_sum(values: np.ndarray) -> np.ndarray:
    """Largest-remainder rounding of non-negative values that sum to an integer."""
    floor = np.floor(values).astype(int)
    short = int(round(values.sum())) - floor.sum()
    floor[np.argsort(floor - values, kind="stable")[:short]] += 1
    return floor


def _label_skew(
    labels: np.ndarray, n_sites: int, alpha: float, rng: np.random.Generator
) -> np.ndarray:
    """Split each label's rows over the sites with proportions ~ Dir(alpha)."""
    site_idx = np.empty(len(labels), dtype=int)
    for label in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == label))
        sizes = _round_preserving_sum(rng.dirichlet([alpha] * n_sites) * len(idx))
        site_idx[idx] = np.repeat(np.arange(n_sites), sizes)
    return site_idx


def _repair(site_idx: np.ndarray, n_sites: int, min_per_site: int, rng: np.random.Generator) -> int:
    """Move random rows from the largest site to the smallest until all reach min_per_site."""
    counts = np.bincount(site_idx, minlength=n_sites)
    moved = 0
    while counts.min() < min_per_site:
        small, large = int(np.argmin(counts)), int(np.argmax(counts))
        row = rng.choice(np.flatnonzero(site_idx == large))
        site_idx[row] = small
        counts[small] += 1
        counts[large] -= 1
        moved += 1
    return moved


def _natural_key(name: str) -> tuple:
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


def _list(columns: pd.Index, limit: int = 12) -> str:
    names = [str(c) for c in columns]
    return ", ".join(names[:limit]) + (f", ... ({len(names)} in all)" if len(names) > limit else "")
