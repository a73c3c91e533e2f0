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

import msgspec
import pytest
from conftest import chat, free_port, get_json, http, wait_for, worker_stats
from test_policies_unit import Shared

from coordinator import reference
from coordinator.compat import POLICY_ALIASES, migration_markdown
from coordinator.config import Config, load_config
from coordinator.fleet import topology
from proxy_workers.routing.table import PDRoute, RoutingTable, pd_dialect, pd_policy_name
from shardgate import __version__, launch
from shardgate.cli import build_parser
from shm.schema import Snapshot, Worker
from shm.settings import POLICY_NAMES, Settings

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


def port_of(worker: launch.Launched) -> int:
    return int(worker.url.rsplit(":", 1)[1])


def explain(router: launch.Launched) -> dict:
    status, _, body = http("POST", router.url + "/route/explain", chat("m1"))
    assert status == 200, body
    return json.loads(body)


def test_sglang_router_pd_command_line(procs) -> None:
    p, d = mock(procs, "--role", "prefill"), mock(procs, "--role", "decode")
    # The mock's bootstrap server is its own port (GET /mock/bootstrap/{room}); its decode waits
    # there for the room's prefill, so a 200 proves the bootstrap handoff happened.
    router = serve("--pd-disaggregation", "--prefill", p.url, str(port_of(p)), "--decode", d.url,
                   "--prefill-policy", "cache_aware", "--decode-policy", "power_of_two",
                   "--host", "127.0.0.1", "--port", str(free_port()))
    procs.append(router)
    rows = {w["url"]: w for w in get_json(router.url + "/workers")["workers"]}
    assert rows[p.url]["type"] == "prefill" and rows[d.url]["type"] == "decode"
    assert explain(router)["pd_dialect"] == "bootstrap"
    route_chat(router)
    assert worker_stats(p)["requests"] == 1 and worker_stats(d)["requests"] == 1
    sent_prefill, sent_decode = worker_stats(p)["last_body"], worker_stats(d)["last_body"]
    triple = [sent_decode[k] for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")]
    assert triple[:2] == ["127.0.0.1", port_of(p)] and isinstance(triple[2], int)
    assert [sent_prefill[k] for k in ("bootstrap_host", "bootstrap_port", "bootstrap_room")] == triple
    assert "kv_transfer_params" not in sent_prefill and "kv_transfer_params" not in sent_decode
    assert http("GET", f"{p.url}/mock/bootstrap/{triple[2]}")[0] == 200  # the prefill saw the room
    assert "http_pd" in json.dumps(get_json(router.url + "/routers"))
    assert "pd_dialect" not in router.stderr_text() and "differs" not in router.stderr_text()


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
    assert explain(pd)["pd_dialect"] == "two_phase"
    route_chat(pd)
    assert worker_stats(p)["requests"] == 1 and worker_stats(d)["requests"] == 1
    # Two-phase: the prefill got a one-token copy asking for remote decode, and its KV handle
    # went on to the decode (whose mock refuses a handle no prefill issued).
    sent_prefill, sent_decode = worker_stats(p)["last_body"], worker_stats(d)["last_body"]
    assert sent_prefill["max_tokens"] == 1 and sent_prefill["kv_transfer_params"]["do_remote_decode"]
    assert sent_decode["kv_transfer_params"]["handle"]
    assert not any(k.startswith("bootstrap_") for k in (*sent_prefill, *sent_decode))


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


# -- their PD flags, down to the routing table ---------------------------------------------------------


def load(*argv: str, environ: dict[str, str] | None = None) -> Config:
    return load_config(build_parser().parse_args(["serve", *argv]), environ or {})


def pd_route(config: Config, shared: Shared, model: str = "m") -> PDRoute:
    """The http_pd route a proxy builds for ``config``'s workers, all serving ``model``."""
    fleet = [Worker(slot=i, url=w.url, models=(model,), type=w.type, bootstrap_port=w.bootstrap_port)
             for i, w in enumerate(config.workers)]
    snap = Snapshot(generation=1, settings=config.settings, workers=tuple(fleet),
                    models={model: tuple(w.slot for w in fleet)}, model_policies=config.models,
                    routers=topology.assign_routers(fleet))
    env = shared.env(**msgspec.structs.asdict(config.settings))
    route = RoutingTable(snap, env, None).route_in("http_pd", model)
    assert isinstance(route, PDRoute)
    return route


@pytest.fixture
def shared():
    sh = Shared()
    yield sh
    sh.close()


def test_their_prefill_and_decode_policies_reach_their_sides(shared: Shared) -> None:
    config = load("--pd-disaggregation", "--prefill", "http://p:1", "8998", "--decode", "http://d:1",
                  "--prefill-policy", "consistent_hashing", "--decode-policy", "power_of_two")
    assert (config.settings.prefill_policy, config.settings.decode_policy) == ("consistent_hash",
                                                                               "power_of_two")
    assert config.settings.policy == Settings().policy and config.notes == ()
    route = pd_route(config, shared)
    assert (route.prefill.policy.name, route.decode.policy.name, route.dialect) == \
        ("consistent_hash", "power_of_two", "bootstrap")
    assert [w.bootstrap_port for w in route.prefill.candidates] == [8998]
    vllm = pd_route(load("--vllm-pd-disaggregation", "--prefill", "http://p:1", "--decode", "http://d:1",
                         "--decode-policy", "round_robin"), shared)
    assert (vllm.prefill.policy.name, vllm.decode.policy.name, vllm.dialect) == \
        (Settings().policy, "round_robin", "two_phase")


def test_a_models_own_pd_settings_win_over_the_global_ones(tmp_path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("workers:\n  - {url: 'http://p:1', model: m, type: prefill}\n"
                    "  - {url: 'http://d:1', model: m, type: decode}\n"
                    "models:\n  own: {pd_dialect: two_phase, prefill_policy: random}\n"
                    "  whole: {policy: round_robin}\n  bare: {}\n")
    config = load("--config", str(path), "--pd-disaggregation", "--prefill-policy", "cache_aware",
                  "--decode-policy", "least_loaded")
    assert config.models["own"].pd_dialect == "two_phase" and config.models["bare"].pd_dialect is None
    snap = Snapshot(settings=config.settings, model_policies=config.models)
    sides = {m: (pd_policy_name(snap, m, "prefill"), pd_policy_name(snap, m, "decode"), pd_dialect(snap, m))
             for m in ("own", "whole", "bare", "absent")}
    assert sides == {"own": ("random", "least_loaded", "two_phase"),
                     "whole": ("round_robin", "round_robin", "bootstrap"),
                     "bare": ("cache_aware", "least_loaded", "bootstrap"),
                     "absent": ("cache_aware", "least_loaded", "bootstrap")}
    # Unset sides fall back to policy; the native flag wins over their switch.
    native = load("--config", str(path), "--pd-disaggregation", "--pd-dialect", "two_phase",
                  "--policy", "random")
    snap = Snapshot(settings=native.settings, model_policies=native.models)
    assert (pd_policy_name(snap, "bare", "prefill"), pd_dialect(snap, "bare")) == ("random", "two_phase")


def test_the_pd_settings_from_the_environment_and_the_file() -> None:
    settings = load(environ={"SHARDGATE_PD_DIALECT": "bootstrap", "SHARDGATE_PREFILL_POLICY": "least_load",
                             "SHARDGATE_DECODE_POLICY": ""}).settings
    assert (settings.pd_dialect, settings.prefill_policy, settings.decode_policy) == \
        ("bootstrap", "least_loaded", "")


def test_check_config_accepts_the_pd_settings(tmp_path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("pd_dialect: bootstrap\nprefill_policy: prefix_aware\ndecode_policy: null\n"
                    "workers:\n  - {url: 'http://p:1', model: m, type: prefill, bootstrap_port: 8998}\n"
                    "  - {url: 'http://d:1', model: m, type: decode}\n"
                    "models:\n  m: {pd_dialect: two_phase}\n")
    assert run_cli("check-config", str(path)).returncode == 0
    result = run_cli("check-config", "--json", "--pd-disaggregation", "--prefill", "http://p:1",
                     "--decode", "http://d:1", "--prefill-policy", "cache_aware", "--decode-policy",
                     "least_load", "--pd-dialect", "bootstrap")
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["ok"] is True


@pytest.mark.parametrize(("flags", "expect"), [
    (["--pd-dialect", "sglang"], "--pd-dialect: Invalid enum value 'sglang'"),
    (["--prefill-policy", "bucket"], "--prefill-policy: 'bucket' (sglang-router (prefill)) has no "
                                     "equivalent here; closest: least_loaded"),
    (["--decode-policy", "power_of_too"], "--decode-policy: unknown policy 'power_of_too' (did you mean "
                                          "'power_of_two'?)"),
    (["--pd-disaggregation", "--vllm-pd-disaggregation"], "--pd-disaggregation (SGLang, bootstrap) and "
                                                          "--vllm-pd-disaggregation (vLLM, two-phase)"),
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
    "bad global pd_dialect": ("""
        pd_dialect: sglang
        workers:
          - {url: "http://a:1", model: m}
        """, "pd_dialect: Invalid enum value 'sglang'"),
    "bad per-model pd_dialect": ("""
        workers:
          - {url: "http://a:1", model: m}
        models:
          m: {pd_dialect: vllm}
        """, "models.m.pd_dialect: Invalid enum value 'vllm'"),
    "quota_aware on the decode side without quota": ("""
        decode_policy: quota_aware
        workers:
          - {url: "http://a:1", model: m}
        """, "decode_policy: quota_aware needs a per-worker budget"),
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
