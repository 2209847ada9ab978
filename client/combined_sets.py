"""What linear combinations of a site's releases give away: the fewest patients whose values
some combination of exact sums over the released patient sets is a weighted sum of.

The differencing guard (``fedmets.client.policy.DifferencingGuard``) compares a new release's
set with each earlier one; a centre that subtracts two sets' sums gets the sum over their
difference, so two sets may not differ by fewer than the floor. Three sets or more combine in
ways no pair shows: sums over U1 + {p}, U1 + U2 and U2 (each pair at least 5 apart, each set at
least 5) give p's row as the first minus the second plus the third. This module finds such
combinations: :func:`smallest_isolated` says whether any combination of sums over the sets is
supported on fewer than ``floor`` patients.

How: patients that lie in exactly the same sets (an *atom*) are alike to every combination, so
the sets are a 0/1 matrix ``M`` (sets, atoms). A combination ``y = x @ M`` is supported on the
atoms ``S`` alone exactly when ``y`` lies in the row space of ``M`` and is zero elsewhere, i.e.
when the rows of ``W[S]`` are linearly dependent, ``W`` (atoms, d) an orthonormal basis of the
null space of ``M``. In floating point, nearly is enough for a centre (huge coefficients, or a
combination that weighs one patient 1 and the others 1e-7): :data:`RANK_TOLERANCE` and
:data:`MARGIN` count those too. The atoms of fewer than ``floor`` patients are few in an
honest run (the main job's sites: 15-25), and the search tries their unions of fewer than
``floor`` patients, smallest first.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection, Sequence

import numpy as np

SEARCH_LIMIT = 500_000
"""Most unions of small atoms :func:`smallest_isolated` tries (~7 s on one core); past it the
sets count as isolating (a record that splits the patients into that many small groups is a
crafted one: the main job's sites need under 1,500)."""
RANK_TOLERANCE = 1e-12
"""A singular value of the sets' matrix above this share of the largest counts as a direction
the sums reach: an ill-conditioned combination (coefficients of 1e7 and more) still reads a
patient to 1e-5, so only float rounding's null directions (~1e-16) are left out."""
MARGIN = 1e-3
"""A union of groups counts as isolated when some unit combination over it lies within this
distance of what the sums reach (the smallest singular value of its null-space rows): a
least-squares combination weighing one patient 1 and everyone else under 1e-7 read that
patient's row to 1e-5. The main job's sites keep a margin of 0.397 or more."""


def atoms(sets: Sequence[Collection[str]]) -> tuple[np.ndarray, np.ndarray]:
    """``(M, sizes)``: ``M`` (sets, atoms) 0/1, one column per group of patients that lie in
    exactly the same sets (the patients of no set left out), ``sizes`` (atoms,) their counts."""
    ids = sorted({str(p) for s in sets for p in s})
    index = {p: i for i, p in enumerate(ids)}
    membership = np.zeros((len(sets), len(ids)), dtype=np.uint8)
    for row, members in enumerate(sets):
        membership[row, [index[str(p)] for p in members]] = 1
    columns, sizes = np.unique(membership, axis=1, return_counts=True)
    return columns.astype(float), sizes


def smallest_isolated(
    sets: Sequence[Collection[str]], floor: int, limit: int = SEARCH_LIMIT
) -> int | None:
    """The fewest patients (fewer than ``floor``) on which some linear combination of sums
    over ``sets`` (each a collection of patient ids) is supported, or None when every
    combination is over ``floor`` patients or more; ``floor - 1`` when deciding would take
    more than ``limit`` tries."""
    if not sets or floor <= 1:
        return None
    M, sizes = atoms(sets)
    small = np.flatnonzero(sizes < floor)
    if not len(small):
        return None
    _, singular, vt = np.linalg.svd(M, full_matrices=True)
    rank = int((singular > RANK_TOLERANCE * singular.max()).sum()) if singular.size else 0
    null = vt[rank:].T  # (atoms, d): the combinations' orthogonal complement
    tried, best = 0, None
    for k in range(1, floor):
        if best is not None and best <= k:  # k atoms hold k patients at least
            break
        unions = []
        for union in itertools.combinations(small, k):  # lazily: stop at the limit
            if sizes[list(union)].sum() < floor:
                unions.append(union)
                if tried + len(unions) > limit:
                    return floor - 1
        if not unions:
            break
        tried += len(unions)
        if null.shape[1] < k:  # k rows of a space of fewer dimensions: always dependent
            dependent = np.ones(len(unions), dtype=bool)
        else:
            rows = null[np.array(unions)]  # (unions, k, d)
            dependent = np.linalg.svd(rows, compute_uv=False)[:, -1] < MARGIN
        found = [int(sizes[list(c)].sum()) for c, d in zip(unions, dependent, strict=True) if d]
        if found:
            best = min(found) if best is None else min(best, *found)
    return best
