"""Proxy memory with SSE readers that stop reading while their workers keep producing (issue 11, 2c).

Starts the real router (``shardgate serve`` with a config file, ``--proxies 2`` by default) in
front of mock workers that stream as fast as they can (``--tps 0``) a long answer
(``--output-tokens``, ~150 bytes of SSE per token). Then:

1. control: one client reads a whole stream, to show how fast the workers produce;
2. opens ``--streams`` streaming chat requests on raw sockets with a small receive buffer, reads
   each one's head and first bytes, then stops reading;
3. samples the proxies' RSS (psutil; proxies are the coordinator's children) for ``--hold``
   seconds while the workers still have most of their answers to send;
4. closes the sockets, waits until the router has no request in flight, samples RSS again.

Bounded means: RSS while held grows by about ``streams`` x (the client transport's high-water
mark + one read from the worker), not by what the workers would send (``streams`` x the
stream size). The workers' ``in_flight`` staying at ``streams`` shows they were held back
(back-pressure through the proxy), not finished. Prints one table and one JSON line. Loopback only.

    PYTHONPATH=. python3 loadtest/memory_bench_sse.py [--streams 100] [--proxies 2] [--workers 2]
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
import tempfile
import time
import urllib.request
from typing import Any

from shardgate import launch
from shardgate.launch import free_port, proxies_rss_mb

MODEL = "m1"


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=10) as resp:
        return json.load(resp)


def stream_request(port: int) -> bytes:
    body = json.dumps({"model": MODEL, "stream": True,
                       "messages": [{"role": "user", "content": "tell me everything"}]}).encode()
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:%d\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (port, len(body), body))


def read_whole_stream(port: int) -> tuple[int, float]:
    """(bytes, seconds) of one stream read to its end: the workers' production rate."""
    started = time.monotonic()
    total = 0
    with socket.create_connection(("127.0.0.1", port)) as s:
        s.sendall(stream_request(port).replace(b"HTTP/1.1\r\n", b"HTTP/1.1\r\nConnection: close\r\n", 1))
        while chunk := s.recv(1 << 20):
            total += len(chunk)
    return total, time.monotonic() - started


def open_stalled_stream(port: int, rcvbuf: int) -> socket.socket:
    """A streaming request whose client reads the head and first event, then nothing more."""
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)  # before connect: sets the window
    s.connect(("127.0.0.1", port))
    s.sendall(stream_request(port))
    got = b""
    while b"data: " not in got:
        chunk = s.recv(4096)
        if not chunk:
            raise RuntimeError(f"stream closed early: {got[:200]!r}")
        got += chunk
    if not got.startswith(b"HTTP/1.1 200"):
        raise RuntimeError(f"stream refused: {got[:200]!r}")
    return s


def router_in_flight(url: str) -> int:
    return int(get_json(url + "/stats")["totals"]["in_flight"])


def workers_in_flight(workers: list[launch.Launched]) -> int:
    return sum(int(get_json(w.url + "/mock/stats")["in_flight"]) for w in workers)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--streams", type=int, default=100)
    ap.add_argument("--proxies", type=int, default=2)
    ap.add_argument("--workers", type=int, default=2)
    ap.add_argument("--output-tokens", type=int, default=200_000, help="tokens per stream (~150 B each)")
    ap.add_argument("--hold", type=float, default=8.0, help="seconds the readers stay stalled")
    ap.add_argument("--rcvbuf", type=int, default=4096, help="stalled clients' SO_RCVBUF")
    args = ap.parse_args()

    workers = [launch.mock_worker([MODEL], "--tps", "0", "--output-tokens", str(args.output_tokens))
               for _ in range(args.workers)]
    port = free_port()
    config = tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False)
    config.write(f"port: {port}\nproxies: {args.proxies}\nidle_timeout: 120\nworkers:\n")
    config.writelines(f"  - url: {w.url}\n    model: {MODEL}\n" for w in workers)
    config.close()
    router = launch.router([], config=config.name)
    socks: list[socket.socket] = []
    samples: list[float] = []
    try:
        stream_bytes, stream_seconds = read_whole_stream(port)  # also warms the proxies up
        before = proxies_rss_mb(router)
        for _ in range(args.streams):
            socks.append(open_stalled_stream(port, args.rcvbuf))
        held_since = time.monotonic()
        while time.monotonic() - held_since < args.hold:  # a measurement window, sampled
            samples.append(proxies_rss_mb(router))
            time.sleep(0.5)
        held_workers = workers_in_flight(workers)
        held_router = router_in_flight(router.url)
        during = max(samples)
        for s in socks:
            s.close()
        socks.clear()
        deadline = time.monotonic() + 30
        while (router_in_flight(router.url) or workers_in_flight(workers)) and time.monotonic() < deadline:
            time.sleep(0.2)  # polling for the aborts to land (bounded), not a synchronisation sleep
        after = proxies_rss_mb(router)
        unbounded_mb = args.streams * stream_bytes / 2**20
        result = {
            "streams": args.streams, "proxies": args.proxies, "workers": args.workers,
            "stream_mb": round(stream_bytes / 2**20, 1), "stream_seconds_when_read": round(stream_seconds, 2),
            "rss_before_mb": round(before, 1), "rss_held_max_mb": round(during, 1),
            "rss_held_first_mb": round(samples[0], 1), "rss_held_last_mb": round(samples[-1], 1),
            "rss_after_mb": round(after, 1),
            "held_growth_per_stream_kb": round((during - before) * 1024 / args.streams, 1),
            "would_be_buffered_if_unbounded_mb": round(unbounded_mb, 0),
            "router_in_flight_while_held": held_router, "worker_streams_unfinished_while_held": held_workers,
            "hold_seconds": args.hold,
        }
    finally:
        for s in socks:
            s.close()
        router.stop()
        for w in workers:
            w.stop()
        os.unlink(config.name)
    r = result
    print(f"one stream read whole: {r['stream_mb']} MB in {r['stream_seconds_when_read']} s; {r['streams']} "
          f"stalled streams would be {r['would_be_buffered_if_unbounded_mb']:.0f} MB if buffered")
    print(f"{'proxy RSS':>10} {'before':>8} {'held max':>9} {'held last':>10} {'after':>8} "
          f"{'per stream':>11}")
    print(f"{'':>10} {r['rss_before_mb']:>6.1f}MB {r['rss_held_max_mb']:>7.1f}MB "
          f"{r['rss_held_last_mb']:>8.1f}MB {r['rss_after_mb']:>6.1f}MB "
          f"{r['held_growth_per_stream_kb']:>8.1f}KB")
    print(f"while held: router in flight {r['router_in_flight_while_held']}, "
          f"worker streams unfinished {r['worker_streams_unfinished_while_held']}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
