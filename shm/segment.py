"""POSIX shared-memory segments: create, attach, remove.

Role: the only module that calls shm_open/mmap. Everything else sees a ``memoryview``.

Invariants:
- Segments are created O_EXCL with mode 0600, so another user cannot read routing tables or
  forge load figures, and two routers never share one by accident.
- Names are ``/shardgate.<instance>.<kind>``; the default instance is ``<pid>-<random>``, unique
  per start. A segment left behind by a crashed run has a dead pid in its name and is removed
  by :func:`remove_stale` at the next start instead of blocking it.
- Attaching never registers anything for cleanup at exit: only the creator (the coordinator)
  unlinks, and only at shutdown. (posix_ipc has no resource tracker; that is why it is used
  instead of ``multiprocessing.shared_memory``, whose tracker unlinks on the attacher's exit.)
"""

from __future__ import annotations

import mmap
import os
import re
import secrets
from collections.abc import Collection
from pathlib import Path

import posix_ipc

PREFIX = "shardgate."
SHM_DIR = Path("/dev/shm")
_NAME_RE = re.compile(r"^shardgate\.(\d+)-[0-9a-f]+\.\w+$")


def new_instance_id() -> str:
    """A per-start id: the creator's pid (for stale detection) and randomness (for uniqueness)."""
    return f"{os.getpid()}-{secrets.token_hex(4)}"


def segment_name(instance: str, kind: str) -> str:
    return f"/{PREFIX}{instance}.{kind}"


class Segment:
    """One mapped segment. ``buf`` is a writable memoryview over the whole mapping."""

    __slots__ = ("_map", "buf", "name", "owner", "size")

    def __init__(self, name: str, size: int, owner: bool, mapping: mmap.mmap) -> None:
        self.name = name
        self.size = size
        self.owner = owner
        self._map = mapping
        self.buf = memoryview(mapping)

    @classmethod
    def create(cls, name: str, size: int) -> Segment:
        shm = posix_ipc.SharedMemory(name, posix_ipc.O_CREX, mode=0o600, size=size)
        try:
            mapping = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        return cls(name, size, True, mapping)

    @classmethod
    def attach(cls, name: str) -> Segment:
        shm = posix_ipc.SharedMemory(name)
        try:
            size = os.fstat(shm.fd).st_size
            mapping = mmap.mmap(shm.fd, size)
        finally:
            shm.close_fd()
        return cls(name, size, False, mapping)

    def close(self) -> None:
        """Unmap. Views derived from ``buf`` must be released first by their owners."""
        try:
            self.buf.release()
            self._map.close()
        except (BufferError, ValueError):
            # A cast view is still alive somewhere; the mapping goes away with the process.
            pass

    def unlink(self) -> None:
        try:
            posix_ipc.unlink_shared_memory(self.name)
        except posix_ipc.ExistentialError:
            pass


def remove_stale(keep: Collection[str] = ()) -> list[str]:
    """Remove segments whose creating process no longer exists, except those of the instances in
    ``keep`` (a dead coordinator whose proxies still serve: a later takeover finds them there).
    Returns the names removed."""
    removed: list[str] = []
    try:
        entries = list(SHM_DIR.iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _NAME_RE.match(entry.name)
        if not match or pid_alive(int(match.group(1))) or entry.name.split(".")[1] in keep:
            continue
        try:
            posix_ipc.unlink_shared_memory("/" + entry.name)
            removed.append(entry.name)
        except (posix_ipc.ExistentialError, posix_ipc.PermissionsError):
            pass
    return removed


def pid_alive(pid: int) -> bool:
    """Whether ``pid`` names a running process (a zombie, dead but not yet reaped, is not one)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rpartition(b")")[2].split()[0] != b"Z"
    except (OSError, IndexError):
        return True  # no /proc to ask: the signal check is all there is
