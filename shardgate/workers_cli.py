"""``shardgate workers ...``: the admin API from the command line.

Role: a thin client of :mod:`coordinator.admin`. Where the API is: ``--admin URL``, else
``SHARDGATE_ADMIN_URL``, else ``admin_host``/``admin_port`` from the same settings sources as
``serve`` (``--config`` file, ``SHARDGATE_*`` environment). The token: ``--token-file``, else the
settings' ``admin_token_file``, else ``SHARDGATE_ADMIN_TOKEN``; it never goes on the command line.

Exit codes: 0 done, 1 the API refused or could not be reached (its message is printed), 2 usage or
configuration error.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from coordinator.config import ENV_PREFIX, ConfigError, load_config

TIMEOUT = 15.0


class Failed(Exception):
    exit_code = 1


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="shardgate workers", description="Manage a running router's workers "
                                "through its admin API.")
    p.add_argument("--admin", metavar="URL", default=os.environ.get(ENV_PREFIX + "ADMIN_URL"),
                   help="admin API base URL (default: SHARDGATE_ADMIN_URL, or admin_host:admin_port "
                        "from the config)")
    p.add_argument("--config", "-c", metavar="FILE", default=os.environ.get(ENV_PREFIX + "CONFIG"),
                   help="deployment file to take admin_host, admin_port and admin_token_file from")
    p.add_argument("--token-file", metavar="FILE", help="file holding the bearer token")
    p.add_argument("--json", action="store_true", help="print the API's JSON answer")
    sub = p.add_subparsers(dest="action", required=True, metavar="ACTION")
    sub.add_parser("list", help="list the workers")

    def selector(q: argparse.ArgumentParser) -> None:
        q.add_argument("url")
        q.add_argument("--model", help="only this model's entry of the worker")
        q.add_argument("--type", choices=["regular", "prefill", "decode"])

    add = sub.add_parser("add", help="add a worker")
    selector(add)
    add.add_argument("--weight", type=int)
    add.add_argument("--shard")
    add.add_argument("--label", action="append", default=[], metavar="KEY=VALUE")
    selector(sub.add_parser("remove", help="remove a worker now (in-flight requests finish)"))
    drain = sub.add_parser("drain", help="stop new requests to a worker; it leaves once idle")
    selector(drain)
    drain.add_argument("--cancel", action="store_true", help="cancel a drain in progress")
    drain.add_argument("--wait", action="store_true", help="return once the worker has left")
    weight = sub.add_parser("weight", help="change a worker's weight")
    selector(weight)
    weight.add_argument("weight", type=int)
    sub.add_parser("shards", help="list shards")
    shard_add = sub.add_parser("shard-add", help="put workers into a model's shard")
    shard_add.add_argument("model")
    shard_add.add_argument("shard")
    shard_add.add_argument("urls", nargs="+", metavar="URL")
    shard_remove = sub.add_parser("shard-remove", help="remove a shard (its workers leave)")
    shard_remove.add_argument("model")
    shard_remove.add_argument("shard")
    return p


def _target(args: argparse.Namespace) -> tuple[str, str]:
    settings = load_config(argparse.Namespace(config=args.config, worker=[])).settings
    base = args.admin
    if not base:
        if not settings.admin_port:
            raise ConfigError("no admin API address: give --admin URL, set SHARDGATE_ADMIN_URL, or "
                              "admin_port in the config")
        base = f"http://{settings.admin_host}:{settings.admin_port}"
    token_file = args.token_file or settings.admin_token_file
    if token_file:
        try:
            token = Path(token_file).read_text().strip()
        except OSError as exc:
            raise ConfigError(f"token file {token_file}: {exc.strerror}") from None
    else:
        token = os.environ.get(ENV_PREFIX + "ADMIN_TOKEN", "").strip()
    return base.rstrip("/"), token


def call(base: str, token: str, method: str, path: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(base + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=TIMEOUT) as resp:
            return json.loads(resp.read() or b"{}")
    except urllib.error.HTTPError as err:
        try:
            message = json.loads(err.read())["error"]["message"]
        except (ValueError, KeyError, TypeError):
            message = err.reason
        raise Failed(f"{method} {path}: {err.code} {message}") from None
    except (urllib.error.URLError, OSError) as exc:
        raise Failed(f"cannot reach the admin API at {base}: {getattr(exc, 'reason', exc)}") from None


def _selector(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"url": args.url}
    if args.model:
        out["model"] = args.model
    if args.type:
        out["type"] = args.type
    return out


def _table(doc: dict[str, Any]) -> str:
    rows = [("URL", "MODELS", "WEIGHT", "SOURCE", "STATE", "IN-FLIGHT")]
    for w in doc["workers"]:
        state = "draining" if w["draining"] else "ejected" if w["ejected"] else \
            "healthy" if w["healthy"] else "unhealthy"
        rows.append((w["url"], ",".join(w["models"]) or "-", str(w["weight"]), w["source"] or "-",
                     state, str(w["in_flight"])))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(widths[i]) for i, c in enumerate(r)).rstrip() for r in rows]
    lines += [f"notice: {n}" for n in doc.get("notices", [])]
    return "\n".join(lines)


def run(args: argparse.Namespace) -> Any:
    base, token = _target(args)
    action = args.action
    if action == "list":
        doc = call(base, token, "GET", "/admin/workers")
        return doc if args.json else _table(doc)
    if action == "add":
        body = _selector(args)
        if args.weight is not None:
            body["weight"] = args.weight
        if args.shard:
            body["shard"] = args.shard
        labels = dict(item.split("=", 1) for item in args.label if "=" in item)
        if labels:
            body["labels"] = labels
        doc = call(base, token, "POST", "/admin/workers", body)
        return doc if args.json else f"added {doc['worker']['url']} (generation {doc['generation']})"
    if action == "remove":
        doc = call(base, token, "POST", "/admin/workers/remove", _selector(args))
        return doc if args.json else f"removed {args.url} (generation {doc['generation']})"
    if action == "drain":
        doc = call(base, token, "POST", "/admin/workers/drain", {**_selector(args), "cancel": args.cancel})
        if args.cancel:
            return doc if args.json else f"drain cancelled for {args.url}"
        if args.wait:
            while any(w["url"] == doc["draining"][0]["url"]
                      for w in call(base, token, "GET", "/admin/workers")["workers"]):
                time.sleep(0.5)
            return doc if args.json else f"{args.url} drained and left"
        return doc if args.json else f"draining {args.url} (generation {doc['generation']})"
    if action == "weight":
        doc = call(base, token, "POST", "/admin/workers/weight", {**_selector(args), "weight": args.weight})
        return doc if args.json else f"weight of {args.url} is now {args.weight}"
    if action == "shards":
        doc = call(base, token, "GET", "/admin/shards")
        if args.json:
            return doc
        return "\n".join(f"{m}  {s}  {' '.join(urls)}" for m, by in sorted(doc["shards"].items())
                         for s, urls in by.items()) or "no shards"
    if action == "shard-add":
        doc = call(base, token, "POST", "/admin/shards", {"model": args.model, "shard": args.shard,
                                                          "workers": args.urls})
        return doc if args.json else f"shard {args.shard} of {args.model}: {' '.join(doc['workers'])}"
    doc = call(base, token, "POST", "/admin/shards/remove", {"model": args.model, "shard": args.shard})
    return doc if args.json else f"shard {args.shard} of {args.model} removed: {' '.join(doc['removed'])}"


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        out = run(args)
    except ConfigError as exc:
        print(f"shardgate workers: {exc}", file=sys.stderr)
        return 2
    except Failed as exc:
        print(f"shardgate workers: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(out, indent=2) if not isinstance(out, str) else out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
