"""Tabular mode: a site whose radiomics and clinical data are already in one feature table (CSV).

The table (``data.manifest``) has one row per patient: the id (``data.id_column``), the 0/1 label
(``data.label_column``), radiomics columns and clinical columns; other columns are ignored.

- Radiomics: every column matching ``data.radiomics_pattern`` (ignoring case) that holds at
  least one number, except the id and label columns. Names are kept as in the table.
- Clinical (when ``clinical`` is in ``data.modalities``): each schema column of
  ``fedmets.shared.clinical`` is read from the table column that ``data.clinical_columns`` names,
  else from the first of :data:`CLINICAL_NAMES` present (ignoring case). An optional schema column
  found nowhere is missing for every patient; a required one (age, sex) stops the site. Cells go
  through :data:`VALUE_ALIASES`, then ``fedmets.shared.clinical``'s normalisation and checks.

A row with an empty or repeated id, a label other than 0/1, a radiomics cell that is empty or
not a finite number, or a clinical cell that fails validation is quarantined; the other rows go
on. The usable rows come out in the layout ``fedmets.client.extract`` writes for image sites:
``patient_id``, ``label``, the radiomics columns, then
``fedmets.shared.clinical.encoded_columns()``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import numpy as np
import pandas as pd

from fedmets.client.ingest import columns_found, listed_lines, read_text_table, shown_path
from fedmets.shared.clinical import CLINICAL_COLUMNS, encode_clinical, validate_clinical
from fedmets.shared.config import SiteConfig

CLINICAL_NAMES: dict[str, tuple[str, ...]] = {
    "age": ("age", "age_at_diagnosis"),
    "sex": ("sex", "gender"),
    "smoking": ("smoking", "smoking_status", "smoking status", "tobacco"),
    "alcohol": ("alcohol",),
    "t_stage": ("t_stage", "tstage", "t stage", "t-stage", "t"),
    "n_stage": ("n_stage", "nstage", "n stage", "n-stage", "n"),
    "hpv": ("hpv", "overall_hpv_status", "hpv_status", "hpv status", "p16"),
    "subsite": ("subsite", "site", "ds site", "tumour_site", "tumor_site"),
}
"""Schema column -> table column names tried when ``data.clinical_columns`` does not map it."""

VALUE_ALIASES: dict[str, dict[str, str]] = {
    "hpv": {
        "+": "positive",
        "-": "negative",
        "p16+": "positive",
        "p16-": "negative",
        "yes, positive": "positive",
        "yes, negative": "negative",
    },
    "smoking": {"ex-smoker": "ex", "non-smoker": "never"},
    "subsite": {"lip & oral cavity": "oral_cavity"},
}
"""Schema column -> lower-case cell spellings of feature tables that ``fedmets.shared.clinical``
lacks."""

MAX_RADIOMICS_MESSAGES = 5  # per row; more bad radiomics cells are counted in one more message


@dataclass
class FeatureTable:
    """Outcome of :func:`load_feature_table`."""

    n_rows: int  # data rows in the table (0 when it cannot be read)
    features: pd.DataFrame  # usable rows: patient_id, label, radiomics, encoded clinical
    quarantined: dict[str, list[str]]  # patient id -> messages ('<file> line N: field: message')
    site_problems: list[str]
    radiomics_columns: list[str]
    clinical_sources: dict[str, str | None]  # schema column -> table column (None: not found)


def load_feature_table(cfg: SiteConfig, labelled: bool = True) -> FeatureTable:
    """Read and check the site's feature table (see the module docstring). Bad data never
    raises: site-level problems (file unreadable, id/label column missing, no radiomics column,
    a required clinical column missing, no usable row) come back in ``site_problems``.
    ``labelled=False`` (new patients to score): an empty label cell, or no label column, is no
    problem (label NA)."""
    try:
        table, unreadable = read_text_table(cfg.data.manifest)
    except ValueError as error:
        return _no_rows(0, [str(error)])
    if not labelled and cfg.data.label_column not in table.columns:
        table[cfg.data.label_column] = ""
    n_rows = len(table) + len(unreadable)
    numbers, sources, problems = _columns(table, cfg)
    if problems:
        return _no_rows(n_rows, problems)
    name = shown_path(cfg.data.manifest, cfg)
    ids = table[cfg.data.id_column].str.strip()
    raw = pd.DataFrame(
        {
            column: table[source].map(lambda cell, c=column: _alias(c, cell)) if source else None
            for column, source in sources.items()
        },
        index=table.index,
        columns=list(CLINICAL_COLUMNS),
    )
    found: list[tuple[int, str, str]] = [  # (line, patient id, message)
        (
            line,
            bad.cells.get(cfg.data.id_column) or f"(line {line})",
            f"{name} line {line}: {bad.field}: {bad.reason}",
        )
        for line, bad in unreadable.items()
    ]
    for row, patient_id in ids.items():  # the table's index: the line each row is on
        where = f"{name} line {row}"
        messages = [] if patient_id else [f"{where}: {cfg.data.id_column}: empty id cell"]
        label = table.at[row, cfg.data.label_column]
        if labelled or label.strip():
            messages += _label_problems(label, where, cfg)
        messages += _radiomics_problems(table.loc[row], numbers.loc[row], where)
        if "clinical" in cfg.data.modalities:
            messages += [
                f"{where}: {_shown_field(field, sources)}: {message}"
                for field, message in validate_clinical(raw.loc[row].to_dict())
            ]
        found += [(row, patient_id or f"(line {row})", message) for message in messages]
    repeated = ids[ids.ne("") & ids.duplicated(keep=False)]
    for patient_id, group in repeated.groupby(repeated, sort=False):
        rows = list(group.index)
        used = f"id used by {listed_lines(rows)}; ids must be unique"
        message = f"{name}: {cfg.data.id_column}: {used}"
        found += [(row, patient_id, message) for row in rows]
    quarantined: dict[str, list[str]] = {}
    for _, patient_id, message in sorted(found, key=lambda item: item[0]):
        messages = quarantined.setdefault(patient_id, [])
        if message not in messages:  # repeated ids: one message for the rows sharing the id
            messages.append(message)
    usable = (ids.ne("") & ~ids.isin(list(quarantined))).to_numpy()
    labels = [
        int(float(cell)) if cell.strip() else None
        for cell in table.loc[usable, cfg.data.label_column]
    ]
    clinical = encode_clinical(raw[usable]) if "clinical" in cfg.data.modalities else None
    features = _layout(ids[usable].tolist(), labels, numbers[usable], clinical)
    problems = [] if usable.any() else [f"no usable patient: all {n_rows} are quarantined"]
    return FeatureTable(n_rows, features, quarantined, problems, list(numbers.columns), sources)


def _no_rows(n_rows: int, problems: list[str]) -> FeatureTable:
    """A site stopped by ``problems``: no usable row."""
    return FeatureTable(n_rows, _layout([], [], pd.DataFrame(), None), {}, problems, [], {})


def _columns(
    table: pd.DataFrame, cfg: SiteConfig
) -> tuple[pd.DataFrame, dict[str, str | None], list[str]]:
    """The radiomics columns parsed as numbers (NaN where a cell is not a number), the table
    column of each clinical schema column, and the problems that stop the site."""
    data, path = cfg.data, cfg.data.manifest
    problems = []
    for key in ("id_column", "label_column"):
        column = getattr(data, key)
        if column not in table.columns:
            problems.append(
                f"{path}: data.{key}: column {column!r} not found"
                f" ({columns_found(table.columns, [column])})"
            )
    if table.empty:
        return pd.DataFrame(index=table.index), {}, [*problems, f"{path}: no patient rows"]
    pattern = re.compile(data.radiomics_pattern, re.IGNORECASE)
    matching = [
        column
        for column in table.columns
        if pattern.search(column) and column not in (data.id_column, data.label_column)
    ]
    numbers = table[matching].apply(lambda cells: pd.to_numeric(cells.str.strip(), "coerce"))
    numbers = numbers.loc[:, np.isfinite(numbers).any()]
    if numbers.columns.empty:
        problems.append(
            f"{path}: data.radiomics_pattern: no column with numbers matches"
            f" {data.radiomics_pattern!r}"
        )
    sources: dict[str, str | None] = {}
    if "clinical" in data.modalities:
        lower = {column.lower(): column for column in table.columns}
        for field, spec in CLINICAL_COLUMNS.items():
            mapped = data.clinical_columns.get(field)
            if mapped is not None and mapped not in table.columns:
                problems.append(
                    f"{path}: data.clinical_columns.{field}: column {mapped!r} not found"
                )
            elif mapped is None:
                names = (field, *CLINICAL_NAMES[field])
                mapped = next((lower[n] for n in names if n in lower), None)
                if mapped is None and spec.required:
                    problems.append(
                        f"{path}: {field}: no column for this required clinical field (looked"
                        f" for {', '.join(dict.fromkeys(names))}); name it in"
                        f" data.clinical_columns.{field}"
                    )
            sources[field] = mapped
    return numbers, sources, problems


def _alias(field: str, cell: str) -> str:
    """``cell`` with a feature-table spelling of ``field`` replaced by the schema's."""
    return VALUE_ALIASES.get(field, {}).get(cell.strip().lower(), cell)


def _shown_field(field: str, sources: dict[str, str | None]) -> str:
    """The table column of a clinical field, with the schema name when they differ."""
    source = sources.get(field)
    return field if source in (None, field) else f"{source} ({field})"


def _label_problems(cell: str, where: str, cfg: SiteConfig) -> list[str]:
    column = cfg.data.label_column
    if not cell.strip():
        return [f"{where}: {column}: label is missing (must be 0 or 1)"]
    try:
        number = float(cell)
    except ValueError:
        number = None
    return (
        [] if number in (0.0, 1.0) else [f"{where}: {column}: label must be 0 or 1, got {cell!r}"]
    )


def _radiomics_problems(cells: pd.Series, numbers: pd.Series, where: str) -> list[str]:
    bad = numbers.index[~np.isfinite(numbers.to_numpy())]
    messages = [
        f"{where}: {column}: radiomics value is missing"
        if not cells[column].strip()
        else f"{where}: {column}: radiomics value must be a finite number, got {cells[column]!r}"
        for column in bad[:MAX_RADIOMICS_MESSAGES]
    ]
    if len(bad) > MAX_RADIOMICS_MESSAGES:
        more = len(bad) - MAX_RADIOMICS_MESSAGES
        messages.append(f"{where}: radiomics: {more} more radiomics columns missing or not finite")
    return messages


def _layout(
    ids: list[str], labels: list[int | None], radiomics: pd.DataFrame, clinical: pd.DataFrame | None
) -> pd.DataFrame:
    """patient_id (string), label (Int64), radiomics (float64), encoded clinical (float64)."""
    head = pd.DataFrame(
        {
            "patient_id": pd.Series(ids, dtype="string"),
            "label": pd.array(labels, dtype="Int64"),
        }
    )
    parts = [head, radiomics.astype("float64").reset_index(drop=True)]
    if clinical is not None:
        parts.append(clinical.reset_index(drop=True))
    return pd.concat(parts, axis=1)
