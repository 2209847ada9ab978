"""A site's lanes: the requests of one batch message (the folds a centre runs at once,
``fedmets.shared.wire.to_batch``) answered up to the site's ``[compute] parallel_folds`` at
once, each in a spawned process with a ``SiteService`` of its own over the same site.

Each item passes the site's gate as if it had come alone. The records that a site's processes
share on disk take turns under file locks (``fedmets.shared.files.exclusive``): the released
patient sets, the privacy ledger, the fold seeds and the audit log; the first process to need
the image inputs makes them, and the others wait for it. Each lane gets ``cores // lanes`` torch
threads and, on a GPU, ``1 / lanes`` of the site's GPU memory budget, which the memory-aware
training fits (``fedmets.client.memory``).
"""

from __future__ import annotations

import multiprocessing
import os
from collections.abc import Sequence
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:
    from fedmets.client.site_service import SiteService

Item = tuple[str, dict[str, Any]]
"""A batch item: (route, request payload)."""


class SiteLanes:
    """``lanes`` spawned processes, each serving the site of ``config_path`` (``served``: as
    ``fedmets site serve`` does, approvals required) with ``memory_bytes`` of GPU memory
    each (``fedmets.client.memory.lane_budget_bytes``; None: the site's own budget). Close it
    with :meth:`close`."""

    def __init__(
        self, config_path: Path, served: bool, lanes: int, memory_bytes: int | None
    ) -> None:
        self.lanes = lanes
        self.broken = False
        threads = max(1, (os.cpu_count() or 1) // lanes)
        self.pool = ProcessPoolExecutor(
            lanes,
            mp_context=multiprocessing.get_context("spawn"),
            initializer=_start_lane,
            initargs=(str(config_path), served, threads, memory_bytes),
        )

    def answer(self, items: Sequence[Item], app: str | None) -> list[dict[str, Any] | str]:
        """Each item's gated reply, or the text of its refusal (or failure), in order;
        RuntimeError when a lane process died (the lanes are then :attr:`broken`)."""
        try:
            jobs = [self.pool.submit(_answer_in_lane, route, req, app) for route, req in items]
            return [job.result() for job in jobs]
        except BrokenProcessPool as error:
            self.broken = True
            raise RuntimeError(
                f"a lane process of the site died ({error}): out of memory? Lower [compute] "
                "parallel_folds or gpu_memory_gib"
            ) from None

    def close(self) -> None:
        self.pool.shutdown(cancel_futures=True)


_SERVICE: SiteService | None = None
"""In a lane process: the site's service."""


def _start_lane(config_path: str, served: bool, threads: int, memory_bytes: int | None) -> None:
    from fedmets.client.site_service import SiteService

    global _SERVICE
    torch.set_num_threads(threads)
    _SERVICE = SiteService(Path(config_path), served=served)
    _SERVICE.gpu_memory_bytes = memory_bytes


def _answer_in_lane(route: str, request: dict[str, Any], app: str | None) -> dict[str, Any] | str:
    assert _SERVICE is not None
    return _SERVICE.answer_item(route, request, app)
