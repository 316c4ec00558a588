"""The `task-manager` command: `task-manager serve --listen HOST:PORT --db PATH`.

Runs until SIGTERM or SIGINT, then stops gracefully and exits 0.
"""

from __future__ import annotations

import argparse
import asyncio
import ipaddress
import logging
import signal
import sys
from collections.abc import Sequence
from pathlib import Path

from task_manager.config import Settings
from task_manager.server import ServerStartError, TaskManagerServer


def _parser() -> argparse.ArgumentParser:
    defaults = Settings()
    parser = argparse.ArgumentParser(prog="task-manager", description=__doc__)
    commands = parser.add_subparsers(dest="command", required=True)
    serve = commands.add_parser("serve", help="run the Task Manager gRPC service")
    serve.add_argument(
        "--listen",
        default=defaults.listen,
        help="HOST:PORT to listen on; port 0 picks a free one (env TASK_MANAGER_LISTEN,"
        " default %(default)s)",
    )
    serve.add_argument(
        "--db",
        type=Path,
        default=defaults.db,
        help="SQLite database file (env TASK_MANAGER_DB, default %(default)s)",
    )
    serve.add_argument(
        "--retention-revisions",
        type=_at_least_1,
        default=defaults.retention_revisions,
        help="history compaction keeps at least this many newest revisions (default %(default)s)",
    )
    serve.add_argument(
        "--retention-days",
        type=float,
        default=defaults.retention_age_s / 86400,
        help="... and every revision younger than this (default %(default)s)",
    )
    serve.add_argument(
        "--insecure",
        action="store_true",
        help="allow listening on a non-loopback address without authentication or TLS",
    )
    return parser


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or a wildcard that may reach other machines


def _at_least_1(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError("must be at least 1")
    return value


async def _serve(settings: Settings, insecure: bool) -> int:
    if not insecure and not is_loopback(settings.listen):
        print(
            f"task-manager: refusing to listen on {settings.listen}: this server has no"
            " authentication or TLS yet, so anyone who can reach it could command your"
            " agents. Listen on 127.0.0.1, or pass --insecure on a network you trust.",
            file=sys.stderr,
        )
        return 2
    # Handlers first: a SIGTERM that arrives while starting must still stop us cleanly.
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        server = await TaskManagerServer.start(settings)
    except ServerStartError as exc:
        print(f"task-manager: {exc}", file=sys.stderr)
        return 2
    # The first line on stdout says where we listen (tests and scripts read it).
    print(f"task-manager: serving on {server.address}", flush=True)
    await stop.wait()
    await server.stop()
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(
        level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    settings = Settings(
        listen=args.listen,
        db=args.db,
        retention_revisions=args.retention_revisions,
        retention_age_s=args.retention_days * 86400,
    )
    return asyncio.run(_serve(settings, args.insecure))


if __name__ == "__main__":
    sys.exit(main())
