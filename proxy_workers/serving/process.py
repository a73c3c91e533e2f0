"""Lifecycle of one proxy process: attach, bind, serve, sweep, drain.

Role: start a uvloop event loop, attach the shared-memory segments, bind the SO_REUSEPORT
listener (and the ops listener, when ``ops_port`` is set), serve until SIGTERM, then shut down
gracefully.

Signals (handled here only): SIGTERM drains and exits 0. SIGINT and SIGHUP are ignored: a Ctrl-C
in a terminal reaches the whole process group, and the coordinator decides what it means
(first: graceful stop; second: immediate exit); configuration reaches proxies through snapshots.

Graceful shutdown, in order (no connection the kernel accepted is dropped unanswered):
  1. accept what the kernel already queued on this listener (closing an SO_REUSEPORT listener
     resets its queued connections), then close the listener;
  2. every response from now on carries ``Connection: close``, and its connection closes after it;
  3. an idle connection may still bring one request for ``DRAIN_LINGER`` seconds from the later
     of the stop and its last response (a keep-alive client's next request may be on the wire;
     a stream that ends during the drain promised keep-alive when it began; a fresh connection's
     first request may not have arrived yet): it is served, with ``Connection: close``; one that
     sent nothing by then is closed;
  4. wait for in-flight requests and streams, up to ``grace_period``;
  5. abort what remains (the workers see the disconnect and stop generating);
  6. close pooled worker connections, zero this row's gauges, exit 0.

The periodic sweep (every ``SWEEP_SECONDS``) enforces every timeout (one timer for all requests
is cheaper than a timer per request), writes the heartbeat and closes idle pooled sockets.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import socket
import sys
import time

import posix_ipc
import uvloop

from proxy_workers.serving.ops import OpsProtocol
from proxy_workers.serving.protocol import ClientProtocol
from proxy_workers.serving.state import ProxyProcess, freeze_startup_heap
from shm.affinity import AffinityTable
from shm.loadboard import (
    P_GENERATION,
    P_HEARTBEAT,
    P_IN_FLIGHT,
    P_PID,
    P_RESTARTS,
    P_STARTED,
    P_TORN_READS,
    LoadBoard,
)
from shm.logformat import configure as configure_logging
from shm.process import EXIT_BOOT_ERROR, EXIT_OK, LISTEN_BACKLOG, listen_socket
from shm.segment import Segment, segment_name
from shm.snapshot import SnapshotReader

SWEEP_SECONDS = 0.25
DRAIN_LINGER = 1.0
ORPHAN_LOG_SECONDS = 60.0
log = logging.getLogger("shardgate.proxy")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m proxy_workers")
    parser.add_argument("--instance", required=True)
    parser.add_argument("--index", type=int, required=True)
    args = parser.parse_args(argv)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    # A stop that arrives while the proxy is starting is kept, not fatal: the proxy still serves
    # what its listener has queued, then drains (SIGTERM's default action would drop those).
    signal.signal(signal.SIGTERM, _stop_early)
    try:
        reader = SnapshotReader(Segment.attach(segment_name(args.instance, "snap")))
        board = LoadBoard(Segment.attach(segment_name(args.instance, "board")))
        affinity = AffinityTable(Segment.attach(segment_name(args.instance, "affinity")))
        snapshot = reader.current()
        if snapshot is None:  # nothing published yet, or a snapshot of another schema version
            raise ValueError(reader.refusal or "the coordinator has not published a snapshot")
        settings = snapshot.settings
        configure_logging(settings.log_level, settings.log_format, f"proxy[{args.index}]")
        if not 0 <= args.index < board.max_proxies:
            raise ValueError(f"proxy index {args.index} outside the load board")
        sock = listen_socket(settings.host, settings.port)
        # The ops listener (back office on a port of its own): bound by every proxy, like the
        # data port, so it serves as long as the data plane does (serving.ops).
        ops_sock = listen_socket(settings.ops_host, settings.ops_port) if settings.ops_port else None
    except (OSError, ValueError, posix_ipc.Error) as exc:
        print(f"shardgate proxy {args.index}: cannot start: {exc}", file=sys.stderr, flush=True)
        return EXIT_BOOT_ERROR
    uvloop.run(_serve(args.index, reader, board, affinity, sock, ops_sock))
    return EXIT_OK


_early_stop: list[bool] = []  # a SIGTERM came before the event loop took over the signal


def _stop_early(signum: int, frame: object) -> None:
    _early_stop.append(True)


async def _serve(index: int, reader: SnapshotReader, board: LoadBoard, affinity: AffinityTable,
                 sock: socket.socket, ops_sock: socket.socket | None = None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    loop.add_signal_handler(signal.SIGTERM, stop.set)
    if _early_stop:
        stop.set()
    proc = ProxyProcess(loop, index, reader, board, affinity)
    freeze_startup_heap()
    server = await loop.create_server(lambda: ClientProtocol(proc), sock=sock, backlog=LISTEN_BACKLOG)
    ops = None if ops_sock is None else \
        await loop.create_server(lambda: OpsProtocol(proc), sock=ops_sock, backlog=LISTEN_BACKLOG)
    # Only now, serving (and before the loop runs any connection), does this proxy claim its row:
    # the coordinator counts it as up from here (the supervisor's invariant).
    _claim_row(board, index)
    # The coordinator that spawned us, from its snapshot: os.getppid() here could already name
    # init if the coordinator died while this process was starting, hiding that it is orphaned.
    coordinator = proc.latest_table().snapshot.coordinator_pid
    sweeper = loop.create_task(_sweep_forever(proc, stop, coordinator))
    log.info("serving on %s:%d (pid %d, snapshot generation %d)", proc.settings.host, proc.settings.port,
             os.getpid(), proc.reader.generation)
    await stop.wait()
    log.info("stop requested: draining %d connection(s)", len(proc.connections))
    if ops is not None:
        # Closed at once: a scrape refused on one proxy's listener finds another's, or retries.
        ops.close()
    await _shutdown(proc, server, sock)
    sweeper.cancel()
    if proc.access_log is not None:
        proc.access_log.close()  # what is queued is written before the process exits
    if proc.tracer is not None:
        proc.tracer.close()  # and the spans still queued are exported
    log.info("stopped")


def _accept_queued(proc: ProxyProcess, sock: socket.socket) -> int:
    """Accept every connection waiting in the listener's queue; each is served like any other."""
    loop = proc.loop
    count = 0
    while True:
        try:
            conn, _ = sock.accept()
        except OSError:  # BlockingIOError: the queue is empty (or the socket already closed)
            return count
        conn.setblocking(False)
        count += 1
        task = loop.create_task(loop.connect_accepted_socket(lambda: ClientProtocol(proc), conn))
        _pending.add(task)
        task.add_done_callback(_pending.discard)


_pending: set[asyncio.Task[object]] = set()  # connections being attached (kept from the GC)


def _claim_row(board: LoadBoard, index: int) -> None:
    """Take over this process's row: the previous owner's in-flight requests died with it."""
    ints, floats = board.ints, board.floats
    if ints[board.proxy_word(index, P_PID)]:
        ints[board.proxy_word(index, P_RESTARTS)] += 1
    board.reset_gauges(index)
    ints[board.proxy_word(index, P_PID)] = os.getpid()
    floats[board.proxy_word(index, P_STARTED)] = time.time()
    floats[board.proxy_word(index, P_HEARTBEAT)] = time.time()


def _sweep(proc: ProxyProcess) -> None:
    loop_now = proc.loop.time()
    proc.latest_table()  # take a new snapshot even when no request arrives
    settings = proc.settings
    for exchange in list(proc.active):
        exchange.check_deadline(loop_now)
    for conn in list(proc.connections):
        conn.check_deadline(loop_now, settings.header_timeout, settings.keepalive_timeout)
    proc.pools.sweep(loop_now - settings.keepalive_timeout)
    board, index = proc.board, proc.index
    board.floats[board.proxy_word(index, P_HEARTBEAT)] = time.time()
    board.ints[board.proxy_word(index, P_IN_FLIGHT)] = len(proc.active)
    board.ints[board.proxy_word(index, P_GENERATION)] = proc.reader.generation
    board.ints[board.proxy_word(index, P_TORN_READS)] = proc.reader.torn_reads


async def _sweep_forever(proc: ProxyProcess, stop: asyncio.Event, parent: int) -> None:
    while True:
        await asyncio.sleep(SWEEP_SECONDS)
        try:
            _sweep(proc)
        except Exception:  # the sweep must survive anything one connection does
            log.exception("sweep failed")
        if os.getppid() != parent and not stop.is_set():
            _orphaned(proc, stop)


def _orphaned(proc: ProxyProcess, stop: asyncio.Event) -> None:
    """The coordinator died: the data plane goes on with the last snapshot, and says so (in the
    log every ORPHAN_LOG_SECONDS, and in /health and /metrics), until ``orphan_timeout`` (if set)
    or until a coordinator started on the same address replaces this proxy (it sends SIGTERM)."""
    now = time.time()
    timeout = proc.settings.orphan_timeout
    if not proc.orphaned_since:
        proc.orphaned_since = now
        log.warning("coordinator gone; serving the last snapshot (generation %d) %s", proc.reader.generation,
                    f"for {timeout:.0f}s" if timeout else "until a new coordinator replaces this proxy")
        proc.orphan_logged = now
    elif now - proc.orphan_logged >= ORPHAN_LOG_SECONDS:
        proc.orphan_logged = now
        log.warning("coordinator gone for %.0fs; still serving snapshot generation %d",
                    now - proc.orphaned_since, proc.reader.generation)
    if timeout and now - proc.orphaned_since >= timeout:
        stop.set()


async def _shutdown(proc: ProxyProcess, server: asyncio.AbstractServer, sock: socket.socket) -> None:
    proc.draining = True
    queued = _accept_queued(proc, sock)
    server.close()  # in the same loop iteration: as few new connections as possible land on it
    if queued:
        log.info("stopping: took %d queued connection(s) off the listener before closing it", queued)
    loop = proc.loop
    stopped_at = loop.time()
    linger = min(DRAIN_LINGER, proc.settings.grace_period)
    deadline = stopped_at + proc.settings.grace_period
    while (now := loop.time()) < deadline:
        for conn in list(proc.connections):
            if conn.idle and conn.transport is not None and now >= max(stopped_at, conn.idle_since) + linger:
                conn.close()
        if not proc.active and not proc.connections and not _pending:
            break  # (connections still being attached are in _pending, not yet in proc.connections)
        await asyncio.sleep(0.05)
    for conn in list(proc.connections):
        if conn.transport is not None:
            conn.transport.abort()
    for pool in proc.pools.pools.values():
        pool.close_all()
    proc.board.reset_gauges(proc.index)
    await asyncio.sleep(0)  # let transports deliver their close
