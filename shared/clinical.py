"""The clinical schema every site shares, its validation, and the numeric encoding of a table.

Every site's manifest carries the columns of :data:`CLINICAL_COLUMNS` (an optional column may
have empty cells, but the column itself must be there). Cells are read as text and normalised
before use: surrounding spaces and letter case are ignored, a few common spellings are accepted
(``aliases``), and stage sub-groups are folded into their stage (``T4a``/``T4b`` -> ``T4``,
``N2a``/``N2b``/``N2c`` -> ``N2``, ``N3a``/``N3b`` -> ``N3``, ``T1a`` -> ``T1``). ``TX`` and
``NX`` (cannot be assessed) count as missing. ``T0`` and ``Tis`` are rejected: every patient
needs a visible, invasive primary tumour to contour (T1..T4).

:func:`encode_clinical` turns a table into the same numeric design matrix at every site: the
columns come from the schema, not from the values a site happens to have.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
import pandas as pd


@dataclass(frozen=True)
class ColumnSpec:
    """One clinical column: its kind, whether a value is required, and what values it takes."""

    kind: Literal["numeric", "category"]
    required: bool
    description: str
    categories: tuple[str, ...] = ()  # canonical values of a category column, in encoding order
    aliases: dict[str, str] = field(default_factory=dict)  # lower-case spelling -> category
    fold_suffix: bool = False  # stage sub-groups: drop one trailing letter a/b/c ('T4a' -> 'T4')
    missing_values: tuple[str, ...] = ()  # lower-case cells that mean "not known" ('tx')
    range: tuple[float, float] | None = None  # plausible (min, max) of a numeric column
    unit: str = ""


CLINICAL_COLUMNS: dict[str, ColumnSpec] = {
    "age": ColumnSpec("numeric", True, "age at diagnosis", range=(18.0, 100.0), unit="years"),
    "sex": ColumnSpec("category", True, "sex", ("M", "F"), aliases={"male": "M", "female": "F"}),
    "smoking": ColumnSpec(
        "category", False, "smoking status", ("never", "ex", "current"), aliases={"former": "ex"}
    ),
    "alcohol": ColumnSpec("category", False, "regular alcohol use", ("yes", "no")),
    "t_stage": ColumnSpec(
        "category",
        False,
        "clinical T stage (AJCC 7/8)",
        ("T1", "T2", "T3", "T4"),
        fold_suffix=True,
        missing_values=("tx",),
    ),
    "n_stage": ColumnSpec(
        "category",
        False,
        "clinical N stage (AJCC 7/8)",
        ("N0", "N1", "N2", "N3"),
        fold_suffix=True,
        missing_values=("nx",),
    ),
    "hpv": ColumnSpec(
        "category",
        False,
        "HPV / p16 status",
        ("positive", "negative"),
        aliases={"pos": "positive", "neg": "negative"},
    ),
    "subsite": ColumnSpec(
        "category",
        False,
        "primary tumour subsite",
        ("oropharynx", "larynx", "hypopharynx", "nasopharynx", "oral_cavity"),
        aliases={"oral cavity": "oral_cavity"},
    ),
}
"""Column name -> spec; the order is the order of :func:`encode_clinical`'s column groups."""

_NOT_ELIGIBLE = {"t0": "T0 (no primary tumour found)", "tis": "Tis (carcinoma in situ)"}


def _is_missing(value: object) -> bool:
    """None, NaN, pd.NA or blank text."""
    return (
        value is None
        or (pd.api.types.is_scalar(value) and pd.isna(value))
        or not str(value).strip()
    )


def parse_clinical_value(name: str, value: object) -> tuple[object, str | None]:
    """Normalise one cell of column ``name``: (canonical value or None if missing, problem or None).

    Numeric columns give a float; category columns the canonical category.
    """
    spec = CLINICAL_COLUMNS[name]
    if _is_missing(value):
        return None, "required value is missing" if spec.required else None
    if spec.kind == "numeric":
        return _parse_number(spec, value)
    text = str(value).strip()
    key = text.lower()
    if key in spec.missing_values:
        return None, "required value is missing" if spec.required else None
    if name == "t_stage" and key in _NOT_ELIGIBLE:
        return None, f"{_NOT_ELIGIBLE[key]} is not eligible: fedmets needs a T1..T4 primary tumour"
    if spec.fold_suffix and re.fullmatch(r"[tn][0-9][abc]", key):
        key = key[:-1]
    known = {category.lower(): category for category in spec.categories}
    category = known.get(key) or spec.aliases.get(key)
    if category is None:
        return None, f"unknown category {text!r} (known: {', '.join(spec.categories)})"
    return category, None


def _parse_number(spec: ColumnSpec, value: object) -> tuple[float | None, str | None]:
    if isinstance(value, bool):
        return None, f"must be a number, got {value!r}"
    try:
        number = float(str(value).strip()) if isinstance(value, str) else float(value)
    except (TypeError, ValueError):
        return None, f"must be a number, got {value!r}"
    low, high = spec.range
    if not low <= number <= high:  # also rejects nan and inf
        shown = int(number) if number.is_integer() else number
        return None, f"must be between {low:g} and {high:g} {spec.unit}, got {shown}"
    return number, None


def validate_clinical(values: dict) -> list[tuple[str, str]]:
    """(field, message) for every problem in one patient's clinical cells (schema columns only).

    A column absent from ``values`` counts as a missing value.
    """
    problems = []
    for name in CLINICAL_COLUMNS:
        _, problem = parse_clinical_value(name, values.get(name))
        if problem:
            problems.append((name, problem))
    return problems


def encoded_columns() -> list[str]:
    """Names of :func:`encode_clinical`'s columns, in order (the same at every site)."""
    columns = []
    for name, spec in CLINICAL_COLUMNS.items():
        if spec.kind == "numeric":
            columns.append(name)
        elif name == "sex":
            columns.append("sex_male")
        else:
            columns += [f"{name}_{category.lower()}" for category in spec.categories]
        if not spec.required:
            columns.append(f"{name}_missing")
    return columns


def encode_clinical(table: pd.DataFrame) -> pd.DataFrame:
    """Numeric design matrix (n_rows, len(encoded_columns())) of a clinical table, float64.

    ``age`` stays in years, ``sex_male`` is 1/0, every other category column is one-hot in
    schema order plus ``<col>_missing``: a missing value gives 1 in the indicator and 0 in the
    one-hot cells (nothing is imputed). Raw cells are normalised as in the module docstring;
    other columns of ``table`` are ignored and its index is kept. Raises ValueError naming the
    row and column of the first cell that does not validate, or a missing schema column.
    """
    absent = [name for name in CLINICAL_COLUMNS if name not in table.columns]
    if absent:
        raise ValueError(f"clinical table lacks the column(s) {', '.join(absent)}")
    columns = encoded_columns()
    where = {column: number for number, column in enumerate(columns)}
    matrix = np.zeros((len(table), len(columns)))
    for name, spec in CLINICAL_COLUMNS.items():
        for row, (index, raw) in enumerate(table[name].items()):
            value, problem = parse_clinical_value(name, raw)
            if problem:
                raise ValueError(f"row {row + 1} (index {index!r}): {name}: {problem}")
            if value is None:
                matrix[row, where[f"{name}_missing"]] = 1.0
            elif spec.kind == "numeric":
                matrix[row, where[name]] = value
            elif name == "sex":
                matrix[row, where["sex_male"]] = float(value == "M")
            else:
                matrix[row, where[f"{name}_{str(value).lower()}"]] = 1.0
    return pd.DataFrame(matrix, index=table.index, columns=columns)


def decode_subsite(encoded: pd.DataFrame) -> np.ndarray:
    """Subsite names (n,) from the one-hot ``subsite_*`` columns; "unknown" where none is set."""
    categories = CLINICAL_COLUMNS["subsite"].categories
    columns = [f"subsite_{c.lower()}" for c in categories]
    if not all(c in encoded.columns for c in columns):
        return np.full(len(encoded), "unknown")
    onehot = encoded[columns].to_numpy()
    names = np.array(categories)[onehot.argmax(axis=1)]
    return np.where(onehot.max(axis=1) > 0, names, "unknown")


def encoded_variable(column: str) -> str:
    """The clinical variable of an encoded column (``"t_stage_t2"`` -> ``"t_stage"``)."""
    for name in CLINICAL_COLUMNS:
        if column == name or column.startswith(f"{name}_"):
            return name
    raise ValueError(f"{column!r} is not an encoded clinical column")
