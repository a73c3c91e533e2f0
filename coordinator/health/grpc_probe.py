"""Active checks of gRPC workers: health (``grpc.health.v1``), model discovery (``GetModelInfo``)
and engine load (``GetLoad``).

Role: the gRPC counterparts of :func:`coordinator.health.active.check_health`,
:func:`coordinator.health.discover_models` and :func:`coordinator.health.engine_metrics.scrape_one`, with
the same contracts, for workers whose ``connection`` is ``grpc`` (``grpc://`` or ``grpcs://`` URLs).

Invariants:
- :func:`check_grpc_health` never raises: it returns "" when the worker's overall health (service
  name "") is SERVING, else a one-line reason. :func:`discover_grpc_models` raises ValueError with
  a reason, never anything else. :meth:`LoadChannels.get_load` never raises: None when the worker
  did not answer (the caller keeps the previous figures).
- Each health or discovery probe opens its own channel and closes it before returning: it leaves
  no connection and no background reconnect behind (checks are seconds apart).
- ``GetLoad`` runs every ``metrics_interval`` for every gRPC worker, so it goes over one channel
  per worker URL kept in :class:`LoadChannels` (the coordinator's, made in its loop): channels of
  workers that left are closed at the next round (:meth:`LoadChannels.retain`), all of them when
  the coordinator stops (:meth:`LoadChannels.aclose`). A broken channel reconnects by itself
  (backoff capped at ``shm.proto.MAX_RECONNECT_BACKOFF_MS``); until it does, each call fails within its
  timeout.
- grpc is imported on first use, so a coordinator of an HTTP-only fleet never loads it.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING, Any

from shm.proto import RECONNECT_OPTIONS, open_channel

if TYPE_CHECKING:
    import grpc

    from shm.proto.worker_pb2_grpc import WorkerStub

# A worker back from a restart gets fresh figures within a scrape round or two (capped backoff).
LOAD_CHANNEL_OPTIONS = RECONNECT_OPTIONS


def _reason(exc: Any) -> str:
    if hasattr(exc, "code"):  # grpc.aio.AioRpcError
        return f"{exc.code().name}: {exc.details()}"
    return f"{exc.__class__.__name__} {exc}"


async def check_grpc_health(url: str, timeout: float) -> str:
    """Empty string when the worker reports SERVING, else the reason."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = open_channel(url)
    try:
        reply = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service=""),
                                                               timeout=timeout)
    except Exception as exc:  # an RPC error, a malformed target...: a reason, never an exception
        return f"grpc.health.v1 Check failed: {_reason(exc)}"
    finally:
        await channel.close()
    if reply.status != health_pb2.HealthCheckResponse.SERVING:
        return f"grpc.health.v1 status {health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)}"
    return ""


async def discover_grpc_models(url: str, timeout: float) -> tuple[str, ...]:
    """The models a worker lists in ``GetModelInfo``; raises ValueError with a reason."""
    from shm.proto import worker_pb2, worker_pb2_grpc

    channel = open_channel(url)
    try:
        info = await worker_pb2_grpc.WorkerStub(channel).GetModelInfo(worker_pb2.ModelInfoRequest(),
                                                                      timeout=timeout)
    except Exception as exc:  # an RPC error, a malformed target...
        raise ValueError(f"GetModelInfo failed: {_reason(exc)}") from None
    finally:
        await channel.close()
    models = tuple(dict.fromkeys(m for m in info.models if m))
    if not models:
        raise ValueError("GetModelInfo lists no model")
    return models


class LoadChannels:
    """The coordinator's ``GetLoad`` channels and stubs, one per gRPC worker URL, reused across rounds.

    Invariant: every channel it opened is either in :attr:`stubs` or closed (or being closed by
    :meth:`retain` / :meth:`aclose`); once closed, it opens none (a round still running at shutdown
    gets None).
    """

    __slots__ = ("channels", "closed", "stubs")

    def __init__(self) -> None:
        self.channels: dict[str, grpc.aio.Channel] = {}
        self.stubs: dict[str, WorkerStub] = {}
        self.closed = False

    def stub(self, url: str) -> WorkerStub:
        """The cached stub for ``url``, its channel opened on first use; ValueError for a bad URL."""
        stub = self.stubs.get(url)
        if stub is None:
            from shm.proto.worker_pb2_grpc import WorkerStub

            channel = self.channels[url] = open_channel(url, LOAD_CHANNEL_OPTIONS)
            stub = self.stubs[url] = WorkerStub(channel)
        return stub

    async def get_load(self, url: str, timeout: float) -> tuple[int, int, float] | None:
        """(running, waiting, kv usage) as the worker's ``GetLoad`` reports them, or None."""
        from shm.proto import worker_pb2

        if self.closed:
            return None
        try:
            stub = self.stub(url)
        except ValueError:  # a malformed target: no figures, as for a worker that does not answer
            return None
        try:
            load = await stub.GetLoad(worker_pb2.LoadRequest(), timeout=timeout)
        except Exception:  # an RPC error (UNIMPLEMENTED from a worker without GetLoad included)
            return None
        return load.running, load.waiting, load.kv_usage

    async def retain(self, urls: set[str]) -> None:
        """Close the channels of workers not in ``urls`` (those that left the fleet)."""
        gone = [u for u in self.channels if u not in urls]
        for url in gone:
            self.stubs.pop(url, None)
        # Popped before awaiting: a fetch meanwhile opens a fresh channel, never uses a closing one.
        await asyncio.gather(*(self.channels.pop(u).close() for u in gone))

    async def aclose(self) -> None:
        """Close every channel; used as ``contextlib.aclosing(channels)`` next to the HTTP session."""
        self.closed = True
        await self.retain(set())
