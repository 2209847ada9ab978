"""The protocol's checkpoints hold no pickle: values round-trip through JSON + npz (FedAdam's
moments and ComBat's corrections included), an unknown type is refused when saving, a damaged
file or a resume under a changed config is refused with a message naming it; a second run in
a results folder is refused while the first lives."""

from __future__ import annotations

import signal
import subprocess
import sys
import zipfile

import numpy as np
import pytest
import tomli_w
from flwr.app import Context, RecordDict
from test_protocol import _cfg

from fedmets.server.aggregation import Aggregator
from fedmets.server.checkpoints import CheckpointError, load_checkpoint, save_checkpoint
from fedmets.server.protocol import FederatedProtocol
from fedmets.server.server_app import RUN_LOCK, main
from fedmets.shared.config import FederationConfig
from fedmets.shared.files import InUse, sole_user
from fedmets.shared.harmonisation import BatchAdjustment


def _state(rng, shift: float = 0.0) -> dict[str, np.ndarray]:
    return {
        "w": rng.normal(size=(3, 2)).astype(np.float32) + shift,
        "b": rng.normal(size=2) + shift,
        "steps": np.array(4, dtype=np.int64),
    }


def test_a_value_round_trips_with_its_types(tmp_path) -> None:
    rng = np.random.default_rng(0)
    value = {
        "curves": {"m": {"val_loss": [0.5, float("nan")], "val_auc": [None, 0.7]}},
        "best": (np.float32(0.25), _state(rng), 3),
        7: "an int key",
        ("a", 2): [True, "text", -1],
        "standardise": {"radiomics_columns": ["original_firstorder_Mean"]},
    }
    save_checkpoint(tmp_path / "step.npz", value)
    loaded = load_checkpoint(tmp_path / "step.npz")
    assert loaded.keys() == value.keys()
    assert loaded[7] == "an int key" and loaded[("a", 2)] == [True, "text", -1]
    assert np.isnan(loaded["curves"]["m"]["val_loss"][1])
    assert loaded["curves"]["m"]["val_auc"] == [None, 0.7]
    best = loaded["best"]
    assert isinstance(best, tuple) and best[2] == 3
    assert type(best[0]) is np.float32 and best[0] == np.float32(0.25)
    for name, array in value["best"][1].items():
        assert best[1][name].dtype == array.dtype
        np.testing.assert_array_equal(best[1][name], array)
    with np.load(tmp_path / "step.npz", allow_pickle=False) as data:  # nothing pickled inside
        assert "__tree__" in data.files


def test_fedadam_resumes_with_its_moments(tmp_path) -> None:
    rng = np.random.default_rng(1)
    start = _state(rng)
    running = Aggregator("fedadam", server_lr=0.05)
    current = running.step(start, [_state(rng, 0.1), _state(rng, -0.2)], [3, 5])
    save_checkpoint(tmp_path / "rounds.npz", {"aggregator": running, "current": current})
    saved = load_checkpoint(tmp_path / "rounds.npz")
    updates = [_state(rng, 0.3), _state(rng)]
    expected = running.step(current, updates, [3, 5])
    resumed = saved["aggregator"].step(saved["current"], updates, [3, 5])
    for name in expected:  # the same next state: the moments came back, not a fresh Adam
        np.testing.assert_array_equal(resumed[name], expected[name])
    fresh = Aggregator("fedadam", server_lr=0.05).step(current, updates, [3, 5])
    assert not np.array_equal(fresh["w"], expected["w"])


def test_combat_corrections_round_trip(tmp_path) -> None:
    rng = np.random.default_rng(2)
    adjustment = BatchAdjustment(
        *(rng.normal(size=(4,)) for _ in range(2)),
        rng.normal(size=4),
        rng.normal(size=(2, 4)),
        rng.random(4) + 0.5,
    )
    save_checkpoint(tmp_path / "selection.npz", {"site_a": adjustment})
    loaded = load_checkpoint(tmp_path / "selection.npz")["site_a"]
    assert isinstance(loaded, BatchAdjustment)
    for name, array in adjustment.arrays().items():
        np.testing.assert_array_equal(loaded.arrays()[name], array)


def test_what_a_checkpoint_cannot_hold_is_refused(tmp_path) -> None:
    with pytest.raises(TypeError, match="cannot hold a set"):
        save_checkpoint(tmp_path / "x.npz", {"columns": {1, 2}})
    with pytest.raises(TypeError, match="no object arrays"):
        save_checkpoint(tmp_path / "x.npz", np.array([{"a": 1}], dtype=object))
    assert not list(tmp_path.iterdir())  # nothing half-written


def test_a_damaged_checkpoint_is_named(tmp_path) -> None:
    path = tmp_path / "fold0-image.npz"
    save_checkpoint(path, {"value": [np.zeros(1000)], "dropouts": []})
    path.write_bytes(path.read_bytes()[:500])  # truncated
    with pytest.raises(CheckpointError, match=r"fold0-image\.npz is unreadable.*without resuming"):
        load_checkpoint(path)
    with zipfile.ZipFile(path, "w") as archive:  # a valid archive with a forged tree
        archive.writestr("__tree__.npy", b"not an array")
    with pytest.raises(CheckpointError, match="fold0-image.npz is unreadable"):
        load_checkpoint(path)


def test_resuming_under_a_changed_config_names_the_change(tmp_path) -> None:
    def config(folds: int, seed: int) -> FederationConfig:
        return FederationConfig.model_validate(
            {"run": {"name": "resume", "seed": seed}, "cv": {"folds": folds}}
        )

    FederatedProtocol(None, config(3, 1), "r", checkpoints=tmp_path)
    FederatedProtocol(None, config(3, 1), "r", checkpoints=tmp_path)  # the same: resumes
    with pytest.raises(CheckpointError, match=r"changed since.*\(cv\.folds, run\.seed\)"):
        FederatedProtocol(None, config(5, 2), "r", checkpoints=tmp_path)


HOLD = """import sys, time
from pathlib import Path
from fedmets.shared.files import sole_user
with sole_user(Path(sys.argv[1]), "run 7 (process in the test)"):
    print("held", flush=True)
    time.sleep(120)
"""


def test_a_second_run_in_a_results_folder_is_refused_while_the_first_lives(tmp_path) -> None:
    """Ending ``flwr run`` leaves its run going at the SuperLink: a resume started then must not
    write the same checkpoints beside it."""
    out = tmp_path / "out"
    first = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(out / RUN_LOCK)], stdout=subprocess.PIPE, text=True
    )
    try:
        assert first.stdout.readline() == "held\n"
        fed = tmp_path / "federation.toml"
        fed.write_text(tomli_w.dumps(_cfg().model_dump(mode="json", exclude_none=True)))
        run_config = {"federation-config": str(fed), "out": str(out), "resume": "true"}
        context = Context(
            run_id=8, node_id=0, node_config={}, state=RecordDict(), run_config=run_config
        )
        with pytest.raises(InUse, match="run 7"):
            main(None, context)  # refused before it reaches the grid
        said = (out / "server.log").read_text()
        assert f"run 8 refused: {out} is in use by run 7 (process in the test)" in said
        assert "flwr stop" in said and not (out / "checkpoints").exists()
    finally:
        first.send_signal(signal.SIGKILL)  # however the first run ends, the folder is free
        first.wait()
    with sole_user(out / RUN_LOCK, "run 9"):
        assert (out / f".{RUN_LOCK}.lock").read_text() == "run 9"
