"""Log line formats shared by the coordinator and the proxies: ``text`` or ``json``.

Role: :func:`configure` sets up the root logger of a process once, from ``log_level`` and
``log_format`` (shm.settings), so ``--log-format json`` applies to every line either kind of
process writes (docs/logging.md).

Invariants: a JSON line is one object: ``time`` (ISO 8601, UTC), ``level``, ``process``
(``coordinator`` or ``proxy[N]``), ``logger``, ``message``, plus ``request_id`` when the call
passed ``extra={"request_id": ...}`` and ``exception`` when there is one. Text lines keep the
format the processes always had (``time process LEVEL message``).
"""

from __future__ import annotations

import logging
import sys
import time

import msgspec

_encode = msgspec.json.encode


class JsonFormatter(logging.Formatter):
    """One JSON object per log record."""

    def __init__(self, process: str) -> None:
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, object] = {
            "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname.lower(), "process": self.process, "logger": record.name,
            "message": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            line["request_id"] = request_id
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return _encode(line).decode()


def configure(level: str, fmt: str, process: str) -> None:
    """Configure the root logger of this process (stderr)."""
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter(process))
    else:
        handler.setFormatter(logging.Formatter(f"%(asctime)s {process} %(levelname)s %(message)s"))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper())
