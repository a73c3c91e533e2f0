"""The scanning policies on large fleets: exact up to ``scan.EXACT_LIMIT`` candidates, sampled
beyond, global (summed over proxies) either way, and safe on a retry's shortened list.

Role: behaviour only (no timing; speed is ``loadtest/bench_policies.py``'s job, and the quality
cost of sampling ``loadtest/policy_sampling.py``'s). Fleets are real: one model's workers in a
snapshot, two proxies' ``PolicyEnv`` over one load board in POSIX shared memory.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Iterator

import pytest

from proxy_workers.policies import native, scan
from proxy_workers.policies.base import PolicyEnv
from proxy_workers.routing.table import ModelRoute
from shm.affinity import AffinityTable, table_size
from shm.loadboard import W_IN_FLIGHT, W_REQUESTS, W_TTFB_EWMA, LoadBoard, board_size
from shm.segment import Segment, new_instance_id, segment_name
from shm.settings import Settings
from tests.test_policies_unit import conversation, request, table, workers

MAX_PROXIES, MAX_WORKERS = 4, 2048
LARGE = 1500  # above scan.EXACT_LIMIT: sampled
assert LARGE > scan.EXACT_LIMIT


class Board:
    """A load board in a fresh segment, with helpers to set global load."""

    def __init__(self) -> None:
        self.segment = Segment.create(segment_name(new_instance_id(), "board"),
                                      board_size(MAX_PROXIES, MAX_WORKERS))
        self.board = LoadBoard.create(self.segment, MAX_PROXIES, MAX_WORKERS)

    def env(self, proxy: int = 0, **settings: object) -> PolicyEnv:
        return PolicyEnv(self.board, proxy, 2, Settings(max_workers=MAX_WORKERS, **settings), None)  # type: ignore[arg-type]

    def set(self, proxy: int, slot: int, field: int, value: float) -> None:
        word = self.board.cell_word(proxy, slot, field)
        if isinstance(value, float):
            self.board.floats[word] = value
        else:
            self.board.ints[word] = value

    def in_flight(self, slot: int) -> int:
        return self.board.worker_in_flight(slot, 2)


@pytest.fixture
def shared() -> Iterator[Board]:
    b = Board()
    yield b
    b.board.close()  # the policies' C figures hold the mapping, not the board's memoryviews
    b.segment.close()
    b.segment.unlink()


def route_of(b: Board, policy: str, n: int, proxy: int = 0) -> ModelRoute:
    return table(b.env(proxy=proxy, policy=policy), workers(n)).routes["m"]


def test_a_large_fleet_is_sampled_and_still_finds_the_idle_half(shared: Board) -> None:
    rng = random.Random(1)
    idle = set(rng.sample(range(LARGE), LARGE // 2))
    for slot in range(LARGE):
        if slot not in idle:  # held by the other proxy: only the global sum shows it
            shared.set(1, slot, W_IN_FLIGHT, 3)
    route = route_of(shared, "least_connections", LARGE)
    picks = Counter(route.pick(request()).slot for _ in range(300))
    assert set(picks) <= idle
    assert len(picks) > 100  # spread over the idle workers, not one


def test_up_to_the_exact_limit_the_single_idle_worker_is_found(shared: Board) -> None:
    n = scan.EXACT_LIMIT
    for slot in range(n):
        shared.set(1, slot, W_IN_FLIGHT, 2)
    shared.set(1, 777, W_IN_FLIGHT, 0)
    shared.set(0, 777, W_IN_FLIGHT, 1)  # 1 < 2: the least loaded overall
    for policy in ("least_connections", "session_affinity", "cache_aware"):
        route = route_of(shared, policy, n)
        assert {route.pick(request()).slot for _ in range(20)} == {777}, policy


def test_least_latency_samples_large_fleets_over_both_proxies(shared: Board) -> None:
    for slot in range(LARGE):
        for proxy in (0, 1):
            shared.set(proxy, slot, W_REQUESTS, 10)
            shared.set(proxy, slot, W_TTFB_EWMA, 0.5 if slot % 2 else 0.1)
    shared.set(1, 2, W_TTFB_EWMA, 5.0)  # slot 2 is fast for proxy 0 only
    route = route_of(shared, "least_latency", LARGE)
    picks = {route.pick(request()).slot for _ in range(200)}
    assert all(slot % 2 == 0 for slot in picks) and 2 not in picks


def test_a_retry_on_a_large_fleet_never_repeats_a_tried_worker(shared: Board) -> None:
    for policy in ("least_connections", "least_latency", "session_affinity", "cache_aware",
                   "consistent_hash_bounded"):
        route = route_of(shared, policy, LARGE)
        tried = list(range(0, LARGE, 2))  # half the fleet already failed this request
        for _ in range(30):
            assert route.pick(request(key="k"), tried).slot % 2 == 1, policy


def test_bounded_hash_keeps_keys_on_their_owner_on_an_idle_large_fleet(shared: Board) -> None:
    route = route_of(shared, "consistent_hash_bounded", LARGE)
    for i in range(50):
        ctx = request(key=f"user-{i}")
        first = route.pick(ctx).slot
        assert route.pick(request(key=f"user-{i}")).slot == first
        assert not ctx.fallback


def test_every_proxy_reads_the_same_global_loads(shared: Board) -> None:
    busy = set(range(0, scan.EXACT_LIMIT, 3))
    for slot in busy:
        shared.set(slot % 2, slot, W_IN_FLIGHT, 4)  # spread over both proxies' cells
    routes = [route_of(shared, "least_connections", scan.EXACT_LIMIT, proxy=p) for p in (0, 1)]
    for route in routes:
        assert not {route.pick(request()).slot for _ in range(50)} & busy


def test_cache_aware_on_a_sampled_fleet_counts_the_worker_holding_the_prefix(shared: Board) -> None:
    # A sample of the fleet rarely includes the worker that holds a popular prefix, so the
    # balance rule counts that worker's load too: above the threshold the conversation moves.
    seg = Segment.create(segment_name(new_instance_id(), "affinity"), table_size(MAX_PROXIES, 4096))
    try:
        affinity = AffinityTable.create(seg, MAX_PROXIES, 4096)
        env = PolicyEnv(shared.board, 0, 2, Settings(max_workers=MAX_WORKERS, policy="cache_aware"),
                        affinity)
        route = table(env, workers(LARGE)).routes["m"]
        home = route.pick(request(messages=conversation(1, "glaciers"))).slot
        shared.set(1, home, W_IN_FLIGHT, 3)  # 3 - 0 is within the default threshold (4)
        assert route.pick(request(messages=conversation(2, "glaciers"))).slot == home
        shared.set(1, home, W_IN_FLIGHT, 9)  # 9 - 0 > 4 and 9 > 0 x 1.5: imbalanced
        ctx = request(messages=conversation(3, "glaciers"))
        assert route.pick(ctx).slot != home
        assert ctx.fallback and "imbalanced" in ctx.reason and ctx.scores["max_load"] == 9
        affinity.close()
    finally:
        seg.close()
        seg.unlink()


needs_c_scan = pytest.mark.skipif(scan.C_FIGURE is None, reason="the C scan is not built (pure install)")


def figure_pair(b: Board, rows: list[list[int]], floats: bool,
                weights: list[int] | None) -> tuple[scan.Figure, scan.Figure]:
    """The same figure in C and in Python."""
    from array import array
    weighing = None if weights is None else scan.weighing(weights)
    index = array("q", [w for row in rows for w in row])
    scale, divide, unit = weighing or (None, False, 1.0)
    return (scan.C_FIGURE(b.board.ints.obj, index, len(rows[0]), floats, scale, divide, unit),
            scan.PyFigure(b.board, index, len(rows[0]), floats, scale, divide, unit))


@needs_c_scan
@pytest.mark.parametrize("weights", ["equal", "small lcm", "large lcm"])
def test_the_c_scan_answers_as_its_python_twin(shared: Board, weights: str) -> None:
    rng = random.Random(7)
    n = 300
    for slot in range(n):  # many ties: loads 0..3 over two proxies
        for proxy in (0, 1):
            shared.set(proxy, slot, W_IN_FLIGHT, rng.randrange(2))
            shared.set(proxy, slot, W_TTFB_EWMA, rng.choice([0.0, 0.25, 0.5]))
    ws = {"equal": [2] * n, "small lcm": [rng.choice([1, 2, 3]) for _ in range(n)],
          "large lcm": [rng.choice([1_000_003, 999_983, 7]) for _ in range(n)]}[weights]
    board = shared.board
    cells = [[board.cell_word(p, slot) for p in (0, 1)] for slot in range(n)]
    flight = figure_pair(shared, [[c + W_IN_FLIGHT for c in row] for row in cells], False, ws)
    ttfb = figure_pair(shared, [[c + W_TTFB_EWMA for c in row] for row in cells], True, None)
    for c_fig, py_fig in (flight, ttfb):
        assert c_fig.positions == py_fig.positions == n
        memory: tuple[int, ...] = ()
        for _ in range(200):
            start = rng.randrange(n - 1)
            count = rng.randrange(1, n - start + 1)
            weighted = rng.random() < 0.7
            want_k, want_score = py_fig.lowest(start, count, weighted)
            got_k, got_score = c_fig.lowest(start, count, weighted)
            assert got_k == want_k and got_score == pytest.approx(want_score)
            assert c_fig.extent(start, count) == py_fig.extent(start, count)
            assert c_fig.total(start, count) == py_fig.total(start, count)
            window = min(count, 64)
            got = c_fig.sample(start, window, memory, scan.MEMORY, weighted)
            want = py_fig.sample(start, window, memory, scan.MEMORY, weighted)
            assert got[0] == want[0] and got[2] == want[2] and got[1] == pytest.approx(want[1])
            memory = got[2]
            i, j = rng.randrange(n), rng.randrange(n)
            assert c_fig.lower(i, j) == py_fig.lower(i, j)


@needs_c_scan
def test_the_c_scan_never_reads_outside_the_board(shared: Board) -> None:
    from array import array
    mapping, words = shared.board.ints.obj, len(shared.board.ints)
    with pytest.raises(ValueError, match="outside the board"):
        scan.C_FIGURE(mapping, array("q", [0, words]), 1, False)
    with pytest.raises(ValueError, match="outside the board"):
        scan.C_FIGURE(mapping, array("q", [-1]), 1, False)
    fig = scan.C_FIGURE(mapping, array("q", [1, 2, 3, 4]), 2, False)
    for bad in ((0, 3), (-1, 1), (2, 1), (0, 0)):
        with pytest.raises(IndexError):
            fig.lowest(*bad, True)
    with pytest.raises(IndexError):
        fig.sample(0, 1, (2,), 1, True)  # a remembered position beyond the list
    with pytest.raises(ValueError):
        scan.C_FIGURE(mapping, array("q", [1, 2, 3]), 2, False)  # not positions x rows


@pytest.mark.skipif(native.C_AFFINITY is None, reason="the C affinity operations are not built")
def test_the_c_affinity_operations_leave_the_table_as_python_does() -> None:
    """The same random lookups and records on two tables, one through shm.affinity in Python and
    one through _affinity.c: the same answers and, after every step, the same bytes."""
    proxies, capacity = 3, 64  # small: windows fill, entries are evicted, keys collide
    segs = [Segment.create(segment_name(new_instance_id(), "affinity"), table_size(proxies, capacity))
            for _ in range(2)]
    try:
        py_table, c_table = (AffinityTable.create(seg, proxies, capacity) for seg in segs)
        c_ops = native.affinity_ops(c_table)
        assert c_ops is not c_table
        rng = random.Random(11)
        keys = [rng.getrandbits(64) for _ in range(120)] + [0, 1, 64, 128]
        now = 1000.0
        for step in range(4000):
            now += rng.random()
            key, proxy, slot = rng.choice(keys), rng.randrange(proxies), rng.randrange(8)
            op = rng.randrange(4)
            if op == 0:
                usable = None if rng.random() < 0.5 else (lambda s: s % 3 != 0)
                latest = rng.random() < 0.5
                ttl = rng.choice([5.0, 60.0])
                assert c_ops.lookup(key, proxies, now, ttl, usable, latest=latest) == \
                    py_table.lookup(key, proxies, now, ttl, usable, latest=latest), step
            elif op == 1:
                created = None if rng.random() < 0.7 else now - rng.random()
                py_table.record(proxy, key, slot, now, created)
                c_ops.record(proxy, key, slot, now, created)
            elif op == 2:
                many = rng.sample(keys, 5)
                py_table.record_many(proxy, many, slot, now)
                c_ops.record_many(proxy, many, slot, now)
            else:
                py_table.forget(proxy, key)
                c_table.forget(proxy, key)
            assert bytes(segs[0].buf) == bytes(segs[1].buf), step
        del c_ops
        py_table.close()
        c_table.close()
    finally:
        for seg in segs:
            seg.close()
            seg.unlink()


@pytest.mark.skipif(native.C_KEYS is None, reason="the C prefix CRCs are not built")
def test_the_c_prefix_keys_are_zlibs_crc32_chained() -> None:
    import zlib
    rng = random.Random(5)
    for n in (0, 1, 7, 8, 9, 63, 64, 65, 1000, 40_000):
        data = rng.randbytes(n)
        offsets = sorted({rng.randrange(n + 1) for _ in range(rng.randrange(6))}) if n else []
        seed = rng.getrandbits(32)
        want, crc, at = [], seed, 0
        for offset in (*offsets, n):
            crc = zlib.crc32(data[at:offset], crc)
            want.append((offset, (offset << 32) | crc))
            at = offset
        assert native.C_KEYS(data, offsets, n, seed) == want
        assert native.C_KEYS(memoryview(data)[1:], [], max(n - 1, 0), seed)[-1][1] & 0xFFFFFFFF == \
            zlib.crc32(data[1:], seed)  # unaligned starts
    with pytest.raises(ValueError, match="outside"):
        native.C_KEYS(b"abc", [2, 1], 3, 0)  # offsets must ascend
    with pytest.raises(ValueError, match="outside"):
        native.C_KEYS(b"abc", [], 4, 0)  # and stay within the data


@needs_c_scan
def test_the_c_quota_counts_follow_the_sliding_window_rule(shared: Board) -> None:
    from shm.loadboard import W_Q_MINUTE, W_Q_PREV_REQUESTS, W_Q_PREV_TOKENS, W_Q_REQUESTS, W_Q_TOKENS
    minute, slot = 29_000_000, 5
    cells = {0: (minute, 3, 300, 7, 700), 1: (minute - 1, 2, 200, 9, 900), 2: (minute - 5, 4, 400, 1, 100)}
    for proxy, (at, req, tok, prev_req, prev_tok) in cells.items():
        for field, value in ((W_Q_MINUTE, at), (W_Q_REQUESTS, req), (W_Q_TOKENS, tok),
                             (W_Q_PREV_REQUESTS, prev_req), (W_Q_PREV_TOKENS, prev_tok)):
            shared.set(proxy, slot, field, value)
    board = shared.board
    counts = native.C_QUOTA_COUNTS(board.ints.obj, board.cell_word(0, slot, W_Q_MINUTE),
                                   board.worker_stride(), 3, minute)
    # this minute: proxy 0's; previous minute: proxy 0's previous and proxy 1's current; proxy 2: stale
    assert counts == (3, 7 + 2, 300, 700 + 200)
    with pytest.raises(IndexError):
        native.C_QUOTA_COUNTS(board.ints.obj, len(board.ints) - 2, 0, 1, minute)
