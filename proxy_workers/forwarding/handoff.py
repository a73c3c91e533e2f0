"""The prefill/decode handoff, for HTTP PD and gRPC PD alike: what each leg is asked, what passes between.

Role: the bodies and messages of vLLM's two-phase handoff and SGLang's bootstrap dialect, built in
one place so :mod:`proxy_workers.http.pd` and :mod:`proxy_workers.grpc.exchange` cannot ask workers
different things.

- ``two_phase`` (vLLM): the prefill leg gets the request with one output token, no stream, and
  ``kv_transfer_params`` = :data:`PREFILL_KV`; its answer's opaque ``kv_transfer_params`` go into
  the original request, which the decode leg gets.
- ``bootstrap`` (SGLang): both legs get the request plus ``bootstrap_host`` (the prefill worker's
  host), ``bootstrap_port`` (its configured port, may be null) and ``bootstrap_room`` (random
  63-bit; one per item of a batched input), at the same time.

Invariants: the router never looks inside a KV handle; it copies it verbatim (a JSON object over
HTTP, bytes over gRPC).
"""

from __future__ import annotations

import random
from typing import Any
from urllib.parse import urlsplit

import msgspec

from shm.schema import Worker

# What a two-phase prefill leg is asked for: compute the prompt's KV, keep it for a remote decode.
PREFILL_KV: dict[str, Any] = {"do_remote_decode": True, "do_remote_prefill": False, "remote_engine_id": None,
                              "remote_block_ids": None, "remote_host": None, "remote_port": None}
PREFILL_KV_JSON = msgspec.json.encode(PREFILL_KV)  # the same, as gRPC's opaque bytes field carries it
# A prefill answer is one token and a handle: anything longer is cut (never streamed to anyone).
MAX_PREFILL_ANSWER = 1 << 20
_decode_json = msgspec.json.decode


def prefill_body(doc: dict[str, Any]) -> dict[str, Any]:
    """The two-phase prefill copy of a request body."""
    out = dict(doc)
    out["max_tokens"] = 1
    out["max_completion_tokens"] = 1
    out["stream"] = False
    out.pop("stream_options", None)
    out["kv_transfer_params"] = dict(PREFILL_KV)
    return out


def decode_body(doc: dict[str, Any], handle: dict[str, Any]) -> dict[str, Any]:
    """The two-phase decode request: the original body plus the prefill's handle, unread."""
    out = dict(doc)
    out["kv_transfer_params"] = handle
    return out


def kv_handle(answer: bytes) -> dict[str, Any] | None:
    """The opaque ``kv_transfer_params`` of a prefill worker's JSON answer, or None without one."""
    try:
        doc = _decode_json(answer)
    except msgspec.DecodeError:
        return None
    handle = doc.get("kv_transfer_params") if isinstance(doc, dict) else None
    return handle if isinstance(handle, dict) else None


def bootstrap_body(doc: dict[str, Any], prefill: Worker, rng: random.Random) -> dict[str, Any]:
    """The body both legs get in bootstrap mode: one room per item of a batched input."""
    host = urlsplit(prefill.url).hostname
    batch = next((len(doc[k]) for k in ("text", "input_ids", "prompt")
                  if isinstance(doc.get(k), list) and doc[k] and not isinstance(doc[k][0], int)), 0)
    out = dict(doc)
    if batch:
        out["bootstrap_host"] = [host] * batch
        out["bootstrap_port"] = [prefill.bootstrap_port] * batch
        out["bootstrap_room"] = [rng.getrandbits(63) for _ in range(batch)]
    else:
        out["bootstrap_host"] = host
        out["bootstrap_port"] = prefill.bootstrap_port
        out["bootstrap_room"] = rng.getrandbits(63)
    return out
