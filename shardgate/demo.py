"""``shardgate demo``: the router with a small mock fleet, no configuration needed.

Role: start four mock workers (two models, two workers each, streaming at a visible pace), run
the real router in front of them (coordinator in this process, proxies as usual), print
ready-to-paste curl lines, and run until Ctrl-C. Everything stops together.
"""

from __future__ import annotations

import argparse
import sys

import uvloop

from coordinator.arbiter import Coordinator
from coordinator.config import Config, ConfigError
from shardgate import launch
from shm.schema import WorkerSpec
from shm.settings import Settings

MODELS = ("llama-3.1-8b", "qwen-2.5")
WORKERS_PER_MODEL = 2


def curl_lines(base: str) -> str:
    chat = ('{"model":"llama-3.1-8b","messages":[{"role":"user","content":"Hello!"}]}')
    stream = ('{"model":"qwen-2.5","stream":true,"messages":[{"role":"user","content":"Tell me a story"}]}')
    return "\n".join([
        "",
        "Try it (in another terminal):",
        f"  curl -s {base}/v1/models",
        f"  curl -s {base}/v1/chat/completions -H 'content-type: application/json' -d '{chat}'",
        f"  curl -sN {base}/v1/chat/completions -H 'content-type: application/json' -d '{stream}'",
        f"  curl -s {base}/workers",
        f"  curl -s {base}/stats",
        f"  curl -s {base}/metrics",
        "",
        f"Live status page: {base}/dashboard",
        "",
        "Ctrl-C stops the router and the mock workers.",
        "",
    ])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="shardgate demo", description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--port", type=int, default=8080, help="router port (default 8080)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--proxies", type=int, default=2, help="proxy processes (default 2)")
    args = parser.parse_args(argv)
    workers: list[launch.Launched] = []
    try:
        for model in MODELS:
            for _ in range(WORKERS_PER_MODEL):
                workers.append(launch.mock_worker([model], "--ttft", "0.2", "--tps", "20",
                                                  "--output-tokens", "24"))
        specs = tuple(WorkerSpec(url=w.url, model=m) for w, m in
                      zip(workers, [m for m in MODELS for _ in range(WORKERS_PER_MODEL)], strict=True))
        settings = Settings(host=args.host, port=args.port, proxies=args.proxies, health_interval=5.0)
        coordinator = Coordinator(Config(settings=settings, workers=specs))
        coordinator.on_ready = lambda: print(curl_lines(f"http://{args.host}:{args.port}"), flush=True)
        return uvloop.run(coordinator.run())
    except ConfigError as exc:
        print(f"shardgate demo: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    finally:
        for worker in workers:
            worker.stop()
