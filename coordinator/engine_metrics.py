"""Scrape the workers' own load figures (vLLM / SGLang ``GET /metrics``) into the load board.

Role: feed the ``least_loaded`` policy with what the engines say about themselves: requests
running, requests waiting, KV-cache usage. The coordinator is the single writer of the board's
engine rows; proxies read them per request.

Invariants:
- Scraping runs only while some model uses ``least_loaded`` (a fleet of 10,000 workers scraped
  every 2 s would be 5,000 requests a second for nothing otherwise).
- A failed scrape leaves the previous figures and their timestamp, so readers can tell stale
  figures from fresh ones (``engine_scraped_at``).
- Values summed over label sets (an engine may report per model or per rank).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp

from coordinator.membership import Fleet
from shm.loadboard import E_KV_USAGE, E_RUNNING, E_SCRAPED_AT, E_WAITING, LoadBoard
from shm.settings import Settings

RUNNING = ("vllm:num_requests_running", "sglang:num_running_reqs")
WAITING = ("vllm:num_requests_waiting", "sglang:num_queue_reqs")
KV_USAGE = ("vllm:kv_cache_usage_perc", "vllm:gpu_cache_usage_perc", "sglang:token_usage")
MAX_CONCURRENT_SCRAPES = 64


def parse_engine_metrics(text: str) -> tuple[int, int, float] | None:
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
    return int(running), int(waiting), min(max(kv, 0.0), 1.0)


def wanted(settings: Settings, model_policies: dict) -> bool:
    return settings.policy == "least_loaded" or any(
        getattr(p, "policy", None) == "least_loaded" for p in model_policies.values())


async def scrape_one(session: aiohttp.ClientSession, url: str,
                     timeout: float) -> tuple[int, int, float] | None:
    try:
        async with session.get(url + "/metrics", timeout=aiohttp.ClientTimeout(total=timeout)) as resp:
            if resp.status != 200:
                return None
            return parse_engine_metrics(await resp.text())
    except (TimeoutError, aiohttp.ClientError, OSError, UnicodeDecodeError):
        return None


async def scrape_all(session: aiohttp.ClientSession, fleet: Fleet, board: LoadBoard,
                     settings: Settings) -> int:
    """Scrape every HTTP worker once; returns how many answered with engine figures."""
    states = [s for s in fleet.states.values() if s.spec.connection == "http" and s.discovered]
    limit = asyncio.Semaphore(MAX_CONCURRENT_SCRAPES)

    async def one(url: str, slot: int) -> bool:
        async with limit:
            figures = await scrape_one(session, url, settings.health_timeout)
        if figures is None:
            return False
        running, waiting, kv = figures
        base = board.engine_word(slot)
        board.ints[base + E_RUNNING] = running
        board.ints[base + E_WAITING] = waiting
        board.floats[base + E_KV_USAGE] = kv
        board.floats[base + E_SCRAPED_AT] = time.time()
        return True

    results = await asyncio.gather(*(one(s.spec.url, s.slot) for s in states))
    return sum(results)
