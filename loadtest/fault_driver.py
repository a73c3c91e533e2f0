"""Fault driver: a real router under load while it is reloaded, killed, starved and stopped.

Starts three mock workers and ``shardgate serve`` (the real CLI, ``--proxies 2`` by default, a
config file) on 127.0.0.1, runs load against it and acts on it, one phase at a time. Each phase
gets a fresh fleet (workers and router), so its counts are its own:

1. ``baseline``     no action;
2. ``reload``       rewrite the config file and SIGHUP the coordinator three times (add a fourth
                    worker, remove one of the first three, restore the original list);
3. ``proxy``        SIGKILL one proxy process (a psutil child of the coordinator);
4. ``worker``       SIGKILL one worker, start a replacement on the same port, time until the
                    replacement gets traffic again (its ``/mock/stats`` requests grow);
5. ``stall``        ``POST /mock/config {"stall": true}`` on one worker; time until the router
                    ejects it as stalled (``GET /workers``: ``ejected``, "stalled" in
                    ``health_reason``) and until it stops sending to it (``/mock/stats``);
6. ``coordinator``  SIGKILL the coordinator only; keep the load on for ``--orphan-seconds``
                    and watch whether the orphaned proxies keep serving; then (unless
                    ``--no-return``) start a new router with the same command line, which takes
                    over: its proxies serve, it SIGTERMs the orphans, they drain. The takeover
                    is its own row, ``coordinator return`` (time until the orphans exited);
7. ``upgrade``      SIGUSR2 to the coordinator: it starts a successor generation (same command
                    line) that SIGTERMs it once its proxies serve; time until the old coordinator
                    and its proxies exited. The successor is stopped with the fleet;
8. ``overload``     a router with ``--max-concurrent-requests``/``--queue-size``/``--queue-timeout``
                    (--overload-*, 8/8/2 s) and workers paced to ~0.4 s a request; light load
                    (fewer keep-alive clients than the cap), then more than cap + queue. Two rows;
                    429 and 503 are counted apart as rejections (with or without Retry-After),
                    and the admitted requests' p50/p99 latency is compared;
9. ``stop``         SIGTERM to the coordinator under load; failures and resets are counted apart
                    from connections refused once the listener has gone.

Load (one asyncio process, raw HTTP/1.1 over asyncio streams, so the client side stays light):
``--clients`` keep-alive loops (one persistent connection each, POST /v1/chat/completions),
``--streams`` streaming loops (``"stream": true``, SSE read to ``data: [DONE]``) and ``--storm``
loops opening a fresh connection per request (``Connection: close``). Each phase runs
``--seconds`` of load before its action and ``--seconds`` after it (the coordinator phase
``--orphan-seconds`` after it); every request is bounded by ``--timeout``, every phase by
``--max-requests``. The overload phase runs ``--overload-seconds`` of each load instead.

    PYTHONPATH=. python3 loadtest/fault_driver.py [--phase NAME] [--seconds 4] [--proxies 2]
        [--clients 16] [--streams 8] [--storm 8] [--orphan-seconds 20] [--no-return]
        [--overload-max 8] [--overload-queue 8] [--overload-clients 48]

Prints a table (one row per phase, then per-phase notes) and, last, one JSON object on one line.
The driver reports what it observes and does not judge: it exits 0 unless it failed itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import math
import os
import shlex
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import urllib.request
from collections import Counter
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import psutil
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from shardgate import launch

HOST = "127.0.0.1"
MODEL = "m1"
PHASES = ("baseline", "reload", "proxy", "worker", "stall", "coordinator", "upgrade", "overload", "stop")
TITLES = {"baseline": "baseline", "reload": "reload x3", "proxy": "proxy SIGKILL",
          "worker": "worker SIGKILL", "stall": "stalled worker", "coordinator": "coordinator SIGKILL",
          "coordinator_return": "coordinator return", "upgrade": "upgrade (SIGUSR2)",
          "overload_light": "overload: light", "overload": "overload", "stop": "stop (SIGTERM)"}
FAILURES = ("reset", "closed", "timeout", "http", "stream", "other")  # failure kinds, in table order
LOADS = ("keepalive", "stream", "storm")
FAILURE_PAUSE = 0.05  # a loop's pause after a failure, so an instant error cannot spin a core
REFUSED_PAUSE = 0.1   # and after a refused connection (nothing listens)


# --- a minimal HTTP/1.1 client ----------------------------------------------------------------


class Closed(Exception):
    """The server closed the connection (EOF, no reset) before the response was complete."""

    def __init__(self, where: str, body: bytes = b"") -> None:
        super().__init__(where)
        self.body = body  # what arrived of the body (a cut stream may still carry its event: error)


class Progress:
    """How far one request got: connect, head (sent, awaiting the response head), body."""

    __slots__ = ("stage",)

    def __init__(self, stage: str) -> None:
        self.stage = stage


class Reply(NamedTuple):
    status: int
    close: bool  # the server will close the connection after this response
    body: bytes
    headers: dict[str, str]  # names in lower case


def request_bytes(port: int, stream: bool, close: bool) -> bytes:
    body = json.dumps({"model": MODEL, "stream": stream,
                       "messages": [{"role": "user", "content": "tell me a story"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: {HOST}:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n")
    return head.encode() + body


async def read_reply(reader: asyncio.StreamReader, progress: Progress) -> Reply:
    progress.stage = "head"
    try:
        head = await reader.readuntil(b"\r\n\r\n")
    except asyncio.IncompleteReadError as exc:
        raise Closed("before the response" if not exc.partial else "in the response head") from None
    progress.stage = "body"
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split(" ", 2)[1])
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if sep:
            headers[name.strip().lower()] = value.strip()
    close = "close" in headers.get("connection", "").lower()
    parts: list[bytes] = []
    try:
        if "chunked" in headers.get("transfer-encoding", "").lower():
            while True:
                size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
                if size == 0:
                    while await reader.readuntil(b"\r\n") != b"\r\n":  # trailers
                        pass
                    break
                parts.append((await reader.readexactly(size + 2))[:-2])
            body = b"".join(parts)
        elif "content-length" in headers:
            body = await reader.readexactly(int(headers["content-length"]))
        else:
            body, close = await reader.read(), True
    except asyncio.IncompleteReadError:
        raise Closed("in the response body", b"".join(parts)) from None
    return Reply(status, close, body, headers)


def error_code(body: bytes) -> str:
    """The ``error.code`` of an OpenAI-shaped error body, or "?"."""
    try:
        return str(json.loads(body)["error"]["code"])
    except (ValueError, KeyError, TypeError):
        return "?"


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def judge(reply: Reply, stream: bool) -> str:
    if not 200 <= reply.status < 300:
        return "http"
    if stream and (b"event: error" in reply.body or b"data: [DONE]" not in reply.body):
        return "stream"
    return "ok"


def classify(exc: BaseException) -> str:
    if isinstance(exc, ConnectionRefusedError):
        return "refused"
    if isinstance(exc, ConnectionResetError | BrokenPipeError):
        return "reset"
    if isinstance(exc, Closed):
        return "closed"
    if isinstance(exc, TimeoutError):
        return "timeout"
    if isinstance(exc, OSError) and exc.errno in (errno.ECONNRESET, errno.EPIPE):
        return "reset"
    if isinstance(exc, OSError) and exc.errno == errno.ECONNREFUSED:
        return "refused"
    return "other"


# --- load -------------------------------------------------------------------------------------


@dataclass
class Tally:
    """Outcomes of one phase's requests: ok, refused, or a failure kind (FAILURES)."""

    outcomes: Counter[tuple[str, str]] = field(default_factory=Counter)  # (load, outcome)
    after_action: Counter[str] = field(default_factory=Counter)  # outcomes ending after the action
    statuses: Counter[int] = field(default_factory=Counter)  # non-2xx statuses seen
    other: Counter[str] = field(default_factory=Counter)  # exception names behind "other"
    ok_per_second: Counter[int] = field(default_factory=Counter)  # second since load start -> ok
    connects: Counter[str] = field(default_factory=Counter)  # load -> connections opened
    where: Counter[str] = field(default_factory=Counter)  # reset/closed/timeout: load, connection, stage
    latencies: dict[str, list[float]] = field(default_factory=dict)  # load -> seconds of each ok request
    rejections: bool = False  # 429 and 503 are rejections (outcomes "429"/"503"), not failures
    rejected: Counter[str] = field(default_factory=Counter)  # "503 queue_full": status and error.code
    no_retry_after: Counter[str] = field(default_factory=Counter)  # rejections without Retry-After
    began: float = field(default_factory=time.monotonic)
    ended: float | None = None

    def total(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.outcomes.items() if o == outcome)

    def summary(self) -> dict[str, Any]:
        sent = sum(self.outcomes.values())
        ok, refused = self.total("ok"), self.total("refused")
        kinds = {k: self.total(k) for k in FAILURES}
        by_load = {load: {o: n for (ld, o), n in sorted(self.outcomes.items()) if ld == load}
                   for load in LOADS}
        after_failed = sum(n for o, n in self.after_action.items() if o in FAILURES)
        rejections: dict[str, Any] = {}
        if self.rejections:
            rejections = {"r429": self.total("429"), "r503": self.total("503"),
                          "rejected": dict(sorted(self.rejected.items())),
                          "rejected_without_retry_after": dict(self.no_retry_after)}
        latency = {load: {"n": len(v), "p50_ms": ms(percentile(v, 0.5)), "p99_ms": ms(percentile(v, 0.99))}
                   for load, v in self.latencies.items() if v}
        return {"sent": sent, "ok": ok, "failed": sum(kinds.values()), **kinds, "refused": refused,
                **rejections, "failed_after_action": after_failed, "by_load": by_load,
                "ok_latency": latency,
                "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
                "other_errors": dict(self.other), "connections_opened": dict(self.connects),
                "failure_detail": dict(sorted(self.where.items()))}


def ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


class Load:
    """The client loops of one phase against the router on ``port``.

    ``loops`` (keep-alive, stream, storm) defaults to --clients, --streams, --storm. With
    ``rejections`` a 429 or 503 is counted apart (outcomes "429"/"503") instead of as a failure.
    """

    def __init__(self, port: int, args: argparse.Namespace, loops: tuple[int, int, int] | None = None,
                 rejections: bool = False) -> None:
        self.port = port
        self.args = args
        self.loops = loops or (args.clients, args.streams, args.storm)
        self.tally = Tally(rejections=rejections)
        self.started = time.monotonic()
        self.action_at: float | None = None
        self.stopping = False
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.started = self.tally.began = time.monotonic()
        clients, streams, storm = self.loops
        specs = ([("keepalive", False, True)] * clients + [("stream", True, True)] * streams
                 + [("storm", False, False)] * storm)
        self.tasks = [asyncio.create_task(self.loop(*spec)) for spec in specs]

    def mark_action(self) -> None:
        self.action_at = time.monotonic()

    def split(self) -> Tally:
        """End the current tally and count from now on in a new one (the load goes on): a phase
        with two parts reports each as its own row. A request in flight counts where it ends."""
        old = self.tally
        old.ended = self.action_at = time.monotonic()
        self.tally = Tally(rejections=old.rejections, began=old.ended)
        return old

    def running(self) -> bool:
        return not self.stopping and sum(self.tally.outcomes.values()) < self.args.max_requests

    def record(self, load: str, outcome: str, began: float) -> None:
        now = time.monotonic()
        tally = self.tally
        tally.outcomes[load, outcome] += 1
        if self.action_at is not None and now >= self.action_at:
            tally.after_action[outcome] += 1
        if outcome == "ok":
            tally.ok_per_second[int(now - self.started)] += 1
            tally.latencies.setdefault(load, []).append(now - began)

    def ok_rate(self, start: float, end: float) -> float:
        """ok responses per second over [start, end) (monotonic times, whole seconds)."""
        first, last = int(start - self.started), int(end - self.started)
        if last <= first:
            return 0.0
        return sum(self.tally.ok_per_second[s] for s in range(first, last)) / (last - first)

    async def loop(self, load: str, stream: bool, keep: bool) -> None:
        request = request_bytes(self.port, stream, close=not keep)
        reader: asyncio.StreamReader | None = None
        writer: asyncio.StreamWriter | None = None
        while self.running():
            if writer is not None and (reader is None or reader.at_eof() or writer.is_closing()):
                # Closed by the server while idle and noticed before sending: any pooled HTTP
                # client reconnects here without an error, so this is no failure.
                writer.transport.abort()
                reader = writer = None
            fresh = reader is None or writer is None
            progress = Progress("connect")
            began = time.monotonic()
            try:
                async with asyncio.timeout(self.args.timeout):
                    if reader is None or writer is None:
                        self.tally.connects[load] += 1
                        reader, writer = await asyncio.open_connection(HOST, self.port)
                    writer.write(request)
                    reply = await read_reply(reader, progress)
                outcome = judge(reply, stream)
                if outcome == "http" and self.tally.rejections and reply.status in (429, 503):
                    outcome = str(reply.status)
                    self.tally.rejected[f"{outcome} {error_code(reply.body)}"] += 1
                    if not reply.headers.get("retry-after"):
                        self.tally.no_retry_after[outcome] += 1
                elif outcome == "http":
                    self.tally.statuses[reply.status] += 1
                # a rejection is a complete answer: the connection stays unless the server closes it
                done = reply.close or not keep or outcome not in ("ok", "429", "503")
            except Exception as exc:
                outcome, done = classify(exc), True
                if outcome in ("reset", "closed", "timeout"):
                    stage = {"connect": "connecting", "head": "before the response head",
                             "body": "in the response body"}[progress.stage]
                    conn = "new connection" if fresh else "reused connection"
                    errored = isinstance(exc, Closed) and b"event: error" in exc.body
                    cut = " (after an event: error)" if errored else ""
                    self.tally.where[f"{load} {outcome} on a {conn} {stage}{cut}"] += 1
                if outcome == "other":
                    self.tally.other[f"{type(exc).__name__}: {exc}"[:120]] += 1
            if done and writer is not None:
                writer.transport.abort() if outcome not in ("ok", "429", "503") else writer.close()
                reader = writer = None
            self.record(load, outcome, began)
            if outcome == "refused":
                await asyncio.sleep(REFUSED_PAUSE)
            elif outcome != "ok":
                await asyncio.sleep(FAILURE_PAUSE)
        if writer is not None:
            writer.close()

    async def stop(self) -> None:
        """Let every loop finish its request in progress (bounded by --timeout), then end it."""
        self.stopping = True
        if self.tasks:
            _, pending = await asyncio.wait(self.tasks, timeout=self.args.timeout + 2)
            for task in pending:
                task.cancel()
            await asyncio.gather(*self.tasks, return_exceptions=True)
        self.tally.ended = time.monotonic()


# --- the fleet: mock workers and the router ---------------------------------------------------


def url_port(url: str) -> int:
    return int(url.rsplit(":", 1)[1].rstrip("/"))


def get_json(url: str, timeout: float = 2.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def post_json(url: str, payload: Any, timeout: float = 2.0) -> Any:
    req = urllib.request.Request(url, data=json.dumps(payload).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        return json.loads(resp.read())


def worker_requests(url: str) -> int | None:
    try:
        return int(get_json(url + "/mock/stats")["requests"])
    except (OSError, ValueError, KeyError):
        return None


class Fleet:
    """Three mock workers and a router started from a config file, all on loopback.

    ``ttft``/``tps`` override the workers' pace; ``router_extra`` is added to ``--router-args``.
    Routers started during a phase (the coordinator's return) go in ``routers``; a successor
    started by the router itself (SIGUSR2) is found at the end by its command line (which names
    this fleet's config file) or its process group, and stopped with the rest.
    """

    def __init__(self, args: argparse.Namespace, workdir: Path, ttft: float | None = None,
                 tps: float | None = None, router_extra: tuple[str, ...] = ()) -> None:
        self.args = args
        self.ttft = args.ttft if ttft is None else ttft
        self.tps = args.tps if tps is None else tps
        self.router_argv = (*shlex.split(args.router_args), *router_extra)
        self.workers: list[launch.Launched] = []
        self.extra: list[launch.Launched] = []  # started during a phase; stopped with the fleet
        self.router: launch.Launched | None = None
        self.routers: list[launch.Launched] = []  # further routers started by the driver
        self.port = launch.free_port()
        self.config = workdir / "shardgate.yaml"

    def start_worker(self, port: int = 0) -> launch.Launched:
        a = self.args
        argv = [sys.executable, "-m", "shardgate.mocks.worker", "--port", str(port), "--model", MODEL,
                "--ttft", str(self.ttft), "--tps", str(self.tps), "--output-tokens", str(a.tokens)]
        return launch.Launched(argv, launch.READY_WORKER, timeout=15)

    def start_router(self) -> launch.Launched:
        """``shardgate serve`` with this fleet's command line (the same every time)."""
        return launch.router([], *self.router_argv, config=str(self.config))

    def coordinators(self) -> list[psutil.Process]:
        """Live coordinators of this fleet not started by the driver: a SIGUSR2 successor (its
        command line names our config file; it shares the first router's process group)."""
        known = {r.pid for r in [self.router, *self.routers] if r is not None}
        group = self.router.pid if self.router is not None else None
        found = []
        for proc in psutil.process_iter(["cmdline"]):
            try:
                cmdline = proc.info["cmdline"] or []
                if proc.pid in known or "serve" not in cmdline or not alive(proc):
                    continue
                if str(self.config) in cmdline or (group is not None and os.getpgid(proc.pid) == group):
                    found.append(proc)
            except (psutil.Error, OSError):
                continue
        return found

    def write_config(self, urls: list[str]) -> None:
        doc = {"host": HOST, "port": self.port, "proxies": self.args.proxies, "log_level": "warning",
               "workers": [{"url": u, "model": MODEL} for u in urls]}
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.config)  # atomic: the coordinator never reads half a file

    def start(self) -> None:
        self.workers = [self.start_worker() for _ in range(3)]
        self.write_config([w.url for w in self.workers])
        self.router = self.start_router()

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def coordinator(self) -> int:
        assert self.router is not None
        return self.router.pid

    def proxies(self) -> list[psutil.Process]:
        try:
            return [p for p in psutil.Process(self.coordinator).children() if p.is_running()
                    and p.status() != psutil.STATUS_ZOMBIE]
        except psutil.Error:
            return []

    def router_row(self, url: str) -> dict[str, Any] | None:
        try:
            rows = get_json(self.url + "/workers")["workers"]
        except (OSError, ValueError, KeyError):
            return None
        return next((r for r in rows if r.get("url") == url), None)

    def router_urls(self) -> set[str] | None:
        try:
            return {r["url"] for r in get_json(self.url + "/workers")["workers"] if not r.get("draining")}
        except (OSError, ValueError, KeyError):
            return None

    def stop(self) -> None:
        """Stop everything, never raising: coordinators the router started itself (SIGTERM, so
        they drain and remove their shared memory; SIGKILL to them and their proxies after 10 s),
        the routers' process groups, then the workers."""
        strays = self.coordinators()
        for proc in strays:
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        _, left = psutil.wait_procs(strays, timeout=10)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                for child in [*proc.children(recursive=True), proc]:
                    child.kill()
        routers = [r for r in [*self.routers, self.router] if r is not None]
        for launched in routers + self.workers + self.extra:
            with contextlib.suppress(Exception):
                launched.stop(signal.SIGTERM, timeout=10)
        for pid in [p.pid for p in strays] + [r.pid for r in routers]:
            remove_segments(pid)

    def stderr_tail(self, lines: int = 8) -> str:
        """The last router's (a successor writes to its predecessor's stderr)."""
        last = self.routers[-1] if self.routers else self.router
        if last is None:
            return ""
        return "".join(last.stderr_text().splitlines(keepends=True)[-lines:])


def remove_segments(coordinator_pid: int) -> None:
    """Shared memory left by a SIGKILLed coordinator (its pid is in the names); the next router
    start would remove it as stale anyway."""
    shm = Path("/dev/shm")
    for seg in shm.glob(f"shardgate.{coordinator_pid}-*") if shm.is_dir() else []:
        with contextlib.suppress(OSError):
            seg.unlink()


# --- the phases' actions ----------------------------------------------------------------------

Notes = dict[str, Any]
Action = Callable[["PhaseRun"], Awaitable[Notes]]


@dataclass
class PhaseRun:
    fleet: Fleet
    load: Load
    args: argparse.Namespace
    after_seconds: float  # load kept on after the action returns
    title: str  # of the part of the phase under way (a phase may report several rows)
    parts: list[tuple[str, Tally, Notes]] = field(default_factory=list)  # parts already ended

    def end_part(self, notes: Notes, next_title: str) -> None:
        """Report what was counted so far as its own row (with ``notes``); count on as ``next_title``."""
        self.parts.append((self.title, self.load.split(), notes))
        self.title = next_title


async def thread(fn: Callable[..., Any], *args: Any) -> Any:
    return await asyncio.to_thread(fn, *args)


async def act_baseline(run: PhaseRun) -> Notes:
    return {}


async def act_reload(run: PhaseRun) -> Notes:
    fleet = run.fleet
    spare = await thread(fleet.start_worker)
    fleet.extra.append(spare)
    urls = [w.url for w in fleet.workers]
    steps = [("add a 4th worker", [*urls, spare.url]), ("remove worker 3", [*urls[:2], spare.url]),
             ("restore the original 3", urls)]
    applied: list[str] = []
    for label, target in steps:
        await thread(fleet.write_config, target)
        os.kill(fleet.coordinator, signal.SIGHUP)
        t0 = time.monotonic()
        seen = None
        while time.monotonic() - t0 < 5:
            seen = await thread(fleet.router_urls)
            if seen == set(target):
                break
            await asyncio.sleep(0.02)
        took = time.monotonic() - t0
        shown = f"seen in /workers after {took:.2f} s" if seen == set(target) else "NOT seen in 5 s"
        applied.append(f"{label}: {shown}")
        await asyncio.sleep(1.0)
    return {"reloads": applied, "requests_on_added_worker": await thread(worker_requests, spare.url)}


async def act_proxy(run: PhaseRun) -> Notes:
    fleet = run.fleet
    before = fleet.proxies()
    if not before:
        return {"error": "no proxy processes found under the coordinator"}
    victim = before[0]
    victim.kill()
    t0 = time.monotonic()
    replaced = None
    while time.monotonic() - t0 < 15:
        now = fleet.proxies()
        if len(now) >= len(before) and victim.pid not in {p.pid for p in now}:
            replaced = round(time.monotonic() - t0, 2)
            break
        await asyncio.sleep(0.05)
    return {"killed_pid": victim.pid, "proxies_before": len(before),
            "replacement_running_after_s": replaced if replaced is not None else "not within 15 s"}


async def act_worker(run: PhaseRun) -> Notes:
    fleet, args = run.fleet, run.args
    victim = fleet.workers[0]
    port = url_port(victim.url)
    os.killpg(victim.pid, signal.SIGKILL)
    victim.popen.wait()
    t0 = time.monotonic()
    notes: Notes = {"killed": victim.url}
    ejected = asyncio.create_task(watch_ejection(fleet, victim.url, t0, args.recover_timeout))
    replacement = None
    tries = 0
    while replacement is None and time.monotonic() - t0 < 10:
        tries += 1
        try:
            replacement = await thread(fleet.start_worker, port)
        except RuntimeError as exc:
            notes["bind_error"] = str(exc).strip().splitlines()[-1][:200]
            await asyncio.sleep(0.5)
    if replacement is None:
        notes["replacement"] = f"could not start on port {port} ({tries} tries in 10 s)"
        notes["ejected_after_s"] = await ejected
        return notes
    fleet.workers[0] = replacement
    ready = time.monotonic() - t0
    notes["replacement_ready_after_s"] = round(ready, 2)
    notes["replacement_start_tries"] = tries
    traffic = None
    while time.monotonic() - t0 < args.recover_timeout:
        if (await thread(worker_requests, replacement.url) or 0) > 0:
            traffic = time.monotonic() - t0
            break
        await asyncio.sleep(0.1)
    notes["ejected_after_s"] = await ejected
    notes["traffic_again_after_s"] = (round(traffic, 2) if traffic is not None
                                      else f"none within {args.recover_timeout:g} s of the kill")
    if traffic is not None:
        notes["traffic_after_replacement_ready_s"] = round(traffic - ready, 2)
    row = await thread(fleet.router_row, replacement.url)
    if row is not None:
        notes["router_view"] = {k: row.get(k) for k in ("healthy", "health_reason")}
    return notes


async def watch_ejection(fleet: Fleet, url: str, t0: float, limit: float) -> float | str:
    """Seconds from t0 until the router's /workers shows ``url`` unhealthy."""
    while time.monotonic() - t0 < limit:
        row = await thread(fleet.router_row, url)
        if row is not None and not row.get("healthy", True):
            return round(time.monotonic() - t0, 2)
        await asyncio.sleep(0.1)
    return f"still healthy after {limit:g} s"


async def act_stall(run: PhaseRun) -> Notes:
    """Stall one worker; watch its request count against the others' (both from /mock/stats).

    The router "stopped sending" once the stalled worker has had no new request for
    ``--stall-quiet`` seconds while the other workers kept getting requests: with every client
    stuck on the stalled worker, nobody sends anything, and that is no sign of the router.
    """
    fleet, args = run.fleet, run.args
    victim, others = fleet.workers[0], fleet.workers[1:]

    async def counts() -> tuple[int, int]:
        got = await asyncio.gather(*(thread(worker_requests, w.url) for w in [victim, *others]))
        return got[0] or 0, sum(n or 0 for n in got[1:])

    await thread(post_json, victim.url + "/mock/config", {"stall": True})
    t0 = time.monotonic()
    ejection = asyncio.create_task(watch_stall_ejection(fleet, victim.url, t0, args.stall_watch))
    first_victim, first_others = await counts()
    last_victim, others_at_last = first_victim, first_others
    last_growth = t0
    stopped = False
    samples: list[tuple[float, int, int]] = []
    while time.monotonic() - t0 < args.stall_watch:
        await asyncio.sleep(0.25)
        on_victim, on_others = await counts()
        now = time.monotonic()
        samples.append((now - t0, on_victim - first_victim, on_others - first_others))
        if on_victim > last_victim:
            last_victim, others_at_last, last_growth = on_victim, on_others, now
        elif now - last_growth >= args.stall_quiet and on_others - others_at_last >= 20:
            stopped = True
            break
    ejected_after, ejected_row = await ejection
    stats = await thread(get_json, victim.url + "/mock/stats")
    row = await thread(fleet.router_row, victim.url)
    await thread(post_json, victim.url + "/mock/config", {"stall": False})
    end = time.monotonic()
    per_second = [f"{t:.0f}s: {v}/{o}" for t, v, o in samples[3::4]]  # every ~second
    return {
        "stalled": victim.url,
        "ejected_as_stalled_after_s": ejected_after,
        "ejected_row": ejected_row,
        "router_stopped_sending_after_s": (round(last_growth - t0, 2) if stopped else
                                           f"still sending after {args.stall_watch:g} s"),
        "requests_to_stalled_vs_others_since_stall": per_second,
        "in_flight_on_stalled_before_unstall": stats.get("in_flight"),
        "ok_per_s_before_stall": round(run.load.ok_rate(run.load.started + 1, t0), 1),
        "ok_per_s_while_stalled": round(run.load.ok_rate(t0, end), 1),
        "router_view": {k: row.get(k) for k in ("healthy", "ejected", "health_reason")} if row else None,
    }


async def watch_stall_ejection(fleet: Fleet, url: str, t0: float,
                               limit: float) -> tuple[float | str, dict[str, Any] | None]:
    """Seconds from t0 until the router's GET /workers shows ``url`` ejected as stalled
    (``ejected`` true, "stalled" in ``health_reason``), and that row's health fields."""
    fields = ("healthy", "ejected", "health_reason")
    row: dict[str, Any] | None = None
    while time.monotonic() - t0 < limit:
        row = await thread(fleet.router_row, url)
        if row is not None and row.get("ejected") and "stalled" in str(row.get("health_reason") or ""):
            return round(time.monotonic() - t0, 2), {k: row.get(k) for k in fields}
        await asyncio.sleep(0.1)
    return f"not ejected as stalled within {limit:g} s", {k: row.get(k) for k in fields} if row else None


async def act_coordinator(run: PhaseRun) -> Notes:
    fleet, args = run.fleet, run.args
    proxies = fleet.proxies()
    os.kill(fleet.coordinator, signal.SIGKILL)
    t0 = time.monotonic()
    # Reap it, as its parent (a shell, systemd) would: a zombie's pid still counts as a live
    # coordinator, and a new router takes over only from a dead one.
    assert fleet.router is not None
    await thread(fleet.router.popen.wait, 10)
    exited: dict[int, float] = {}
    while time.monotonic() - t0 < args.orphan_seconds:
        for p in proxies:
            if p.pid not in exited and not alive(p):
                exited[p.pid] = round(time.monotonic() - t0, 2)
        await asyncio.sleep(0.25)
    end = time.monotonic()
    last = min(5.0, args.orphan_seconds)
    orphaned: Notes = {
        "proxies": len(proxies), "proxies_alive_at_end": sum(1 for p in proxies if alive(p)),
        "proxy_exits_after_s": sorted(exited.values()),
        "ok_per_s_before_kill": round(run.load.ok_rate(run.load.started + 1, t0), 1),
        f"ok_per_s_last_{last:g}s": round(run.load.ok_rate(end - last, end), 1),
        "orphan_seconds": args.orphan_seconds}
    if args.no_return:
        return orphaned
    run.end_part(orphaned, TITLES["coordinator_return"])
    run.after_seconds = args.seconds
    return await coordinator_return(run, [p for p in proxies if alive(p)], fleet.coordinator)


def segments_of(coordinator: int) -> list[str]:
    shm = Path("/dev/shm")
    return sorted(p.name for p in shm.glob(f"shardgate.{coordinator}-*")) if shm.is_dir() else []


async def coordinator_return(run: PhaseRun, orphans: list[psutil.Process], dead: int) -> Notes:
    """A new router, same command line and port: once its proxies serve it SIGTERMs the orphans.

    It finds them through the dead coordinator's shared memory (snapshot and load board); any
    router started on this host removes a dead coordinator's segments as stale, so the notes say
    whether they were still there.
    """
    fleet = run.fleet
    t0 = time.monotonic()
    present = segments_of(dead)
    # Orphans SIGTERMed drain within the grace period (30 s); without their segments the new
    # router cannot find them, and nothing will signal them.
    exits = asyncio.create_task(watch_exits(orphans, t0, 40.0 if present else 10.0))
    notes: Notes = {"orphaned_proxies": len(orphans),
                    "dead_coordinator_segments_at_start": len(present) or "none (removed as stale)"}
    try:
        router = await thread(fleet.start_router)
    except RuntimeError as exc:
        exits.cancel()
        return {**notes, "new_router": "did not start: " + str(exc).strip().splitlines()[-1][:200]}
    fleet.routers.append(router)
    notes["new_router_ready_after_s"] = round(time.monotonic() - t0, 2)
    exited = await exits
    notes["old_proxy_exits_after_s"] = exited
    waited = round(time.monotonic() - t0)
    notes["old_proxies_all_exited_after_s"] = (max(exited) if len(exited) == len(orphans) else
                                               f"{len(orphans) - len(exited)} still running after {waited} s")
    notes.update(await serving_generation(fleet, router.pid))
    return notes


async def watch_exits(procs: list[psutil.Process], t0: float, limit: float) -> list[float]:
    """Seconds from t0 at which each of ``procs`` exited (sorted); stops at ``limit``."""
    exited: dict[int, float] = {}
    while len(exited) < len(procs) and time.monotonic() - t0 < limit:
        for p in procs:
            if p.pid not in exited and not alive(p):
                exited[p.pid] = round(time.monotonic() - t0, 2)
        await asyncio.sleep(0.05)
    return sorted(exited.values())


async def serving_generation(fleet: Fleet, coordinator: int) -> Notes:
    """Whether the router's port is answered by ``coordinator``'s proxies, with a coordinator."""
    try:
        children = {p.pid for p in psutil.Process(coordinator).children()}
    except psutil.Error:
        children = set()
    try:
        health = await thread(get_json, fleet.url + "/health")
        stats = await thread(get_json, fleet.url + "/stats")
    except (OSError, ValueError) as exc:
        return {"router_view": f"{type(exc).__name__}: {exc}"}
    pid = (stats.get("answered_by") or {}).get("pid")
    return {"health_coordinator": health.get("coordinator"),
            "answered_by_new_proxies": pid in children}


async def act_upgrade(run: PhaseRun) -> Notes:
    """SIGUSR2: the router starts a successor generation, which SIGTERMs this coordinator once
    its proxies serve; time until the successor appears and until the old coordinator exits."""
    fleet = run.fleet
    assert fleet.router is not None
    old, popen = fleet.coordinator, fleet.router.popen
    proxies = fleet.proxies()
    os.kill(old, signal.SIGUSR2)
    t0 = time.monotonic()
    exits = asyncio.create_task(watch_exits(proxies, t0, 45.0))
    notes: Notes = {"old_proxies": len(proxies)}
    successor: list[psutil.Process] = []
    while not successor and time.monotonic() - t0 < 10:
        successor = await thread(fleet.coordinators)
        await asyncio.sleep(0.05)
    notes["successor_seen_after_s"] = round(time.monotonic() - t0, 2) if successor else "none within 10 s"
    try:
        code = await thread(popen.wait, 45)
    except subprocess.TimeoutExpired:
        notes["old_coordinator"] = "still running 45 s after SIGUSR2"
        exits.cancel()
        return notes
    took = time.monotonic() - t0
    notes["old_coordinator_exited_after_s"] = round(took, 2)
    notes["old_coordinator_exit_code"] = code
    exited = await exits
    notes["old_proxies_all_exited_after_s"] = (max(exited) if len(exited) == len(proxies)
                                               else f"{len(proxies) - len(exited)} still running")
    successor = await thread(fleet.coordinators)
    notes["successor_coordinators"] = len(successor)
    if successor:
        notes.update(await serving_generation(fleet, successor[0].pid))
    return notes


def alive(p: psutil.Process) -> bool:
    try:
        return p.is_running() and p.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


async def act_stop(run: PhaseRun) -> Notes:
    fleet = run.fleet
    assert fleet.router is not None
    popen = fleet.router.popen
    os.kill(fleet.coordinator, signal.SIGTERM)
    t0 = time.monotonic()
    try:
        code = await thread(popen.wait, 40)
    except subprocess.TimeoutExpired:
        return {"coordinator_exit": "still running 40 s after SIGTERM"}
    took = time.monotonic() - t0
    proxies_left = fleet.proxies()
    run.after_seconds = max(run.after_seconds - took, 1.0)  # refusals only from here on
    return {"coordinator_exit_code": code, "exited_after_s": round(took, 2),
            "proxies_left": len(proxies_left)}


ACTIONS: dict[str, Action] = {"baseline": act_baseline, "reload": act_reload, "proxy": act_proxy,
                              "worker": act_worker, "stall": act_stall, "coordinator": act_coordinator,
                              "upgrade": act_upgrade, "stop": act_stop}


# --- running and reporting --------------------------------------------------------------------


def part_row(name: str, title: str, tally: Tally, notes: Notes) -> dict[str, Any]:
    """One table row: a phase, or one part of it, with its own counts."""
    row: dict[str, Any] = {"phase": name, "title": title, "notes": notes}
    row["load_seconds"] = round((tally.ended or time.monotonic()) - tally.began, 1)
    row.update(tally.summary())
    return row


async def run_phase(name: str, args: argparse.Namespace) -> list[dict[str, Any]]:
    if name == "overload":
        return await run_overload(args)
    result: dict[str, Any] = {"phase": name, "title": TITLES[name]}
    began = time.monotonic()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="fault_driver.") as tmp:
        fleet = Fleet(args, Path(tmp))
        load: Load | None = None
        run: PhaseRun | None = None
        try:
            await thread(fleet.start)
            load = Load(fleet.port, args)
            load.start()
            await asyncio.sleep(args.seconds)
            after = args.orphan_seconds if name == "coordinator" else args.seconds
            run = PhaseRun(fleet, load, args, 0.0 if name == "coordinator" else after, TITLES[name])
            load.mark_action()
            acted = time.monotonic()
            try:
                result["notes"] = await ACTIONS[name](run)
            except Exception as exc:
                result["notes"] = {"action_error": f"{type(exc).__name__}: {exc}"}
            result["action_seconds"] = round(time.monotonic() - acted, 2)
            await asyncio.sleep(run.after_seconds)
            await load.stop()
        except Exception as exc:
            result["driver_error"] = f"{type(exc).__name__}: {exc}"
            result["traceback"] = traceback.format_exc(limit=4)
            if load is not None:
                await load.stop()
        finally:
            result["router_stderr_tail"] = fleet.stderr_tail()
            await thread(fleet.stop)
    if run is not None:
        rows = [part_row(name, title, tally, notes) for title, tally, notes in run.parts]
        result["title"] = run.title
    if load is not None:
        result.update(part_row(name, result["title"], load.tally, result.get("notes") or {}))
    result["phase_seconds"] = round(time.monotonic() - began, 1)
    return [*rows, result]


async def run_overload(args: argparse.Namespace) -> list[dict[str, Any]]:
    """Admission control: light load (fewer clients than the cap), then more than cap + queue.

    The same fleet serves both parts: ``--max-concurrent-requests``, ``--queue-size`` and
    ``--queue-timeout`` from --overload-*, workers paced by --overload-ttft/--overload-tps. 429
    and 503 are counted apart as rejections; each part's ok latency is reported, and the heavy
    part's notes compare it with the light one's.
    """
    began = time.monotonic()
    flags = ("--max-concurrent-requests", str(args.overload_max), "--queue-size", str(args.overload_queue),
             "--queue-timeout", f"{args.overload_queue_timeout:g}")
    rows: list[dict[str, Any]] = []
    tail = ""
    error: dict[str, Any] = {}
    with tempfile.TemporaryDirectory(prefix="fault_driver.") as tmp:
        fleet = Fleet(args, Path(tmp), ttft=args.overload_ttft, tps=args.overload_tps, router_extra=flags)
        try:
            await thread(fleet.start)
            parts = (("overload_light", args.overload_light), ("overload", args.overload_clients))
            for key, clients in parts:
                load = Load(fleet.port, args, loops=(clients, 0, 0), rejections=True)
                load.start()
                try:
                    await asyncio.sleep(args.overload_seconds)
                finally:
                    await load.stop()
                notes: Notes = {"keepalive_clients": clients}
                with contextlib.suppress(OSError, ValueError):
                    stats = await thread(get_json, fleet.url + "/stats")
                    notes["router_admission"] = stats.get("admission")
                rows.append(part_row("overload", f"{TITLES[key]} ({clients}c)", load.tally, notes))
        except Exception as exc:
            error = {"driver_error": f"{type(exc).__name__}: {exc}",
                     "traceback": traceback.format_exc(limit=4)}
        finally:
            tail = fleet.stderr_tail()
            await thread(fleet.stop)
    if not rows:
        rows = [{"phase": "overload", "title": TITLES["overload"]}]
    rows[-1].update(error, router_stderr_tail=tail, phase_seconds=round(time.monotonic() - began, 1))
    gap = 1.0 / args.overload_tps if args.overload_tps > 0 else 0.0
    settings = {"max_concurrent_requests": args.overload_max, "queue_size": args.overload_queue,
                "queue_timeout": args.overload_queue_timeout,
                "worker_seconds_per_request": round(args.overload_ttft + (args.tokens - 1) * gap, 2)}
    rows[0].setdefault("notes", {})["settings"] = settings
    if len(rows) == 2:
        light, heavy = (r.get("ok_latency", {}).get("keepalive", {}) for r in rows)
        rejected = rows[1].get("r429", 0) + rows[1].get("r503", 0)
        missing = sum((rows[1].get("rejected_without_retry_after") or {}).values())
        rows[1]["notes"].update({
            "status_200_429_503": [rows[1].get("ok"), rows[1].get("r429"), rows[1].get("r503")],
            "every_rejection_had_retry_after": (missing == 0) if rejected else "no rejections",
            "admitted_p50_ms_light_vs_overload": [light.get("p50_ms"), heavy.get("p50_ms")],
            "admitted_p99_ms_light_vs_overload": [light.get("p99_ms"), heavy.get("p99_ms")],
        })
    return rows


COLUMNS = (("phase", 22), ("sent", 7), ("ok", 7), ("failed", 6), ("reset", 5), ("closed", 6),
           ("timeout", 7), ("non2xx", 6), ("stream", 6), ("other", 5), ("refused", 7), ("429", 5),
           ("503", 5), ("after", 5), ("ok/s", 6))


def table(results: list[dict[str, Any]]) -> str:
    keys = {"phase": "title", "non2xx": "http", "after": "failed_after_action", "429": "r429", "503": "r503"}
    lines = ["  ".join(f"{c:<{w}}" if c == "phase" else f"{c:>{w}}" for c, w in COLUMNS)]
    for r in results:
        cells = []
        for col, width in COLUMNS:
            if col == "ok/s":
                value: Any = round(r["ok"] / r["load_seconds"]) if r.get("load_seconds") else "-"
            else:
                value = r.get(keys.get(col, col), "-")
            cells.append(f"{value:<{width}}" if col == "phase" else f"{value!s:>{width}}")
        lines.append("  ".join(cells))
    lines.append("")
    for r in results:
        lines.append(f"{r['title']}:")
        if r.get("driver_error"):
            lines.append(f"  DRIVER ERROR {r['driver_error']}")
            lines.append("  router stderr (tail): " + r.get("router_stderr_tail", "").replace("\n", "\n    "))
        for key, value in (r.get("notes") or {}).items():
            lines.append(f"  {key}: {value}")
        if r.get("ok_latency"):
            lines.append(f"  ok latency: {r['ok_latency']}")
        if r.get("rejected"):
            lines.append(f"  rejected: {r['rejected']}; without Retry-After: "
                         f"{r.get('rejected_without_retry_after') or 'none'}")
        failing = {load: {o: n for o, n in outs.items() if o not in ("ok", "429", "503")}
                   for load, outs in (r.get("by_load") or {}).items()}
        failing = {load: outs for load, outs in failing.items() if outs}
        if failing:
            lines.append(f"  not ok, by load: {failing}")
        if r.get("failure_detail"):
            lines.append(f"  where: {r['failure_detail']}")
        if r.get("statuses"):
            lines.append(f"  non-2xx statuses: {r['statuses']}")
        if r.get("other_errors"):
            lines.append(f"  other errors: {r['other_errors']}")
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--phase", choices=PHASES, action="append",
                   help="run only this phase (repeatable); default: all, in order")
    p.add_argument("--seconds", type=float, default=4.0, help="seconds of load before and after each action")
    p.add_argument("--orphan-seconds", type=float, default=20.0,
                   help="seconds of load after the coordinator's SIGKILL")
    p.add_argument("--proxies", type=int, default=2)
    p.add_argument("--clients", type=int, default=16, help="keep-alive client loops")
    p.add_argument("--streams", type=int, default=8, help="streaming client loops")
    p.add_argument("--storm", type=int, default=8, help="loops opening a new connection per request")
    p.add_argument("--timeout", type=float, default=5.0, help="seconds one request may take, client side")
    p.add_argument("--max-requests", type=int, default=200_000, help="cap on requests per phase")
    p.add_argument("--recover-timeout", type=float, default=45.0,
                   help="seconds after a worker's SIGKILL to wait for its replacement to get traffic")
    p.add_argument("--stall-watch", type=float, default=15.0,
                   help="seconds to watch a stalled worker for the router to stop sending to it")
    p.add_argument("--stall-quiet", type=float, default=3.0,
                   help="seconds without a new request that count as 'stopped sending'")
    p.add_argument("--ttft", type=float, default=0.02, help="mock workers' time to first token")
    p.add_argument("--tps", type=float, default=400.0, help="mock workers' tokens per second")
    p.add_argument("--tokens", type=int, default=16, help="mock workers' output tokens per response")
    p.add_argument("--router-args", default="", help="extra `shardgate serve` flags, one string")
    p.add_argument("--no-return", action="store_true",
                   help="coordinator phase: no new router after the orphan period (no 'coordinator return')")
    o = p.add_argument_group("overload phase")
    o.add_argument("--overload-max", type=int, default=8, help="router --max-concurrent-requests")
    o.add_argument("--overload-queue", type=int, default=8, help="router --queue-size")
    o.add_argument("--overload-queue-timeout", type=float, default=2.0, help="router --queue-timeout")
    o.add_argument("--overload-light", type=int, default=4, help="keep-alive clients of the light part")
    o.add_argument("--overload-clients", type=int, default=48, help="keep-alive clients of the heavy part")
    o.add_argument("--overload-seconds", type=float, default=8.0, help="seconds of load of each part")
    o.add_argument("--overload-ttft", type=float, default=0.1, help="workers' time to first token")
    o.add_argument("--overload-tps", type=float, default=50.0, help="workers' tokens per second")
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for name in args.phase or PHASES:
        print(f"[fault_driver] phase {TITLES[name]} ...", file=sys.stderr, flush=True)
        rows = await run_phase(name, args)
        for row in rows:
            print(f"[fault_driver]   {row['title']}: {row.get('sent', 0)} sent, {row.get('ok', 0)} ok, "
                  f"{row.get('failed', 0)} failed", file=sys.stderr, flush=True)
        results.extend(rows)
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    started = time.monotonic()
    try:
        import uvloop  # the router's own dependency: a lighter client loop than asyncio's
    except ImportError:
        results = asyncio.run(amain(args))
    else:
        results = uvloop.run(amain(args))
    print(table(results))
    report = {"phases": [{k: v for k, v in r.items() if k not in ("traceback", "router_stderr_tail")}
                         for r in results],
              "seconds": round(time.monotonic() - started, 1),
              "settings": {k: getattr(args, k) for k in ("seconds", "orphan_seconds", "proxies", "clients",
                                                         "streams", "storm", "timeout", "ttft", "tps",
                                                         "tokens", "router_args", "overload_max",
                                                         "overload_queue", "overload_queue_timeout",
                                                         "overload_light", "overload_clients",
                                                         "overload_ttft", "overload_tps")}}
    print(json.dumps(report, separators=(",", ":")))
    return 2 if any(r.get("driver_error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
