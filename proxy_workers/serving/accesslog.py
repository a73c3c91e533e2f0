"""The access log: one line per request, written off the event loop.

Role: :class:`AccessLog` turns a :class:`proxy_workers.serving.records.RequestRecord` into one
line (text or JSON, ``log_format``) and queues it; a daemon thread writes the queue to the
``access_log`` destination (``-``: stderr; else a file every proxy appends to, one ``write`` per
line so lines of different proxies do not interleave). Off (the default, ``access_log: ""``) it
does not exist: ``proc.access_log`` is None and a request pays one attribute check.

Invariants:
- Never a prompt, a body, a header value or a key: the fields are the record's (time, request id,
  peer, method, path, model, router, policy, worker, status, bytes, duration, TTFT, tokens,
  retries, outcome). The path is the request's path without its query (a query may hold a key).
- The event loop only formats and enqueues (``SimpleQueue.put`` never blocks); the thread blocks
  on the disk. Lines queued when the process exits are flushed by :meth:`AccessLog.close`.
"""

from __future__ import annotations

import os
import queue
import sys
import threading
import time
from typing import TYPE_CHECKING

import msgspec

if TYPE_CHECKING:
    from proxy_workers.serving.records import RequestRecord
    from shm.settings import Settings

_encode = msgspec.json.encode
_STOP = None


class AccessLog:
    """Formats on the loop, writes on a thread."""

    __slots__ = ("_json", "_queue", "_thread", "proxy")

    def __init__(self, destination: str, json: bool, proxy: int) -> None:
        self._json = json
        self.proxy = proxy
        self._queue: queue.SimpleQueue[str | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._drain, args=(destination,), name="access-log",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def open(cls, settings: Settings, proxy: int) -> AccessLog | None:
        if not settings.access_log:
            return None
        return cls(settings.access_log, settings.log_format == "json", proxy)

    def write(self, record: RequestRecord) -> None:
        req = record.request
        path = req.path.decode("latin-1")
        ttft = round(record.ttft, 6) if record.ttft >= 0 else None
        if self._json:
            line = _encode({
                "time": _now(), "request_id": req.request_id.decode("latin-1"),
                "peer": req.peer.decode("latin-1"), "method": req.method.decode("latin-1"), "path": path,
                "model": record.model, "router": record.router_name, "policy": record.policy,
                "worker": record.worker, "status": record.status, "bytes": record.sent,
                "duration": round(record.duration, 6), "ttft": ttft, "tokens_in": record.tokens_in,
                "tokens_out": record.tokens_out, "retries": record.retries, "outcome": record.outcome_name,
                "proxy": self.proxy}).decode()
        else:
            line = (f'{_now()} {req.request_id.decode("latin-1")} {req.peer.decode("latin-1")} '
                    f'"{req.method.decode("latin-1")} {path}" model={record.model or "-"} '
                    f"router={record.router_name} policy={record.policy or '-'} "
                    f"worker={record.worker or '-'} status={record.status} bytes={record.sent} "
                    f"duration={record.duration:.6f} ttft={'-' if ttft is None else f'{ttft:.6f}'} "
                    f"tokens_in={record.tokens_in} tokens_out={record.tokens_out} "
                    f"retries={record.retries} outcome={record.outcome_name}")
        self._queue.put(line)

    def _drain(self, destination: str) -> None:
        fd = 2 if destination == "-" else os.open(destination, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            while True:
                line = self._queue.get()
                if line is _STOP:
                    return
                lines = [line]
                while True:  # a burst goes out in few writes; each line stays whole
                    try:
                        more = self._queue.get_nowait()
                    except queue.Empty:
                        break
                    if more is _STOP:
                        _write(fd, lines)
                        return
                    lines.append(more)
                _write(fd, lines)
        finally:
            if fd != 2:
                os.close(fd)

    def close(self) -> None:
        """Write what is queued, then stop the thread."""
        self._queue.put(_STOP)
        self._thread.join(timeout=5.0)


def _write(fd: int, lines: list[str]) -> None:
    data = ("\n".join(lines) + "\n").encode()
    try:
        # O_APPEND: one write per batch is placed whole at the end of the file, whatever the
        # other proxies write meanwhile (a pipe or terminal: up to PIPE_BUF bytes whole).
        while data:
            data = data[os.write(fd, data):]
    except OSError as exc:
        print(f"shardgate access log: {exc}", file=sys.stderr)


def _now() -> str:
    now = time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now * 1000) % 1000:03d}Z"
