"""An in-process harness for the proxy's HTTP protocol: no sockets, no subprocesses.

The real :class:`ClientProtocol` (and through it the real ``Exchange`` and ``UpstreamConnection``)
runs over a real shared-memory snapshot and load board in a temporary segment. Only the network
is fake:

- :class:`FakeTransport` records what a protocol writes, and whether it closed, aborted or paused
  reading. Like asyncio's own transports, ``close()``/``abort()`` call the protocol's
  ``connection_lost`` on the next loop iteration, not at once.
- :class:`HarnessLoop` is a real asyncio event loop whose ``create_connection`` opens nothing: each
  call becomes a :class:`Dial` that the test accepts (the worker's side is then an
  :class:`Upstream`) or refuses.
- :class:`Client` is the client's side of one connection; :func:`parse_responses` and
  :func:`parse_requests` are small, independent HTTP/1.1 readers used as the oracle.

Every action of the harness runs the loop's pending callbacks afterwards (:meth:`Harness.pump`),
so a test reads as a sequence of events with no waiting and no clock.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any, cast

from coordinator.fleet.membership import Fleet
from proxy_workers.serving.protocol import ClientProtocol
from proxy_workers.serving.state import ProxyProcess
from shm.loadboard import (
    W_CONNECT_ERRORS,
    W_ERRORS,
    W_FAILS_IN_ROW,
    W_IN_FLIGHT,
    W_REQUESTS,
    W_STREAMS,
    LoadBoard,
    board_size,
)
from shm.schema import WorkerSpec
from shm.segment import Segment, new_instance_id, segment_name
from shm.settings import Settings
from shm.snapshot import SnapshotReader, SnapshotWriter, segment_size

MODEL = "m1"
CLIENT_PEER = ("10.1.2.3", 40000)
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


# -- transports ------------------------------------------------------------------------------


class FakeTransport(asyncio.Transport):
    """A transport that records writes, close, abort and reading pauses."""

    def __init__(self, loop: asyncio.AbstractEventLoop, peer: tuple[str, int]) -> None:
        super().__init__()
        self._loop = loop
        self.peer = peer
        self.protocol: asyncio.BaseProtocol | None = None
        self.chunks: list[bytes] = []
        self.writes_after_close: list[bytes] = []
        self.closed = False  # close() or abort() was called by the protocol
        self.aborted = False
        self.lost = False  # connection_lost was delivered to the protocol
        self.reading = True
        self.pauses = 0
        self.resumes = 0

    @property
    def data(self) -> bytes:
        return b"".join(self.chunks)

    def take(self) -> bytes:
        """What was written since the last take."""
        out = b"".join(self.chunks)
        self.chunks.clear()
        return out

    def write(self, data: bytes | bytearray | memoryview) -> None:
        if self.closed:
            self.writes_after_close.append(bytes(data))
            return
        self.chunks.append(bytes(data))

    def writelines(self, list_of_data: Iterable[bytes | bytearray | memoryview]) -> None:
        for data in list_of_data:
            self.write(data)

    def get_extra_info(self, name: str, default: Any = None) -> Any:
        return self.peer if name == "peername" else default

    def is_closing(self) -> bool:
        return self.closed

    def close(self) -> None:
        if not self.closed:
            self.closed = True
            self._loop.call_soon(self.deliver_lost, None)

    def abort(self) -> None:
        self.aborted = True
        self.close()

    def pause_reading(self) -> None:
        self.reading = False
        self.pauses += 1

    def resume_reading(self) -> None:
        self.reading = True
        self.resumes += 1

    def is_reading(self) -> bool:
        return self.reading

    def deliver_lost(self, exc: Exception | None) -> None:
        """The connection is gone (either side): tell the protocol once."""
        self.closed = True
        if not self.lost and self.protocol is not None:
            self.lost = True
            self.protocol.connection_lost(exc)


# -- the worker's side -------------------------------------------------------------------------


@dataclass
class WireRequest:
    """One request as a worker received it."""

    method: str
    target: str
    version: str
    headers: list[tuple[str, str]]
    body: bytes

    def header(self, name: str) -> str | None:
        values = self.all(name)
        return values[0] if values else None

    def all(self, name: str) -> list[str]:
        name = name.lower()
        return [v for n, v in self.headers if n == name]

    @property
    def names(self) -> set[str]:
        return {n for n, _ in self.headers}


def parse_requests(data: bytes) -> list[WireRequest]:
    """Requests framed by Content-Length (the router never sends chunked requests to workers)."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"incomplete request head: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        method, target, version = lines[0].split(" ")
        headers = []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers.append((name.strip().lower(), value.strip()))
        lengths = [v for n, v in headers if n == "content-length"]
        assert not any(n == "transfer-encoding" for n, _ in headers), headers
        size = int(lengths[0]) if lengths else 0
        assert len(rest) >= size, "incomplete request body"
        out.append(WireRequest(method, target, version, headers, rest[:size]))
        data = rest[size:]
    return out


class Upstream:
    """The worker's side of one accepted connection."""

    def __init__(self, harness: Harness, dial: Dial, protocol: asyncio.Protocol,
                 transport: FakeTransport) -> None:
        self.harness = harness
        self.dial = dial
        self.url = dial.url
        self.protocol = protocol
        self.transport = transport

    @property
    def requests(self) -> list[WireRequest]:
        """Every request the router sent on this connection, in order."""
        return parse_requests(self.transport.data)

    @property
    def request(self) -> WireRequest:
        requests = self.requests
        assert requests, f"nothing was sent to {self.url}"
        return requests[-1]

    def respond(self, data: bytes, pieces: int | Sequence[int] = 1) -> None:
        """Deliver ``data`` as the worker's bytes: in ``pieces`` equal parts, or cut at the offsets given."""
        for piece in split(data, pieces):
            if self.transport.lost:
                break  # the router already dropped the connection; the rest goes nowhere
            self.protocol.data_received(piece)
            self.harness.pump()

    def close(self, exc: Exception | None = None) -> None:
        """The worker closes (``exc`` None: a clean FIN; otherwise a reset or error)."""
        self.transport.deliver_lost(exc)
        self.harness.pump()

    @property
    def aborted(self) -> bool:
        return self.transport.aborted

    @property
    def closed(self) -> bool:
        return self.transport.closed


def split(data: bytes, pieces: int | Sequence[int]) -> list[bytes]:
    if isinstance(pieces, int):
        size = max(1, -(-len(data) // pieces))
        return [data[i:i + size] for i in range(0, len(data), size)] or [b""]
    cuts = [0, *pieces, len(data)]
    return [data[a:b] for a, b in itertools.pairwise(cuts) if b > a]


@dataclass
class Dial:
    """One ``create_connection`` call the router made; the test decides how it ends."""

    loop: HarnessLoop = field(repr=False)
    factory: Callable[[], asyncio.Protocol] = field(repr=False)
    host: str
    port: int
    future: asyncio.Future[tuple[asyncio.Transport, asyncio.Protocol]] = field(repr=False)
    upstream: Upstream | None = field(default=None, repr=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def settled(self) -> bool:
        return self.future.done()

    @property
    def cancelled(self) -> bool:
        return self.future.cancelled()

    def accept(self) -> Upstream:
        """The worker accepts: the router's protocol gets a transport, the router sends its request."""
        assert not self.future.done(), "this dial already ended"
        protocol = self.factory()
        transport = FakeTransport(self.loop, (self.host, self.port))
        transport.protocol = protocol
        protocol.connection_made(transport)
        self.upstream = Upstream(self.loop.harness, self, protocol, transport)
        self.future.set_result((transport, protocol))
        self.loop.harness.pump()
        return self.upstream

    def refuse(self, exc: Exception | None = None) -> None:
        assert not self.future.done(), "this dial already ended"
        self.future.set_exception(exc or ConnectionRefusedError(111, "Connection refused"))
        self.loop.harness.pump()


class HarnessLoop(asyncio.SelectorEventLoop):
    """A real event loop whose outgoing connections are :class:`Dial` objects, opened by the test."""

    harness: Harness

    def __init__(self) -> None:
        super().__init__()
        self.dials: list[Dial] = []
        self.offset = 0.0  # seconds the test moved the clock forward (Harness.advance)

    def time(self) -> float:
        return super().time() + self.offset

    def create_connection(self, protocol_factory: Callable[[], asyncio.Protocol],  # type: ignore[override]
                          host: str | None = None, port: int | None = None,
                          **kwargs: Any) -> asyncio.Future[tuple[asyncio.Transport, asyncio.Protocol]]:
        # A future rather than a coroutine: WorkerPool.connect passes the result to ensure_future,
        # which returns a future as it is.
        future: asyncio.Future[tuple[asyncio.Transport, asyncio.Protocol]] = self.create_future()
        self.dials.append(Dial(self, protocol_factory, host or "", port or 0, future))
        return future


# -- the client's side -------------------------------------------------------------------------


@dataclass
class Response:
    """One response as the client read it."""

    status: int
    headers: list[tuple[str, str]]
    body: bytes  # de-chunked
    framing: str  # "length", "chunked", "close" or "none"
    complete: bool  # the framing says the body ended (for "close": the connection closed)
    raw_body: bytes = b""

    def header(self, name: str) -> str | None:
        name = name.lower()
        values = [v for n, v in self.headers if n == name]
        return values[0] if values else None

    @property
    def names(self) -> set[str]:
        return {n for n, _ in self.headers}

    def json(self) -> Any:
        return json.loads(self.body)


def parse_responses(data: bytes, closed: bool, head_only: bool = False) -> list[Response]:
    """Split what a client received into responses (interim 1xx ones included)."""
    out: list[Response] = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            raise AssertionError(f"incomplete response head: {data[:300]!r}")
        lines = head.decode("latin-1").split("\r\n")
        version, status_text = lines[0].split(" ", 2)[:2]
        assert version == "HTTP/1.1", lines[0]
        status = int(status_text)
        headers = []
        for line in lines[1:]:
            name, colon, value = line.partition(":")
            assert colon and name == name.strip(), f"bad header line {line!r}"
            headers.append((name.lower(), value.strip()))
        names = [n for n, _ in headers]
        te = [v for n, v in headers if n == "transfer-encoding"]
        cl = [v for n, v in headers if n == "content-length"]
        assert not (te and cl), f"both Transfer-Encoding and Content-Length: {headers}"
        assert names.count("content-length") <= 1, headers
        if status < 200 or status in (204, 304) or head_only:
            out.append(Response(status, headers, b"", "none", True))
            data = rest
        elif cl:
            size = int(cl[0])
            body = rest[:size]
            out.append(Response(status, headers, body, "length", len(body) == size, body))
            data = rest[size:]
        elif te:
            assert te[-1].lower() == "chunked", te
            body, consumed, complete = _dechunk(rest)
            out.append(Response(status, headers, body, "chunked", complete, rest[:consumed]))
            data = rest[consumed:]
        else:
            out.append(Response(status, headers, rest, "close", closed, rest))
            data = b""
    return out


def _dechunk(data: bytes) -> tuple[bytes, int, bool]:
    """(body, bytes consumed, complete) of a chunked body at the start of ``data``."""
    body = []
    pos = 0
    while True:
        end = data.find(b"\r\n", pos)
        if end < 0:
            return b"".join(body), len(data), False
        size = int(data[pos:end].split(b";")[0], 16)
        start = end + 2
        if size == 0:
            if data[start:start + 2] == b"\r\n":
                return b"".join(body), start + 2, True
            return b"".join(body), len(data), False
        chunk = data[start:start + size]
        body.append(chunk)
        if len(chunk) < size or data[start + size:start + size + 2] != b"\r\n":
            return b"".join(body), len(data), False
        pos = start + size + 2


class Client:
    """The client's side of one connection to the proxy."""

    def __init__(self, harness: Harness, peer: tuple[str, int]) -> None:
        self.harness = harness
        self.protocol = ClientProtocol(harness.proc)
        self.transport = FakeTransport(harness.loop, peer)
        self.transport.protocol = self.protocol
        self.protocol.connection_made(self.transport)

    def send(self, data: bytes, pieces: int | Sequence[int] = 1) -> None:
        for piece in split(data, pieces):
            if self.transport.lost:
                break
            self.protocol.data_received(piece)
            self.harness.pump()

    def disconnect(self, exc: Exception | None = None) -> None:
        """The client goes away."""
        self.transport.deliver_lost(exc)
        self.harness.pump()

    def pause_writing(self) -> None:
        """The client's socket buffer is full (the transport's high-water mark)."""
        self.protocol.pause_writing()
        self.harness.pump()

    def resume_writing(self) -> None:
        self.protocol.resume_writing()
        self.harness.pump()

    @property
    def received(self) -> bytes:
        return self.transport.data

    def responses(self, head_only: bool = False) -> list[Response]:
        return parse_responses(self.transport.data, self.transport.closed, head_only)

    def final_responses(self) -> list[Response]:
        """Responses without interim (1xx) ones."""
        return [r for r in self.responses() if r.status >= 200]

    @property
    def response(self) -> Response:
        """The only final response on this connection."""
        final = self.final_responses()
        assert len(final) == 1, f"expected one response, got {len(final)}: {self.received[:500]!r}"
        return final[0]

    @property
    def closed(self) -> bool:
        """The proxy closed this connection."""
        return self.transport.closed


# -- requests ---------------------------------------------------------------------------------


def chat_body(model: str | None = MODEL, stream: bool = False, content: str = "hi") -> bytes:
    doc: dict[str, Any] = {"messages": [{"role": "user", "content": content}], "stream": stream}
    if model is not None:
        doc["model"] = model
    return json.dumps(doc).encode()


def request(method: str = "POST", target: str = "/v1/chat/completions", body: bytes | None = None,
            headers: Sequence[tuple[str, str]] = (), version: str = "HTTP/1.1",
            content_length: bool = True) -> bytes:
    """A client request. A POST without ``body`` carries a chat completion for ``MODEL``."""
    if body is None and method == "POST":
        body = chat_body()
    lines = [f"{method} {target} {version}", "Host: router.test"]
    lines += [f"{n}: {v}" for n, v in headers]
    if body is not None and content_length:
        lines.append(f"Content-Length: {len(body)}")
    if body is not None and not content_length:
        lines.append("Content-Type: application/json")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + (body or b"")


def chunked(*parts: bytes) -> bytes:
    return b"".join(b"%x\r\n%s\r\n" % (len(p), p) for p in parts) + b"0\r\n\r\n"


def worker_response(status: int = 200, body: bytes = b'{"ok":true}',
                    headers: Sequence[tuple[str, str]] = (("Content-Type", "application/json"),),
                    framing: str = "length", reason: str = "OK") -> bytes:
    """A worker's response; ``framing`` is "length", "chunked" or "close" (body ends with the connection)."""
    lines = [f"HTTP/1.1 {status} {reason}"] + [f"{n}: {v}" for n, v in headers]
    if framing == "length":
        lines.append(f"Content-Length: {len(body)}")
        payload = body
    elif framing == "chunked":
        lines.append("Transfer-Encoding: chunked")
        payload = chunked(body) if body else b"0\r\n\r\n"
    else:
        lines.append("Connection: close")
        payload = body
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + payload


def sse_head() -> bytes:
    return (b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nCache-Control: no-cache\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n")


def sse_chunk(text: str) -> bytes:
    event = b"data: %s\n\n" % json.dumps({"choices": [{"delta": {"content": text}}]}).encode()
    return b"%x\r\n%s\r\n" % (len(event), event)


# -- the harness --------------------------------------------------------------------------------


class Harness:
    """A ProxyProcess over a real snapshot and load board with ``workers`` HTTP workers serving MODEL."""

    def __init__(self, workers: int = 3, **settings: Any) -> None:
        self.loop = HarnessLoop()
        self.loop.harness = self
        self.settings = Settings(**settings)
        self.urls = [f"http://127.0.0.1:{9101 + i}" for i in range(workers)]
        self._segments: list[Segment] = []
        self._board: LoadBoard | None = None
        self._reader: SnapshotReader | None = None
        try:
            instance = new_instance_id()
            snap = self._segment(segment_name(instance, "snap"), segment_size(1 << 18))
            board_seg = self._segment(segment_name(instance, "board"), board_size(2, 16))
            self._board = board = LoadBoard.create(board_seg, 2, 16)
            fleet = Fleet(16)
            fleet.apply([WorkerSpec(url=url, model=MODEL) for url in self.urls])
            snapshot = fleet.snapshot(self.settings, {}, 1, 1, os.getpid())
            self.slots = {w.url: w.slot for w in snapshot.workers}
            writer = SnapshotWriter(snap, os.getpid())
            writer.publish(snapshot)
            attached = Segment.attach(snap.name)
            self._segments.append(attached)
            self._reader = SnapshotReader(attached)
            self.board = board
            self.proc = ProxyProcess(cast(asyncio.AbstractEventLoop, self.loop), 0, self._reader, board)
        except BaseException:
            self.cleanup()
            raise
        self.clients: list[Client] = []

    def _segment(self, name: str, size: int) -> Segment:
        seg = Segment.create(name, size)
        self._segments.append(seg)
        return seg

    # -- driving --

    def pump(self) -> None:
        """Run the loop's ready callbacks (connect results, connection_lost), a few rounds deep."""
        for _ in range(4):
            self.loop.call_soon(self.loop.stop)
            self.loop.run_forever()

    def client(self, peer: tuple[str, int] = CLIENT_PEER) -> Client:
        client = Client(self, peer)
        self.clients.append(client)
        return client

    @property
    def dials(self) -> list[Dial]:
        return self.loop.dials

    def pending_dials(self) -> list[Dial]:
        return [d for d in self.loop.dials if not d.settled]

    def next_dial(self) -> Dial:
        pending = self.pending_dials()
        assert len(pending) == 1, f"expected one pending connection attempt, got {len(pending)}"
        return pending[0]

    def accept(self) -> Upstream:
        """Accept the one pending connection attempt."""
        return self.next_dial().accept()

    def upstream_with(self, body: bytes) -> Upstream:
        """The worker connection whose latest request carries ``body`` (new or pooled)."""
        found = [d.upstream for d in self.loop.dials
                 if d.upstream is not None and d.upstream.requests and d.upstream.request.body == body]
        assert len(found) == 1, f"{len(found)} connections carry that request"
        return found[0]

    def refuse(self, exc: Exception | None = None) -> Dial:
        dial = self.next_dial()
        dial.refuse(exc)
        return dial

    def exchange(self, client: Client, raw_request: bytes, raw_response: bytes,
                 pieces: int | Sequence[int] = 1) -> Upstream:
        """Send a request on ``client``, accept its connection and answer it with ``raw_response``."""
        client.send(raw_request)
        upstream = self.accept()
        upstream.respond(raw_response, pieces)
        return upstream

    def advance(self, seconds: float) -> None:
        """Move the loop's clock ``seconds`` forward, then run the proxy's periodic sweep once
        (the one place timeouts are enforced). No real time passes."""
        from proxy_workers.serving.process import _sweep  # the sweep is private; imported on use

        self.loop.offset += seconds
        _sweep(self.proc)
        self.pump()

    # -- load board --

    def proxy_row(self) -> dict[str, float]:
        return self.board.proxy_row(0)

    def cell(self, url: str) -> dict[str, int]:
        """This proxy's load-board cell for worker ``url``."""
        ints, slot = self.board.ints, self.slots[url]
        fields = {"in_flight": W_IN_FLIGHT, "requests": W_REQUESTS, "errors": W_ERRORS,
                  "connect_errors": W_CONNECT_ERRORS, "streams": W_STREAMS, "fails_in_row": W_FAILS_IN_ROW}
        return {name: ints[self.board.cell_word(0, slot, f)] for name, f in fields.items()}

    def in_flight(self) -> int:
        return sum(self.cell(url)["in_flight"] for url in self.urls)

    # -- end --

    def check_no_writes_after_close(self) -> None:
        transports = [c.transport for c in self.clients]
        transports += [d.upstream.transport for d in self.loop.dials if d.upstream is not None]
        late = [t.writes_after_close for t in transports if t.writes_after_close]
        assert not late, f"written after close: {late}"

    def cleanup(self) -> None:
        loop = self.loop
        if not loop.is_closed():
            for client in getattr(self, "clients", []):
                client.transport.deliver_lost(None)
            self.pump()
            loop.close()
        self.__dict__.pop("proc", None)
        if self._reader is not None:
            self._reader.close()
        if self._board is not None:
            self._board.close()
        for seg in self._segments:
            seg.close()
            if seg.owner:
                seg.unlink()


@contextmanager
def harness(workers: int = 3, **settings: Any) -> Iterator[Harness]:
    """A Harness, cleaned up at the end; checks that nothing was written to a closed connection."""
    h = Harness(workers, **settings)
    try:
        yield h
        h.check_no_writes_after_close()
    finally:
        h.cleanup()
