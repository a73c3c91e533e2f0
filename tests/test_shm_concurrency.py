"""Shared-memory contract under concurrency: snapshot seqlock, segment lifecycle, load board.

Role: prove across real processes (multiprocessing ``spawn`` context, as proxies are separate
interpreters) that

- a reader never accepts a torn or foreign snapshot while a writer publishes in a tight loop, and the
  generations it sees never go backwards (``shm.snapshot``);
- torn copies are rejected by the sequence check and by the CRC, and the reader keeps its previous
  snapshot when they are;
- segments are private (0600), unique per instance, survive attachers exiting, and stale ones (dead
  creator pid) are removed while live ones stay (``shm.segment``);
- load-board rows written by separate processes sum correctly, and ``reset_gauges`` zeroes only the
  in-flight gauges of its own row (``shm.loadboard``).

Synchronisation is by events, queues and joins with deadlines; nothing sleeps and nothing asserts on
elapsed time. Every segment created here is unlinked by a fixture finaliser.
"""

from __future__ import annotations

import hashlib
import multiprocessing as mp
import os
import queue
import stat
import subprocess
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from typing import Any

import msgspec
import posix_ipc
import psutil
import pytest

from shm import snapshot as snapshot_mod
from shm.loadboard import (
    P_IN_FLIGHT,
    P_QUEUED,
    P_REQUESTS,
    PROXY_FIELDS,
    W_IN_FLIGHT,
    W_LATENCY_EWMA,
    W_REQUESTS,
    WORKER_FIELDS,
    LoadBoard,
    board_size,
)
from shm.schema import Snapshot, Worker, encode_snapshot
from shm.segment import SHM_DIR, Segment, new_instance_id, pid_alive, remove_stale, segment_name
from shm.snapshot import (
    BUF_HEADER,
    MAX_READ_TRIES,
    SnapshotReader,
    SnapshotWriter,
    _buffer_offset,
    segment_size,
)

CTX = mp.get_context("spawn")
# Upper bounds only (a wedged child must not hang the suite); no assertion depends on them.
JOIN_DEADLINE = 60.0
READER_DEADLINE = 30.0
WRITER_DEADLINE = 60.0

# Concurrency-test sizing: each reader stops after this many distinct generations or calls.
READER_TARGET_GENERATIONS = 300
READER_MAX_CALLS = 5_000_000
WRITER_BATCH = 64  # snapshots pre-encoded, then published back to back (the tight loop)
SNAP_CAPACITY = 256 * 1024


# --------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture
def shm_names(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """A factory of unique segment names; every name handed out is unlinked at teardown."""
    names: list[str] = []

    def make(kind: str) -> str:
        name = segment_name(new_instance_id(), kind)
        names.append(name)
        return name

    def cleanup() -> None:
        for name in names:
            try:
                posix_ipc.unlink_shared_memory(name)
            except posix_ipc.ExistentialError:
                pass

    request.addfinalizer(cleanup)
    return make


@pytest.fixture
def segments(request: pytest.FixtureRequest, shm_names: Callable[[str], str]) -> Callable[..., Segment]:
    """Create owned segments; each is closed and unlinked at teardown."""
    made: list[Segment] = []

    def create(kind: str, size: int) -> Segment:
        seg = Segment.create(shm_names(kind), size)
        made.append(seg)
        return seg

    def cleanup() -> None:
        for seg in made:
            seg.close()
            seg.unlink()

    request.addfinalizer(cleanup)
    return create


@pytest.fixture
def snap_segment(segments: Callable[..., Segment]) -> Iterator[tuple[Segment, SnapshotWriter]]:
    seg = segments("snap", segment_size(SNAP_CAPACITY))
    writer = SnapshotWriter(seg, os.getpid())
    yield seg, writer
    writer.close()


# --------------------------------------------------------------------------------------------
# self-verifying snapshots


def expected_snapshot(gen: int) -> Snapshot:
    """The snapshot the writer publishes as generation ``gen``; a pure function of ``gen``.

    Its size varies with ``gen`` (0-60 workers, 0-24 KiB of filler), so a copy mixing two
    generations would differ in length and content, and its last notice is a digest of everything
    else, so a reader can check internal consistency without trusting the generation word.
    """
    n_workers = (gen * 7919) % 61
    workers = tuple(
        Worker(
            slot=i,
            url=f"http://g{gen}-w{i}.test:{8000 + (gen + i) % 1000}",
            models=(f"model-{(gen + i) % 5}",),
            labels={"gen": str(gen)},
            weight=1 + (gen + i) % 7,
        )
        for i in range(n_workers)
    )
    models: dict[str, list[int]] = {}
    for w in workers:
        models.setdefault(w.models[0], []).append(w.slot)
    filler = chr(ord("a") + gen % 26) * ((gen * 131) % (24 * 1024))
    body = Snapshot(
        generation=gen,
        created_at=float(gen),
        workers=workers,
        models={m: tuple(s) for m, s in models.items()},
        notices=(filler,),
    )
    return msgspec.structs.replace(body, notices=(filler, _digest(body)))


def _digest(body: Snapshot) -> str:
    return "digest=" + hashlib.blake2b(encode_snapshot(body), digest_size=16).hexdigest()


def snapshot_problem(snap: Snapshot, gen: int) -> str | None:
    """Why ``snap`` is not the intact snapshot of generation ``gen`` (None when it is)."""
    if snap.generation != gen:
        return f"snapshot.generation {snap.generation} != shm generation {gen}"
    body = msgspec.structs.replace(snap, notices=snap.notices[:-1])
    if not snap.notices or snap.notices[-1] != _digest(body):
        return f"generation {gen}: digest does not match contents"
    if snap != expected_snapshot(gen):
        return f"generation {gen}: contents differ from what the writer published"
    return None


# --------------------------------------------------------------------------------------------
# child-process bodies (module level so the spawn context can import them)


def _writer_main(name: str, go: Any, stop: Any, results: Any) -> None:
    try:
        seg = Segment.attach(name)
        writer = SnapshotWriter(seg, os.getpid())
        go.wait(JOIN_DEADLINE)
        deadline = time.monotonic() + WRITER_DEADLINE
        published = 0
        while not stop.is_set() and time.monotonic() < deadline:
            first = writer.generation + 1
            batch = [encode_snapshot(expected_snapshot(g)) for g in range(first, first + WRITER_BATCH)]
            for expected_gen, payload in enumerate(batch, first):
                got = writer.publish_bytes(payload)
                if got != expected_gen:
                    raise AssertionError(f"publish returned generation {got}, expected {expected_gen}")
            published += len(batch)
        results.put({"role": "writer", "published": published, "last": writer.generation})
        writer.close()
        seg.close()
    except BaseException:
        results.put({"role": "writer", "error": traceback.format_exc()})


def _reader_main(name: str, index: int, ready: Any, go: Any, results: Any) -> None:
    try:
        seg = Segment.attach(name)
        reader = SnapshotReader(seg)
        ready.set()
        go.wait(JOIN_DEADLINE)
        deadline = time.monotonic() + READER_DEADLINE
        calls = accepted = corrupt = backwards = decode_errors = 0
        problems: list[str] = []
        last_gen, last_snap = -1, None
        while calls < READER_MAX_CALLS and accepted < READER_TARGET_GENERATIONS:
            calls += 1
            if not calls & 0x3FF and time.monotonic() > deadline:
                break
            try:
                snap = reader.current()
            except (msgspec.MsgspecError, ValueError) as exc:
                # current() decodes only bytes that passed seq + CRC, so a decode error (msgspec raises
                # UnicodeDecodeError for a torn string) means a corrupt payload was accepted.
                decode_errors += 1
                problems.append(f"decode error: {exc}")
                continue
            if snap is last_snap:
                continue
            gen = reader.generation
            accepted += 1
            if gen <= last_gen:
                backwards += 1
                problems.append(f"generation went from {last_gen} to {gen}")
            problem = snapshot_problem(snap, gen) if snap is not None else "current() returned None"
            if problem:
                corrupt += 1
                problems.append(problem)
            last_gen, last_snap = gen, snap
        results.put({
            "role": "reader", "index": index, "calls": calls, "accepted": accepted,
            "distinct": accepted, "corrupt": corrupt + decode_errors, "backwards": backwards,
            "torn_retries": reader.torn_reads, "last_generation": last_gen, "problems": problems[:5],
        })
        reader.close()
        seg.close()
    except BaseException:
        results.put({"role": "reader", "index": index, "error": traceback.format_exc()})


def _attach_and_exit(name: str, marker: bytes, results: Any) -> None:
    seg = Segment.attach(name)
    seen = bytes(seg.buf[: len(marker)])
    seg.buf[len(marker) : 2 * len(marker)] = marker[::-1]
    seg.close()
    results.put(seen)


def _board_writer(name: str, proxy: int, plan: dict[int, int], done: Any, release: Any) -> None:
    """Proxy ``proxy``: churn its own row (requests in and out), then leave ``plan`` in flight."""
    seg = Segment.attach(name)
    board = LoadBoard(seg)
    ints = board.ints
    for round_ in range(200):
        for slot, final in plan.items():
            word = board.cell_word(proxy, slot, W_IN_FLIGHT)
            ints[word] += final + round_ % 3  # requests start ...
            ints[board.cell_word(proxy, slot, W_REQUESTS)] += 1
            ints[board.proxy_word(proxy, P_IN_FLIGHT)] += final + round_ % 3
            ints[word] -= final + round_ % 3  # ... and finish
            ints[board.proxy_word(proxy, P_IN_FLIGHT)] -= final + round_ % 3
    for slot, final in plan.items():
        ints[board.cell_word(proxy, slot, W_IN_FLIGHT)] += final
        ints[board.proxy_word(proxy, P_IN_FLIGHT)] += final
    done.set()
    release.wait(JOIN_DEADLINE)  # stay alive (mapped) while the summing process reads
    board.close()
    seg.close()


def _board_summer(name: str, proxies: int, slots: list[int], dones: list[Any], results: Any) -> None:
    seg = Segment.attach(name)
    board = LoadBoard(seg)
    for done in dones:
        done.wait(JOIN_DEADLINE)
    results.put({
        "in_flight": {s: board.worker_in_flight(s, proxies) for s in slots},
        "totals": {s: board.worker_totals(s, proxies) for s in slots},
        "rows": [board.proxy_row(p)["in_flight"] for p in range(proxies)],
    })
    board.close()
    seg.close()


def _collect(results: Any, count: int) -> list[dict[str, Any]]:
    out = []
    for _ in range(count):
        try:
            out.append(results.get(timeout=JOIN_DEADLINE))
        except queue.Empty:
            pytest.fail(f"only {len(out)} of {count} child results arrived: {out}")
    return out


def _join_all(procs: list[Any]) -> None:
    for proc in procs:
        proc.join(JOIN_DEADLINE)
        if proc.is_alive():
            proc.terminate()
            proc.join(JOIN_DEADLINE)
            pytest.fail(f"{proc.name} did not exit")
        assert proc.exitcode == 0, f"{proc.name} exited with {proc.exitcode}"


# --------------------------------------------------------------------------------------------
# (a) snapshot seqlock


def test_readers_never_accept_torn_snapshots(snap_segment: tuple[Segment, SnapshotWriter]) -> None:
    """One writer publishes in a tight loop; three reader processes check every snapshot they take."""
    seg, setup_writer = snap_segment
    setup_writer.publish(expected_snapshot(1))  # readers start from a valid generation
    results, go, stop = CTX.Queue(), CTX.Event(), CTX.Event()
    readies = [CTX.Event() for _ in range(3)]
    readers = [
        CTX.Process(target=_reader_main, args=(seg.name, i, readies[i], go, results), name=f"reader-{i}")
        for i in range(3)
    ]
    writer = CTX.Process(target=_writer_main, args=(seg.name, go, stop, results), name="writer")
    procs = [*readers, writer]
    try:
        for proc in procs:
            proc.start()
        for ready in readies:
            assert ready.wait(JOIN_DEADLINE), "a reader failed to attach"
        go.set()
        reports = _collect(results, 3)
        stop.set()
        reports += _collect(results, 1)
        _join_all(procs)
    finally:
        stop.set()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(JOIN_DEADLINE)

    errors = [r["error"] for r in reports if "error" in r]
    assert not errors, "\n".join(errors)
    writer_report = next(r for r in reports if r["role"] == "writer")
    reader_reports = sorted((r for r in reports if r["role"] == "reader"), key=lambda r: r["index"])
    print(f"\nwriter published {writer_report['published']} snapshots (last generation "
          f"{writer_report['last']})")
    for r in reader_reports:
        print(f"reader {r['index']}: calls={r['calls']} accepted={r['accepted']} "
              f"distinct_generations={r['distinct']} torn_retries={r['torn_retries']} "
              f"last_generation={r['last_generation']}")
    for r in reader_reports:
        assert r["corrupt"] == 0, r["problems"]
        assert r["backwards"] == 0, r["problems"]
        assert r["distinct"] > 1, r
        assert r["last_generation"] <= writer_report["last"]


def test_empty_segment_reads_nothing(snap_segment: tuple[Segment, SnapshotWriter]) -> None:
    seg, _ = snap_segment
    reader = SnapshotReader(seg)
    try:
        assert reader.read_payload() is None
        assert reader.current() is None
    finally:
        reader.close()


def _flip_payload_byte(seg: Segment, gen: int, capacity: int) -> None:
    off = _buffer_offset(gen % 2, capacity) + BUF_HEADER + 5
    seg.buf[off] ^= 0xFF


def _set_seq_odd(seg: Segment, gen: int, capacity: int) -> None:
    # What a reader sees when the writer has lapped it and is writing generation gen + 2 here.
    seg.buf[_buffer_offset(gen % 2, capacity) : _buffer_offset(gen % 2, capacity) + 8] = (
        (2 * (gen + 2) - 1).to_bytes(8, "little")
    )


def _bad_length(seg: Segment, gen: int, capacity: int) -> None:
    off = _buffer_offset(gen % 2, capacity) + 8
    seg.buf[off : off + 8] = (capacity + 1).to_bytes(8, "little")


def _bad_crc(seg: Segment, gen: int, capacity: int) -> None:
    off = _buffer_offset(gen % 2, capacity) + 16
    seg.buf[off] ^= 0x01


@pytest.mark.parametrize("corrupt", [_flip_payload_byte, _set_seq_odd, _bad_length, _bad_crc],
                         ids=["payload-byte", "seq-odd", "length", "crc-field"])
def test_corrupt_buffer_rejected_and_previous_snapshot_kept(
    snap_segment: tuple[Segment, SnapshotWriter], corrupt: Callable[[Segment, int, int], None]
) -> None:
    seg, writer = snap_segment
    reader = SnapshotReader(seg)
    try:
        assert writer.publish(expected_snapshot(1)) == 1
        first = reader.current()
        assert first is not None and snapshot_problem(first, 1) is None
        assert reader.read_payload() is not None

        assert writer.publish(expected_snapshot(2)) == 2
        corrupt(seg, 2, writer.capacity)
        assert reader.read_payload() is None
        assert reader.current() is first  # every retry fails: keep the previous snapshot
        assert reader.generation == 1
        assert reader.torn_reads == MAX_READ_TRIES

        assert writer.publish(expected_snapshot(3)) == 3  # the next publish goes to the other buffer
        third = reader.current()
        assert third is not None and snapshot_problem(third, 3) is None
        assert reader.generation == 3
    finally:
        reader.close()


class _LapDuringCopy:
    """Stands in for ``shm.snapshot._BUF_HEAD``: after the reader's first header read (seq1), the
    writer publishes twice, overwriting the very buffer the reader is about to copy."""

    def __init__(self, real: Any, lap: Callable[[], None]) -> None:
        self._real, self._lap = real, lap
        self.pack_into = real.pack_into
        self.armed = False

    def unpack_from(self, buf: Any, offset: int = 0) -> tuple[int, ...]:
        got = self._real.unpack_from(buf, offset)
        if self.armed:
            self.armed = False
            self._lap()
        return got


def test_writer_lapping_during_copy_is_detected_by_seq(
    snap_segment: tuple[Segment, SnapshotWriter], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Seq check alone catches a lap: the overwriting payload is byte-identical, so the CRC passes."""
    seg, writer = snap_segment
    payload = encode_snapshot(expected_snapshot(7))
    writer.publish_bytes(payload)  # generation 1, buffer 1
    reader = SnapshotReader(seg)

    def publish_twice() -> None:
        writer.publish_bytes(payload)
        writer.publish_bytes(payload)

    lap = _LapDuringCopy(snapshot_mod._BUF_HEAD, publish_twice)
    monkeypatch.setattr(snapshot_mod, "_BUF_HEAD", lap)
    try:
        lap.armed = True
        assert reader.read_payload() is None  # read gen 1 / seq 2, writer published 2 and 3 meanwhile
        assert writer.generation == 3
        got = reader.read_payload()  # no lap this time
        assert got == (3, payload)
    finally:
        reader.close()


def test_generation_check_does_not_decode(snap_segment: tuple[Segment, SnapshotWriter]) -> None:
    seg, writer = snap_segment
    reader = SnapshotReader(seg)
    changes: list[int] = []
    reader.on_change = lambda snap: changes.append(snap.generation)
    try:
        writer.publish(expected_snapshot(1))
        first = reader.current()
        for _ in range(100):
            assert reader.current() is first
        writer.publish(expected_snapshot(2))
        assert reader.current() is not first
        assert changes == [1, 2]
    finally:
        reader.close()


def test_undecodable_generation_is_tried_once(snap_segment: tuple[Segment, SnapshotWriter]) -> None:
    # Intact bytes from an incompatible writer: the previous snapshot stays, and the reader does
    # not decode the same generation again on every request; the next good publish is taken.
    seg, writer = snap_segment
    reader = SnapshotReader(seg)
    try:
        writer.publish(expected_snapshot(1))
        first = reader.current()
        writer.publish_bytes(b"\xc1 not msgpack")
        for _ in range(5):
            assert reader.current() is first
            assert not reader.moved()
        assert reader.torn_reads == 1
        writer.publish(expected_snapshot(3))
        assert reader.moved()
        assert reader.current().generation == 3  # type: ignore[union-attr]
    finally:
        reader.close()


# --------------------------------------------------------------------------------------------
# (b) segments


def test_segment_mode_is_0600_even_with_permissive_umask(segments: Callable[..., Segment]) -> None:
    old = os.umask(0)
    try:
        seg = segments("snap", 4096)
    finally:
        os.umask(old)
    mode = os.stat(SHM_DIR / seg.name.lstrip("/")).st_mode
    assert stat.S_IMODE(mode) == 0o600


def test_two_instances_get_different_segments(
    segments: Callable[..., Segment], shm_names: Callable[[str], str]
) -> None:
    a, b = new_instance_id(), new_instance_id()
    assert a != b
    assert a.split("-")[0] == b.split("-")[0] == str(os.getpid())
    seg_a, seg_b = segments("snap", 4096), segments("snap", 4096)
    assert seg_a.name != seg_b.name
    seg_a.buf[0] = 1
    assert seg_b.buf[0] == 0
    with pytest.raises(posix_ipc.ExistentialError):  # O_EXCL: never silently shared
        Segment.create(seg_a.name, 4096)


def test_attacher_exiting_does_not_remove_segment(segments: Callable[..., Segment]) -> None:
    seg = segments("snap", 4096)
    marker = b"SGTEST01"
    seg.buf[: len(marker)] = marker
    results = CTX.Queue()
    child = CTX.Process(target=_attach_and_exit, args=(seg.name, marker, results), name="attacher")
    child.start()
    seen = _collect(results, 1)[0]
    _join_all([child])
    assert seen == marker
    assert (SHM_DIR / seg.name.lstrip("/")).exists()
    again = Segment.attach(seg.name)  # still there for the next proxy, with the child's write
    try:
        assert bytes(again.buf[len(marker) : 2 * len(marker)]) == marker[::-1]
    finally:
        again.close()


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                           capture_output=True, text=True, check=True)
    pid = int(child.stdout)
    if pid_alive(pid):  # reused already: vanishingly rare, but then it is not a dead pid
        pytest.skip(f"pid {pid} was reused before the test could use it")
    return pid


def test_remove_stale_removes_dead_pid_segments_only(
    request: pytest.FixtureRequest, segments: Callable[..., Segment]
) -> None:
    stale = f"/shardgate.{_dead_pid()}-abcd1234.snap"
    request.addfinalizer(lambda: _unlink_quietly(stale))
    shm = posix_ipc.SharedMemory(stale, posix_ipc.O_CREX, mode=0o600, size=4096)
    shm.close_fd()
    live = segments("snap", 4096)

    removed = remove_stale()

    assert stale.lstrip("/") in removed
    assert not (SHM_DIR / stale.lstrip("/")).exists()
    assert live.name.lstrip("/") not in removed
    assert (SHM_DIR / live.name.lstrip("/")).exists()


def test_remove_stale_keeps_the_segments_it_is_told_to_keep(request: pytest.FixtureRequest) -> None:
    instance = f"{_dead_pid()}-abcd5678"  # a dead coordinator whose proxies still serve
    kept = f"/shardgate.{instance}.board"
    request.addfinalizer(lambda: _unlink_quietly(kept))
    posix_ipc.SharedMemory(kept, posix_ipc.O_CREX, mode=0o600, size=4096).close_fd()
    assert kept.lstrip("/") not in remove_stale(keep={instance})
    assert (SHM_DIR / kept.lstrip("/")).exists()


def test_a_zombie_is_not_alive(request: pytest.FixtureRequest) -> None:
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    request.addfinalizer(child.wait)
    wait_for_zombie = time.monotonic() + 10
    while time.monotonic() < wait_for_zombie and psutil.Process(child.pid).status() != psutil.STATUS_ZOMBIE:
        time.sleep(0.01)
    assert psutil.Process(child.pid).status() == psutil.STATUS_ZOMBIE  # exited, not reaped yet
    assert not pid_alive(child.pid)
    assert pid_alive(os.getpid())


def _unlink_quietly(name: str) -> None:
    try:
        posix_ipc.unlink_shared_memory(name)
    except posix_ipc.ExistentialError:
        pass


# --------------------------------------------------------------------------------------------
# (c) load board


def test_load_board_sums_rows_written_by_other_processes(segments: Callable[..., Segment]) -> None:
    max_proxies, max_workers = 4, 16
    seg = segments("load", board_size(max_proxies, max_workers))
    board = LoadBoard.create(seg, max_proxies, max_workers)
    plans = {0: {0: 3, 5: 1, 15: 2}, 1: {0: 4, 7: 6, 15: 1}}
    dones = [CTX.Event() for _ in plans]
    release, results = CTX.Event(), CTX.Queue()
    procs = [
        CTX.Process(target=_board_writer, args=(seg.name, p, plan, dones[p], release), name=f"proxy-{p}")
        for p, plan in plans.items()
    ]
    slots = sorted({s for plan in plans.values() for s in plan} | {1})
    procs.append(CTX.Process(target=_board_summer, args=(seg.name, len(plans), slots, dones, results),
                             name="summer"))
    try:
        for proc in procs:
            proc.start()
        report = _collect(results, 1)[0]
        release.set()
        _join_all(procs)
    finally:
        release.set()
        for proc in procs:
            if proc.is_alive():
                proc.terminate()
                proc.join(JOIN_DEADLINE)

    expected = {s: sum(plan.get(s, 0) for plan in plans.values()) for s in slots}
    assert report["in_flight"] == expected
    assert report["rows"] == [sum(plan.values()) for plan in plans.values()]
    for s in slots:
        assert report["totals"][s]["in_flight"] == expected[s]
        assert report["totals"][s]["requests"] == 200 * sum(s in plan for plan in plans.values())
    # The creator sees the same words.
    assert {s: board.worker_in_flight(s, len(plans)) for s in slots} == expected
    board.close()


def test_reset_gauges_zeroes_only_that_rows_in_flight(segments: Callable[..., Segment]) -> None:
    max_proxies, max_workers = 3, 8
    seg = segments("load", board_size(max_proxies, max_workers))
    board = LoadBoard.create(seg, max_proxies, max_workers)
    ints, floats = board.ints, board.floats
    header = list(ints[:8])
    for p in range(max_proxies):
        for f in range(PROXY_FIELDS):
            ints[board.proxy_word(p, f)] = 1000 * (p + 1) + f
        for s in range(max_workers):
            for f in range(WORKER_FIELDS):
                ints[board.cell_word(p, s, f)] = 100 * (p + 1) + 10 * s + f + 1
            floats[board.cell_word(p, s, W_LATENCY_EWMA)] = 0.25 * (s + 1)
    before = list(ints)

    board.reset_gauges(1)

    zeroed = {board.proxy_word(1, P_IN_FLIGHT), board.proxy_word(1, P_QUEUED)}  # the row's gauges
    zeroed |= {board.cell_word(1, s, W_IN_FLIGHT) for s in range(max_workers)}
    after = list(ints)
    for word, (old, new) in enumerate(zip(before, after, strict=True)):
        assert new == (0 if word in zeroed else old), f"word {word}"
    assert list(ints[:8]) == header
    assert ints[board.proxy_word(1, P_REQUESTS)] == 1000 * 2 + P_REQUESTS  # monotonic counters kept
    assert board.worker_in_flight(3, max_proxies) == (100 + 30 + 1) + (300 + 30 + 1)
    board.close()
