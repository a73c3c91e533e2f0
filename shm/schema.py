"""The routing snapshot: what the coordinator publishes and every proxy reads.

Role: msgspec Structs shared by both sides, byte for byte. The coordinator builds one complete
:class:`Snapshot`, encodes it once and publishes it (``shm.snapshot``); proxies decode it only when
the generation counter moved.

Invariants:
- ``SCHEMA_VERSION`` changes only when a change is not backward compatible; every field added later
  has a default, so a newer reader takes an older snapshot. The reverse does not hold: the
  Structs refuse unknown fields, since the same Structs validate config files, where an unknown
  key is a typo. No reader ever meets a newer writer: each coordinator has its own segments
  (named by its instance id), and an upgrade starts a whole new generation, coordinator and
  proxies, beside the old one (``coordinator.succession``).
- ``Snapshot.schema`` is the compatibility rule: a reader takes a snapshot only when its ``schema``
  equals the reader's ``SCHEMA_VERSION`` (``shm.snapshot``). So that any reader can tell which
  version it was handed, the field keeps its name, its type (int) and its place (first) in every
  version, whatever else changes; :func:`schema_of` reads it alone.
- A worker's ``slot`` is stable for the life of the coordinator: it indexes the worker's column in
  the load board (``shm.loadboard``). Slots are reused only after a worker is gone.
- ``models`` maps a model name to the slots of the workers that serve it, healthy or not; proxies
  filter on ``healthy``/``draining`` themselves, so a health flip is one field, not a re-index.
"""

from __future__ import annotations

from typing import Literal

import msgspec

from shm.hashing import Ring
from shm.settings import PdDialect, Policy, Settings

SCHEMA_VERSION = 1

WorkerType = Literal["regular", "prefill", "decode"]
Connection = Literal["http", "grpc"]


class Quota(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """A worker's budget per minute (0 = unlimited), used by the quota_aware policy."""

    requests_per_minute: int = 0
    tokens_per_minute: int = 0


class WorkerSpec(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """One worker as an operator declares it (config file, CLI or admin API)."""

    url: str
    model: str | None = None
    type: WorkerType = "regular"
    connection: Connection = "http"
    weight: int = 1
    labels: dict[str, str] = {}
    shard: str | None = None
    quota: Quota | None = None
    # SGLang PD: the prefill worker's bootstrap port (None: the engine's default).
    bootstrap_port: int | None = None
    # Most requests in flight to this worker across all proxies (0 = no cap); a policy passes a
    # worker at its cap over, and a request whose every candidate is at its cap waits in the
    # admission queue (docs/overload.md).
    max_concurrency: int = 0
    # The worker's own API key, sent as "Authorization: Bearer KEY" instead of the client's: the
    # name of an environment variable the proxies inherit, or a file whose first line is the key.
    # References only: a key itself is never written in a worker entry (docs/api-keys.md). Only
    # the config file and the command line may set them (a registrant could name any secret).
    api_key_env: str | None = None
    api_key_file: str | None = None


class Worker(msgspec.Struct, frozen=True, kw_only=True, array_like=True, gc=False):
    """One worker as proxies see it."""

    slot: int
    url: str
    models: tuple[str, ...] = ()
    type: WorkerType = "regular"
    connection: Connection = "http"
    weight: int = 1
    labels: dict[str, str] = {}
    shard: str | None = None
    healthy: bool = True
    draining: bool = False
    # Why the coordinator considers the worker unhealthy (empty when healthy).
    health_reason: str = ""
    quota_rpm: int = 0
    quota_tpm: int = 0
    # Taken out of rotation by passive health (the data plane's failures); healthy is False too.
    ejected: bool = False
    # SGLang PD bootstrap port of a prefill worker (None: not announced).
    bootstrap_port: int | None = None
    # WorkerSpec.max_concurrency (0: no cap).
    max_concurrency: int = 0
    # Where each proxy reads the worker's upstream key: "env:NAME", "file:PATH", or "" (none).
    # A reference, never the key. Last, with a default: array_like order.
    api_key_ref: str = ""


class ModelPolicy(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """Per-model overrides (config file ``models:`` section)."""

    policy: Policy | None = None
    # Prefill/decode: each side may have its own policy, and the PD protocol the model's engines
    # speak. None: not set for this model, so the fallbacks apply (the global settings of the
    # same names; the order is proxy_workers.routing.table's). pd_dialect must stay Optional: a
    # model that says "two_phase" outright wins over a global "bootstrap".
    prefill_policy: Policy | None = None
    decode_policy: Policy | None = None
    pd_dialect: PdDialect | None = None


class ClientKey(msgspec.Struct, frozen=True, kw_only=True, array_like=True):
    """One client API key as proxies see it: its name (for logs) and the SHA-256 digest of the
    key (hex). The key itself never enters a snapshot (docs/api-keys.md)."""

    name: str
    sha256: str


class Snapshot(msgspec.Struct, frozen=True, kw_only=True):
    """Everything a proxy needs to route, published as one unit."""

    # First, an int, named "schema", in every version (see the module invariants).
    schema: int = SCHEMA_VERSION
    generation: int = 0
    created_at: float = 0.0
    coordinator_pid: int = 0
    proxies: int = 0
    settings: Settings = Settings()
    workers: tuple[Worker, ...] = ()
    models: dict[str, tuple[int, ...]] = {}
    model_policies: dict[str, ModelPolicy] = {}
    # Problems the operator should see (discovery failures and the like), shown by /workers.
    notices: tuple[str, ...] = ()
    # Router name (http_regular, http_pd, grpc_regular, grpc_pd) -> the models it serves.
    routers: dict[str, tuple[str, ...]] = {}
    # Model -> shard name -> slots; a model without shards is absent.
    shards: dict[str, dict[str, tuple[int, ...]]] = {}
    # Model -> consistent-hash ring over its shard names (sharded models) or worker URLs.
    rings: dict[str, Ring] = {}
    # Alias -> {target model: weight}: traffic splitting between models.
    aliases: dict[str, dict[str, float]] = {}
    # Discovery source (file, registry, etcd, admin) -> its current error; "" while it is fine.
    sources: dict[str, str] = {}
    # Client API keys (digests and names); empty: the router needs no key. ``settings.api_key``
    # is always empty in a published snapshot: its digest is one of these.
    client_keys: tuple[ClientKey, ...] = ()
    # Model -> its block in the load board's per-model figures (1..max_models, shm.histograms):
    # assigned by the coordinator in order of first sight, never reassigned while it runs; a
    # model past max_models has none (counted under model="other", block 0).
    model_index: dict[str, int] = {}


SNAPSHOT_ENCODER = msgspec.msgpack.Encoder()


def encode_snapshot(snapshot: Snapshot) -> bytes:
    return SNAPSHOT_ENCODER.encode(snapshot)


def snapshot_decoder() -> msgspec.msgpack.Decoder[Snapshot]:
    """A decoder for one reader; build once per process (msgspec caches the type plan)."""
    return msgspec.msgpack.Decoder(Snapshot)


class _SchemaOnly(msgspec.Struct):
    """The one field every snapshot version shares; the decoder skips all the others unread."""

    schema: int | None = None


_SCHEMA_ONLY_DECODER = msgspec.msgpack.Decoder(_SchemaOnly)


def schema_of(payload: bytes) -> int | None:
    """The schema version an encoded snapshot declares, however its other fields look.

    None when the payload declares none or is not a msgpack map at all (not a snapshot of any
    version). Costs a pass over the bytes (about a seventh of a full decode), so readers call it
    only to explain a payload they could not take, never on the way to taking one.
    """
    try:
        return _SCHEMA_ONLY_DECODER.decode(payload).schema
    except (msgspec.DecodeError, UnicodeDecodeError):
        return None
