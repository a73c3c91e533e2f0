"""A stop (SIGTERM) answers every connection the kernel already accepted.

Closing an SO_REUSEPORT listener resets the connections queued on it, and closing an idle
keep-alive connection races the client's next request. These tests make both situations certain
instead of likely: the proxy is frozen (SIGSTOP) while connections queue up and requests arrive,
the stop signal is delivered to it while it is frozen (it waits as a pending signal, visible in
``/proc``), and only then does the proxy run again, finding the signal and the connections at
once.
"""

from __future__ import annotations

import os
import signal
import socket
from collections.abc import Iterator
from typing import Any

import psutil
import pytest
from conftest import DEADLINE, chat, wait_for

from shardgate import launch

SIGTERM_BIT = 1 << (signal.SIGTERM - 1)


def request_bytes(host: str, content: str, keep_alive: bool = True) -> bytes:
    import json

    body = json.dumps(chat("m1", content=content)).encode()
    connection = b"" if keep_alive else b"Connection: close\r\n"
    return (b"POST /v1/chat/completions HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n%s\r\n%s" % (host.encode(), len(body), connection, body))


def read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes]:
    """One complete Content-Length response (what the router sends for a non-streamed chat)."""
    sock.settimeout(DEADLINE)
    data = b""
    while b"\r\n\r\n" not in data:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError(f"connection closed before a response head: {data!r}")
        data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in (line.partition(":") for line in lines[1:])}
    length = int(headers.get("content-length", "0"))
    while len(body) < length:
        chunk = sock.recv(65536)
        if not chunk:
            raise ConnectionError("connection closed inside the response body")
        body += chunk
    return int(lines[0].split()[1]), headers, body[:length]


def pending_sigterm(pid: int) -> bool:
    with open(f"/proc/{pid}/status") as status:
        for line in status:
            if line.startswith(("ShdPnd:", "SigPnd:")) and int(line.split()[1], 16) & SIGTERM_BIT:
                return True
    return False


@pytest.fixture
def router(start_worker: Any, start_router: Any) -> Iterator[tuple[launch.Launched, psutil.Process]]:
    worker = start_worker(["m1"])
    router = start_router([worker.url], "--proxies", "1")
    proxies = wait_for(lambda: psutil.Process(router.pid).children(), what="the proxy process")
    proxy = proxies[0]
    try:
        yield router, proxy
    finally:
        if proxy.is_running():
            proxy.resume()


def stop_while_frozen(router: launch.Launched, proxy: psutil.Process) -> None:
    """SIGTERM the coordinator; wait until it has passed the signal to the frozen proxy."""
    os.kill(router.pid, signal.SIGTERM)
    wait_for(lambda: pending_sigterm(proxy.pid), what="SIGTERM pending at the frozen proxy")


def test_connections_queued_on_the_listener_at_a_stop_are_served(router: Any) -> None:
    r, proxy = router
    host, port = r.url.split("//")[1].split(":")
    proxy.suspend()
    clients = []
    for i in range(20):  # the kernel completes these handshakes and queues them on the listener
        sock = socket.create_connection((host, int(port)), timeout=DEADLINE)
        sock.sendall(request_bytes(host, f"queued {i}"))
        clients.append(sock)
    stop_while_frozen(r, proxy)
    proxy.resume()
    answers = []
    for sock in clients:
        with sock:
            status, headers, _ = read_response(sock)
            answers.append((status, headers.get("connection")))
    assert answers == [(200, "close")] * len(clients)


def test_a_request_on_an_idle_keep_alive_connection_during_a_stop_is_answered(router: Any) -> None:
    r, proxy = router
    host, port = r.url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=DEADLINE) as sock:
        sock.sendall(request_bytes(host, "first"))
        assert read_response(sock)[0] == 200  # the connection is now idle, kept alive
        proxy.suspend()
        stop_while_frozen(r, proxy)
        sock.sendall(request_bytes(host, "second"))  # on the wire as the proxy wakes to its stop
        proxy.resume()
        status, _, _ = read_response(sock)
        assert status == 200  # answered (with Connection: close if the stop was seen first)
        assert sock.recv(1) == b""  # and the router closes the connection (after its linger)
