"""SecAgg+ (Flower's legacy path, simulation engine): the securely aggregated parameters equal
plain FedAvg within the quantisation error, and a site dropping out mid-round does not stop
the round."""

from __future__ import annotations

import numpy as np
import pytest

from server.secagg import fedavg, run_demo, site_parameters

pytestmark = pytest.mark.slow


def test_expected_fedavg_is_weighted():
    params = [site_parameters(s)[0][0].astype(np.float64) for s in range(2)]
    assert np.allclose(fedavg([0, 1])[0], (10 * params[0] + 20 * params[1]) / 30)


def test_secagg_plus_equals_fedavg(tmp_path):
    result = run_demo(4, tmp_path / "aggregate.json")
    assert result["results"] == 4 and result["failures"] == 0
    assert result["max_error"] < 2e-4


def test_secagg_plus_survives_a_dropped_site(tmp_path):
    result = run_demo(4, tmp_path / "aggregate.json", drop=[3])
    assert result["results"] == 3 and result["failures"] >= 1
    # the average of the three sites that answered, the dropped site's mask removed
    assert result["max_error"] < 2e-4
