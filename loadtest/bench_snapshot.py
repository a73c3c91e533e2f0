"""Benchmark of the snapshot path through shared memory at fleet scale.

Role: measure what the seqlock snapshot (``shm.snapshot``) costs the coordinator and the proxies
with a realistic fleet (default 10,000 workers over ~50 models):

1. publish: ``encode_snapshot`` + ``SnapshotWriter.publish_bytes`` (coordinator side);
2. pause: a real ``proxy_workers.serving.state.ProxyProcess`` takes each new generation through
   ``snapshot_steps()``, which the proxy runs one step per event-loop iteration: "decode"
   (``reader.current()``: copy + CRC + decode), "build" (claim load-board cells + build the
   ``RoutingTable``, GC paused) and "release" (dropping the last reference to the previous table
   and snapshot, i.e. freeing them). Each step is timed on its own. The event loop's pause is the
   LONGEST step of a publish ("pause"); "work" is the sum of the steps, for information. Cyclic
   collections that run inside a step are counted in it and also reported apart (a young one
   follows every decode; a full one comes only every ~50-100 publishes, so use ``--repeat 150`` to
   see it). Round 0 is the warm-up: the snapshot the ProxyProcess constructor takes. Measured in
   this process and in a separate reader process (spawned, its own address space and caches, as a
   real proxy); the reader process's figure is the one judged against the target;
3. check: ``ProxyProcess.latest_table()`` with an unchanged generation (the per-request call: one
   shared-memory load and a compare in ``reader.moved()``), and ``reader.moved()`` alone, per call,
   for 10, 1,000 and 10,000 workers, to show it does not grow with the fleet.

Prints a table and, last, one JSON line. Targets: publish p99 <= 10 ms, pause (longest step) p99
<= 10 ms, table() check in tens of ns. Usage::

    PYTHONPATH=. python3 loadtest/bench_snapshot.py --workers 10000 --repeat 20
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import gc
import json
import math
import multiprocessing as mp
import os
import random
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import msgspec

from loadtest.scratch_shm import Shm
from proxy_workers.serving.state import ProxyProcess, freeze_startup_heap
from shm.loadboard import LoadBoard
from shm.schema import Snapshot, Worker, encode_snapshot
from shm.segment import Segment
from shm.settings import Settings
from shm.snapshot import SnapshotReader, SnapshotWriter, segment_size

try:
    import uvloop
except ImportError:  # pragma: no cover - uvloop is a dependency of the proxy, asyncio stands in
    uvloop = None  # type: ignore[assignment]
LOOP_KIND = "uvloop" if uvloop is not None else "asyncio"

CHILD_DEADLINE = 120.0  # seconds the parent waits for the reader process at any step
TARGET_PUBLISH_MS = 10.0
TARGET_PAUSE_MS = 10.0
TARGET_CHECK_NS = 100.0
STEPS = ("decode", "build", "release", "collect")  # what ProxyProcess.snapshot_steps() yields, in order

# --------------------------------------------------------------------------------------------
# A real proxy process taking each new snapshot step by step.


def new_loop() -> asyncio.AbstractEventLoop:
    """The loop object ProxyProcess is given; it is never run (steps are driven directly)."""
    return uvloop.new_event_loop() if uvloop is not None else asyncio.new_event_loop()


class GcWatch:
    """Cyclic collections that ran while steps were timed, via ``gc.callbacks``."""

    def __init__(self) -> None:
        self.active = False
        self.runs: list[tuple[int, int, int]] = []  # (start ns, generation, duration ns)
        self._start = 0

    def __call__(self, phase: str, info: dict[str, int]) -> None:
        now = time.perf_counter_ns()
        if phase == "start":
            self._start = now
        elif self.active:
            self.runs.append((self._start, info["generation"], now - self._start))

    def take(self) -> list[tuple[int, int, int]]:
        runs, self.runs = self.runs, []
        return runs


class ProxyHarness:
    """Owns a real :class:`ProxyProcess` (proxy 0), created when the first snapshot is taken.

    ``take(gen)`` makes the proxy take generation ``gen``: the first call constructs the proxy
    (its constructor takes the snapshot: the warm-up round), later ones iterate
    ``proc.snapshot_steps()`` directly, timing each step, exactly as the proxy's event loop runs
    them one per iteration.
    """

    def __init__(self, reader: SnapshotReader, board: LoadBoard) -> None:
        self.reader = reader
        self.board = board
        self.loop = new_loop()
        self.proc: ProxyProcess | None = None
        self.gc = GcWatch()
        gc.callbacks.append(self.gc)

    def take(self, gen: int) -> tuple[list[int], list[tuple[str, int, int]]]:
        """Step durations (ns, in ``STEPS`` order; empty for the constructor) and the cyclic
        collections inside them as (step, generation, ns)."""
        if self.proc is None:
            self.proc = ProxyProcess(self.loop, 0, self.reader, self.board, None)
            freeze_startup_heap()  # as proxy_workers.serving.process does before serving
            steps: list[int] = []
            collections: list[tuple[str, int, int]] = []
        else:
            steps, collections = self._timed_steps(self.proc.snapshot_steps())
        self._verify(gen)
        return steps, collections

    def _timed_steps(self, steps: Iterator[str]) -> tuple[list[int], list[tuple[str, int, int]]]:
        names: list[str] = []
        bounds = [time.perf_counter_ns()]
        self.gc.active = True
        try:
            for name in steps:
                bounds.append(time.perf_counter_ns())  # this step's end, the next one's start
                names.append(name)
        finally:
            self.gc.active = False
        if tuple(names) != STEPS:
            raise RuntimeError(f"snapshot_steps() yielded {names}, expected {list(STEPS)} "
                               f"(an empty list means the read was torn or did not decode)")
        took = [bounds[i + 1] - bounds[i] for i in range(len(names))]
        collections = [(names[min(len(names) - 1, max(0, bisect.bisect_right(bounds, start) - 1))],
                        generation, ns) for start, generation, ns in self.gc.take()]
        return took, collections

    def _verify(self, gen: int) -> None:
        assert self.proc is not None
        if self.proc.reader.generation != gen or self.proc.latest_table().generation != gen:
            table_generation = self.proc.latest_table().generation
            raise RuntimeError(f"proxy did not take generation {gen}: reader at "
                               f"{self.proc.reader.generation}, table at {table_generation}")

    def close(self) -> None:
        if self.gc in gc.callbacks:
            gc.callbacks.remove(self.gc)
        self.proc = None
        self.loop.close()


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


def step_figures(rounds: list[list[int]], collections: list[list[tuple[str, int, int]]]) -> dict[str, Any]:
    """Per step, pause (longest step of a publish), work (sum of steps) and cyclic GC inside steps."""
    fig: dict[str, Any] = {f"{name}_ms": summary([r[i] for r in rounds]) for i, name in enumerate(STEPS)}
    fig["pause_ms"] = summary([max(r) for r in rounds])
    fig["work_ms"] = summary([sum(r) for r in rounds])
    longest = [STEPS[r.index(max(r))] for r in rounds]
    fig["longest_step"] = {name: longest.count(name) for name in STEPS}
    fig["gc_ms"] = summary([max((ns for _, _, ns in c), default=0) for c in collections])
    runs = [f"{step}/gen{gen}" for c in collections for step, gen, _ in c]
    fig["gc_collections"] = {key: runs.count(key) for key in sorted(set(runs))}
    return fig


# --------------------------------------------------------------------------------------------
# reader process


def reader_process(snap_name: str, board_name: str, conn: Connection, gc_enabled: bool) -> None:
    """A proxy-like reader: a real ProxyProcess takes each announced generation step by step."""
    if not gc_enabled:
        gc.disable()
    seg, board_seg = Segment.attach(snap_name), Segment.attach(board_name)
    board = LoadBoard(board_seg)
    reader = SnapshotReader(seg)
    harness = ProxyHarness(reader, board)
    rounds: list[list[int]] = []
    collections: list[list[tuple[str, int, int]]] = []
    conn.send("ready")
    try:
        while (msg := conn.recv()) != "stop":
            measured, gen = msg
            try:
                steps, gcs = harness.take(gen)
            except Exception as exc:  # report it now rather than leave the parent waiting
                conn.send(("error", f"{type(exc).__name__}: {exc}"))
                return
            if measured:
                rounds.append(steps)
                collections.append(gcs)
            conn.send(("ok", gen))
        conn.send(("done", rounds, collections, reader.torn_reads))
    finally:
        harness.close()
        reader.close()
        board.close()


def _recv(conn: Connection, what: str) -> Any:
    if not conn.poll(CHILD_DEADLINE):
        raise SystemExit(f"reader process did not answer ({what}) within {CHILD_DEADLINE} s")
    msg = conn.recv()
    if isinstance(msg, tuple) and msg and msg[0] == "error":
        raise SystemExit(f"reader process: {msg[1]}")
    return msg


# --------------------------------------------------------------------------------------------
# measurements


def start_reader_process(seg: Segment, board_seg: Segment) -> tuple[mp.process.BaseProcess, Connection]:
    ctx = mp.get_context("spawn")
    conn, child_conn = ctx.Pipe()
    child = ctx.Process(target=reader_process, args=(seg.name, board_seg.name, child_conn, gc.isenabled()),
                        name="bench-reader")
    child.start()
    _recv(conn, "start")
    return child, conn


def measure_publish_and_pause(shm: Shm, base: Snapshot, repeat: int, use_process: bool) -> dict[str, Any]:
    probe = encode_snapshot(base)
    seg = shm.create("snap", segment_size(max(1 << 20, 4 * len(probe))))
    board_seg, board = shm.board(len(base.workers))
    writer = SnapshotWriter(seg, os.getpid())
    reader = SnapshotReader(seg)
    harness = ProxyHarness(reader, board)
    child, conn = start_reader_process(seg, board_seg) if use_process else (None, None)

    encode_ns: list[int] = []
    publish_ns: list[int] = []
    total_ns: list[int] = []
    rounds: list[list[int]] = []
    collections: list[list[tuple[str, int, int]]] = []
    sizes = []
    try:
        # Round 0 warms up (type plans, page faults) and is not counted: it is the snapshot the
        # ProxyProcess constructors take, in this process and in the reader process.
        for i in range(repeat + 1):
            measured = i > 0
            snap = msgspec.structs.replace(base, generation=writer.generation + 1, created_at=time.time())
            t0 = time.perf_counter_ns()
            payload = encode_snapshot(snap)
            t1 = time.perf_counter_ns()
            gen = writer.publish_bytes(payload)
            t2 = time.perf_counter_ns()
            try:
                steps, gcs = harness.take(gen)
            except RuntimeError as exc:
                raise SystemExit(f"in-process proxy: {exc}") from exc
            if measured:
                encode_ns.append(t1 - t0)
                publish_ns.append(t2 - t1)
                total_ns.append(t2 - t0)
                rounds.append(steps)
                collections.append(gcs)
                sizes.append(len(payload))
            if conn is not None:
                conn.send((measured, gen))
                _recv(conn, f"generation {gen}")
        proc: dict[str, Any] = {}
        if conn is not None and child is not None:
            conn.send("stop")
            _, p_rounds, p_collections, p_torn = _recv(conn, "results")
            child.join(CHILD_DEADLINE)
            proc = {**step_figures(p_rounds, p_collections), "torn_retries": p_torn}
    finally:
        if child is not None and child.is_alive():
            child.terminate()
            child.join(CHILD_DEADLINE)
        harness.close()
        reader.close()
        writer.close()
        board.close()
    return {
        "payload_bytes": sizes[0] if sizes else len(probe),
        "encode_ms": summary(encode_ns), "publish_bytes_ms": summary(publish_ns),
        "publish_ms": summary(total_ns),
        **step_figures(rounds, collections),
        "process": proc,
    }


def per_call_ns(fn: Callable[[], object], calls: int, rounds: int) -> dict[str, float]:
    """Per-call cost of ``fn()`` and of an empty loop; best of ``rounds`` loops each."""
    loop = range(calls)
    best_call = best_empty = math.inf
    for _ in range(rounds):
        t0 = time.perf_counter_ns()
        for _ in loop:
            fn()
        t1 = time.perf_counter_ns()
        for _ in loop:
            pass
        t2 = time.perf_counter_ns()
        best_call = min(best_call, (t1 - t0) / calls)
        best_empty = min(best_empty, (t2 - t1) / calls)
    return {"per_call_ns": round(best_call, 1), "loop_overhead_ns": round(best_empty, 1),
            "net_ns": round(best_call - best_empty, 1)}


def measure_check(shm: Shm, n_workers: int, n_models: int, calls: int, rounds: int) -> dict[str, Any]:
    """Per-call cost of ``ProxyProcess.latest_table()`` (and ``reader.moved()``), generation unchanged."""
    payload = encode_snapshot(msgspec.structs.replace(make_fleet(n_workers, n_models), generation=1))
    seg = shm.create("snap", segment_size(max(1 << 16, 2 * len(payload))))
    _, board = shm.board(n_workers)
    writer = SnapshotWriter(seg, os.getpid())
    gen = writer.publish_bytes(payload)
    reader = SnapshotReader(seg)
    harness = ProxyHarness(reader, board)
    try:
        harness.take(gen)
        assert harness.proc is not None
        first = harness.proc.latest_table()
        table = per_call_ns(harness.proc.table, calls, rounds)
        moved = per_call_ns(reader.moved, calls, rounds)
        if harness.proc.latest_table() is not first or reader.moved():
            raise SystemExit("snapshot changed during the check measurement")
    except RuntimeError as exc:
        raise SystemExit(f"check proxy: {exc}") from exc
    finally:
        harness.close()
        reader.close()
        writer.close()
        board.close()
    return {**table, "moved": moved}


# --------------------------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workers", type=int, default=10_000, help="workers in the fleet (default 10000)")
    parser.add_argument("--models", type=int, default=50, help="distinct models (default 50)")
    parser.add_argument("--repeat", type=int, default=20, help="measured publishes (default 20)")
    parser.add_argument("--check-calls", type=int, default=1_000_000,
                        help="table() calls per check loop (default 1000000)")
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
        "python": sys.version.split()[0], "cpus": os.cpu_count(), "loop": LOOP_KIND,
        "gc": args.gc, "pause": "longest step of ProxyProcess.snapshot_steps() per publish",
        **{k: v for k, v in main_fig.items() if k != "process"},
        "process_reader": main_fig["process"],
        "check": {str(n): c for n, c in check.items()},
        "targets": {
            "publish_p99_le_10ms": main_fig["publish_ms"]["p99"] <= TARGET_PUBLISH_MS,
            "pause_longest_step_p99_le_10ms": pause_ms["p99"] <= TARGET_PAUSE_MS,
            "check_tens_of_ns": all(c["per_call_ns"] < TARGET_CHECK_NS for c in check.values()),
        },
    }
    print(json.dumps(result, separators=(",", ":")))
    return 0


def _print_table(args: argparse.Namespace, fig: dict[str, Any], check: dict[int, dict[str, Any]]) -> None:
    def row(label: str, s: dict[str, float], unit: str = "ms") -> None:
        print(f"  {label:<48} {s['median']:>9.3f} {s['p99']:>9.3f} {s['max']:>9.3f}  {unit}")

    print(f"snapshot bench: {args.workers} workers, {args.models} models, "
          f"payload {fig['payload_bytes'] / 1024:.0f} KiB, {args.repeat} measured publishes, "
          f"python {sys.version.split()[0]}, {os.cpu_count()} cpus, gc {args.gc}")
    print(f"proxy: real ProxyProcess ({LOOP_KIND} loop object, not run), snapshot_steps() driven directly; "
          "pause = longest step")
    print(f"  {'':<48} {'median':>9} {'p99':>9} {'max':>9}")
    row("publish: encode", fig["encode_ms"])
    row("publish: publish_bytes (copy + crc)", fig["publish_bytes_ms"])
    row("publish: total", fig["publish_ms"])
    _print_steps(row, "in-process", fig)
    if fig["process"]:
        _print_steps(row, "reader process", fig["process"])
    print("  (p99 is nearest-rank: with fewer than 100 samples it is the maximum)")
    print(f"  {'check, generation unchanged':<48} {'per call':>9} {'loop':>9} {'net':>9}")
    for n, c in check.items():
        for label, s in ((f"  table(), {n} workers", c), (f"  reader.moved(), {n} workers", c["moved"])):
            print(f"  {label:<48} {s['per_call_ns']:>9.1f} {s['loop_overhead_ns']:>9.1f} "
                  f"{s['net_ns']:>9.1f}  ns")


def _print_steps(row: Callable[[str, dict[str, float]], None], where: str, fig: dict[str, Any]) -> None:
    for name in STEPS:
        row(f"step ({where}): {name}", fig[f"{name}_ms"])
    row(f"pause ({where}): longest step  [target]" if where == "reader process"
        else f"pause ({where}): longest step", fig["pause_ms"])
    row(f"  work ({where}): sum of steps", fig["work_ms"])
    row("  cyclic gc inside steps (longest per publish)", fig["gc_ms"])
    longest = ", ".join(f"{k} {v}" for k, v in fig["longest_step"].items())
    runs = ", ".join(f"{k} x{v}" for k, v in fig["gc_collections"].items()) or "none"
    print(f"    longest step was: {longest}; gc collections (step/generation): {runs}")


if __name__ == "__main__":
    raise SystemExit(main())
