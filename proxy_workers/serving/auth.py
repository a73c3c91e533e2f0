"""Client API keys and workers' upstream keys, in one proxy process (docs/api-keys.md).

Role: :class:`KeyGate` is the :class:`proxy_workers.contract.RequestGate` the client protocol
calls before it answers or routes any request: it refuses a request without a valid client key
(401, OpenAI's ``invalid_api_key``), names the client by its key's name, and takes the client's
credentials out of what a worker gets. :class:`UpstreamKeys` gives each worker that has a key of
its own (``api_key_env`` / ``api_key_file`` in its entry) that key, as ``Authorization: Bearer``:
through its HTTP pool's authority (:meth:`proxy_workers.forwarding.request.Request.wire` writes
``host: <authority>\\r\\n``, so the authority can carry one more header line) or as gRPC call
metadata (:mod:`proxy_workers.grpc.channels`). :func:`gate_for` builds the gate a snapshot calls for.

Invariants:
- Keys off, no upstream key: the gate is None, and a request pays one attribute check.
- A presented key is never compared with a key, byte by byte: its SHA-256 digest is looked up
  in a table of the keys' digests. That lookup's timing can tell at most how much of a *digest*
  matched, which says nothing about any key (using it would take a SHA-256 preimage); so it is
  as safe as :func:`hmac.compare_digest` over every digest, and costs O(1) instead of O(keys).
- No key, digest or upstream key is ever logged or put in an answer; refusals are logged (debug)
  with the request id, the peer and the reason only.
- ``/health`` and ``/readiness`` (load balancers' and orchestrators' probes) stay open.
- When the gate strips, a worker never sees the client's ``Authorization`` or ``X-API-Key``; a
  worker with an upstream key gets exactly one ``Authorization`` line, its own.
"""

from __future__ import annotations

import hashlib
import logging
from collections.abc import Iterable
from typing import TYPE_CHECKING, cast
from urllib.parse import urlsplit

from proxy_workers.errors import RouterError
from proxy_workers.forwarding.headers import without_fields
from shm.keys import KeySourceError, resolve

if TYPE_CHECKING:
    from proxy_workers.contract import ClientRequest
    from proxy_workers.forwarding.request import Request
    from proxy_workers.grpc.channels import GrpcChannels
    from proxy_workers.http.pools import Pools
    from shm.schema import ClientKey, Snapshot, Worker

log = logging.getLogger("shardgate.proxy")

OPEN_PATHS = frozenset({b"/health", b"/readiness"})
CREDENTIAL_FIELDS = frozenset({b"authorization", b"x-api-key"})
# Set by the gate to the name of the key a request presented (a client cannot set it: the gate
# drops the client's own); ``rate_limit_key: x-shardgate-key-name`` limits per key name.
KEY_NAME_FIELD = b"x-shardgate-key-name"
_MISSING = ("You didn't provide an API key. Send it as 'Authorization: Bearer YOUR_KEY' "
            "(or 'X-API-Key: YOUR_KEY').")
_WRONG = "Incorrect API key provided."


class InvalidApiKey(RouterError):
    """401: no client key, or one the router does not know (OpenAI's ``invalid_api_key``)."""

    status, type, code = 401, "invalid_request_error", "invalid_api_key"

    def headers(self) -> bytes:
        return b'www-authenticate: Bearer realm="shardgate"\r\n'  # RFC 9110 11.6.1: a 401 names its scheme


class KeyGate:
    """The request gate of a proxy whose snapshot has client keys or upstream keys."""

    __slots__ = ("names", "strip")

    def __init__(self, names: dict[bytes, bytes] | None, strip: bool) -> None:
        self.names = names  # key digest -> key name; None: no client key is required
        self.strip = strip  # take the client's credential fields out of what workers get

    def check(self, request: ClientRequest) -> None:
        if self.names is not None and request.path not in OPEN_PATHS:
            self._authenticate(request)
        if self.strip:
            # The client protocol hands a Request (ClientRequest does not name its upstream head).
            req = cast("Request", request)
            head = req.upstream_head
            # A cheap look first: most requests that reach here do carry one (the client's key).
            if b"authorization: " in head or b"x-api-key: " in head:
                req.upstream_head = b"".join(without_fields(head.splitlines(keepends=True),
                                                            CREDENTIAL_FIELDS))

    def _authenticate(self, request: ClientRequest) -> None:
        assert self.names is not None
        key, named = _presented(request.headers)
        if not key:
            log.debug("401 for request %s from %s: no API key", request.request_id.decode(),
                      request.peer.decode())
            raise InvalidApiKey(_MISSING)
        name = self.names.get(hashlib.sha256(key).digest())
        if name is None:
            log.debug("401 for request %s from %s: unknown API key", request.request_id.decode(),
                      request.peer.decode())
            raise InvalidApiKey(_WRONG)
        headers = request.headers
        if named:  # the client sent its own key-name field: it must not choose its identity
            headers[:] = [(n, v) for n, v in headers if n != KEY_NAME_FIELD]
        headers.append((KEY_NAME_FIELD, name))


def _presented(headers: Iterable[tuple[bytes, bytes]]) -> tuple[bytes, bool]:
    """(the key the request presents, or b""; whether it carries a key-name field of its own).

    ``Authorization: Bearer KEY`` first, else ``X-API-Key: KEY``; the first field of each counts.
    """
    bearer = api = b""
    named = False
    for name, value in headers:
        if name == b"authorization":
            if not bearer:
                value = value.strip()
                if value[:7].lower() == b"bearer ":
                    bearer = value[7:].strip()
        elif name == b"x-api-key":
            if not api:
                api = value.strip()
        elif name == KEY_NAME_FIELD:
            named = True
    return bearer or api, named


def gate_for(snapshot: Snapshot, upstream_keys: bool, previous: KeyGate | None) -> KeyGate | None:
    """The gate a snapshot calls for (None: keys off and no worker has a key of its own).

    The client's credentials are stripped when keys are on (unless ``forward_authorization``),
    and whenever some worker has an upstream key: the pool that adds a worker's Authorization
    line cannot take the client's out, and which worker a request goes to is not known here.
    """
    keys = snapshot.client_keys
    strip = upstream_keys or (bool(keys) and not snapshot.settings.forward_authorization)
    if not keys and not strip:
        return None
    names = _names(keys) if keys else None
    if previous is not None and previous.names == names and previous.strip == strip:
        return previous
    return KeyGate(names, strip)


def _names(keys: Iterable[ClientKey]) -> dict[bytes, bytes]:
    # The coordinator refuses one key listed twice (shm.keys.client_keys): digests are unique.
    return {bytes.fromhex(k.sha256): k.name.encode() for k in keys}


class UpstreamKeys:
    """Which workers of this proxy carry an upstream key now, and how it was set."""

    __slots__ = ("keyed", "problems")

    def __init__(self) -> None:
        self.keyed: set[str] = set()  # worker URLs whose pool or channel carries a key now
        self.problems: dict[str, str] = {}  # url -> the last problem logged (logged once each)

    def apply(self, workers: Iterable[Worker], pools: Pools, channels: GrpcChannels) -> bool:
        """Give each worker its key (re-read now: a rotated key file is taken at the next snapshot);
        take keys away from workers that no longer have one. True when some worker has a key."""
        resolved: dict[str, str | None] = {}  # ref -> key (None: unusable), read once per snapshot
        keyed: set[str] = set()
        for w in workers:
            ref = w.api_key_ref
            if not ref:
                continue
            if ref not in resolved:
                resolved[ref] = self._resolve(w.url, ref)
            key = resolved[ref]
            keyed.add(w.url)
            self._set(w, key, pools, channels)
        for url in self.keyed - keyed:
            if url in pools.pools:
                pools.pools[url].authority = urlsplit(url).netloc.encode()
            channels.set_key(url, None)
        self.keyed = keyed
        return bool(keyed)

    def _resolve(self, url: str, ref: str) -> str | None:
        try:
            key = resolve(ref)
        except KeySourceError as exc:
            problem = str(exc)
            if self.problems.get(url) != problem:
                self.problems[url] = problem
                # The worker will likely answer 401; the operator learns why here (never the key).
                log.warning("worker %s: its upstream key is unusable (%s); sending none", url, problem)
            return None
        self.problems.pop(url, None)
        return key

    @staticmethod
    def _set(worker: Worker, key: str | None, pools: Pools, channels: GrpcChannels) -> None:
        if worker.connection == "grpc":
            channels.set_key(worker.url, key)
            return
        netloc = urlsplit(worker.url).netloc.encode()
        # The one extra line rides on the Host line (Request.wire writes "host: <authority>\r\n");
        # resolve() admits printable ASCII without spaces only, so no CR or LF can get in.
        pools.get(worker.url).authority = netloc if key is None else \
            netloc + b"\r\nauthorization: Bearer " + key.encode()
