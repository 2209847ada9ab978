"""Folds at once over a federation (``[federation] parallel_folds``): each fold runs in a
thread of its own, as a ``FederatedProtocol`` of its own (:meth:`FederatedProtocol.run_folds`),
and :class:`FoldLanes` sends the requests that the folds make at the same time to each site in
one batch message (``fedmets.shared.wire.to_batch``).

Why batches: a Flower 1.42 SuperNode handles one message at a time (it waits for a message's
reply before it pulls the next), so several folds' requests reach a site's service together
only inside one message. The site answers up to its own ``[compute] parallel_folds`` items of a
batch at once (``fedmets.client.site_lanes``), each through its gate as if sent alone.

The lanes move in step: a batch leaves when every running fold waits on a request (a fold at
the server's own work, aggregating or selecting, holds the others until it asks). A request
that only one fold makes goes as it is. The folds' results go into the run's checkpoints, which
the run then resumes (the protocol's ``fold_runner``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Protocol

from fedmets.server.protocol import (
    CensusTaken,
    FederatedProtocol,
    FoldRunner,
    Payload,
    ProtocolError,
    SiteLink,
)
from fedmets.shared.config import FederationConfig

Items = Mapping[str, Sequence[tuple[str, Payload]]]
"""Per site, the requests ``(route, request)`` of one batch message."""


class BatchLink(SiteLink, Protocol):
    """A :class:`~fedmets.server.protocol.SiteLink` that also sends batches."""

    def ask_batch(self, items: Items) -> dict[str, list[Payload | None]]:
        """Per site its requests ``(route, request)`` in one message; per site that answered,
        each item's reply, or None where the site refused or failed that item."""
        ...


class FoldLanes:
    """``lanes`` fold threads' requests gathered into batches over ``link``. Each thread asks
    through its own :meth:`view`, and calls :meth:`leave` when it has no fold left."""

    def __init__(self, link: BatchLink, lanes: int) -> None:
        self.link = link
        self.running = lanes
        self.turn = threading.Condition()
        self.waiting: dict[int, Items] = {}
        self.answers: dict[int, dict[str, list[Payload | None]] | BaseException] = {}

    def view(self, lane: int) -> _LaneView:
        """The ``SiteLink`` that lane ``lane``'s protocol asks through."""
        return _LaneView(self, lane)

    def ask(self, lane: int, items: Items) -> dict[str, list[Payload | None]]:
        """Lane ``lane``'s requests (per site, its items ``(route, request)``), answered when
        the batch they join comes back: per site that answered, each item's reply or None
        (``BatchLink.ask_batch``)."""
        with self.turn:
            self.waiting[lane] = {site: list(batch) for site, batch in items.items()}
            self._send_if_all_wait()
            self.turn.wait_for(lambda: lane in self.answers)
            answer = self.answers.pop(lane)
        if isinstance(answer, BaseException):
            raise answer
        return answer

    def leave(self, lane: int) -> None:
        """Lane ``lane`` is done: the others no longer wait for it."""
        with self.turn:
            self.running -= 1
            self._send_if_all_wait()

    def _send_if_all_wait(self) -> None:
        """With the lock held: send what waits once every running lane waits."""
        if not self.waiting or len(self.waiting) < self.running:
            return
        asks, self.waiting = self.waiting, {}
        try:
            answers: dict[int, dict | BaseException] = dict(self._send(asks))
        except Exception as error:  # noqa: BLE001 - each waiting lane raises it
            answers = {lane: error for lane in asks}
        self.answers.update(answers)
        self.turn.notify_all()

    def _send(self, asks: dict[int, Items]) -> dict[int, dict[str, list[Payload | None]]]:
        """The waiting lanes' items in one batch per site (one request alone goes as it is):
        per lane, what :meth:`ask` returns."""
        if len(asks) == 1:
            ((lane, items),) = asks.items()
            routes = {route for batch in items.values() for route, _ in batch}
            if all(len(batch) == 1 for batch in items.values()) and len(routes) == 1:
                replies = self.link.ask(routes.pop(), {s: b[0][1] for s, b in items.items()})
                return {lane: {site: [reply] for site, reply in replies.items()}}
        joined: dict[str, list[tuple[str, Payload]]] = {}
        owners: dict[str, list[int]] = {}
        for lane, items in sorted(asks.items()):
            for site, batch in items.items():
                joined.setdefault(site, []).extend(batch)
                owners.setdefault(site, []).extend([lane] * len(batch))
        answers: dict[int, dict[str, list[Payload | None]]] = {lane: {} for lane in asks}
        for site, replies in self.link.ask_batch(joined).items():
            for lane, reply in zip(owners[site], replies, strict=True):
                answers[lane].setdefault(site, []).append(reply)
        return answers


class _LaneView:
    """One lane's ``SiteLink``: its asks go through the lanes' batches; the link's other
    calls pass through, one thread at a time."""

    secure_aggregation = False  # a batch cannot run SecAgg+ (the config refuses both at once)

    def __init__(self, lanes: FoldLanes, lane: int) -> None:
        self.lanes, self.lane = lanes, lane
        self.batch_validation = getattr(lanes.link, "batch_validation", False)

    def sites(self) -> list[str]:
        with self.lanes.turn:
            return self.lanes.link.sites()

    def rename(self, names: Mapping[str, str]) -> None:
        with self.lanes.turn:
            self.lanes.link.rename(names)

    def refuse(self, key: str) -> None:
        with self.lanes.turn:
            self.lanes.link.refuse(key)

    def ask(self, route: str, requests: Mapping[str, Payload]) -> dict[str, Payload]:
        answers = self.lanes.ask(self.lane, {s: [(route, r)] for s, r in requests.items()})
        return {site: replies[0] for site, replies in answers.items() if replies[0] is not None}

    def ask_batch(self, items: Items) -> dict[str, list[Payload | None]]:
        return self.lanes.ask(self.lane, items)


def fold_lanes(
    link: BatchLink,
    cfg: FederationConfig,
    run: str,
    checkpoints: Path,
    privacy_dir: Path | None,
    log: Callable[[str], None],
) -> FoldRunner:
    """The ``FoldRunner`` of run ``run`` of ``cfg`` over ``link``: ``[federation]
    parallel_folds`` folds at once (:class:`FoldLanes`), each into ``checkpoints`` and with the
    run's census (no lane asks ``query.census`` or ``query.folds`` again: two message rounds
    fewer a run); their progress lines, led by ``[fold k]``, go to ``log``."""

    def run_folds(folds: Sequence[int], taken: CensusTaken) -> dict[int, dict]:
        queue = list(folds)
        lanes = FoldLanes(link, min(cfg.federation.parallel_folds, len(queue)))
        log(f"{lanes.running} folds at once: their requests reach each site in batches")
        done: dict[int, dict] = {}
        failed: dict[int, Exception] = {}
        taking = threading.Lock()

        def lane(k: int) -> None:
            try:
                while True:
                    with taking:
                        if not queue:
                            return
                        fold = queue.pop(0)
                    protocol = FederatedProtocol(
                        lanes.view(k),
                        cfg,
                        run,
                        lambda message, fold=fold: log(f"[fold {fold + 1}] {message.strip()}"),
                        checkpoints=checkpoints,
                        privacy_dir=privacy_dir,
                    )
                    try:
                        done.update(protocol.run_folds([fold], taken))
                    except Exception as error:  # noqa: BLE001 - raised below, once all stop
                        failed[fold] = error
                        return
                    log(f"fold {fold + 1}: done in {done[fold]['seconds']:.0f} s")
            finally:
                lanes.leave(k)

        threads = [threading.Thread(target=lane, args=(k,)) for k in range(lanes.running)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        if failed:
            fold = min(failed)
            raise ProtocolError(f"fold {fold + 1}: {failed[fold]}") from failed[fold]
        return done

    return run_folds
