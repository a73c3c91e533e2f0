"""Routing tables derived from a snapshot, and the per-request decision.

Role: turn a decoded :class:`shm.schema.Snapshot` into ready-made routes per model (candidate
lists, hash rings, shard maps; built once per publish, never per request) and pick a worker for
a request: shard first (when the model has shards), then the model's policy.

Invariants:
- Built only when the snapshot generation changes; a request pins the table it started with.
- Candidates are healthy, non-draining HTTP workers of type ``regular`` (the http_regular
  router); prefill/decode and gRPC workers are reached through their own routers.
- A PD route's side policies and dialect come from :func:`pd_policy_name` and :func:`pd_dialect`:
  a model's own setting always wins over the global one (``pd_dialect`` None: not set).
- Policy objects are carried over from the previous table by (model, policy name), so their state
  survives publishes.
- Shards (the seed's Router): the request key picks a shard on the model's ring; the policy picks
  within the shard; a shard with no usable worker fails over to the next shard clockwise (its
  backup). A request without a key uses the first shard clockwise from a random point.
- A retry never picks a worker already tried for the same request.
- Per-worker caps (``Worker.max_concurrency``): a route with a capped worker is a
  :class:`CappedModelRoute`, whose pick passes over workers at their cap (in-flight summed over
  all proxies from the load board); a route without one is a plain :class:`ModelRoute` and pays
  nothing for the feature.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Literal

from proxy_workers.errors import ModelNotFound, NoHealthyWorker, WorkersSaturated, clip
from proxy_workers.policies.base import Policy, PolicyEnv
from proxy_workers.policies.registry import make_policy
from proxy_workers.routing.context import RequestContext
from proxy_workers.routing.selection import routers_by_model
from shm.hashing import RingView
from shm.schema import Snapshot, Worker

ANY_MODEL = ""
HASH_POLICIES = frozenset({"consistent_hash", "consistent_hash_bounded"})


class ModelRoute:
    """One model's routable workers, ring, shards and policy."""

    __slots__ = ("by_slot", "candidates", "model", "policy", "ring", "ring_workers", "serving",
                 "shard_names", "shard_workers")

    def __init__(self, model: str, candidates: list[Worker], serving: int, policy: Policy) -> None:
        self.model = model
        self.candidates = candidates
        self.by_slot = {w.slot: w for w in candidates}
        self.serving = serving  # workers that serve the model, healthy or not
        self.policy = policy
        self.ring: RingView | None = None
        self.ring_workers: list[Worker | None] = []
        self.shard_names: tuple[str, ...] = ()
        self.shard_workers: list[list[Worker]] = []

    def pick(self, ctx: RequestContext, exclude: Sequence[int] = ()) -> Worker:
        candidates = self.candidates
        if exclude:
            candidates = [w for w in candidates if w.slot not in exclude]
        if not candidates:
            raise NoHealthyWorker(self._why_none(bool(exclude)))
        if self.shard_names:
            return self._pick_sharded(ctx, exclude)
        return self.policy.pick(self, candidates, ctx)

    def _pick_sharded(self, ctx: RequestContext, exclude: Sequence[int]) -> Worker:
        ring = self.ring
        assert ring is not None
        h = ctx.key_hash()
        if h is None:
            h = random.getrandbits(64)
        first = True
        for owner in ring.walk(h):
            workers = self.shard_workers[owner]
            if exclude:
                workers = [w for w in workers if w.slot not in exclude]
            if workers:
                ctx.shard = self.shard_names[owner]
                policy = self.policy
                worker = policy.pick(self, workers, ctx) if policy.name not in HASH_POLICIES else \
                    workers[int(random.random() * len(workers))]
                if not first:
                    ctx.note(f"shard's workers unavailable: backup shard {ctx.shard}", fallback=True)
                return worker
            first = False
        raise NoHealthyWorker(self._why_none(bool(exclude)))

    def has_room(self) -> bool:
        """Some candidate is below its concurrency cap (always, on a route without caps)."""
        return True

    def _why_none(self, after_retries: bool) -> str:
        what = f"model '{self.model}'" if self.model else "any model"
        if after_retries:
            return f"every healthy worker for {what} failed this request"
        return f"no healthy worker for {what} ({self.serving} configured, none healthy)"


class CappedModelRoute(ModelRoute):
    """A route with at least one worker capped by ``max_concurrency``: picks skip full workers."""

    __slots__ = ()

    def full_slots(self) -> list[int]:
        """Slots of candidates at their cap, counting every proxy's in-flight requests."""
        in_flight = self.policy.env.load.in_flight
        return [w.slot for w in self.candidates
                if w.max_concurrency and in_flight(w.slot) >= w.max_concurrency]

    def has_room(self) -> bool:
        return len(self.full_slots()) < len(self.candidates)

    def pick(self, ctx: RequestContext, exclude: Sequence[int] = ()) -> Worker:
        full = self.full_slots()
        if full:
            if all(w.slot in exclude or w.slot in full for w in self.candidates):
                if any(w.slot not in exclude for w in self.candidates):
                    raise WorkersSaturated(f"every worker for {self._what()} is at its max_concurrency",
                                           retry_after=1)
            else:
                ctx.note(f"{len(full)} worker(s) at max_concurrency passed over", fallback=False)
                exclude = [*exclude, *full]
        return ModelRoute.pick(self, ctx, exclude)

    def _what(self) -> str:
        return f"model '{self.model}'" if self.model else "any model"


def routable(worker: Worker) -> bool:
    """Usable by the http_regular router."""
    return (worker.healthy and not worker.draining and worker.type == "regular"
            and worker.connection == "http")


def usable(worker: Worker) -> bool:
    """Usable by some router: healthy and not draining."""
    return worker.healthy and not worker.draining


class PDRoute:
    """A model's prefill and decode routes (http_pd or grpc_pd), each with its own policy."""

    __slots__ = ("decode", "dialect", "model", "prefill")

    def __init__(self, model: str, prefill: ModelRoute, decode: ModelRoute, dialect: str) -> None:
        self.model = model
        self.prefill = prefill
        self.decode = decode
        self.dialect = dialect

    @property
    def candidates(self) -> list[Worker]:
        """Non-empty only when a pair can be formed (a PD model is ready only then)."""
        return self.decode.candidates if self.prefill.candidates else []

    def has_room(self) -> bool:
        return self.prefill.has_room() and self.decode.has_room()


class RoutingTable:
    """Per-snapshot routing state of one proxy process."""

    __slots__ = ("aliases", "any", "by_slot", "capped", "generation", "grpc_routes", "pd_routes",
                 "router_choice", "router_of", "routes", "snapshot")

    def __init__(self, snapshot: Snapshot, env: PolicyEnv, previous: RoutingTable | None) -> None:
        self.snapshot = snapshot
        self.generation = snapshot.generation
        workers = snapshot.workers
        # Lists indexed by slot, and routability decided once per worker: this runs inside a
        # proxy's event loop and must stay within a few ms for 10,000 workers.
        size = max((w.slot for w in workers), default=-1) + 1
        self.by_slot: list[Worker | None] = [None] * size
        self.capped = False  # some worker has a max_concurrency (admission control is then on)
        plain: list[Worker | None] = [None] * size  # http_regular candidates
        others: dict[int, Worker] = {}  # usable gRPC or prefill/decode workers (usually few)
        for w in workers:  # routable() and usable() inlined: this loop runs 10,000 times per publish
            self.by_slot[w.slot] = w
            if w.max_concurrency:
                self.capped = True
            if w.healthy and not w.draining:
                if w.type == "regular" and w.connection == "http":
                    plain[w.slot] = w
                else:
                    others[w.slot] = w
        old = previous.routes if previous is not None else {}
        self.routes: dict[str, ModelRoute] = {}
        for model, slots in snapshot.models.items():
            candidates = [w for w in map(plain.__getitem__, slots) if w is not None]
            route = _route(model, candidates, len(slots), _policy_name(snapshot, model), env,
                           old.get(model))
            _attach_ring(route, snapshot, plain)
            self.routes[model] = route
        self.grpc_routes: dict[str, ModelRoute] = {}
        self.pd_routes: dict[str, dict[str, PDRoute]] = {"http_pd": {}, "grpc_pd": {}}
        if any(r in snapshot.routers for r in ("grpc_regular", "http_pd", "grpc_pd")):
            self._special_routes(snapshot, env, previous, others)
        # Requests without a model field go round-robin over every worker (the seed's behaviour).
        previous_any: ModelRoute | None = previous.any if previous is not None else None
        self.any: ModelRoute = _route(ANY_MODEL, [w for w in plain if w is not None], len(workers),
                          "round_robin", env, previous_any)
        self.router_of = routers_by_model(snapshot.routers)
        # (model, connection preference) -> (router, reason, route): selection depends only on
        # the snapshot, so each combination is decided once per publish.
        self.router_choice: dict[tuple[str, str], tuple[str, str, ModelRoute | PDRoute]] = {}
        self.aliases = snapshot.aliases

    def _special_routes(self, snapshot: Snapshot, env: PolicyEnv, previous: RoutingTable | None,
                        others: dict[int, Worker]) -> None:
        """Routes of the grpc_regular, http_pd and grpc_pd routers, for models that have them."""
        kinds: dict[tuple[str, str, str], list[Worker]] = {}
        for model, slots in snapshot.models.items():
            for slot in slots:
                w = others.get(slot)
                if w is not None:
                    kinds.setdefault((model, w.connection, w.type), []).append(w)
        served = {m for r in ("grpc_regular", "http_pd", "grpc_pd") for m in snapshot.routers.get(r, ())}
        old_grpc = previous.grpc_routes if previous is not None else {}
        old_pd = previous.pd_routes if previous is not None else {"http_pd": {}, "grpc_pd": {}}
        for model in served:
            total = len(snapshot.models.get(model, ()))
            name = _policy_name(snapshot, model)
            if model in snapshot.routers.get("grpc_regular", ()):
                self.grpc_routes[model] = _route(model, kinds.get((model, "grpc", "regular"), []), total,
                                                 name, env, old_grpc.get(model))
            for connection in ("http", "grpc"):
                router = f"{connection}_pd"
                if model not in snapshot.routers.get(router, ()):
                    continue
                before = old_pd[router].get(model)
                prefill = _route(model, kinds.get((model, connection, "prefill"), []), total,
                                 pd_policy_name(snapshot, model, "prefill"), env,
                                 before.prefill if before else None)
                decode = _route(model, kinds.get((model, connection, "decode"), []), total,
                                pd_policy_name(snapshot, model, "decode"), env,
                                before.decode if before else None)
                self.pd_routes[router][model] = PDRoute(model, prefill, decode,
                                                        pd_dialect(snapshot, model))

    def route_in(self, router: str, model: str) -> ModelRoute | PDRoute:
        """The model's route in ``router`` (selection guarantees the router serves the model)."""
        if router == "http_regular":
            return self.route_for(model)
        if router == "grpc_regular":
            return self.grpc_routes[model]
        return self.pd_routes[router][model]

    def serving(self, model: str) -> tuple[int, int]:
        """(routable workers, configured workers) of a model over all its routers."""
        healthy = 0
        for route in (self.routes.get(model), self.grpc_routes.get(model),
                      self.pd_routes["http_pd"].get(model), self.pd_routes["grpc_pd"].get(model)):
            if route is not None:
                healthy += len(route.candidates)
        return healthy, len(self.snapshot.models.get(model, ()))

    def route_for(self, model: str | None) -> ModelRoute:
        if model is None:
            return self.any
        route = self.routes.get(model)
        if route is None:
            raise ModelNotFound(f"The model '{clip(model)}' does not exist or is not served here.",
                                param="model")
        return route


def _policy_name(snapshot: Snapshot, model: str) -> str:
    override = snapshot.model_policies.get(model)
    return (override.policy if override and override.policy else None) or snapshot.settings.policy


def pd_policy_name(snapshot: Snapshot, model: str, side: Literal["prefill", "decode"]) -> str:
    """A PD side's policy: the model's own first (its side's, then its ``policy``), then the
    global side setting, then the global ``policy``. The one place this order is decided."""
    override = snapshot.model_policies.get(model)
    settings = snapshot.settings
    if override is not None:
        own = getattr(override, f"{side}_policy") or override.policy
        if own:
            return str(own)
    return str(getattr(settings, f"{side}_policy") or settings.policy)


def pd_dialect(snapshot: Snapshot, model: str) -> str:
    """A PD model's protocol: its own ``pd_dialect`` when set (even to the default), else the
    global ``pd_dialect`` setting."""
    override = snapshot.model_policies.get(model)
    if override is not None and override.pd_dialect is not None:
        return override.pd_dialect
    return snapshot.settings.pd_dialect


def _route(model: str, candidates: list[Worker], serving: int, policy_name: str, env: PolicyEnv,
           old: ModelRoute | None) -> ModelRoute:
    if old is not None and old.policy.name == policy_name:
        policy = old.policy
    else:
        policy = make_policy(policy_name, env)
    kind = CappedModelRoute if any(w.max_concurrency for w in candidates) else ModelRoute
    return kind(model, candidates, serving, policy)


def _attach_ring(route: ModelRoute, snapshot: Snapshot, usable: list[Worker | None]) -> None:
    """Give a route its ring: over shard names for a sharded model, else over worker URLs."""
    ring = snapshot.rings.get(route.model)
    shards = snapshot.shards.get(route.model)
    needs_ring = shards is not None or route.policy.name in HASH_POLICIES
    if ring is None or not needs_ring:
        return
    route.ring = RingView(ring)
    if shards is not None:
        route.shard_names = ring.members
        route.shard_workers = [[w for w in map(usable.__getitem__, shards.get(name, ())) if w is not None]
                               for name in ring.members]
        return
    by_url = {w.url: w for w in route.candidates}
    route.ring_workers = [by_url.get(url) for url in ring.members]
