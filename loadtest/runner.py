"""``loadtest/run``: an honest load test in one command (mock fleet + router + headless locust).

Role: start ``--workers-per-model`` mock workers per model (``shardgate mock-worker`` with
``--ttft``/``--tps``/``--output-tokens``, paced like a GPU), start ``shardgate serve`` in front of
them on a free port, wait until every model is served, run locust headless with
``loadtest/locustfile.py`` (constant load, or ``--shape step``), then print a summary: one request
row per kind (chat, stream, session) and the Aggregated row, the token-level figures (TTFT, ITL,
tokens/s, output tokens) and each worker's share of the requests. The results directory gets
locust's CSVs (``locust_stats.csv``, ``locust_stats_history.csv``, ``locust_failures.csv``...), the
token metrics (``locust_llm.csv``, ``locust_llm.json``), ``report.html``, ``locust.log``,
``router.log``, ``summary.txt`` and ``summary.json``. The last line printed is the summary as one
JSON object, for tools (the test reads it).

Invariants:
- Every process started here is stopped before the summary is printed: on success, on an error,
  on Ctrl-C or SIGTERM (locust gets one SIGINT, so it still writes its reports; the fleet goes
  through ``shardgate.launch``, which stops each process group).
- The runner reports and does not judge: exit 0 when a summary was produced (failed requests are
  in it), 2 when the run itself could not be made, 130 when interrupted before locust started.
"""

from __future__ import annotations

import argparse
import csv
import importlib.util
import json
import os
import re
import signal
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from types import FrameType
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# The mock workers and the router are started as ``python -m ...``: make the checkout importable
# for them (and for this process) even when the project is not installed.
sys.path.insert(0, str(ROOT))
os.environ["PYTHONPATH"] = os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p)

from shardgate import launch  # noqa: E402  (needs the path above)

KINDS = ("chat", "stream", "session")
READY_TIMEOUT = 30.0


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="loadtest/run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--users", "-u", type=int, default=30, help="locust users (constant shape)")
    p.add_argument("--spawn-rate", "-r", type=float, default=10.0, help="users started per second")
    p.add_argument("--run-time", "-t", default="45s", help="locust run time (constant shape), e.g. 45s, 2m")
    p.add_argument("--shape", choices=("constant", "step"), default="constant",
                   help="step: loadtest/step_shape.py (--step-users more every --step-seconds)")
    p.add_argument("--step-users", type=int, default=10)
    p.add_argument("--step-seconds", type=float, default=15.0)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--models", default="llama-3.1-8b,qwen-2.5", help="comma list; each gets its workers")
    p.add_argument("--workers-per-model", type=int, default=2)
    p.add_argument("--ttft", type=float, default=0.15, help="mock workers: seconds to the first token")
    p.add_argument("--tps", type=float, default=50.0, help="mock workers: tokens per second per stream")
    p.add_argument("--output-tokens", type=int, default=64, help="mock workers: tokens per answer")
    p.add_argument("--max-tokens", type=int, default=None,
                   help="requests' max_tokens (default: --output-tokens)")
    p.add_argument("--session-turns", type=int, default=4)
    p.add_argument("--proxies", type=int, default=2, help="router proxy processes")
    p.add_argument("--policy", default=None,
                   help="router policy, e.g. session_affinity or cache_aware (default: the router's)")
    p.add_argument("--router-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for shardgate serve (repeat; e.g. --router-arg=--session-ttl=60)")
    p.add_argument("--locust-arg", action="append", default=[], metavar="ARG",
                   help="extra flag for locust (repeat)")
    p.add_argument("--results", type=Path, default=None,
                   help="results directory (default: loadtest/results/<date-time>)")
    return p.parse_args(argv)


def get_json(url: str, timeout: float = 5.0) -> Any:
    with urllib.request.urlopen(url, timeout=timeout) as resp:
        return json.loads(resp.read())


def wait_served(router_url: str, models: list[str]) -> None:
    """Until ``/v1/models`` lists every model: the router discovers them from the workers, and a
    request sent before that would be a 404 that says nothing about load."""
    deadline = time.monotonic() + READY_TIMEOUT
    seen: set[str] = set()
    while time.monotonic() < deadline:
        try:
            seen = {m["id"] for m in get_json(router_url + "/v1/models")["data"]}
        except (OSError, ValueError, KeyError):
            seen = set()
        if set(models) <= seen:
            return
        time.sleep(0.2)
    raise RuntimeError(f"the router did not serve {sorted(set(models) - seen)} within {READY_TIMEOUT} s")


def results_dir(arg: Path | None) -> Path:
    if arg is not None:
        arg.mkdir(parents=True, exist_ok=True)
        return arg
    base = HERE / "results"
    base.mkdir(exist_ok=True)
    ignore = base / ".gitignore"
    if not ignore.exists():  # results are per machine: keep them out of git without touching the root
        ignore.write_text("*\n")
    path = base / time.strftime("%Y%m%d-%H%M%S")
    path.mkdir()
    return path


def locust_argv(args: argparse.Namespace, host: str, out: Path) -> list[str]:
    files = [str(HERE / "locustfile.py")]
    if args.shape == "step":
        files.append(str(HERE / "step_shape.py"))
    argv = [sys.executable, "-m", "locust", "-f", ",".join(files), "--headless", "-H", host,
            "--csv", str(out / "locust"), "--html", str(out / "report.html"), "--only-summary",
            # In-flight requests finish at the end (a stream cut short would be recorded nowhere).
            "--stop-timeout", "10",
            "--models", args.models, "--max-tokens", str(args.max_tokens or args.output_tokens),
            "--session-turns", str(args.session_turns)]
    if args.shape == "step":
        argv += ["--step-users", str(args.step_users), "--step-seconds", str(args.step_seconds),
                 "--steps", str(args.steps)]
    else:
        argv += ["-u", str(args.users), "-r", str(args.spawn_rate), "-t", args.run_time]
    return argv + list(args.locust_arg)


def timespan(text: str) -> float:
    """Locust's ``-t`` syntax (``90``, ``45s``, ``2m``, ``1h30m``) in seconds. Parsed here because
    importing locust in this process would monkey-patch it with gevent after ``launch`` started its
    reader threads (it hangs)."""
    match = re.fullmatch(r"(?:(\d+)h)?(?:(\d+)m)?(?:(\d+)s)?", text.strip())
    if text.strip().isdigit():
        return float(text)
    if not text.strip() or match is None:
        raise ValueError(f"not a run time: {text!r} (e.g. 45s, 2m, 1h30m)")
    hours, minutes, seconds = (int(g or 0) for g in match.groups())
    return float(hours * 3600 + minutes * 60 + seconds)


def planned_seconds(args: argparse.Namespace) -> float:
    if args.shape == "step":
        return float(args.steps * args.step_seconds)
    return timespan(args.run_time)


class Interrupted(Exception):
    """SIGTERM, turned into the same path as Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise Interrupted()


def run_locust(argv: list[str], log: Path, limit: float) -> tuple[int, bool]:
    """Runs locust to its end; returns (exit code, interrupted). On Ctrl-C/SIGTERM locust gets one
    SIGINT (its own session, so a terminal's Ctrl-C reaches it only through us, once) and writes
    its reports as it stops."""
    with log.open("w") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                start_new_session=True)
        interrupted = False
        try:
            try:
                return proc.wait(timeout=limit), False
            except (KeyboardInterrupt, Interrupted):
                interrupted = True
                print("\ninterrupted: stopping locust (it writes its reports first)", flush=True)
            except subprocess.TimeoutExpired:
                print(f"locust still running after {limit:.0f} s: stopping it", file=sys.stderr)
            proc.send_signal(signal.SIGINT)
            return proc.wait(timeout=30), interrupted
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def read_request_rows(path: Path) -> list[dict[str, Any]]:
    rows = []
    with path.open(newline="") as f:
        for r in csv.DictReader(f):
            rows.append({"name": r["Name"], "type": r["Type"], "count": int(r["Request Count"]),
                         "failures": int(r["Failure Count"]), "rps": round(float(r["Requests/s"]), 2),
                         "mean_ms": round(float(r["Average Response Time"]), 1),
                         "p50_ms": _int(r["50%"]), "p90_ms": _int(r["90%"]), "p99_ms": _int(r["99%"]),
                         "max_ms": round(float(r["Max Response Time"]), 1)})
    order = {k: i for i, k in enumerate(KINDS)}
    # The kinds first in a fixed order, anything else after, Aggregated last.
    rows.sort(key=lambda r: (r["name"] == "Aggregated", order.get(str(r["name"]), len(order)), r["name"]))
    return rows


def read_steps(path: Path, step_users: int, steps: int) -> list[dict[str, Any]]:
    """Per step of the step shape, from locust's ``_stats_history.csv`` (one Aggregated line a
    second): requests completed while the step's user count held, their rate, and locust's p50/p95
    on the step's last line (locust computes those over the last 10 s, so they describe the step
    only when it lasts 10 s or more)."""
    with path.open(newline="") as f:
        lines = [r for r in csv.DictReader(f) if r["Name"] == "Aggregated"]
    out = []
    before: dict[str, str] | None = None
    for k in range(1, steps + 1):
        held = [r for r in lines if int(r["User Count"]) == k * step_users]
        if not held:
            continue
        last = held[-1]
        start = before or held[0]
        seconds = float(last["Timestamp"]) - float(start["Timestamp"])
        done = int(last["Total Request Count"]) - int(start["Total Request Count"])
        out.append({"users": k * step_users, "requests": done,
                    "rps": round(done / seconds, 2) if seconds > 0 else None,
                    "p50_ms": _int(last["50%"]), "p95_ms": _int(last["95%"])})
        before = last
    return out


def _int(value: str) -> int | None:
    return None if value in ("", "N/A") else int(float(value))


def format_summary(header: list[str], requests: list[dict[str, Any]], llm: dict[str, Any],
                   per_worker: dict[str, int], steps: list[dict[str, Any]]) -> str:
    lines = [*header, "",
             "Requests (streams timed to their last byte; Aggregated = the rows above, nothing else):"]
    head = (f"{'name':<12} {'count':>7} {'fails':>6} {'req/s':>7} {'mean ms':>8} {'p50':>6} {'p90':>6} "
            f"{'p99':>6} {'max':>7}")
    lines += [head, "-" * len(head)]
    for r in requests:
        def ms(v: int | None) -> str:
            return "-" if v is None else str(v)
        lines.append(f"{r['name']:<12} {r['count']:>7} {r['failures']:>6} {r['rps']:>7.2f} "
                     f"{r['mean_ms']:>8.1f} {ms(r['p50_ms']):>6} {ms(r['p90_ms']):>6} {ms(r['p99_ms']):>6} "
                     f"{r['max_ms']:>7.0f}")
    lines += ["", "Token-level metrics (their own store; never counted as requests):"]
    head = (f"{'metric':<16} {'kind':<8} {'count':>7} {'mean':>8} {'p50':>8} {'p90':>8} {'p99':>8} "
            f"{'max':>8}")
    lines += [head, "-" * len(head)]
    for r in llm.get("rows", []):
        label = r["metric"] if r["unit"] == "tokens" else f"{r['metric']} ({r['unit']})"
        lines.append(f"{label:<16} {r['kind']:<8} {r['count']:>7} {r['mean']:>8.1f} {r['p50']:>8.1f} "
                     f"{r['p90']:>8.1f} {r['p99']:>8.1f} {r['max']:>8.1f}")
    rates = ", ".join(f"{k} {v}" for k, v in llm.get("output_tokens_per_s", {}).items())
    lines.append(f"output tokens/s over {llm.get('duration_s', 0)} s: {rates}")
    if steps:
        lines += ["", "Steps (requests completed while each user count held; p50/p95: locust's last 10 s):",
                  f"{'users':>6} {'requests':>9} {'req/s':>7} {'p50':>6} {'p95':>6}"]
        for st in steps:
            lines.append(f"{st['users']:>6} {st['requests']:>9} {st['rps'] or 0:>7.2f} "
                         f"{st['p50_ms'] or '-':>6} {st['p95_ms'] or '-':>6}")
    if per_worker:
        lines += ["", "Requests per worker (router's /workers): "
                  + ", ".join(f"{url} {n}" for url, n in per_worker.items())]
    return "\n".join(lines)


def save_router_log(router: launch.Launched, path: Path) -> None:
    path.write_text("".join(router.stdout_lines) + router.stderr_text())


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        planned_seconds(args)
    except ValueError as exc:
        print(f"loadtest/run: {exc}", file=sys.stderr)
        return 2
    if importlib.util.find_spec("locust") is None:
        print("loadtest/run: locust is not installed: python3 -m pip install -e '.[load]'", file=sys.stderr)
        return 2
    signal.signal(signal.SIGTERM, _on_sigterm)
    models = [m for m in args.models.split(",") if m]
    out = results_dir(args.results)
    workers: list[launch.Launched] = []
    router: launch.Launched | None = None
    per_worker: dict[str, int] = {}
    worker_flags = ["--ttft", str(args.ttft), "--tps", str(args.tps),
                    "--output-tokens", str(args.output_tokens)]
    try:
        for model in models:
            for _ in range(args.workers_per_model):
                workers.append(launch.mock_worker([model], *worker_flags))
        router_flags = ["--port", str(launch.free_port()), "--proxies", str(args.proxies)]
        if args.policy:
            router_flags += ["--policy", args.policy]
        router = launch.router([w.url for w in workers], *router_flags, *args.router_arg)
        router_url = router.url
        wait_served(router_url, models)
        seconds = planned_seconds(args)
        print(f"loadtest/run: {len(workers)} mock workers, router on {router.url}, locust for {seconds:.0f} s"
              f" -> {out}", flush=True)
        code, interrupted = run_locust(locust_argv(args, router.url, out), out / "locust.log",
                                       limit=seconds + 60)
        try:
            rows = get_json(router.url + "/workers")["workers"]
            per_worker = {w["url"]: int(w.get("requests", 0)) for w in rows}
        except (OSError, ValueError, KeyError):
            per_worker = {}
    except (KeyboardInterrupt, Interrupted):
        print("\nloadtest/run: interrupted before the load started", file=sys.stderr)
        return 130
    except RuntimeError as exc:
        print(f"loadtest/run: {exc}", file=sys.stderr)
        return 2
    finally:
        if router is not None:
            router.stop()
            save_router_log(router, out / "router.log")
        for worker in workers:
            worker.stop()

    stats_csv = out / "locust_stats.csv"
    llm_json = out / "locust_llm.json"
    if not stats_csv.exists() or not llm_json.exists():
        tail = (out / "locust.log").read_text(errors="replace").splitlines()[-40:]
        print(f"loadtest/run: locust exited {code} without its reports; its log ends with:\n"
              + "\n".join(tail), file=sys.stderr)
        return 2
    requests = read_request_rows(stats_csv)
    history = out / "locust_stats_history.csv"
    steps = (read_steps(history, args.step_users, args.steps)
             if args.shape == "step" and history.exists() else [])
    llm = json.loads(llm_json.read_text())
    if args.shape == "step":
        load = f"step load: {args.step_users} more users every {args.step_seconds:g} s, {args.steps} steps"
    else:
        load = f"{args.users} users (spawn {args.spawn_rate:g}/s) for {args.run_time}"
    header = [f"shardgate load test: {load}{' (interrupted)' if interrupted else ''}",
              f"fleet: {len(workers)} mock workers ({', '.join(models)}; ttft {args.ttft:g} s, "
              f"{args.tps:g} tok/s, {args.output_tokens} tokens), router with {args.proxies} proxies, "
              f"policy {args.policy or 'default'}",
              f"results: {out} (report.html, locust_stats.csv, locust_llm.csv, locust.log, router.log)"]
    text = format_summary(header, requests, llm, per_worker, steps)
    record = {"requests": requests, "steps": steps, "llm": llm, "per_worker": per_worker,
              "router": router_url, "workers": [w.url for w in workers], "locust_exit_code": code,
              "interrupted": interrupted, "results": str(out),
              "files": sorted(p.name for p in out.iterdir())}
    (out / "summary.txt").write_text(text + "\n")
    (out / "summary.json").write_text(json.dumps(record, indent=1) + "\n")
    print(text)
    print(json.dumps(record), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
