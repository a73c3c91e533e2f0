"""Proxy memory under hostile clients: RSS stays bounded (issue 11, docs/security.md "Memory").

Starts a real router (``shardgate serve --proxies 1``) in front of a real mock worker, then runs
each scenario against it and prints the proxy process's RSS growth (psutil) at its peak:

  a) ``--clients`` (1,000) clients each send a ``max_body_size`` body in 2-byte chunks, all at
     once: every body is 99% sent before any completes, so the proxy holds them all.
  b) one client pipelines small requests and never reads: the router stops reading from it at
     ``max_pipelined`` queued requests and while the client's write buffer is full.
  c) SSE readers that stop reading while workers keep producing: the upstream-backpressure
     side of issue 11, measured by ``loadtest/memory_bench_sse.py``; :func:`scenario_c` is the
     hook to fold it in here.

    python3 loadtest/memory_bench.py                 # all scenarios, max_body_size 16 KiB
    python3 loadtest/memory_bench.py --scenario a --clients 1000 --max-body-size 65536

The bound to compare with, per connection: docs/security.md ("Memory").
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import time
from pathlib import Path

import psutil

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from shardgate import launch
from shardgate.launch import free_port

MiB = 1024 * 1024


def proxy_process(router: launch.Launched) -> psutil.Process:
    children = psutil.Process(router.pid).children(recursive=True)
    proxies = [p for p in children if "proxy" in " ".join(p.cmdline()) or p.ppid() == router.pid]
    return proxies[0]


def rss(proc: psutil.Process) -> int:
    return int(proc.memory_info().rss)


def body_of(size: int) -> bytes:
    doc = {"model": "m1", "messages": [{"role": "user", "content": ""}], "max_tokens": 4}
    pad = size - len(json.dumps(doc))
    doc["messages"][0]["content"] = "x" * max(0, pad)
    return json.dumps(doc).encode()


async def scenario_a(host: str, port: int, proc: psutil.Process, clients: int,
                     max_body: int) -> dict[str, float]:
    """1,000 clients, each a max-size body in 2-byte chunks, all in flight together."""
    body = body_of(max_body)
    chunks = [b"2\r\n%s\r\n" % body[i:i + 2] for i in range(0, len(body) - 1, 2)]
    if len(body) % 2:
        chunks.append(b"1\r\n%s\r\n" % body[-1:])
    head = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
            b"Transfer-Encoding: chunked\r\nConnection: close\r\n\r\n")
    before = rss(proc)
    conns = [await asyncio.open_connection(host, port) for _ in range(clients)]
    connected = rss(proc)
    cut = len(chunks) * 99 // 100
    for _, writer in conns:
        writer.write(head)
    step = 256  # chunks per client per round: interleaved, so every body is in progress at once
    for start in range(0, cut, step):
        for _, writer in conns:
            writer.write(b"".join(chunks[start:min(start + step, cut)]))
        await asyncio.gather(*(w.drain() for _, w in conns))
    await asyncio.sleep(0.5)  # let the proxy read what the kernel holds (a measurement, not a sync)
    peak = rss(proc)
    for _, writer in conns:
        writer.write(b"".join(chunks[cut:]) + b"0\r\n\r\n")
    statuses = await asyncio.gather(*(reader.readline() for reader, _ in conns))
    for _, writer in conns:
        writer.close()
    ok = sum(1 for s in statuses if b" 200 " in s)
    held = clients * len(body)
    return {"clients": clients, "body_bytes": len(body), "ok": ok, "rss_before_mib": before / MiB,
            "rss_connected_mib": connected / MiB, "rss_peak_mib": peak / MiB,
            "growth_per_client_kib": (peak - connected) / clients / 1024,
            "growth_over_bodies": (peak - connected) / held}


async def scenario_b(host: str, port: int, proc: psutil.Process, seconds: float) -> dict[str, float]:
    """One client pipelining chat requests and never reading."""
    body = body_of(512)
    one = (b"POST /v1/chat/completions HTTP/1.1\r\nHost: bench\r\nContent-Type: application/json\r\n"
           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
    before = rss(proc)
    _, writer = await asyncio.open_connection(host, port)
    sent = 0
    peak = before
    deadline = time.monotonic() + seconds
    batch = one * 64
    while time.monotonic() < deadline:
        writer.write(batch)
        try:
            await asyncio.wait_for(writer.drain(), timeout=0.5)
            sent += len(batch)
        except TimeoutError:
            pass  # the router stopped reading: the client's buffers are full
        peak = max(peak, rss(proc))
        if writer.transport.get_write_buffer_size() > 64 * MiB:
            break
    writer.transport.abort()
    return {"bytes_sent": sent, "requests_sent": sent // len(one), "rss_before_mib": before / MiB,
            "rss_peak_mib": peak / MiB, "growth_mib": (peak - before) / MiB}


async def scenario_c(host: str, port: int, proc: psutil.Process) -> dict[str, float] | None:
    """100 SSE readers that stop reading while workers keep producing (upstream backpressure).

    Hook for the upstream side of issue 11: open 100 streams (``"stream": true`` with a large
    ``max_tokens`` against a fast mock worker, ``--tps 0``), read each head and first event,
    stop reading, and sample the proxy's RSS for a while; the bound is the client's write
    buffer high-water mark plus the paused worker connection's read buffer per stream."""
    return None


async def run(args: argparse.Namespace) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (min(hard, max(soft, 4 * args.clients + 256)), hard))
    worker = launch.mock_worker(["m1"], "--output-tokens", "4")
    port = free_port()
    router = launch.router([worker.url], "--port", str(port), "--proxies", "1",
                           "--max-body-size", str(args.max_body_size), "--header-timeout", "300")
    try:
        proc = proxy_process(router)
        results: dict[str, object] = {"max_body_size": args.max_body_size}
        if args.scenario in ("a", "all"):
            results["a"] = await scenario_a("127.0.0.1", port, proc, args.clients, args.max_body_size)
        if args.scenario in ("b", "all"):
            results["b"] = await scenario_b("127.0.0.1", port, proc, args.seconds)
        if args.scenario in ("c", "all"):
            results["c"] = await scenario_c("127.0.0.1", port, proc)
        print(json.dumps(results, indent=2))
    finally:
        router.stop()
        worker.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--scenario", choices=["a", "b", "c", "all"], default="all")
    parser.add_argument("--clients", type=int, default=1000)
    parser.add_argument("--max-body-size", type=int, default=16384)
    parser.add_argument("--seconds", type=float, default=10.0, help="scenario b's duration")
    asyncio.run(run(parser.parse_args()))


if __name__ == "__main__":
    main()
