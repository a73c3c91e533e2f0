"""Admin drains: which workers are draining, and when a drain is over.

Role: the bookkeeping behind ``POST /admin/workers/drain``. A draining worker is published with
``draining: true`` (no proxy picks it for a new request) and leaves the fleet once no request can
still be on it; :class:`coordinator.discovery.core.Discovery` then excludes it through the admin
overrides, as a removal would.

Invariants:
- A drain ends only once every proxy has taken a snapshot that marks the worker draining (their
  ``P_GENERATION`` on the load board is at least the generation that first published it) and no
  proxy has a request in flight on it. Before that, a proxy may still be routing new requests to
  it from an older snapshot.
- A drain that outlives ``total_timeout`` + ``DRAIN_SLACK`` ends anyway: no request can still be
  running by then (a proxy that stopped updating its row must not pin a worker forever).
- A drain of a worker that left the fleet by other means is forgotten with it.
"""

from __future__ import annotations

import logging
from collections.abc import Container, Iterator, Mapping

from coordinator.fleet.membership import Key, WorkerState
from shm.loadboard import P_GENERATION, LoadBoard

DRAIN_SLACK = 5.0
log = logging.getLogger("shardgate.coordinator")


class Drain:
    __slots__ = ("generation", "started")

    def __init__(self, started: float) -> None:
        self.started = started  # monotonic
        self.generation = 0  # the first snapshot generation that published it as draining (0: none yet)


class Drains:
    """The drains in progress, keyed like the fleet."""

    def __init__(self, board: LoadBoard, proxies: int) -> None:
        self.board = board
        self.proxies = proxies
        self._drains: dict[Key, Drain] = {}

    def __contains__(self, key: object) -> bool:
        return key in self._drains

    def __iter__(self) -> Iterator[Key]:
        return iter(self._drains)

    def __len__(self) -> int:
        return len(self._drains)

    def begin(self, key: Key, now: float) -> None:
        """Start draining ``key`` (a second call keeps the first start time)."""
        if key not in self._drains:
            self._drains[key] = Drain(now)

    def cancel(self, key: Key) -> bool:
        """Stop draining ``key``; True when it was draining."""
        return self._drains.pop(key, None) is not None

    def note_published(self, generation: int) -> None:
        """Snapshot ``generation`` is out: drains not yet published are published in it."""
        for drain in self._drains.values():
            if not drain.generation:
                drain.generation = generation

    def forget_absent(self, present: Container[Key]) -> None:
        """Drop the drains of workers no longer in the fleet."""
        for key in [k for k in self._drains if k not in present]:
            del self._drains[key]

    def finished(self, states: Mapping[Key, WorkerState], now: float, total_timeout: float) -> list[Key]:
        """The drains that are over (see the module's invariants); they stay listed until cancelled."""
        if not self._drains:
            return []
        ints = self.board.ints
        seen = min((ints[self.board.proxy_word(p, P_GENERATION)] for p in range(self.proxies)), default=0)
        done = []
        for key, drain in self._drains.items():
            state = states.get(key)
            if state is None:
                continue
            idle = drain.generation and seen >= drain.generation and \
                self.board.worker_in_flight(state.slot, self.proxies) == 0
            if idle:
                done.append(key)
            elif now - drain.started > total_timeout + DRAIN_SLACK:
                log.warning("drain of %s outlived total_timeout; it leaves now", key[0])
                done.append(key)
        return done

    def notices(self, states: Container[Key]) -> list[str]:
        # No live counts here (in_flight is in the worker's row): a notice that changed every
        # second would cost a publish every second.
        return [f"draining {key[0]}: it leaves once its in-flight requests finish"
                for key in self._drains if key in states]
