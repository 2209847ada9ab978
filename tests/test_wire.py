"""fedmets.shared.wire: payloads survive Flower records; the release rules refuse what may not
leave."""

from __future__ import annotations

import numpy as np
import pytest

from fedmets.shared import wire


def test_round_trip_through_flower_records() -> None:
    request = {
        "run": "r1",
        "fold": 2,
        "min_patients": 5,
        "radiomics_mean": np.linspace(0, 1, 7),
        "weights:none/clinical": {"net.0.weight": np.ones((3, 2), np.float32)},
    }
    records = wire.to_records("query.validate", request, reply=False)
    back = wire.from_records(records)
    assert back["run"] == "r1" and back["fold"] == 2
    np.testing.assert_array_equal(back["radiomics_mean"], request["radiomics_mean"])
    np.testing.assert_array_equal(
        back["weights:none/clinical"]["net.0.weight"], np.ones((3, 2), np.float32)
    )


def _seven_networks() -> dict:
    """A training request's weights: seven fusion networks of two layers each."""
    rng = np.random.default_rng(0)
    layers = {
        "net.0.weight": (8, 20),
        "net.0.bias": (8,),
        "net.3.weight": (1, 8),
        "net.3.bias": (1,),
    }
    return {
        f"weights:none/{group}": {
            name: rng.normal(size=shape).astype(np.float32) for name, shape in layers.items()
        }
        for group in (
            "radiomics",
            "clinical",
            "radiomics+clinical",
            "deep",
            "deep+clinical",
            "deep+radiomics",
            "deep+radiomics+clinical",
        )
    }


def test_a_training_message_is_a_handful_of_flower_objects() -> None:
    """Flower 1.42 moves each record and array of a message as an object of its own (one HTTP
    request per object and hop): every array of a payload travels packed in one."""
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects

    request = {"run": "r1", "fold": 0, "round": 1, **_seven_networks()}
    records = wire.to_records("train.fusion", request, reply=False)
    assert len(get_all_nested_objects(records)) <= 6  # was 37: one per parameter and model
    back = wire.from_records(records)
    for model, weights in _seven_networks().items():
        assert set(back[model]) == set(weights)
        for name, array in weights.items():
            assert back[model][name].dtype == np.float32
            np.testing.assert_array_equal(back[model][name], array)


def test_packed_arrays_keep_their_dtype_and_shape() -> None:
    request = {
        "run": "r1",
        "fold": 1,
        "radiomics_mean": np.arange(6, dtype=np.float64).reshape(2, 3),
        "radiomics_scale": np.zeros((0,), np.float32),
        "weights:none/clinical": {"count": np.array(7, np.int64), "on": np.array([True, False])},
        "weights:none/radiomics": {},
    }
    back = wire.from_records(wire.to_records("query.validate", request, reply=False))
    assert back["radiomics_mean"].shape == (2, 3) and back["radiomics_mean"].dtype == np.float64
    assert back["radiomics_scale"].shape == (0,) and back["radiomics_scale"].dtype == np.float32
    assert back["weights:none/clinical"]["count"].shape == ()
    assert back["weights:none/clinical"]["count"] == 7
    assert back["weights:none/clinical"]["on"].tolist() == [True, False]
    assert back["weights:none/radiomics"] == {}
    alone = {"run": "r1", "fold": 1, "weights:none/radiomics": {}}  # the only array field
    assert wire.from_records(wire.to_records("query.validate", alone, reply=False)) == alone
    from flwr.app import ArrayRecord, ConfigRecord, RecordDict

    census = {"protocol": 11, "site_id": "site_a"}  # as protocol 11 wrote it: version is told
    old = RecordDict({"scalars": ConfigRecord(census), "arrays": ArrayRecord()})
    assert wire.from_records(old) == census
    with pytest.raises(wire.WireError, match="dtype object"):
        wire.to_records("query.validate", {"radiomics_mean": np.array([None])}, reply=False)


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda layout, data: layout.__setitem__("dtypes", ["|O"]), "may not be sent"),
        (lambda layout, data: layout.__setitem__("dims", [7]), "past the end"),
        (lambda layout, data: layout.__setitem__("dims", [2]), "beyond the layout"),
        (lambda layout, data: layout.__setitem__("dims", [2**40, 2**40, 0]), "do not add up"),
        (
            lambda layout, data: (
                layout.__setitem__("ndims", [3]),
                layout.__setitem__("dims", [2**32] * 3),
            ),
            "past the end",
        ),
        (lambda layout, data: layout.__setitem__("ndims", [2]), "do not add up"),
        (lambda layout, data: layout.__setitem__("fields", []), "differ in length"),
        (lambda layout, data: layout.pop("models"), "no 'models'"),
        (lambda layout, data: layout.__setitem__("dims", [4.0]), "not integers"),
        (lambda layout, data: layout.__setitem__("ndims", [True]), "not integers"),
        (lambda layout, data: layout.__setitem__("models", ["radiomics_sum"]), "twice"),
        (lambda layout, data: data.pop("layout"), "with their layout"),
    ],
)
def test_packed_arrays_that_do_not_fit_their_layout_are_refused(change, problem) -> None:
    """A reply's layout is the sender's word: the receiver reads no byte outside the packed
    array and no dtype beyond plain numbers."""
    records = wire.to_records("query.moments", _moments(10), reply=True)
    layout = records["layout"]
    layout["fields"], layout["parameters"] = ["radiomics_sum"], [""]
    layout["dtypes"], layout["ndims"], layout["dims"] = ["<f8"], [1], [4]
    from flwr.app import Array, ArrayRecord

    records["arrays"] = ArrayRecord(array_dict={"arrays": Array(np.zeros(32, np.uint8))})
    assert wire.from_records(records)["radiomics_sum"].tolist() == [0.0] * 4
    change(layout, records)
    with pytest.raises(wire.WireError, match=problem):
        wire.from_records(records)


def test_undeclared_fields_are_refused_before_sending() -> None:
    with pytest.raises(WireError := wire.WireError, match="'patient_ids' is not declared"):
        wire.to_records("query.moments", {"n": 10, "patient_ids": np.arange(3)}, reply=True)
    with pytest.raises(WireError, match="unknown route"):
        wire.route("query.everything")


def test_a_batch_carries_each_request_and_each_reply_or_refusal() -> None:
    """Folds at once: several routes' requests in one message, and back each reply or the
    site's refusal of it, in order; every item checked as if sent alone."""
    weights = {"net.0.weight": np.ones((3, 2), np.float32)}
    items = [
        ("query.validate", {"run": "r1", "fold": 0, "weights:none/clinical": weights}),
        (
            "query.validate",
            {
                "run": "r1",
                "fold": 1,
                "weights:none/clinical": {"net.0.weight": np.full((3, 2), 2, np.float32)},
            },
        ),
        ("query.folds", {"run": "r1", "folds": 3}),
    ]
    back = wire.from_batch(wire.to_batch(items, reply=False))
    assert [route for route, _ in back] == [route for route, _ in items]
    assert [request["fold"] for _, request in back[:2]] == [0, 1]
    np.testing.assert_array_equal(back[1][1]["weights:none/clinical"]["net.0.weight"], 2)
    replies = [("query.moments", _moments(10)), ("query.folds", "refused: policy.folds")]
    (_, moments), (_, refusal) = wire.from_batch(wire.to_batch(replies, reply=True))
    np.testing.assert_array_equal(moments["radiomics_sum"], np.ones(4))
    assert refusal == "refused: policy.folds"
    with pytest.raises(wire.WireError, match="'patient_ids' is not declared"):
        wire.to_batch([("query.moments", {"n": 10, "patient_ids": np.arange(3)})], reply=True)
    with pytest.raises(wire.WireError, match="a request is no refusal"):
        wire.to_batch([("query.folds", "refused")], reply=False)
    with pytest.raises(wire.WireError, match="not a batch"):
        wire.from_batch(wire.to_records("query.folds", {"run": "r1", "folds": 3}, reply=False))
    renamed = wire.to_batch(items[2:], reply=False)
    renamed.config_records["batch"]["routes"] = ["query.everything"]
    with pytest.raises(wire.WireError, match="unknown route"):
        wire.from_batch(renamed)
    most = [("query.folds", {"run": "r1", "folds": 3})] * (2 * 64)  # 64 folds' pairs
    assert len(wire.from_batch(wire.to_batch(most, reply=False))) == 128
    with pytest.raises(wire.WireError, match="a batch holds 1 to 128 items, not 129"):
        wire.to_batch([*most, most[0]], reply=False)


def _moments(n: int) -> dict:
    return {"n": n, "positives": 3, "radiomics_sum": np.ones(4), "radiomics_count": np.ones(4)}


def test_a_valid_reply_passes() -> None:
    assert wire.check_reply("query.moments", _moments(12), min_patients=5) == []


@pytest.mark.parametrize(
    ("route", "reply", "problem"),
    [
        ("query.moments", _moments(4), "aggregates need >= 5 patients, got 4"),
        ("query.moments", {**_moments(12), "ids": np.arange(12)}, "not a declared reply field"),
        ("query.census", {"site_id": "Hospital A!"}, "not a site id"),
        ("query.census", {"schema_hash": "written by hand"}, "not a hex digest"),
        ("query.census", {"mode": "see patient 17"}, "not one of"),
        ("query.folds", {"n": 12, "fold_sizes": np.array([4.5, 7.5])}, "counts must be integers"),
        ("query.folds", {"n": 12, "fold_sizes": np.arange(100)}, "more than 64 counts"),
        (  # per-patient scores smuggled as a histogram
            "query.train_scores",
            {"n": 12, "hist_pos:none/clinical": np.random.default_rng(0).random(12)},
            "1-D array of integer counts",
        ),
        (
            "train.fusion",
            {"n": 12, "weights:none/clinical": {"w": np.array(["a"])}},
            "mapping of numeric arrays",
        ),
    ],
)
def test_replies_that_may_not_leave(route: str, reply: dict, problem: str) -> None:
    problems = wire.check_reply(route, reply, min_patients=5)
    assert any(problem in p for p in problems), problems


def test_a_reply_with_a_value_that_is_not_finite_may_not_leave_whichever_field() -> None:
    """One problem, naming no field: which of a reply's models failed would be a bit each."""
    nan = {**_moments(12), "radiomics_sum": np.array([1.0, np.nan, 0, 0])}
    both = {**nan, "radiomics_count": np.array([np.inf, 1, 1, 1])}
    weights = {"n": 12, "weights:none/clinical": {"w": np.ones(3), "b": np.array([np.nan])}}
    for route, reply in (
        ("query.moments", nan),
        ("query.moments", both),
        ("train.fusion", weights),
    ):
        problems = wire.check_reply(route, reply, min_patients=5)
        assert problems == [wire.NOT_FINITE]
    finite = {"n": 12, "weights:none/clinical": {"w": np.ones(3), "b": np.zeros(1)}}
    assert wire.check_reply("train.fusion", finite, min_patients=5) == []


def test_every_route_declares_a_patient_count_or_replies_only_hashes() -> None:
    for spec in wire.ROUTES.values():
        if spec.count_field is None:  # the stored model bundle's hash: nothing about patients
            assert set(spec.reply.values()) == {wire.Kind.HASH}, spec.name
        else:
            assert spec.reply_kind(spec.count_field) == wire.Kind.COUNT, spec.name
        assert all(isinstance(p, wire.Param) for p in spec.request.values()), spec.name


@pytest.mark.parametrize(
    ("manifest", "problem"),
    [
        ("{not json", "must be valid JSON"),
        ("[1, 2]", "must be a JSON object"),
        ("{}" + " " * wire.MAX_JSON_CHARS, "at most"),
    ],
)
def test_a_model_bundle_request_carries_one_json_object(manifest, problem) -> None:
    request = {"run": "r1", "manifest": manifest, "weights:bundle": {"a": np.zeros(2)}}
    assert any(problem in p for p in wire.check_request("query.model_bundle", request))
    request["manifest"] = '{"format": "fedmets-model-1"}'
    assert wire.check_request("query.model_bundle", request) == []
    logged = wire.describe_request("query.model_bundle", request)["manifest"]
    assert set(logged) == {"chars", "sha256"}  # the audit logs its size and hash, not its text


@pytest.mark.parametrize(
    ("request_", "problem"),
    [
        (
            {"run": "r1", "fold": 0, "seed": 3},
            "seed: not a declared request field of query.moments",
        ),
        ({"run": "../etc", "fold": 0}, "run: must be 1-64 letters"),
        ({"run": "r1", "fold": 1.5}, "fold: must be an integer, got 1.5"),
        ({"run": "r1", "fold": 99}, "fold: must be <= 63, got 99"),
        ({"run": "r1", "fold": True}, "fold: must be an integer, got True"),
    ],
)
def test_requests_are_checked_against_their_declaration(request_, problem) -> None:
    assert any(problem in p for p in wire.check_request("query.moments", request_))


def test_request_types_of_every_kind() -> None:
    good = {
        "run": "r1",
        "fold": 0,
        "radiomics_columns": np.array([0, 3]),
        "radiomics_mean": np.zeros(4),
        "radiomics_scale": np.ones(4),
        "deep_projection": np.ones((4, 2)),
        "hidden": np.array([16, 8]),
        "dropout": 0.3,
        "epochs": 2,
        "lr": 1e-3,
        "batch": 16,
        "dp_mode": "off",
        "secure_sums": ["train_loss_sum:none/clinical"],
        "weights:none/clinical": {"w": np.ones(3, dtype=np.float32)},
    }
    assert wire.check_request("train.fusion", good) == []
    bad = {
        "radiomics_columns": np.array([-1]),
        "radiomics_mean": np.array([np.nan]),
        "deep_projection": np.ones(3),
        "hidden": np.array([0]),
        "dropout": 1.0,
        "dp_mode": "none",
        "secure_sums": ["not_a_field"],
        "weights:none/clinical": {"w": np.array([np.inf])},
    }
    problems = wire.check_request("train.fusion", {**good, **bad})
    assert len(problems) == len(bad), problems
    assert all(any(p.startswith(f"{key}: ") for p in problems) for key in bad)
    scores = {"run": "r1", "fold": 0, "bins": 100, "fusion": "late"}
    scores["models"] = ["none/clinical", "swin3d/deep+radiomics+clinical"]
    assert wire.check_request("query.train_scores", scores) == []
    for models in (["swin3d/deep+genomics"], ["none/clinical;rm"], "none/clinical"):
        problems = wire.check_request("query.train_scores", {**scores, "models": models})
        assert [p.split(":")[0] for p in problems] == ["models"], problems


def _evaluation_reply() -> dict:
    """An honest site's evaluation reply for one model: 10 bins, 12 patients."""
    pos, neg = np.zeros(10, dtype=np.int64), np.zeros(10, dtype=np.int64)
    pos[7], neg[2] = 5, 7
    return {
        "n": 12,
        "hist_pos:m": pos,
        "hist_neg:m": neg,
        "confusion:m": np.array([5, 0, 7, 0]),
        "brier_sum:m": 1.25,
    }


@pytest.mark.parametrize(
    ("change", "problem"),
    [
        ({"hist_neg:m": np.array([-1] + [0] * 9)}, "hist_neg:m: negative counts"),
        ({"hist_pos:m": np.zeros(9, dtype=np.int64)}, "hist_pos:m: 9 bins, the request's 10"),
        ({"confusion:m": np.array([5, 0, 7])}, "confusion:m: 3 counts, not (TP, FN, TN, FP)"),
        ({"confusion:m": np.array([5, 0, 70, 0])}, "confusion:m: 75 patients, its histograms 12"),
        ({"brier_sum:m": -1.0}, "brier_sum:m: a negative sum of losses"),
        ({"brier_sum:m": float("nan")}, wire.NOT_FINITE),
        ({"brier_sum:m": None}, "brier_sum:m: missing beside the model's other fields"),
        ({"n": "12"}, "n: not a count of patients: '12'"),
        ({"note": 3}, "note: not a declared reply field of query.evaluation"),
    ],
)
def test_the_centre_refuses_a_reply_no_honest_site_sends(change, problem) -> None:
    """``received_problems``: what the centre checks of every reply before it reads it."""
    request = {"bins": 10}
    assert wire.received_problems("query.evaluation", _evaluation_reply(), request, 5) == []
    reply = {k: v for k, v in (_evaluation_reply() | change).items() if v is not None}
    assert problem in wire.received_problems("query.evaluation", reply, request, 5)
