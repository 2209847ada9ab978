"""``fedmets.client.combined_sets``: the fewest patients a linear combination of sums over
released sets is a sum over (the differencing guard's check beyond pairs)."""

from __future__ import annotations

import numpy as np

from fedmets.client.combined_sets import atoms, smallest_isolated

U1 = [f"u1-{i}" for i in range(5)]
U2 = [f"u2-{i}" for i in range(5)]
REST = [f"r-{i}" for i in range(40)]
EVERYONE = [*U1, *U2, *REST, "p"]


def test_three_sets_no_two_close_isolate_the_patient_their_combination_is() -> None:
    sets = [EVERYONE, [*U1, "p"], [*U1, *U2], U2]  # (U1 + p) - (U1 + U2) + U2 = p
    assert smallest_isolated(sets, floor=5) == 1
    assert smallest_isolated(sets[:3], floor=5) is None  # without U2: no combination is small


def test_a_weighted_combination_counts_too() -> None:
    """2 x (U1 + p) - (U1 + U1' + p + p') ... : any real weights, not only +1/-1."""
    pair = ["p", "q"]
    sets = [[*U1, *pair], [*U1, "p", *U2], [*U2, "q", *REST[:5]], REST[:5]]
    # (U1+p+q) - (U1+p+U2) + (U2+q+R) - R = 2q: q alone
    assert smallest_isolated(sets, floor=5) == 1


def test_sets_a_fold_partition_makes_known_isolate_nothing_while_each_class_holds_the_floor() -> (
    None
):
    """The cohort, its folds, each fold's training rows and each class within them, as an
    honest run releases them: no combination under the floor while every fold holds 5 of
    each class; with 4 DM+ in a fold, that fold's DM+ (every class's training rows minus
    the others') are a sum over 4."""
    ids = np.array([f"x{i}" for i in range(60)])
    fold = np.arange(60) % 3
    for positives, smallest in ((6, None), (4, 4)):
        label = np.zeros(60, dtype=bool)
        for f in range(3):
            label[np.flatnonzero(fold == f)[:positives]] = True
        sets = [ids]
        for f in range(3):
            train = fold != f
            sets += [ids[fold == f], ids[train], ids[train & label], ids[train & ~label]]
        assert smallest_isolated(sets, floor=5) == smallest


def test_patients_in_the_same_sets_are_one_atom() -> None:
    matrix, sizes = atoms([EVERYONE, U1])
    assert matrix.shape == (2, 2) and sorted(sizes) == [5, 46]


def test_past_the_search_limit_the_sets_count_as_isolating() -> None:
    singles = [[*REST[:10], f"s{i}"] for i in range(30)]  # 30 atoms of one patient each
    assert smallest_isolated(singles, floor=5, limit=10) == 4


def _banded_sets(n: int, leave_out_first: bool) -> tuple[list[list[str]], np.ndarray]:
    """Sets j = groups j, j-1, j-3, j-5, j-7 of 5 patients (the last group, or with
    ``leave_out_first`` the first, one target patient): every set holds 5 or more and no two
    differ by fewer than 5, yet the 0/1 matrix (sets, groups) is unit lower triangular, its
    inverse's entries growing ~1.6^n. Returns the sets and the matrix."""
    matrix = np.zeros((n, n))
    for j in range(n):
        for offset in (0, 1, 3, 5, 7):
            if j - offset >= 0:
                matrix[j, j - offset] = 1
    target = 0 if leave_out_first else n - 1
    groups = [["target"] if k == target else [f"g{k}-{i}" for i in range(5)] for k in range(n)]
    if leave_out_first:
        matrix = matrix[1:]
    sets = [sorted(p for k in np.flatnonzero(row) for p in groups[k]) for row in matrix]
    return sets, matrix


def test_an_ill_conditioned_combination_still_isolates() -> None:
    """40 such sets: exactly invertible, its smallest singular value ~1e-9 of the largest (a
    1e-8 rank cut took it for a null direction); the centre's solve (coefficients ~4.5e7)
    still reads the target's sum to 1e-5."""
    sets, matrix = _banded_sets(40, leave_out_first=False)
    singular = np.linalg.svd(matrix, compute_uv=False)
    assert singular[-1] / singular[0] < 1e-8
    assert smallest_isolated(sets, floor=5) == 1


def test_a_combination_nearly_on_one_patient_isolates_it() -> None:
    """36 such sets less the first: no combination is exactly on the target alone, but the
    least-squares one weighs it 1 and everyone else under 1e-7."""
    sets, matrix = _banded_sets(36, leave_out_first=True)
    x, *_ = np.linalg.lstsq(matrix.T, np.eye(36)[0], rcond=None)
    weights = x @ matrix
    assert abs(weights[0] - 1) < 1e-6 and np.abs(weights[1:]).max() < 1e-6
    assert smallest_isolated(sets, floor=5) == 1
