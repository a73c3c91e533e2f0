"""The proxy's per-request Python cost, without sockets.

Role: feed chat requests and worker responses through the real ``ClientProtocol``, ``Exchange``
and ``UpstreamConnection`` objects with fake transports, and time the whole exchanges. Requests
come in batches of BATCH, one per client connection, as a loaded proxy's loop iteration sees them,
and each half-batch ends with the outbox's flush (its ``call_soon`` shared by the batch, as in
the real loop). What ``peers.py`` measures also includes syscalls and the event loop; this
isolates the part our code controls, so a change to the request path can be measured in seconds.

Usage::

    PYTHONPATH=. python3 loadtest/bench_hotpath.py [--requests 20000] [--profile]
    PYTHONPATH=. python3 loadtest/bench_hotpath.py --instructions   # needs valgrind
    SHARDGATE_PURE=1 PYTHONPATH=. python3 loadtest/bench_hotpath.py --profile  # the interpreted path

It measures whichever request path the install runs (compiled or interpreted, proxy_workers.compiled;
the output says which); cProfile sees only the entry points of compiled code, hence SHARDGATE_PURE=1.

``--instructions`` counts CPU instructions per request under callgrind (the difference of two runs
of different lengths, so start-up cancels out). On a shared machine, where timings drift by 10-20%
between runs, that count is the reliable before/after figure for a change to the request path.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import re
import shutil
import statistics
import subprocess
import sys
import time

import uvloop

import proxy_workers
from coordinator.fleet.membership import Fleet
from proxy_workers.http.upstream import NO_OWNER, UpstreamConnection
from proxy_workers.serving.protocol import ClientProtocol
from proxy_workers.serving.state import ProxyProcess
from shm.loadboard import LoadBoard, board_size
from shm.schema import WorkerSpec
from shm.segment import Segment, new_instance_id, segment_name
from shm.settings import Settings
from shm.snapshot import SnapshotReader, SnapshotWriter, segment_size

REQUEST = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:8080\r\n"
           b"Content-Type: application/json\r\nContent-Length: 128\r\n\r\n"
           b'{"model":"m1","messages":[{"role":"user","content":"Hello, how are you today? '
           b'Tell me a story about routers."}],"max_tokens":16}')
BODY = (b'{"id":"cmpl-1","object":"chat.completion","created":0,"model":"m1","choices":[{"index":0,'
        b'"message":{"role":"assistant","content":"hello world"},"finish_reason":"stop"}],'
        b'"usage":{"prompt_tokens":5,"completion_tokens":2,"total_tokens":7}}')
RESPONSE = (b"HTTP/1.1 200 OK\r\nServer: nginx/1.22.1\r\nDate: Sat, 28 Nov 2026 18:00:00 GMT\r\n"
            b"Content-Type: application/json\r\nContent-Length: %d\r\nConnection: keep-alive\r\n\r\n%s"
            % (len(BODY), BODY))


class FakeTransport(asyncio.Transport):
    """Collects writes; never closes on its own."""

    def __init__(self, peer: tuple[str, int]) -> None:
        super().__init__()
        self.written: list[bytes] = []
        self.peer = peer
        self.closing = False

    def write(self, data: bytes) -> None:  # type: ignore[override]
        self.written.append(data)

    def get_extra_info(self, name: str, default: object = None) -> object:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closing

    def close(self) -> None:
        self.closing = True

    def abort(self) -> None:
        self.closing = True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass


def setup(loop: asyncio.AbstractEventLoop) -> tuple[ProxyProcess, list[Segment]]:
    instance = new_instance_id()
    snap = Segment.create(segment_name(instance, "snap"), segment_size(1 << 20))
    board_seg = Segment.create(segment_name(instance, "board"), board_size(4, 64))
    board = LoadBoard.create(board_seg, 4, 64)
    fleet = Fleet(64)
    fleet.apply([WorkerSpec(url="http://127.0.0.1:9001", model="m1"),
                 WorkerSpec(url="http://127.0.0.1:9002", model="m1")])
    SnapshotWriter(snap, os.getpid()).publish(fleet.snapshot(Settings(), {}, 1, 1, os.getpid()))
    reader = SnapshotReader(Segment.attach(snap.name))
    return ProxyProcess(loop, 0, reader, board), [snap, board_seg]


BATCH = 16  # requests per loop iteration: under peers.py's chat load a proxy sees ~20 per epoll wake


def one_batch(proc: ProxyProcess, clients: list[ClientProtocol],
              upstreams: dict[str, list[UpstreamConnection]]) -> None:
    """One loop iteration's worth of keep-alive requests (one per open client connection), then
    the one carrying their answers from pooled worker sockets; each ends with the outbox's flush,
    as the loop's iteration does (proxy_workers.outbox)."""
    for url, conns in upstreams.items():  # every socket idle in its pool, as in steady state
        pool = proc.pools.get(url)
        for conn in conns:
            if conn.exchange is NO_OWNER and conn not in pool.idle:
                pool.put(conn)
    for client in clients:
        client.data_received(REQUEST)
    proc.outbox.flush()
    for client in clients:
        exchange = client.exchange
        assert exchange is not None and exchange.conn is not None
        exchange.conn.data_received(RESPONSE)
    proc.outbox.flush()


def instructions_per_request(short: int = 100, long: int = 400) -> float:
    """Instructions per proxied request: callgrind totals of two loop lengths, differenced."""
    if shutil.which("valgrind") is None:
        raise SystemExit("--instructions needs valgrind (Debian: apt-get install -y valgrind)")
    totals = []
    for n in (short, long):
        out = subprocess.run(
            ["valgrind", "--tool=callgrind", "--callgrind-out-file=/dev/null", sys.executable,
             __file__, "--loop-only", str(n)], capture_output=True, text=True, check=True,
            env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        found = re.search(r"Collected : (\d+)", out.stderr)
        if found is None:
            raise SystemExit(f"no callgrind total in its output:\n{out.stderr[-2000:]}")
        totals.append(int(found.group(1)))
    return (totals[1] - totals[0]) / (long - short) / BATCH


def run_loop(count: int) -> None:
    """Just the exchanges (for --instructions): no timing, no output."""
    loop = uvloop.new_event_loop()
    proc, segments = setup(loop)
    try:
        clients, upstreams = connect(proc)
        for _ in range(count):
            one_batch(proc, clients, upstreams)
    finally:
        for seg in segments:
            seg.unlink()


def connect(proc: ProxyProcess) -> tuple[list[ClientProtocol], dict[str, list[UpstreamConnection]]]:
    """BATCH client connections, and BATCH pooled connections per worker, on fake transports."""
    clients = []
    for i in range(BATCH):
        client = ClientProtocol(proc)
        client.connection_made(FakeTransport(("127.0.0.1", 50000 + i)))
        clients.append(client)
    upstreams: dict[str, list[UpstreamConnection]] = {}
    for url in ("http://127.0.0.1:9001", "http://127.0.0.1:9002"):
        for _ in range(BATCH):
            conn = UpstreamConnection(proc.pools.get(url))
            conn.connection_made(FakeTransport(("127.0.0.1", 9000)))
            upstreams.setdefault(url, []).append(conn)
    return clients, upstreams


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--requests", type=int, default=20000)
    parser.add_argument("--profile", action="store_true")
    parser.add_argument("--instructions", action="store_true",
                        help="count instructions per request under callgrind instead of timing")
    parser.add_argument("--loop-only", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.loop_only:
        run_loop(args.loop_only)
        return 0
    if args.instructions:
        print(f"instructions per proxied request: {instructions_per_request():,.0f} "
              f"({proxy_workers.BUILD} request path)")
        return 0
    loop = uvloop.new_event_loop()  # the proxies run uvloop (its loop.time() is C, not Python)
    proc, segments = setup(loop)
    try:
        clients, upstreams = connect(proc)
        batches = max(1, args.requests // BATCH)
        for _ in range(2000 // BATCH):
            one_batch(proc, clients, upstreams)
        if args.profile:
            profiler = cProfile.Profile()
            profiler.enable()
            for _ in range(batches):
                one_batch(proc, clients, upstreams)
            profiler.disable()
            pstats.Stats(profiler).sort_stats("tottime").print_stats(25)
            return 0
        rounds = []
        for _ in range(7):
            start = time.perf_counter_ns()
            for _ in range(batches):
                one_batch(proc, clients, upstreams)
            rounds.append((time.perf_counter_ns() - start) / (batches * BATCH) / 1000)
        print(f"{proxy_workers.BUILD} request path, per proxied request (no syscalls): "
              f"median {statistics.median(rounds):.2f} us, "
              f"best {min(rounds):.2f} us over {len(rounds)} rounds of {batches * BATCH}")
    finally:
        for seg in segments:
            seg.unlink()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
