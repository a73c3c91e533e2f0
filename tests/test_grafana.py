"""deploy/grafana/shardgate.json: valid JSON, and every PromQL expression names only metrics we export.

Names are parsed out of each expression (identifiers followed by a selector, a range or a
grouping, minus PromQL's own functions and keywords) and compared with the one declaration the
exposition and docs/metrics.md come from (shm.metricdefs).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from shm.metricdefs import exported_names

DASHBOARD = Path(__file__).parent.parent / "deploy" / "grafana" / "shardgate.json"
_NAME = re.compile(r"\b(shardgate_[a-zA-Z0-9_]+)")


def expressions(node: Any) -> list[str]:
    if isinstance(node, dict):
        found = [node["expr"]] if isinstance(node.get("expr"), str) else []
        if isinstance(node.get("query"), str) and "(" in node["query"]:
            found.append(node["query"])
        return found + [e for value in node.values() for e in expressions(value)]
    if isinstance(node, list):
        return [e for value in node for e in expressions(value)]
    return []


def test_dashboard_is_valid_and_names_only_exported_metrics() -> None:
    doc = json.loads(DASHBOARD.read_text())
    assert doc["panels"] and doc["title"]
    exprs = expressions(doc)
    assert len(exprs) >= 14
    exported = exported_names()
    named = set()
    for expr in exprs:
        names = _NAME.findall(expr)
        assert names, expr
        named.update(names)
        unknown = [n for n in names if n not in exported]
        assert not unknown, (expr, unknown)
    # The dashboard covers what issue 12 asks to see.
    for needed in ("shardgate_time_to_first_token_seconds_bucket",
                   "shardgate_request_duration_seconds_bucket",
                   "shardgate_time_per_output_token_seconds_bucket", "shardgate_output_tokens_total",
                   "shardgate_model_requests_total", "shardgate_worker_healthy",
                   "shardgate_retries_by_reason_total", "shardgate_proxy_up"):
        assert needed in named, needed
