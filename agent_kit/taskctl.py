"""`taskctl`: the Task Manager from the command line.

    taskctl [--target HOST:PORT] create|get|list|history|cancel|complete|watch|wait ...

The target defaults to TASK_MANAGER_TARGET or 127.0.0.1:50051. Exit codes: 0 done;
1 the waited-for task finished DONE_NOT_OK; 2 bad command line; 3 not found;
4 timed out; 5 server unavailable; 6 refused (invalid, conflict, finished task);
7 denied (no or bad credentials, or not allowed). Credentials: --token or
TASK_MANAGER_TOKEN; TLS: --tls-ca (and --tls-cert/--tls-key for mutual TLS).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path

import grpc

from agent_kit._grpc import ClientAuth
from agent_kit._json import to_json
from agent_kit._operator import SyncOperatorClient, WaitTimeout
from task_manager.v1 import task_manager_pb2 as pb

EXIT_OK, EXIT_NOT_OK, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_TIMEOUT = 0, 1, 2, 3, 4
EXIT_UNAVAILABLE, EXIT_REFUSED = 5, 6
EXIT_DENIED = 7
_EXIT_FOR_CODE = {
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_TIMEOUT,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
}
TERMINAL = {pb.STATUS_DONE_OK, pb.STATUS_DONE_NOT_OK}
COLUMNS = ("TASK_ID", "STATUS", "VERSION", "ASSIGNEE", "UPDATED", "NAME", "ERROR")


def status_name(status: pb.Status.ValueType) -> str:
    return pb.Status.Name(status).removeprefix("STATUS_")


def parse_status(text: str) -> pb.Status.ValueType:
    name = text.upper()
    name = name if name.startswith("STATUS_") else f"STATUS_{name}"
    try:
        return pb.Status.Value(name)
    except ValueError:
        known = ", ".join(status_name(v) for v in pb.Status.values() if v)
        raise argparse.ArgumentTypeError(f"unknown status {text!r} (one of {known})") from None


def principal_name(principal: pb.Principal) -> str:
    system = principal.system
    name = system.entity_id or system.service_name
    return name or principal.team.entity_id or principal.user.user_id or "-"


def row(task: pb.Task) -> tuple[str, ...]:
    updated = (
        task.last_update_time.ToDatetime().strftime("%H:%M:%S")
        if task.HasField("last_update_time")
        else ""
    )
    error = task.status.task_error
    return (
        task.version.task_id,
        status_name(task.status.status),
        f"d{task.version.definition_version}/s{task.version.status_version}",
        principal_name(task.relations.assignee),
        updated,
        task.display_name,
        f"{pb.ErrorCode.Name(error.code).removeprefix('ERROR_CODE_')}: {error.message}"
        if task.status.HasField("task_error")
        else "",
    )


def table(rows: Iterable[Sequence[str]], header: Sequence[str] = COLUMNS) -> str:
    rows = [tuple(header), *rows]
    widths = [max(len(r[i]) for r in rows) for i in range(len(header))]
    return "\n".join(
        "  ".join(c.ljust(w) for c, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )


def show_tasks(tasks: Sequence[pb.Task], json_out: bool) -> None:
    if json_out:
        print(json.dumps([to_json(t) for t in tasks], indent=2))
    else:
        print(table(row(t) for t in tasks))


def cmd_create(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    task = client.create_task(
        assignee_entity_id=args.assignee,
        display_name=args.name,
        description=args.description,
        task_id=args.task_id,
        parent_task_id=args.parent,
        is_executed_elsewhere=args.executed_elsewhere,
    )
    show_tasks([task], args.json)
    return EXIT_OK


def cmd_get(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    show_tasks([client.get_task(args.task_id, agent_view=args.agent_view)], args.json)
    return EXIT_OK


def cmd_list(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    statuses = args.status or args.exclude_status or []
    tasks = client.query_tasks(
        parent_task_id=args.parent, statuses=statuses, exclude_statuses=bool(args.exclude_status)
    )
    show_tasks(tasks, args.json)
    return EXIT_OK


def cmd_history(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    entries = client.history(args.task_id)
    if args.json:
        print(json.dumps([to_json(e) for e in entries], indent=2))
        return EXIT_OK
    header = ("REVISION", "STATUS_VERSION", "STATUS", "TIME", "AUTHOR", "ERROR / REASON")
    lines = []
    for entry in entries:
        author = principal_name(entry.author)
        note = entry.status.task_error.message or entry.reason
        time = entry.time.ToDatetime().strftime("%Y-%m-%d %H:%M:%S")
        lines.append(
            (
                str(entry.revision),
                str(entry.status_version),
                status_name(entry.status.status),
                time,
                author,
                note,
            )
        )
    print(table(lines, header))
    return EXIT_OK


def cmd_cancel(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    show_tasks([client.cancel_task(args.task_id, args.reason)], args.json)
    return EXIT_OK


def cmd_complete(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    show_tasks([client.complete_task(args.task_id, args.reason)], args.json)
    return EXIT_OK


def cmd_wait(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    try:
        task = client.wait(args.task_id, timeout=args.timeout)
    except WaitTimeout as timeout:
        print(f"taskctl: {timeout}", file=sys.stderr)
        return EXIT_TIMEOUT
    show_tasks([task], args.json)
    return EXIT_OK if task.status.status == pb.STATUS_DONE_OK else EXIT_NOT_OK


def cmd_watch(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    live_table = sys.stdout.isatty() and not args.lines and not args.json
    latest: dict[str, pb.Task] = {}
    events = client.watch(
        task_ids=args.task_id,
        assignee_entity_ids=args.assignee,
        statuses=args.status or [],
        parent_task_id=args.parent,
        start_revision=args.from_revision,
        include_preexisting=args.from_revision == 0,
    )
    for count, response in enumerate(events, start=1):
        task = response.event.task
        latest[task.version.task_id] = task
        if args.json:  # one object a line, flushed: a script reads events as they come
            print(json.dumps(to_json(response), separators=(",", ":")), flush=True)
        elif live_table:  # redraw in place: the current state of every task seen
            print("\x1b[H\x1b[2J" + table(row(t) for t in latest.values()), flush=True)
        else:
            print(f"{response.revision}  " + "  ".join(row(task)).rstrip(), flush=True)
        if args.max_events and count >= args.max_events:
            break
    return EXIT_OK


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskctl",
        description="The Task Manager from the command line.",
        epilog=__doc__.split("\n\n", 2)[-1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--target",
        default=os.environ.get("TASK_MANAGER_TARGET", "127.0.0.1:50051"),
        help="HOST:PORT of the Task Manager (env TASK_MANAGER_TARGET)",
    )
    env = ClientAuth.from_env()
    parser.add_argument("--token", default=env.token, help="bearer token (env TASK_MANAGER_TOKEN)")
    parser.add_argument("--tls", action="store_true", help="use TLS with the system's CAs")
    parser.add_argument(
        "--tls-ca",
        type=Path,
        default=env.tls_ca,
        help="use TLS, trusting this CA (env TASK_MANAGER_TLS_CA)",
    )
    parser.add_argument(
        "--tls-cert",
        type=Path,
        default=env.tls_cert,
        help="client certificate for mutual TLS (env TASK_MANAGER_TLS_CERT)",
    )
    parser.add_argument(
        "--tls-key", type=Path, default=env.tls_key, help="its key (env TASK_MANAGER_TLS_KEY)"
    )
    commands = parser.add_subparsers(dest="command", required=True)

    def command(name: str, run: Callable[..., int], help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(name, help=help_text)
        sub.set_defaults(run=run)
        sub.add_argument("--json", action="store_true", help="print JSON")
        return sub

    create = command("create", cmd_create, "create a task (sent at once to its assignee)")
    create.add_argument("--assignee", help="the agent's entity id")
    create.add_argument("--name", default="", help="display name")
    create.add_argument("--description", default="")
    create.add_argument("--task-id", default="", help="your own id (default: a UUID)")
    create.add_argument("--parent", default="", help="parent task id")
    create.add_argument("--executed-elsewhere", action="store_true")
    get = command("get", cmd_get, "show one task")
    get.add_argument("task_id")
    get.add_argument("--agent-view", action="store_true", help="as its agent last reported it")
    listing = command("list", cmd_list, "list tasks, oldest first")
    listing.add_argument("--parent", default="")
    filters = listing.add_mutually_exclusive_group()
    filters.add_argument("--status", type=parse_status, action="append", help="repeatable")
    filters.add_argument("--exclude-status", type=parse_status, action="append")
    history = command("history", cmd_history, "every accepted change of a task")
    history.add_argument("task_id")
    for name, run in (("cancel", cmd_cancel), ("complete", cmd_complete)):
        sub = command(name, run, f"ask the agent to {name} a task")
        sub.add_argument("task_id")
        sub.add_argument("--reason", default="")
    watch = command("watch", cmd_watch, "follow tasks live (a table on a terminal)")
    watch.add_argument("--task-id", action="append", default=[], help="repeatable")
    watch.add_argument("--assignee", action="append", default=[], help="repeatable")
    watch.add_argument("--status", type=parse_status, action="append")
    watch.add_argument("--parent", default="")
    watch.add_argument(
        "--from-revision",
        type=int,
        default=0,
        help="replay from this revision (default: current tasks, then live)",
    )
    watch.add_argument("--max-events", type=int, default=0, help="stop after this many")
    watch.add_argument("--lines", action="store_true", help="one line per event, even on a tty")
    wait = command("wait", cmd_wait, "wait until a task finishes (exit 0 DONE_OK, 1 NOT_OK)")
    wait.add_argument("task_id")
    wait.add_argument("--timeout", type=float, default=None, help="seconds")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        auth = ClientAuth(
            token=args.token,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
        with SyncOperatorClient(args.target, auth=auth) as client:
            code: int = args.run(client, args)
            return code
    except grpc.RpcError as error:
        status = error.code()
        print(f"taskctl: {status.name}: {error.details()}", file=sys.stderr)
        return _EXIT_FOR_CODE.get(status, EXIT_REFUSED)
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
