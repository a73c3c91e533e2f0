"""What a simulation run is made of: the fleet, the traffic, the failure scenario, the seed.

Role: one validated description of a run (:class:`SimConfig`), built from the command line or
by tests, and the pieces derived from it that every policy of a comparison shares (the fleet's
capacities and weights, the snapshot, the arrival rate).

Invariants:
- Everything random is derived from ``seed``: the fleet's capacity order, the workload, the
  failing workers, the proxy each request lands on and every policy's own ``random.Random``.
- When no rate is given, the Poisson rate is ``load`` x the fleet's service capacity (slots /
  the expected service time of a request, cache ignored), so ``load`` 0.7 keeps the fleet ~70%
  busy whatever its size and costs.
"""

from __future__ import annotations

import math
import random
import re
from functools import reduce

import msgspec

from shardgate.simulate.workers import CostModel
from shardgate.simulate.workload import (
    Dist,
    Generated,
    SpecError,
    Traced,
    Workload,
    parse_shares,
    read_trace,
    spread,
)
from shm.settings import Settings

_SCENARIO = re.compile(r"^(?P<share>[\d.]+)%(?:x(?P<factor>[\d.]+))?@(?P<start>[\d.]+)s?"
                       r"(?:\+(?P<duration>[\d.]+)s?)?$")


class Scenario(msgspec.Struct, frozen=True, kw_only=True):
    """A share of workers failing (``fail``) or slowed by ``factor`` (``slow``) from ``start``
    for ``duration`` simulated seconds (None: to the end)."""

    kind: str
    share: float
    start: float
    duration: float | None = None
    factor: float = 1.0

    @classmethod
    def parse(cls, kind: str, spec: str) -> Scenario:
        """``10%@5`` / ``10%@5+20`` (fail), ``10%x4@5+20`` (slow: 4 times slower)."""
        m = _SCENARIO.match(spec.strip())
        if m is None or (kind == "slow") != (m["factor"] is not None):
            form = "SHARE%xFACTOR@START[+DURATION]" if kind == "slow" else "SHARE%@START[+DURATION]"
            raise SpecError(f"bad --{kind} {spec!r}: use {form} (seconds)")
        share = float(m["share"]) / 100
        if not 0 < share <= 1:
            raise SpecError(f"bad --{kind} {spec!r}: the share must be in (0, 100]%")
        return cls(kind=kind, share=share, start=float(m["start"]),
                   duration=float(m["duration"]) if m["duration"] else None,
                   factor=float(m["factor"] or 1.0))


class SimConfig(msgspec.Struct, kw_only=True):
    """One run's parameters (the CLI's flags; see docs/simulator.md)."""

    workers: int = 100
    capacity: str = "8"                 # slots per worker, or shares: "90%:100,10%:50"
    queue_limit: str = "none"           # waiting requests per worker: N, Nx (x capacity), none
    weights: str = "capacity"           # worker weights: "capacity" (proportional) or "equal"
    requests: int = 10_000
    rate: float | None = None           # Poisson arrivals per second (default: from load)
    load: float = 0.7
    burst: str | None = None            # "SIZE@EVERY": SIZE requests at once every EVERY seconds
    trace: str | None = None            # JSON lines file (see workload.TraceLine)
    prompt_tokens: str = "lognormal:200:0.8"   # the new message of each turn
    output_tokens: str = "lognormal:200:0.8"
    turns: str = "1-6"
    think: float = 2.0                  # mean seconds between an answer and the next turn
    system_prompts: int = 8             # shared system prompts (0: none)
    system_tokens: int = 512
    priorities: str = "100%:0"          # "90%:0,10%:1": higher numbers are served first
    fail: str | None = None
    slow: str | None = None
    detect: float = 1.0                 # seconds until the router takes a dead worker out
    proxies: int = 1
    costs: CostModel = CostModel()
    seed: int = 1
    samples: int = 100                  # load snapshots over the arrival window
    urls: list[str] | None = None       # worker URLs (default http://sim-N:8000)
    router: dict[str, str] = {}         # router settings (shm.settings names), e.g. cache_threshold

    def validate(self) -> None:
        if self.workers < 1 or self.requests < 1 or self.proxies < 1:
            raise SpecError("--workers, --requests and --proxies must be at least 1")
        if self.urls is not None and len(self.urls) != self.workers:
            raise SpecError("give one URL per worker")
        if (self.rate is not None and self.rate <= 0) or not 0 < self.load:
            raise SpecError("--rate and --load must be positive")
        self.scenarios()
        self.settings()
        self.capacities()
        self.queue_limits([1])
        for spec in (self.prompt_tokens, self.output_tokens, self.turns):
            Dist(spec)
        parse_shares(self.priorities)

    def scenarios(self) -> list[Scenario]:
        out = []
        if self.fail:
            out.append(Scenario.parse("fail", self.fail))
        if self.slow:
            out.append(Scenario.parse("slow", self.slow))
        return out

    def capacities(self) -> list[int]:
        shares = parse_shares(self.capacity)
        if any(value < 1 for _, value in shares):
            raise SpecError(f"bad --capacity {self.capacity!r}: capacities are at least 1 slot")
        return spread(self.workers, shares, random.Random(f"{self.seed}:capacity"))

    def queue_limits(self, capacities: list[int]) -> list[int]:
        spec = self.queue_limit.strip().lower()
        try:
            if spec == "none":
                return [1 << 40] * len(capacities)
            if spec.endswith("x"):
                return [math.ceil(float(spec[:-1]) * c) for c in capacities]
            return [int(spec)] * len(capacities)
        except ValueError:
            raise SpecError(f"bad --queue-limit {self.queue_limit!r}: use N, Nx or none") from None

    def worker_weights(self, capacities: list[int]) -> list[int]:
        if self.weights == "equal":
            return [1] * len(capacities)
        if self.weights != "capacity":
            raise SpecError("--weights is 'capacity' or 'equal'")
        divisor = reduce(math.gcd, capacities)
        return [c // divisor for c in capacities]

    def worker_urls(self) -> list[str]:
        return self.urls or [f"http://sim-{i}:8000" for i in range(self.workers)]

    def settings(self) -> Settings:
        """The router's defaults and ``router`` overrides, with room for the fleet in shared memory.

        Overrides are validated by the settings' own declarations (types and bounds)."""
        base = msgspec.to_builtins(Settings())
        unknown = sorted(set(self.router) - set(base))
        if unknown:
            raise SpecError(f"unknown router setting {', '.join(unknown)} (see docs/settings.md)")
        try:
            settings = msgspec.convert({**base, **self.router}, Settings, strict=False)
        except msgspec.ValidationError as exc:
            raise SpecError(f"bad router setting: {exc}") from None
        return msgspec.structs.replace(settings, max_workers=max(1, self.workers))

    def workload(self, capacities: list[int]) -> Workload:
        """A fresh workload (each policy of a comparison gets the same one from the same seed)."""
        rng = random.Random(f"{self.seed}:workload")
        if self.trace:
            return Traced(read_trace(self.trace), self.requests)
        burst = None
        if self.burst:
            try:
                size, every = self.burst.split("@")
                burst = (int(size), float(every.rstrip("s")))
            except ValueError:
                raise SpecError(f"bad --burst {self.burst!r}: use SIZE@EVERY (seconds)") from None
        gen = Generated(rng, self.requests, 1.0, burst, Dist(self.prompt_tokens, 65_536),
                        Dist(self.output_tokens, 16_384), Dist(self.turns, 10_000), self.think,
                        self.system_prompts, self.system_tokens, parse_shares(self.priorities))
        gen.rate = self.rate or self.load * sum(capacities) / self.mean_service(gen)
        return gen

    def mean_service(self, gen: Generated) -> float:
        """Expected seconds a request holds a slot, no cache hit counted."""
        costs = self.costs
        return costs.first_token(round(gen.mean_prompt_tokens()), 0) + costs.decode(round(gen.output.mean()))

    def arrival_window(self, workload: Workload) -> float:
        """Expected seconds from the first arrival to the last (where load is sampled)."""
        if isinstance(workload, Traced):
            return workload.lines[-1].t
        if workload.burst is not None:
            size, every = workload.burst
            return (math.ceil(workload.requests / size) - 1) * every
        return workload.requests / workload.rate
