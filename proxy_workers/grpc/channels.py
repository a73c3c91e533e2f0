"""gRPC channels to workers: one grpc.aio channel per worker URL per proxy process, cached.

Role: what :mod:`proxy_workers.http.pools`' pools are to HTTP workers. A channel multiplexes every
call to its worker over one HTTP/2 connection, so there is nothing to pool beyond the channel.

Invariants:
- ``grpc`` and the generated stubs are imported on first use only: a proxy whose fleet has no
  gRPC worker never loads them (they cost memory in every proxy process).
- Channels are made inside the proxy's running loop (grpc.aio binds to it; uvloop works).
- A worker that leaves the fleet has its channel closed (:meth:`GrpcChannels.retain`, called on
  every snapshot change); calls still running on it are cancelled by the close, as a client
  disconnect would.
- Reconnect backoff is capped at ``shm.proto.MAX_RECONNECT_BACKOFF_MS``: a worker that comes back is
  usable within seconds, not after gRPC's default two minutes.
- A worker with an upstream key (:mod:`proxy_workers.serving.auth`) gets it as ``authorization:
  Bearer KEY`` metadata on every call (Generate and Abort): its stub is wrapped, so the call sites
  stay as they are and a worker without a key pays nothing.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any, cast

from shm.proto import RECONNECT_OPTIONS, open_channel

if TYPE_CHECKING:
    import grpc

    from shm.proto.worker_pb2_grpc import WorkerStub

MAX_MESSAGE_BYTES = 64 * 1024 * 1024  # a request carries the whole prompt (max_body_size is 32 MiB)
CHANNEL_OPTIONS = (
    *RECONNECT_OPTIONS,
    ("grpc.max_send_message_length", MAX_MESSAGE_BYTES),
    ("grpc.max_receive_message_length", MAX_MESSAGE_BYTES),
    ("grpc.keepalive_time_ms", 30_000),  # finds a dead worker under a silent stream
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 0),
)


class GrpcChannels:
    """The channels and stubs of one proxy process, keyed by worker URL."""

    __slots__ = ("_closing", "channels", "keys", "stubs")

    def __init__(self) -> None:
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.stubs: dict[str, WorkerStub] = {}
        self.keys: dict[str, tuple[str, str]] = {}  # url -> its authorization metadata entry
        self._closing: set[asyncio.Task[Any]] = set()

    def stub(self, url: str) -> WorkerStub:
        stub = self.stubs.get(url)
        if stub is None:
            from shm.proto.worker_pb2_grpc import WorkerStub

            channel = self.channels.get(url)
            if channel is None:
                channel = self.channels[url] = open_channel(url, CHANNEL_OPTIONS)
            stub = WorkerStub(channel)
            auth = self.keys.get(url)
            if auth is not None:
                stub = cast("WorkerStub", KeyedStub(stub, auth))
            self.stubs[url] = stub
        return stub

    def set_key(self, url: str, key: str | None) -> None:
        """Send ``key`` on every later call to ``url`` (None: no key). Calls already made keep
        what they were sent with; the channel stays (a key is per call, not per connection)."""
        auth = None if key is None else ("authorization", "Bearer " + key)
        if self.keys.get(url) == auth:
            return
        if auth is None:
            del self.keys[url]
        else:
            self.keys[url] = auth
        self.stubs.pop(url, None)  # the next stub() wraps (or not) afresh

    def channel(self, url: str) -> grpc.aio.Channel | None:
        return self.channels.get(url)

    def retain(self, urls: set[str]) -> None:
        """Close the channels of workers that left the fleet."""
        for url in [u for u in self.channels if u not in urls]:
            self.stubs.pop(url, None)
            self._close(self.channels.pop(url))
        for url in [u for u in self.keys if u not in urls]:
            del self.keys[url]

    def close_all(self) -> None:
        self.retain(set())

    def _close(self, channel: grpc.aio.Channel) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:  # no loop (process teardown): the channel goes with the process
            return
        task = loop.create_task(channel.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)


class KeyedStub:
    """A worker stub whose every call also carries the worker's ``authorization`` metadata."""

    __slots__ = ("_auth", "_stub")

    def __init__(self, stub: WorkerStub, auth: tuple[str, str]) -> None:
        self._stub = stub
        self._auth = auth

    def Generate(self, request: Any, *, metadata: Any = (), **kwargs: Any) -> Any:  # gRPC's method names
        return self._stub.Generate(request, metadata=(*metadata, self._auth), **kwargs)

    def Abort(self, request: Any, *, metadata: Any = (), **kwargs: Any) -> Any:
        return self._stub.Abort(request, metadata=(*metadata, self._auth), **kwargs)
