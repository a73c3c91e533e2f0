"""The discrete-event loop: requests arrive, the production policy picks, simulated workers serve.

Role: run one policy over one workload and collect raw figures (:class:`Figures`). Time is
simulated; the only wall-clock figure is the time spent inside ``route.pick`` (decisions/s).

Per request: on arrival a :class:`RequestContext` is built as a proxy builds it (model, routing
fields, the chat body, the ``x-session-id`` header) and ``route.pick(ctx, tried)`` of the proxy
the request landed on chooses a worker. The attempt opens that proxy's board cell (in-flight +1)
with the production attempt functions. A dead worker fails the attempt at once (a refused
connection), a worker with a full queue refuses it (a 503): either way the request is retried on
another worker, at most ``max_tries`` workers in all, as the router does; with none left it is
rejected. Otherwise the worker starts it (a free slot) or queues it. The first token updates the
cell's TTFB EWMA; the end settles the cell (in-flight -1, latency EWMA), fills the worker's
prefix cache and starts the next queued request.

Invariants:
- Events are (time, sequence, kind, request, attempt) in one heap; the sequence makes equal
  times first-in first-out, so a run is a pure function of its inputs and seed. Arrivals come
  in time order from the workload and wait outside the heap (an arrival goes before a heap
  event of the same time). A request has one event in the heap at a time: its first token,
  then its end.
- An attempt that ended early (its worker died) bumps ``request.attempt``; its pending events
  then no longer match and are dropped when popped (no heap deletions).
- A worker's ``load`` always equals the in-flight count its cells on the board add up to.
- A request whose stream had started when its worker died is failed, not retried (nothing is
  retried after the first byte reached the client).
"""

from __future__ import annotations

import gc
import heapq
import random
import time
from collections.abc import Callable, Iterator
from itertools import count

from coordinator.health.engine_metrics import wanted
from proxy_workers.errors import RouterError
from proxy_workers.forwarding.attempts import first_byte, open_cell, settle
from proxy_workers.routing.context import RequestContext, RoutingFields, parse_hash_headers
from shardgate.simulate.config import Scenario, SimConfig
from shardgate.simulate.harness import Production
from shardgate.simulate.stats import Figures
from shardgate.simulate.workers import SimWorker
from shardgate.simulate.workload import MODEL, Request, Workload

FIRST, DONE, SAMPLE, SCRAPE, CHANGE = range(5)
CLIENT = b"10.0.0.1"
Progress = Callable[[int, int], None]


class Simulation:
    """One policy, one workload, one fleet; :meth:`run` returns the figures."""

    def __init__(self, config: SimConfig, production: Production, capacities: list[int],
                 workload: Workload, progress: Progress | None = None) -> None:
        self.config = config
        self.prod = production
        self.workload = workload
        self.progress = progress
        limits = config.queue_limits(capacities)
        self.workers = [SimWorker(i, c, q) for i, (c, q) in enumerate(zip(capacities, limits, strict=True))]
        self.costs = config.costs
        self.rng = random.Random(f"{config.seed}:engine")
        self.settings = production.settings
        self.hash_headers = parse_hash_headers(self.settings.hash_headers)
        self.events: list[tuple[float, int, int, object, int]] = []
        self.seq = count()
        self.fig = Figures(production.snapshot.model_policies[MODEL].policy or "", config.workers)
        self.down: set[int] = set()
        self.engine_stamp = 0.0  # wall time the engine rows were last written
        # The coordinator scrapes engine figures only while a policy reads them (its own rule).
        self.scraping = wanted(self.settings, production.snapshot.model_policies)

    # -- scheduling ----------------------------------------------------------------------

    def push(self, t: float, kind: int, obj: object = None, attempt: int = 0) -> None:
        heapq.heappush(self.events, (t, next(self.seq), kind, obj, attempt))

    def run(self) -> Figures:
        cfg, fig = self.config, self.fig
        window = cfg.arrival_window(self.workload)
        arrivals = self.workload.arrival_times()
        self.sample_every = max(window, 1e-9) / max(1, cfg.samples)
        self.window_end = window
        self.push(0.0, SAMPLE)
        if self.scraping:
            self.push(0.0, SCRAPE)
        for sc in cfg.scenarios():
            self._schedule(sc)
        total = self.workload.requests
        started, cpu, t = time.perf_counter(), time.process_time(), 0.0
        # The run allocates millions of short-lived objects and no reference cycles of its own;
        # the cyclic collector would otherwise scan the whole heap again and again (and land in
        # whatever is being timed, such as a pick).
        gc_was_on = gc.isenabled()
        gc.disable()
        try:
            t = self._loop(arrivals, total)
        finally:
            if gc_was_on:
                gc.enable()
        fig.sim_seconds = t
        fig.wall_seconds = time.perf_counter() - started
        fig.cpu_seconds = time.process_time() - cpu
        fig.served = [w.served for w in self.workers]
        if self.progress is not None:
            self.progress(total, total)
        return fig

    def _loop(self, arrivals: Iterator[float], total: int) -> float:
        """Handle events in time order until none is left; returns the last event's time.

        Arrivals come in time order from their iterator, so the next one waits outside the heap
        and is taken whenever it is due before the heap's first event (ties: the arrival first).
        """
        events, pop, t, arrived = self.events, heapq.heappop, 0.0, 0
        arrive, first, done = self._arrive, self._first, self._done  # bound once: the hot calls
        inf = float("inf")
        nxt = next(arrivals, inf)
        while events or nxt < inf:
            if nxt < inf and (not events or nxt <= events[0][0]):
                t = nxt
                nxt = next(arrivals, inf)
                arrive(t)
                arrived += 1
                if arrived & 511 == 0:
                    self._tick(arrived, total)
                continue
            t, _, kind, obj, attempt = pop(events)
            if kind == DONE:
                if attempt == obj.attempt:  # type: ignore[attr-defined]
                    done(obj, t)  # type: ignore[arg-type]
            elif kind == FIRST:
                if attempt == obj.attempt:  # type: ignore[attr-defined]
                    first(obj, t)  # type: ignore[arg-type]
            elif kind == SAMPLE:
                self._sample(t, arrived < total)
            elif kind == SCRAPE:
                self._scrape(t, arrived < total)
            else:
                self._change(t, obj)  # type: ignore[arg-type]
        return t

    def _tick(self, arrived: int, total: int) -> None:
        if self.progress is not None:
            self.progress(arrived, total)
        # least_loaded ignores engine rows older than a few scrape intervals of *wall* time; a
        # slow simulation must not make fresh simulated figures look stale.
        if self.scraping and time.time() - self.engine_stamp > self.settings.metrics_interval:
            self._write_engine_rows()

    # -- requests ------------------------------------------------------------------------

    def _arrive(self, t: float) -> None:
        req = self.workload.make(t)
        if self.config.proxies > 1:
            req.proxy = int(self.rng.random() * self.config.proxies)
        self._dispatch(req, t)

    def _dispatch(self, req: Request, t: float) -> None:
        """Pick and try workers until one takes the request or ``max_tries`` are used."""
        fig = self.fig
        ctx = RequestContext(MODEL, RoutingFields(model=MODEL, max_tokens=req.output), req.body, req.headers,
                             CLIENT, self.hash_headers, self.settings.hash_fallback)
        route, view = self.prod.routes[req.proxy], self.prod.proxy_views[req.proxy]
        tried, workers, max_tries = req.tried, self.workers, self.settings.max_tries
        clock = time.perf_counter_ns
        while len(tried) < max_tries:
            t0 = clock()
            try:
                worker = route.pick(ctx, tried)
            except RouterError as exc:
                fig.refusals[type(exc).__name__] = fig.refusals.get(type(exc).__name__, 0) + 1
                break
            fig.pick_ns += clock() - t0
            fig.picks += 1
            slot = worker.slot
            sw = workers[slot]
            tried.append(slot)
            cell = open_cell(view, slot)
            sw.served += 1
            if not sw.alive:  # connection refused: fails at once, retried elsewhere
                settle(view, cell, False, connect_error=True)
                fig.retries += 1
                continue
            if not sw.accepts():  # the engine's queue is full: 503, retried elsewhere
                settle(view, cell, False)
                fig.refused += 1
                continue
            req.cell, req.slot, req.sent = cell, slot, t
            sw.load += 1
            if len(sw.running) < sw.capacity:
                self._start(sw, req, t)
            else:
                req.queued_at = t
                sw.push(req, next(self.seq))
            return
        fig.rejected += 1
        self.workload.finished(req, t)

    def _start(self, sw: SimWorker, req: Request, t: float) -> None:
        fig, costs = self.fig, self.costs
        cached = sw.cached_prefix(req)
        fig.prompt_tokens += req.prompt
        fig.cached_tokens += cached
        if req.queued_at >= 0:
            fig.queued += 1
            fig.queue_wait += t - req.queued_at
            req.queued_at = -1.0
        first = t + costs.first_token(req.prompt, cached) * sw.slow
        req.first_at = first
        req.done_at = first + costs.decode(req.output) * sw.slow
        sw.running[req] = None
        # DONE is pushed when FIRST is handled: the heap holds one event per running request.
        heapq.heappush(self.events, (first, next(self.seq), FIRST, req, req.attempt))

    def _first(self, req: Request, t: float) -> None:
        heapq.heappush(self.events, (req.done_at, next(self.seq), DONE, req, req.attempt))
        self.fig.ttft(req.priority, t - req.arrive)
        first_byte(self.prod.proxy_views[req.proxy], req.cell, t - req.sent, True)

    def _done(self, req: Request, t: float) -> None:
        fig = self.fig
        fig.e2e.append(t - req.arrive)
        fig.completed += 1
        req.cell = settle(self.prod.proxy_views[req.proxy], req.cell, True, t - req.sent)
        sw = self.workers[req.slot]
        del sw.running[req]
        sw.load -= 1
        sw.remember(req, self.costs.kv_cache_tokens)
        self.workload.finished(req, t)
        if sw.queue:
            self._start(sw, sw.pop(), t)

    # -- the fleet over time -------------------------------------------------------------

    def _sample(self, t: float, more: bool) -> None:
        self.fig.sample(t, [w.load for w in self.workers if w.alive])
        if more or t + self.sample_every <= self.window_end:
            self.push(t + self.sample_every, SAMPLE)

    def _scrape(self, t: float, more: bool) -> None:
        self._write_engine_rows()
        if more or any(w.load for w in self.workers):
            self.push(t + self.settings.metrics_interval, SCRAPE)

    def _write_engine_rows(self) -> None:
        # KV usage is approximated by the share of busy slots (the model has no per-token KV).
        self.prod.engine_rows([(len(w.running), len(w.queue), len(w.running) / w.capacity)
                               for w in self.workers])
        self.engine_stamp = time.time()

    def _schedule(self, sc: Scenario) -> None:
        n = max(1, round(sc.share * len(self.workers)))
        chosen = random.Random(f"{self.config.seed}:{sc.kind}").sample(range(len(self.workers)), n)
        self.push(sc.start, CHANGE, (sc.kind, True, chosen))
        if sc.duration is not None:
            self.push(sc.start + sc.duration, CHANGE, (sc.kind, False, chosen))

    def _change(self, t: float, change: tuple[str, bool, list[int]]) -> None:
        kind, on, slots = change
        if kind == "slow":
            for s in slots:
                self.workers[s].slow = self._slow_factor() if on else 1.0
            return
        if kind == "publish":  # the router noticed: a new snapshot without (or with) them
            self.down = (self.down | set(slots)) if on else (self.down - set(slots))
            self.prod.set_down(self.down)
            return
        if on:
            self._kill(slots, t)
        else:
            for s in slots:
                self.workers[s].alive = True  # back empty: nothing cached
        self.push(t + self.config.detect, CHANGE, ("publish", on, slots))

    def _slow_factor(self) -> float:
        return next(sc.factor for sc in self.config.scenarios() if sc.kind == "slow")

    def _kill(self, slots: list[int], t: float) -> None:
        """Workers die: streams under way fail, everything else is retried elsewhere."""
        fig, orphans = self.fig, []
        for s in slots:
            sw = self.workers[s]
            sw.alive = False
            for req in [*sw.running, *(entry[2] for entry in sw.queue)]:
                req.attempt += 1
                req.cell = settle(self.prod.proxy_views[req.proxy], req.cell, False)
                if req in sw.running and t >= req.first_at:
                    fig.failed += 1
                    self.workload.finished(req, t)
                else:
                    req.queued_at = -1.0
                    orphans.append(req)
            sw.forget_all()
        for req in orphans:  # once every worker of the set is dead
            fig.retries += 1
            self._dispatch(req, t)
