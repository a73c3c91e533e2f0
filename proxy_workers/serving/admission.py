"""Admission control: a global concurrency cap, per-worker caps, a priority queue, client rate limits.

Role: decide, for each ``/v1/*`` request already routed (:func:`proxy_workers.routing.decision.prepare`),
whether it starts now, waits in this proxy's bounded queue, or is refused: 429 (the client is over
its rate) or 503 (the fleet is saturated: queue full, queue timeout, or shutdown), both with
``Retry-After``, in OpenAI's error shape (:mod:`proxy_workers.errors`). Operators' guide:
``docs/overload.md``.

How limits split across proxies: each proxy admits its share of ``max_concurrent_requests`` and
holds its share of ``queue_size`` (:func:`share`), and enforces ``rate_limit_rpm / proxies`` and
``rate_limit_tpm / proxies`` per client. That keeps admission exact within a proxy and
callback-driven: a place freed by an exchange ending in this process admits the next queued
request at once, with no cross-process traffic. Per-worker caps (``max_concurrency``) are global:
in-flight counts come from the load board, summed over proxies; a request waiting for another
proxy's worker capacity is re-checked by this process's queue timer every ``POLL_SECONDS``.

Invariants:
- Off (no limit set, no worker capped), the client protocol pays one attribute check per request
  (``ProxyProcess.limits_on``). An admitted exchange reports to an :class:`AdmittedSink`, which
  frees its place as it ends, so the end of an exchange costs nothing extra when admission is off.
- No task per request: one timer per process (queue timeouts, cross-proxy re-checks), armed only
  while something waits; waiting requests are plain objects in a heap.
- Queued requests start in priority order (``X-Shardgate-Priority``), first come first served
  within a priority; one whose route has no room (its workers at their caps) is passed over, not
  blocking the others. A client that disconnects while queued leaves the queue.
- Every admitted request holds its place until its exchange ends (``ClientSink.exchange_done``).
- Client keys are hashed (blake2b) before use; the raw key is never stored, logged or shown
  (the keys and the per-client buckets: :mod:`proxy_workers.serving.ratelimit`).
"""

from __future__ import annotations

import heapq
import itertools
import math
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, Protocol

from proxy_workers.contract import ClientSink
from proxy_workers.errors import BadRequest, Overloaded, RateLimited, RouterError
from proxy_workers.routing.decision import prepare
from proxy_workers.serving.ratelimit import RateLimiter, client_key
from shm.loadboard import (
    P_ADMITTED,
    P_QUEUE_ABANDONED,
    P_QUEUE_WAIT_SECONDS,
    P_QUEUE_WAITS,
    P_QUEUED,
    P_REJ_QUEUE_FULL,
    P_REJ_QUEUE_TIMEOUT,
    P_REJ_RATE_LIMITED,
    P_REJ_SHUTDOWN,
)

if TYPE_CHECKING:
    import asyncio

    from proxy_workers.contract import ClientExchange, ClientRequest, Figures, Refusal
    from proxy_workers.process_view import ProcessView
    from proxy_workers.routing.context import RequestContext
    from shm.settings import Settings

PRIORITY_HEADER = b"x-shardgate-priority"
PRIORITY_NAMES = {b"high": 8, b"normal": 5, b"low": 2}
DEFAULT_PRIORITY = 5
POLL_SECONDS = 0.1  # re-check of workers' caps (other proxies free their capacity unheard)
WAIT_EWMA_ALPHA = 0.2


def share(total: int, proxies: int, index: int) -> int:
    """Proxy ``index``'s share of ``total`` (0 stays 0 = off): an even split, the remainder to the
    first proxies, at least 1 each (so with ``total < proxies`` the router admits ``proxies``)."""
    if total <= 0:
        return 0
    base, extra = divmod(total, max(1, proxies))
    return max(1, base + (1 if index < extra else 0))


def parse_priority(headers: list[tuple[bytes, bytes]]) -> int:
    """``X-Shardgate-Priority``: high, normal, low, or 0-9 (higher first); absent: normal (5)."""
    for name, value in headers:
        if name == PRIORITY_HEADER:
            value = value.strip().lower()
            named = PRIORITY_NAMES.get(value)
            if named is not None:
                return named
            if len(value) == 1 and value.isdigit():
                return int(value)
            raise BadRequest("X-Shardgate-Priority must be high, normal, low or a number 0-9",
                             param="X-Shardgate-Priority")
    return DEFAULT_PRIORITY


class WaitQueue:
    """Waiting entries by (priority desc, arrival); removal is lazy (a removed entry is skipped)."""

    def __init__(self) -> None:
        self._heap: list[tuple[int, int, Any]] = []
        self._seq = itertools.count()
        self.depth = 0

    def push(self, entry: Any, priority: int, seq: int | None = None) -> None:
        """Queue ``entry``; ``seq`` (from :meth:`pop`) puts a passed-over entry back in its place."""
        entry.queued = True
        heapq.heappush(self._heap, (-priority, next(self._seq) if seq is None else seq, entry))
        self.depth += 1

    def pop(self) -> tuple[Any, int, int] | None:
        """(entry, priority, seq) of the first waiting entry, removed; None when empty."""
        heap = self._heap
        while heap:
            neg, seq, entry = heapq.heappop(heap)
            if entry.queued:
                entry.queued = False
                self.depth -= 1
                return entry, -neg, seq
        return None

    def remove(self, entry: Any) -> bool:
        if not entry.queued:
            return False
        entry.queued = False
        self.depth -= 1
        if len(self._heap) > 2 * self.depth + 64:  # many removed entries: compact
            self._heap = [item for item in self._heap if item[2].queued]
            heapq.heapify(self._heap)
        return True

    def waiting(self) -> list[Any]:
        return [item[2] for item in self._heap if item[2].queued]


class AdmissionClient(ClientSink, Protocol):
    """A client connection as admission sees it (:class:`proxy_workers.serving.protocol.ClientProtocol`)."""

    exchange: ClientExchange | None

    def begin(self, request: ClientRequest, route: Any, ctx: RequestContext, sink: ClientSink,
              admitted: set[ClientExchange]) -> None: ...

    def refuse(self, err: Refusal, request: ClientRequest) -> None: ...


class AdmittedSink:
    """The client connection as an admitted exchange sees it: the end frees the admission place.

    ``write`` and ``send_error`` are the connection's own bound methods (no extra call)."""

    __slots__ = ("admission", "client", "send_error", "write")

    def __init__(self, admission: Admission, client: AdmissionClient) -> None:
        self.admission = admission
        self.client = client
        self.write = client.write
        self.send_error = client.send_error

    def exchange_done(self, exchange: ClientExchange, error: bool) -> None:
        self.admission.done(exchange)
        self.client.exchange_done(exchange, error)


class Waiting:
    """A queued request: stands in for its exchange on the client connection until admitted."""

    __slots__ = ("admission", "client", "ctx", "deadline", "generation", "priority", "queued",
                 "request", "route", "since")
    head_sent = False

    def __init__(self, admission: Admission, client: AdmissionClient, request: ClientRequest,
                 route: Any, ctx: RequestContext, priority: int, now: float, generation: int) -> None:
        self.admission = admission
        self.client = client
        self.request = request
        self.route = route
        self.ctx = ctx
        self.priority = priority
        self.since = now
        self.deadline = now + admission.timeout
        self.generation = generation
        self.queued = False

    def start(self) -> None:
        pass

    def client_gone(self) -> None:
        self.admission.abandon(self)

    def check_deadline(self, now: float) -> None:
        pass

    def pause_upstream(self) -> None:
        pass

    def resume_upstream(self) -> None:
        pass

    def figures(self) -> Figures:
        """Nothing answered yet (a request still queued is never recorded as an exchange: the
        client connection ends it without a record if the client leaves meanwhile)."""
        return 0, 0.0, 0, 0, "", 0, "", ""


class Admission:
    """One proxy process's admission control (see the module docstring)."""

    def __init__(self, proc: ProcessView, clock: Callable[[], float] | None = None) -> None:
        self.proc = proc
        self.clock = clock or proc.loop.time
        self.admitted: set[ClientExchange] = set()  # exchanges holding a place (ProxyProcess.admitted)
        self.queue = WaitQueue()
        self.limiter: RateLimiter | None = None
        self.cap = self.queue_cap = 0
        self.timeout = 60.0
        self.capped = False
        self.key_header = b"authorization"
        self.wait_ewma = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._pump_soon = False

    def update(self, settings: Settings, proxies: int, index: int, capped: bool) -> bool:
        """Take new settings (a snapshot); returns whether admission control is on."""
        n = max(1, proxies)
        self.cap = share(settings.max_concurrent_requests, n, index)
        self.queue_cap = share(settings.queue_size, n, index)
        self.timeout = settings.queue_timeout
        self.capped = capped
        self.key_header = settings.rate_limit_key.strip().lower().encode("latin-1")
        rpm, tpm = settings.rate_limit_rpm / n, settings.rate_limit_tpm / n
        if not (rpm or tpm):
            self.limiter = None
        elif self.limiter is None or (self.limiter.rpm, self.limiter.tpm) != (rpm, tpm):
            self.limiter = RateLimiter(rpm, tpm)
        if self.queue.depth:
            self._schedule_pump()  # the limits may have grown, or gone
        return bool(self.cap or self.limiter is not None or capped)

    # -- arrivals ------------------------------------------------------------------------

    def arrive(self, client: AdmissionClient, request: ClientRequest, route: Any,
               ctx: RequestContext) -> None:
        """Start the request, queue it, or raise its refusal (429, 503; 400 for a bad priority)."""
        proc = self.proc
        now = self.clock()
        if self.limiter is not None:
            key = client_key(request.headers, self.key_header, request.peer)
            wait = self.limiter.take(key, ctx.estimated_tokens() if self.limiter.tpm else 0, now)
            if wait:
                proc.ints[proc.row + P_REJ_RATE_LIMITED] += 1
                raise RateLimited("rate limit exceeded for this client (requests or tokens per minute); "
                                  "retry after the Retry-After delay", retry_after=math.ceil(wait))
        priority = parse_priority(request.headers)
        if not self.queue.depth and self._room(route):
            self._start(client, request, route, ctx)
            return
        if self.queue.depth >= self.queue_cap or proc.draining:
            proc.ints[proc.row + P_REJ_QUEUE_FULL] += 1
            why = "no capacity and queuing is off" if not self.queue_cap else "admission queue is full"
            raise Overloaded(f"the router is saturated: {why}", self.retry_after(), code="queue_full")
        entry = Waiting(self, client, request, route, ctx, priority, now, proc.latest_table().generation)
        self.queue.push(entry, priority)
        client.exchange = entry
        self._pump()  # a place may be free for a request queued earlier (or of higher priority)
        self._arm()

    def done(self, exchange: ClientExchange) -> None:
        """An admitted exchange ended: its place frees up for the next queued request."""
        self.admitted.discard(exchange)
        if self.queue.depth:
            self._schedule_pump()

    def abandon(self, entry: Waiting) -> None:
        """The client of a queued request disconnected: it leaves the queue."""
        if self.queue.remove(entry):
            proc = self.proc
            proc.ints[proc.row + P_QUEUE_ABANDONED] += 1
            proc.ints[proc.row + P_QUEUED] = self.queue.depth
            proc.count_disconnect()

    def retry_after(self) -> int:
        """Seconds a refused client should wait: the recent queue wait, within [1, queue_timeout]."""
        return max(1, min(math.ceil(self.wait_ewma), math.ceil(self.timeout)))

    # -- internals -----------------------------------------------------------------------

    def _room(self, route: Any) -> bool:
        return (not self.cap or len(self.admitted) < self.cap) and route.has_room()

    def _start(self, client: AdmissionClient, request: ClientRequest, route: Any,
               ctx: RequestContext) -> None:
        proc = self.proc
        proc.ints[proc.row + P_ADMITTED] += 1
        client.begin(request, route, ctx, AdmittedSink(self, client), self.admitted)

    def _schedule_pump(self) -> None:
        if not self._pump_soon:
            self._pump_soon = True
            self.proc.loop.call_soon(self._pump)

    def _pump(self) -> None:
        """Admit queued requests in priority order while there is room."""
        self._pump_soon = False
        proc, queue = self.proc, self.queue
        if proc.draining:
            self._refuse_all()
            return
        generation = proc.latest_table().generation
        passed: list[tuple[Waiting, int, int]] = []
        while queue.depth and (not self.cap or len(self.admitted) < self.cap):
            item = queue.pop()
            if item is None:
                break
            entry = item[0]
            if entry.generation != generation:  # routed by an older snapshot: route again
                try:
                    entry.route, entry.ctx = prepare(proc, entry.request)
                except RouterError as err:
                    self._refuse(entry, err)
                    continue
                entry.generation = generation
            if not entry.route.has_room():
                passed.append(item)  # its workers are at their caps; others may go first
                continue
            self._admit(entry)
        for entry, priority, seq in passed:
            queue.push(entry, priority, seq)
        proc.ints[proc.row + P_QUEUED] = queue.depth

    def _admit(self, entry: Waiting) -> None:
        proc = self.proc
        waited = self.clock() - entry.since
        ints, row = proc.ints, proc.row
        ints[row + P_QUEUE_WAITS] += 1
        proc.floats[row + P_QUEUE_WAIT_SECONDS] += waited
        self.wait_ewma += WAIT_EWMA_ALPHA * (waited - self.wait_ewma)
        entry.client.exchange = None
        try:
            self._start(entry.client, entry.request, entry.route, entry.ctx)
        except RouterError as err:
            entry.client.refuse(err, entry.request)

    def _refuse(self, entry: Waiting, err: Refusal) -> None:
        entry.client.exchange = None
        entry.client.refuse(err, entry.request)

    def _refuse_all(self) -> None:
        proc = self.proc
        while (item := self.queue.pop()) is not None:
            proc.ints[proc.row + P_REJ_SHUTDOWN] += 1
            self._refuse(item[0], Overloaded("the router is shutting down", self.retry_after(),
                                             code="shutting_down"))
        proc.ints[proc.row + P_QUEUED] = 0

    def _arm(self) -> None:
        """One timer for the whole queue: the earliest deadline, or the next cap re-check."""
        proc = self.proc
        proc.ints[proc.row + P_QUEUED] = self.queue.depth
        if self._timer is not None or not self.queue.depth:
            return
        when = min(e.deadline for e in self.queue.waiting())
        if self.capped:
            when = min(when, self.clock() + POLL_SECONDS)
        self._timer = proc.loop.call_at(when, self._tick)

    def _tick(self) -> None:
        self._timer = None
        now = self.clock()
        proc = self.proc
        for entry in self.queue.waiting():
            if entry.deadline <= now and self.queue.remove(entry):
                proc.ints[proc.row + P_REJ_QUEUE_TIMEOUT] += 1
                self._refuse(entry, Overloaded(
                    f"the router is saturated: no capacity within queue_timeout={self.timeout:g}s",
                    self.retry_after(), code="queue_timeout"))
        self._pump()
        self._arm()
