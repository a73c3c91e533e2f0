"""In-process unit tests of routing: hashing, the affinity table, every policy, selection, topology.

Role: prove each policy's defining behaviour without processes or sockets, on a real
:class:`shm.loadboard.LoadBoard` and a real :class:`shm.affinity.AffinityTable` in real POSIX
shared-memory segments (created here, unlinked at teardown). "Two proxies" are two
:class:`proxy_workers.policies.base.PolicyEnv` objects with different proxy indexes over the same
segments, each with its own :class:`proxy_workers.routing.table.RoutingTable`, exactly as two proxy
processes would hold them.

Time-dependent policies (session TTL, quota minutes) read ``time.time`` through their module; the
tests substitute a clock they move by hand, so nothing sleeps and nothing depends on speed.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import pytest

from coordinator.fleet import topology
from proxy_workers.errors import ModelNotFound, NoHealthyWorker, QuotaExceeded
from proxy_workers.policies.base import PolicyEnv
from proxy_workers.policies.registry import POLICIES, make_policy
from proxy_workers.routing import selection
from proxy_workers.routing.context import ROUTING_DECODER, RequestContext
from proxy_workers.routing.selection import resolve_alias, routers_by_model, select_router
from proxy_workers.routing.table import RoutingTable
from shm.affinity import PROBES, AffinityTable, table_size
from shm.hashing import RingView, build_ring, key_hash, vnodes_for
from shm.loadboard import (
    E_RUNNING,
    E_SCRAPED_AT,
    E_WAITING,
    W_IN_FLIGHT,
    W_REQUESTS,
    W_TTFB_EWMA,
    LoadBoard,
    board_size,
)
from shm.schema import Snapshot, Worker
from shm.segment import Segment, new_instance_id, segment_name
from shm.settings import POLICY_NAMES, Settings

MAX_PROXIES, MAX_WORKERS, AFFINITY_CAPACITY = 4, 32, 1024
HASH_HEADERS = (b"x-session-id", b"x-user-id")


# --------------------------------------------------------------------------------------------
# shared memory and helpers


class Shared:
    """A load board and an affinity table in fresh segments, as a coordinator creates them."""

    def __init__(self, affinity_capacity: int = AFFINITY_CAPACITY) -> None:
        self.segments: list[Segment] = []
        self.board = LoadBoard.create(self._segment("board", board_size(MAX_PROXIES, MAX_WORKERS)),
                                      MAX_PROXIES, MAX_WORKERS)
        self.affinity = AffinityTable.create(
            self._segment("affinity", table_size(MAX_PROXIES, affinity_capacity)), MAX_PROXIES,
            affinity_capacity)

    def _segment(self, kind: str, size: int) -> Segment:
        seg = Segment.create(segment_name(new_instance_id(), kind), size)
        self.segments.append(seg)
        return seg

    def env(self, proxy: int = 0, proxies: int = 2, **settings: Any) -> PolicyEnv:
        return PolicyEnv(self.board, proxy, proxies, Settings(**settings), self.affinity)

    def set_in_flight(self, proxy: int, slot: int, n: int) -> None:
        self.board.ints[self.board.cell_word(proxy, slot, W_IN_FLIGHT)] = n

    def close(self) -> None:
        self.board.close()
        self.affinity.close()
        for seg in self.segments:
            seg.close()
            seg.unlink()


@pytest.fixture
def shared() -> Iterator[Shared]:
    sh = Shared()
    yield sh
    sh.close()


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> list[float]:
    """A hand-moved ``time.time`` for the affinity and quota policies: ``clock[0] = t``.

    ``time.time`` itself is patched, not the policy modules' ``time`` global: compiled modules
    (proxy_workers.compiled) do not look their globals up where a test could swap them."""
    now = [1_000_000.0 * 60 + 10.0]  # 10 s into a minute
    monkeypatch.setattr(time, "time", lambda: now[0])
    return now


def workers(n: int, model: str = "m", **fields: Any) -> list[Worker]:
    return [Worker(slot=i, url=f"http://10.0.0.{i + 1}:8000", models=(model,), **fields) for i in range(n)]


def table(env: PolicyEnv, fleet: list[Worker], aliases: dict[str, dict[str, float]] | None = None,
          model_policies: dict | None = None) -> RoutingTable:
    """The routing table a proxy builds from the snapshot a coordinator would publish for ``fleet``."""
    index: dict[str, list[int]] = {}
    for w in fleet:
        for m in w.models:
            index.setdefault(m, []).append(w.slot)
    shards = topology.model_shards(fleet)
    snap = Snapshot(generation=1, proxies=env.proxies, settings=env.settings, workers=tuple(fleet),
                    models={m: tuple(s) for m, s in index.items()}, model_policies=model_policies or {},
                    routers=topology.assign_routers(fleet), shards=shards,
                    rings=topology.RingCache().rings(fleet, shards), aliases=aliases or {})
    return RoutingTable(snap, env, None)


def request(model: str = "m", key: str | None = None, messages: list[dict] | None = None,
            explain: bool = True, **body: Any) -> RequestContext:
    doc = {"model": model, "messages": messages or [{"role": "user", "content": "hi"}], **body}
    raw = json.dumps(doc).encode()
    headers = [(b"content-type", b"application/json")]
    if key is not None:
        headers.append((b"x-session-id", key.encode()))
    return RequestContext(model, ROUTING_DECODER.decode(raw), raw, headers, b"10.9.9.9", HASH_HEADERS,
                          "random", explain=explain)


# --------------------------------------------------------------------------------------------
# shm.hashing


def test_key_hash_is_64_bit_blake2b_little_endian() -> None:
    for key in ("", "user-1", "m\0session"):
        expected = int.from_bytes(hashlib.blake2b(key.encode(), digest_size=8).digest(), "little")
        assert key_hash(key) == expected == key_hash(key.encode())
    assert key_hash("a") != key_hash("b")


def test_ring_is_deterministic_sorted_and_sized_by_vnodes() -> None:
    names = [f"shard-{i}" for i in range(5)]
    ring = build_ring(names)
    assert ring == build_ring(names)  # every process builds the same bytes
    view = RingView(ring)
    assert len(view) == 5 * vnodes_for(5) == 5 * 160
    assert list(view.points) == sorted(view.points)
    assert Counter(view.owners) == {i: 160 for i in range(5)}
    weighted = RingView(build_ring(["a", "b"], [3, 1]))
    assert Counter(weighted.owners) == {0: 480, 1: 160}
    assert vnodes_for(0) == 0 and vnodes_for(10_000) == 20 and vnodes_for(1_000_000) == 8


def test_adding_a_shard_moves_about_one_in_n_keys_all_to_the_new_shard() -> None:
    ten = [f"shard-{i}" for i in range(10)]
    eleven = [*ten, "shard-10"]
    before, after = RingView(build_ring(ten)), RingView(build_ring(eleven))
    moved = 0
    for i in range(10_000):
        h = key_hash(f"key-{i}")
        old, new = before.members[before.first(h)], after.members[after.first(h)]
        if old != new:
            moved += 1
            assert new == "shard-10", (i, old, new)
    assert 0.5 / 11 <= moved / 10_000 <= 1.6 / 11, moved


def test_removing_a_shard_moves_only_its_keys_and_spreads_them() -> None:
    ten = [f"shard-{i}" for i in range(10)]
    nine = [s for s in ten if s != "shard-3"]
    before, after = RingView(build_ring(ten)), RingView(build_ring(nine))
    heirs: Counter[str] = Counter()
    for i in range(10_000):
        h = key_hash(f"key-{i}")
        old, new = before.members[before.first(h)], after.members[after.first(h)]
        if old == "shard-3":
            heirs[new] += 1
        else:
            assert new == old, (i, old, new)
    assert sum(heirs.values()) > 0
    assert len(heirs) >= 5, heirs  # virtual nodes spread the orphaned keys over many shards


def test_walk_gives_the_owner_then_each_backup_once_in_clockwise_order() -> None:
    view = RingView(build_ring([f"s{i}" for i in range(6)]))
    for i in range(200):
        h = key_hash(f"k{i}")
        order = list(view.walk(h))
        assert sorted(order) == list(range(6))
        assert order[0] == view.first(h)
        # The backup is the owner of the first point clockwise that belongs to someone else.
        start = next(j for j, p in enumerate(view.points) if p >= h) if h <= view.points[-1] else 0
        j = start
        while view.owners[j % len(view)] == order[0]:
            j += 1
        assert order[1] == view.owners[j % len(view)]
        assert view.find(h, lambda o, first=order[0]: o != first) == order[1]
    assert view.find(1, lambda o: False) is None


# --------------------------------------------------------------------------------------------
# shm.affinity


def test_affinity_first_created_entry_wins_across_regions(shared: Shared) -> None:
    table_ = shared.affinity
    table_.record(1, 42, slot=7, now=100.0)            # proxy 1 placed the session first
    table_.record(0, 42, slot=3, now=101.0)            # proxy 0 raced and placed it elsewhere
    assert table_.lookup(42, 2, now=102.0, ttl=60) == (7, 100.0)
    assert table_.lookup(42, 2, now=102.0, ttl=60, latest=True) == (3, 101.0)
    assert table_.lookup(42, 1, now=102.0, ttl=60) == (3, 101.0)  # only region 0 scanned
    assert table_.lookup(43, 2, now=102.0, ttl=60) is None
    # An unusable slot (its worker failed) is passed over.
    assert table_.lookup(42, 2, now=102.0, ttl=60, usable=lambda s: s != 7) == (3, 101.0)


def test_affinity_entries_expire_after_ttl_since_last_seen(shared: Shared) -> None:
    table_ = shared.affinity
    table_.record(0, 5, slot=2, now=100.0)
    table_.record(0, 5, slot=2, now=150.0)  # a refresh keeps created, moves last_seen
    assert table_.lookup(5, 2, now=159.0, ttl=10) == (2, 100.0)
    assert table_.lookup(5, 2, now=160.5, ttl=10) is None
    table_.forget(0, 5)
    assert table_.lookup(5, 2, now=151.0, ttl=10) is None


def test_affinity_full_probe_window_evicts_the_least_recently_seen(shared: Shared) -> None:
    table_ = shared.affinity
    cap = table_.capacity
    keys = [7 + i * cap for i in range(PROBES)]  # same home bucket: the window fills up
    for i, k in enumerate(keys):
        table_.record(0, k, slot=i, now=100.0 + i)
    table_.record(0, keys[0], slot=0, now=200.0)  # refreshed: no longer the oldest
    newcomer = 7 + PROBES * cap
    table_.record(0, newcomer, slot=9, now=201.0)
    assert table_.lookup(newcomer, 1, now=202.0, ttl=1e6) == (9, 201.0)
    assert table_.lookup(keys[1], 1, now=202.0, ttl=1e6) is None  # the least recently seen left
    assert table_.lookup(keys[0], 1, now=202.0, ttl=1e6) == (0, 100.0)


def test_affinity_forget_leaves_no_stale_copy_behind(shared: Shared) -> None:
    table_ = shared.affinity
    cap = table_.capacity
    first, key = 11, 11 + cap  # same home bucket: key's entry sits after first's
    table_.record(0, first, slot=1, now=100.0)
    table_.record(0, key, slot=2, now=100.0)
    table_.forget(0, first)
    assert table_.lookup(first, 1, now=101.0, ttl=1e6) is None
    table_.record(0, key, slot=5, now=102.0)  # the key moves to another worker
    assert table_.lookup(key, 1, now=103.0, ttl=1e6) == (5, 102.0)
    table_.forget(0, key)
    assert table_.lookup(key, 1, now=104.0, ttl=1e6) is None  # no older copy resurfaces


# --------------------------------------------------------------------------------------------
# simple policies


def test_registry_implements_exactly_the_declared_policies(shared: Shared) -> None:
    assert set(POLICIES) == set(POLICY_NAMES) and len(POLICY_NAMES) == 13
    for name in POLICY_NAMES:
        assert make_policy(name, shared.env()).name == name
    with pytest.raises(ValueError, match="unknown policy"):
        make_policy("fastest", shared.env())


def test_round_robin_visits_every_worker_in_turn(shared: Shared) -> None:
    route = table(shared.env(policy="round_robin"), workers(3)).routes["m"]
    picks = [route.pick(request()).slot for _ in range(9)]
    assert sorted(picks) == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert picks[:3] == picks[3:6] == picks[6:]


def test_weighted_round_robin_is_smooth_like_nginx(shared: Shared) -> None:
    fleet = [Worker(slot=0, url="http://a:1", models=("m",), weight=5),
             Worker(slot=1, url="http://b:1", models=("m",), weight=1),
             Worker(slot=2, url="http://c:1", models=("m",), weight=1)]
    route = table(shared.env(policy="weighted_round_robin"), fleet).routes["m"]
    ctx = request()
    picks = "".join("abc"[route.pick(ctx).slot] for _ in range(14))
    # nginx's cycle for {a:5, b:1, c:1}, entered anywhere (proxies need not move in lockstep).
    assert any(picks == ("aabacaa" * 3)[k:k + 14] for k in range(7)), picks
    assert ctx.reason


def test_weighted_random_follows_the_weights(shared: Shared) -> None:
    fleet = [Worker(slot=0, url="http://a:1", models=("m",), weight=3),
             Worker(slot=1, url="http://b:1", models=("m",), weight=1)]
    route = table(shared.env(policy="weighted_random"), fleet).routes["m"]
    route.policy.rng = random.Random(7)
    counts = Counter(route.pick(request()).slot for _ in range(4000))
    assert 0.70 <= counts[0] / 4000 <= 0.80, counts


def test_least_connections_sees_load_held_by_another_proxy(shared: Shared) -> None:
    fleet = workers(3)
    env0 = shared.env(proxy=0, proxies=2, policy="least_connections")
    route = table(env0, fleet).routes["m"]
    shared.set_in_flight(1, 0, 4)  # proxy 1 holds 4 requests on worker 0, proxy 0 holds none
    shared.set_in_flight(1, 1, 1)
    shared.set_in_flight(0, 1, 1)
    ctx = request()
    assert {route.pick(ctx).slot for _ in range(10)} == {2}
    assert ctx.scores["in_flight"] == {fleet[0].url: 4, fleet[1].url: 2, fleet[2].url: 0}
    assert "all proxies" in ctx.reason
    # Ties rotate instead of piling onto the first worker.
    shared.set_in_flight(0, 2, 2)
    assert {route.pick(request()).slot for _ in range(10)} == {1, 2}


def test_power_of_two_never_sends_to_the_busy_one_of_two(shared: Shared) -> None:
    route = table(shared.env(policy="power_of_two"), workers(2)).routes["m"]
    shared.set_in_flight(1, 0, 5)
    assert {route.pick(request()).slot for _ in range(200)} == {1}


def test_least_latency_prefers_the_lower_ttfb_average_over_all_proxies(shared: Shared) -> None:
    fleet = workers(3)
    route = table(shared.env(policy="least_latency"), fleet).routes["m"]
    board = shared.board
    # Every proxy has measured every worker; worker 1 is fastest overall though proxy 0 alone
    # would call worker 2 the fastest.
    for proxy, slot, ewma in ((0, 0, 0.50), (1, 0, 0.40), (0, 1, 0.30), (1, 1, 0.10), (0, 2, 0.25),
                              (1, 2, 0.25)):
        board.ints[board.cell_word(proxy, slot, W_REQUESTS)] = 10
        board.floats[board.cell_word(proxy, slot, W_TTFB_EWMA)] = ewma
    ctx = request()
    assert route.pick(ctx).slot == 1  # mean 0.2 < 0.25 < 0.45
    assert "time to first byte" in ctx.reason
    unmeasured = table(shared.env(policy="least_latency"), workers(4)).routes["m"]
    assert unmeasured.pick(request()).slot == 3  # never measured: tried first


# --------------------------------------------------------------------------------------------
# consistent hashing


def test_consistent_hash_keeps_a_key_and_fails_over_clockwise(shared: Shared) -> None:
    fleet = workers(5)
    env = shared.env(policy="consistent_hash")
    route = table(env, fleet).routes["m"]
    members = sorted(w.url for w in fleet)
    view = RingView(build_ring(members))
    for i in range(50):
        key = f"user-{i}"
        order = [view.members[o] for o in view.walk(key_hash(f"m\0{key}"))]
        ctx = request(key=key)
        picked = route.pick(ctx)
        assert picked.url == order[0] and not ctx.fallback
        assert route.pick(request(key=key)).url == order[0]
        # The owner is down (not in the snapshot's healthy list): the next owner clockwise serves.
        down = [w if w.url != order[0] else Worker(slot=w.slot, url=w.url, models=w.models, healthy=False)
                for w in fleet]
        backup_ctx = request(key=key)
        assert table(env, down).routes["m"].pick(backup_ctx).url == order[1]
        assert backup_ctx.fallback and "next on the ring" in backup_ctx.reason
        # A retry that already tried the owner also goes to the backup.
        owner_slot = next(w.slot for w in fleet if w.url == order[0])
        assert route.pick(request(key=key), exclude=[owner_slot]).url == order[1]


def test_consistent_hash_without_a_key_is_a_reported_fallback(shared: Shared) -> None:
    route = table(shared.env(policy="consistent_hash"), workers(4)).routes["m"]
    ctx = request()
    route.pick(ctx)
    assert ctx.fallback and "no routing key" in ctx.reason
    # The body's user field is a key.
    keyed = request(user="alice")
    assert keyed.routing_key() == "alice"
    route.pick(keyed)
    assert not keyed.fallback


def test_consistent_hash_bounded_spills_past_a_worker_above_the_bound(shared: Shared) -> None:
    fleet = workers(4)
    route = table(shared.env(policy="consistent_hash_bounded", bounded_load_factor=1.25), fleet).routes["m"]
    view = RingView(build_ring(sorted(w.url for w in fleet)))
    order = [view.members[o] for o in view.walk(key_hash("m\0sess-1"))]
    slot_of = {w.url: w.slot for w in fleet}
    calm = request(key="sess-1")
    assert route.pick(calm).url == order[0] and not calm.fallback
    shared.set_in_flight(1, slot_of[order[0]], 6)   # the owner is busy (via another proxy)
    shared.set_in_flight(0, slot_of[order[1]], 1)
    # mean with the new request = 8/4 = 2, limit 2.5: the owner (6+1) is above, the next (1+1) is not
    ctx = request(key="sess-1")
    assert route.pick(ctx).url == order[1]
    assert ctx.fallback and "load bound" in ctx.reason
    # Everyone above the bound: the key's own worker anyway, reported as a fallback.
    for w in fleet:
        shared.set_in_flight(0, w.slot, 0)
        shared.set_in_flight(1, w.slot, 0)
    bounded = table(shared.env(policy="consistent_hash_bounded"), workers(1)).routes["m"]
    shared.set_in_flight(0, 0, 9)
    assert bounded.pick(request(key="sess-1")).slot == 0


# --------------------------------------------------------------------------------------------
# session affinity


def test_session_affinity_agrees_across_proxies_and_expires(shared: Shared, clock: list[float]) -> None:
    fleet = workers(3)
    routes = [table(shared.env(proxy=p, proxies=2, policy="session_affinity", session_ttl=30), fleet)
              .routes["m"] for p in (0, 1)]
    first = request(key="s1")
    home = routes[0].pick(first).slot
    assert "new session" in first.reason
    for i in range(10):
        clock[0] += 5  # well inside the TTL each time
        ctx = request(key="s1")
        assert routes[i % 2].pick(ctx).slot == home
        assert ctx.reason == "session's worker"
    # The home worker gets busy: the session still stays while it is live.
    shared.set_in_flight(1, home, 10)
    assert routes[1].pick(request(key="s1")).slot == home
    # Idle past the TTL: a new assignment, to a less loaded worker.
    clock[0] += 31
    ctx = request(key="s1")
    moved = routes[1].pick(ctx).slot
    assert moved != home and "new session" in ctx.reason
    assert routes[0].pick(request(key="s1")).slot == moved


def test_session_affinity_moves_on_failure_and_keeps_the_new_worker(shared: Shared,
                                                                     clock: list[float]) -> None:
    fleet = workers(3)
    envs = [shared.env(proxy=p, proxies=2, policy="session_affinity") for p in (0, 1)]
    routes = [table(env, fleet).routes["m"] for env in envs]
    home = routes[0].pick(request(key="s2")).slot
    routes[1].pick(request(key="s2"))  # proxy 1 also holds an entry for the home worker
    # The home worker fails mid-request on proxy 1: the retry excludes it.
    ctx = request(key="s2")
    new = routes[1].pick(ctx, exclude=[home]).slot
    assert new != home and ctx.fallback and "moved" in ctx.reason
    clock[0] += 1
    # Both proxies now agree on the new worker, even while the old one is still listed healthy...
    assert [r.pick(request(key="s2")).slot for r in routes * 3] == [new] * 6
    # ...and when the snapshot marks it down.
    down = [w if w.slot != home else Worker(slot=w.slot, url=w.url, models=w.models, healthy=False)
            for w in fleet]
    assert [table(env, down).routes["m"].pick(request(key="s2")).slot for env in envs] == [new, new]


def test_session_affinity_dry_run_remembers_nothing(shared: Shared, clock: list[float]) -> None:
    route = table(shared.env(policy="session_affinity"), workers(3)).routes["m"]
    ctx = request(key="s3")
    ctx.dry_run = True
    route.pick(ctx)
    assert shared.affinity.lookup(ctx.key_hash(), 2, clock[0], 300) is None
    real = request(key="s3")
    slot = route.pick(real).slot
    assert shared.affinity.lookup(real.key_hash(), 2, clock[0], 300)[0] == slot


def test_new_sessions_spread_over_an_idle_fleet(shared: Shared, clock: list[float]) -> None:
    route = table(shared.env(policy="session_affinity"), workers(3)).routes["m"]
    homes = {route.pick(request(key=f"user-{i}")).slot for i in range(60)}
    assert homes == {0, 1, 2}


# --------------------------------------------------------------------------------------------
# cache-aware


SYSTEM = "You are a meticulous assistant. " * 30


def conversation(turns: int, topic: str) -> list[dict[str, str]]:
    messages = [{"role": "system", "content": f"{topic}: {SYSTEM}"}]
    for t in range(turns):
        messages.append({"role": "user", "content": f"Question {t} about {topic}, please explain in detail."})
        if t < turns - 1:
            messages.append({"role": "assistant", "content": f"Answer {t}: " + "some words " * 8})
    return messages


def test_cache_aware_keeps_a_growing_conversation_on_one_worker_across_proxies(shared: Shared) -> None:
    fleet = workers(3)
    routes = [table(shared.env(proxy=p, proxies=2, policy="cache_aware"), fleet).routes["m"] for p in (0, 1)]
    first = routes[0].pick(request(messages=conversation(1, "tides"))).slot
    for turn in range(2, 8):
        ctx = request(messages=conversation(turn, "tides"))
        assert routes[turn % 2].pick(ctx).slot == first, turn
        assert not ctx.fallback and ctx.reason == "prefix cached on this worker"
        assert ctx.scores["match_rate"] > 0.3


def test_cache_aware_spreads_cold_prompts_and_balances_when_imbalanced(shared: Shared) -> None:
    fleet = workers(3)
    route = table(shared.env(policy="cache_aware", balance_abs_threshold=2), fleet).routes["m"]
    cold = Counter(route.pick(request(messages=conversation(1, f"topic {i}"))).slot for i in range(60))
    assert len(cold) == 3, cold
    home = route.pick(request(messages=conversation(1, "volcanoes"))).slot
    assert route.pick(request(messages=conversation(2, "volcanoes"))).slot == home
    shared.set_in_flight(1, home, 3)  # 3 - 0 > 2 and 3 > 0 * 1.5: imbalanced
    ctx = request(messages=conversation(3, "volcanoes"))
    moved = route.pick(ctx).slot
    assert moved != home
    assert ctx.fallback and "imbalanced" in ctx.reason
    assert ctx.scores["max_load"] == 3 and ctx.scores["min_load"] == 0


# --------------------------------------------------------------------------------------------
# measured load: engine figures and quotas


def test_least_loaded_uses_fresh_engine_figures(shared: Shared, clock: list[float]) -> None:
    fleet = workers(2)
    route = table(shared.env(policy="least_loaded", metrics_interval=1.0), fleet).routes["m"]
    board = shared.board
    for slot, running, waiting in ((0, 4, 2), (1, 1, 0)):
        base = board.engine_word(slot)
        board.ints[base + E_RUNNING], board.ints[base + E_WAITING] = running, waiting
        board.floats[base + E_SCRAPED_AT] = clock[0]
    ctx = request()
    assert route.pick(ctx).slot == 1
    assert "engine metrics" in ctx.reason and ctx.scores["queue"] == 1
    # The router's own in-flight count is a floor for what an engine has not reported yet.
    shared.set_in_flight(0, 1, 9)
    assert route.pick(request()).slot == 0
    # Stale figures (older than 3 scrape intervals) are not trusted.
    for slot in (0, 1):
        board.floats[board.engine_word(slot) + E_SCRAPED_AT] = clock[0] - 10
    stale = request()
    assert route.pick(stale).slot == 0  # least in-flight: 0 < 9
    assert stale.fallback and "no fresh engine metrics" in stale.reason


def test_quota_aware_refuses_at_the_limit_with_retry_after(shared: Shared, clock: list[float]) -> None:
    fleet = [Worker(slot=i, url=f"http://q{i}:1", models=("m",), quota_rpm=3) for i in range(2)]
    routes = [table(shared.env(proxy=p, proxies=2, policy="quota_aware", quota_headroom=1.0), fleet)
              .routes["m"] for p in (0, 1)]
    picks = Counter(routes[i % 2].pick(request()).slot for i in range(6))
    assert picks == {0: 3, 1: 3}  # budgets are global: both proxies' counts add up
    with pytest.raises(QuotaExceeded) as err:
        routes[0].pick(request())
    # 10 s into the minute, 3 of 3 used on each worker: the next minute starts with all 3 still
    # counted, and they decay to 2 (room for one) 20 s into it: 50 + 20 s from now.
    assert err.value.status == 429 and err.value.retry_after == 71
    assert b"retry-after: 71" in err.value.headers()
    # Dry runs (POST /route/explain) do not spend budget.
    # The window slides: 30 s into the next minute, half of the last minute still counts
    # (3 * 0.5 = 1.5 per worker), so each worker takes one more ((1.5 + 1) / 3 <= 1), not two.
    clock[0] += 80
    dry = request()
    dry.dry_run = True
    routes[0].pick(dry)
    assert Counter(routes[0].pick(request()).slot for _ in range(2)) == {0: 1, 1: 1}
    with pytest.raises(QuotaExceeded) as err:
        routes[1].pick(request())
    # 1 + 3 x (1 - t / 60) <= 2 from t = 40 s: 10 s from now.
    assert err.value.retry_after == 11


def test_quota_retry_after_is_when_admission_next_succeeds(shared: Shared, clock: list[float]) -> None:
    """Refused at random moments (across minute boundaries, from two proxies), a client that
    waits Retry-After seconds is admitted, and one second less is still refused."""
    tokens = request().estimated_tokens()
    fleet = [Worker(slot=0, url="http://rpm:1", models=("m",), quota_rpm=4),
             Worker(slot=1, url="http://tpm:1", models=("m",), quota_tpm=5 * tokens)]
    routes = [table(shared.env(proxy=p, proxies=2, policy="quota_aware", quota_headroom=0.9), fleet)
              .routes["m"] for p in (0, 1)]
    rng = random.Random(14)

    def admitted(proxy: int) -> bool:
        probe = request()
        probe.dry_run = True  # decides without spending budget
        try:
            routes[proxy].pick(probe)
        except QuotaExceeded:
            return False
        return True

    refusals = crossing = 0
    for step in range(300):
        clock[0] += rng.uniform(0.0, 6.0)
        try:
            routes[step % 2].pick(request())
            continue
        except QuotaExceeded as err:
            wait = err.retry_after
        refusals += 1
        crossing += (clock[0] + wait) // 60 > clock[0] // 60  # admitted in a later minute
        clock[0] += wait - 1
        assert wait == 1 or not admitted(rng.randrange(2)), (step, wait)
        clock[0] += 1
        assert admitted(rng.randrange(2)), (step, wait)
    assert refusals >= 30 and crossing >= 5, (refusals, crossing)


def test_quota_headroom_avoids_a_worker_near_its_limit(shared: Shared, clock: list[float]) -> None:
    fleet = [Worker(slot=0, url="http://small:1", models=("m",), quota_rpm=10),
             Worker(slot=1, url="http://big:1", models=("m",), quota_rpm=1000)]
    route = table(shared.env(policy="quota_aware", quota_headroom=0.5), fleet).routes["m"]
    picks = Counter(route.pick(request()).slot for _ in range(40))
    assert picks[0] <= 5 and picks[1] >= 35  # slot 0 is left once half its budget is used


# --------------------------------------------------------------------------------------------
# shards, router selection, aliases, topology


def test_sharded_model_routes_by_key_and_fails_over_to_the_backup_shard(shared: Shared) -> None:
    fleet = [Worker(slot=i, url=f"http://w{i}:1", models=("m",), shard=s)
             for i, s in enumerate(["a", "a", "b", "c"])]
    env = shared.env(policy="round_robin")
    route = table(env, fleet).routes["m"]
    view = RingView(build_ring(["a", "b", "c"]))
    for i in range(40):
        key = f"k{i}"
        order = [view.members[o] for o in view.walk(key_hash(f"m\0{key}"))]
        ctx = request(key=key)
        w = route.pick(ctx)
        assert ctx.shard == order[0] and w.shard == order[0] and not ctx.fallback
        in_owner = [x.slot for x in fleet if x.shard == order[0]]
        backup = request(key=key)
        w = route.pick(backup, exclude=in_owner)
        assert backup.shard == order[1] == w.shard
        assert backup.fallback and "backup shard" in backup.reason
    with pytest.raises(NoHealthyWorker):
        route.pick(request(key="x"), exclude=[0, 1, 2, 3])


def test_select_router_follows_the_seed_rules(monkeypatch: pytest.MonkeyPatch) -> None:
    # The build without a PD data path (issue 3); PD preference is checked below.
    monkeypatch.setattr(selection, "IMPLEMENTED", frozenset({"http_regular"}))
    routers = topology.assign_routers([
        Worker(slot=0, url="http://w1:1", models=("llama",)),
        Worker(slot=1, url="http://w2:1", models=("llama",), type="prefill"),
        Worker(slot=2, url="http://w3:1", models=("llama",), type="decode"),
        Worker(slot=3, url="grpc://w4:1", models=("mistral",), connection="grpc"),
        Worker(slot=4, url="http://w5:1", models=("qwen",)),
        Worker(slot=5, url="grpc://w6:1", models=("qwen",), connection="grpc")])
    by_model = routers_by_model(routers)
    assert by_model == {"llama": ("http_pd", "http_regular"), "qwen": ("http_regular", "grpc_regular"),
                        "mistral": ("grpc_regular",)}
    fell_back = "http_pd not available in this build: fell back to http_regular"
    assert select_router("llama", by_model["llama"], "any") == ("http_regular", fell_back)
    assert select_router("qwen", by_model["qwen"], "any") == ("http_regular", "preferred router")
    assert select_router("qwen", by_model["qwen"], "http") == ("http_regular", "preferred router")
    with pytest.raises(NoHealthyWorker, match="grpc_regular, whose data path is not available"):
        select_router("qwen", by_model["qwen"], "grpc")
    with pytest.raises(NoHealthyWorker, match="has no grpc router"):
        select_router("llama", by_model["llama"], "grpc")
    with pytest.raises(ModelNotFound):
        select_router("gpt-5", (), "any")
    # Only the routers preferred over the chosen one are named as passed over.
    assert select_router("llama", ("http_pd", "http_regular", "grpc_regular"), "any") == (
        "http_regular", fell_back)
    # Once the PD data path exists, PD is preferred over regular.
    monkeypatch.setattr(selection, "IMPLEMENTED", frozenset({"http_regular", "http_pd"}))
    assert select_router("llama", by_model["llama"], "any") == ("http_pd", "preferred router")
    assert select_router("llama", by_model["llama"], "http") == ("http_pd", "preferred router")


def test_alias_draws_converge_to_the_weights_over_served_targets() -> None:
    aliases = {"chat": {"m1": 0.7, "m2": 0.3}, "dead": {"gone": 1.0}}
    rng = random.Random(3)
    draws = Counter(resolve_alias("chat", aliases, {"m1": 1, "m2": 1}, rng) for _ in range(10_000))
    assert 0.68 <= draws["m1"] / 10_000 <= 0.72
    assert {resolve_alias("chat", aliases, {"m2": 1}, rng) for _ in range(20)} == {"m2"}
    assert resolve_alias("m1", aliases, {"m1": 1}, rng) == "m1"
    with pytest.raises(NoHealthyWorker, match="no served target"):
        resolve_alias("dead", aliases, {"m1": 1}, rng)
    # A target whose workers are all down (a route without candidates) gets no share.
    down, up = SimpleNamespace(candidates=[]), SimpleNamespace(candidates=["w"])
    assert {resolve_alias("chat", aliases, {"m1": down, "m2": up}, rng) for _ in range(50)} == {"m2"}
    with pytest.raises(NoHealthyWorker):
        resolve_alias("chat", aliases, {"m1": down, "m2": down}, rng)


def test_assign_routers_for_the_seed_deployment() -> None:
    fleet = [Worker(slot=0, url="http://worker1:8080", models=("llama-3.1-8b",)),
             Worker(slot=1, url="http://worker2:8080", models=("llama-3.1-8b",), type="prefill"),
             Worker(slot=2, url="http://worker3:8080", models=("llama-3.1-8b",), type="decode"),
             Worker(slot=3, url="grpc://worker4:50051", models=("mistral-7b",), connection="grpc"),
             Worker(slot=4, url="http://worker5:8080", models=("qwen-2.5",))]
    assert topology.assign_routers(fleet) == {"http_regular": ("llama-3.1-8b", "qwen-2.5"),
                                              "http_pd": ("llama-3.1-8b",),
                                              "grpc_regular": ("mistral-7b",)}
    # PD needs both halves: a prefill worker alone makes no PD router.
    assert topology.assign_routers(fleet[:2]) == {"http_regular": ("llama-3.1-8b",)}


def test_shards_and_rings_are_built_from_stable_names() -> None:
    fleet = [Worker(slot=3, url="http://b:1", models=("m",), shard="b"),
             Worker(slot=1, url="http://a:1", models=("m",), shard="a"),
             Worker(slot=2, url="http://a2:1", models=("m",), shard="a"),
             Worker(slot=4, url="http://p:1", models=("m",), shard="a", type="prefill"),
             Worker(slot=5, url="http://n2:1", models=("n",), weight=2),
             Worker(slot=0, url="http://n1:1", models=("n",))]
    shards = topology.model_shards(fleet)
    assert shards == {"m": {"a": (1, 2), "b": (3,)}}
    assert list(shards["m"]) == ["a", "b"]
    assert topology.ring_members("m", fleet, shards) == (("a", "b"), (1, 1))
    assert topology.ring_members("n", fleet, shards) == (("http://n1:1", "http://n2:1"), (1, 2))
    cache = topology.RingCache()
    rings = cache.rings(fleet, shards)
    assert rings["m"] == build_ring(["a", "b"]) and rings["n"] == build_ring(["http://n1:1", "http://n2:1"],
                                                                            [1, 2])
    # A health flip changes nothing in the rings; a new shard rebuilds that model's ring only.
    sick = [Worker(slot=w.slot, url=w.url, models=w.models, shard=w.shard, type=w.type, weight=w.weight,
                   healthy=False) for w in fleet]
    again = cache.rings(sick, shards)
    assert again["m"] is rings["m"] and again["n"] is rings["n"]
    grown = [*fleet, Worker(slot=6, url="http://c:1", models=("m",), shard="c")]
    grown_rings = cache.rings(grown, topology.model_shards(grown))
    assert grown_rings["m"].members == ("a", "b", "c") and grown_rings["n"] is rings["n"]


def test_routing_key_comes_from_headers_then_user_then_fallback() -> None:
    raw = json.dumps({"model": "m", "user": "bob"}).encode()
    fields = ROUTING_DECODER.decode(raw)

    def ctx(headers: list[tuple[bytes, bytes]], fallback: str = "random",
            body: bytes = raw) -> RequestContext:
        return RequestContext("m", ROUTING_DECODER.decode(body), body, headers, b"10.1.2.3", HASH_HEADERS,
                              fallback)

    assert ctx([(b"x-user-id", b"u"), (b"x-session-id", b"s")]).routing_key() == "s"  # setting's order
    assert ctx([(b"x-user-id", b"u")]).routing_key() == "u"
    assert ctx([]).routing_key() == fields.user == "bob"
    bare = json.dumps({"model": "m"}).encode()
    assert ctx([], body=bare).routing_key() is None and ctx([], body=bare).key_hash() is None
    assert ctx([], "client_ip", bare).routing_key() == "10.1.2.3"
    assert ctx([(b"x-session-id", b"s")]).key_hash() == key_hash("m\0s")


def test_every_decision_says_why(shared: Shared, clock: list[float]) -> None:
    fleet = workers(3)
    for name in POLICY_NAMES:
        route = table(shared.env(policy=name), fleet).routes["m"]
        ctx = request(key="k")
        assert route.pick(ctx) in fleet
        assert ctx.reason, name
        assert route.policy.name == name



def test_engine_scraping_is_wanted_for_least_loaded_on_either_pd_side() -> None:
    from coordinator.health.engine_metrics import wanted
    from shm.schema import ModelPolicy
    from shm.settings import Settings

    assert not wanted(Settings(), {"m": ModelPolicy(policy="round_robin")})
    assert wanted(Settings(policy="least_loaded"), {})
    assert wanted(Settings(), {"m": ModelPolicy(policy="least_loaded")})
    assert wanted(Settings(), {"m": ModelPolicy(prefill_policy="least_loaded")})
    assert wanted(Settings(), {"m": ModelPolicy(decode_policy="least_loaded")})
