"""Routing tables derived from a snapshot, and the per-request decision.

Role: turn a decoded :class:`shm.schema.Snapshot` into ready-made candidate lists per model (built
once per publish, not per request) and pick a worker for a request.

Invariants:
- Built only when the snapshot generation changes; a request pins the table it started with.
- Candidates are healthy, non-draining HTTP workers of type ``regular``; prefill/decode and gRPC
  workers are reached through their own routers (not in this table).
- Policy objects are carried over from the previous table by (model, policy name), so their state
  (round-robin position, smooth-weight credits) survives publishes.
- A retry never picks a worker already tried for the same request.
"""

from __future__ import annotations

from collections.abc import Sequence

from proxy_workers.errors import ModelNotFound, NoHealthyWorker
from proxy_workers.policies import LoadView, Policy, make_policy
from shm.schema import Snapshot, Worker

ANY_MODEL = ""


class ModelRoute:
    """One model's routable workers and its policy."""

    __slots__ = ("candidates", "model", "policy", "serving")

    def __init__(self, model: str, candidates: list[Worker], serving: int, policy: Policy) -> None:
        self.model = model
        self.candidates = candidates
        self.serving = serving  # workers that serve the model, healthy or not
        self.policy = policy

    def pick(self, exclude: Sequence[int] = ()) -> Worker:
        candidates = self.candidates
        if exclude:
            candidates = [w for w in candidates if w.slot not in exclude]
        if not candidates:
            raise NoHealthyWorker(self._why_none(bool(exclude)))
        return self.policy.pick(candidates)

    def _why_none(self, after_retries: bool) -> str:
        what = f"model '{self.model}'" if self.model else "any model"
        if after_retries:
            return f"every healthy worker for {what} failed this request"
        return f"no healthy worker for {what} ({self.serving} configured, none healthy)"


def routable(worker: Worker) -> bool:
    return (worker.healthy and not worker.draining and worker.type == "regular"
            and worker.connection == "http")


class RoutingTable:
    """Per-snapshot routing state of one proxy process."""

    __slots__ = ("any", "by_slot", "generation", "routes", "snapshot")

    def __init__(self, snapshot: Snapshot, load: LoadView, previous: RoutingTable | None) -> None:
        self.snapshot = snapshot
        self.generation = snapshot.generation
        workers = snapshot.workers
        # Lists indexed by slot, and routability decided once per worker: this runs inside a
        # proxy's event loop and must stay within a few ms for 10,000 workers.
        size = max((w.slot for w in workers), default=-1) + 1
        self.by_slot: list[Worker | None] = [None] * size
        usable: list[Worker | None] = [None] * size
        for w in workers:
            self.by_slot[w.slot] = w
            if routable(w):
                usable[w.slot] = w
        old = previous.routes if previous is not None else {}
        default = snapshot.settings.policy
        self.routes: dict[str, ModelRoute] = {}
        for model, slots in snapshot.models.items():
            candidates = [w for w in map(usable.__getitem__, slots) if w is not None]
            override = snapshot.model_policies.get(model)
            name = (override.policy if override and override.policy else None) or default
            self.routes[model] = _route(model, candidates, len(slots), name, load, old.get(model))
        # Requests without a model field go round-robin over every worker (the seed's behaviour).
        previous_any = previous.any if previous is not None else None
        self.any = _route(ANY_MODEL, [w for w in usable if w is not None], len(workers),
                          "round_robin", load, previous_any)

    def route_for(self, model: str | None) -> ModelRoute:
        if model is None:
            return self.any
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(f"The model '{model}' does not exist or is not served here.",
                                param="model")
        return route


def _route(model: str, candidates: list[Worker], serving: int, policy_name: str, load: LoadView,
           old: ModelRoute | None) -> ModelRoute:
    if old is not None and old.policy.name == policy_name:
        policy = old.policy
    else:
        policy = make_policy(policy_name, load)
    return ModelRoute(model, candidates, serving, policy)
