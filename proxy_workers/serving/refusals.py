"""Requests refused before any worker: counted by reason, logged without flooding.

Role: :func:`note_refusal` is called once for every request the client protocol answers with an
error of its own before routing it to a worker (bad HTTP, a limit, a bad path or body, an
unknown model, admission control...). It moves the process's load-board counters (the total,
``P_REJECTED``, through :meth:`ProxyProcess.count_rejected`, and the reason's word) and logs.

Invariants:
- Reasons are a bounded set (``shm.loadboard.REFUSAL_REASONS``): an error names its reason
  (``RouterError.reason``, else its ``code``); one outside the set counts in the total only
  (shown as "other"), so no client input can create a label.
- Logging is rate-limited per reason: the first refusal of a reason in a LOG_INTERVAL window is
  logged, with how many were not; a flood of bad requests writes one line per reason per
  interval. A line carries the reason, status, request id and peer address: never the body, a
  header value, the target or a key (any of them may hold a secret or a prompt).
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from shm.loadboard import P_REFUSED, REFUSAL_INDEX

if TYPE_CHECKING:
    from proxy_workers.contract import ClientRequest, Refusal
    from proxy_workers.serving.state import ProxyProcess

log = logging.getLogger("shardgate.refused")
LOG_INTERVAL = 10.0  # seconds between two lines of one reason

# reason -> (monotonic time of its last line, refusals not logged since)
_logged: dict[str, tuple[float, int]] = {}


def reason_of(err: Refusal) -> str:
    """The name a refusal is counted and logged under."""
    return getattr(err, "reason", None) or err.code or "other"


def note_refusal(proc: ProxyProcess, err: Refusal, request: ClientRequest) -> None:
    """Count one refused request (total and reason) and log it, rate-limited."""
    proc.count_rejected()
    why = reason_of(err)
    index = REFUSAL_INDEX.get(why)
    if index is not None:
        proc.ints[proc.row + P_REFUSED + index] += 1
    now = time.monotonic()
    last, quiet = _logged.get(why, (-LOG_INTERVAL, 0))
    if now - last < LOG_INTERVAL:
        _logged[why] = (last, quiet + 1)
        return
    _logged[why] = (now, 0)
    if log.isEnabledFor(logging.INFO):
        more = f" ({quiet} more of this reason not logged)" if quiet else ""
        log.info("refused: reason=%s status=%d request_id=%s peer=%s%s", why, err.status,
                 request.request_id.decode("ascii", "replace"), request.peer.decode("ascii", "replace"),
                 more)
