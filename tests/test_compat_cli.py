"""A drop-in for sglang-router / vllm-router / production-stack users, and a CLI that feels native.

Command lines copied from their documentation start the real ``shardgate serve`` (through
``shardgate.launch``, like every end-to-end test) in front of real mock workers, and a chat is routed
through each. ``check-config`` is run as a subprocess: each bad configuration exits 2 with one line
naming the field. The generated references (docs/migration.md, docs/reference.md) must match their
declarations. Waits poll a condition (``wait_for``); nothing sleeps.
"""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import chat, free_port, get_json, http, wait_for, worker_stats

from coordinator import reference
from coordinator.compat import POLICY_ALIASES, migration_markdown
from shardgate import __version__, launch
from shm.settings import POLICY_NAMES

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "shardgate.cli"]


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=60, cwd=ROOT)


def serve(*argv: str) -> launch.Launched:
    """``shardgate serve ARGV`` exactly as given (plus one proxy), ready to route."""
    router = launch.router([], *argv, "--proxies", "1")
    wait_for(lambda: http("GET", router.url + "/readiness")[0] == 200, what="router ready")
    return router


def route_chat(router: launch.Launched, model: str = "m1") -> None:
    status, _, body = http("POST", router.url + "/v1/chat/completions", chat(model))
    assert status == 200, body
    assert json.loads(body)["choices"][0]["message"]["content"]


@pytest.fixture
def procs():
    started: list[launch.Launched] = []
    yield started
    for p in reversed(started):
        p.stop()


def mock(procs: list[launch.Launched], *extra: str, model: str = "m1") -> launch.Launched:
    w = launch.mock_worker([model], *extra)
    procs.append(w)
    return w


# -- their command lines ------------------------------------------------------------------------


def test_sglang_router_regular_command_line(procs) -> None:
    a, b = mock(procs), mock(procs)
    port = free_port()
    # sglang-router docs: python -m sglang_router.launch_router --worker-urls http://w1 http://w2 ...
    router = serve("--worker-urls", a.url, b.url, "--policy", "cache_aware",
                   "--host", "127.0.0.1", "--port", str(port))
    procs.append(router)
    assert router.url.endswith(f":{port}")
    route_chat(router)
    assert worker_stats(a)["requests"] + worker_stats(b)["requests"] == 1
    assert {w["url"] for w in get_json(router.url + "/workers")["workers"]} == {a.url, b.url}


def test_sglang_router_pd_command_line(procs) -> None:
    p, d = mock(procs, "--role", "prefill"), mock(procs, "--role", "decode")
    router = serve("--pd-disaggregation", "--prefill", p.url, "8998", "--decode", d.url,
                   "--prefill-policy", "cache_aware", "--decode-policy", "power_of_two",
                   "--host", "127.0.0.1", "--port", str(free_port()))
    procs.append(router)
    rows = {w["url"]: w for w in get_json(router.url + "/workers")["workers"]}
    assert rows[p.url]["type"] == "prefill" and rows[d.url]["type"] == "decode"
    route_chat(router)
    assert worker_stats(p)["requests"] == 1 and worker_stats(d)["requests"] == 1
    assert "http_pd" in json.dumps(get_json(router.url + "/routers"))
    assert "--prefill-policy cache_aware differs" in router.stderr_text()
    assert "pd_dialect: bootstrap" in router.stderr_text()


def test_vllm_router_command_lines(procs) -> None:
    a, b = mock(procs), mock(procs)
    # vllm-router README: vllm-router --worker-urls ... --policy consistent_hash
    router = serve("--worker-urls", a.url, b.url, "--policy", "consistent_hash",
                   "--port", str(free_port()), "--request-timeout-secs", "600", "--log-level", "warn",
                   "--max-concurrent-requests", "-1")
    procs.append(router)
    route_chat(router)
    p, d = mock(procs, "--role", "prefill"), mock(procs, "--role", "decode")
    pd = serve("--vllm-pd-disaggregation", "--prefill", p.url, "--decode", d.url,
               "--prefill-policy", "consistent_hash", "--decode-policy", "consistent_hash",
               "--port", str(free_port()))
    procs.append(pd)
    route_chat(pd)
    assert worker_stats(p)["requests"] == 1 and worker_stats(d)["requests"] == 1


def test_production_stack_command_line(procs) -> None:
    a, b = mock(procs, model="m1"), mock(procs, model="m2")
    router = serve("--static-backends", f"{a.url},{b.url}", "--static-models", "m1,m2",
                   "--routing-logic", "session", "--session-key", "x-user-id", "--port", str(free_port()))
    procs.append(router)
    route_chat(router, "m2")
    assert worker_stats(b)["requests"] == 1 and worker_stats(a)["requests"] == 0


def test_their_flags_become_our_settings() -> None:
    result = run_cli("check-config", "--json", "--worker-urls", "http://a:1", "--routing-logic",
                     "prefixaware", "--prometheus-port", "29000")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["policy"] == "cache_aware"


@pytest.mark.parametrize(("flags", "expect"), [
    (["--policy", "prefix_hash"], "--policy: 'prefix_hash' (sglang-router) has no equivalent here; closest: "
                                  "cache_aware"),
    (["--routing-logic", "kvaware"], "--routing-logic: 'kvaware' (production-stack) has no equivalent here; "
                                     "closest: cache_aware"),
    (["--policy", "round_robbin"], "unknown policy 'round_robbin' (did you mean 'round_robin'?); valid: "),
    (["--prefill", "http://p:1"], "--prefill/--decode: need --pd-disaggregation"),
    (["--pd-disaggregation", "--prefill", "http://p:1", "boot"], "BOOTSTRAP_PORT must be a port number"),
    (["--static-backends", "http://a:1,http://b:1", "--static-models", "m1"], "--static-models: 1 model(s)"),
])
def test_their_flags_refused_with_the_closest_equivalent(flags, expect) -> None:
    result = run_cli("check-config", "--worker", "http://w:1", *flags)
    assert result.returncode == 2
    assert expect in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr


# -- check-config: the semantic checks ------------------------------------------------------------

BAD_CONFIGS = {
    "empty file": ("", "workers: no workers configured"),
    "PD model without decode": ("""
        workers:
          - {url: "http://p:1", model: m, type: prefill}
        """, "models.m: has prefill workers but no decode worker"),
    "PD pair across connections": ("""
        workers:
          - {url: "http://p:1", model: m, type: prefill}
          - {url: "grpc://d:1", model: m, type: decode}
        """, "models.m: prefill and decode workers use different connections"),
    "quota_aware without quota": ("""
        policy: quota_aware
        workers:
          - {url: "http://a:1", model: m}
        """, "policy: quota_aware needs a per-worker budget"),
    "alias pointing nowhere": ("""
        workers:
          - {url: "http://a:1", model: llama}
        aliases:
          chat: {lama: 1}
        """, "aliases.chat.lama: no worker serves model 'lama' (did you mean 'llama'?)"),
    "model section naming no model": ("""
        workers:
          - {url: "http://a:1", model: llama}
        models:
          llamma: {policy: random}
        """, "models.llamma: no worker serves this model (did you mean 'llama'?)"),
    "shard naming no worker": ("""
        workers:
          - {url: "http://a:1", model: m, shard: s1}
          - {url: "http://b:1", model: m}
        """, "worker http://b:1: shard: model m's other workers name shards (s1)"),
    "their policy name with no equivalent": ("""
        workers:
          - {url: "http://a:1", model: m}
        models:
          m: {policy: bucket}
        """, "models.m.policy: 'bucket' (sglang-router (prefill)) has no equivalent here; closest: "
             "least_loaded"),
}


@pytest.mark.parametrize("case", list(BAD_CONFIGS))
def test_check_config_rejects(tmp_path, case) -> None:
    text, expect = BAD_CONFIGS[case]
    path = tmp_path / "deploy.yaml"
    path.write_text(textwrap.dedent(text))
    result = run_cli("check-config", str(path))
    assert result.returncode == 2, result.stdout
    assert expect in result.stderr and len(result.stderr.strip().splitlines()) == 1, result.stderr
    as_json = run_cli("check-config", "--json", str(path))
    assert as_json.returncode == 2
    verdict = json.loads(as_json.stdout)
    assert verdict["ok"] is False and expect in verdict["error"]


def test_check_config_accepts_their_aliases_in_the_file(tmp_path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("policy: consistent_hashing\nworkers:\n  - {url: 'http://a:1', model: m}\n"
                    "models:\n  m: {policy: roundrobin}\n")
    result = run_cli("check-config", "--json", str(path))
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"ok": True, "workers": 1, "models": ["m"], "workers_to_discover": 0,
                                         "host": "127.0.0.1", "port": 8080, "policy": "consistent_hash"}


# -- the CLI ----------------------------------------------------------------------------------------


def test_version() -> None:
    result = run_cli("--version")
    assert result.returncode == 0 and result.stdout.strip() == f"shardgate {__version__}"


def test_help_is_generated_from_the_declarations() -> None:
    text = " ".join(run_cli("serve", "--help").stdout.split())  # argparse wraps lines
    assert "usage: shardgate serve" in text
    assert "--port INT" in text and "--connect-timeout NUMBER" in text
    assert "--log-level {debug,info,warning,error}" in text
    assert "--policy POLICY" in text and "One of: round_robin," in text
    assert "(default: 'weighted_round_robin')" in text
    assert "--worker-urls URL [URL ...]" in text
    assert "exit codes: 0 success" in run_cli("--help").stdout
    mock_help = run_cli("mock-worker", "--help")
    assert mock_help.returncode == 0 and mock_help.stdout.startswith("usage: shardgate mock-worker")


@pytest.mark.parametrize("command", ["serve", "check-config"])
def test_unknown_flag_shows_the_subcommand_usage(command) -> None:
    result = run_cli(command, "--no-such-flag")
    assert result.returncode == 2
    assert result.stderr.startswith(f"usage: shardgate {command} ")
    assert f"shardgate {command}: error: unrecognized arguments: --no-such-flag" in result.stderr


# -- generated references -----------------------------------------------------------------------------


def test_migration_page_matches_its_declaration() -> None:
    assert (ROOT / "docs/migration.md").read_text() == migration_markdown(), \
        "regenerate: shardgate migration-doc -o docs/migration.md"


def test_reference_matches_its_declarations() -> None:
    assert reference.missing() == []
    assert (ROOT / "docs/reference.md").read_text() == reference.reference_markdown(), \
        "regenerate: shardgate reference-doc -o docs/reference.md"


def test_every_translated_flag_names_a_setting() -> None:
    from coordinator.compat import FLAGS, SETTING_FLAGS, SHARED
    from shm.settings import SETTING_NAMES

    assert set(SETTING_FLAGS.values()) <= set(SETTING_NAMES)
    assert set(SETTING_FLAGS) <= {f.flag for f in FLAGS}
    assert all(flag[2:].replace("-", "_") in SETTING_NAMES for flag, _, _ in SHARED)
    result = run_cli("check-config", "--worker", "http://w:1", "--health-check-interval-secs", "60",
                     "--prometheus-port", "8080")
    assert result.returncode == 2 and "ops_port: must differ from port (8080)" in result.stderr


def test_cli_page_matches_the_parser() -> None:
    from shardgate.cli import cli_markdown

    assert (ROOT / "docs/cli.md").read_text() == cli_markdown(), \
        "regenerate: shardgate cli-doc -o docs/cli.md"


def test_every_alias_names_a_real_policy() -> None:
    for alias in POLICY_ALIASES:
        assert (alias.ours or alias.closest.split()[0]) in POLICY_NAMES or alias.closest.startswith("--")
