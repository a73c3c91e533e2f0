"""The ``shardgate`` command: serve, check-config, mock-worker, demo, workers, registry, simulate,
and the generated references (settings-doc, metrics-doc, cli-doc, migration-doc, reference-doc).

Role: parse the command line and hand over to the right component. Exit codes (EXIT_CODES,
also in docs/cli.md): 0 success, 2 configuration error or bad usage (one line naming the field and
the reason; nothing starts), 1 any other failure to start, 130 forced stop.
"""

from __future__ import annotations

import argparse
import asyncio
import sys

from coordinator.config import Config, ConfigError, add_config_flags, load_config

EXIT_CODES = (
    (0, "success (check-config: the configuration is valid)"),
    (1, "any other failure to start (a port in use, shared memory unavailable, ...)"),
    (2, "a configuration error or bad usage: one line on stderr naming the field; nothing starts"),
    (130, "stopped by Ctrl-C / forced stop"),
)


def checked_config(args: argparse.Namespace) -> Config:
    """Every check serve runs: field by field (load_config), then the whole (coordinator.checks)."""
    from coordinator import checks

    config = load_config(args)
    checks.check(config)
    return config


def _show_notes(config: Config) -> None:
    for note in config.notes:
        print(f"shardgate: note: {note}", file=sys.stderr)


def _serve(args: argparse.Namespace) -> int:
    import uvloop

    from coordinator.arbiter import Coordinator
    from shm.logformat import configure as configure_logging

    config = checked_config(args)
    _show_notes(config)
    configure_logging(config.settings.log_level, config.settings.log_format, "coordinator")
    return uvloop.run(Coordinator(config, lambda: load_config(args)).run())  # it checks each reload


def _check_config(args: argparse.Namespace) -> int:
    import json

    try:
        config = checked_config(args)
    except ConfigError as exc:
        if not args.json:
            raise
        print(json.dumps({"ok": False, "error": str(exc)}))
        return exc.exit_code
    _show_notes(config)
    models = sorted({w.model for w in config.workers if w.model})
    unset = sum(1 for w in config.workers if not w.model)
    if args.json:
        print(json.dumps({"ok": True, "workers": len(config.workers), "models": models,
                          "workers_to_discover": unset, "host": config.settings.host,
                          "port": config.settings.port, "policy": config.settings.policy}))
        return 0
    extra = f" (+{unset} to discover)" if unset else ""
    print(f"ok: {len(config.workers)} worker(s), models: {', '.join(models) or '-'}{extra}; "
          f"listen {config.settings.host}:{config.settings.port}, policy {config.settings.policy}")
    return 0


def _mock_worker(args: argparse.Namespace) -> int:
    from shardgate.mocks import worker as mock_worker

    return mock_worker.main(args.rest)


def _demo(args: argparse.Namespace) -> int:
    from shardgate import demo

    return demo.main(args.rest)


def _registry(args: argparse.Namespace) -> int:
    from shardgate import registry

    return registry.main(args.rest)


def _workers(args: argparse.Namespace) -> int:
    from shardgate import workers_cli

    return workers_cli.main(args.rest)


def _settings_doc(args: argparse.Namespace) -> int:
    from coordinator import docs

    makers = {"metrics-doc": docs.metrics_markdown, "migration-doc": docs.migration_markdown,
              "reference-doc": docs.reference_markdown, "cli-doc": cli_markdown}
    text = makers.get(args.command, docs.settings_markdown)()
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


def build_parser() -> argparse.ArgumentParser:
    from shardgate import __version__

    parser = argparse.ArgumentParser(prog="shardgate", description="A router for LLM inference fleets.",
                                     epilog="exit codes: " + "; ".join(f"{c} {t}" for c, t in EXIT_CODES))
    parser.add_argument("--version", action="version", version=f"shardgate {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    SUBPARSERS.clear()
    SUBPARSERS.update(sub.choices)
    serve = sub.add_parser("serve", help="Run the router (coordinator + proxy processes).")
    add_config_flags(serve)
    serve.set_defaults(func=_serve)
    check = sub.add_parser("check-config", help="Validate a configuration without starting anything.")
    check.add_argument("file", nargs="?", help="YAML deployment file.")
    check.add_argument("--json", action="store_true", help="Print the verdict as one JSON object.")
    add_config_flags(check)
    check.usage = "%(prog)s [FILE] [--json] " + (check.usage or "").removeprefix("%(prog)s ")
    check.set_defaults(func=_check_config)
    for name, func, text in (("mock-worker", _mock_worker, "Run a fake OpenAI-compatible worker."),
                             ("demo", _demo, "Run the router with mock workers; prints curl lines."),
                             ("registry", _registry, "Run the HTTP service registry workers register with."),
                             ("workers", _workers, "Manage a running router's workers (admin API).")):
        p = sub.add_parser(name, help=text, add_help=False)
        p.add_argument("rest", nargs=argparse.REMAINDER)
        p.set_defaults(func=func)
    doc = sub.add_parser("settings-doc", help="Print the settings reference (Markdown).")
    doc.add_argument("--output", "-o", help="Write to this file instead of stdout.")
    doc.set_defaults(func=_settings_doc)
    mdoc = sub.add_parser("metrics-doc", help="Print the metrics reference (Markdown).")
    mdoc.add_argument("--output", "-o", help="Write to this file instead of stdout.")
    mdoc.set_defaults(func=_settings_doc)
    from shardgate.simulate import cli as simulate_cli

    simulate_cli.add_parser(sub)
    for name, text in (("cli-doc", "the command reference: subcommands and exit codes"),
                       ("migration-doc", "the sglang-router/vllm-router migration page"),
                       ("reference-doc", "the workers, models, policies and admin API reference")):
        d = sub.add_parser(name, help=f"Print {text} (Markdown).")
        d.add_argument("--output", "-o", help="Write to this file instead of stdout.")
        d.set_defaults(func=_settings_doc)
    SUBPARSERS.update(sub.choices)
    return parser


SUBPARSERS: dict[str, argparse.ArgumentParser] = {}


def cli_markdown() -> str:
    """docs/cli.md: the subcommands (from the parser) and the exit codes (EXIT_CODES)."""
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    rows = [f"| `shardgate {a.dest}` | {a.help} |" for a in sub._choices_actions]
    codes = [f"| {code} | {text} |" for code, text in EXIT_CODES]
    return ("# The `shardgate` command\n\nGenerated by `shardgate cli-doc -o docs/cli.md` from "
            "`shardgate/cli.py`; do not edit. `shardgate --version` prints the version; "
            "`shardgate COMMAND --help` a command's flags, with types, defaults and choices taken from "
            "the settings declaration ([settings.md](settings.md)). `serve` and `check-config` also take "
            "sglang-router / vllm-router / production-stack flags ([migration.md](migration.md)); "
            "`check-config --json` prints its verdict as one JSON object (`{\"ok\": false, \"error\": ...}` "
            "on error).\n\n| command | what |\n|---|---|\n" + "\n".join(rows)
            + "\n\n## Exit codes\n\n| code | meaning |\n|---|---|\n" + "\n".join(codes) + "\n")
PASSTHROUGH = {"mock-worker": _mock_worker, "demo": _demo, "registry": _registry, "workers": _workers}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in PASSTHROUGH:
        # These parse their own flags; argparse's REMAINDER would swallow a leading --flag.
        return PASSTHROUGH[argv[0]](argparse.Namespace(rest=argv[1:]))
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's own usage, not the top-level one
        SUBPARSERS.get(args.command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if getattr(args, "file", None):
        args.config = args.file
    try:
        return args.func(args)
    except ConfigError as exc:
        print(f"shardgate: config error: {exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        return 130
    except asyncio.CancelledError:
        return 130


if __name__ == "__main__":
    sys.exit(main())
