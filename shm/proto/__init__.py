"""The gRPC worker contract (``worker.proto``) and its generated Python modules.

Role: shared by the proxies (gRPC routers), the coordinator (health and model discovery) and the
mock worker. ``from shm.proto import worker_pb2, worker_pb2_grpc``.

Invariant: the generated modules are committed and regenerated only with the command in this
folder's README (which names the generator version); importing this package loads neither grpcio
nor protobuf, so a process that never speaks gRPC never pays for them.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

if TYPE_CHECKING:
    import grpc

# Reconnect backoff capped: gRPC's default grows to two minutes, so a worker back from a restart
# would stay unusable that long. The minimum is also the deadline of each connection attempt:
# shorter would cut slow (remote, TLS) handshakes; gRPC's default (20 s) would keep a dead worker
# "connecting", every call to it waiting for the router's connect_timeout instead of failing over.
MAX_RECONNECT_BACKOFF_MS = 2000
RECONNECT_OPTIONS: tuple[tuple[str, Any], ...] = (
    ("grpc.initial_reconnect_backoff_ms", 200),
    ("grpc.min_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
    ("grpc.max_reconnect_backoff_ms", MAX_RECONNECT_BACKOFF_MS),
)


def grpc_target(url: str) -> tuple[str, bool]:
    """(``host:port`` target, TLS) of a ``grpc://`` or ``grpcs://`` worker URL."""
    parts = urlsplit(url)
    tls = parts.scheme == "grpcs"
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port or (443 if tls else 80)}", tls


def open_channel(url: str, options: tuple[tuple[str, Any], ...] = ()) -> grpc.aio.Channel:
    """A new grpc.aio channel to a ``grpc://`` / ``grpcs://`` worker URL (the caller owns and closes it).

    The one channel factory of the project: proxies (with :data:`RECONNECT_OPTIONS` and message
    limits), the coordinator's probes and load scrapes all open channels here, so TLS and target
    rules cannot drift apart. grpc is imported here, on first use.
    """
    import grpc

    target, tls = grpc_target(url)
    if tls:
        return grpc.aio.secure_channel(target, grpc.ssl_channel_credentials(), options=options)
    return grpc.aio.insecure_channel(target, options=options)
