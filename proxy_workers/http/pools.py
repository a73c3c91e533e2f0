"""Keep-alive pools of connections to workers: one :class:`WorkerPool` per worker, :class:`Pools` per process.

Role: hand an attempt an idle :class:`proxy_workers.http.upstream.UpstreamConnection` to its
worker, or open a new one (``connect``), and take connections back once their response allowed
keep-alive (what allows it, and when a connection is put back, is
:mod:`proxy_workers.http.upstream`'s).

Invariants:
- Pools are LIFO (the most recently used socket is the least likely to have been closed by the
  worker) and bounded by the ``pool_size`` setting; idle sockets older than ``keepalive_timeout``
  are closed by the proxy's periodic sweep.
- A pool is dropped, its idle sockets closed, when its worker leaves the fleet (``Pools.retain``).
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import Callable
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

from proxy_workers.http.upstream import UpstreamConnection
from proxy_workers.outbox import Outbox

if TYPE_CHECKING:
    from proxy_workers.process_view import ProcessView


class WorkerPool:
    """Idle keep-alive connections to one worker, plus what is needed to open new ones."""

    __slots__ = ("authority", "host", "idle", "limit", "loop", "outbox", "port", "ssl", "url")

    def __init__(self, loop: asyncio.AbstractEventLoop, url: str, limit: int, outbox: Outbox) -> None:
        parts = urlsplit(url)
        self.loop = loop
        self.outbox = outbox
        self.url = url
        self.host = parts.hostname or "127.0.0.1"
        self.ssl: ssl.SSLContext | None = ssl.create_default_context() if parts.scheme == "https" else None
        self.port = parts.port or (443 if self.ssl else 80)
        self.authority = parts.netloc.encode()
        self.limit = limit
        self.idle: list[UpstreamConnection] = []

    def take(self) -> UpstreamConnection | None:
        idle = self.idle
        while idle:
            conn = idle.pop()
            if conn.transport is not None and not conn.transport.is_closing():
                return conn
        return None

    def put(self, conn: UpstreamConnection) -> None:
        if len(self.idle) < self.limit:
            self.idle.append(conn)
        else:
            conn.close()

    def forget(self, conn: UpstreamConnection) -> None:
        try:
            self.idle.remove(conn)
        except ValueError:
            pass

    def connect(self, done: Callable[[asyncio.Future[Any]], None]) -> asyncio.Future[Any]:
        """Open a new connection; ``done`` gets the future of (transport, protocol)."""
        future = asyncio.ensure_future(self.loop.create_connection(
            lambda: UpstreamConnection(self), self.host, self.port, ssl=self.ssl))
        future.add_done_callback(done)
        return future

    def close_idle(self, older_than: float) -> None:
        keep = []
        for conn in self.idle:
            if conn.idle_since < older_than:
                conn.close()
            else:
                keep.append(conn)
        self.idle[:] = keep

    def close_all(self) -> None:
        for conn in self.idle:
            conn.close()
        self.idle.clear()


class Pools:
    """All worker pools of one proxy process, keyed by worker URL."""

    __slots__ = ("limit", "loop", "outbox", "pools")

    def __init__(self, loop: asyncio.AbstractEventLoop, limit: int, outbox: Outbox) -> None:
        self.loop = loop
        self.outbox = outbox
        self.limit = limit
        self.pools: dict[str, WorkerPool] = {}

    def get(self, url: str) -> WorkerPool:
        pool = self.pools.get(url)
        if pool is None:
            pool = self.pools[url] = WorkerPool(self.loop, url, self.limit, self.outbox)
        return pool

    def retain(self, urls: set[str]) -> None:
        """Drop pools of workers that left the fleet (their idle sockets are closed)."""
        for url in list(self.pools):
            if url not in urls:
                self.pools.pop(url).close_all()

    def sweep(self, older_than: float) -> None:
        for pool in self.pools.values():
            if pool.idle:
                pool.close_idle(older_than)


def pool_for(proc: ProcessView, url: str) -> WorkerPool:
    """The pool of the worker at ``url`` in ``proc``'s pools (the process holds them untyped:
    :mod:`proxy_workers.process_view`; typed here, compiled code calls them directly)."""
    pools: Pools = proc.pools
    return pools.get(url)
