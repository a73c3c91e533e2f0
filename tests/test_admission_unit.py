"""Admission control in-process: shares, priorities, client keys, buckets, the wait queue, and the
controller itself with a fake process, a fake loop and an injected clock (no sockets, no sleeps)."""

from __future__ import annotations

import array
from typing import Any

import pytest

from proxy_workers.errors import BadRequest, Overloaded, RateLimited, RouterError
from proxy_workers.serving.admission import Admission, WaitQueue, parse_priority, share
from proxy_workers.serving.ratelimit import RateLimiter, TokenBucket, client_key
from shm.loadboard import (
    P_ADMITTED,
    P_QUEUE_ABANDONED,
    P_QUEUE_WAITS,
    P_QUEUED,
    P_REJ_QUEUE_FULL,
    P_REJ_QUEUE_TIMEOUT,
    P_REJ_RATE_LIMITED,
    P_REJ_SHUTDOWN,
    PROXY_FIELDS,
)
from shm.settings import Settings


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_share_splits_a_total_across_proxies_and_keeps_zero_off() -> None:
    assert [share(10, 4, i) for i in range(4)] == [3, 3, 2, 2]
    assert sum(share(100, 3, i) for i in range(3)) == 100
    assert share(0, 4, 0) == 0
    assert [share(2, 4, i) for i in range(4)] == [1, 1, 1, 1]  # at least one each
    assert share(5, 0, 0) == 5


@pytest.mark.parametrize(("value", "expected"), [(b"high", 8), (b" Normal ", 5), (b"low", 2), (b"0", 0),
                                                 (b"9", 9)])
def test_priority_header_names_and_numbers(value: bytes, expected: int) -> None:
    assert parse_priority([(b"x-shardgate-priority", value)]) == expected


def test_priority_defaults_to_normal_and_refuses_nonsense() -> None:
    assert parse_priority([(b"content-type", b"application/json")]) == 5
    for bad in (b"urgent", b"10", b"-1", b""):
        with pytest.raises(BadRequest):
            parse_priority([(b"x-shardgate-priority", bad)])


def test_client_key_hashes_the_bearer_token_or_the_address() -> None:
    auth = b"authorization"
    key = client_key([(auth, b"Bearer sk-secret")], auth, b"10.0.0.1")
    assert b"sk-secret" not in key and len(key) == 16
    assert key == client_key([(auth, b"bearer   sk-secret")], auth, b"10.0.0.2")  # the token, not the peer
    assert key != client_key([(auth, b"Bearer sk-other")], auth, b"10.0.0.1")
    assert client_key([], auth, b"10.0.0.1") == client_key([], auth, b"10.0.0.1")
    assert client_key([], auth, b"10.0.0.1") != client_key([], auth, b"10.0.0.2")
    tenant = client_key([(b"x-tenant", b"a"), (auth, b"Bearer x")], b"x-tenant", b"p")
    assert tenant == client_key([(b"x-tenant", b"a")], b"x-tenant", b"q")


def test_token_bucket_refills_continuously_up_to_its_capacity() -> None:
    bucket = TokenBucket(60, now=0.0)  # one per second
    bucket.level = 0
    assert bucket.wait(1) == pytest.approx(1.0)
    bucket.refill(0.5)
    assert bucket.wait(1) == pytest.approx(0.5)
    bucket.refill(1000.0)
    assert bucket.level == 60
    assert bucket.wait(500) == 0.0  # above the capacity: a full bucket is enough


def test_rate_limiter_counts_requests_and_tokens_per_client() -> None:
    limiter = RateLimiter(rpm=2, tpm=1000)
    assert limiter.take(b"a", 100, 0.0) == 0.0
    assert limiter.take(b"a", 100, 0.0) == 0.0
    wait = limiter.take(b"a", 100, 0.0)
    assert wait == pytest.approx(30.0)  # 2 per minute: one more in 30 s
    assert limiter.take(b"b", 100, 0.0) == 0.0  # another client
    assert limiter.take(b"a", 100, 30.0) == 0.0
    # Tokens: a refusal charges nothing, so the request budget is intact.
    assert limiter.take(b"c", 900, 0.0) == 0.0
    assert limiter.take(b"c", 900, 0.0) == pytest.approx(800 / (1000 / 60))
    assert limiter.clients[b"c"][0] is not None and limiter.clients[b"c"][0].level == 1


def test_rate_limiter_forgets_idle_clients_when_full(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("proxy_workers.serving.ratelimit.MAX_CLIENTS", 3)
    limiter = RateLimiter(rpm=60, tpm=0)
    for key in (b"a", b"b", b"c"):
        limiter.take(key, 0, 0.0)
    limiter.take(b"d", 0, 120.0)  # a, b and c have refilled: forgotten
    assert set(limiter.clients) == {b"d"}


class Entry:
    def __init__(self, name: str) -> None:
        self.name = name
        self.queued = False


def test_wait_queue_orders_by_priority_then_arrival_and_skips_removed() -> None:
    q = WaitQueue()
    entries = {n: Entry(n) for n in "abcde"}
    for name, priority in (("a", 5), ("b", 2), ("c", 8), ("d", 5), ("e", 8)):
        q.push(entries[name], priority)
    assert q.depth == 5
    assert q.remove(entries["d"]) and not q.remove(entries["d"])
    first = q.pop()
    assert first is not None and first[0].name == "c"
    q.push(first[0], first[1], first[2])  # passed over: back in its place, ahead of e
    order = []
    while (item := q.pop()) is not None:
        order.append(item[0].name)
    assert order == ["c", "e", "a", "b"] and q.depth == 0


# -- the controller, with fakes --------------------------------------------------------------


class FakeLoop:
    def __init__(self, clock: Clock) -> None:
        self.clock = clock
        self.soon: list[Any] = []
        self.timers: list[tuple[float, Any]] = []

    def time(self) -> float:
        return self.clock.now

    def call_soon(self, fn: Any, *args: Any) -> None:
        self.soon.append(lambda: fn(*args))

    def call_at(self, when: float, fn: Any) -> Any:
        self.timers.append((when, fn))
        return object()

    def run(self) -> None:
        while self.soon:
            self.soon.pop(0)()

    def fire_timers(self) -> None:
        due = [t for t in self.timers if t[0] <= self.clock.now]
        self.timers = [t for t in self.timers if t[0] > self.clock.now]
        for _, fn in due:
            fn()


class Table:
    generation = 1


class FakeProc:
    def __init__(self, clock: Clock) -> None:
        self.loop = FakeLoop(clock)
        words = array.array("q", [0] * PROXY_FIELDS)
        self.ints = memoryview(words)
        self.floats = memoryview(words).cast("B").cast("d")
        self.row = 0
        self.draining = False
        self.disconnects = 0

    def latest_table(self) -> Table:
        return Table()

    def count_disconnect(self) -> None:
        self.disconnects += 1


class Route:
    def __init__(self) -> None:
        self.room = True

    def has_room(self) -> bool:
        return self.room


class Ctx:
    def estimated_tokens(self) -> int:
        return 100


class Request:
    def __init__(self, name: str, priority: bytes | None = None, key: bytes = b"k") -> None:
        self.name = name
        self.headers = [(b"authorization", b"Bearer " + key)]
        if priority is not None:
            self.headers.append((b"x-shardgate-priority", priority))
        self.peer = b"127.0.0.1"


class Client:
    """Records what admission did with its request."""

    def __init__(self, log: list[tuple[str, str]]) -> None:
        self.exchange: Any = None
        self.log = log

    def write(self, data: bytes) -> None:
        pass

    def send_error(self, err: RouterError, request: Any) -> None:
        pass

    def exchange_done(self, exchange: Any, error: bool) -> None:
        self.log.append(("done", exchange[1]))

    def begin(self, request: Any, route: Any, ctx: Any, sink: Any, admitted: set[Any]) -> None:
        self.sink = sink
        self.exchange = ("exchange", request.name)
        admitted.add(self.exchange)
        self.log.append(("started", request.name))

    def refuse(self, err: RouterError, request: Any) -> None:
        self.exchange = None
        self.log.append((err.code or "", request.name))


def make(clock: Clock, capped: bool = False,
         **settings: Any) -> tuple[Admission, FakeProc, list[tuple[str, str]]]:
    proc = FakeProc(clock)
    admission = Admission(proc, clock)  # type: ignore[arg-type]
    assert admission.update(Settings(**settings), 1, 0, capped)
    return admission, proc, []


def arrive(admission: Admission, log: list[tuple[str, str]], request: Request,
           route: Route | None = None) -> Client:
    client = Client(log)
    admission.arrive(client, request, route or Route(), Ctx())  # type: ignore[arg-type]
    return client


def test_over_the_cap_requests_wait_and_start_in_priority_order_as_places_free() -> None:
    clock = Clock()
    admission, proc, log = make(clock, max_concurrent_requests=1, queue_size=10)
    first = arrive(admission, log, Request("first"))
    arrive(admission, log, Request("low", b"low"))
    arrive(admission, log, Request("high", b"high"))
    arrive(admission, log, Request("normal"))
    assert log == [("started", "first")] and proc.ints[P_QUEUED] == 3
    clock.now += 2.0
    first.sink.exchange_done(first.exchange, False)  # what the exchange calls as it ends
    proc.loop.run()
    assert log[-2:] == [("done", "first"), ("started", "high")] and admission.queue.depth == 2
    admission.done(("exchange", "high"))
    admission.done(("exchange", "normal"))  # not admitted yet: nothing to free
    proc.loop.run()
    admission.done(("exchange", "normal"))
    proc.loop.run()
    assert [name for what, name in log if what == "started"] == ["first", "high", "normal", "low"]
    assert proc.ints[P_ADMITTED] == 4 and proc.ints[P_QUEUE_WAITS] == 3 and proc.ints[P_QUEUED] == 0
    assert admission.retry_after() >= 1


def test_queue_full_then_queue_timeout_answer_503() -> None:
    clock = Clock()
    admission, proc, log = make(clock, max_concurrent_requests=1, queue_size=1, queue_timeout=5.0)
    arrive(admission, log, Request("first"))
    waiting = arrive(admission, log, Request("waits"))
    with pytest.raises(Overloaded) as full:
        arrive(admission, log, Request("refused"))
    assert full.value.code == "queue_full" and full.value.status == 503
    assert b"retry-after: " in full.value.headers()
    clock.now += 4.9
    proc.loop.fire_timers()
    assert waiting.exchange is not None and admission.queue.depth == 1
    clock.now += 0.2
    proc.loop.fire_timers()
    assert log[-1] == ("queue_timeout", "waits") and admission.queue.depth == 0
    assert proc.ints[P_REJ_QUEUE_FULL] == 1 and proc.ints[P_REJ_QUEUE_TIMEOUT] == 1


def test_a_route_without_room_waits_without_blocking_others() -> None:
    clock = Clock()
    admission, proc, log = make(clock, capped=True, queue_size=10)  # a worker cap, no global cap
    full_route = Route()
    full_route.room = False
    arrive(admission, log, Request("capped", b"high"), full_route)
    arrive(admission, log, Request("free"))
    assert log == [("started", "free")] and admission.queue.depth == 1
    clock.now += 0.1
    proc.loop.fire_timers()  # the re-check of workers' caps: still full
    assert admission.queue.depth == 1
    full_route.room = True  # another proxy's request to that worker ended (unheard here)
    clock.now += 0.1
    proc.loop.fire_timers()
    assert log[-1] == ("started", "capped") and admission.queue.depth == 0


def test_a_client_leaving_the_queue_is_counted_and_never_started() -> None:
    clock = Clock()
    admission, proc, log = make(clock, max_concurrent_requests=1)
    first = arrive(admission, log, Request("first"))
    gone = arrive(admission, log, Request("gone"))
    gone.exchange.client_gone()
    assert admission.queue.depth == 0 and proc.ints[P_QUEUE_ABANDONED] == 1 and proc.disconnects == 1
    admission.done(first.exchange)
    proc.loop.run()
    assert log == [("started", "first")]


def test_rate_limited_clients_get_429_with_retry_after_and_nothing_starts() -> None:
    clock = Clock()
    admission, proc, log = make(clock, rate_limit_rpm=1)
    arrive(admission, log, Request("one"))
    with pytest.raises(RateLimited) as err:
        arrive(admission, log, Request("two"))
    assert err.value.status == 429 and err.value.retry_after == 60
    arrive(admission, log, Request("other", key=b"other"))
    assert log == [("started", "one"), ("started", "other")] and proc.ints[P_REJ_RATE_LIMITED] == 1


def test_draining_refuses_what_waits() -> None:
    clock = Clock()
    admission, proc, log = make(clock, max_concurrent_requests=1)
    arrive(admission, log, Request("first"))
    arrive(admission, log, Request("waits"))
    proc.draining = True
    clock.now += 0.5
    admission.done(("exchange", "first"))
    proc.loop.run()
    assert log[-1] == ("shutting_down", "waits") and proc.ints[P_REJ_SHUTDOWN] == 1


def test_settings_turning_limits_off_admit_everything_waiting() -> None:
    clock = Clock()
    admission, proc, log = make(clock, max_concurrent_requests=1)
    arrive(admission, log, Request("first"))
    arrive(admission, log, Request("second"))
    assert not admission.update(Settings(), 1, 0, False)
    proc.loop.run()
    assert log[-1] == ("started", "second")


def test_limits_split_across_proxies() -> None:
    proc = FakeProc(Clock())
    admission = Admission(proc, Clock())  # type: ignore[arg-type]
    settings = Settings(max_concurrent_requests=10, queue_size=7, rate_limit_rpm=60)
    admission.update(settings, 4, 3, False)
    assert (admission.cap, admission.queue_cap) == (2, 1)
    assert admission.limiter is not None and admission.limiter.rpm == 15
    assert admission.update(Settings(), 4, 3, True)  # a capped worker alone turns admission on
