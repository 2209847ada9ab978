"""fedmets.server.aggregation: FedAvg is the weighted mean; FedAdam steps towards it; index buffers
stay as they are."""

from __future__ import annotations

import numpy as np
import pytest

from fedmets.server.aggregation import Aggregator, weighted_average


def test_weighted_average_weights_by_patients_and_keeps_integer_buffers() -> None:
    a = {"w": np.array([0.0, 2.0], np.float32), "index": np.array([1, 2])}
    b = {"w": np.array([3.0, 5.0], np.float32), "index": np.array([9, 9])}
    out = weighted_average([a, b], [1, 2])
    np.testing.assert_allclose(out["w"], [2.0, 4.0])
    assert out["w"].dtype == np.float32
    np.testing.assert_array_equal(out["index"], [1, 2])
    with pytest.raises(ValueError):
        weighted_average([a], [0])


def test_fedavg_and_fedprox_return_the_average() -> None:
    states = [{"w": np.array([1.0])}, {"w": np.array([3.0])}]
    for name in ("fedavg", "fedprox"):
        out = Aggregator(name).step({"w": np.array([0.0])}, states, [1, 1])
        np.testing.assert_allclose(out["w"], [2.0])


def test_fedadam_moves_each_parameter_towards_the_average_by_about_the_server_lr() -> None:
    aggregator = Aggregator("fedadam", server_lr=0.1)
    global_state = {"w": np.array([0.0, 0.0]), "index": np.array([4])}
    states = [{"w": np.array([1.0, -1.0]), "index": np.array([4])}]
    out = aggregator.step(global_state, states, [10])
    np.testing.assert_allclose(out["w"], [0.1, -0.1], atol=1e-3)  # Adam's first step: lr * sign
    second = aggregator.step(out, states, [10])
    assert 0.1 < second["w"][0] < 0.25 and second["w"][1] < -0.1
    np.testing.assert_array_equal(second["index"], [4])
    with pytest.raises(ValueError, match="unknown strategy"):
        Aggregator("fedsgd")
