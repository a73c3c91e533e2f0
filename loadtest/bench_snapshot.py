"""Benchmark of the snapshot path through shared memory at fleet scale.

Role: measure what the seqlock snapshot (``shm.snapshot``) costs the coordinator and the proxies
with a realistic fleet (default 10,000 workers over ~50 models):

1. publish: ``encode_snapshot`` + ``SnapshotWriter.publish_bytes`` (coordinator side);
2. pause: a reader's ``current()`` when the generation changed (copy + CRC + decode), plus the
   proxy's routing-table build (:func:`build_tables`), measured in this process and in a separate
   reader process (spawned, its own address space and caches, as a real proxy);
3. check: ``current()`` when nothing changed (one shared-memory load and a compare), per call, for
   10, 1,000 and 10,000 workers, to show it does not grow with the fleet.

Prints a table and, last, one JSON line. Targets: publish <= 10 ms, pause <= 10 ms, check in tens
of ns. Usage::

    PYTHONPATH=. python3 loadtest/bench_snapshot.py --workers 10000 --repeat 20
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from shm.loadboard import LoadBoard, board_size
from shm.schema import Snapshot, Worker, encode_snapshot
from shm.segment import Segment, new_instance_id, segment_name
from shm.settings import Settings
from shm.snapshot import SnapshotReader, SnapshotWriter, segment_size

CHILD_DEADLINE = 120.0  # seconds the parent waits for the reader process at any step
TARGET_PUBLISH_MS = 10.0
TARGET_PAUSE_MS = 10.0
TARGET_CHECK_NS = 100.0

# --------------------------------------------------------------------------------------------
# The proxy's routing-table build, timed as part of the pause.
#
# HOOK: ``build_tables(snapshot)`` is what a proxy does with a new snapshot besides decoding it.
# When ``proxy_workers.routing.RoutingTable`` is importable it builds the real table (carrying the
# previous table over, as the proxy does); otherwise it is a no-op and the pause figure covers
# copy + CRC + decode only. ``BUILD_TABLES_KIND`` says which one ran.

_routing: dict[str, Any] = {"load": None, "previous": None, "cls": None}
BUILD_TABLES_KIND = "no-op hook (proxy_workers.routing not importable)"
try:
    from proxy_workers.policies import LoadView
    from proxy_workers.routing import RoutingTable

    _routing["cls"] = RoutingTable
    BUILD_TABLES_KIND = "proxy_workers.routing.RoutingTable(snapshot, LoadView, previous)"
except ImportError:  # pragma: no cover - depends on the tree the bench runs in
    LoadView = None  # type: ignore[assignment,misc]


def init_build_tables(board: LoadBoard | None) -> None:
    """Give the hook the load board the policies read (a proxy has one from its start)."""
    if _routing["cls"] is not None and board is not None and LoadView is not None:
        _routing["load"] = LoadView(board, 1)
    _routing["previous"] = None


def build_tables(snapshot: Snapshot) -> object:
    """HOOK: build the proxy's routing tables from ``snapshot`` (no-op without proxy_workers.routing)."""
    cls = _routing["cls"]
    if cls is None or _routing["load"] is None:
        return None
    table = cls(snapshot, _routing["load"], _routing["previous"])
    _routing["previous"] = table
    return table


# --------------------------------------------------------------------------------------------
# fleet


def make_fleet(n_workers: int, n_models: int, seed: int = 1) -> Snapshot:
    """A realistic snapshot: each worker serves 1-2 of ``n_models`` models, has one label."""
    rng = random.Random(seed)
    sizes = ("7b", "13b", "70b")
    names = [f"org-{m % 7}/model-{m:02d}-{rng.choice(sizes)}-instruct" for m in range(n_models)]
    workers = []
    models: dict[str, list[int]] = {name: [] for name in names}
    for slot in range(n_workers):
        host = f"10.{(slot >> 16) & 255}.{(slot >> 8) & 255}.{slot & 255}"
        port = 8000 + slot % 4
        served = tuple(rng.sample(names, rng.choice((1, 2))))
        for name in served:
            models[name].append(slot)
        workers.append(Worker(
            slot=slot, url=f"http://{host}:{port}", models=served,
            labels={"zone": f"zone-{slot % 6}"}, weight=rng.choice((1, 1, 2, 4)),
        ))
    return Snapshot(
        generation=0, created_at=time.time(), coordinator_pid=os.getpid(), proxies=8,
        settings=Settings(), workers=tuple(workers),
        models={name: tuple(slots) for name, slots in models.items() if slots},
    )


# --------------------------------------------------------------------------------------------
# stats


def pct(values: list[float], q: float) -> float:
    """Nearest-rank percentile (for fewer than 100 samples, p99 is the maximum)."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]


def summary(values_ns: list[int], scale: float = 1e6) -> dict[str, float]:
    vals = [v / scale for v in values_ns]
    return {"median": round(statistics.median(vals), 3), "p99": round(pct(vals, 0.99), 3),
            "max": round(max(vals), 3), "n": len(vals)}


# --------------------------------------------------------------------------------------------
# reader process


def reader_process(snap_name: str, board_name: str, conn: Connection, gc_enabled: bool) -> None:
    """A proxy-like reader: on each announced generation, time current() and the table build."""
    if not gc_enabled:
        gc.disable()
    seg, board_seg = Segment.attach(snap_name), Segment.attach(board_name)
    board = LoadBoard(board_seg)
    reader = SnapshotReader(seg)
    init_build_tables(board)
    read_ns: list[int] = []
    build_ns: list[int] = []
    release_ns: list[int] = []
    conn.send("ready")
    while True:
        msg = conn.recv()
        if msg == "stop":
            break
        measured, gen = msg
        held = pin_previous(reader)
        t0 = time.perf_counter_ns()
        snap = reader.current()
        t1 = time.perf_counter_ns()
        build_tables(snap)
        t2 = time.perf_counter_ns()
        del held
        t3 = time.perf_counter_ns()
        if reader.generation != gen or snap is None or snap.generation != gen:
            conn.send(("error", f"expected generation {gen}, got {reader.generation}"))
            return
        if measured:
            read_ns.append(t1 - t0)
            build_ns.append(t2 - t1)
            release_ns.append(t3 - t2)
        snap = None
        conn.send(("ok", gen))
    conn.send(("done", read_ns, build_ns, release_ns, reader.torn_reads))
    reader.close()
    board.close()


def pin_previous(reader: SnapshotReader) -> tuple[object, object]:
    """What in-flight requests hold across a publish: the old snapshot and routing table.

    Holding them keeps their deallocation out of the read/build timings; dropping the tuple
    afterwards is timed on its own ("release"), as a proxy pays it when the last request ends.
    """
    return reader.snapshot, _routing["previous"]


def _recv(conn: Connection, what: str) -> Any:
    if not conn.poll(CHILD_DEADLINE):
        raise SystemExit(f"reader process did not answer ({what}) within {CHILD_DEADLINE} s")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg and msg[0] == "error":
        raise SystemExit(f"reader process: {msg[1]}")
    return msg


# --------------------------------------------------------------------------------------------
# measurements


class Shm:
    """Segments created by the bench; all unlinked on exit."""

    def __init__(self) -> None:
        self.segments: list[Segment] = []

    def create(self, kind: str, size: int) -> Segment:
        seg = Segment.create(segment_name(new_instance_id(), kind), size)
        self.segments.append(seg)
        return seg

    def cleanup(self) -> None:
        for seg in self.segments:
            seg.close()
            seg.unlink()


def measure_publish_and_pause(shm: Shm, base: Snapshot, repeat: int, use_process: bool) -> dict[str, Any]:
    probe = encode_snapshot(base)
    capacity = max(1 << 20, 4 * len(probe))
    seg = shm.create("snap", segment_size(capacity))
    board_seg = shm.create("load", board_size(1, max(1, len(base.workers))))
    board = LoadBoard.create(board_seg, 1, max(1, len(base.workers)))
    writer = SnapshotWriter(seg, os.getpid())
    reader = SnapshotReader(seg)
    init_build_tables(board)

    child = conn = None
    if use_process:
        conn, child_conn = mp.get_context("spawn").Pipe()
        child = mp.get_context("spawn").Process(
            target=reader_process, args=(seg.name, board_seg.name, child_conn, gc.isenabled()),
            name="bench-reader")
        child.start()
        _recv(conn, "start")

    encode_ns: list[int] = []
    publish_ns: list[int] = []
    total_ns: list[int] = []
    read_ns: list[int] = []
    build_ns: list[int] = []
    release_ns: list[int] = []
    sizes = []
    try:
        for i in range(repeat + 1):  # round 0 warms up (type plans, page faults) and is not counted
            measured = i > 0
            snap = msgspec.structs.replace(base, generation=writer.generation + 1, created_at=time.time())
            t0 = time.perf_counter_ns()
            payload = encode_snapshot(snap)
            t1 = time.perf_counter_ns()
            gen = writer.publish_bytes(payload)
            t2 = time.perf_counter_ns()
            held = pin_previous(reader)
            t3 = time.perf_counter_ns()
            got = reader.current()
            t4 = time.perf_counter_ns()
            build_tables(got)
            t5 = time.perf_counter_ns()
            del held
            t6 = time.perf_counter_ns()
            if got is None or got.generation != gen or reader.generation != gen:
                raise SystemExit(f"in-process reader did not take generation {gen}")
            got = None
            if measured:
                encode_ns.append(t1 - t0)
                publish_ns.append(t2 - t1)
                total_ns.append(t2 - t0)
                read_ns.append(t4 - t3)
                build_ns.append(t5 - t4)
                release_ns.append(t6 - t5)
                sizes.append(len(payload))
            if conn is not None:
                conn.send((measured, gen))
                _recv(conn, f"generation {gen}")
        proc: dict[str, Any] = {}
        if conn is not None and child is not None:
            conn.send("stop")
            _, p_read, p_build, p_release, p_torn = _recv(conn, "results")
            child.join(CHILD_DEADLINE)
            proc = {
                "read_ms": summary(p_read), "build_ms": summary(p_build), "release_ms": summary(p_release),
                "pause_ms": summary([a + b for a, b in zip(p_read, p_build, strict=True)]),
                "torn_retries": p_torn,
            }
    finally:
        if child is not None and child.is_alive():
            child.terminate()
            child.join(CHILD_DEADLINE)
        reader.close()
        writer.close()
        board.close()
    return {
        "payload_bytes": sizes[0] if sizes else len(probe),
        "encode_ms": summary(encode_ns), "publish_bytes_ms": summary(publish_ns),
        "publish_ms": summary(total_ns),
        "read_ms": summary(read_ns), "build_ms": summary(build_ns), "release_ms": summary(release_ns),
        "pause_ms": summary([a + b for a, b in zip(read_ns, build_ns, strict=True)]),
        "process": proc,
    }


def measure_check(shm: Shm, n_workers: int, n_models: int, calls: int, rounds: int) -> dict[str, float]:
    """Per-call cost of current() with an unchanged generation; best of ``rounds`` loops."""
    base = make_fleet(n_workers, n_models)
    payload = encode_snapshot(base)
    seg = shm.create("snap", segment_size(max(1 << 16, 2 * len(payload))))
    writer = SnapshotWriter(seg, os.getpid())
    writer.publish_bytes(payload)
    reader = SnapshotReader(seg)
    current = reader.current
    first = current()
    loop = range(calls)
    best_call = best_empty = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in loop:
            current()
        t1 = time.perf_counter_ns()
        for _ in loop:
            pass
        t2 = time.perf_counter_ns()
        best_call = min(best_call, (t1 - t0) / calls)
        best_empty = min(best_empty, (t2 - t1) / calls)
    if current() is not first:
        raise SystemExit("snapshot changed during the check measurement")
    reader.close()
    writer.close()
    return {"per_call_ns": round(best_call, 1), "loop_overhead_ns": round(best_empty, 1),
            "net_ns": round(best_call - best_empty, 1)}


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=10_000, help="workers in the fleet (default 10000)")
    parser.add_argument("--models", type=int, default=50, help="distinct models (default 50)")
    parser.add_argument("--repeat", type=int, default=20, help="measured publishes (default 20)")
    parser.add_argument("--check-calls", type=int, default=1_000_000,
                        help="current() calls per check loop (default 1000000)")
    parser.add_argument("--check-rounds", type=int, default=5, help="check loops, best taken (default 5)")
    parser.add_argument("--check-sizes", default="10,1000,10000",
                        help="fleet sizes for the check measurement (default 10,1000,10000)")
    parser.add_argument("--no-process", action="store_true", help="skip the separate reader process")
    parser.add_argument("--gc", choices=("on", "off"), default="on",
                        help="cyclic GC during the run (default on, as in a proxy); off shows its share")
    args = parser.parse_args(argv)
    if args.gc == "off":
        gc.disable()  # and in the spawned reader process (reader_process's gc_enabled)

    shm = Shm()
    try:
        base = make_fleet(args.workers, args.models)
        main_fig = measure_publish_and_pause(shm, base, args.repeat, not args.no_process)
        check = {int(n): measure_check(shm, int(n), args.models, args.check_calls, args.check_rounds)
                 for n in args.check_sizes.split(",")}
    finally:
        shm.cleanup()

    _print_table(args, main_fig, check)
    pause_ms = main_fig["process"].get("pause_ms", main_fig["pause_ms"])
    result = {
        "workers": args.workers, "models": args.models, "repeat": args.repeat,
        "python": sys.version.split()[0], "cpus": os.cpu_count(),
        "build_tables": BUILD_TABLES_KIND, "gc": args.gc,
        **{k: v for k, v in main_fig.items() if k != "process"},
        "process_reader": main_fig["process"],
        "check": {str(n): c for n, c in check.items()},
        "targets": {
            "publish_p99_le_10ms": main_fig["publish_ms"]["p99"] <= TARGET_PUBLISH_MS,
            "pause_p99_le_10ms": pause_ms["p99"] <= TARGET_PAUSE_MS,
            "check_tens_of_ns": all(c["per_call_ns"] < TARGET_CHECK_NS for c in check.values()),
        },
    }
    print(json.dumps(result, separators=(",", ":")))
    return 0


def _print_table(args: argparse.Namespace, fig: dict[str, Any], check: dict[int, dict[str, float]]) -> None:
    def row(label: str, s: dict[str, float], unit: str = "ms") -> None:
        print(f"  {label:<44} {s['median']:>9.3f} {s['p99']:>9.3f} {s['max']:>9.3f}  {unit}")

    print(f"snapshot bench: {args.workers} workers, {args.models} models, "
          f"payload {fig['payload_bytes'] / 1024:.0f} KiB, {args.repeat} measured publishes, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, gc {args.gc}")
    print(f"build_tables: {BUILD_TABLES_KIND}")
    print(f"  {'':<44} {'median':>9} {'p99':>9} {'max':>9}")
    row("publish: encode", fig["encode_ms"])
    row("publish: publish_bytes (copy + crc)", fig["publish_bytes_ms"])
    row("publish: total", fig["publish_ms"])
    row("pause (in-process): current() copy+crc+decode", fig["read_ms"])
    row("pause (in-process): build_tables", fig["build_ms"])
    row("pause (in-process): total = current() + build", fig["pause_ms"])
    row("  later: release old snapshot + table", fig["release_ms"])
    proc = fig["process"]
    if proc:
        row("pause (reader process): current()", proc["read_ms"])
        row("pause (reader process): build_tables", proc["build_ms"])
        row("pause (reader process): total", proc["pause_ms"])
        row("  later: release old snapshot + table", proc["release_ms"])
    print("  (p99 is nearest-rank: with fewer than 100 samples it is the maximum)")
    print(f"  {'check: current(), generation unchanged':<44} {'per call':>9} {'loop':>9} {'net':>9}")
    for n, c in check.items():
        print(f"  {f'  {n} workers':<44} {c['per_call_ns']:>9.1f} {c['loop_overhead_ns']:>9.1f} "
              f"{c['net_ns']:>9.1f}  ns")


if __name__ == "__main__":
    raise SystemExit(main())
