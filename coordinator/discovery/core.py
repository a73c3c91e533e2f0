"""Discovery orchestration: sources in, one fleet out; passive health, drains and slow start.

Role: the coordinator's control loop for a changing fleet. It owns the discovery sources (the
config file's workers, the service registry, etcd, the admin API's overrides), merges them
(:func:`coordinator.sources.merge`) into :class:`coordinator.membership.Fleet`, and runs the
periodic housekeeping that needs the load board: passive health (:mod:`coordinator.health.passive`),
half-open probes, drains finishing, and slow-start steps. Whenever something changes it calls
``on_change``; the coordinator then publishes once (changes within one tick share one publish).

Invariants:
- A source's failure never shrinks the fleet (sources keep their last good membership), and a
  merged list that does not fit ``max_workers`` is refused whole, with a notice.
- A drain ends only once every proxy has taken a snapshot that marks the worker draining (their
  ``P_GENERATION`` on the board) and no proxy has a request in flight on it; then the worker
  leaves (it is excluded until the admin API adds it again). A drain that outlives
  ``total_timeout`` + ``DRAIN_SLACK`` ends anyway: no request can still be running by then.
- Notices and per-source errors are recomputed on every apply and published with the snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp

from coordinator.config import Config
from coordinator.discovery.etcd import EtcdSource
from coordinator.discovery.registry import RegistrySource
from coordinator.discovery.sources import Overrides, Source, merge
from coordinator.discovery.urlcheck import UrlChecker, parse_cidrs
from coordinator.fleet.membership import Fleet, FleetFull, Key, WorkerState
from coordinator.health import active as health
from coordinator.health.passive import PassiveHealth
from shm.loadboard import P_GENERATION, LoadBoard
from shm.settings import Settings

DRAIN_SLACK = 5.0
MAX_CONCURRENT_PROBES = 16
log = logging.getLogger("shardgate.coordinator")


def dynamic_sources(settings: Settings) -> list[str]:
    """The sources besides the config file this configuration turns on."""
    named = [("registry", settings.registry_url), ("etcd", settings.etcd_endpoints),
             ("admin API", settings.admin_port)]
    return [name for name, value in named if value]


class Drain:
    __slots__ = ("generation", "started")

    def __init__(self, started: float) -> None:
        self.started = started
        self.generation = 0  # the first snapshot generation that published it as draining


class Discovery:
    def __init__(self, config: Config, fleet: Fleet, board: LoadBoard, proxies: int,
                 on_change: Callable[[], None], publish_now: Callable[[], int] | None = None) -> None:
        self.config = config
        self.settings = config.settings
        self.fleet = fleet
        self.board = board
        self.proxies = proxies
        self.on_change = on_change
        # A finished drain is published at once: whoever waits on the admin API for the worker
        # to leave must not see it gone there while proxies still list it.
        self.publish_now = publish_now
        self.checker = UrlChecker(parse_cidrs(self.settings.worker_cidrs))
        self.file = Source("file")
        self.file.succeeded({(s.url, s.model, s.type): s for s in config.workers})
        self.overrides = Overrides()
        self.drains: dict[Key, Drain] = {}
        self.registry: RegistrySource | None = None
        self.etcd: EtcdSource | None = None
        self.passive = PassiveHealth(board, proxies)
        self.origin: dict[Key, str] = {}
        self.fleet_notice = ""
        self.source_tasks: list[asyncio.Task[Any]] = []
        self.other_tasks: set[asyncio.Task[Any]] = set()  # housekeeping loop, half-open probes
        self.session: aiohttp.ClientSession | None = None
        self._probe_limit = asyncio.Semaphore(MAX_CONCURRENT_PROBES)
        self._make_sources()

    # -- sources -----------------------------------------------------------------------------

    def _make_sources(self) -> None:
        s = self.settings
        self.registry = RegistrySource(s, self.checker, self._source_changed) if s.registry_url else None
        self.etcd = EtcdSource(s, self.checker, self._source_changed) if s.etcd_endpoints else None

    def _source_changed(self) -> None:
        """A source's membership or error moved: merge again, publish at the next tick."""
        self.apply()
        self.on_change()

    def sources(self) -> list[Source]:
        return [src for src in (self.file, self.etcd, self.registry) if src is not None]

    async def start(self, session: aiohttp.ClientSession) -> None:
        """First answers from the dynamic sources (bounded by source_timeout), then the loops."""
        self.session = session
        await self._first_answers()
        self.apply()
        self._spawn(self._housekeeping())

    async def _first_answers(self) -> None:
        assert self.session is not None
        first = []
        if self.registry is not None:
            first.append(self.registry.poll(self.session))
        if self.etcd is not None:
            first.append(self.etcd.list(self.session))
        if first:
            # The router starts with whatever answered in time; the rest arrives via the loops.
            results = await asyncio.gather(*(asyncio.wait_for(c, self.settings.source_timeout + 1)
                                             for c in first), return_exceptions=True)
            for result in results:
                if isinstance(result, BaseException):
                    log.warning("discovery: a source did not answer at start (%s: %s); retrying in "
                                "the background", result.__class__.__name__, result)
        for src in (self.registry, self.etcd):
            if src is not None:
                self.source_tasks.append(asyncio.ensure_future(src.run(self.session)))

    def reconfigure(self, config: Config) -> None:
        """A reloaded config: new file workers, and sources restarted when their settings moved."""
        old = self.settings
        self.config, self.settings = config, config.settings
        self.file.succeeded({(s.url, s.model, s.type): s for s in config.workers})
        self.checker.cidrs = parse_cidrs(self.settings.worker_cidrs)
        moved = [n for n in ("registry_url", "registry_interval", "registry_grace", "etcd_endpoints",
                             "etcd_prefix", "source_timeout")
                 if getattr(old, n) != getattr(config.settings, n)]
        if moved and self.session is not None:
            for task in self.source_tasks:
                task.cancel()
            self.source_tasks.clear()
            keep = {"registry": self.registry, "etcd": self.etcd}
            self._make_sources()
            for name, src in (("registry", self.registry), ("etcd", self.etcd)):
                previous = keep[name]
                if src is not None and previous is not None:
                    src.specs = previous.specs  # the last good membership carries over
                    if isinstance(src, RegistrySource) and isinstance(previous, RegistrySource):
                        src.seen = previous.seen
                if src is not None:
                    self.source_tasks.append(asyncio.ensure_future(src.run(self.session)))
            log.info("discovery: %s changed; sources restarted", ", ".join(moved))

    async def stop(self) -> None:
        tasks = [*self.source_tasks, *self.other_tasks]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.source_tasks.clear()
        self.other_tasks.clear()

    def _spawn(self, coro: Any) -> None:
        task = asyncio.ensure_future(coro)
        self.other_tasks.add(task)
        task.add_done_callback(self.other_tasks.discard)

    # -- merge -------------------------------------------------------------------------------

    def apply(self) -> tuple[list[str], list[str]]:
        """Merge every source into the fleet; (added, removed) URLs. Never raises FleetFull."""
        specs, origin = merge(self.sources(), self.overrides)
        try:
            added, removed = self.fleet.apply(specs)
        except FleetFull as exc:
            self.fleet_notice = f"discovery: change not applied: {exc}"
            log.error("%s", self.fleet_notice)
            added, removed = [], []
        else:
            self.fleet_notice = ""
            self.origin = origin
        if added or removed:
            log.info("membership: %d added, %d removed (%d workers)", len(added), len(removed),
                     len(self.fleet.states))
        self.overrides.forget(self.fleet.states)
        for key in [k for k in self.drains if k not in self.fleet.states]:
            del self.drains[key]
        for key, state in self.fleet.states.items():
            state.draining = key in self.drains
            state.source = self.origin.get(key, "")
        self.refresh_notices()
        return added, removed

    def refresh_notices(self) -> None:
        notices: list[str] = []
        for src in (*self.sources(), self.overrides.source):
            notices += src.notices()
        if self.fleet_notice:
            notices.append(self.fleet_notice)
        notices += self.passive.notices
        for key in self.drains:
            if key in self.fleet.states:
                # No live counts here (in_flight is in the worker's row): a notice that changed
                # every second would cost a publish every second.
                notices.append(f"draining {key[0]}: it leaves once its in-flight requests finish")
        self.fleet.notices = notices
        self.fleet.sources = {src.name: src.status() for src in (*self.sources(), self.overrides.source)}

    # -- drains ------------------------------------------------------------------------------

    def drain(self, key: Key) -> None:
        if key not in self.drains:
            self.drains[key] = Drain(time.monotonic())

    def undrain(self, key: Key) -> bool:
        return self.drains.pop(key, None) is not None

    def published(self, generation: int) -> None:
        """The coordinator published ``generation``; drains not yet out are out with it."""
        for drain in self.drains.values():
            if not drain.generation:
                drain.generation = generation

    def _finished_drains(self, now: float) -> list[Key]:
        if not self.drains:
            return []
        ints = self.board.ints
        seen = min((ints[self.board.proxy_word(p, P_GENERATION)] for p in range(self.proxies)), default=0)
        done = []
        for key, drain in self.drains.items():
            state = self.fleet.states.get(key)
            if state is None:
                continue
            idle = drain.generation and seen >= drain.generation and \
                self.board.worker_in_flight(state.slot, self.proxies) == 0
            if idle:
                done.append(key)
            elif now - drain.started > self.settings.total_timeout + DRAIN_SLACK:
                log.warning("drain of %s outlived total_timeout; it leaves now", key[0])
                done.append(key)
        return done

    # -- housekeeping ------------------------------------------------------------------------

    async def _housekeeping(self) -> None:
        while True:
            await asyncio.sleep(self.settings.passive_interval)
            try:
                if self.tick(time.monotonic()):
                    self.on_change()
            except Exception:  # housekeeping must survive anything; the next tick retries
                log.exception("discovery housekeeping failed")

    def tick(self, now: float) -> bool:
        """One round: passive rules, probes, drains, slow start; True when a publish is due."""
        changed, due = self.passive.sample(self.fleet, self.settings, now)
        for state in due:
            self._spawn_probe(state)
        finished = self._finished_drains(now)
        for key in finished:
            log.info("drain of %s finished; the worker left", key[0])
            self.drains.pop(key, None)
            self.overrides.remove(key)
        if finished:
            self.apply()
            if self.publish_now is not None:
                self.publish_now()
            else:
                changed = True
        else:
            before = self.fleet.notices
            self.refresh_notices()
            changed = changed or self.fleet.notices != before
        if self.fleet.ramp_changed(now, self.settings.slow_start):
            changed = True
        return changed

    def _spawn_probe(self, state: WorkerState) -> None:
        ps = state.passive
        ps.probing = True  # type: ignore[union-attr]
        self._spawn(self._probe(state))

    async def _probe(self, state: WorkerState) -> None:
        problem = ""
        if self.session is not None:  # (health.check_worker_health picks HTTP or gRPC health)
            async with self._probe_limit:
                problem = await health.check_worker_health(self.session, state, self.settings)
        if self.passive.probed(state, problem, self.settings, time.monotonic()):
            self.refresh_notices()
            self.on_change()
