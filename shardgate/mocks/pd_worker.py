"""Prefill/decode roles of the mock worker, in both PD dialects, played honestly.

Role: make a mock prefill worker and a mock decode worker behave like engines that really hand KV
cache over, so a router that gets the protocol wrong fails the tests.

- vLLM two-phase: a prefill worker given ``kv_transfer_params.do_remote_decode`` answers one
  token plus an opaque ``kv_transfer_params`` handle; a decode worker accepts a request only with
  a handle that a prefill worker issued for the same prompt (an HMAC under a secret every mock
  shares), so a router that invents, drops or mixes up handles is refused with 400.
- SGLang bootstrap: a prefill worker given ``bootstrap_room`` marks the room ready (visible at
  ``GET /mock/bootstrap/{room}`` on its port, standing in for the engine's bootstrap server); a
  decode worker given a room polls the named ``bootstrap_host:bootstrap_port`` until the room is
  ready, and fails after ``BOOTSTRAP_TIMEOUT`` if no prefill arrives.

Invariant: the router never looks inside a handle; only mocks create and check them.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
from typing import Any

import aiohttp

SECRET = b"shardgate-mock-kv-handoff"
BOOTSTRAP_TIMEOUT = 5.0
POLL_SECONDS = 0.02


def handle_for(prompt: str) -> str:
    return hmac.new(SECRET, prompt.encode(), hashlib.sha256).hexdigest()[:32]


def issue(worker: str, prompt: str) -> dict[str, Any]:
    """The kv_transfer_params a prefill worker returns (opaque to the router)."""
    host, _, port = worker.rpartition(":")
    return {"do_remote_decode": False, "do_remote_prefill": True, "remote_engine_id": worker,
            "remote_block_ids": [1, 2, 3], "remote_host": host, "remote_port": int(port or 0),
            "handle": handle_for(prompt)}


def wants_prefill(body: dict[str, Any]) -> bool:
    kv = body.get("kv_transfer_params")
    return isinstance(kv, dict) and kv.get("do_remote_decode") is True


def check_decode(body: dict[str, Any], prompt: str) -> str:
    """Empty when a decode request carries a valid handoff (handle or bootstrap room), else why not."""
    kv = body.get("kv_transfer_params")
    if isinstance(kv, dict):
        if not kv.get("do_remote_prefill"):
            return "kv_transfer_params.do_remote_prefill must be true on a decode request"
        if not hmac.compare_digest(str(kv.get("handle", "")), handle_for(prompt)):
            return "the KV handle was not issued by a prefill worker for this prompt"
        return ""
    if "bootstrap_room" in body:
        return ""
    return "a decode worker needs a KV handle (kv_transfer_params) or a bootstrap room"


def rooms_of(body: dict[str, Any]) -> list[int]:
    room = body.get("bootstrap_room")
    if isinstance(room, list):
        return [int(r) for r in room]
    return [] if room is None else [int(room)]


class Rooms:
    """Bootstrap rooms whose prefill arrived at this worker."""

    def __init__(self) -> None:
        self.ready: set[int] = set()

    def mark(self, body: dict[str, Any]) -> None:
        self.ready.update(rooms_of(body))


def _addresses(body: dict[str, Any]) -> list[tuple[Any, Any, int]]:
    """(host, port, room) per item: batched requests carry one of each per item."""
    rooms = rooms_of(body)
    hosts, ports = body.get("bootstrap_host"), body.get("bootstrap_port")
    hosts = hosts if isinstance(hosts, list) else [hosts] * len(rooms)
    ports = ports if isinstance(ports, list) else [ports] * len(rooms)
    return list(zip(hosts, ports, rooms, strict=False))


async def wait_for_prefill(body: dict[str, Any], timeout: float = BOOTSTRAP_TIMEOUT) -> str:
    """Empty once every room of ``body`` is ready at its bootstrap address, else why not."""
    addresses = _addresses(body)
    if any(not host or not port for host, port, _ in addresses):
        return "bootstrap_host and bootstrap_port are required with a bootstrap_room"
    deadline = asyncio.get_running_loop().time() + timeout
    async with aiohttp.ClientSession() as session:
        for host, port, room in addresses:
            url = f"http://{host}:{port}/mock/bootstrap/{room}"
            while True:
                try:
                    async with session.get(url) as resp:
                        if resp.status == 200:
                            break
                except aiohttp.ClientError:
                    pass
                if asyncio.get_running_loop().time() > deadline:
                    return f"no prefill arrived for bootstrap room {room} within {timeout:g}s"
                await asyncio.sleep(POLL_SECONDS)
    return ""
