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
                    stops sending to it (its ``/mock/stats`` requests stop growing);
6. ``coordinator``  SIGKILL the coordinator only; keep the load on for ``--orphan-seconds``
                    and watch whether the orphaned proxies keep serving;
7. ``stop``         SIGTERM to the coordinator under load; failures and resets are counted apart
                    from connections refused once the listener has gone.

Load (one asyncio process, raw HTTP/1.1 over asyncio streams, so the client side stays light):
``--clients`` keep-alive loops (one persistent connection each, POST /v1/chat/completions),
``--streams`` streaming loops (``"stream": true``, SSE read to ``data: [DONE]``) and ``--storm``
loops opening a fresh connection per request (``Connection: close``). Each phase runs
``--seconds`` of load before its action and ``--seconds`` after it (the coordinator phase
``--orphan-seconds`` after it); every request is bounded by ``--timeout``, every phase by
``--max-requests``.

    PYTHONPATH=. python3 loadtest/fault_driver.py [--phase NAME] [--seconds 4] [--proxies 2]
        [--clients 16] [--streams 8] [--storm 8] [--orphan-seconds 20]

Prints a table (one row per phase, then per-phase notes) and, last, one JSON object on one line.
The driver reports what it observes and does not judge: it exits 0 unless it failed itself.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import shlex
import signal
import socket
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
PHASES = ("baseline", "reload", "proxy", "worker", "stall", "coordinator", "stop")
TITLES = {"baseline": "baseline", "reload": "reload x3", "proxy": "proxy SIGKILL",
          "worker": "worker SIGKILL", "stall": "stalled worker", "coordinator": "coordinator SIGKILL",
          "stop": "stop (SIGTERM)"}
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
    return Reply(status, close, body)


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

    def total(self, outcome: str) -> int:
        return sum(n for (_, o), n in self.outcomes.items() if o == outcome)

    def summary(self) -> dict[str, Any]:
        sent = sum(self.outcomes.values())
        ok, refused = self.total("ok"), self.total("refused")
        kinds = {k: self.total(k) for k in FAILURES}
        by_load = {load: {o: n for (ld, o), n in sorted(self.outcomes.items()) if ld == load}
                   for load in LOADS}
        after_failed = sum(n for o, n in self.after_action.items() if o in FAILURES)
        return {"sent": sent, "ok": ok, "failed": sum(kinds.values()), **kinds, "refused": refused,
                "failed_after_action": after_failed, "by_load": by_load,
                "statuses": {str(s): n for s, n in sorted(self.statuses.items())},
                "other_errors": dict(self.other), "connections_opened": dict(self.connects),
                "failure_detail": dict(sorted(self.where.items()))}


class Load:
    """The client loops of one phase against the router on ``port``."""

    def __init__(self, port: int, args: argparse.Namespace) -> None:
        self.port = port
        self.args = args
        self.tally = Tally()
        self.started = time.monotonic()
        self.action_at: float | None = None
        self.stopping = False
        self.tasks: list[asyncio.Task[None]] = []

    def start(self) -> None:
        self.started = time.monotonic()
        a = self.args
        specs = ([("keepalive", False, True)] * a.clients + [("stream", True, True)] * a.streams
                 + [("storm", False, False)] * a.storm)
        self.tasks = [asyncio.create_task(self.loop(*spec)) for spec in specs]

    def mark_action(self) -> None:
        self.action_at = time.monotonic()

    def running(self) -> bool:
        return not self.stopping and sum(self.tally.outcomes.values()) < self.args.max_requests

    def record(self, load: str, outcome: str) -> None:
        now = time.monotonic()
        self.tally.outcomes[load, outcome] += 1
        if self.action_at is not None and now >= self.action_at:
            self.tally.after_action[outcome] += 1
        if outcome == "ok":
            self.tally.ok_per_second[int(now - self.started)] += 1

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
            try:
                async with asyncio.timeout(self.args.timeout):
                    if reader is None or writer is None:
                        self.tally.connects[load] += 1
                        reader, writer = await asyncio.open_connection(HOST, self.port)
                    writer.write(request)
                    reply = await read_reply(reader, progress)
                outcome = judge(reply, stream)
                if outcome == "http":
                    self.tally.statuses[reply.status] += 1
                done = reply.close or not keep or outcome != "ok"
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
                writer.transport.abort() if outcome != "ok" else writer.close()
                reader = writer = None
            self.record(load, outcome)
            if outcome == "refused":
                await asyncio.sleep(REFUSED_PAUSE)
            elif outcome != "ok":
                await asyncio.sleep(FAILURE_PAUSE)
        if writer is not None:
            writer.close()

    async def stop(self) -> None:
        """Let every loop finish its request in progress (bounded by --timeout), then end it."""
        self.stopping = True
        if not self.tasks:
            return
        _, pending = await asyncio.wait(self.tasks, timeout=self.args.timeout + 2)
        for task in pending:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)


# --- the fleet: mock workers and the router ---------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return int(s.getsockname()[1])


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
    """Three mock workers and a router started from a config file, all on loopback."""

    def __init__(self, args: argparse.Namespace, workdir: Path) -> None:
        self.args = args
        self.workers: list[launch.Launched] = []
        self.extra: list[launch.Launched] = []  # started during a phase; stopped with the fleet
        self.router: launch.Launched | None = None
        self.port = free_port()
        self.config = workdir / "shardgate.yaml"

    def start_worker(self, port: int = 0) -> launch.Launched:
        a = self.args
        argv = [sys.executable, "-m", "shardgate.mocks.worker", "--port", str(port), "--model", MODEL,
                "--ttft", str(a.ttft), "--tps", str(a.tps), "--output-tokens", str(a.tokens)]
        return launch.Launched(argv, launch.READY_WORKER, timeout=15)

    def write_config(self, urls: list[str]) -> None:
        doc = {"host": HOST, "port": self.port, "proxies": self.args.proxies, "log_level": "warning",
               "workers": [{"url": u, "model": MODEL} for u in urls]}
        tmp = self.config.with_suffix(".tmp")
        tmp.write_text(yaml.safe_dump(doc, sort_keys=False))
        os.replace(tmp, self.config)  # atomic: the coordinator never reads half a file

    def start(self) -> None:
        self.workers = [self.start_worker() for _ in range(3)]
        self.write_config([w.url for w in self.workers])
        self.router = launch.router([], *shlex.split(self.args.router_args), config=str(self.config))

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
        """Stop everything, never raising: the router's whole process group, then the workers."""
        for proc in ([self.router] if self.router else []) + self.workers + self.extra:
            with contextlib.suppress(Exception):
                proc.stop(signal.SIGTERM, timeout=10)
        if self.router is not None:
            remove_segments(self.router.pid)

    def stderr_tail(self, lines: int = 8) -> str:
        if self.router is None:
            return ""
        return "".join(self.router.stderr_text().splitlines(keepends=True)[-lines:])


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
    stats = await thread(get_json, victim.url + "/mock/stats")
    row = await thread(fleet.router_row, victim.url)
    await thread(post_json, victim.url + "/mock/config", {"stall": False})
    end = time.monotonic()
    per_second = [f"{t:.0f}s: {v}/{o}" for t, v, o in samples[3::4]]  # every ~second
    return {
        "stalled": victim.url,
        "router_stopped_sending_after_s": (round(last_growth - t0, 2) if stopped else
                                           f"still sending after {args.stall_watch:g} s"),
        "requests_to_stalled_vs_others_since_stall": per_second,
        "in_flight_on_stalled_before_unstall": stats.get("in_flight"),
        "ok_per_s_before_stall": round(run.load.ok_rate(run.load.started + 1, t0), 1),
        "ok_per_s_while_stalled": round(run.load.ok_rate(t0, end), 1),
        "router_view": {k: row.get(k) for k in ("healthy", "health_reason")} if row else None,
    }


async def act_coordinator(run: PhaseRun) -> Notes:
    fleet, args = run.fleet, run.args
    proxies = fleet.proxies()
    os.kill(fleet.coordinator, signal.SIGKILL)
    t0 = time.monotonic()
    exited: dict[int, float] = {}
    while time.monotonic() - t0 < args.orphan_seconds:
        for p in proxies:
            if p.pid not in exited and not alive(p):
                exited[p.pid] = round(time.monotonic() - t0, 2)
        await asyncio.sleep(0.25)
    end = time.monotonic()
    last = min(5.0, args.orphan_seconds)
    return {"proxies": len(proxies), "proxies_alive_at_end": sum(1 for p in proxies if alive(p)),
            "proxy_exits_after_s": sorted(exited.values()),
            "ok_per_s_before_kill": round(run.load.ok_rate(run.load.started + 1, t0), 1),
            f"ok_per_s_last_{last:g}s": round(run.load.ok_rate(end - last, end), 1),
            "orphan_seconds": args.orphan_seconds}


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
                              "stop": act_stop}


# --- running and reporting --------------------------------------------------------------------


async def run_phase(name: str, args: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"phase": name, "title": TITLES[name]}
    began = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="fault_driver.") as tmp:
        fleet = Fleet(args, Path(tmp))
        load: Load | None = None
        try:
            await thread(fleet.start)
            load = Load(fleet.port, args)
            load.start()
            await asyncio.sleep(args.seconds)
            after = args.orphan_seconds if name == "coordinator" else args.seconds
            run = PhaseRun(fleet, load, args, 0.0 if name == "coordinator" else after)
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
    if load is not None:
        result["load_seconds"] = round(time.monotonic() - load.started, 1)
        result.update(load.tally.summary())
    result["phase_seconds"] = round(time.monotonic() - began, 1)
    return result


COLUMNS = (("phase", 20), ("sent", 7), ("ok", 7), ("failed", 6), ("reset", 5), ("closed", 6),
           ("timeout", 7), ("non2xx", 6), ("stream", 6), ("other", 5), ("refused", 7), ("after", 5),
           ("ok/s", 6))


def table(results: list[dict[str, Any]]) -> str:
    keys = {"phase": "title", "non2xx": "http", "after": "failed_after_action"}
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
        failing = {load: {o: n for o, n in outs.items() if o != "ok"}
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
    return p.parse_args(argv)


async def amain(args: argparse.Namespace) -> list[dict[str, Any]]:
    results = []
    for name in args.phase or PHASES:
        print(f"[fault_driver] phase {TITLES[name]} ...", file=sys.stderr, flush=True)
        result = await run_phase(name, args)
        print(f"[fault_driver]   {result.get('sent', 0)} sent, {result.get('ok', 0)} ok, "
              f"{result.get('failed', 0)} failed in {result['phase_seconds']} s", file=sys.stderr, flush=True)
        results.append(result)
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
                                                         "tokens", "router_args")}}
    print(json.dumps(report, separators=(",", ":")))
    return 2 if any(r.get("driver_error") for r in results) else 0


if __name__ == "__main__":
    sys.exit(main())
