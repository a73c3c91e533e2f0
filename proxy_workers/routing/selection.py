"""Per-request router selection (the seed's RouterManager) and alias resolution.

Role: given a request's model, decide which of the four routers serves it, following the seed
design: the routers serving the model -> filter by connection preference (the
``connection_preference`` setting, or the request's ``X-Shardgate-Connection`` header) -> prefer
a PD router -> fall back to a regular one -> otherwise an error that says why.

Invariants:
- A router without a data path in this build is passed over with the reason recorded, never
  silently; if nothing remains the client gets 503 naming what exists and what is missing.
- Aliases (traffic splitting) resolve before router selection: one weighted draw per request over
  the alias's targets that are currently served; the decision records the alias.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Mapping

from proxy_workers.errors import ModelNotFound, NoHealthyWorker, clip

# Preference order among a model's routers once the connection filter is applied.
ORDER = ("http_pd", "grpc_pd", "http_regular", "grpc_regular")
IMPLEMENTED = frozenset({"http_regular", "http_pd", "grpc_regular", "grpc_pd"})


def routers_by_model(routers: dict[str, tuple[str, ...]]) -> dict[str, tuple[str, ...]]:
    """Invert the snapshot's router -> models map, each model's routers in preference order."""
    out: dict[str, list[str]] = {}
    for name in ORDER:
        for model in routers.get(name, ()):
            out.setdefault(model, []).append(name)
    return {m: tuple(rs) for m, rs in out.items()}


def select_router(model: str, available: Iterable[str], preference: str) -> tuple[str, str]:
    """(router name, reason) for ``model``; raises when no usable router serves it."""
    available = tuple(available)
    if not available:
        raise ModelNotFound(f"The model '{clip(model)}' does not exist or is not served here.",
                            param="model")
    pool = available if preference == "any" else tuple(r for r in available if r.startswith(preference))
    if not pool:
        raise NoHealthyWorker(f"model '{clip(model)}' has no {preference} router "
                              f"(it is served by: {', '.join(available)})")
    for i, name in enumerate(pool):
        if name in IMPLEMENTED:
            # Only the routers preferred over this one were passed over.
            reason = "preferred router" if i == 0 else (
                f"{', '.join(pool[:i])} not available in this build: fell back to {name}")
            return name, reason
    raise NoHealthyWorker(f"model '{model}' is served only by {', '.join(pool)}, "
                          "whose data path is not available in this build")


def resolve_alias(model: str, aliases: Mapping[str, Mapping[str, float]], served: Mapping[str, object],
                  rng: random.Random) -> str:
    """The target model for an alias (weighted draw over served targets), else ``model``.

    ``served`` maps model names to their routes; a route whose ``candidates`` is empty (every
    worker down) is not served.
    """
    targets = aliases.get(model)
    if targets is None:
        return model
    # A target counts only while it has a routable worker (a route with candidates), as in
    # /v1/models: a split must not keep sending its share to a model that is down.
    live = [(m, w) for m, w in targets.items()
            if m in served and getattr(served[m], "candidates", True)]
    if not live:
        raise NoHealthyWorker(f"alias '{model}' has no served target (targets: {', '.join(targets)})")
    total = sum(w for _, w in live)
    x = rng.random() * total
    for target, weight in live:
        x -= weight
        if x < 0:
            return target
    return live[-1][0]
