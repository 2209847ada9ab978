"""A ``fedmets.server.protocol.SiteLink`` that calls site workers in this process: the centralised
(all sites pooled into one worker) and local-only (one site alone) baselines run the federated
protocol's very code without a network. Requests and replies still pass ``fedmets.shared.wire``'s
encoding and the site's release gate.

It cannot run SecAgg+ (``secure_aggregation = False``): Flower's SecAgg+ needs a Flower Grid and
SuperNodes; with ``[strategy] secure_aggregation`` the protocol says so and aggregates in clear
(the baselines it serves have one site each: there is no sum to hide a site in).

:class:`FoldPool` runs cross-validation folds at once, each in a spawned process with its own
worker over the same site configs: the site's state (folds, held-out scores, released patient
sets) is on disk, so the folds share it as requests from one protocol would. Each process
gets its share of the CPU cores and, on a GPU, of the image trainings' memory budget
(``fedmets.client.memory`` fits each training in its share).
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait
from pathlib import Path
from typing import Any

import torch

from fedmets.client.release import answer
from fedmets.client.site_worker import SiteWorker
from fedmets.server.protocol import CensusTaken, FederatedProtocol, FoldRunner, ProtocolError
from fedmets.shared import wire
from fedmets.shared.config import FederationConfig, SiteConfig


class InProcessLink:
    """Site id -> worker; every request is encoded and decoded as on the wire."""

    secure_aggregation = False

    def __init__(self, workers: Mapping[str, SiteWorker]) -> None:
        self.workers = dict(workers)

    def sites(self) -> list[str]:
        return sorted(self.workers)

    def rename(self, names: Mapping[str, str]) -> None:
        self.workers = {names.get(k, k): w for k, w in self.workers.items()}

    def refuse(self, key: str) -> None:
        del self.workers[key]

    def ask(self, route: str, requests: Mapping[str, dict[str, Any]]) -> dict[str, dict]:
        replies = {}
        for site, request in requests.items():
            sent = wire.from_records(wire.to_records(route, request, reply=False))
            reply = answer(self.workers[site], route, sent)
            replies[site] = wire.from_records(wire.to_records(route, reply, reply=True))
        return replies

    def ask_batch(
        self, items: Mapping[str, Sequence[tuple[str, dict[str, Any]]]]
    ) -> dict[str, list[dict | None]]:
        """Each site's items in turn, each way encoded as one batch message."""
        replies = {}
        for site, batch in items.items():
            sent = wire.from_batch(wire.to_batch(batch, reply=False))
            answered = [
                (route, answer(self.workers[site], route, request)) for route, request in sent
            ]
            back = wire.from_batch(wire.to_batch(answered, reply=True))
            replies[site] = [reply for _, reply in back]
        return replies


def one_site_config(fed: FederationConfig) -> FederationConfig:
    """``fed`` for one in-process site (min_sites 1, no secure aggregation: one site's "sum" is
    its own update, and the in-process link aggregates in clear; no final model: the
    baselines and the study compare cross-validated results)."""
    data = fed.model_dump(mode="json")
    data["federation"]["min_sites"] = 1
    data["strategy"]["secure_aggregation"] = False
    data["stages"]["final_model"] = False
    return FederationConfig.model_validate(data)


class FoldPool:
    """``processes`` spawned fold processes shared by protocol runs (the study's backbones),
    each with ``cores // processes`` torch threads and, on a GPU, ``share_bytes`` of GPU
    memory for its image trainings (``fedmets.client.memory.lane_budget_bytes``; None: the
    site's own budget); their
    progress lines, each led by its run and fold, go to ``log``. Use it as a context manager;
    :meth:`runner` gives each run its ``FoldRunner``."""

    def __init__(
        self,
        processes: int,
        share_bytes: int | None = None,
        log: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.processes, self.log, self.share = processes, log, share_bytes
        spawn = multiprocessing.get_context("spawn")
        self.progress = spawn.Queue()
        self.pool = ProcessPoolExecutor(
            processes,
            mp_context=spawn,
            initializer=_start_fold_process,
            initargs=(max(1, (os.cpu_count() or 1) // processes), self.progress),
        )

    def __enter__(self) -> FoldPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.pool.shutdown(cancel_futures=True)

    def describe(self) -> str:
        """``5 folds at once, 4.8 GiB of GPU memory each``."""
        shown = "" if self.share is None else f", {self.share / 2**30:.1f} GiB of GPU memory each"
        return f"{self.processes} folds at once{shown}"

    def runner(
        self,
        worker: SiteWorker,
        cfg: FederationConfig,
        run: str,
        checkpoints: Path,
        privacy_dir: Path,
        log: Callable[[str], None],
    ) -> FoldRunner:
        """The ``fedmets.server.protocol.FoldRunner`` of run ``run`` of ``cfg`` over ``worker``
        (its folds into ``checkpoints``); ``log`` hears when each fold is done."""
        settings = cfg.model_dump(mode="json")

        def run_folds(folds: Sequence[int], taken: CensusTaken) -> dict[int, dict]:
            del taken  # each fold process asks its own: a fresh worker, in process (no message)
            pending = {
                self.pool.submit(
                    _run_fold,
                    (worker.configs, worker.state_root, worker.ledger_root),
                    settings,
                    run,
                    checkpoints,
                    privacy_dir,
                    fold,
                    self.share,
                ): fold
                for fold in folds
            }
            done: dict[int, dict] = {}
            while pending:
                finished, _ = wait(pending, timeout=1.0, return_when=FIRST_COMPLETED)
                drain_progress(self.progress, self.log)
                for job in finished:
                    fold = pending.pop(job)
                    try:
                        done |= job.result()
                    except (ProtocolError, ValueError) as error:
                        raise ProtocolError(f"fold {fold + 1}: {error}") from error
                    drain_progress(self.progress, self.log)
                    log(f"fold {fold + 1}: done in {done[fold]['seconds']:.0f} s")
            return done

        return run_folds


def drain_progress(progress: Any, log: Callable[[str], None]) -> None:
    """Pass the log lines waiting in the worker processes' ``progress`` queue to ``log``."""
    while not progress.empty():
        log(progress.get())


_PROGRESS: Any = None
"""In a fold process: the queue its log lines go to."""


def _start_fold_process(threads: int, progress: Any) -> None:
    global _PROGRESS
    torch.set_num_threads(threads)
    _PROGRESS = progress


def _run_fold(
    site: tuple[list[SiteConfig], Path, Path],
    settings: dict,
    run: str,
    checkpoints: Path,
    privacy_dir: Path,
    fold: int,
    memory_bytes: int | None,
) -> dict[int, dict]:
    """One fold in a fold process (:meth:`FederatedProtocol.run_folds`) over a worker of
    ``site`` (its configs, state and ledger folders: the parent's worker, read again from
    disk); its log lines, led by ``[run fold k]``, go to the parent's log."""
    configs, state_root, ledger_root = site
    worker = SiteWorker(configs, state_root=state_root, ledger_root=ledger_root)
    worker.gpu_memory_bytes = memory_bytes
    protocol = FederatedProtocol(
        InProcessLink({worker.site_id: worker}),
        FederationConfig.model_validate(settings),
        run,
        lambda message: _PROGRESS.put(f"[{run} fold {fold + 1}] {message.strip()}"),
        checkpoints=checkpoints,
        privacy_dir=privacy_dir,
    )
    return protocol.run_folds([fold])


def run_in_process(
    worker: SiteWorker,
    fed: FederationConfig,
    run: str,
    state: Path,
    log: Callable[[str], None] | None = None,
    folds: FoldPool | None = None,
) -> dict:
    """The federated protocol of ``fed`` (as :func:`one_site_config`) over ``worker`` alone:
    the centralised study and baseline (every site pooled in one worker, each patient keeping
    its site's fold) and the local-only baselines (one site). The server's privacy ledger goes
    to ``state/server-privacy``. ``folds``: the folds run at once in that pool, handing over
    through ``state/checkpoints/<run>`` (emptied first; ``[dp] mode = "off"`` only). Returns
    the protocol's result (``FederatedProtocol.run_all``)."""
    cfg = one_site_config(fed)
    say = log or (lambda message: None)
    privacy_dir = Path(state) / "server-privacy"
    checkpoints = runner = None
    if folds is not None:
        checkpoints = Path(state) / "checkpoints" / run
        shutil.rmtree(checkpoints, ignore_errors=True)
        runner = folds.runner(worker, cfg, run, checkpoints, privacy_dir, say)
    protocol = FederatedProtocol(
        InProcessLink({worker.site_id: worker}),
        cfg,
        run,
        log,
        checkpoints=checkpoints,
        privacy_dir=privacy_dir,
        fold_runner=runner,
    )
    return protocol.run_all()
