"""The gRPC worker contract (``worker.proto``) and its generated Python modules.

Role: shared by the proxies (gRPC routers), the coordinator (health and model discovery) and the
mock worker. ``from shm.proto import worker_pb2, worker_pb2_grpc``.

Invariant: the generated modules are committed and regenerated only with the command in this
folder's README (which names the generator version); importing this package loads neither grpcio
nor protobuf, so a process that never speaks gRPC never pays for them.
"""

from __future__ import annotations

from urllib.parse import urlsplit


def grpc_target(url: str) -> tuple[str, bool]:
    """(``host:port`` target, TLS) of a ``grpc://`` or ``grpcs://`` worker URL."""
    parts = urlsplit(url)
    tls = parts.scheme == "grpcs"
    host = parts.hostname or "127.0.0.1"
    if ":" in host:
        host = f"[{host}]"
    return f"{host}:{parts.port or (443 if tls else 80)}", tls
