"""How a gRPC exchange retries, or gives up, and the deadlines it keeps.

Role: the :class:`GrpcRecovery` mixin of :class:`proxy_workers.grpc.exchange.GrpcExchange` (its
only subclass): whether a failed leg is replaced (``_retry``, for the router loops of the
exchange) and the timeouts the periodic sweep enforces (``check_deadline``). Its slots are the
part of the exchange's state it changes (set by ``GrpcExchange.__init__``); it also defines the
exchange's phases.

Invariants:
- Retry only while nothing reached the client: a failed worker (what counts as one:
  :mod:`proxy_workers.grpc.failures`) is replaced by another, never one already tried, up to
  ``max_tries``; its answer about the request itself (INVALID_ARGUMENT...) is relayed. A worker's
  answer in ``retry_statuses`` is retried by
  :func:`proxy_workers.forwarding.retry.answer_retry_delay`'s rule, after its backoff, and holds
  a place in the retry budget until the exchange ends.
- Timeouts as the HTTP path: ``connect_timeout`` (channel not connected), ``first_byte_timeout``
  (to the first message), ``idle_timeout`` (between messages), ``total_timeout`` (also the
  call's gRPC deadline). Only a connect timeout is retried. A timeout while the client holds the
  stream back (its socket full) is the client's: the worker is not blamed.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from proxy_workers.errors import UpstreamTimeout
from proxy_workers.forwarding.retry import answer_retry_delay, retry_or_give_up
from proxy_workers.grpc.failures import Failed

if TYPE_CHECKING:
    from proxy_workers.grpc.legs import Leg
    from proxy_workers.process_view import ProcessView
    from proxy_workers.routing.table import ModelRoute

WAIT_FIRST, STREAMING, DONE = 1, 2, 3


class GrpcRecovery:
    """Retries and deadlines of a :class:`proxy_workers.grpc.exchange.GrpcExchange` (module docstring)."""

    # The state this class changes; GrpcExchange.__init__ sets it, GrpcExchange's slots hold the rest.
    __slots__ = ("answer_retries", "expired", "last_why")

    answer_retries: int
    expired: BaseException | None
    last_why: str

    # Provided by the exchange (GrpcExchange), read here.
    proc: ProcessView
    current: Leg | None
    paused: asyncio.Future[None] | None
    phase: int
    started: float
    phase_started: float
    last_io: float

    def _wake(self) -> None:
        raise NotImplementedError

    # -- retries -----------------------------------------------------------------------------

    async def _retry(self, failed: Failed, tried: list[int], route: ModelRoute) -> None:
        """Count a retry (after its backoff, for a worker's answer), or raise what ends the request:
        the 502 when the retry rule allows no more, or the worker's own answer."""
        self.last_why = failed.why
        proc = self.proc
        answer = failed.answer
        if answer is None:
            give_up = retry_or_give_up(proc, len(tried), failed.why)
            if give_up is not None:
                raise give_up
            return
        delay = answer_retry_delay(proc, len(tried), self.answer_retries, self.answer_retries > 0,
                                   proc.loop.time() - self.started, None)
        if delay is None or all(w.slot in tried for w in route.candidates):
            raise answer
        if not self.answer_retries:
            proc.retrying += 1
        self.answer_retries += 1
        proc.count_retry(answer=True)
        await asyncio.sleep(delay)

    def _release_budget(self) -> None:
        if self.answer_retries:
            self.proc.retrying -= 1
            self.answer_retries = 0

    # -- deadlines (the periodic sweep) -----------------------------------------------------

    def check_deadline(self, now: float) -> None:
        """Called by the periodic sweep: connect, first-message, idle and total timeouts."""
        leg = self.current
        if self.phase == DONE or self.expired is not None or leg is None or leg.call is None:
            return
        settings = self.proc.settings
        waited = now - self.phase_started
        if now - self.started > settings.total_timeout:
            self._expire(leg, UpstreamTimeout(f"request exceeded total_timeout={settings.total_timeout}s"))
        elif self.phase == WAIT_FIRST and waited > settings.connect_timeout and not leg.connected():
            self._expire(leg, Failed(f"connect to {leg.worker.url} timed out", connect=True))
        elif self.phase == WAIT_FIRST and waited > settings.first_byte_timeout:
            self._expire(leg, UpstreamTimeout(
                f"worker sent nothing within first_byte_timeout={settings.first_byte_timeout}s"))
        elif self.phase == STREAMING and now - self.last_io > settings.idle_timeout:
            who = "client read nothing" if self.paused is not None else "worker was silent"
            self._expire(leg, UpstreamTimeout(f"{who} for idle_timeout={settings.idle_timeout}s"))

    def _expire(self, leg: Leg, exc: BaseException) -> None:
        if self.paused is not None:
            # No read is pending: the wait for the client ends, and _read raises exc without
            # blaming the worker (the client held it up).
            self.expired = exc
            self._wake()
        elif not leg.call.done():
            self.expired = exc
            leg.call.cancel()  # the pending read raises CancelledError; _read turns it into exc
