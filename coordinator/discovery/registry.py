"""The seed's HTTP service registry as a discovery source (``shardgate registry`` serves one).

Role: poll ``GET {registry_url}/services`` every ``registry_interval`` seconds and turn its entries
into workers. Entries are JSON objects (``url`` or ``host`` + ``port``, optional ``model``,
``type``, ``weight``, ``labels``, ``shard``); the answer is ``{"services": [...]}`` or a bare list.

Invariants:
- Grace removal (the seed's ``last_seen_in_registry``): a worker missing from good answers stays
  in the fleet until it has been missing for ``registry_grace`` seconds, so a registry restart or
  a babysitter's late heartbeat does not flap the fleet. A worker that comes back within the grace
  period simply stays.
- Only good answers move membership. While the registry is down, slow (``source_timeout``) or
  returns garbage, the grace clocks stop and the last good membership stays; the error is a
  notice in ``/workers`` and the snapshot's ``sources`` map.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import msgspec

from coordinator.discovery.sources import Source, validated
from coordinator.discovery.urlcheck import UrlChecker
from coordinator.fleet.membership import Key
from shm.schema import WorkerSpec
from shm.settings import Settings

MAX_BODY = 16 * 1024 * 1024
log = logging.getLogger("shardgate.coordinator")


class RegistrySource(Source):
    def __init__(self, settings: Settings, checker: UrlChecker, on_change: Callable[[], None]) -> None:
        super().__init__("registry")
        self.url = settings.registry_url.rstrip("/")
        self.settings = settings
        self.checker = checker
        self.on_change = on_change
        # Every worker seen, with the monotonic time of the last good answer that listed it.
        self.seen: dict[Key, tuple[WorkerSpec, float]] = {}

    async def run(self, session: aiohttp.ClientSession) -> None:
        """Poll forever (cancelled when the coordinator stops or the setting changes)."""
        if self.ok_at or self.error_since:  # the coordinator's start already polled once
            await asyncio.sleep(self.settings.registry_interval)
        while True:
            if await self.poll(session):
                self.on_change()
            await asyncio.sleep(self.settings.registry_interval)

    async def poll(self, session: aiohttp.ClientSession) -> bool:
        """One poll; True when membership or error changed."""
        try:
            entries = await self._fetch(session)
        except ValueError as exc:
            if self.failed(str(exc)):
                log.warning("registry %s: %s; keeping its last %d worker(s)", self.url, exc, len(self.specs))
                return True
            return False
        specs, problems = await validated(entries, self.checker, strict=False)
        was_down = bool(self.error)
        if was_down:
            log.info("registry %s answers again", self.url)
        return self.sync(specs, problems, time.monotonic()) or was_down

    def sync(self, listed: dict[Key, WorkerSpec], problems: list[str], now: float) -> bool:
        """Apply one good answer with grace removal; True when membership changed."""
        for key, spec in listed.items():
            self.seen[key] = (spec, now)
        grace = self.settings.registry_grace
        for key in [k for k, (_, at) in self.seen.items() if now - at > grace]:
            log.info("registry: %s missing for over %.0fs; removed", key[0], grace)
            del self.seen[key]
        return self.succeeded({k: spec for k, (spec, _) in self.seen.items()}, problems)

    async def _fetch(self, session: aiohttp.ClientSession) -> list[tuple[str, Any]]:
        url = self.url + "/services"
        timeout = aiohttp.ClientTimeout(total=self.settings.source_timeout)
        try:
            async with session.get(url, timeout=timeout, allow_redirects=False) as resp:
                body = await resp.content.read(MAX_BODY + 1)
                if resp.status != 200:
                    raise ValueError(f"GET {url} answered {resp.status}")
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            raise ValueError(f"GET {url} failed: {exc.__class__.__name__} {exc}".strip()) from None
        if len(body) > MAX_BODY:
            raise ValueError(f"GET {url}: answer larger than {MAX_BODY} bytes")
        try:
            doc = msgspec.json.decode(body)
        except msgspec.DecodeError as exc:
            raise ValueError(f"GET {url} returned something that is not JSON ({exc})") from None
        services = doc.get("services") if isinstance(doc, dict) else doc
        if not isinstance(services, list):
            raise ValueError(f"GET {url}: expected a list of services or {{\"services\": [...]}}")
        return [(f"service {i} ({_label(e)})", e) for i, e in enumerate(services)]


def _label(entry: Any) -> str:
    if isinstance(entry, dict):
        return str(entry.get("url") or entry.get("name") or f"{entry.get('host')}:{entry.get('port')}")
    return "?"
