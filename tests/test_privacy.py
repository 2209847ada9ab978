"""Differential privacy: the ledger's accounting, budget refusal, persistence across processes,
DP-SGD training of a fusion network, the server's client-level clipping and noise, the report."""

from __future__ import annotations

import json
import math
import multiprocessing

import numpy as np
import pytest
import torch
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping
from flwr.supercore.differential_privacy import compute_stdv
from opacus.accountants import RDPAccountant
from opacus.accountants.utils import get_noise_multiplier

from fedmets.client.privacy import (
    ROUTE_STAGES,
    ledger_reply,
    plan_site_noise,
    record_release,
    site_ledger,
    strip_module_prefix,
    train_private,
)
from fedmets.client.site_worker import NOT_ABOUT_PATIENTS
from fedmets.server.privacy import (
    ClientLevelDP,
    privacy_report,
    summary_from_reply,
)
from fedmets.server.protocol import FederatedProtocol
from fedmets.shared import wire
from fedmets.shared.config import FederationConfig
from fedmets.shared.image_models import build_image_model
from fedmets.shared.image_presets import DP_SGD_BACKBONES, ImageModelConfig
from fedmets.shared.models import FusionNet
from fedmets.shared.privacy import (
    PrivacyBudgetExceeded,
    PrivacyLedger,
    epsilon_of,
    plan_noise_multiplier,
    sample_rate_for,
    steps_per_epoch,
)
from fedmets.simulation.in_process import InProcessLink


def _opacus_epsilon(history: list[tuple[float, float, int]], delta: float) -> float:
    accountant = RDPAccountant()
    for z, q, steps in history:
        for _ in range(steps):
            accountant.step(noise_multiplier=z, sample_rate=q)
    return accountant.get_epsilon(delta=delta)


def _data(n: int = 80, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 7)).astype(np.float32)
    y = (X[:, 0] + 0.5 * rng.normal(size=n) > 0.8).astype(np.float32)
    return X, y


def _net(seed: int = 0) -> FusionNet:
    torch.manual_seed(seed)
    return FusionNet({"radiomics": 5, "clinical": 2}, hidden=[8], dropout=0.1)


# ---- the ledger --------------------------------------------------------------------------------


def test_ledger_epsilon_equals_opacus_accountant(tmp_path):
    ledger = PrivacyLedger(tmp_path, "hospital_a", delta=1e-5)
    entry = ledger.record(
        stage="fusion",
        mechanism="dp-sgd",
        noise_multiplier=1.1,
        sample_rate=0.05,
        steps=200,
        max_grad_norm=1.0,
        fold=0,
        round=1,
    )
    expected = _opacus_epsilon([(1.1, 0.05, 200)], 1e-5)
    assert entry["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert ledger.epsilon() == pytest.approx(expected, rel=1e-9)
    assert expected == pytest.approx(4.443, abs=1e-3)  # pinned: Opacus 1.6's RDP value
    # a second, different release composes as the accountant's history does
    ledger.record(
        stage="image",
        mechanism="dp-sgd",
        noise_multiplier=2.0,
        sample_rate=0.1,
        steps=50,
        max_grad_norm=1.0,
    )
    both = _opacus_epsilon([(1.1, 0.05, 200), (2.0, 0.1, 50)], 1e-5)
    assert ledger.epsilon() == pytest.approx(both, rel=1e-9)
    assert ledger.epsilon(stage="fusion") == pytest.approx(expected, rel=1e-9)
    stored = json.loads(ledger.path.read_text())
    assert stored["who"] == "hospital_a" and stored["delta"] == 1e-5
    assert [e["mechanism"] for e in stored["entries"]] == ["dp-sgd", "dp-sgd"]
    for key in ("stage", "noise_multiplier", "sample_rate", "steps", "max_grad_norm", "epsilon"):
        assert key in stored["entries"][0]


def test_epsilon_of_edge_cases():
    assert epsilon_of([], 1e-5) == 0.0
    assert epsilon_of([(0.0, 0.1, 10)], 1e-5) == math.inf
    assert steps_per_epoch(100, 32) == 4 and sample_rate_for(100, 32) == 0.25


def test_noise_multiplier_for_a_target(tmp_path):
    z = plan_noise_multiplier(3.0, 1e-5, 0.05, 400)
    assert z == pytest.approx(
        get_noise_multiplier(target_epsilon=3.0, target_delta=1e-5, sample_rate=0.05, steps=400)
    )
    assert 2.95 < epsilon_of([(z, 0.05, 400)], 1e-5) <= 3.0
    # after some spending, the rest of the plan gets more noise and still ends at the target
    spent = [(1.5, 0.05, 100)]
    z_rest = plan_noise_multiplier(3.0, 1e-5, 0.05, 300, spent=spent)
    assert 2.9 < epsilon_of([*spent, (z_rest, 0.05, 300)], 1e-5) <= 3.0
    with pytest.raises(ValueError, match="already spent"):
        plan_noise_multiplier(0.1, 1e-5, 0.05, 10, spent=spent)
    ledger = site_ledger(tmp_path, "hospital_b", 1e-5, 3.0)
    z_site = plan_site_noise(3.0, 1e-5, 100, 20, epochs_per_release=2, releases=10, ledger=ledger)
    assert epsilon_of([(z_site, 0.2, 100)], 1e-5) <= 3.0


def test_ledger_persists_across_objects(tmp_path):
    X, y = _data()
    epsilons = []
    for call in range(2):  # a new ledger object per call: the site's process restarts
        ledger = site_ledger(tmp_path, "hospital_a", 1e-5, budget=50.0)
        history = train_private(
            _net(),
            (X, y),
            epochs=1,
            lr=1e-2,
            batch_size=16,
            pos_weight=2.0,
            seed=call,
            noise_multiplier=1.0,
            max_grad_norm=1.0,
            ledger=ledger,
            fold=0,
            round=call + 1,
        )
        epsilons.append(history["epsilon"])
    q, steps = sample_rate_for(80, 16), steps_per_epoch(80, 16)
    assert epsilons[0] == pytest.approx(_opacus_epsilon([(1.0, q, steps)], 1e-5))
    assert epsilons[1] == pytest.approx(_opacus_epsilon([(1.0, q, 2 * steps)], 1e-5))
    assert epsilons[1] > epsilons[0]
    reread = site_ledger(tmp_path, "hospital_a", 1e-5, budget=50.0)
    assert len(reread.entries) == 2 and reread.epsilon() == pytest.approx(epsilons[1])
    with pytest.raises(ValueError, match="ledger of 'hospital_a'"):
        site_ledger(tmp_path, "hospital_b", 1e-5, None)
    with pytest.raises(ValueError, match="delta"):
        site_ledger(tmp_path, "hospital_a", 1e-6, None)


def test_budget_refusal_trains_nothing(tmp_path):
    X, y = _data()
    ledger = site_ledger(tmp_path, "hospital_c", 1e-5, budget=1.0)
    net = _net()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(PrivacyBudgetExceeded) as refused:
        train_private(
            net,
            (X, y),
            epochs=5,
            lr=1e-2,
            batch_size=16,
            pos_weight=2.0,
            seed=0,
            noise_multiplier=0.5,
            max_grad_norm=1.0,
            ledger=ledger,
        )
    message = str(refused.value)
    assert "hospital_c" in message and "budget is 1.000" in message
    assert "spent so far 0.000" in message and refused.value.planned > 1.0
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert ledger.entries == [] and not ledger.path.exists()


# ---- DP-SGD ------------------------------------------------------------------------------------


def test_private_fusion_training_returns_a_plain_state(tmp_path):
    X, y = _data(96)
    net = _net()
    start = {k: v.clone() for k, v in net.state_dict().items()}
    ledger = site_ledger(tmp_path, "hospital_a", 1e-5, budget=20.0)
    history = train_private(
        net,
        (X, y),
        epochs=3,
        lr=1e-2,
        batch_size=16,
        pos_weight=3.0,
        seed=4,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
        weight_decay=1e-3,
        proximal_mu=0.1,
        ledger=ledger,
        stage="fusion",
        fold=2,
        round=3,
        run="demo",
        model_name="none/radiomics+clinical",
    )
    assert history["steps"] == 3 * steps_per_epoch(96, 16)
    assert len(history["train_loss"]) == 3 and all(np.isfinite(history["train_loss"]))
    fresh = _net(seed=1)
    fresh.load_state_dict({k: torch.from_numpy(v) for k, v in history["state"].items()})
    for key, value in net.state_dict().items():  # the plain model, trained in place, unwrapped
        assert torch.equal(fresh.state_dict()[key], value)
    assert not any(torch.equal(start[k], v) for k, v in net.state_dict().items() if "weight" in k)
    assert not any(
        hasattr(p, "grad_sample") and p.grad_sample is not None for p in net.parameters()
    )
    entry = ledger.entries[-1]
    assert entry["mechanism"] == "dp-sgd" and entry["fold"] == 2 and entry["round"] == 3
    assert entry["epsilon"] == pytest.approx(history["epsilon"])
    assert history["epsilon"] == pytest.approx(history["planned_epsilon"])
    assert strip_module_prefix({"_module.net.0.weight": 1}) == {"net.0.weight": 1}


def test_private_training_is_reproducible():
    X, y = _data(40)
    states = []
    for _ in range(2):
        history = train_private(
            _net(),
            (X, y),
            epochs=2,
            lr=1e-2,
            batch_size=4,  # sample rate 0.1: some Poisson batches are empty
            pos_weight=1.0,
            seed=9,
            noise_multiplier=1.2,
            max_grad_norm=0.5,
        )
        states.append(history["state"])
    assert all(np.array_equal(states[0][k], states[1][k]) for k in states[0])
    assert all(np.isfinite(v).all() for v in states[0].values())


@pytest.mark.parametrize("backbone", DP_SGD_BACKBONES)
def test_private_training_of_an_image_backbone(backbone):
    tiny = {
        "resnet3d": {"widths": (8, 8, 16, 16), "depths": (1, 1, 1, 1), "norm_groups": 4},
        "densenet3d": {
            "init_features": 8,
            "growth_rate": 4,
            "depths": (2, 2, 2, 2),
            "norm_groups": 4,
        },
    }[backbone]
    model = build_image_model(ImageModelConfig(backbone=backbone, crop_voxels=32, **tiny))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    rng = np.random.default_rng(0)
    X, y = rng.random((12, 2, 32, 32, 32), dtype=np.float32), np.array([0, 1] * 6)
    history = train_private(
        model,
        (X, y),
        epochs=1,
        lr=1e-3,
        batch_size=4,
        pos_weight=1.0,
        seed=0,
        noise_multiplier=1.0,
        max_grad_norm=1.0,
    )
    assert history["steps"] == 3 and np.isfinite(history["train_loss"]).all()
    assert history["epsilon"] > 0
    changed = [k for k, v in model.state_dict().items() if not torch.equal(start[k], v)]
    assert any("conv" in k or "features" in k for k in changed)


def test_swin_image_training_under_dp_sgd_is_refused_with_the_reason():
    cfg = FederationConfig.model_validate(
        {"run": {"name": "dp-swin"}, "dp": {"mode": "sample", "epsilon": 8.0}}
    )
    protocol = FederatedProtocol(InProcessLink({}), cfg, "dp-swin")
    with pytest.raises(ValueError, match="resnet3d.*densenet3d.*not 'swin3d'"):
        protocol._plan_privacy(images=True, networks=7)
    protocol._plan_privacy(images=False, networks=3)  # tabular sites: fusion-only DP is fine
    assert protocol.dp_request["dp_epsilon"] == 8.0


# ---- server-side client-level DP ---------------------------------------------------------------


def _state(rng: np.random.Generator, scale: float = 1.0) -> dict[str, np.ndarray]:
    return {
        "w": (scale * rng.normal(size=(20, 10))).astype(np.float32),
        "b": (scale * rng.normal(size=10)).astype(np.float32),
        "index": np.arange(6, dtype=np.int64),
    }


def test_client_level_noise_std_and_accounting(tmp_path):
    global_state = {"w": np.zeros((400, 250), np.float32), "index": np.arange(3)}
    sites = [{"w": np.full((400, 250), 1e-4, np.float32), "index": np.arange(3)} for _ in range(4)]
    dp = ClientLevelDP(noise_multiplier=2.0, clip=0.5, delta=1e-5, ledger_dir=tmp_path, seed=3)
    out = dp.aggregate(global_state, sites, stage="fusion", fold=0, round=1, model="m")
    noise = out["w"].astype(np.float64) - 1e-4
    assert noise.std() == pytest.approx(0.25, rel=0.02)
    assert abs(noise.mean()) < 0.01
    assert np.array_equal(out["index"], global_state["index"])
    dp.aggregate(global_state, sites, stage="fusion", fold=0, round=2, model="m")
    assert dp.epsilon == pytest.approx(_opacus_epsilon([(2.0, 1.0, 2)], 1e-5))
    # noise chosen for a target over the planned releases; the budget stops the next one
    planned = ClientLevelDP.for_target(4.0, 3, 0.5, 1e-5, tmp_path / "planned")
    for r in range(3):
        planned.aggregate(global_state, sites, stage="image", round=r)
    assert 3.9 < planned.epsilon <= 4.0
    with pytest.raises(PrivacyBudgetExceeded, match="server"):
        planned.aggregate(global_state, sites, stage="image", round=4)


def _clipped(global_state: dict, state: dict, clip: float) -> dict:
    """Reference: ``global + update * min(1, clip / ||update||)`` over the float entries."""
    keys = [k for k, v in global_state.items() if v.dtype.kind == "f"]
    update = {k: np.asarray(state[k], np.float64) - global_state[k] for k in keys}
    scale = min(1.0, clip / _norm(update))
    return {k: global_state[k] + update[k] * scale for k in keys}


def _norm(update: dict) -> float:
    return float(np.sqrt(sum((v**2).sum() for v in update.values())))


def test_client_level_aggregation_is_flowers_dp_wrapper(tmp_path):
    """The result is the wrapper's: each update clipped against the global weights, an
    equal-weight FedAvg (site sizes play no part), then N(0, z * clip / n) from the seeded
    stream in the order of the float entries; integer entries stay global; numpy's global
    generator is left alone."""
    rng = np.random.default_rng(1)
    global_state = {
        "a.weight": rng.normal(size=(6, 5)).astype(np.float32),
        "a.bias": rng.normal(size=5).astype(np.float32),
        "bn.num_batches_tracked": np.array(7),
    }
    scales = [0.01, 0.3, 2.0]  # one update inside the clip, two above it
    sites = [
        {
            k: (v + s * rng.normal(size=v.shape)).astype(v.dtype) if v.dtype.kind == "f" else v + 1
            for k, v in global_state.items()
        }
        for s in scales
    ]
    z, clip, seed = 1.5, 0.4, 11
    dp = ClientLevelDP(noise_multiplier=z, clip=clip, delta=1e-5, ledger_dir=tmp_path, seed=seed)
    assert isinstance(dp.strategy(3), DifferentialPrivacyServerSideFixedClipping)
    before = np.random.get_state()[1].copy()  # noqa: NPY002
    out = dp.aggregate(global_state, sites, stage="fusion", fold=0, round=1, model="m")
    assert np.array_equal(np.random.get_state()[1], before)  # noqa: NPY002

    noise = np.random.RandomState(seed)  # noqa: NPY002 -- the stream Flower's noise comes from
    std = compute_stdv(z, clip, len(sites))  # Flower's: z * clip / sites
    clipped = [_clipped(global_state, s, clip) for s in sites]
    norms = [_norm({k: c[k] - global_state[k] for k in c}) for c in clipped]
    assert norms[0] < clip and norms[1:] == pytest.approx([clip, clip], rel=1e-4)
    for k in ("a.weight", "a.bias"):  # float_keys order
        mean = np.mean([np.asarray(c[k], np.float64) for c in clipped], axis=0)
        expected = (mean + noise.normal(0.0, std, mean.shape)).astype(np.float32)
        assert out[k].dtype == np.float32
        assert np.allclose(out[k], expected, atol=1e-5)
    assert np.array_equal(out["bn.num_batches_tracked"], global_state["bn.num_batches_tracked"])
    # the seeded stream moves on: the next round draws fresh noise, a new object repeats it
    again = dp.aggregate(global_state, sites, stage="fusion", fold=0, round=2, model="m")
    assert not np.allclose(again["a.weight"], out["a.weight"])
    twin = ClientLevelDP(z, clip, 1e-5, tmp_path / "twin", seed=seed)
    first = twin.aggregate(global_state, sites, stage="fusion", fold=0, round=1, model="m")
    assert all(np.array_equal(first[k], out[k]) for k in out)
    assert dp.epsilon == pytest.approx(_opacus_epsilon([(z, 1.0, 2)], 1e-5))


# ---- what is not covered, the wire reply, the report -------------------------------------------


def test_every_route_about_patients_has_a_ledger_stage() -> None:
    """The ledger lists each release under its stage: no route falls back to its own name."""
    about_patients = set(wire.ROUTES) - NOT_ABOUT_PATIENTS
    assert about_patients - set(ROUTE_STAGES) == set()


def test_uncovered_releases_and_the_report(tmp_path, monkeypatch):
    ledger = site_ledger(tmp_path, "hospital_a", 1e-5, budget=8.0)
    moments = {"n": 50, "positives": 8, "radiomics_sum": np.zeros(3), "radiomics_count": np.ones(3)}
    for _ in range(2):
        record_release(ledger, "query.moments", {"run": "r", "fold": 0}, moments)
    record_release(
        ledger,
        "train.fusion",
        {"run": "r", "fold": 0, "dp_mode": "sample"},
        {"n": 50, "weights:none/radiomics": {}, "train_loss_sum:none/radiomics": 3.0},
    )
    ledger.record(
        stage="fusion",
        mechanism="dp-sgd",
        noise_multiplier=1.1,
        sample_rate=0.05,
        steps=200,
        max_grad_norm=1.0,
    )
    uncovered = [e for e in ledger.entries if not e["covered"]]
    assert len(uncovered) == 2 and uncovered[0]["times"] == 2
    assert "weights" not in uncovered[1]["release"]
    assert "train_loss_sum:*" in uncovered[1]["release"]

    reply = ledger_reply(ledger, n=178)
    assert reply["epsilon"] == pytest.approx(_opacus_epsilon([(1.1, 0.05, 200)], 1e-5))
    assert reply["uncovered:selection"] == 1 and reply["releases:fusion"] == 1
    # the proposed wire declaration of query.ledger accepts the reply
    route = wire.Route(
        "query.ledger",
        wire.ROUTES["query.ledger"].request,
        {
            "n": wire.Kind.COUNT,
            "epsilon": wire.Kind.METRIC,
            "delta": wire.Kind.METRIC,
            "budget": wire.Kind.METRIC,
            "epsilon:*": wire.Kind.METRIC,
            "releases:*": wire.Kind.COUNT,
            "uncovered:*": wire.Kind.COUNT,
        },
    )
    monkeypatch.setitem(wire.ROUTES, "query.ledger", route)
    assert wire.check_reply("query.ledger", reply, min_patients=5) == []
    decoded = wire.from_records(wire.to_records("query.ledger", reply, reply=True))
    summary = summary_from_reply(decoded)
    assert summary["epsilon"] == pytest.approx(reply["epsilon"])
    assert summary["not_covered"] == ["fusion", "selection"]

    report = privacy_report({"hospital_a": summary, "hospital_b": ledger.summary()})
    assert report["worst_site_epsilon"] == pytest.approx(reply["epsilon"])
    assert report["sites"]["hospital_b"]["not_covered"]
    assert "not_covered" in report["note"]


def _record_many(folder: str, run: str, ready) -> None:
    """In a child process: 40 uncovered releases of run ``run``, each of its own fold."""
    ledger = PrivacyLedger(folder, "site_a", 1e-5)
    ready.wait()
    for fold in range(40):
        ledger.record_uncovered(stage="moments", release="query.moments[n]", fold=fold, run=run)


def test_releases_recorded_at_once_are_all_kept(tmp_path):
    """Two processes of one site (folds run in parallel) record releases at the same time:
    each record re-reads the ledger under its lock, so no entry is overwritten."""
    fork = multiprocessing.get_context("fork")  # no re-import: quick
    ready = fork.Barrier(2)  # both children at the start line before either records
    children = [fork.Process(target=_record_many, args=(str(tmp_path), run, ready)) for run in "ab"]
    for child in children:
        child.start()
    for child in children:
        child.join(60)
        assert child.exitcode == 0
    entries = PrivacyLedger(tmp_path, "site_a", 1e-5).entries
    assert sorted((e["run"], e["fold"]) for e in entries) == [
        (run, fold) for run in "ab" for fold in range(40)
    ]
