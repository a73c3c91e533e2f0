"""``shardgate registry``: the seed design's HTTP service registry, small and in memory.

Role: workers (or the babysitters next to them) register and heartbeat; routers poll
``GET /services`` (``registry_url`` setting, every ``registry_interval``) and add or, after
``registry_grace``, remove workers. Several routers may poll one registry.

API (JSON bodies and answers; errors are ``{"error": {"message", "code"}}`` with a status):

    POST /register     {url | host + port, model?, models?, type?, weight?, labels?, shard?,
                        name?, babysitter_url?}  -> 200 {"url", "ttl"}; registering again refreshes
    POST /heartbeat    {url} -> 200, or 404 when unknown or expired: register again
    POST /unregister   {url} -> 200, or 404
    GET  /services     {"services": [entry + "last_heartbeat" (unix time)]}, live entries only
    GET  /health       {"status": "ok", "services": N}

Invariants:
- An entry lives ``--ttl`` seconds (default 30: three missed heartbeats at the seed's 10 s) after
  its last register or heartbeat; expired entries are dropped on every read and write.
- With ``--token-file`` the writes (register, heartbeat, unregister) need
  ``Authorization: Bearer <token>`` (constant-time compare); reads stay open, since routers only
  read. Either way routers validate every URL they take from here (scheme, metadata addresses,
  ``worker_cidrs``).
- State is in memory: after a restart, workers re-register at their next heartbeat (404 tells
  them to), well within the routers' grace period.
"""

from __future__ import annotations

import argparse
import asyncio
import hmac
import signal
import sys
import time
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from aiohttp import web

MAX_BODY = 64 * 1024
KNOWN = ("url", "model", "models", "type", "weight", "labels", "shard", "name", "babysitter_url",
         "connection", "metadata")


def _error(status: int, message: str, code: str) -> web.Response:
    return web.json_response({"error": {"message": message, "code": code}}, status=status)


class Registry:
    def __init__(self, ttl: float, token: bytes | None = None) -> None:
        self.ttl = ttl
        self.token = token
        self.entries: dict[str, dict[str, Any]] = {}
        self.seen: dict[str, float] = {}  # url -> monotonic time of the last register / heartbeat

    def expire(self) -> None:
        now = time.monotonic()
        for url in [u for u, at in self.seen.items() if now - at > self.ttl]:
            del self.seen[url], self.entries[url]

    def _authorized(self, request: web.Request) -> bool:
        if self.token is None:
            return True
        scheme, _, given = request.headers.get("Authorization", "").partition(" ")
        return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), self.token)

    async def _body(self, request: web.Request) -> dict[str, Any] | web.Response:
        if not self._authorized(request):
            return _error(401, "missing or invalid bearer token", "unauthorized")
        try:
            body = await request.json()
        except ValueError:
            return _error(400, "request body is not valid JSON", "invalid_json")
        if not isinstance(body, dict):
            return _error(400, "request body must be a JSON object", "invalid_body")
        return body

    @staticmethod
    def _url(body: dict[str, Any]) -> str | None:
        url = body.get("url")
        if not url and body.get("host") and body.get("port"):
            url = f"http://{body['host']}:{body['port']}"
        if not isinstance(url, str):
            return None
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https", "grpc", "grpcs") or not parts.hostname:
            return None
        return url.rstrip("/")

    async def register(self, request: web.Request) -> web.Response:
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        url = self._url(body)
        if url is None:
            return _error(400, "give 'url' (http://host:port) or 'host' and 'port'", "invalid_url")
        self.expire()
        self.entries[url] = {k: v for k, v in body.items() if k in KNOWN} | {"url": url}
        self.seen[url] = time.monotonic()
        return web.json_response({"url": url, "ttl": self.ttl})

    async def _registered(self, request: web.Request, missing: str) -> str | web.Response:
        """The URL of a live registered entry named by the request body, or the error answer."""
        body = await self._body(request)
        if isinstance(body, web.Response):
            return body
        url = self._url(body)
        self.expire()
        if url is None or url not in self.entries:
            return _error(404, missing, "unknown_service")
        return url

    async def heartbeat(self, request: web.Request) -> web.Response:
        url = await self._registered(request, "not registered (or expired): register again")
        if isinstance(url, web.Response):
            return url
        self.seen[url] = time.monotonic()
        return web.json_response({"url": url, "ttl": self.ttl})

    async def unregister(self, request: web.Request) -> web.Response:
        url = await self._registered(request, "not registered")
        if isinstance(url, web.Response):
            return url
        del self.entries[url], self.seen[url]
        return web.json_response({"url": url, "removed": True})

    async def services(self, request: web.Request) -> web.Response:
        self.expire()
        now, wall = time.monotonic(), time.time()
        out = [entry | {"last_heartbeat": wall - (now - self.seen[url])}
               for url, entry in self.entries.items()]
        return web.json_response({"services": out})

    async def health(self, request: web.Request) -> web.Response:
        self.expire()
        return web.json_response({"status": "ok", "services": len(self.entries)})


def build_app(registry: Registry) -> web.Application:
    app = web.Application(client_max_size=MAX_BODY)
    app.add_routes([web.post("/register", registry.register), web.post("/heartbeat", registry.heartbeat),
                    web.post("/unregister", registry.unregister), web.get("/services", registry.services),
                    web.get("/health", registry.health)])
    return app


async def serve(host: str, port: int, registry: Registry) -> int:
    runner = web.AppRunner(build_app(registry), access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
    except OSError as exc:
        print(f"shardgate registry: cannot listen on {host}:{port}: {exc.strerror or exc}", file=sys.stderr)
        await runner.cleanup()
        return 1
    bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    shown = f"[{host}]" if ":" in host else host
    print(f"shardgate registry ready on http://{shown}:{bound} ttl={registry.ttl:g}s", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="shardgate registry", description=__doc__.split("\n\n")[0])
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1)")
    p.add_argument("--port", type=int, default=8081, help="port (default 8081, as in the seed; 0 picks one)")
    p.add_argument("--ttl", type=float, default=30.0,
                   help="seconds an entry lives after its last register or heartbeat (default 30)")
    p.add_argument("--token-file", help="require 'Authorization: Bearer <token>' (this file's content) "
                                        "for register, heartbeat and unregister")
    args = p.parse_args(argv)
    if args.ttl <= 0:
        p.error("--ttl must be > 0")
    token = None
    if args.token_file:
        try:
            token = Path(args.token_file).read_text().strip().encode() or None
        except OSError as exc:
            p.error(f"--token-file {args.token_file}: {exc.strerror}")
    return asyncio.run(serve(args.host, args.port, Registry(args.ttl, token)))


if __name__ == "__main__":
    sys.exit(main())
