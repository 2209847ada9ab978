"""What crosses the network between the server and a site, defined once for both sides.

Every message of the federated protocol is a *route* (Flower message type, e.g.
``"query.moments"``) with a declared request and a declared reply. A payload is a flat dict:
``name -> value``, each name declared in :data:`ROUTES` with a :class:`Kind`. Values are

- ``int`` / ``float`` / ``bool`` / ``str`` scalars -> one Flower ``ConfigRecord`` ("scalars");
- ``numpy`` arrays, and model weights ``{parameter name: array}`` under names
  ``weights:<model>`` -> their bytes one after another in one Flower ``Array`` ("arrays"),
  each array's field, parameter, dtype and shape in a ``ConfigRecord`` ("layout").

One array for all, because Flower 1.42 sends every ``Array`` and record of a message as an
object of its own, one HTTP request per object on each hop (ServerApp, SuperLink, SuperNode,
ClientApp): an array each made ~40 objects of a training message (every parameter of seven
networks), one makes ~7.

A name may end in ``:*``: it then stands for a family (``hist_pos:*`` matches
``hist_pos:swin3d/deep+clinical``). :func:`check_reply` is the wire audit's rule book: a site's
reply may carry only declared names, each of an allowed kind, every aggregate over at least
``min_patients`` patients, no array whose length is the site's patient count, and no free text
(strings are hashes, site ids or fixed enums only). Nothing with a per-patient axis, no ids, no
images.

Secure aggregation (``[strategy] secure_aggregation``): the training routes' replies then never
leave a site as they are. Flower's SecAgg+ (``secaggplus_mod`` at the site,
``SecAggPlusWorkflow`` at the server) acts only on messages of type :data:`SECURE_MESSAGE_TYPE`
and speaks Flower's legacy ``FitIns``/``FitRes``: :func:`to_fitins` / :func:`from_fitins` carry a
training request, and :func:`to_fitres` turns the site's checked reply into the one vector
SecAgg+ masks (:func:`secure_layout`: each model's update, new minus global weights, then the
sums the request names in ``secure_sums``, each divided by ``n`` and followed by whether it
was sent), with ``n`` as its weight in clear. The server only ever decodes the weighted average
of those vectors (:func:`from_secure_average`).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, Literal

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict
from flwr.common import (
    Code,
    FitIns,
    FitRes,
    Status,
    ndarrays_to_parameters,
    parameters_to_ndarrays,
)

PROTOCOL_VERSION = 12
"""Bumped whenever a route's request or reply changes (8: statistics on score groups, variant
networks; 9: the ``paper`` image preset; 10: batches, :data:`BATCH_MESSAGE_TYPE`; 11: a
covariance reply may leave out the label products it was asked for; 12: a payload's arrays
packed in one ``Array`` with their layout); the census refuses other versions."""


class Kind(StrEnum):
    """What a payload entry is, for the audit: the only kinds a site may send back."""

    COUNT = "count"  # integers: patients, positives, per-fold counts (small fixed-size arrays)
    HASH = "hash"  # hex digests of schemas and parameters
    ENUM = "enum"  # one of a fixed set of words (site mode, status)
    SITE = "site"  # the site's own id
    AGGREGATE = "aggregate"  # sums/means/importances over >= min_patients patients
    HISTOGRAM = "histogram"  # class-conditional score counts over fixed bins
    METRIC = "metric"  # a scalar summed or averaged over >= min_patients patients
    WEIGHTS = "weights"  # model parameters
    SCHEMA = "schema"  # feature column names (PyRadiomics names: public, never patient data)
    MASKED = "masked"  # SecAgg+: a vector only readable summed over sites (see below)
    KEY = "key"  # SecAgg+: public keys, encrypted secret shares, shares that unmask the sum
    SIGNATURE = "signature"  # the site's key over the centre's census challenge (hex)


REPLY_KINDS = frozenset(Kind)
ENUM_WORDS = frozenset({"images", "tabular", "secure", "seeded"})
HEX = re.compile(r"^[0-9a-f]{8,128}$")
SIGNATURE_HEX = re.compile(r"^[0-9a-f]{16,512}$")
SITE_ID = re.compile(r"^[a-z0-9][a-z0-9_-]{1,31}$")
FEATURE_NAME = re.compile(
    r"^((tumour|ring)_|(original|wavelet|log|square|squareroot|logarithm|exponential|gradient"
    r"|lbp)[-_])[A-Za-z0-9._-]+$",
    re.IGNORECASE,
)
"""A PyRadiomics feature name (``tumour_wavelet-LLH_glcm_Idm``): the only text besides hashes,
site ids and fixed words a site may send."""
WEIGHTS_PREFIX = "weights:"
MODEL_KEY = re.compile(
    r"^(none|swin3d|resnet3d|densenet3d)/"
    r"(deep|radiomics|clinical)(\+(deep|radiomics|clinical)){0,2}$"
)
"""A model key (``fedmets.shared.model_names.model_key``): backbone, then its feature groups."""
SCALARS = "scalars"
ARRAYS = "arrays"
LAYOUT = "layout"
PACKED_DTYPES = frozenset(
    np.dtype(f"{order}{code}").str
    for order in "<>"
    for code in ("b1", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "f2", "f4", "f8")
)
"""The array dtypes a payload may carry (numpy's ``dtype.str``: booleans, integers, floats of
either byte order; never objects, strings or records)."""


MAX_JSON_CHARS = 4_000_000
"""Longest ``json`` request field (a model bundle's manifest: ~10 kB)."""


class WireError(ValueError):
    """A payload that breaks its route's declaration (raised before anything is sent)."""


ParamType = Literal[
    "int",
    "float",
    "bool",
    "name",
    "word",
    "words",
    "models",
    "vector",
    "matrix",
    "indices",
    "ints",
    "weights",
    "json",
    "covariates",
    "hex",
]


@dataclass(frozen=True)
class Param:
    """A request field (server -> site): its type and, for numbers and the entries of
    ``ints``, its inclusive range; ``words`` the strings a ``word`` may be. Types: ``int``,
    ``float`` (finite), ``bool``; ``name`` (a run name: letters, digits, ``_.-``, <= 64);
    ``word`` (one of ``words``), ``words`` (a list of declared reply field names);
    ``models`` (a list of model keys, :data:`MODEL_KEY`);
    ``vector`` / ``matrix`` (1-D / 2-D arrays of finite floats); ``indices`` (1-D
    non-negative integers); ``ints`` (1-D integers in range); ``weights`` (parameter name ->
    numeric array); ``json`` (the text of one JSON object, at most :data:`MAX_JSON_CHARS`);
    ``covariates`` (a list of clinical schema column names, ``fedmets.shared.clinical``);
    ``hex`` (a hex digest or challenge, 8-128 lowercase hex digits). A
    site's policy may bound a field further (``fedmets.client.policy``)."""

    type: ParamType
    low: float | None = None
    high: float | None = None
    words: frozenset[str] = frozenset()


@dataclass(frozen=True)
class Route:
    """One message type: its request fields (name -> :class:`Param`) and reply fields (name ->
    :class:`Kind`); ``count_field`` names the reply field holding the number of patients the
    reply's aggregates are computed over."""

    name: str
    request: Mapping[str, Param]
    reply: Mapping[str, Kind]
    count_field: str | None = "n"

    def reply_kind(self, key: str) -> Kind | None:
        """The declared kind of reply field ``key`` (families ``prefix:*`` included)."""
        return _lookup(self.reply, key)

    def request_param(self, key: str) -> Param | None:
        """The declaration of request field ``key``."""
        return _lookup(self.request, key)


def _lookup(fields: Mapping[str, Any], key: str) -> Any:
    if key in fields:
        return fields[key]
    if ":" in key:
        return fields.get(key.split(":", 1)[0] + ":*")
    return None


C, A = Kind.COUNT, Kind.AGGREGATE
BACKBONE_NAMES = frozenset({"swin3d", "resnet3d", "densenet3d"})  # image_presets.BACKBONES
IMAGE_PRESET_NAMES = frozenset({"cpu-small", "paper", "gpu"})  # image_presets.IMAGE_PRESETS
_VECTOR, _MATRIX = Param("vector"), Param("matrix")
_RATE = Param("float", 0.0, 0.999)  # dropout rates
_SEED = Param("int", 0, 2**63 - 1)
FINAL_FOLD = -1
"""The ``fold`` of the final model's requests: its training rows are every patient."""
_RUN = {
    "run": Param("name"),
    "fold": Param("int", FINAL_FOLD, 63),
    "min_patients": Param("int", 1, 10**6),
}
_STANDARDISE = {
    "radiomics_columns": Param("indices"),  # (k,) indices of the selected radiomics columns
    "radiomics_mean": _VECTOR,
    "radiomics_scale": _VECTOR,
    "clinical_mean": _VECTOR,
    "clinical_scale": _VECTOR,
    "deep_mean": _VECTOR,
    "deep_scale": _VECTOR,
    "deep_projection": _MATRIX,  # (D, c) whitened PCA of the pooled training deep features
}
_IMAGE = {
    "backbone": Param("word", words=BACKBONE_NAMES),
    "image_preset": Param("word", words=IMAGE_PRESET_NAMES),
    "mask_channel": Param("word", words=frozenset({"ring", "tumour", "none"})),
}
_DP = {
    "dp_mode": Param("word", words=frozenset({"off", "sample", "client"})),
    "dp_epsilon": Param("float", 1e-6, 1e6),
    "dp_releases": Param("int", 1, 10**7),
    "max_grad_norm": Param("float", 1e-9, 1e6),
}
_SECURE = {"secure_sums": Param("words")}  # reply sums that ride in the masked vector
_FUSION_NET = {
    "hidden": Param("ints", 1, 4096),  # hidden widths of the fusion network
    "dropout": _RATE,
    "group_dropout": _RATE,
}
_TRAINING = {
    "round": Param("int", 0, 10**6),
    "epochs": Param("int", 1, 10**4),
    "lr": Param("float", 1e-9, 10.0),
    "batch": Param("int", 1, 10**6),
    "proximal_mu": Param("float", 0.0, 1e6),
    "pos_weight": Param("float", 1e-6, 1e6),
    "seed": _SEED,
}
_BINS = {"bins": Param("int", 2, 10**6)}
_COMBAT = {  # fedmets.shared.harmonisation: missing values at the mean, covariates kept
    "radiomics_mean": _VECTOR,
    "covariates": Param("covariates"),
}
_WEIGHTS = {"weights:*": Param("weights")}

ROUTES: dict[str, Route] = {
    r.name: r
    for r in (
        Route(
            "query.census",
            {
                "run": Param("name"),
                "protocol": Param("int", 0, 10**6),
                "min_patients": _RUN["min_patients"],
                "challenge": Param("hex"),  # fedmets.shared.identity: fresh per census
                "config_sha256": Param("hex"),  # the run config's fingerprint, for approval
            },
            {
                "site_id": Kind.SITE,
                "protocol": C,
                "mode": Kind.ENUM,
                "n": C,
                "positives": C,
                "quarantined": C,
                "unlabelled": C,
                "radiomics_columns": C,
                "clinical_columns": C,
                "has_images": C,
                "schema_hash": Kind.HASH,
                "params_hash": Kind.HASH,
                "radiomics_names": Kind.SCHEMA,
                "folds": C,  # the site's own number of folds ([policy] folds)
                "randomness": Kind.ENUM,  # secure | seeded: who could know its fold seed
                "identity": Kind.SIGNATURE,  # the challenge signed with the site's key
            },
        ),
        Route(
            "query.folds",
            {**_RUN, "folds": Param("int", 2, 64)},
            {"n": C, "fold_sizes": C, "fold_positives": C},
        ),
        Route(
            "query.moments",
            {**_RUN, "harmonised": Param("bool")},  # of the fold's ComBat-harmonised values
            {
                "n": C,
                "positives": C,
                "radiomics_count": A,  # (p,) non-missing values per column
                "radiomics_sum": A,  # (p,)
                "clinical_sum": A,  # (q,)
                "clinical_sumsq": A,  # (q,)
            },
        ),
        Route(
            "query.covariance",
            {**_RUN, "radiomics_mean": _VECTOR, "label_products": Param("bool")},
            {
                "n": C,
                "positives": C,
                "centred_sum": A,  # (p,)
                "cross_products": A,  # (p, p)
                "label_products": A,  # (p,) centred values times the 0/1 label, if asked and
                # each class holds the floor in every fold (else left out)
            },
        ),
        Route(
            "query.combat_statistics",
            {**_RUN, **_COMBAT},
            {
                "n": C,
                "batch_n": C,  # (b,) patients of each of the site's batches
                "batch_covariate_sum": A,  # (b, q)
                "batch_response_sum": A,  # (b, p)
                "covariate_gram": A,  # (q, q)
                "covariate_response": A,  # (q, p)
            },
        ),
        Route(
            "query.combat_variance",
            {**_RUN, **_COMBAT, "batch_intercepts": _MATRIX, "covariate_effects": _MATRIX},
            {"n": C, "residual_sumsq": A},  # (p,) over the site's batches
        ),
        Route(
            "query.combat_apply",  # the site harmonises its rows; nothing but n comes back
            {
                **_RUN,
                **_COMBAT,
                "grand_mean": _VECTOR,
                "covariate_effects": _MATRIX,
                "pooled_variance": _VECTOR,
            },
            {"n": C},
        ),
        Route(
            "query.importance",
            {
                **_RUN,
                **_STANDARDISE,
                "trees": Param("int", 1, 10**5),
                "seed": _SEED,
                "resamples": Param("int", 0, 200),  # stability ranking: forests on halves
                "top_k": Param("int", 1, 10**5),  # ... counted when in a forest's top_k
            },
            {"n": C, "positives": C, "importances": A, "selection_frequency": A},  # (k_kept,)
        ),
        Route(
            "train.image",
            {**_RUN, **_IMAGE, **_TRAINING, **_DP, **_SECURE, **_WEIGHTS},
            {"n": C, "weights:*": Kind.WEIGHTS, "train_loss_sum": Kind.METRIC},
        ),
        Route(
            "query.validate",
            {
                **_RUN,
                **_IMAGE,
                **_STANDARDISE,
                **_FUSION_NET,
                **_BINS,  # fusion under the AUC monitor: also the validation histograms
                **_WEIGHTS,
                "stage": Param("word", words=frozenset({"image", "fusion"})),
                "pos_weight": _TRAINING["pos_weight"],
                "dp_mode": _DP["dp_mode"],
            },
            {
                "n": C,
                "val_loss_sum:*": Kind.METRIC,
                "val_hist_pos:*": Kind.HISTOGRAM,
                "val_hist_neg:*": Kind.HISTOGRAM,
            },
        ),
        Route(
            "query.deep_features",
            {**_RUN, **_IMAGE, **_WEIGHTS, "dp_mode": _DP["dp_mode"]},
            {"n": C, "deep_sum": A, "deep_sumsq": A, "deep_cross": A},  # (D,), (D,), (D, D)
        ),
        Route(
            "train.fusion",
            {
                **_RUN,
                **_STANDARDISE,
                **_TRAINING,
                **_DP,
                **_SECURE,
                **_FUSION_NET,
                **_WEIGHTS,
                "weight_decay": Param("float", 0.0, 10.0),
            },
            {"n": C, "weights:*": Kind.WEIGHTS, "train_loss_sum:*": Kind.METRIC},
        ),
        Route(
            "query.train_scores",
            {
                **_RUN,
                **_STANDARDISE,
                **_BINS,
                **_FUSION_NET,
                **_WEIGHTS,
                "dp_mode": _DP["dp_mode"],
                "models": Param("models"),  # the models the networks make (combine_scores)
                "fusion": Param("word", words=frozenset({"joint", "late"})),
            },
            {"n": C, "hist_pos:*": Kind.HISTOGRAM, "hist_neg:*": Kind.HISTOGRAM},
        ),
        Route(
            "query.permutation",
            {
                **_RUN,
                **_STANDARDISE,
                **_FUSION_NET,
                **_WEIGHTS,
                "pos_weight": _TRAINING["pos_weight"],
                "repeats": Param("int", 1, 1000),
                "seed": _SEED,
                "dp_mode": _DP["dp_mode"],
            },
            {"n": C, "base_loss_sum": Kind.METRIC, "loss_increase_sum": A},  # (blocks,)
        ),
        Route(
            "query.ledger",
            {"run": Param("name"), "min_patients": _RUN["min_patients"]},
            {
                "n": C,
                "epsilon": Kind.METRIC,  # the site's whole ledger (every run on its patients)
                "delta": Kind.METRIC,
                "budget": Kind.METRIC,
                "epsilon:*": Kind.METRIC,  # per stage
                "releases:*": C,
                "uncovered:*": C,
            },
        ),
        Route(
            "query.bundle_evaluation",  # a held-out site: its patients scored by the kept bundle
            {
                "run": Param("name"),
                "min_patients": _RUN["min_patients"],
                **_BINS,
                "dp_mode": _DP["dp_mode"],  # the run's: a require_dp site answers a DP run's
            },
            {
                "n": C,
                "hist_pos:*": Kind.HISTOGRAM,  # per model, grouped as query.evaluation's
                "hist_neg:*": Kind.HISTOGRAM,
                "confusion:*": C,  # (tp, fn, tn, fp) at the bundle's threshold, score groups
                "brier_sum:*": Kind.METRIC,
                "calibration:*": A,  # the main model's slope and intercept, on score groups
            },
        ),
        Route(
            "query.model_bundle",  # the final model, to keep (<paths.output>/model/)
            {
                "run": Param("name"),
                "min_patients": _RUN["min_patients"],
                "manifest": Param("json"),  # fedmets.shared.bundle's manifest.json
                "weights:bundle": Param("weights"),  # its arrays.npz
            },
            {"bundle_sha256": Kind.HASH},  # fedmets.shared.bundle.bundle_digest, as stored
            count_field=None,
        ),
        Route(
            "query.evaluation",
            {
                "run": Param("name"),
                "min_patients": _RUN["min_patients"],
                **_BINS,
                "thresholds:*": _VECTOR,  # (folds,) each fold's threshold of one model
                "dp_mode": _DP["dp_mode"],
            },
            {
                "n": C,
                "hist_pos:*": Kind.HISTOGRAM,  # out-of-fold test scores, per model[@subsite]
                "hist_neg:*": Kind.HISTOGRAM,
                "confusion:*": C,  # (tp, fn, tn, fp) at each fold's threshold, score groups
                "brier_sum:*": Kind.METRIC,
                "group_n:*": C,  # patients per subsite group (suppressed groups absent)
                "suppressed": C,  # groups left out for having < min_patients patients
            },
        ),
    )
}


def route(name: str) -> Route:
    """The declared route ``name``; WireError for an unknown one."""
    if name not in ROUTES:
        raise WireError(f"unknown route {name!r}; known: {', '.join(ROUTES)}")
    return ROUTES[name]


# ---- encoding ----------------------------------------------------------------------------------


def to_records(route_name: str, payload: Mapping[str, Any], reply: bool) -> RecordDict:
    """Encode a request (``reply=False``) or reply of ``route_name`` as a Flower RecordDict;
    WireError for a field the route does not declare in that direction."""
    scalars, arrays = _split_fields(route_name, payload, reply)
    records = RecordDict({SCALARS: ConfigRecord(scalars)})
    models = [key for key in payload if key.startswith(WEIGHTS_PREFIX)]
    if arrays or models:
        layout, packed = _pack(arrays, models)
        records[LAYOUT] = layout
        records[ARRAYS] = ArrayRecord(array_dict={ARRAYS: Array(packed)})
    return records


def _split_fields(
    route_name: str, payload: Mapping[str, Any], reply: bool
) -> tuple[dict[str, Any], list[tuple[str, str, np.ndarray]]]:
    """``payload``'s scalars and its arrays as ``(field, parameter, array)`` (parameter "" for
    a plain array field); WireError for an undeclared field or an unsupported value."""
    spec = route(route_name)
    scalars: dict[str, Any] = {}
    arrays: list[tuple[str, str, np.ndarray]] = []
    for key, value in payload.items():
        kind = spec.reply_kind(key) if reply else spec.request_param(key)
        if kind is None:
            side = "reply" if reply else "request"
            raise WireError(
                f"{route_name}: {side} field {key!r} is not declared in fedmets.shared.wire"
            )
        if key.startswith(WEIGHTS_PREFIX):
            arrays += [(key, str(name), np.asarray(v)) for name, v in value.items()]
        elif isinstance(value, np.ndarray):
            arrays.append((key, "", value))
        elif isinstance(value, (bool, int, float, str)) and not isinstance(value, np.generic):
            scalars[key] = value
        elif isinstance(value, (list, tuple)) and value and all(isinstance(v, str) for v in value):
            scalars[key] = list(value)
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            arrays.append((key, "", np.asarray(value)))
        else:
            raise WireError(f"{route_name}: field {key!r} has an unsupported type {type(value)}")
    for key, name, array in arrays:
        if array.dtype.str not in PACKED_DTYPES:
            raise WireError(f"{route_name}: field {key!r} {name} has dtype {array.dtype}")
    return scalars, arrays


def _pack(
    arrays: Sequence[tuple[str, str, np.ndarray]], models: Sequence[str]
) -> tuple[ConfigRecord, np.ndarray]:
    """The layout record and the packed bytes (uint8, 1-D) of ``arrays``; ``models``: every
    weights field, so that one without parameters still arrives."""
    layout = ConfigRecord(
        {
            "fields": [key for key, _, _ in arrays],
            "parameters": [name for _, name, _ in arrays],
            "dtypes": [array.dtype.str for _, _, array in arrays],
            "ndims": [array.ndim for _, _, array in arrays],
            "dims": [int(d) for _, _, array in arrays for d in array.shape],
            "models": list(models),
        }
    )
    data = b"".join(np.ascontiguousarray(array).tobytes() for _, _, array in arrays)
    return layout, np.frombuffer(data, dtype=np.uint8)


def _unpack(layout: ConfigRecord, packed: np.ndarray) -> dict[str, Any]:
    """The array fields and weights of :func:`_pack`'s layout and bytes; WireError when the
    layout is malformed or does not account for every byte."""
    try:
        fields, parameters = list(layout["fields"]), list(layout["parameters"])
        dtypes, ndims = list(layout["dtypes"]), list(layout["ndims"])
        dims, models = list(layout["dims"]), list(layout["models"])
    except KeyError as error:
        raise WireError(f"the array layout has no {error.args[0]!r}") from None
    if not len(fields) == len(parameters) == len(dtypes) == len(ndims):
        raise WireError("the array layout's lists differ in length")
    if not all(isinstance(v, str) for v in fields + parameters + dtypes + models) or not all(
        isinstance(v, int) and not isinstance(v, bool) for v in ndims + dims
    ):
        raise WireError("the array layout holds names that are not text or sizes not integers")
    entries = list(zip(fields, parameters, strict=True))
    plain = {field for field, parameter in entries if not parameter}
    if len(set(entries)) < len(entries) or plain & ({f for f, p in entries if p} | set(models)):
        raise WireError("the array layout names an array twice")
    if any(n < 0 for n in ndims) or sum(ndims) != len(dims) or any(d < 0 for d in dims):
        raise WireError("the array layout's shapes do not add up")
    data = np.asarray(packed, dtype=np.uint8).reshape(-1).tobytes()
    payload: dict[str, Any] = {model: {} for model in models}
    offset = 0
    for field, parameter, dtype, ndim in zip(fields, parameters, dtypes, ndims, strict=True):
        if dtype not in PACKED_DTYPES:
            raise WireError(f"{field} {parameter}: dtype {dtype!r} may not be sent")
        shape, dims = tuple(dims[:ndim]), dims[ndim:]
        count = math.prod(shape)  # Python ints: a crafted shape cannot overflow
        size = count * np.dtype(dtype).itemsize
        if offset + size > len(data):
            raise WireError(f"{field} {parameter}: past the end of the packed arrays")
        array = np.frombuffer(data, dtype=dtype, count=count, offset=offset).reshape(shape)
        offset += size
        if parameter:
            payload.setdefault(field, {})[parameter] = array.copy()
        else:
            payload[field] = array.copy()
    if offset != len(data):
        raise WireError(f"{len(data) - offset} packed bytes beyond the layout's arrays")
    return payload


def from_records(records: RecordDict) -> dict[str, Any]:
    """Decode a RecordDict written by :func:`to_records` back into a payload; WireError for
    arrays without their layout, or a layout that does not fit them."""
    payload: dict[str, Any] = dict(records[SCALARS]) if SCALARS in records else {}
    if ARRAYS in records and LAYOUT not in records and not records[ARRAYS]:
        return payload  # protocol <= 11 (an empty array record): read, for the census's check
    if (ARRAYS in records) != (LAYOUT in records):
        raise WireError("packed arrays come with their layout, and a layout with its arrays")
    if ARRAYS in records:
        packed = records[ARRAYS]
        if not isinstance(packed, ArrayRecord) or list(packed) != [ARRAYS]:
            raise WireError("the packed arrays are not one array")
        payload.update(_unpack(records[LAYOUT], packed[ARRAYS].numpy()))
    return payload


# ---- the request rules -------------------------------------------------------------------------

RUN_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")


def check_request(route_name: str, payload: Mapping[str, Any]) -> list[str]:
    """Every way ``payload`` (a request on ``route_name``, as decoded at the site) breaks the
    route's declaration: an undeclared field, a value of the wrong type, a number out of its
    range; each problem names the field and the rule. Empty when it is well formed."""
    spec = route(route_name)
    problems = []
    for key, value in payload.items():
        param = spec.request_param(key)
        if param is None:
            problems.append(f"{key}: not a declared request field of {route_name}")
            continue
        problem = _param_problem(param, value, spec)
        if problem:
            problems.append(f"{key}: {problem}")
    return problems


def _in_range(param: Param, values: np.ndarray) -> str | None:
    if param.low is not None and values.size and values.min() < param.low:
        return f"must be >= {param.low:g}, got {values.min():g}"
    if param.high is not None and values.size and values.max() > param.high:
        return f"must be <= {param.high:g}, got {values.max():g}"
    return None


def _param_problem(param: Param, value: Any, spec: Route) -> str | None:
    """Why ``value`` does not fit ``param`` (None when it does)."""
    kind = param.type
    if kind == "bool":
        return None if isinstance(value, bool) else f"must be true or false, got {value!r:.40}"
    if kind in ("int", "float"):
        numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
        if not numeric or (kind == "int" and not isinstance(value, int)):
            return f"must be {'an integer' if kind == 'int' else 'a number'}, got {value!r:.40}"
        if not np.isfinite(value):
            return f"must be finite, got {value!r}"
        return _in_range(param, np.array([value], dtype=float))
    if kind == "name":
        ok = isinstance(value, str) and RUN_NAME.match(value)
        return None if ok else "must be 1-64 letters, digits, '_', '.' or '-', not starting '.'"
    if kind == "word":
        return None if value in param.words else f"must be one of {sorted(param.words)}"
    if kind == "words":
        bad = [v for v in value if not isinstance(v, str) or spec.reply_kind(v) is None]
        ok = isinstance(value, (list, tuple)) and not bad
        return None if ok else f"must list {spec.name} reply fields, got {list(value)[:3]!r}"
    if kind == "models":
        ok = isinstance(value, (list, tuple)) and all(
            isinstance(v, str) and MODEL_KEY.match(v) for v in value
        )
        return None if ok else f"must list model keys, got {list(value)[:3]!r:.80}"
    if kind == "covariates":  # an empty list arrives as an empty array
        from fedmets.shared.clinical import CLINICAL_COLUMNS  # (pandas: not in the relay)

        listed = isinstance(value, (list, tuple)) or (
            isinstance(value, np.ndarray) and not value.size
        )
        ok = listed and all(isinstance(v, str) and v in CLINICAL_COLUMNS for v in value)
        return None if ok else f"must list clinical schema columns, got {value!r:.80}"
    if kind == "hex":
        return None if isinstance(value, str) and HEX.match(value) else "must be hex digits"
    if kind == "json":
        if not isinstance(value, str) or len(value) > MAX_JSON_CHARS:
            return f"must be JSON text of at most {MAX_JSON_CHARS} characters"
        try:
            parsed = json.loads(value)
        except ValueError:
            return "must be valid JSON"
        return None if isinstance(parsed, dict) else "must be a JSON object"
    if kind == "weights":
        ok = isinstance(value, Mapping) and all(
            isinstance(v, np.ndarray) and v.dtype.kind in "iuf" and np.all(np.isfinite(v))
            for v in value.values()
        )
        return None if ok else "must map parameter names to finite numeric arrays"
    array = np.asarray(value)
    dims = {"vector": 1, "matrix": 2, "indices": 1, "ints": 1}[kind]
    if array.ndim != dims:
        return f"must be a {dims}-D array, got shape {array.shape}"
    if kind in ("indices", "ints"):
        if array.dtype.kind not in "iu":
            return f"must hold integers, got {array.dtype}"
        if kind == "indices":
            return None if not array.size or array.min() >= 0 else "indices must be >= 0"
        return _in_range(param, array)
    if array.dtype.kind not in "iuf" or not np.all(np.isfinite(array)):
        return "must hold finite numbers"
    return None


# ---- the audit rules ---------------------------------------------------------------------------


def check_reply(route_name: str, payload: Mapping[str, Any], min_patients: int) -> list[str]:
    """Every way ``payload`` (a site's reply on ``route_name``) breaks the rules of what may
    leave a site; empty when it may be sent."""
    spec = route(route_name)
    problems = []
    for key, value in payload.items():
        kind = spec.reply_kind(key)
        if kind is None or kind not in REPLY_KINDS:
            problems.append(f"{key}: not a declared reply field of {route_name}")
            continue
        problems += [f"{key}: {p}" for p in _kind_problems(kind, value)]
    if not reply_is_finite(route_name, payload):
        # one problem, whichever and however many fields: which of a reply's models failed on
        # the site's data would be a bit each (the audit log describes the fields)
        problems.append(NOT_FINITE)
    count = payload.get(spec.count_field) if spec.count_field else None
    aggregated = any(
        spec.reply_kind(k) in (Kind.AGGREGATE, Kind.HISTOGRAM, Kind.METRIC, Kind.WEIGHTS)
        for k in payload
    )
    if aggregated and (not isinstance(count, int) or count < min_patients):
        problems.append(
            f"{spec.count_field}: aggregates need >= {min_patients} patients, got {count!r}"
        )
    return problems


def received_problems(
    route_name: str, payload: Mapping[str, Any], request: Mapping[str, Any], min_patients: int
) -> list[str]:
    """Every way a reply the centre received breaks the wire's rules (:func:`check_reply`,
    what an honest site's gate checks before sending) or cannot be a site's honest answer to
    ``request``: a missing or negative patient count, negative counts or metrics (every metric
    is a sum of losses, a Brier sum or an epsilon), a histogram of other than the request's
    ``bins``, confusion counts that are not four or not the histograms' patients. Model
    weights are checked where they are averaged (``FederatedProtocol._valid_updates``; a value
    that is not finite, weights included, :func:`check_reply` names). Empty when the reply is
    usable."""
    problems = check_reply(route_name, payload, min_patients)
    spec = route(route_name)
    count = payload.get(spec.count_field) if spec.count_field else 0
    if not isinstance(count, (int, np.integer)) or count < 0:
        problems.append(f"{spec.count_field}: not a count of patients: {count!r}")
    for key, value in payload.items():
        kind = spec.reply_kind(key)
        if kind not in (Kind.COUNT, Kind.HISTOGRAM, Kind.AGGREGATE, Kind.METRIC):
            continue
        array = np.asarray(value)
        if array.dtype.kind not in "biuf":
            continue  # check_reply names it
        if kind in (Kind.COUNT, Kind.HISTOGRAM) and (array < 0).any():
            problems.append(f"{key}: negative counts")
        elif kind == Kind.METRIC and (array < 0).any():  # loss and Brier sums, epsilons
            problems.append(f"{key}: a negative sum of losses")
        if kind == Kind.HISTOGRAM and "bins" in request and array.shape != (request["bins"],):
            problems.append(f"{key}: {array.size} bins, the request's {request['bins']}")
        name = key.partition(":")[2]
        if key.startswith("confusion:") and array.shape != (4,):
            problems.append(f"{key}: {array.size} counts, not (TP, FN, TN, FP)")
        elif key.startswith("confusion:") and f"hist_pos:{name}" in payload:
            histograms = (payload[f"hist_pos:{name}"], payload.get(f"hist_neg:{name}", 0))
            scored = sum(np.sum(h) for h in histograms)
            if array.sum() != scored:
                problems.append(f"{key}: {array.sum()} patients, its histograms {scored}")
    if route_name == "query.evaluation":  # each model's four fields, or none of them
        names = {k.partition(":")[2] for k in payload if ":" in k} - {""}
        for name in sorted(names):
            fields = [f"{f}:{name}" for f in ("hist_pos", "hist_neg", "confusion", "brier_sum")]
            missing = [f for f in fields if f not in payload]
            if missing and len(missing) < len(fields):
                problems.append(f"{missing[0]}: missing beside the model's other fields")
    return problems


MAX_COUNT_VALUES = 64
"""Longest integer array of kind COUNT (per-fold counts, a confusion matrix)."""


NUMERIC_KINDS = frozenset({Kind.AGGREGATE, Kind.METRIC, Kind.WEIGHTS})
"""Reply kinds whose values may be floats: a site sends them finite or not at all (a NaN
where a crafted network failed on some patients told the centre so, uncounted)."""
NOT_FINITE = "a value that is not finite: a reply holding one may not leave"
""":func:`check_reply`'s one problem for such a reply, naming no field (which of a reply's
models failed would be a bit each)."""


def reply_is_finite(route_name: str, payload: Mapping[str, Any]) -> bool:
    """Whether every float of ``payload``'s fields of :data:`NUMERIC_KINDS` is finite."""
    spec = route(route_name)
    return all(all_finite(v) for k, v in payload.items() if spec.reply_kind(k) in NUMERIC_KINDS)


def all_finite(value: Any) -> bool:
    """Whether every number in a reply value (an array, a scalar, or a mapping of arrays:
    weights) is finite; True for what is not numeric (its kind's rule names it)."""
    arrays = value.values() if isinstance(value, Mapping) else [value]
    for array in map(np.asarray, arrays):
        if array.dtype.kind == "f" and not np.isfinite(array).all():
            return False
    return True


def _kind_problems(kind: Kind, value: Any) -> list[str]:
    """Problems of one reply value of ``kind``: types, integer counts, constrained strings."""
    if kind == Kind.WEIGHTS:
        if not isinstance(value, Mapping) or not all(
            isinstance(v, np.ndarray) and v.dtype.kind in "iuf" for v in value.values()
        ):
            return ["weights must be a mapping of numeric arrays"]
        return []
    if kind == Kind.HASH:
        return [] if isinstance(value, str) and HEX.match(value) else ["not a hex digest"]
    if kind == Kind.SIGNATURE:
        ok = isinstance(value, str) and SIGNATURE_HEX.match(value)
        return [] if ok else ["not a hex signature"]
    if kind == Kind.SITE:
        return [] if isinstance(value, str) and SITE_ID.match(value) else ["not a site id"]
    if kind == Kind.ENUM:
        return [] if value in ENUM_WORDS else [f"not one of {sorted(ENUM_WORDS)}"]
    if kind == Kind.SCHEMA:
        names = value if isinstance(value, (list, tuple)) else [value]
        bad = [n for n in names if not isinstance(n, str) or not FEATURE_NAME.match(n)]
        return [f"not feature names: {bad[:3]}"] if bad else []
    if isinstance(value, str):
        return ["free text may not leave a site"]
    if kind == Kind.HISTOGRAM:
        ok = isinstance(value, np.ndarray) and value.ndim == 1 and value.dtype.kind in "iu"
        return [] if ok else ["a histogram is a 1-D array of integer counts"]
    if kind == Kind.COUNT:
        array = np.asarray(value)
        if array.dtype.kind not in "biu":
            return ["counts must be integers"]
        if array.size > MAX_COUNT_VALUES:
            return [f"more than {MAX_COUNT_VALUES} counts"]
        return []
    array = np.asarray(value)
    return [] if array.dtype.kind in "biuf" else [f"values of dtype {array.dtype} may not leave"]


def describe_request(route_name: str, payload: Mapping[str, Any]) -> dict[str, Any]:
    """For the audit: a request's scalar settings as sent, arrays by shape and dtype, model
    weights by parameter count and the SHA-256 of their bytes (which weights were asked
    about, without the values)."""
    spec = route(route_name)
    fields: dict[str, Any] = {}
    for key, value in payload.items():
        if isinstance(value, Mapping):
            digest = hashlib.sha256()
            for name in sorted(value):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(value[name]).tobytes())
            count = int(sum(np.size(v) for v in value.values()))
            fields[key] = {"values": count, "sha256": digest.hexdigest()}
        elif getattr(spec.request_param(key), "type", None) == "json" and isinstance(value, str):
            text = value.encode()
            fields[key] = {"chars": len(value), "sha256": hashlib.sha256(text).hexdigest()}
        elif isinstance(value, (bool, int, float, str)) or spec.request_param(key) is None:
            fields[key] = value if isinstance(value, (bool, int, float, str)) else repr(value)[:80]
        elif isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
            fields[key] = list(value)
        else:
            array = np.asarray(value)
            if array.size <= 8:
                fields[key] = array.tolist()
            else:
                fields[key] = {"shape": list(array.shape), "dtype": str(array.dtype)}
    return fields


def describe(route_name: str, payload: Mapping[str, Any]) -> dict[str, dict]:
    """Per field: kind, shape, dtype and bytes (weights: parameter count and bytes)."""
    spec = route(route_name)
    fields = {}
    for key, value in payload.items():
        kind = spec.reply_kind(key)
        if isinstance(value, Mapping):
            arrays = [np.asarray(v) for v in value.values()]
            fields[key] = {
                "kind": str(kind),
                "tensors": len(arrays),
                "values": int(sum(a.size for a in arrays)),
                "bytes": int(sum(a.nbytes for a in arrays)),
            }
        else:
            array = np.asarray(value)
            fields[key] = {
                "kind": str(kind),
                "shape": list(array.shape),
                "dtype": str(array.dtype),
                "bytes": int(array.nbytes),
            }
    return fields


# ---- batches: folds at once --------------------------------------------------------------------

BATCH_MESSAGE_TYPE = "query.batch"
"""The Flower message type of a batch: the requests of several folds that the centre runs at
once (``[federation] parallel_folds``), and a training round's validation with the next
round's training, in one message, since a Flower 1.42 SuperNode handles one message at a time.
Each item is a request of its own route, checked, answered and logged by the site as if it had
come alone; the reply holds each item's reply, or the site's refusal of it (the text a refused
single request would carry)."""
MAX_BATCH_ITEMS = 2 * 64
"""The most items of a batch: two requests (a round's training, the round before's validation)
of each of up to 64 folds at once."""
_BATCH = "batch"


def to_batch(items: Sequence[tuple[str, Mapping[str, Any] | str]], reply: bool) -> RecordDict:
    """Encode a batch: per item its route and payload (:func:`to_records`, each record's name
    led by ``<item>/``) or, in a reply only, the text of its refusal; WireError as
    :func:`to_records` gives, or for more than :data:`MAX_BATCH_ITEMS` items."""
    if not 0 < len(items) <= MAX_BATCH_ITEMS:
        raise WireError(f"a batch holds 1 to {MAX_BATCH_ITEMS} items, not {len(items)}")
    records = RecordDict()
    refused = []
    for index, (route_name, payload) in enumerate(items):
        if isinstance(payload, str):
            if not reply:
                raise WireError(f"item {index} ({route_name}): a request is no refusal")
            refused.append(payload or "refused")
            continue
        refused.append("")
        for key, record in to_records(route_name, payload, reply).items():
            records[f"{index}/{key}"] = record
    records[_BATCH] = ConfigRecord({"routes": [r for r, _ in items], "refused": refused})
    return records


def from_batch(records: RecordDict) -> list[tuple[str, dict[str, Any] | str]]:
    """The items of :func:`to_batch`'s records: ``(route, payload)``, or ``(route, refusal
    text)``; WireError for records that are no batch or name an unknown route."""
    header = records.config_records.get(_BATCH)
    if header is None or "routes" not in header or "refused" not in header:
        raise WireError("not a batch: no batch record with its routes")
    routes, refused = list(header["routes"]), list(header["refused"])
    if not 0 < len(routes) <= MAX_BATCH_ITEMS or len(refused) != len(routes):
        raise WireError(f"a batch holds 1 to {MAX_BATCH_ITEMS} items, one refusal slot each")
    parts = [RecordDict() for _ in routes]
    for key, record in records.items():
        if key == _BATCH:
            continue
        index, _, name = key.partition("/")
        if not index.isdigit() or int(index) >= len(routes):
            raise WireError(f"batch record {key!r} names no item")
        parts[int(index)][name] = record
    for route_name in routes:
        route(route_name)
    return [
        (route_name, refusal or from_records(part))
        for route_name, refusal, part in zip(routes, refused, parts, strict=True)
    ]


# ---- secure aggregation (SecAgg+) --------------------------------------------------------------

SECURE_MESSAGE_TYPE = "train"
"""The Flower message type of every SecAgg+ stage: ``secaggplus_mod`` acts on this type alone,
so a secure training request names its route (``train.image``, ``train.fusion``) in its
header."""
SECURE_ROUTES = ("train.image", "train.fusion")
SECURE_SUMS = "secure_sums"
SENT = "#sent"
"""The layout entry ``(sum, SENT)`` beside each requested sum: 1 from a site that sent the sum, 0
from one whose policy held it back, so the average says whose patients the sum is over."""
_HEADER = "fedmets.wire"


def secure_layout(request: Mapping[str, Any]) -> list[tuple[str, str | None]]:
    """The entries of the vector SecAgg+ masks, in order: ``(weights:<model>, parameter)`` for
    every float parameter of every model of ``request`` (models, then parameters, sorted by
    name; integer buffers keep the global value and are not sent), then ``(field, None)`` and
    ``(field, SENT)`` for each reply sum named in ``request["secure_sums"]``. Server and site
    derive it from the same request."""
    layout: list[tuple[str, str | None]] = [
        (key, name)
        for key in sorted(k for k in request if k.startswith(WEIGHTS_PREFIX))
        for name in sorted(request[key])
        if np.asarray(request[key][name]).dtype.kind == "f"
    ]
    sums = [str(key) for key in request.get(SECURE_SUMS, ())]
    return layout + [entry for key in sums for entry in ((key, None), (key, SENT))]


def to_fitins(route_name: str, request: Mapping[str, Any]) -> FitIns:
    """A training request for SecAgg+ as Flower's ``FitIns``: every array of the request
    (weights and standardisation vectors alike) a tensor, their names and the scalars in one
    JSON header. Validated as :func:`to_records` does (WireError)."""
    if route_name not in SECURE_ROUTES:
        raise WireError(f"{route_name}: not a route of secure aggregation ({SECURE_ROUTES})")
    scalars, arrays = _split_fields(route_name, request, reply=False)
    header = {
        "route": route_name,
        "arrays": [[key, name] for key, name, _ in arrays],
        "scalars": scalars,
    }
    tensors = [array for _, _, array in arrays]
    return FitIns(ndarrays_to_parameters(tensors), {_HEADER: json.dumps(header)})


def from_fitins(fitins: FitIns) -> tuple[str, dict[str, Any]]:
    """``(route, request)`` from a ``FitIns`` written by :func:`to_fitins`."""
    if _HEADER not in fitins.config:
        raise WireError("a secure training message without fedmets' wire header")
    header = json.loads(str(fitins.config[_HEADER]))
    route_name = str(header["route"])
    if route_name not in SECURE_ROUTES:
        raise WireError(f"{route_name}: not a route of secure aggregation ({SECURE_ROUTES})")
    tensors = parameters_to_ndarrays(fitins.parameters)
    if len(tensors) != len(header["arrays"]):
        raise WireError(f"{len(tensors)} tensors for {len(header['arrays'])} declared arrays")
    request: dict[str, Any] = dict(header["scalars"])
    for (key, name), tensor in zip(header["arrays"], tensors, strict=True):
        if name:
            request.setdefault(key, {})[name] = tensor
        else:
            request[key] = tensor
    return route_name, request


def _masked_vector(
    route_name: str, request: Mapping[str, Any], reply: Mapping[str, Any]
) -> tuple[list[np.ndarray], int]:
    """The vector a site hands to SecAgg+ and its weight: per model the update (new minus
    global weights), then each requested sum divided by ``n`` and whether it was sent (0 and 0
    for one the reply holds back), weighted by ``n``; zeros with weight 0 when the site could
    not train (a reply of ``n`` only). WireError when the reply does not fit the request's
    layout or holds a non-finite value."""
    spec = route(route_name)
    layout = secure_layout(request)
    for key, name in layout:
        if name in (None, SENT) and spec.reply_kind(key) != Kind.METRIC:
            raise WireError(f"{key}: not a sum of {route_name}'s reply")
    if not any(k.startswith(WEIGHTS_PREFIX) for k in reply):
        return [
            np.zeros(1 if name in (None, SENT) else np.shape(request[key][name]))
            for key, name in layout
        ], 0
    n = reply.get("n")
    if not isinstance(n, int) or n <= 0:
        raise WireError(f"n: a weight must be a positive count, got {n!r}")
    expected = {k for k in request if k.startswith(WEIGHTS_PREFIX)}
    sent = {k for k in reply if k.startswith(WEIGHTS_PREFIX)}
    if sent != expected:
        raise WireError(f"the reply's models {sorted(sent)} are not the request's")
    vector = []
    for key, name in layout:
        if name is None:  # a sum the site's policy held back (a training loss on too few
            # inner-validation rows to differ from the training rows by its floor) adds 0
            value = np.array([float(reply.get(key, 0.0)) / n])
        elif name == SENT:
            value = np.array([1.0 if key in reply else 0.0])
        else:
            new, old = np.asarray(reply[key].get(name)), np.asarray(request[key][name])
            if new.shape != old.shape:
                raise WireError(f"{key} {name}: shape {new.shape}, the request's {old.shape}")
            value = new.astype(np.float64) - old.astype(np.float64)
        if not np.all(np.isfinite(value)):
            raise WireError(f"{key} {name or ''}: not finite (it would spoil the secure sum)")
        vector.append(value)
    return vector, n


def check_masked(
    route_name: str, request: Mapping[str, Any], reply: Mapping[str, Any]
) -> list[str]:
    """Why ``reply`` cannot go into SecAgg+'s masked vector (empty when it can)."""
    try:
        _masked_vector(route_name, request, reply)
    except WireError as error:
        return [str(error)]
    return []


def to_fitres(route_name: str, request: Mapping[str, Any], reply: Mapping[str, Any]) -> FitRes:
    """What a site hands to ``secaggplus_mod``: the vector of :func:`secure_layout` as
    parameters, its weight as ``num_examples``, nothing else (no metrics). The mod quantises
    and masks the parameters; only the masked vector and the weight leave the site."""
    vector, weight = _masked_vector(route_name, request, reply)
    return FitRes(Status(Code.OK, "OK"), ndarrays_to_parameters(vector), weight, {})


def from_secure_average(
    request: Mapping[str, Any], average: Sequence[np.ndarray], n: int
) -> dict[str, Any]:
    """The aggregate of a secure round as one reply payload: ``n`` (the weights' sum), each
    model's global weights plus the average update (its integer buffers as sent), each
    requested sum per patient of the sites that sent it, times ``n`` (absent when none did),
    so that ``sum / n`` is their mean whatever others held back."""
    layout = secure_layout(request)
    if len(average) != len(layout):
        raise WireError(f"a secure average of {len(average)} arrays for {len(layout)} entries")
    payload: dict[str, Any] = {"n": int(n)}
    sums: dict[str, float] = {}
    for (key, name), value in zip(layout, average, strict=True):
        if name is None:
            sums[key] = float(np.asarray(value).reshape(-1)[0])
            continue
        if name == SENT:  # the share of the patients whose site sent the sum
            share = float(np.asarray(value).reshape(-1)[0])
            if share > 0.5 / max(n, 1):  # at least one patient's worth, past the quantisation
                payload[key] = sums[key] / share * n
            continue
        if key not in payload:
            payload[key] = {k: np.array(v, copy=True) for k, v in request[key].items()}
        old = np.asarray(request[key][name])
        update = np.asarray(value, dtype=np.float64).reshape(old.shape)
        payload[key][name] = (old.astype(np.float64) + update).astype(old.dtype)
    return payload


def describe_masked(request: Mapping[str, Any], weight: int) -> dict[str, dict]:
    """For the audits (:func:`describe`'s format): what a secure training reply carries, the
    weight ``n`` in clear and the ``masked`` vector (how many values, which reply fields it
    holds; all zeros when the weight is 0)."""
    layout = secure_layout(request)
    return {
        "n": describe("train.fusion", {"n": int(weight)})["n"],
        "masked": {
            "kind": str(Kind.MASKED),
            "values": int(
                sum(
                    1 if name in (None, SENT) else np.size(request[key][name])
                    for key, name in layout
                )
            ),
            "holds": sorted({key for key, _ in layout}),
            "zeros": weight == 0,
        },
    }


def masked_weight(route_name: str, request: Mapping[str, Any], reply: Mapping[str, Any]) -> int:
    """The weight a site's secure reply carries in clear (0: it could not train)."""
    return _masked_vector(route_name, request, reply)[1]
