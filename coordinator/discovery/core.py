"""Discovery orchestration: sources in, one fleet out, with its notices.

Role: decide which workers the fleet has. It owns the discovery sources (the config file's
workers, the service registry, etcd, the admin API's overrides), merges them
(:func:`coordinator.discovery.sources.merge`) into :class:`coordinator.fleet.membership.Fleet`,
keeps the admin API's drains (:mod:`coordinator.discovery.drains`) and computes the fleet's
notices. Whenever a source changes it calls ``on_change``; the coordinator then publishes once
(changes within one tick share one publish). The health of the workers it found is looked after
elsewhere (:mod:`coordinator.health.housekeeping`, :mod:`coordinator.health.active`); their
notices come in through ``health_notices``.

Invariants:
- A source's failure never shrinks the fleet (sources keep their last good membership), and a
  merged list that does not fit ``max_workers`` is refused whole, with a notice.
- A finished drain takes its worker out through the admin overrides (as a removal does) and is
  published at once, so whoever waits on the admin API never sees the worker gone there while
  proxies still list it.
- Notices and per-source errors are recomputed on every apply and published with the snapshot.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp

from coordinator.config import Config
from coordinator.discovery.drains import Drains
from coordinator.discovery.etcd import EtcdSource
from coordinator.discovery.registry import RegistrySource
from coordinator.discovery.sources import Overrides, Source, merge
from coordinator.discovery.urlcheck import UrlChecker, parse_cidrs
from coordinator.fleet.membership import Fleet, FleetFull, Key
from shm.loadboard import LoadBoard
from shm.settings import Settings

log = logging.getLogger("shardgate.coordinator")


def dynamic_sources(settings: Settings) -> list[str]:
    """The sources besides the config file this configuration turns on."""
    named = [("registry", settings.registry_url), ("etcd", settings.etcd_endpoints),
             ("admin API", settings.admin_port)]
    return [name for name, value in named if value]


class Discovery:
    def __init__(self, config: Config, fleet: Fleet, board: LoadBoard, proxies: int,
                 on_change: Callable[[], None], publish_now: Callable[[], int] | None = None,
                 health_notices: Callable[[], list[str]] = list,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.config = config
        self.settings = config.settings
        self.fleet = fleet
        self.board = board
        self.proxies = proxies
        self.on_change = on_change
        # A finished drain is published at once: whoever waits on the admin API for the worker
        # to leave must not see it gone there while proxies still list it.
        self.publish_now = publish_now
        self.health_notices = health_notices
        self.clock = clock
        self.checker = UrlChecker(parse_cidrs(self.settings.worker_cidrs))
        self.file = Source("file")
        self.file.succeeded({(s.url, s.model, s.type): s for s in config.workers})
        self.overrides = Overrides()
        self.drains = Drains(board, proxies)
        self.registry: RegistrySource | None = None
        self.etcd: EtcdSource | None = None
        self.origin: dict[Key, str] = {}
        self.fleet_notice = ""
        self.source_tasks: list[asyncio.Task[Any]] = []
        self.session: aiohttp.ClientSession | None = None
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
        """First answers from the dynamic sources (bounded by source_timeout), then their loops."""
        self.session = session
        await self._first_answers()
        self.apply()

    async def _first_answers(self) -> None:
        assert self.session is not None
        first: list[Awaitable[object]] = []
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
        tasks = list(self.source_tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.source_tasks.clear()

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
        self.drains.forget_absent(self.fleet.states)
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
        notices += self.health_notices()
        notices += self.drains.notices(self.fleet.states)
        self.fleet.notices = notices
        self.fleet.sources = {src.name: src.status() for src in (*self.sources(), self.overrides.source)}

    # -- drains ------------------------------------------------------------------------------

    def drain(self, key: Key) -> None:
        """Start draining a worker (published at the next apply)."""
        self.drains.begin(key, self.clock())

    def undrain(self, key: Key) -> bool:
        """Cancel a drain; True when the worker was draining."""
        return self.drains.cancel(key)

    def published(self, generation: int) -> None:
        """The coordinator published ``generation`` (drains not yet out are out with it)."""
        self.drains.note_published(generation)

    def step(self, now: float) -> bool:
        """The periodic part: finish drains that are over, refresh the notices.

        True when a publish is due (a finished drain is published here at once when
        ``publish_now`` was given).
        """
        finished = self.drains.finished(self.fleet.states, now, self.settings.total_timeout)
        for key in finished:
            log.info("drain of %s finished; the worker left", key[0])
            self.drains.cancel(key)
            self.overrides.remove(key)
        if finished:
            self.apply()
            if self.publish_now is None:
                return True
            self.publish_now()
            return False
        before = self.fleet.notices
        self.refresh_notices()
        return self.fleet.notices != before
