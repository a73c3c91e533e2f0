"""Load with one of three workers killed: do clients see more errors than were in flight on it?

Starts three mock workers and a router (real processes, loopback only), runs a bounded load
(asyncio + aiohttp, ``--concurrency`` clients, half of the requests streamed) for ``--duration``
seconds or ``--max-requests`` requests, and SIGKILLs one worker halfway. Just before the kill it
reads how many requests were in flight on that worker (the worker's own count and the router's).

What shardgate promises: a request that had not received a byte is retried on another worker
(failover), so only responses already under way on the dead worker can fail (streams end with an
SSE ``event: error``); new requests never reach it again once passive health ejects it (or, before
that, fail over). So: client-visible errors <= requests in flight on the worker when it died.

    python3 loadtest/kill_worker.py [--duration 10] [--concurrency 32] [--proxies 2]

Prints one summary; exits 1 if the promise is broken.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shardgate import launch


@dataclass
class Tally:
    sent: int = 0
    ok: int = 0
    errors: int = 0
    streams: int = 0
    kinds: dict[str, int] = field(default_factory=dict)
    after_kill_errors: int = 0

    def error(self, kind: str, killed: bool) -> None:
        self.errors += 1
        self.kinds[kind] = self.kinds.get(kind, 0) + 1
        self.after_kill_errors += killed


def get_json(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=5) as resp:
        return json.loads(resp.read())


async def one(session: aiohttp.ClientSession, url: str, stream: bool, tally: Tally,
              killed: asyncio.Event) -> None:
    body = {"model": "m1", "stream": stream, "messages": [{"role": "user", "content": "tell me a story"}]}
    tally.sent += 1
    tally.streams += stream
    try:
        async with session.post(url + "/v1/chat/completions", json=body) as resp:
            data = await resp.read()
            if resp.status != 200:
                tally.error(f"status {resp.status}", killed.is_set())
            elif stream and (b"data: [DONE]" not in data or b"event: error" in data):
                tally.error("broken stream", killed.is_set())
            else:
                tally.ok += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        tally.error(exc.__class__.__name__, killed.is_set())


async def load(router: str, args: argparse.Namespace, victim: launch.Launched) -> dict:
    tally = Tally()
    killed = asyncio.Event()
    deadline = time.monotonic() + args.duration
    kill_at = time.monotonic() + args.duration / 2
    report: dict = {}

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        n = i
        while time.monotonic() < deadline and tally.sent < args.max_requests:
            await one(session, router, stream=n % 2 == 0, tally=tally, killed=killed)
            n += 1

    async def killer() -> None:
        await asyncio.sleep(max(0.0, kill_at - time.monotonic()))
        # Both views of "in flight on the victim", read right before the kill.
        worker_view = get_json(victim.url + "/mock/stats")["in_flight"]
        router_view = next(w["in_flight"] for w in get_json(router + "/workers")["workers"]
                           if w["url"] == victim.url)
        os.killpg(victim.pid, signal.SIGKILL)
        killed.set()
        killed_at = time.monotonic()
        report.update(in_flight_worker_view=worker_view, in_flight_router_view=router_view,
                      sent_before_kill=tally.sent)
        while time.monotonic() < deadline:
            row = next(w for w in get_json(router + "/workers")["workers"] if w["url"] == victim.url)
            if not row["healthy"]:
                report["ejected_after_seconds"] = round(time.monotonic() - killed_at, 3)
                report["ejection_reason"] = row["health_reason"]
                break
            await asyncio.sleep(0.05)

    timeout = aiohttp.ClientTimeout(total=60)
    connector = aiohttp.TCPConnector(limit=args.concurrency)
    async with aiohttp.ClientSession(timeout=timeout, connector=connector) as session:
        started = time.monotonic()
        await asyncio.gather(killer(), *(client(i, session) for i in range(args.concurrency)))
        elapsed = time.monotonic() - started
    report.update(requests=tally.sent, ok=tally.ok, streams=tally.streams, client_errors=tally.errors,
                  error_kinds=tally.kinds, errors_after_kill=tally.after_kill_errors,
                  seconds=round(elapsed, 2), requests_per_second=round(tally.sent / elapsed, 1))
    return report


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--duration", type=float, default=10.0, help="seconds of load (kill at half)")
    p.add_argument("--concurrency", type=int, default=32)
    p.add_argument("--max-requests", type=int, default=50_000)
    p.add_argument("--proxies", type=int, default=2)
    p.add_argument("--tps", type=float, default=100.0, help="mock workers' tokens per second")
    p.add_argument("--tokens", type=int, default=20, help="output tokens per response")
    args = p.parse_args(argv)

    mock = ("--ttft", "0.02", "--tps", str(args.tps), "--output-tokens", str(args.tokens))
    workers = [launch.mock_worker(["m1"], *mock) for _ in range(3)]
    router = None
    try:
        port = launch.free_port()
        router = launch.router([w.url for w in workers], "--port", str(port), "--proxies", str(args.proxies),
                               "--log-level", "warning")
        report = asyncio.run(load(router.url, args, workers[0]))
    finally:
        if router is not None:
            router.stop()
        for w in workers:
            w.stop()
    bound = max(report["in_flight_worker_view"], report["in_flight_router_view"])
    report["promise_kept"] = report["client_errors"] <= bound
    print(json.dumps(report, indent=2))
    return 0 if report["promise_kept"] else 1


if __name__ == "__main__":
    sys.exit(main())
