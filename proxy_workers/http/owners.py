"""Who owns what on the HTTP paths: a decode leg's PD request, and the owner of a worker
connection whose answer is being dropped for a retry.

Role: small interfaces and one small owner class, kept apart from the exchange state machine
(:mod:`proxy_workers.http.exchange`) so that it stays readable and the PD exchange can name them
without importing the exchange's internals.

Invariants: :class:`DroppedAnswer` never writes to the client; it reports exactly once, when the
dropped answer ended (the connection is then reusable) or when its connection failed.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Protocol

from proxy_workers.http.upstream import UpstreamOwner

if TYPE_CHECKING:
    from proxy_workers.contract import UpstreamConnectionView


class PairOwner(Protocol):
    """The PD request a decode leg belongs to (:class:`proxy_workers.http.pd.PDExchange`)."""

    pairs: int  # prefill/decode pairs tried so far (the retry rule's attempts for a decode leg)

    def decode_failed(self, exchange: Any, why: str) -> None:
        """The decode leg failed before its first byte: the pair is replaced, not the decode alone."""
        ...

    def exchange_done(self, exchange: Any, error: bool) -> None: ...


class AnswerRetrier(Protocol):
    """An exchange waiting for a retried answer to be read to its end."""

    def answer_dropped(self, why: str, delay: float, reusable: bool) -> None: ...


class DroppedAnswer(UpstreamOwner):
    """Owns a worker connection while a retried answer's body is read and dropped (the
    :class:`proxy_workers.http.upstream.UpstreamOwner` of that connection, in the exchange's place):
    nothing of it reaches the client, and a complete answer leaves the connection reusable."""

    __slots__ = ("delay", "exchange", "why")

    def __init__(self, exchange: AnswerRetrier, why: str, delay: float) -> None:
        self.exchange, self.why, self.delay = exchange, why, delay

    def on_response_head(self, conn: UpstreamConnectionView, status: int) -> None:
        pass  # (a second response on the connection: it is dropped with the first)

    def on_response_body(self, body: bytes) -> None:
        pass

    def on_response_complete(self, conn: UpstreamConnectionView) -> None:
        self.exchange.answer_dropped(self.why, self.delay, reusable=True)

    def after_upstream_data(self) -> None:
        pass

    def upstream_failed(self, conn: UpstreamConnectionView, why: str) -> None:
        self.exchange.answer_dropped(self.why, self.delay, reusable=False)
