"""One worker's passive-health state, as the fleet keeps it.

Role: the record :mod:`coordinator.health.passive` keeps per worker (counters as last sampled, the
sliding window, ejections, half-open progress), held by
:class:`coordinator.fleet.membership.WorkerState`. It lives in the fleet layer so that the fleet
never imports the health rules that fill it in.

Invariant: only :mod:`coordinator.health.passive` and :mod:`coordinator.health.housekeeping` write it.
"""

from __future__ import annotations

from collections import deque


class PassiveState:
    """One worker's counters as last sampled, its window and its ejection history."""

    __slots__ = (
        "answers",
        "calm_since",
        "completed_at",
        "done",
        "ejections",
        "err",
        "half_open",
        "half_open_ok",
        "next_probe",
        "probe_failed",
        "probing",
        "progress_at",
        "refused",
        "run",
        "samples",
        "ttfb_marks",
        "unreachable",
        "until",
    )

    def __init__(self, done: int, err: int, now: float) -> None:
        self.done, self.err = done, err
        self.samples: deque[tuple[float, int, int]] = deque([(now, done, err)])
        self.run = 0
        self.ejections = 0
        self.until = 0.0
        self.half_open = False
        self.half_open_ok = 0
        self.calm_since = now
        self.progress_at = now  # last sample where an attempt completed or nothing was in flight
        self.completed_at = 0.0  # last sample where the worker answered an attempt
        self.answers = 0  # the worker's answered attempts, as last sampled
        self.refused = 0  # the worker's failed connections, as last sampled
        self.unreachable = False  # connections to it failed in the last sample
        self.probing = False
        self.next_probe = 0.0  # while ejected: when the next active probe is due
        self.probe_failed = False  # an active probe saw the fault during this ejection
        # Per proxy: the worker's answers when its TTFB history began (None: begin at the next
        # sample); coordinator.health.outliers judges only answers after these.
        self.ttfb_marks: list[int] | None = None

    def probe_due(self, now: float) -> bool:
        """An ejected worker's next active probe is due (at the ejection's end, or earlier)."""
        return not self.probing and (now >= self.until or now >= self.next_probe)
