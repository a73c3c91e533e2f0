"""Worker URL validation against SSRF, for workers that arrive over the network.

Role: decide whether a worker URL supplied by the admin API, the service registry or etcd may
enter the fleet. The config file and ``--worker`` flags are the operator's own input and only get
:func:`coordinator.config.check_worker`'s shape checks; everything here is on top of those.

Rules (the controls recommended after the FastChat / AReaL / sgl-router "add worker" findings):
- Scheme allowlist: http, https, grpc, grpcs. ``file://``, ``gopher://`` and friends are refused.
- Every address the host resolves to is checked; one bad address refuses the URL (a name that
  resolves to a metadata address among others is still a way in).
- Never allowed: link-local (169.254.0.0/16, fe80::/10, which hold the cloud metadata services),
  the known metadata addresses outside it (fd00:ec2::254, 100.100.100.200), unspecified
  (0.0.0.0, ::), multicast, broadcast and reserved ranges.
- With ``worker_cidrs`` set, every address must also fall inside one of those networks.
  Loopback and private ranges are otherwise allowed: routers commonly run next to their workers.

Invariant: :func:`check_url` never raises for bad input; it returns the reason, and callers turn
it into a 400 (admin API) or a notice (registry, etcd). Name resolution goes through the event
loop's resolver with a small cache, so a registry of hundreds of workers costs one lookup each per
``RESOLVE_TTL`` at most. The check happens when a worker enters; a name that later re-resolves
elsewhere (DNS rebinding) is not re-checked per request, which is why ``worker_cidrs`` exists.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
import time
from urllib.parse import urlsplit

ALLOWED_SCHEMES = frozenset({"http", "https", "grpc", "grpcs"})
METADATA = (ipaddress.ip_network("fd00:ec2::254/128"), ipaddress.ip_network("100.100.100.200/32"))
RESOLVE_TTL = 60.0
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_cidrs(text: str) -> tuple[Network, ...]:
    """The ``worker_cidrs`` setting; raises ValueError naming the bad entry."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            out.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ValueError(f"worker_cidrs: '{part}' is not a network (like 10.0.0.0/8)") from None
    return tuple(out)


def address_problem(ip: IPAddress, cidrs: tuple[Network, ...]) -> str:
    """Why ``ip`` may not be a worker address ("" when it may)."""
    mapped = getattr(ip, "ipv4_mapped", None)
    if mapped is not None:  # ::ffff:169.254.169.254 is the metadata address too
        ip = mapped
    if ip.is_link_local:
        return f"{ip} is link-local (cloud metadata services live there)"
    if any(ip in net for net in METADATA if net.version == ip.version):
        return f"{ip} is a cloud metadata address"
    if ip.is_unspecified:
        return f"{ip} is the unspecified address"
    if ip.is_multicast:
        return f"{ip} is multicast"
    if ip.version == 4 and ip == ipaddress.IPv4Address("255.255.255.255"):
        return f"{ip} is the broadcast address"
    if ip.is_reserved and not ip.is_loopback:  # ::1 sits inside IPv6's reserved ::/8
        return f"{ip} is in a reserved range"
    if cidrs and not any(ip in net for net in cidrs if net.version == ip.version):
        return f"{ip} is outside worker_cidrs"
    return ""


def shape_problem(url: str) -> tuple[str, str]:
    """(problem, host): the scheme and host checks that need no resolver."""
    try:
        parts = urlsplit(url)
        parts.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        return f"url '{url}' is not a valid URL", ""
    if parts.scheme not in ALLOWED_SCHEMES:
        return (f"url '{url}': scheme '{parts.scheme or '(none)'}' is not allowed "
                f"(only {', '.join(sorted(ALLOWED_SCHEMES))})"), ""
    if not parts.hostname:
        return f"url '{url}' has no host", ""
    if parts.username or parts.password:
        return f"url '{url}' must not carry credentials", ""
    return "", parts.hostname


class UrlChecker:
    """Checks URLs with a resolver cache; one per coordinator."""

    def __init__(self, cidrs: tuple[Network, ...] = ()) -> None:
        self.cidrs = cidrs
        self._cache: dict[str, tuple[float, tuple[IPAddress, ...] | str]] = {}

    async def check_url(self, url: str) -> str:
        """Empty string when ``url`` may be a worker, else the reason."""
        problem, host = shape_problem(url)
        if problem:
            return problem
        try:
            addresses: tuple[IPAddress, ...] | str = (ipaddress.ip_address(host),)
        except ValueError:
            addresses = await self._resolve(host)
        if isinstance(addresses, str):
            return f"url '{url}': {addresses}"
        for ip in addresses:
            why = address_problem(ip, self.cidrs)
            if why:
                return f"url '{url}': {why}"
        return ""

    async def _resolve(self, host: str) -> tuple[IPAddress, ...] | str:
        now = time.monotonic()
        hit = self._cache.get(host)
        if hit is not None and now - hit[0] < RESOLVE_TTL:
            return hit[1]
        result: tuple[IPAddress, ...] | str
        try:
            infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
            # Strip an IPv6 zone ("fe80::1%eth0"): ip_address refuses it and the zone is irrelevant.
            result = tuple(dict.fromkeys(ipaddress.ip_address(str(i[4][0]).split("%")[0]) for i in infos))
            if not result:
                result = f"host '{host}' resolves to no address"
        except (OSError, UnicodeError) as exc:
            result = f"cannot resolve host '{host}': {exc}"
        if len(self._cache) > 4096:  # a registry full of junk names must not grow this forever
            self._cache.clear()
        self._cache[host] = (now, result)
        return result
