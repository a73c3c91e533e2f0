"""Simulated traffic: arrivals, request costs, priorities and multi-turn conversations.

Role: produce the requests of a simulation run, each with a real chat body, so the production
policies read exactly what they would read from a client (``cache_aware`` decodes the prompt from
the body, the hashing and affinity policies hash the ``x-session-id`` header).

Invariants:
- One rule for turning tokens into text: ``CHARS_PER_TOKEN`` of the router's own token estimate
  (``proxy_workers.routing.context``), so a prompt of N simulated tokens is ~4N characters.
- A conversation only grows: turn k+1's body starts with every message of turn k (its system
  prompt, its turns and their answers), byte for byte. That is what makes a prefix cacheable, in
  the simulated workers' prefix caches and in cache_aware's prefix keys alike.
- Generated traffic: the arrival process alone sets *when* requests arrive (Poisson or bursts);
  each arrival is the next turn of the conversation that has waited longest since its previous
  answer (plus think time), or a new conversation when none is ready. So the offered rate is
  exactly the one asked for, and a follow-up never overtakes its previous turn.
- Trace traffic: arrival times, token counts, priorities and sessions come from the file; lines
  with the same ``session`` are turns of one conversation, in file order.
- Deterministic for a seed: every random draw comes from the ``random.Random`` given.
"""

from __future__ import annotations

import heapq
import json
import math
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec

from proxy_workers.routing.context import CHARS_PER_TOKEN

MODEL = "sim-model"
SESSION_HEADER = b"x-session-id"
_OPEN = b'{"model":' + msgspec.json.encode(MODEL) + b',"messages":['



class SpecError(ValueError):
    """A malformed command-line specification (distribution, shares, scenario, trace line)."""


# --------------------------------------------------------------------------------------------
# distributions and shares


class Dist:
    """A positive integer distribution from a spec: ``256``, ``100-400`` (uniform),
    ``exp:MEAN`` or ``lognormal:MEAN[:SIGMA]`` (MEAN is the distribution's mean; SIGMA that of
    the log, default 1). Draws are at least 1 and at most ``cap``."""

    __slots__ = ("a", "b", "cap", "kind", "spec")

    def __init__(self, spec: str, cap: int = 1 << 20) -> None:
        self.spec, self.cap = spec, cap
        try:
            if ":" in spec:
                kind, _, rest = spec.partition(":")
                parts = [float(x) for x in rest.split(":")]
                if kind == "exp" and len(parts) == 1:
                    self.kind, self.a, self.b = "exp", parts[0], 0.0
                elif kind == "lognormal" and len(parts) in (1, 2):
                    sigma = parts[1] if len(parts) == 2 else 1.0
                    # mean of a lognormal = exp(mu + sigma^2 / 2)
                    self.kind, self.a, self.b = "lognormal", math.log(parts[0]) - sigma * sigma / 2, sigma
                else:
                    raise ValueError
            elif "-" in spec:
                lo, hi = (int(x) for x in spec.split("-"))
                self.kind, self.a, self.b = "uniform", float(lo), float(hi)
                if lo > hi:
                    raise ValueError
            else:
                self.kind, self.a, self.b = "fixed", float(int(spec)), 0.0
        except ValueError:
            raise SpecError(f"bad distribution {spec!r}: use N, A-B, exp:MEAN or lognormal:MEAN[:SIGMA]") \
                from None
        if self.mean() <= 0:
            raise SpecError(f"bad distribution {spec!r}: the mean must be positive")

    def sample(self, rng: random.Random) -> int:
        kind = self.kind  # the default distributions' kind first: this runs ~3 times per request
        if kind == "lognormal":
            value = math.exp(rng.gauss(self.a, self.b))  # gauss: about twice lognormvariate's speed
        elif kind == "uniform":
            value = self.a + int(rng.random() * (self.b - self.a + 1))
        elif kind == "fixed":
            value = self.a
        else:
            value = rng.expovariate(1.0 / self.a)
        drawn = int(value + 0.5)
        return drawn if 1 <= drawn <= self.cap else (1 if drawn < 1 else self.cap)

    def mean(self) -> float:
        """The mean before clipping (what rate estimates use)."""
        if self.kind == "fixed":
            return self.a
        if self.kind == "uniform":
            return (self.a + self.b) / 2
        if self.kind == "exp":
            return self.a
        return math.exp(self.a + self.b * self.b / 2)


def parse_shares(spec: str) -> list[tuple[float, int]]:
    """``"8"`` -> [(1.0, 8)]; ``"90%:100,10%:50"`` -> [(0.9, 100), (0.1, 50)]; shares sum to 100%."""
    try:
        if ":" not in spec:
            return [(1.0, int(spec))]
        out = []
        for part in spec.split(","):
            share, _, value = part.strip().partition(":")
            out.append((float(share.rstrip("%")) / 100.0, int(value)))
    except ValueError:
        raise SpecError(f"bad shares {spec!r}: use VALUE or SHARE%:VALUE,SHARE%:VALUE...") from None
    if abs(sum(s for s, _ in out) - 1.0) > 0.005 or any(s < 0 for s, _ in out):
        raise SpecError(f"bad shares {spec!r}: the shares must add up to 100%")
    return out


def spread(n: int, shares: list[tuple[float, int]], rng: random.Random) -> list[int]:
    """``n`` values in the given shares (largest remainders), in a seeded random order."""
    counts = [int(share * n) for share, _ in shares]
    by_remainder = sorted(range(len(shares)), key=lambda i: shares[i][0] * n - counts[i], reverse=True)
    for i in by_remainder[:n - sum(counts)]:
        counts[i] += 1
    values = [value for (_, value), count in zip(shares, counts, strict=True) for _ in range(count)]
    rng.shuffle(values)
    return values


# --------------------------------------------------------------------------------------------
# requests and conversations


class Request:
    """One client request; its fields after ``slot`` are the engine's bookkeeping."""

    __slots__ = ("arrive", "attempt", "body", "cell", "conv", "done_at", "first_at", "headers",
                 "output", "priority", "prompt", "proxy", "queued_at", "sent", "slot", "tried")

    def __init__(self, arrive: float, conv: Conversation, prompt: int, output: int, priority: int,
                 body: bytes) -> None:
        self.arrive = arrive
        self.conv = conv
        self.prompt = prompt      # prompt tokens (the conversation so far plus the new message)
        self.output = output      # output tokens
        self.priority = priority  # higher is served first in a worker's queue
        self.body = body
        self.headers = conv.headers
        self.slot = -1
        self.proxy = 0
        self.cell = -1            # the open load-board cell of the current attempt (-1: none)
        self.attempt = 0          # bumped when an attempt ends early, so its events are ignored
        self.tried: list[int] = []
        self.first_at = 0.0
        self.done_at = 0.0
        self.queued_at = -1.0     # when it entered a worker's queue (-1: not queued)
        self.sent = arrive        # when the current attempt was sent


class Conversation:
    """A chat whose body only grows: ``parts`` are its JSON up to the last message, unclosed."""

    __slots__ = ("headers", "id", "parts", "sys", "sys_tokens", "tokens", "turn", "turns")

    def __init__(self, cid: int, key: str, sys: int, sys_message: bytes, sys_tokens: int, turns: int) -> None:
        self.id = cid
        self.headers = [(SESSION_HEADER, key.encode())]
        self.sys = sys                # shared system prompt number (-1: none)
        self.sys_tokens = sys_tokens
        self.tokens = sys_tokens      # tokens of the conversation so far
        self.turns = turns            # turns it will have (generated traffic)
        self.turn = 0
        # Kept in parts and joined once per request: the body is then copied once, not twice.
        self.parts = [_OPEN, sys_message, b","] if sys_message else [_OPEN]

    def next_turn(self, user_tokens: int, output_tokens: int) -> tuple[int, bytes]:
        """(prompt tokens, body) of the next turn; its question and answer join the history."""
        self.turn += 1
        parts = self.parts
        parts.append(_message(b"user", b"c%du%d " % (self.id, self.turn), user_tokens))
        parts.append(b'],"max_tokens":%d}' % output_tokens)
        body = b"".join(parts)
        parts[-1] = b","
        parts.append(_message(b"assistant", b"c%da%d " % (self.id, self.turn), output_tokens))
        parts.append(b",")
        prompt = self.tokens + user_tokens
        self.tokens = prompt + output_tokens
        return prompt, body


def system_message(text: str) -> bytes:
    """The encoded system message that starts a conversation (b"" without one)."""
    return msgspec.json.encode({"role": "system", "content": text}) if text else b""


def _message(role: bytes, tag: bytes, tokens: int) -> bytes:
    """A message of ``tokens`` tokens' worth of text that starts with its unique ``tag``.

    The rest is a slice of one fixed text: a prefix stays unique to its conversation from the
    first tag on, and no text is generated per request. Letters, digits and spaces only, so
    nothing needs escaping in JSON.
    """
    chars = tokens * CHARS_PER_TOKEN
    if chars > len(_TEXT):
        return b'{"role":"%s","content":"%s"}' % (role, filler(tag.decode(), tokens).encode())
    return b'{"role":"%s","content":"%s%s"}' % (role, tag[:chars], _TEXT[:max(0, chars - len(tag))])


_TEXT = b" ".join(b"w%x" % (i * 2654435761 % 4096) for i in range(60_000))[:256 * 1024]


def filler(tag: str, tokens: int) -> str:
    """``tokens`` tokens' worth of text unique to ``tag`` (C-speed string repetition)."""
    unit = tag + " "
    chars = tokens * CHARS_PER_TOKEN
    return (unit * (chars // len(unit) + 1))[:chars]


# --------------------------------------------------------------------------------------------
# generated traffic


class Generated:
    """Poisson or burst arrivals; conversations with shared system prompts and several turns."""

    def __init__(self, rng: random.Random, requests: int, rate: float, burst: tuple[int, float] | None,
                 prompt: Dist, output: Dist, turns: Dist, think: float, system_prompts: int,
                 system_tokens: int, priorities: list[tuple[float, int]]) -> None:
        self.rng = rng
        self.requests, self.rate, self.burst = requests, rate, burst
        self.prompt, self.output, self.turns = prompt, output, turns
        self.think = think
        self.system = [system_message(filler(f"system prompt {s}", system_tokens))
                       for s in range(system_prompts)]
        self.system_tokens = system_tokens
        self.priorities = [value for _, value in priorities]
        self.priority_weights = [share for share, _ in priorities]
        self.ready: list[tuple[float, int, Conversation]] = []  # (ready at, id, conversation)
        self.started = 0

    def arrival_times(self) -> Iterator[float]:
        rng, t = self.rng, 0.0
        if self.burst is None:
            for _ in range(self.requests):
                t += rng.expovariate(self.rate)
                yield t
            return
        size, every = self.burst
        for i in range(self.requests):
            yield (i // size) * every

    def make(self, now: float) -> Request:
        rng, ready = self.rng, self.ready
        if ready and ready[0][0] <= now:
            conv = heapq.heappop(ready)[2]
        else:
            sys = int(rng.random() * len(self.system)) if self.system else -1
            conv = Conversation(self.started, f"conv-{self.started}", sys,
                                self.system[sys] if sys >= 0 else b"", self.system_tokens if sys >= 0 else 0,
                                self.turns.sample(rng))
            self.started += 1
        prompt, body = conv.next_turn(self.prompt.sample(rng), out := self.output.sample(rng))
        priority = self.priorities[0] if len(self.priorities) == 1 else \
            rng.choices(self.priorities, self.priority_weights)[0]
        return Request(now, conv, prompt, out, priority, body)

    def finished(self, req: Request, now: float) -> None:
        """An answer ended (or failed): the conversation may ask again after some thought."""
        conv = req.conv
        if conv.turn < conv.turns:
            delay = self.rng.expovariate(1.0 / self.think) if self.think > 0 else 0.0
            heapq.heappush(self.ready, (now + delay, conv.id, conv))

    def mean_prompt_tokens(self) -> float:
        """Expected prompt of a turn: system prompt + half the conversation's turns so far."""
        earlier = (self.turns.mean() - 1) / 2  # mean turns before a random turn
        return (self.system_tokens if self.system else 0) + self.prompt.mean() * (1 + earlier) \
            + self.output.mean() * earlier


# --------------------------------------------------------------------------------------------
# trace traffic


class TraceLine(msgspec.Struct, forbid_unknown_fields=False):
    """One line of a trace file (JSON lines); ``t`` is seconds since the start."""

    t: float
    prompt_tokens: int
    output_tokens: int
    priority: int = 0
    session: str | None = None  # turns of one conversation share it; also the x-session-id
    prefix: str | None = None   # name of a shared system prompt ...
    prefix_tokens: int = 0      # ... and its length in tokens


def read_trace(path: str | Path) -> list[TraceLine]:
    decoder = msgspec.json.Decoder(TraceLine)
    lines = []
    for n, raw in enumerate(Path(path).read_bytes().splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = decoder.decode(raw)
        except msgspec.DecodeError as exc:
            raise SpecError(f"{path}:{n}: {exc}") from None
        if line.prompt_tokens < 1 or line.output_tokens < 1 or line.t < 0:
            raise SpecError(f"{path}:{n}: t must be >= 0 and token counts >= 1")
        lines.append(line)
    if not lines:
        raise SpecError(f"{path}: no requests")
    lines.sort(key=lambda line: line.t)  # stable: turns of a session keep their file order
    return lines


def write_trace(path: str | Path, lines: list[dict[str, Any]]) -> None:
    Path(path).write_text("".join(json.dumps(line) + "\n" for line in lines))


class Traced:
    """Requests as a trace file lists them; ``requests`` may cut it short."""

    def __init__(self, lines: list[TraceLine], requests: int | None) -> None:
        self.lines = lines[:requests] if requests else lines
        self.requests = len(self.lines)
        self.convs: dict[str, Conversation] = {}
        self.prefixes: dict[str, int] = {}
        self.next = 0
        self.started = 0

    def arrival_times(self) -> Iterator[float]:
        return (line.t for line in self.lines)

    def make(self, now: float) -> Request:
        line = self.lines[self.next]
        self.next += 1
        conv = self.convs.get(line.session) if line.session is not None else None
        if conv is None:
            sys = self.prefixes.setdefault(line.prefix, len(self.prefixes)) if line.prefix else -1
            sys_tokens = line.prefix_tokens if line.prefix else 0
            key = line.session if line.session is not None else f"trace-{self.started}"
            message = system_message(filler(f"prefix {line.prefix}", sys_tokens)) if sys_tokens else b""
            conv = Conversation(self.started, key, sys, message, sys_tokens, 1 << 30)
            self.started += 1
            if line.session is not None:
                self.convs[line.session] = conv
        # The file gives the whole prompt; the new message is what the history does not cover.
        prompt, body = conv.next_turn(max(1, line.prompt_tokens - conv.tokens), line.output_tokens)
        return Request(now, conv, prompt, line.output_tokens, line.priority, body)

    def finished(self, req: Request, now: float) -> None:
        return None

    def mean_prompt_tokens(self) -> float:
        return sum(line.prompt_tokens for line in self.lines) / len(self.lines)


Workload = Generated | Traced
