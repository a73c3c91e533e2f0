"""The per-minute quota window of ``quota_aware``: one sliding estimate, for admission and for
``Retry-After`` alike.

Role: a worker's usage (requests or tokens) is counted per calendar minute in every proxy's cell
of the load board; the estimate of the last 60 s is the current minute's count plus the previous
minute's count times the share of that minute still inside the window (the sliding-window
counter of nginx and Cloudflare). :func:`used` is that estimate; :func:`seconds_until_within`
inverts it, so the ``Retry-After`` of a refusal is the time at which admission, evaluating the
same estimate, would next let the request in.

Invariants:
- Without new usage the estimate only falls, and continuously: inside a minute the previous
  count's weight falls linearly to 0; at the boundary the current count becomes the previous one
  with weight 1, so nothing jumps.
- ``seconds_until_within`` is exact for the estimate: ``used`` at now + the returned time equals
  the limit (or is below it when the answer is 0); ``None`` means the limit is below zero, so no
  amount of waiting admits the request.
"""

from __future__ import annotations

import math

WINDOW_SECONDS = 60.0


def window_at(now: float) -> tuple[int, float, float]:
    """(minute number, seconds into it, weight of the previous minute's count) at ``now``."""
    minute, into = divmod(now, WINDOW_SECONDS)
    return int(minute), into, 1.0 - into / WINDOW_SECONDS


def used(current: float, previous: float, weight_prev: float) -> float:
    """The sliding estimate of the last 60 s's usage (``weight_prev`` from :func:`window_at`)."""
    return current + previous * weight_prev


def seconds_until_within(current: float, previous: float, into: float, limit: float) -> float | None:
    """Seconds from now until ``used`` falls to ``limit`` or below, with no new usage.

    ``current``/``previous`` are the counts of this minute and the one before, ``into`` the
    seconds into this minute. Inside this minute only the previous count decays; once it is gone,
    the current count decays through the next minute.
    """
    if limit < 0:
        return None
    if used(current, previous, 1.0 - into / WINDOW_SECONDS) <= limit:
        return 0.0
    if current <= limit:  # previous * (1 - t / 60) <= limit - current, for t in this minute
        return WINDOW_SECONDS * (1.0 - (limit - current) / previous) - into
    # Next minute: current * (1 - t / 60) <= limit.
    return WINDOW_SECONDS - into + WINDOW_SECONDS * (1.0 - limit / current)


def retry_after(seconds: float | None) -> int:
    """Whole seconds for a ``Retry-After`` header: strictly after the wait (never 0), and a full
    window when waiting cannot help."""
    if seconds is None:
        return int(WINDOW_SECONDS)
    return max(1, math.floor(seconds) + 1)
