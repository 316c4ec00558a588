"""The `task-manager` command line: --version, usage errors, TASK_MANAGER_* variables, and
`tokens` options on either side of the action.

Run as a user would (`python -m task_manager`), except where a test compares parses.
"""

from __future__ import annotations

import argparse
import importlib.metadata
import os
import subprocess
import sys
from pathlib import Path

import pytest

from task_manager import __version__, cli
from tests.helpers import REPO_ROOT

DISTRIBUTION = "agent-task-gateway"


def task_manager(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "task_manager", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
        env={**os.environ, **(env or {})},
        check=False,
    )


def test_version_is_the_installed_distributions() -> None:
    result = task_manager("--version")
    assert result.returncode == 0, result.stderr
    assert result.stdout == f"task-manager {__version__}\n"
    assert importlib.metadata.version(DISTRIBUTION) == __version__


def test_the_distribution_keeps_both_commands() -> None:
    scripts = {
        entry.name: entry.value
        for entry in importlib.metadata.distribution(DISTRIBUTION).entry_points
        if entry.group == "console_scripts"
    }
    assert scripts == {"task-manager": "task_manager.cli:main", "taskctl": "agent_kit.taskctl:main"}


@pytest.mark.parametrize(
    ("listen", "says"),
    [
        ("abc", "'abc' is not HOST:PORT"),
        ("host:notaport", "the port 'notaport' is not a number from 0 to 65535"),
        (":99999", "the port '99999' is not a number from 0 to 65535"),
        (":50051", "the host is missing"),
        ("::1:50051", "an IPv6 host goes in brackets"),
        ("[nope]:50051", "[nope] is not an IPv6 address"),
        ("under_score:50051", "'under_score' is not a host name or an IP address"),
    ],
)
def test_a_malformed_listen_address_is_a_one_line_usage_error(
    tmp_path: Path, listen: str, says: str
) -> None:
    result = task_manager("serve", "--listen", listen, "--db", str(tmp_path / "tasks.db"))
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith("task-manager serve: error: argument --listen: ")
    assert says in line
    assert not (tmp_path / "tasks.db").exists()  # refused before anything was opened


def test_a_malformed_listen_address_from_the_environment_names_the_variable(
    tmp_path: Path,
) -> None:
    result = task_manager(
        "serve", "--db", str(tmp_path / "tasks.db"), env={"TASK_MANAGER_LISTEN": "abc"}
    )
    assert result.returncode == 2
    assert result.stderr == (
        "task-manager serve: error: environment variable TASK_MANAGER_LISTEN='abc':"
        " 'abc' is not HOST:PORT (127.0.0.1:50051 for this machine only, 0.0.0.0:50051 for"
        " every interface)\n"
    )


SAMPLES = {
    # option: (value in the environment, the same on the command line)
    "--listen": ("127.0.0.1:0", ["127.0.0.1:0"]),
    "--http-listen": ("off", ["off"]),
    "--log-format": ("json", ["json"]),
    "--log-level": ("debug", ["debug"]),
    "--db": ("elsewhere.db", ["elsewhere.db"]),
    "--retention-revisions": ("7", ["7"]),
    "--retention-days": ("1.5", ["1.5"]),
    "--insecure": ("yes", []),
    "--tls-cert": ("cert.pem", ["cert.pem"]),
    "--tls-key": ("key.pem", ["key.pem"]),
    "--client-ca": ("ca.pem", ["ca.pem"]),
    "--max-request-bytes": ("1024", ["1024"]),
    "--requests-per-second": ("5", ["5"]),
    "--max-streams-per-principal": ("9", ["9"]),
    "--receipt-timeout": ("1", ["1"]),
    "--heartbeat-timeout": ("2", ["2"]),
    "--execution-timeout": ("3", ["3"]),
    "--retry-backoff": ("4", ["4"]),
    "--max-retry-backoff": ("5", ["5"]),
    "--max-attempts": ("6", ["6"]),
    "--agent-lost-after": ("7", ["7"]),
    "--replica-lease": ("2.5", ["2.5"]),
    "--tail-poll": ("0.5", ["0.5"]),
    "--restart-grace": ("8", ["8"]),
    "--payload-grace": ("90", ["90"]),
    "--payload-quota-bytes": ("1000", ["1000"]),
    "--upload-bytes-per-second": ("5e6", ["5e6"]),
    "--writer-niceness": ("3", ["3"]),
    "--limit": ("display_name_chars=5, reason_chars=6", ["display_name_chars=5"]),
}


def serve_options() -> list[str]:
    parser, _ = cli._parser({})
    subcommands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    serve = subcommands.choices["serve"]
    return [a.option_strings[-1] for a in serve._actions if a.dest != "help"]


def parse(argv: list[str], environ: dict[str, str]) -> argparse.Namespace:
    parser, refused = cli._parser(environ)
    assert refused["serve"] == []
    return parser.parse_args(argv)


def test_every_serve_option_is_also_an_environment_variable() -> None:
    assert sorted(serve_options()) == sorted(SAMPLES), "a serve option without a sample here"
    from_flags = ["serve"]
    for option, (_, values) in SAMPLES.items():
        from_flags += [option, *values] if values else [option]
    from_flags += ["--limit", "reason_chars=6"]  # --limit is repeatable
    environ = {cli.environment_variable(o): text for o, (text, _) in SAMPLES.items()}
    assert parse(["serve"], environ) == parse(from_flags, {})
    assert parse(["serve"], environ) != parse(["serve"], {})  # every sample is not a default


def test_a_flag_wins_over_the_environment() -> None:
    environ = {
        "TASK_MANAGER_LISTEN": "127.0.0.1:7000",
        "TASK_MANAGER_INSECURE": "1",
        "TASK_MANAGER_LIMIT": "display_name_chars=5,reason_chars=6",
    }
    args = parse(["serve", "--listen", "127.0.0.1:8000", "--limit", "reason_chars=9"], environ)
    assert args.listen == "127.0.0.1:8000"
    assert args.insecure is True
    assert dict(args.limit) == {"display_name_chars": 5, "reason_chars": 9}
    assert parse(["serve"], {"TASK_MANAGER_INSECURE": "off"}).insecure is False


def test_help_names_each_options_variable() -> None:
    result = task_manager("serve", "--help")
    assert result.returncode == 0
    flat = " ".join(result.stdout.split())
    for option in SAMPLES:
        assert f"[{cli.environment_variable(option)}]" in flat, option
    assert "a flag given on the command line wins" in flat


@pytest.mark.parametrize(
    ("variable", "text", "says"),
    [
        ("TASK_MANAGER_WRITER_NICENESS", "20", "must be from 0 to 19"),
        ("TASK_MANAGER_MAX_ATTEMPTS", "many", "'many' is not a whole number"),
        ("TASK_MANAGER_HEARTBEAT_TIMEOUT", "-1", "must be 0 or more"),
        ("TASK_MANAGER_INSECURE", "maybe", "must be 1, true, yes or on"),
        ("TASK_MANAGER_LIMIT", "nope=3", "'nope' is not one of"),
        ("TASK_MANAGER_REQUESTS_PER_SECOND", "fast", "'fast' is not a valid float"),
    ],
)
def test_an_invalid_environment_value_is_an_error_naming_the_variable(
    tmp_path: Path, variable: str, text: str, says: str
) -> None:
    result = task_manager("serve", "--db", str(tmp_path / "tasks.db"), env={variable: text})
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()
    assert line.startswith(f"task-manager serve: error: environment variable {variable}={text!r}")
    assert says in line
    # Another command does not read the serve options' variables.
    listed = task_manager(
        "tokens", "--db", str(tmp_path / "tasks.db"), "list", env={variable: text}
    )
    assert listed.returncode == 0, listed.stderr


def test_tokens_options_come_before_or_after_the_action(tmp_path: Path) -> None:
    first, second = tmp_path / "first.db", tmp_path / "second.db"
    added = task_manager("tokens", "add", "olivia", "--role", "operator", "--db", str(first))
    assert added.returncode == 0, added.stderr
    assert added.stdout.startswith("tmk_")
    assert (
        task_manager("tokens", "--db", str(second), "add", "liam", "--role", "viewer").returncode
        == 0
    )

    def principals(*args: str, env: dict[str, str] | None = None) -> list[str]:
        listed = task_manager("tokens", *args, env=env)
        assert listed.returncode == 0, listed.stderr
        return [line.split()[2] for line in listed.stdout.splitlines()]

    assert principals("list", "--db", str(first)) == ["olivia"]
    assert principals("--db", str(first), "list") == ["olivia"]
    assert principals("--db", str(first), "list", "--db", str(second)) == ["liam"]
    assert principals("list", env={"TASK_MANAGER_DB": str(second)}) == ["liam"]
