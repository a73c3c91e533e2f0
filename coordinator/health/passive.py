"""Passive health: eject workers that fail real traffic, readmit them through half-open probing.

Role: every ``passive_interval`` the coordinator reads the proxies' per-worker counters on the
load board (attempts ``W_REQUESTS``, failed attempts ``W_ERRORS``: connect errors, resets,
timeouts; in-flight ``W_IN_FLIGHT``; consecutive failures ``W_FAILS_IN_ROW``), summed over every
proxy, and applies these rules (each may be turned off with 0):

- **consecutive failures**: ``passive_consecutive_failures`` failed attempts in a row. The board's
  per-proxy runs are summed; a sample in which some attempt succeeded resets the coordinator's
  own run (the board's runs are exact per proxy, the sum is what all proxies saw since their last
  success on that worker).
- **failure rate**: failed / completed attempts over a *real* sliding window of
  ``passive_window`` seconds (a deque of timestamped samples, appended only when counters move,
  so the window start is exact to one sample), judged once ``passive_min_requests`` attempts
  completed in it.

Ejection lasts ``ejection_time`` x the worker's ejection count, capped by ``max_ejection_time``
(Envoy's rule); the count drops by one per ``ejection_time`` without an ejection. When it ends,
the worker is **half-open**: one active check (its health target) decides; a failure re-ejects it
for longer, a pass lets traffic back (with slow start when configured), and the first failed
attempt before ``HALF_OPEN_SUCCESSES`` successes re-ejects it at once (circuit-breaker rule).

A third rule catches a worker that accepts requests and never answers (its /health may still
pass), from live traffic: **stalled**: ``STALL_MIN_IN_FLIGHT`` or more attempts in flight, none
answered (``W_ANSWERS``: a response head or first message) for ``stall_timeout``, while another
worker of one of its models answered after it went silent (so a fleet that is merely slow, or
idle, is never judged). Abandoned attempts end without an answer: never progress.

A fourth rule catches a worker that answers, but far slower than its peers: **slow**, its time to
first byte against the median of its models' other workers (:mod:`coordinator.health.outliers`).

While ejected, the worker is also probed every ``ejected_probe_interval``. Once a probe has
*failed* (the check sees the fault: the worker is down), or when the ejection came with refused
connections (a fault the probe would see), the first probe that passes readmits it
(half-open) at once: a worker back from a restart gets traffic within one probe interval, not
after the ejection time. A worker whose probes pass all along (the check cannot see what fails
real traffic: a stall, 5xx with a healthy /health) waits out its ejection.

Invariants:
- Panic guard: a model never has more than ``max_ejection_percent`` of its workers ejected (at
  least one may be ejected once it has two or more), and ejection never takes a model's last
  routable worker: routing over a failing worker beats routing over none. Refusals are notices.
- An ejection is a publish: ``Worker.healthy`` is False and ``Worker.ejected`` True in the next
  snapshot, which the proxies take within one sweep (the loop publishes within a tick, 0.2 s).
- Reading the board is a few strided slices per proxy (C speed), so sampling 10,000 workers
  every 0.5 s stays in the low milliseconds; nothing is read when no rule is on and nothing is
  ejected.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

from coordinator.fleet.membership import Fleet, WorkerState
from coordinator.fleet.passive_state import PassiveState
from coordinator.health.outliers import read_ttfb, slow_outliers
from shm.loadboard import (
    W_ANSWERS,
    W_CONNECT_ERRORS,
    W_ERRORS,
    W_FAILS_IN_ROW,
    W_IN_FLIGHT,
    W_REQUESTS,
    WORKER_FIELDS,
    LoadBoard,
)
from shm.settings import Settings

HALF_OPEN_SUCCESSES = 3  # sglang-router's circuit breaker closes after 3 successes too
STALL_MIN_IN_FLIGHT = 3  # a worker busy with one or two long generations is not a stall
log = logging.getLogger("shardgate.coordinator")


def allowed_ejections(total: int, percent: int) -> int:
    """How many of a model's ``total`` workers may be ejected at once."""
    if percent <= 0 or total <= 1:
        return 0
    return max(1, total * percent // 100)


class PassiveHealth:
    def __init__(self, board: LoadBoard, proxies: int) -> None:
        self.board = board
        self.proxies = proxies
        self.notices: list[str] = []
        self._last: tuple[list[int], ...] | None = None

    def read(self, slots: int) -> tuple[list[int], ...]:
        """(attempts, failed, in flight, failures in a row, answered, connect errors) per slot,
        summed over proxies."""
        ints, board = self.board.ints, self.board
        columns = []
        for field in (W_REQUESTS, W_ERRORS, W_IN_FLIGHT, W_FAILS_IN_ROW, W_ANSWERS, W_CONNECT_ERRORS):
            rows = []
            for p in range(self.proxies):
                start = board.cell_word(p, 0, field)
                rows.append(ints[start:start + slots * WORKER_FIELDS:WORKER_FIELDS].tolist())
            columns.append(rows[0] if len(rows) == 1 else [sum(c) for c in zip(*rows, strict=True)])
        return tuple(columns)

    def sample(self, fleet: Fleet, settings: Settings, now: float) -> tuple[bool, list[WorkerState]]:
        """Apply the rules once; (anything changed, ejected workers due a half-open probe)."""
        rules = (settings.passive_consecutive_failures > 0 or settings.passive_failure_rate > 0
                 or settings.slow_outlier_factor > 0)
        states = list(fleet.states.values())
        if not states or (not rules and not any(s.ejected for s in states)):
            return False, []
        slots = max(s.slot for s in states) + 1
        requests, errors, in_flight, in_row, answers, refused = self.read(slots)
        changed = False
        due: list[WorkerState] = []
        candidates: list[tuple[WorkerState, str]] = []
        counters = (requests, errors, in_flight, answers)
        if counters == self._last and all(isinstance(s.passive, PassiveState) for s in states):
            # Nothing moved on the board (an idle router, or one whose requests all hang): only
            # ejections can fall due, and stalls. The list compare and max() run in C, which keeps
            # an idle coordinator's CPU near zero at any size.
            due = [s for s in states if s.ejected and s.passive is not None and s.passive.probe_due(now)]
            if max(in_flight, default=0) < STALL_MIN_IN_FLIGHT:
                return False, due
            stalls = self._stalls(states, in_flight, settings, now)
            self.notices = []
            return (self._eject(fleet, stalls, settings, now) if stalls else False), due
        self._last = counters
        for st in states:
            slot = st.slot
            done, err = requests[slot] - in_flight[slot], errors[slot]
            ps = st.passive
            if not isinstance(ps, PassiveState):
                st.passive = ps = PassiveState(done, err, now)
                ps.answers, ps.refused = answers[slot], refused[slot]
                if ps.answers:
                    ps.completed_at = now  # it has answered, up to now
                continue
            d_done, d_err = done - ps.done, err - ps.err
            if d_done < 0 or d_err < 0 or done < err:
                # A reused slot's cells were reset by the proxies (or a proxy restarted and
                # zeroed its gauges): start this worker's books again, keeping its ejection history.
                ps.done, ps.err, ps.run = done, err, 0
                ps.samples.clear()
                ps.samples.append((now, done, err))
                continue
            ps.done, ps.err = done, err
            # Failed connections are a fault the active probe sees too: after such an ejection,
            # the first passing probe readmits the worker (it is back), without a failed one first.
            ps.refused, ps.unreachable = refused[slot], refused[slot] > ps.refused
            if answers[slot] != ps.answers:  # the worker answered something since the last sample
                ps.answers = answers[slot]
                ps.progress_at = ps.completed_at = now
            elif in_flight[slot] == 0:
                ps.progress_at = now
            if st.ejected:
                if ps.probe_due(now):
                    due.append(st)
                continue
            if d_done or d_err:
                ps.samples.append((now, done, err))
            window_start = now - settings.passive_window
            while len(ps.samples) > 1 and ps.samples[1][0] <= window_start:
                ps.samples.popleft()
            successes = d_done - d_err
            ps.run = 0 if successes > 0 else ps.run + d_err
            if ps.ejections and not ps.half_open and now - ps.calm_since >= settings.ejection_time:
                ps.ejections -= 1
                ps.calm_since = now
            if ps.half_open:
                if d_err > 0:
                    candidates.append((st, "failed again while half-open"))
                    continue
                ps.half_open_ok += max(successes, 0)
                if ps.half_open_ok >= HALF_OPEN_SUCCESSES:
                    ps.half_open, ps.calm_since = False, now
            if d_err <= 0 or not st.healthy or st.draining or not st.discovered:
                continue
            why = self._verdict(ps, settings, in_row[slot], done, err)
            if why:
                candidates.append((st, why))
        candidates += self._stalls(states, in_flight, settings, now)
        if settings.slow_outlier_factor > 0:
            candidates += slow_outliers(states, *read_ttfb(self.board, self.proxies, slots), settings)
        self.notices = []
        if candidates:
            changed = self._eject(fleet, candidates, settings, now)
        return changed, due

    @staticmethod
    def _stalls(states: list[WorkerState], in_flight: list[int], settings: Settings,
                now: float) -> list[tuple[WorkerState, str]]:
        """Workers holding requests without completing any while their peers complete theirs."""
        answered: dict[str, float] = {}  # model -> when one of its workers last answered
        for st in states:
            if isinstance(st.passive, PassiveState):
                for model in st.models:
                    answered[model] = max(answered.get(model, 0.0), st.passive.completed_at)
        found = []
        for st in states:
            ps = st.passive
            if not isinstance(ps, PassiveState) or st.ejected or not st.healthy or st.draining:
                continue
            held = in_flight[st.slot]
            silent = now - ps.progress_at
            peers_answered = any(answered.get(m, 0.0) >= ps.progress_at for m in st.models)
            if held >= STALL_MIN_IN_FLIGHT and silent > settings.stall_timeout and peers_answered:
                found.append((st, f"stalled: {held} requests in flight, none answered for {silent:.0f}s "
                                  "while other workers of its model answered theirs"))
        return found

    def _verdict(self, ps: PassiveState, settings: Settings, board_run: int, done: int, err: int) -> str:
        threshold = settings.passive_consecutive_failures
        run = max(ps.run, board_run)
        if threshold and run >= threshold:
            return f"{run} failed attempts in a row"
        if settings.passive_failure_rate > 0:
            _, base_done, base_err = ps.samples[0]
            attempts, failed = done - base_done, err - base_err
            judged = attempts >= settings.passive_min_requests
            if judged and failed >= settings.passive_failure_rate * attempts:
                return (f"{failed} of {attempts} attempts failed in the last "
                        f"{settings.passive_window:g}s")
        return ""

    def _eject(self, fleet: Fleet, candidates: Iterable[tuple[WorkerState, str]], settings: Settings,
               now: float) -> bool:
        total: dict[str, int] = {}
        ejected: dict[str, int] = {}
        routable: dict[str, int] = {}
        for st in fleet.states.values():
            for m in st.models:
                total[m] = total.get(m, 0) + 1
                ejected[m] = ejected.get(m, 0) + st.ejected
                routable[m] = routable.get(m, 0) + st.routable()
        changed = False
        for st, why in candidates:
            blocked = [m for m in st.models
                       if ejected[m] + 1 > allowed_ejections(total[m], settings.max_ejection_percent)
                       or routable[m] <= 1]
            if blocked:
                self.notices.append(
                    f"passive health: {st.spec.url} fails ({why}) but stays in: ejecting it would leave "
                    f"model {blocked[0]} with too few workers (max_ejection_percent "
                    f"{settings.max_ejection_percent})")
                continue
            for m in st.models:
                ejected[m] += 1
                routable[m] -= 1
            self.eject(st, why, settings, now)
            changed = True
        return changed

    def eject(self, st: WorkerState, why: str, settings: Settings, now: float) -> None:
        ps = st.passive
        assert isinstance(ps, PassiveState)
        ps.ejections += 1
        seconds = min(settings.ejection_time * ps.ejections, settings.max_ejection_time)
        ps.until, ps.half_open, ps.run = now + seconds, False, 0
        ps.next_probe, ps.probe_failed = now + settings.ejected_probe_interval, ps.unreachable
        st.ejected = True
        st.eject_reason = f"ejected for {seconds:g}s (ejection {ps.ejections}): {why}"
        log.warning("worker %s %s", st.spec.url, st.eject_reason)

    def probed(self, st: WorkerState, problem: str, settings: Settings, now: float) -> bool:
        """Result of a half-open probe; True when it changed what is published."""
        ps = st.passive
        if not isinstance(ps, PassiveState) or not st.ejected:
            return False
        ps.probing = False
        early = now < ps.until  # a probe during the ejection, not the one that ends it
        if early and (problem or not ps.probe_failed):
            # Still ejected: the fault is seen (a later pass readmits at once), or it is invisible
            # to the check (the ejection is waited out).
            ps.probe_failed = ps.probe_failed or bool(problem)
            ps.next_probe = now + settings.ejected_probe_interval
            return False
        if problem:
            self.eject(st, f"half-open probe failed: {problem}", settings, now)
            return True
        st.ejected, st.eject_reason = False, ""
        ps.half_open, ps.half_open_ok, ps.run = True, 0, 0
        ps.ttfb_marks = None  # judged again on answers after its return only
        ps.samples.clear()
        ps.samples.append((now, ps.done, ps.err))
        st.ramp_armed = True
        log.info("worker %s readmitted (half-open: the next failure ejects it again)", st.spec.url)
        return True
