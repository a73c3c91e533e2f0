"""Fetch the workers' own load figures into the load board: vLLM / SGLang ``GET /metrics`` from
HTTP workers, ``GetLoad`` from gRPC workers.

Role: feed the ``least_loaded`` policy with what the engines say about themselves: requests
running, requests waiting, KV-cache usage. The coordinator is the single writer of the board's
engine rows; proxies read them per request.

Invariants:
- Scraping runs only while some model uses ``least_loaded`` (a fleet of 10,000 workers scraped
  every 2 s would be 5,000 requests a second for nothing otherwise).
- One round covers every discovered worker, HTTP (``GET /metrics``) and gRPC (``GetLoad``, see
  :mod:`coordinator.health.grpc_probe`) alike, under one concurrency bound. gRPC workers are asked over
  channels kept across rounds; each round first closes those of workers no longer in the fleet.
- A failed scrape leaves the previous figures and their timestamp, so readers can tell stale
  figures from fresh ones (``engine_scraped_at``).
- Values summed over label sets (an engine may report per model or per rank).
- KV usage is stored as a fraction in 0..1 whatever the worker sent (NaN counts as 0).
"""

from __future__ import annotations

import asyncio
import math
import time

import aiohttp

from coordinator.fleet.membership import Fleet, WorkerState
from coordinator.health.grpc_probe import LoadChannels
from shm.loadboard import E_KV_USAGE, E_RUNNING, E_SCRAPED_AT, E_WAITING, LoadBoard
from shm.settings import POLICY_FIELDS, Settings

RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
MAX_CONCURRENT_SCRAPES = 64
Figures = tuple[int, int, float]  # running, waiting, kv usage 0-1


def kv_fraction(value: float) -> float:
    return min(max(value, 0.0), 1.0) if math.isfinite(value) else 0.0


def parse_engine_metrics(text: str) -> Figures | None:
    """(running, waiting, kv usage 0-1) from Prometheus text, or None if no known series."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line or line[0] == "#":
            continue
        name_end = min((i for i in (line.find("{"), line.find(" ")) if i >= 0), default=-1)
        if name_end < 0:
            continue
        name = line[:name_end]
        if name not in RUNNING and name not in WAITING and name not in KV_USAGE:
            continue
        try:
            value = float(line.rsplit(" ", 1)[1] if "}" not in line else line.rsplit("}", 1)[1].split()[0])
        except (ValueError, IndexError):
            continue
        sums[name] = sums.get(name, 0.0) + value
    if not sums:
        return None
    # An engine speaks one dialect; a worker exposing both (our mock does) counts once.
    family = "vllm:" if any(n.startswith("vllm:") for n in sums) else "sglang:"
    running = sum(sums.get(n, 0.0) for n in RUNNING if n.startswith(family))
    waiting = sum(sums.get(n, 0.0) for n in WAITING if n.startswith(family))
    kv = max((sums[n] for n in KV_USAGE if n in sums and n.startswith(family)), default=0.0)
    return int(running), int(waiting), kv_fraction(kv)


def wanted(settings: Settings, model_policies: dict) -> bool:
    """True while some model routes by least_loaded, on either side of a PD pair too."""
    return any(getattr(p, key, None) == "least_loaded"
               for p in (settings, *model_policies.values()) for key in POLICY_FIELDS)


async def scrape_one(session: aiohttp.ClientSession, url: str, timeout: float) -> Figures | None:
    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return None
            return parse_engine_metrics(await resp.text())
    except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
        return None


async def fetch_figures(session: aiohttp.ClientSession, channels: LoadChannels, state: WorkerState,
                        timeout: float) -> Figures | None:
    """One worker's figures over its own connection; None when it did not give any."""
    if state.spec.connection == "grpc":
        return await channels.get_load(state.spec.url, timeout)
    return await scrape_one(session, state.spec.url, timeout)


def write_figures(board: LoadBoard, slot: int, figures: Figures) -> None:
    running, waiting, kv = figures
    base = board.engine_word(slot)
    board.ints[base + E_RUNNING] = running
    board.ints[base + E_WAITING] = waiting
    board.floats[base + E_KV_USAGE] = kv_fraction(kv)
    # The timestamp last: it is what marks the row fresh to the proxies.
    board.floats[base + E_SCRAPED_AT] = time.time()


async def scrape_all(session: aiohttp.ClientSession, channels: LoadChannels, fleet: Fleet, board: LoadBoard,
                     settings: Settings) -> int:
    """Fetch every discovered worker's figures once; returns how many answered with them."""
    # Every gRPC worker still in the fleet keeps its channel, an undiscovered one included (it is
    # fetched again once discovered); a worker that left has its channel closed.
    await channels.retain({s.spec.url for s in fleet.states.values() if s.spec.connection == "grpc"})
    states = [s for s in fleet.states.values() if s.discovered]
    limit = asyncio.Semaphore(MAX_CONCURRENT_SCRAPES)

    async def one(state: WorkerState) -> bool:
        async with limit:
            figures = await fetch_figures(session, channels, state, settings.health_timeout)
        if figures is None:
            return False
        write_figures(board, state.slot, figures)
        return True

    results = await asyncio.gather(*(one(s) for s in states))
    return sum(results)
