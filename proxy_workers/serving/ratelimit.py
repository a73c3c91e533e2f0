"""Per-client rate limits for admission control: client keys and token buckets.

Role: answer "may this client start a request now, and if not, in how many seconds?" for
:class:`proxy_workers.serving.admission.Admission`, which owns one :class:`RateLimiter` per proxy
process (its share of ``rate_limit_rpm`` and ``rate_limit_tpm``) and turns a wait into a 429.

Invariants:
- Client keys are hashed (blake2b) before use; the raw key is never stored, logged or shown.
- A refused take charges nothing; an admitted one is charged to both buckets (requests, tokens).
- A cost above a bucket's capacity needs a full bucket, so no request is refused forever.
- At most ``MAX_CLIENTS`` clients are kept: idle ones (refilled buckets) are dropped first, and if
  every client is busy the table starts over.
"""

from __future__ import annotations

import hashlib

MAX_CLIENTS = 65536  # rate-limit buckets kept per proxy before idle ones are dropped


def client_key(headers: list[tuple[bytes, bytes]], header: bytes, peer: bytes) -> bytes:
    """The hashed identity of a request's client: the ``header``'s value (the Bearer token for
    Authorization), else the client address."""
    raw = b""
    for name, value in headers:
        if name == header:
            raw = value.strip()
            if header == b"authorization" and raw[:7].lower() == b"bearer ":
                raw = raw[7:].strip()
            break
    data = b"k:" + raw if raw else b"a:" + peer
    return hashlib.blake2b(data, digest_size=16).digest()


class TokenBucket:
    """``capacity`` per minute, refilled continuously; may go negative by one oversize take."""

    __slots__ = ("capacity", "level", "rate", "stamp")

    def __init__(self, per_minute: float, now: float) -> None:
        self.capacity = per_minute
        self.rate = per_minute / 60.0
        self.level = per_minute
        self.stamp = now

    def refill(self, now: float) -> None:
        self.level = min(self.capacity, self.level + (now - self.stamp) * self.rate)
        self.stamp = now

    def wait(self, cost: float) -> float:
        """Seconds until ``cost`` could be taken (0.0: now). A cost above the capacity needs a
        full bucket, so no request is refused forever."""
        need = min(cost, self.capacity)
        return 0.0 if self.level >= need else (need - self.level) / self.rate


class RateLimiter:
    """Per-client requests- and tokens-per-minute buckets (either limit may be 0 = off)."""

    def __init__(self, rpm: float, tpm: float) -> None:
        self.rpm = rpm
        self.tpm = tpm
        self.clients: dict[bytes, tuple[TokenBucket | None, TokenBucket | None]] = {}

    def take(self, key: bytes, tokens: int, now: float) -> float:
        """0.0 and the request is charged to both buckets, or the seconds to wait (nothing charged)."""
        buckets = self.clients.get(key)
        if buckets is None:
            if len(self.clients) >= MAX_CLIENTS:
                self._forget_idle(now)
            buckets = self.clients[key] = (TokenBucket(self.rpm, now) if self.rpm else None,
                                           TokenBucket(self.tpm, now) if self.tpm else None)
        requests, toks = buckets
        wait = 0.0
        if requests is not None:
            requests.refill(now)
            wait = requests.wait(1)
        if toks is not None:
            toks.refill(now)
            wait = max(wait, toks.wait(tokens))
        if wait:
            return wait
        if requests is not None:
            requests.level -= 1
        if toks is not None:
            toks.level -= tokens
        return 0.0

    def _forget_idle(self, now: float) -> None:
        """Drop clients whose buckets have refilled (forgetting them changes nothing); if all are
        busy, start over (a bounded table matters more than a burst of forgiveness)."""
        for key, buckets in list(self.clients.items()):
            for b in buckets:
                if b is not None:
                    b.refill(now)
            if all(b is None or b.level >= b.capacity for b in buckets):
                del self.clients[key]
        if len(self.clients) >= MAX_CLIENTS:
            self.clients.clear()
