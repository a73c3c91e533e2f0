"""Proxies left serving by a coordinator that died, and their replacement.

Role: when a coordinator dies, its proxies keep serving the last snapshot (``orphan_timeout`` 0,
the default: for as long as it takes). A coordinator that starts on the same address finds them
here, before stale segments are removed, and stops them once its own proxies serve: they drain
as on any stop (queued connections taken, in-flight requests finished), so the handover drops
nothing. This is also how a restarted coordinator takes over without a hole in service.

Invariants:
- Only proxies of a *dead* coordinator's instance are touched, and only when that instance's
  snapshot names the same host and port: a second router on another port is never disturbed.
- A pid is signalled only if it is alive and its command line names that instance (a reused pid
  is never signalled).
- Reading an orphaned instance's segments never changes them, and no coordinator removes them
  while their proxies run (:func:`live_instances` is the ``keep`` of ``remove_stale``).
- A coordinator is dead when its pid is gone or a zombie (dead, not yet reaped).
"""

from __future__ import annotations

import logging
import os
import re
import signal
from dataclasses import dataclass

import posix_ipc

from shm.loadboard import P_PID, LoadBoard
from shm.process import process_args
from shm.segment import SHM_DIR, Segment, pid_alive, segment_name
from shm.snapshot import SnapshotReader

log = logging.getLogger("shardgate.coordinator")
_SNAP_RE = re.compile(r"^shardgate\.((\d+)-[0-9a-f]+)\.snap$")


@dataclass(frozen=True)
class Orphans:
    """Live proxies of a dead coordinator (``coordinator``) that served our address."""

    instance: str
    coordinator: int
    pids: tuple[int, ...]


def find(host: str, port: int | None) -> list[Orphans]:
    """Instances whose coordinator is gone but whose proxies still serve ``host:port`` (any
    address when ``port`` is None)."""
    found: list[Orphans] = []
    try:
        names = [entry.name for entry in SHM_DIR.iterdir()]
    except OSError:
        return found
    for name in names:
        match = _SNAP_RE.match(name)
        if match is None or pid_alive(int(match.group(2))):
            continue
        instance, coordinator = match.group(1), int(match.group(2))
        try:
            pids = _serving_proxies(instance, host, port)
        except (OSError, ValueError, posix_ipc.Error):
            continue  # half-removed or foreign segments: nothing to take over
        if pids:
            found.append(Orphans(instance, coordinator, pids))
    return found


def live_instances() -> set[str]:
    """Instances whose proxies still run, on any address: their segments must stay, or the
    coordinator that later starts on that address could not find them.

    Read from the process table, not from the segments: a coordinator of another version (a
    different board layout or snapshot schema, after an upgrade or a downgrade) cannot read an
    instance's segments, and must still not remove them from under its running proxies."""
    found: set[str] = set()
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        args = process_args(int(entry))
        if b"proxy_workers" in args and b"--instance" in args[:-1]:
            found.add(args[args.index(b"--instance") + 1].decode(errors="replace"))
    return found


def _serving_proxies(instance: str, host: str, port: int | None) -> tuple[int, ...]:
    reader = SnapshotReader(Segment.attach(segment_name(instance, "snap")))
    snapshot = reader.current()
    if snapshot is None or (port is not None
                            and (snapshot.settings.host, snapshot.settings.port) != (host, port)):
        return ()
    board = LoadBoard(Segment.attach(segment_name(instance, "board")))
    pids = (int(board.ints[board.proxy_word(p, P_PID)]) for p in range(board.max_proxies))
    return tuple(pid for pid in pids if pid > 0 and _is_proxy_of(pid, instance))


def stop(orphans: list[Orphans]) -> int:
    """SIGTERM every orphaned proxy (each drains, then exits); returns how many were signalled."""
    count = 0
    for group in orphans:
        for pid in group.pids:
            if not _is_proxy_of(pid, group.instance):
                continue  # already gone (or its pid reused)
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
            count += 1
        log.info("took over from coordinator %d: %d of its proxies are draining", group.coordinator,
                 len(group.pids))
    return count


def _is_proxy_of(pid: int, instance: str) -> bool:
    args = process_args(pid)
    return b"proxy_workers" in args and instance.encode() in args

