"""Time to first token through the PD router vs the regular router, with mock workers.

Role: measure what the HTTP prefill/decode path adds to a streaming request's time to first token
(TTFT): the prefill round trip and the KV handoff, in both dialects, against a regular request.

Setup (real processes, started by ``shardgate.launch`` as an operator would): one regular mock
worker (model ``regular``), a two-phase PD pair (model ``pd-two-phase``: one ``--role prefill``,
one ``--role decode``) and a bootstrap PD pair (model ``pd-bootstrap``, ``pd_dialect: bootstrap``,
the prefill's ``bootstrap_port`` its own port), all behind one router (``--proxies 1``). So
``regular`` takes ``http_regular`` and the other two take ``http_pd`` (checked before measuring).
Every mock has the same ``ttft`` and ``tps``. For each ``--ttft`` value the mocks are reconfigured
at runtime (``POST /mock/config``) and measured again; ``--ttft 0`` isolates the router and
protocol cost from the simulated prefill compute.

Method: one keep-alive client connection per scenario; N sequential streaming chat requests per
scenario, interleaved (regular, two-phase, bootstrap, regular, ...) after a warm-up, so drift hits
all three alike. TTFT is the time from writing the request to receiving the first SSE ``data:``
event; every stream is read to its end and its text checked against the mock's deterministic
output. Reported: median and p90 (nearest rank) per scenario, and each PD dialect minus regular.

What the mock adds, so the figures read right: a two-phase prefill answers after its ``ttft`` (one
token), so two-phase TTFT is about regular + prefill ``ttft`` + one extra HTTP round trip; a
bootstrap decode polls the prefill's room every ``mock_pd.POLL_SECONDS`` (20 ms), so bootstrap
TTFT includes up to one poll interval. Prints a table and, last, one JSON line. Usage::

    PYTHONPATH=. python3 loadtest/bench_pd_ttft.py
    PYTHONPATH=. python3 loadtest/bench_pd_ttft.py -n 100 --ttft 0.05 0 --tps 100
"""

from __future__ import annotations

import argparse
import json
import math
import socket
import statistics
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

from shardgate import launch
from shardgate.mocks import pd_worker as mock_pd
from shardgate.mocks.payloads import expected_text

SCENARIOS = {"regular": "regular", "two_phase": "pd-two-phase", "bootstrap": "pd-bootstrap"}
EXPECTED_ROUTER = {"regular": "http_regular", "two_phase": "http_pd", "bootstrap": "http_pd"}


def post_json(url: str, body: dict[str, Any], headers: dict[str, str] | None = None,
              ) -> tuple[int, dict[str, str], bytes]:
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"content-type": "application/json", **(headers or {})})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return resp.status, {k.lower(): v for k, v in resp.headers.items()}, resp.read()


class StreamClient:
    """One keep-alive HTTP/1.1 connection; times each streaming request to its first data event."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//", 1)[1].rsplit(":", 1)
        self.sock = socket.create_connection((host, int(port)), timeout=30)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def close(self) -> None:
        self.sock.close()

    def _fill(self) -> None:
        data = self.sock.recv(65536)
        if not data:
            raise ConnectionError("the router closed the connection")
        self.buf += data

    def _until(self, marker: bytes) -> bytes:
        while (i := self.buf.find(marker)) < 0:
            self._fill()
        out, self.buf = self.buf[:i + len(marker)], self.buf[i + len(marker):]
        return out

    def _chunk(self) -> bytes:
        size = int(self._until(b"\r\n").split(b";")[0], 16)
        while len(self.buf) < size + 2:
            self._fill()
        data, self.buf = self.buf[:size], self.buf[size + 2:]
        return data

    def stream(self, model: str, prompt: str, max_tokens: int) -> tuple[float, str]:
        """(seconds to the first data event, the streamed text) of one chat stream."""
        body = json.dumps({"model": model, "stream": True, "max_tokens": max_tokens,
                           "messages": [{"role": "user", "content": prompt}]}).encode()
        request = (b"POST /v1/chat/completions HTTP/1.1\r\nhost: bench\r\ncontent-type: application/json\r\n"
                   b"content-length: %d\r\n\r\n%s" % (len(body), body))
        start = time.perf_counter()
        self.sock.sendall(request)
        head = self._until(b"\r\n\r\n")
        status = int(head.split(b" ", 2)[1])
        if status != 200:
            raise RuntimeError(f"{model}: status {status}: {head!r}")
        got, ttft = b"", None
        while chunk := self._chunk():
            got += chunk
            if ttft is None and b"data: " in got:
                ttft = time.perf_counter() - start
        if ttft is None:
            raise RuntimeError(f"{model}: a stream without data events")
        text = []
        for event in got.split(b"\n\n"):
            if event.startswith(b"data: {"):
                for choice in json.loads(event[6:])["choices"]:
                    text.append(choice.get("delta", {}).get("content") or "")
        return ttft, "".join(text)


def p90(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[max(math.ceil(0.9 * len(ordered)) - 1, 0)]


def start_fleet(tmp: Path, ttft: float, tps: float) -> tuple[list[launch.Launched], launch.Launched]:
    extra = ("--ttft", str(ttft), "--tps", str(tps))
    procs: list[launch.Launched] = []
    try:
        regular = launch.mock_worker(["regular"], *extra)
        procs.append(regular)
        workers: list[dict[str, Any]] = [{"url": regular.url, "model": "regular", "type": "regular"}]
        for model, bootstrap in (("pd-two-phase", False), ("pd-bootstrap", True)):
            prefill = launch.mock_worker([model], "--role", "prefill", *extra)
            decode = launch.mock_worker([model], "--role", "decode", *extra)
            procs += [prefill, decode]
            entry: dict[str, Any] = {"url": prefill.url, "model": model, "type": "prefill"}
            if bootstrap:
                entry["bootstrap_port"] = int(prefill.url.rsplit(":", 1)[1])
            workers += [entry, {"url": decode.url, "model": model, "type": "decode"}]
        config = tmp / "deploy.yaml"
        config.write_text(json.dumps({"workers": workers,
                                      "models": {"pd-bootstrap": {"pd_dialect": "bootstrap"}}}))
        router = launch.router([], "--port", str(launch.free_port()), "--proxies", "1", config=str(config))
        procs.append(router)
    except BaseException:
        for proc in procs:
            proc.stop()
        raise
    return procs, router


def check_routes(router: launch.Launched) -> None:
    for name, model in SCENARIOS.items():
        body = {"model": model, "max_tokens": 1, "messages": [{"role": "user", "content": "route?"}]}
        _, headers, _ = post_json(router.url + "/v1/chat/completions", body, {"X-Shardgate-Debug": "1"})
        decision = json.loads(headers["x-shardgate-decision"])
        if decision["router"] != EXPECTED_ROUTER[name]:
            raise RuntimeError(f"{model} took {decision['router']}, expected {EXPECTED_ROUTER[name]}")


def configure(procs: list[launch.Launched], router: launch.Launched, ttft: float) -> None:
    for proc in procs:
        if proc is not router:
            post_json(proc.url + "/mock/config", {"ttft": ttft})


def measure(router: launch.Launched, n: int, warmup: int, max_tokens: int) -> dict[str, list[float]]:
    clients = {name: StreamClient(router.url) for name in SCENARIOS}
    samples: dict[str, list[float]] = {name: [] for name in SCENARIOS}
    try:
        for i in range(warmup + n):
            for name, model in SCENARIOS.items():
                prompt = f"ttft bench {name} {i}"
                ttft, text = clients[name].stream(model, prompt, max_tokens)
                if text != expected_text(prompt, max_tokens):
                    raise RuntimeError(f"{name}: wrong stream text {text!r}")
                if i >= warmup:
                    samples[name].append(ttft)
    finally:
        for client in clients.values():
            client.close()
    return samples


def summarize(samples: dict[str, list[float]]) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    base = samples["regular"]
    for name, values in samples.items():
        row = {"median_ms": statistics.median(values) * 1e3, "p90_ms": p90(values) * 1e3,
               "n": len(values)}
        if name != "regular":
            row["added_median_ms"] = row["median_ms"] - statistics.median(base) * 1e3
            row["added_p90_ms"] = row["p90_ms"] - p90(base) * 1e3
        out[name] = row
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("-n", type=int, default=50, help="measured requests per scenario (default 50)")
    parser.add_argument("--warmup", type=int, default=5, help="unmeasured requests per scenario first")
    parser.add_argument("--ttft", type=float, nargs="+", default=[0.05, 0.0],
                        help="mock time to first token in seconds; one run per value (default 0.05 0)")
    parser.add_argument("--tps", type=float, default=100.0, help="mock tokens per second (default 100)")
    parser.add_argument("--max-tokens", type=int, default=8, help="tokens per stream (default 8)")
    args = parser.parse_args(argv)

    results: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        procs, router = start_fleet(Path(tmp), args.ttft[0], args.tps)
        try:
            check_routes(router)
            for ttft in args.ttft:
                configure(procs, router, ttft)
                rows = summarize(measure(router, args.n, args.warmup, args.max_tokens))
                results.append({"mock_ttft_s": ttft, "scenarios": rows})
        finally:
            for proc in reversed(procs):
                proc.stop()

    print(f"TTFT through shardgate, {args.n} sequential streams per scenario, mock tps {args.tps:g}, "
          f"bootstrap poll {mock_pd.POLL_SECONDS * 1e3:g} ms")
    print(f"{'mock ttft':>9}  {'scenario':<10} {'router':<12} {'median ms':>9} {'p90 ms':>8} "
          f"{'+median ms':>10} {'+p90 ms':>8}")
    for result in results:
        for name, row in result["scenarios"].items():
            added = f"{'-':>10} {'-':>8}"
            if "added_median_ms" in row:
                added = f"{row['added_median_ms']:>10.2f} {row['added_p90_ms']:>8.2f}"
            print(f"{result['mock_ttft_s']:>8g}s  {name:<10} {EXPECTED_ROUTER[name]:<12} "
                  f"{row['median_ms']:>9.2f} {row['p90_ms']:>8.2f} {added}")
    print(json.dumps({"bench": "pd_ttft", "n": args.n, "tps": args.tps, "max_tokens": args.max_tokens,
                      "results": [{"mock_ttft_s": r["mock_ttft_s"],
                                   "scenarios": {k: {f: round(v, 3) for f, v in row.items()}
                                                 for k, row in r["scenarios"].items()}}
                                  for r in results]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
