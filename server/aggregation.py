"""Server-side aggregation of model weights: FedAvg (and FedProx, whose proximal term acts at
the sites) and FedAdam (Reddi et al., 2021: Adam on the pseudo-gradient).

States are ``{parameter name: numpy array}`` as ``fedmets.client.training.get_state`` returns them.
Integer entries (index buffers such as Swin's relative position index) are not averaged: the
global value is kept.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np
import torch

State = Mapping[str, np.ndarray]


def weighted_average(states: Sequence[State], weights: Sequence[float]) -> dict[str, np.ndarray]:
    """Per-parameter average of ``states`` weighted by ``weights`` (e.g. training patients per
    site); integer entries are taken from the first state."""
    if not states or len(states) != len(weights) or sum(weights) <= 0:
        raise ValueError(f"need states and positive weights, got {len(states)}, {list(weights)}")
    w = np.asarray(weights, dtype=np.float64) / float(sum(weights))
    out = {}
    for name, first in states[0].items():
        if first.dtype.kind != "f":
            out[name] = first.copy()
            continue
        stacked = np.stack([np.asarray(s[name], dtype=np.float64) for s in states])
        out[name] = np.tensordot(w, stacked, axes=1).astype(first.dtype)
    return out


class Aggregator:
    """Turns the global state and the sites' updated states into the next global state.

    ``strategy``: "fedavg" / "fedprox" (weighted average) or "fedadam" (torch's Adam with
    ``server_lr``, betas (0.9, 0.99), eps 1e-3 as tau, on the pseudo-gradient
    ``global - average``; its moments persist across rounds of one model)."""

    def __init__(self, strategy: str, server_lr: float = 0.01) -> None:
        if strategy not in ("fedavg", "fedprox", "fedadam"):
            raise ValueError(f"unknown strategy {strategy!r}")
        self.strategy = strategy
        self.server_lr = server_lr
        self._params: dict[str, torch.Tensor] = {}
        self._optimiser: torch.optim.Optimizer | None = None

    def step(
        self, global_state: State, states: Sequence[State], weights: Sequence[float]
    ) -> dict[str, np.ndarray]:
        """The next global state."""
        average = weighted_average(states, weights)
        if self.strategy != "fedadam":
            return average
        if self._optimiser is None:
            self._start({k: v for k, v in global_state.items() if v.dtype.kind == "f"})
        for name, param in self._params.items():
            with torch.no_grad():
                param.copy_(torch.from_numpy(np.asarray(global_state[name], dtype=np.float64)))
            param.grad = param.detach() - torch.from_numpy(average[name].astype(np.float64))
        self._optimiser.step()
        out = dict(average)
        for name, param in self._params.items():
            out[name] = param.detach().numpy().astype(global_state[name].dtype)
        return out

    def _start(self, params: State) -> None:
        """FedAdam's float64 parameters (from ``params``) and its Adam optimiser."""
        self._params = {
            k: torch.tensor(np.asarray(v), dtype=torch.float64, requires_grad=True)
            for k, v in params.items()
        }
        self._optimiser = torch.optim.Adam(
            self._params.values(), lr=self.server_lr, betas=(0.9, 0.99), eps=1e-3
        )

    def to_checkpoint(self) -> dict:
        """Its settings and, under FedAdam, the parameters and Adam's moments, as plain values
        and arrays (``fedmets.server.checkpoints``)."""
        moments = {}
        if self._optimiser is not None:
            for name, param in self._params.items():
                state = self._optimiser.state[param]
                moments[name] = {k: v.detach().numpy().copy() for k, v in state.items()}
        return {
            "strategy": self.strategy,
            "server_lr": self.server_lr,
            "params": {k: p.detach().numpy().copy() for k, p in self._params.items()},
            "moments": moments,
        }

    @classmethod
    def from_checkpoint(cls, saved: dict) -> Aggregator:
        """The aggregator :meth:`to_checkpoint` saved, moments included."""
        aggregator = cls(saved["strategy"], saved["server_lr"])
        if saved["params"]:
            aggregator._start(saved["params"])
            for name, state in saved["moments"].items():
                aggregator._optimiser.state[aggregator._params[name]] = {
                    k: torch.tensor(v) for k, v in state.items()
                }
        return aggregator
