"""Periodic health housekeeping: passive sampling and half-open probes.

Role: what the coordinator does every ``passive_interval`` for the health of the fleet it has,
as opposed to discovery, which decides what fleet it has. :meth:`Housekeeping.sample` applies
the passive rules to the load board (:mod:`coordinator.health.passive`) and starts one half-open
probe (an active check at the worker's health target) per ejected worker whose ejection is over.
The coordinator drives it (:meth:`coordinator.arbiter.Coordinator.housekeeping_step`), together
with drains and slow-start steps, and publishes when anything changed.

Invariants:
- At most one half-open probe per worker is in flight (``PassiveState.probing``), and at most
  ``MAX_CONCURRENT_PROBES`` in all, so a mass ejection cannot open thousands of connections.
- A probe's result is applied when it arrives and reported through ``on_change``; probes never
  raise into the loop, and :meth:`stop` cancels the ones still running.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

import aiohttp

from coordinator.fleet.membership import Fleet, WorkerState
from coordinator.health import active
from coordinator.health.passive import PassiveHealth
from shm.loadboard import LoadBoard
from shm.settings import Settings

MAX_CONCURRENT_PROBES = 16
log = logging.getLogger("shardgate.coordinator")


class Housekeeping:
    def __init__(self, fleet: Fleet, board: LoadBoard, proxies: int, settings: Settings,
                 on_change: Callable[[], None], clock: Callable[[], float] = time.monotonic) -> None:
        self.fleet = fleet
        self.settings = settings
        self.passive = PassiveHealth(board, proxies)
        self.on_change = on_change  # a half-open probe changed what is published
        self.clock = clock
        self.session: aiohttp.ClientSession | None = None  # None: probes pass without a request
        self._probes: set[asyncio.Task[None]] = set()
        self._probe_limit = asyncio.Semaphore(MAX_CONCURRENT_PROBES)

    def start(self, session: aiohttp.ClientSession) -> None:
        self.session = session

    def reconfigure(self, settings: Settings) -> None:
        self.settings = settings

    def notices(self) -> list[str]:
        """The passive rules' current notices (workers kept in by the panic guard)."""
        return self.passive.notices

    def sample(self, now: float) -> bool:
        """Apply the passive rules once and start the half-open probes that fell due.

        True when an ejection changed what is published.
        """
        changed, due = self.passive.sample(self.fleet, self.settings, now)
        for state in due:
            self._spawn_probe(state)
        return changed

    def _spawn_probe(self, state: WorkerState) -> None:
        assert state.passive is not None  # only sampled (hence ejectable) workers fall due
        state.passive.probing = True
        task = asyncio.ensure_future(self._probe(state))
        self._probes.add(task)
        task.add_done_callback(self._probes.discard)

    async def _probe(self, state: WorkerState) -> None:
        problem = ""
        if self.session is not None:  # (check_worker_health picks HTTP or gRPC health)
            async with self._probe_limit:
                problem = await active.check_worker_health(self.session, state, self.settings)
        if self.passive.probed(state, problem, self.settings, self.clock()):
            self.on_change()

    async def stop(self) -> None:
        tasks = list(self._probes)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._probes.clear()
