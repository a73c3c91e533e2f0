"""Memory with many open connections: RSS of the proxies with 10,000 idle client connections.

Starts the real router (``--proxies 2`` by default) in front of one mock worker, measures the
proxies' RSS, opens N client connections (half idle after connecting, half holding a partial
request head, as slow clients do), measures again, checks that a request is still answered,
then closes everything. Prints one table and one JSON line. Loopback only; bounded in count and
time. Needs ``ulimit -n`` above N plus a margin (the client holds N sockets; the proxies too).

    PYTHONPATH=. python3 loadtest/idle_connections.py [--connections 10000] [--proxies 2]
"""

from __future__ import annotations

import argparse
import json
import socket
import sys
import time
import urllib.request

from shardgate import launch
from shardgate.launch import free_port, proxies_rss_mb


def chat_ok(url: str) -> bool:
    body = b'{"model":"m1","messages":[{"role":"user","content":"hi"}]}'
    req = urllib.request.Request(url + "/v1/chat/completions", data=body,
                                 headers={"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as resp:
        return resp.status == 200


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--connections", type=int, default=10_000)
    ap.add_argument("--proxies", type=int, default=2)
    args = ap.parse_args()
    worker = launch.mock_worker(["m1"])
    port = free_port()
    # header_timeout and keepalive_timeout long enough that nothing is closed while we measure
    router = launch.router([worker.url], "--port", str(port), "--proxies", str(args.proxies),
                           "--header-timeout", "120", "--keepalive-timeout", "120")
    socks: list[socket.socket] = []
    try:
        chat_ok(router.url)
        before = proxies_rss_mb(router)
        started = time.monotonic()
        for i in range(args.connections):
            s = socket.socket()
            s.setblocking(True)
            s.connect(("127.0.0.1", port))
            if i % 2:
                s.send(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: appl")
            socks.append(s)
        opened = time.monotonic() - started
        time.sleep(1.0)  # let the proxies accept and read what was sent (a measurement pause)
        during = proxies_rss_mb(router)
        served = chat_ok(router.url)
        result = {"connections": args.connections, "proxies": args.proxies, "rss_before_mb": round(before, 1),
                  "rss_with_connections_mb": round(during, 1),
                  "per_connection_kb": round((during - before) * 1024 / args.connections, 2),
                  "open_seconds": round(opened, 2), "request_served_meanwhile": served}
    finally:
        for s in socks:
            s.close()
        router.stop()
        worker.stop()
    print(f"{'connections':>12} {'RSS before':>11} {'RSS with':>9} {'per conn':>9} {'served':>7}")
    r = result
    print(f"{r['connections']:>12} {r['rss_before_mb']:>9.1f}MB {r['rss_with_connections_mb']:>7.1f}MB "
          f"{r['per_connection_kb']:>7.2f}KB {r['request_served_meanwhile']!s:>7}")
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
