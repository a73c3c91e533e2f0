"""What the gRPC end-to-end tests share: the mock's control service and a fleet of gRPC mocks.

The mocks (``shardgate mock-worker --grpc``) are observed and reconfigured through their
``MockControl`` service; :class:`GrpcFleet` starts them (and, in each test module, one router),
and :func:`fresh_mocks` gives each test zeroed counters and restores the mocks' settings after it.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import grpc
from conftest import DEADLINE, worker_row

from shardgate import launch
from shardgate.mocks.worker import RUNTIME_KEYS
from shm.proto import worker_pb2 as pb
from shm.proto import worker_pb2_grpc as pbg


def target(worker: launch.Launched) -> str:
    """host:port of a gRPC worker (its URL without the scheme)."""
    return worker.url.split("//", 1)[1]


def control(worker: launch.Launched, method: str, doc: dict[str, Any] | None = None) -> dict[str, Any]:
    with grpc.insecure_channel(target(worker)) as channel:
        reply = getattr(pbg.MockControlStub(channel), method)(pb.Json(json=json.dumps(doc or {})),
                                                             timeout=DEADLINE)
    return json.loads(reply.json)


def stats(worker: launch.Launched) -> dict[str, Any]:
    return control(worker, "GetStats")


def settled(router: launch.Launched, *workers: launch.Launched) -> bool:
    """No request in flight on these workers, as the router's load board and the mocks see it."""
    return all(worker_row(router, w.url)["in_flight"] == 0 and stats(w)["in_flight"] == 0 for w in workers)


class GrpcFleet:
    """gRPC mock workers started for one test module, and the router in front of them."""

    def __init__(self) -> None:
        self.started: list[launch.Launched] = []
        self.router: launch.Launched | None = None

    def worker(self, model: str, *extra: str) -> launch.Launched:
        worker = launch.mock_worker([model], "--grpc", *extra)
        self.started.append(worker)
        return worker

    @property
    def mocks(self) -> list[launch.Launched]:
        return [p for p in self.started if p is not self.router]

    def stop(self) -> None:
        for process in self.started:
            process.stop()


@contextmanager
def fresh_mocks(fleet: GrpcFleet) -> Iterator[None]:
    """Every mock's counters zeroed; its runtime settings restored when the block ends."""
    configs = []
    for mock in fleet.mocks:
        control(mock, "Reset")
        current = control(mock, "Configure")  # an empty patch answers the whole config
        configs.append({k: current[k] for k in RUNTIME_KEYS})
    try:
        yield
    finally:
        for mock, config in zip(fleet.mocks, configs, strict=True):
            control(mock, "Configure", config)
