"""Active checks of gRPC workers: health (``grpc.health.v1``), model discovery (``GetModelInfo``)
and engine load (``GetLoad``).

Role: the gRPC counterparts of :func:`coordinator.health.check_health`,
:func:`coordinator.health.discover_models` and :func:`coordinator.engine_metrics.scrape_one`, with
the same contracts, for workers whose ``connection`` is ``grpc`` (``grpc://`` or ``grpcs://`` URLs).

Invariants:
- :func:`check_grpc_health` never raises: it returns "" when the worker's overall health (service
  name "") is SERVING, else a one-line reason. :func:`discover_grpc_models` raises ValueError with
  a reason, never anything else. :func:`fetch_grpc_load` never raises: None when the worker did not
  answer (the caller keeps the previous figures).
- Each probe opens its own channel and closes it before returning: a probe leaves no connection
  and no background reconnect behind (checks are seconds apart; a channel costs one handshake).
- grpc is imported on first use, so a coordinator of an HTTP-only fleet never loads it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from shm.proto import grpc_target

if TYPE_CHECKING:
    import grpc


def _channel(url: str) -> grpc.aio.Channel:
    import grpc

    target, tls = grpc_target(url)
    if tls:
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials())
    return grpc.aio.insecure_channel(target)


def _reason(exc: Any) -> str:
    if hasattr(exc, "code"):  # grpc.aio.AioRpcError
        return f"{exc.code().name}: {exc.details()}"
    return f"{exc.__class__.__name__} {exc}"


async def check_grpc_health(url: str, timeout: float) -> str:
    """Empty string when the worker reports SERVING, else the reason."""
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    channel = _channel(url)
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

    channel = _channel(url)
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


async def fetch_grpc_load(url: str, timeout: float) -> tuple[int, int, float] | None:
    """(running, waiting, kv usage) as the worker's ``GetLoad`` reports them, or None."""
    from shm.proto import worker_pb2, worker_pb2_grpc

    try:
        channel = _channel(url)
    except ValueError:  # a malformed target: no figures, as for a worker that does not answer
        return None
    try:
        load = await worker_pb2_grpc.WorkerStub(channel).GetLoad(worker_pb2.LoadRequest(), timeout=timeout)
    except Exception:  # an RPC error (UNIMPLEMENTED from a worker without GetLoad included)
        return None
    finally:
        await channel.close()
    return load.running, load.waiting, load.kv_usage
