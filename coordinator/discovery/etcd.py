"""etcd v3 as a discovery source, through its JSON gateway with aiohttp (no gRPC dependency).

Role: every key under ``etcd_prefix`` is one worker; its value is a JSON object of WorkerSpec
fields (``{"url": "http://10.0.0.5:8000", "model": "llama", "weight": 2}``). The source lists the
prefix (``POST /v3/kv/range``), then follows changes with one streaming ``POST /v3/watch`` from the
listed revision + 1, so a change reaches the proxies with the next publish.

Invariants:
- A watch that breaks (etcd restarted, connection lost, ``compact_revision``: the revision we
  need was compacted away, or canceled) leads to a fresh list and a new watch; nothing is
  replayed from a cache, so no event is missed or applied twice.
- While etcd is unreachable the last good membership stays and the error is shown; endpoints
  (``etcd_endpoints``, comma-separated) are tried in turn, backing off 0.5 s doubling to 5 s.
- A key whose value is not a valid worker keeps its previous good value (or stays out) and is
  reported; other keys are unaffected.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
from collections.abc import Callable
from typing import Any

import aiohttp

from coordinator.discovery.sources import Source, validated
from coordinator.discovery.urlcheck import UrlChecker
from coordinator.fleet.membership import Key, spec_key
from shm.schema import WorkerSpec
from shm.settings import Settings

BACKOFF_FIRST, BACKOFF_MAX = 0.5, 5.0
MAX_MESSAGE = 64 * 1024 * 1024
log = logging.getLogger("shardgate.coordinator")


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def prefix_end(prefix: bytes) -> bytes:
    """etcd's range_end for "every key starting with prefix"."""
    end = bytearray(prefix)
    for i in range(len(end) - 1, -1, -1):
        if end[i] < 0xFF:
            end[i] += 1
            return bytes(end[: i + 1])
    return b"\0"  # all 0xff: to the end of the keyspace


class WatchBroken(Exception):
    """The watch ended; the source lists again (``str()`` says why)."""


class EtcdSource(Source):
    def __init__(self, settings: Settings, checker: UrlChecker, on_change: Callable[[], None]) -> None:
        super().__init__("etcd")
        self.endpoints = [e.strip().rstrip("/") for e in settings.etcd_endpoints.split(",") if e.strip()]
        self.prefix = settings.etcd_prefix.encode()
        self.settings = settings
        self.checker = checker
        self.on_change = on_change
        self.keys: dict[str, WorkerSpec] = {}     # etcd key -> its last good worker
        self.problems: dict[str, str] = {}        # etcd key -> why its value is refused
        self._endpoint = 0
        self.lists = 0  # how many full lists were made (the tests watch re-lists)
        self.listed = 0  # revision of a list not yet followed by a watch

    @property
    def endpoint(self) -> str:
        return self.endpoints[self._endpoint % len(self.endpoints)]

    def _range_body(self) -> dict[str, Any]:
        return {"key": b64(self.prefix), "range_end": b64(prefix_end(self.prefix))}

    async def run(self, session: aiohttp.ClientSession) -> None:
        backoff = BACKOFF_FIRST
        while True:
            try:
                # The coordinator's start already listed once; watch from there the first time.
                revision, self.listed = self.listed or await self.list(session), 0
                backoff = BACKOFF_FIRST
                await self._watch(session, revision)
            except WatchBroken as exc:
                # A clean reason to re-list (compaction, cancel): no error shown, just list again.
                log.info("etcd %s: %s; listing again", self.endpoint, exc)
                await asyncio.sleep(0.05)
                continue
            except (ValueError, TimeoutError, aiohttp.ClientError, OSError) as exc:
                why = f"{self.endpoint}: {exc.__class__.__name__} {exc}".strip() \
                    if not isinstance(exc, ValueError) else f"{self.endpoint}: {exc}"
                if self.failed(why):
                    log.warning("etcd %s; keeping its last %d worker(s)", why, len(self.specs))
                    self.on_change()
                self._endpoint += 1
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def list(self, session: aiohttp.ClientSession) -> int:
        """Read the whole prefix; returns the store revision the list reflects."""
        url = self.endpoint + "/v3/kv/range"
        timeout = aiohttp.ClientTimeout(total=self.settings.source_timeout)
        async with session.post(url, json=self._range_body(), timeout=timeout,
                                allow_redirects=False) as resp:
            body = await resp.read()
            if resp.status != 200:
                raise ValueError(f"POST /v3/kv/range answered {resp.status}: {body[:200]!r}")
        try:
            doc = json.loads(body)
            revision = int(doc["header"]["revision"])
            kvs = doc.get("kvs") or []
            raw = {base64.b64decode(kv["key"]).decode(): base64.b64decode(kv.get("value", "")) for kv in kvs}
        except (ValueError, KeyError, TypeError) as exc:
            raise ValueError(f"POST /v3/kv/range returned an unexpected body: {exc}") from None
        self.keys.clear()
        self.problems.clear()
        for key, value in raw.items():
            await self._put(key, value)
        self.lists += 1
        was_down = bool(self.error)
        if self._publish() or was_down:
            self.on_change()
        self.listed = revision
        return revision

    async def _put(self, key: str, value: bytes) -> None:
        try:
            entry = json.loads(value)
        except ValueError as exc:
            self.problems[key] = f"key {key}: value is not JSON ({exc})"
            return
        specs, problems = await validated([(f"key {key}", entry)], self.checker, strict=True)
        if problems:
            self.problems[key] = problems[0]  # the previous good value (if any) stays
            return
        self.problems.pop(key, None)
        self.keys[key] = next(iter(specs.values()))

    def _publish(self) -> bool:
        specs: dict[Key, WorkerSpec] = {}
        dupes = []
        for key, spec in sorted(self.keys.items()):
            k = spec_key(spec)
            if k in specs:
                dupes.append(f"key {key}: {spec.url} (model {spec.model}) is already listed by another key")
                continue
            specs[k] = spec
        return self.succeeded(specs, [*self.problems.values(), *dupes])

    async def _watch(self, session: aiohttp.ClientSession, revision: int) -> None:
        url = self.endpoint + "/v3/watch"
        request = {"create_request": {**self._range_body(), "start_revision": revision + 1}}
        # No total or read timeout: a watch is silent while nothing changes. A dead etcd closes
        # the connection (the process's sockets go with it), which ends the stream.
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=self.settings.source_timeout)
        async with session.post(url, json=request, timeout=timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise ValueError(f"POST /v3/watch answered {resp.status}")
            decoder = json.JSONDecoder()
            buffer = ""
            async for chunk in resp.content.iter_any():
                buffer += chunk.decode()
                if len(buffer) > MAX_MESSAGE:
                    raise ValueError("watch message too large")
                while True:
                    buffer = buffer.lstrip()
                    if not buffer:
                        break
                    try:
                        message, end = decoder.raw_decode(buffer)
                    except ValueError:
                        break  # an incomplete message: wait for more bytes
                    buffer = buffer[end:]
                    await self._on_message(message)
        raise ValueError("the watch stream ended")

    async def _on_message(self, message: Any) -> None:
        if not isinstance(message, dict):
            raise ValueError(f"unexpected watch message {message!r:.200}")
        if "error" in message:
            raise ValueError(f"watch error: {message['error']}")
        result = message.get("result") or {}
        if result.get("compact_revision") and int(result["compact_revision"]) > 0:
            raise WatchBroken(f"watch revision compacted (now {result['compact_revision']})")
        if result.get("canceled"):
            raise WatchBroken(f"watch canceled: {result.get('cancel_reason', 'no reason given')}")
        events = result.get("events") or []
        if not events:
            return
        for event in events:
            kv = event.get("kv") or {}
            key = base64.b64decode(kv.get("key", "")).decode()
            if event.get("type") == "DELETE":
                self.keys.pop(key, None)
                self.problems.pop(key, None)
            else:  # PUT is the enum's zero value, which the gateway leaves out
                await self._put(key, base64.b64decode(kv.get("value", "")))
        if self._publish():
            self.on_change()
