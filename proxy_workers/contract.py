"""The contract between the layers of a proxy process, as ``typing.Protocol``s.

Role: name what each side of the data path offers the other, so the three carrying paths (HTTP
regular in :mod:`proxy_workers.http.exchange`, HTTP prefill/decode in :mod:`proxy_workers.http.pd`,
gRPC in :mod:`proxy_workers.grpc.exchange`) and the serving layer (:mod:`proxy_workers.serving`)
depend on interfaces instead of on each other's classes:

- :class:`ClientSink`: what a client connection offers an exchange (write, answer an error, hear
  that the exchange ended);
- :class:`ClientExchange`: what an exchange offers the client connection and the periodic sweep
  (start, client gone, back-pressure, deadlines);
- :class:`ClientRequest` and :class:`Refusal`: a parsed request and a router error, as the paths
  see them.

What every path reads of its proxy process is state, not behaviour: a class,
:class:`proxy_workers.process_view.ProcessView` (compiled code reads a class's attributes at fixed
offsets). How an HTTP attempt hears its worker's answer stays inside the HTTP layer: the base
class :class:`proxy_workers.http.upstream.UpstreamOwner` (called through a vtable, four times a
request).

Invariants:
- This module imports nothing from ``proxy_workers``; it is at the bottom of the package's import
  graph, so no import cycle (type-only ones included) can run through it. A test walks the graph.
- Protocols only describe; they cost nothing at run time (annotations are never evaluated).
- Every kind of exchange ends exactly once through :meth:`ClientSink.exchange_done` (the client
  counts the request there), or silently through :meth:`ClientExchange.client_gone`.
"""

from __future__ import annotations

from typing import Protocol


class Refusal(Protocol):
    """An error the router answers itself (:class:`proxy_workers.errors.RouterError`)."""

    # Read-only: an error class fixes its status, type and code (subclasses narrow their types).
    @property
    def status(self) -> int: ...

    @property
    def message(self) -> str: ...

    @property
    def type(self) -> str: ...

    @property
    def param(self) -> str | None: ...

    @property
    def code(self) -> str | None: ...

    def headers(self) -> bytes: ...


class ClientRequest(Protocol):
    """One parsed client request (:class:`proxy_workers.forwarding.request.Request`)."""

    method: bytes
    url: bytes
    path: bytes
    body: bytes
    http11: bool
    keep_alive: bool  # an exchange clears it when the response must close the connection
    request_id: bytes
    explain: bool
    connection: str
    model: str | None
    peer: bytes
    headers: list[tuple[bytes, bytes]]

    # The W3C trace context every worker call carries (proxy_workers.forwarding.tracecontext).
    @property
    def traceparent(self) -> bytes: ...

    @property
    def tracestate(self) -> bytes: ...

    def wire(self, authority: bytes) -> bytes: ...

    def with_body(self, body: bytes) -> ClientRequest: ...


# What an ended request's record reads of its exchange (serving.records): the status relayed (0:
# none), when a stream's first chunk went out (0.0: none), input and output tokens, the URL of the
# worker that answered last, retries, model and policy.
Figures = tuple[int, float, int, int, str, int, str, str]


class RoutedContext(Protocol):
    """The routing context as a request's record reads it."""

    @property
    def router(self) -> str: ...


class ClientExchange(Protocol):
    """One proxied request, as its client connection and the sweep see it."""

    @property
    def request(self) -> ClientRequest: ...

    @property
    def ctx(self) -> RoutedContext: ...

    def figures(self) -> Figures:
        """The request's record (serving.records), read once, when it ends."""
        ...

    @property
    def head_sent(self) -> bool:
        """Whether the response head reached the client (after that, no retry and no error answer)."""
        ...

    def start(self) -> None: ...

    def client_gone(self) -> None:
        """The client disconnected: stop every worker call, end without answering."""
        ...

    def check_deadline(self, now: float) -> None:
        """Called by the periodic sweep: enforce this exchange's timeouts."""
        ...

    def pause_upstream(self) -> None:
        """The client's socket is full: stop reading from the worker (back-pressure)."""
        ...

    def resume_upstream(self) -> None: ...


class ClientSink(Protocol):
    """A client connection, as an exchange sees it."""

    def write(self, data: bytes) -> None: ...

    def send_error(self, err: Refusal, request: ClientRequest) -> None:
        """Answer ``err`` in OpenAI's error shape (the response head was not sent yet)."""
        ...

    def exchange_done(self, exchange: ClientExchange, error: bool) -> None:
        """The exchange ended (answered, failed or truncated); it counts once, here."""
        ...


class UpstreamConnectionView(Protocol):
    """What an attempt reads of the worker connection that carries it."""

    content_type: bytes
    length: bytes | None
    lines: list[bytes]
    conn_tokens: frozenset[bytes] | None
    received: bool

    def relayed_lines(self) -> list[bytes]: ...

    def release(self, now: float) -> None: ...

    def abort(self) -> None: ...


class RequestGate(Protocol):
    """What a request must pass before the router answers it or routes it (client API keys)."""

    def check(self, request: ClientRequest) -> None:
        """Return if ``request`` may go on; raise a :class:`Refusal` (e.g. 401) if not."""
        ...
