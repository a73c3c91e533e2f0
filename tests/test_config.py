"""Configuration: ``shardgate check-config``, config errors, precedence, and the settings reference.

The CLI is run as a real subprocess (exit codes and stderr are part of the contract: 0 ok, 2 a
configuration error reported on exactly one line that names the field). Precedence is also
checked in-process through ``coordinator.config.load_config`` with the real argument parser.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from coordinator.config import ConfigError, load_config
from shardgate.cli import build_parser
from shm.settings import SETTING_NAMES, Settings

ROOT = Path(__file__).resolve().parents[1]
CLI = [sys.executable, "-m", "shardgate.cli"]
SHM_DIR = Path("/dev/shm")

# The example deployment of the design notes (seed 001): five workers, three models, HTTP and gRPC.
SEED_DEPLOYMENT = """\
# Large deployment with multiple models
workers:
  # Llama model workers
  - url: "http://worker1:8080"
    model: "llama-3.1-8b"
    type: "regular"
    connection: "http"

  - url: "http://worker2:8080"
    model: "llama-3.1-8b"
    type: "prefill"
    connection: "http"

  - url: "http://worker3:8080"
    model: "llama-3.1-8b"
    type: "decode"
    connection: "http"

  # Mistral model workers
  - url: "grpc://worker4:50051"
    model: "mistral-7b"
    type: "regular"
    connection: "grpc"

  # Qwen model workers
  - url: "http://worker5:8080"
    model: "qwen-2.5"
    type: "regular"
    connection: "http"
"""


def run_cli(*args: str, env: dict[str, str] | None = None,
            timeout: float = 60) -> subprocess.CompletedProcess:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("SHARDGATE_")}
    return subprocess.run(CLI + list(args), capture_output=True, text=True, timeout=timeout,
                          stdin=subprocess.DEVNULL, env={**clean, **(env or {})})


def write(tmp_path: Path, text: str, name: str = "deploy.yaml") -> Path:
    path = tmp_path / name
    path.write_text(textwrap.dedent(text))
    return path


def one_error_line(result: subprocess.CompletedProcess) -> str:
    assert result.returncode == 2, (result.returncode, result.stdout, result.stderr)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


# -- check-config: a valid file ----------------------------------------------------------------


def test_check_config_accepts_the_seed_deployment(tmp_path) -> None:
    path = write(tmp_path, SEED_DEPLOYMENT)
    result = run_cli("check-config", str(path))
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert result.stdout.strip() == ("ok: 5 worker(s), models: llama-3.1-8b, mistral-7b, qwen-2.5; "
                                     "listen 127.0.0.1:8080, policy weighted_round_robin")
    # --config is the same as the positional file.
    assert run_cli("check-config", "--config", str(path)).stdout == result.stdout


def test_seed_deployment_loads_as_declared(tmp_path) -> None:
    path = write(tmp_path, SEED_DEPLOYMENT)
    args = build_parser().parse_args(["serve", "--config", str(path)])
    config = load_config(args, environ={})
    got = [(w.url, w.model, w.type, w.connection) for w in config.workers]
    assert got == [
        ("http://worker1:8080", "llama-3.1-8b", "regular", "http"),
        ("http://worker2:8080", "llama-3.1-8b", "prefill", "http"),
        ("http://worker3:8080", "llama-3.1-8b", "decode", "http"),
        ("grpc://worker4:50051", "mistral-7b", "regular", "grpc"),
        ("http://worker5:8080", "qwen-2.5", "regular", "http"),
    ]
    assert config.settings == Settings()


# -- check-config: bad files -------------------------------------------------------------------

BAD_FILES = {
    "unknown setting": ("prot: 1\n", ["'prot'"]),
    "wrong type": ("port: abc\n", ["port", "int"]),
    "out of range": ("port: 70000\n", ["port"]),
    "bad enum": ("policy: fastest\n", ["policy"]),
    "bad worker url scheme": ("workers:\n  - url: ftp://w1:80\n", ["workers[0]", "url", "ftp://w1:80"]),
    "worker url with a path": ("workers:\n  - url: http://w1:80/v1\n", ["workers[0]", "url"]),
    "worker missing url": ("workers:\n  - model: m1\n", ["workers[0]", "`url`"]),
    "worker not a mapping": ("workers:\n  - http://w1:80\n", ["workers[0]"]),
    "unknown worker field": ("workers:\n  - url: http://w1:80\n    modle: m1\n", ["workers[0]", "modle"]),
    "bad worker type": ("workers:\n  - url: http://w1:80\n    type: mixed\n", ["workers[0].type"]),
    "invalid yaml": ("workers: [\n", ["YAML", "line"]),
    "workers not a list": ("workers:\n  url: http://w1:80\n", ["'workers'", "list"]),
    "weight 0": ("workers:\n  - url: http://w1:80\n    weight: 0\n", ["workers[0]", "weight"]),
    "top level not a mapping": ("- port\n", ["top level"]),
    "models not a mapping": ("models: [m1]\n", ["models"]),
    "unknown model policy": ("workers:\n  - url: http://w1:80\n    model: m1\n"
                             "models:\n  m1:\n    policy: fastest\n", ["models", "m1", "policy", "fastest"]),
    "more workers than max_workers": ("max_workers: 1\nworkers:\n  - url: http://w1:80\n  - url: http://w2:80\n",
                                      ["max_workers", "2"]),
    "duplicate worker": ("workers:\n  - url: http://w1:80\n  - url: http://w1:80/\n",
                         ["http://w1:80", "twice"]),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_check_config_rejects_bad_file_with_one_line(tmp_path, case: str) -> None:
    text, expected = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    line = one_error_line(run_cli("check-config", str(path)))
    assert line.startswith("shardgate: config error: ")
    for fragment in expected:
        assert fragment in line, (fragment, line)


@pytest.mark.parametrize("case", ["unknown setting", "worker missing url", "unknown model policy",
                                  "more workers than max_workers"])
def test_serve_with_a_bad_file_starts_nothing(tmp_path, case: str) -> None:
    text, expected = BAD_FILES[case]
    path = tmp_path / "bad.yaml"
    path.write_text(text)
    proc = subprocess.Popen([*CLI, "serve", "--config", str(path), "--port", "1", "--proxies", "1"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
    result = subprocess.CompletedProcess(proc.args, proc.returncode, out, err)
    line = one_error_line(result)
    assert expected[0] in line
    assert not any(p.name.startswith(f"shardgate.{proc.pid}-") for p in SHM_DIR.iterdir())


def test_bad_values_from_env_and_flags_name_their_source() -> None:
    line = one_error_line(run_cli("check-config", env={"SHARDGATE_PORT": "abc"}))
    assert "SHARDGATE_PORT" in line and "environment" in line
    line = one_error_line(run_cli("check-config", "--port", "abc"))
    assert "--port" in line and "command line" in line
    line = one_error_line(run_cli("check-config", "--worker", "localhost:8000"))
    assert "localhost:8000" in line
    line = one_error_line(run_cli("check-config", str(Path("/nonexistent/deploy.yaml"))))
    assert "/nonexistent/deploy.yaml" in line


def test_serve_without_workers_is_a_config_error() -> None:
    line = one_error_line(run_cli("serve", "--port", "1"))
    assert "no workers" in line


# -- precedence: defaults < file < environment < command line ----------------------------------


def listen_and_policy(result: subprocess.CompletedProcess) -> tuple[str, str]:
    assert result.returncode == 0, result.stderr
    match = re.search(r"listen (\S+), policy (\S+)$", result.stdout.strip())
    assert match, result.stdout
    return match.group(1), match.group(2)


def test_precedence_through_the_cli(tmp_path) -> None:
    path = write(tmp_path, """\
        host: 127.0.0.2
        port: 1111
        policy: random
        workers:
          - url: http://w1:80
            model: m1
    """)
    assert listen_and_policy(run_cli("check-config", "--worker", "http://w1:80")) == \
        ("127.0.0.1:8080", "weighted_round_robin")
    assert listen_and_policy(run_cli("check-config", str(path))) == ("127.0.0.2:1111", "random")
    env = {"SHARDGATE_PORT": "2222", "SHARDGATE_POLICY": "round_robin"}
    assert listen_and_policy(run_cli("check-config", str(path), env=env)) == ("127.0.0.2:2222", "round_robin")
    assert listen_and_policy(run_cli("check-config", str(path), "--port", "3333", env=env)) == \
        ("127.0.0.2:3333", "round_robin")
    result = run_cli("check-config", str(path), "--policy", "least_connections", "--host", "127.0.0.3",
                     env=env)
    assert listen_and_policy(result) == ("127.0.0.3:2222", "least_connections")
    # SHARDGATE_CONFIG names the file; --worker flags are appended to the file's workers.
    result = run_cli("check-config", "--worker", "http://w2:80", env={"SHARDGATE_CONFIG": str(path)})
    assert listen_and_policy(result) == ("127.0.0.2:1111", "random")
    assert result.stdout.startswith("ok: 2 worker(s), models: m1 (+1 to discover)")


def load(argv: list[str], environ: dict[str, str] | None = None):
    return load_config(build_parser().parse_args(["serve", *argv]), environ=environ or {})


def test_precedence_in_process(tmp_path) -> None:
    path = write(tmp_path, """\
        connect_timeout: 2.5
        max_tries: 5
        health_interval: 7
        log_level: warning
        workers:
          - url: http://w1:80
    """)
    defaults = load([]).settings
    assert defaults == Settings()
    from_file = load(["--config", str(path)]).settings
    got = (from_file.connect_timeout, from_file.max_tries, from_file.health_interval, from_file.log_level)
    assert got == (2.5, 5, 7.0, "warning")
    env = {"SHARDGATE_CONNECT_TIMEOUT": "3.5", "SHARDGATE_MAX_TRIES": "4"}
    from_env = load(["--config", str(path)], env).settings
    assert (from_env.connect_timeout, from_env.max_tries, from_env.health_interval) == (3.5, 4, 7.0)
    from_cli = load(["--config", str(path), "--max-tries", "2", "--log-level", "debug"], env).settings
    assert (from_cli.connect_timeout, from_cli.max_tries, from_cli.health_interval, from_cli.log_level) == \
        (3.5, 2, 7.0, "debug")
    # Untouched settings keep their defaults.
    assert from_cli.grace_period == Settings().grace_period
    # Workers: the file's first, then the flags'; URLs normalised.
    workers = load(["--config", str(path), "--worker", "HTTP://W2:81/"]).workers
    assert [w.url for w in workers] == ["http://w1:80", "http://w2:81"]


def test_every_setting_has_a_flag_and_an_environment_variable() -> None:
    for name in SETTING_NAMES:
        value = str(getattr(Settings(), name))
        flag = "--" + name.replace("_", "-")
        assert getattr(load([flag, value]).settings, name) == getattr(Settings(), name)
        assert getattr(load([], {"SHARDGATE_" + name.upper(): value}).settings, name) == \
            getattr(Settings(), name)


def test_bad_value_in_process_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="--health-fall"):
        load(["--health-fall", "0"])
    with pytest.raises(ConfigError, match="SHARDGATE_GRACE_PERIOD"):
        load([], {"SHARDGATE_GRACE_PERIOD": "-1"})


# -- the generated reference -------------------------------------------------------------------


def test_settings_doc_matches_committed_reference(tmp_path) -> None:
    result = run_cli("settings-doc")
    assert result.returncode == 0, result.stderr
    committed = (ROOT / "docs" / "settings.md").read_text()
    assert result.stdout == committed, \
        "docs/settings.md is stale: run `shardgate settings-doc -o docs/settings.md`"
    for name in SETTING_NAMES:
        assert f"| `{name}` |" in committed
    out = tmp_path / "settings.md"
    assert run_cli("settings-doc", "-o", str(out)).returncode == 0
    assert out.read_text() == committed


def test_serve_help_renders_and_lists_every_setting_flag() -> None:
    """Through the console script, as a user asks for it (a '%' in a description once broke it)."""
    import shutil

    script = shutil.which("shardgate")
    assert script is not None, "the shardgate console script is not installed"
    result = subprocess.run([script, "serve", "--help"], capture_output=True, text=True, timeout=60,
                            stdin=subprocess.DEVNULL)
    assert result.returncode == 0, result.stderr
    for name in SETTING_NAMES:
        assert "--" + name.replace("_", "-") in result.stdout, name
