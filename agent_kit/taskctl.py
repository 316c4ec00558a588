"""`taskctl`: the Task Manager from the command line.

    taskctl [--target HOST[:PORT]] create|get|list|history|update|cancel|complete|watch|wait|agents
    taskctl session submit|get|wait|cancel
    taskctl upload|attach|download

The target defaults to TASK_MANAGER_TARGET or 127.0.0.1:50051 (a host alone means port
50051). Exit codes: 0 done; 1 the waited-for task finished DONE_NOT_OK (a session: did
not complete); 2 bad command line; 3 not found; 4 timed out; 5 server unavailable; 6
refused (invalid, conflict, finished task); 7 denied (no or bad credentials, or not
allowed); 8 unexpected error (a bug: the message says what); 130 interrupted (Ctrl+C);
141 the reader of the output went away; 143 terminated (SIGTERM). Credentials: --token
or TASK_MANAGER_TOKEN; TLS: --tls-ca (and --tls-cert/--tls-key for mutual TLS).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import sys
from collections.abc import Callable, Iterable, Iterator, Sequence
from datetime import UTC, datetime
from importlib import metadata
from pathlib import Path

import grpc
from google.protobuf import any_pb2
from google.protobuf.timestamp_pb2 import Timestamp

from agent_kit._grpc import ClientAuth, target_with_port
from agent_kit._json import parse_any, summary, to_json
from agent_kit._operator import DefinitionConflict, SyncOperatorClient, TaskPolicy, WaitTimeout
from task_manager.v1 import task_manager_pb2 as pb

EXIT_OK, EXIT_NOT_OK, EXIT_USAGE, EXIT_NOT_FOUND, EXIT_TIMEOUT = 0, 1, 2, 3, 4
EXIT_UNAVAILABLE, EXIT_REFUSED = 5, 6
EXIT_DENIED = 7
EXIT_UNEXPECTED = 8
"""taskctl or the server failed in a way no command line explains: never 1, which
scripts read as the task's outcome."""
EXIT_INTERRUPTED = 130  # the shells' code for a command ended by SIGINT
EXIT_BROKEN_PIPE = 141  # and by SIGPIPE
EXIT_TERMINATED = 143  # and by SIGTERM
_EXIT_FOR_CODE = {
    grpc.StatusCode.NOT_FOUND: EXIT_NOT_FOUND,
    grpc.StatusCode.UNAUTHENTICATED: EXIT_DENIED,
    grpc.StatusCode.PERMISSION_DENIED: EXIT_DENIED,
    grpc.StatusCode.DEADLINE_EXCEEDED: EXIT_TIMEOUT,
    grpc.StatusCode.UNAVAILABLE: EXIT_UNAVAILABLE,
    grpc.StatusCode.INTERNAL: EXIT_UNEXPECTED,
    grpc.StatusCode.UNKNOWN: EXIT_UNEXPECTED,
    grpc.StatusCode.DATA_LOSS: EXIT_UNEXPECTED,
}
COLUMNS = (
    "TASK_ID",
    "STATUS",
    "VERSION",
    "ASSIGNEE",
    "UPDATED",
    "PROGRESS",
    "RESULT",
    "NAME",
    "ERROR",
)
HISTORY_COLUMNS = (
    "REVISION",
    "STATUS_VERSION",
    "STATUS",
    "TIME",
    "AUTHOR",
    "PROGRESS",
    "ERROR / REASON",
)


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


def seconds(text: str) -> float:
    """A duration in seconds on the command line: a number >= 0."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value) or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds >= 0")
    return value


def count(text: str) -> int:
    """A whole number >= 0 on the command line (a revision, a number of events)."""
    if not text.isdigit():
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number >= 0")
    return int(text)


def moment(text: str) -> datetime:
    """An ISO 8601 time; one without an offset is local time, as `date` shows it."""
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 time (say 2026-12-01T18:30:00+00:00)"
        ) from None
    return parsed if parsed.tzinfo is not None else parsed.astimezone()


def specification(text: str) -> any_pb2.Any:
    """TYPE=JSON: a message of a type taskctl knows (the well-known types), packed."""
    type_name, equals, json_text = text.partition("=")
    if not equals or not type_name:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not TYPE=JSON (say google.protobuf.StringValue='\"north\"')"
        )
    try:
        return parse_any(type_name.strip(), json_text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def principal_name(principal: pb.Principal) -> str:
    system = principal.system
    name = system.entity_id or system.service_name
    return name or principal.team.entity_id or principal.user.user_id or "-"


def clock_time(timestamp: Timestamp, form: str = "%H:%M:%S") -> str:
    """A stored time in the local time zone; empty if unset."""
    if not timestamp.seconds and not timestamp.nanos:
        return ""
    return timestamp.ToDatetime(UTC).astimezone().strftime(form)


def row(task: pb.Task) -> tuple[str, ...]:
    error = task.status.task_error
    return (
        task.version.task_id,
        status_name(task.status.status),
        f"d{task.version.definition_version}/s{task.version.status_version}",
        principal_name(task.relations.assignee),
        clock_time(task.last_update_time),
        summary(task.status.progress),
        summary(task.status.result),
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


def named_input(text: str) -> tuple[str, Path | None]:
    """NAME=PATH, or NAME= for an input to be attached later (taskctl attach)."""
    name, separator, path = text.partition("=")
    if not separator or not name:
        raise argparse.ArgumentTypeError(f"{text!r}: use NAME=PATH, or NAME= for one to come")
    return name, Path(path) if path else None


class TransferProgress:
    """A progress line on stderr, redrawn in place; nothing unless stderr is a terminal."""

    def __init__(self, label: str) -> None:
        self._label = label
        self._shown = sys.stderr.isatty()
        self._drawn = False

    def __call__(self, done: int, total: int) -> None:
        if self._shown:
            sys.stderr.write(f"\r{progress_line(self._label, done, total)}")
            sys.stderr.flush()
            self._drawn = True

    def close(self) -> None:
        if self._drawn:
            sys.stderr.write("\n")


def progress_line(label: str, done: int, total: int) -> str:
    percent = 100 if total == 0 else done * 100 // total
    return f"{label} {percent:3d}% {done / 2**20:.1f}/{total / 2**20:.1f} MiB"


def upload(client: SyncOperatorClient, path: Path) -> pb.PayloadRef:
    progress = TransferProgress(f"uploading {path.name}")
    try:
        return client.upload_payload(path, progress)
    finally:
        progress.close()


def cmd_upload(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    ref = upload(client, args.path)
    print(json.dumps(to_json(ref)) if args.json else f"{ref.sha256} {ref.size}")
    return EXIT_OK


def cmd_attach(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    task = client.attach_input(args.task_id, args.name, upload(client, args.path))
    show_tasks([task], args.json)
    return EXIT_OK


def cmd_download(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    progress = TransferProgress(f"downloading the results of {args.task_id}")
    try:
        written = client.download_outputs(args.task_id, args.directory, progress)
    except ValueError as error:  # the task has not succeeded
        print(f"taskctl: {error}", file=sys.stderr)
        return EXIT_REFUSED
    finally:
        progress.close()
    for name, path in written.items():
        print(json.dumps({"name": name, "path": str(path)}) if args.json else path)
    return EXIT_OK


def cmd_create(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    inputs = {
        name: None if path is None else upload(client, path) for name, path in args.input or ()
    }
    task = client.create_task(
        assignee_entity_id=args.assignee,
        assignee_pool=args.pool,
        specification=args.spec,
        display_name=args.name,
        description=args.description,
        task_id=args.task_id,
        parent_task_id=args.parent,
        is_executed_elsewhere=args.executed_elsewhere,
        policy=policy_of(args),
        scheduled_time=args.scheduled_time,
        scope=args.scope,
        inputs=inputs,
    )
    show_tasks([task], args.json)
    return EXIT_OK


def policy_of(args: argparse.Namespace) -> TaskPolicy | None:
    policy = TaskPolicy(
        receipt_timeout=args.receipt_timeout,
        heartbeat_timeout=args.heartbeat_timeout,
        execution_timeout=args.execution_timeout,
        max_attempts=args.max_attempts,
        retry_backoff=args.retry_backoff,
        max_retry_backoff=args.max_retry_backoff,
    )
    return None if policy == TaskPolicy() else policy


def cmd_session_submit(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    requests = [
        client.task_request(
            assignee_entity_id=args.assignee,
            assignee_pool=args.pool,
            specification=args.spec,
            display_name=args.name.replace("{n}", str(n)),
            description=args.description,
            task_id=args.task_id.replace("{n}", str(n)),
            parent_task_id=args.parent,
            is_executed_elsewhere=args.executed_elsewhere,
            policy=policy_of(args),
            scheduled_time=args.scheduled_time,
        )
        for n in range(1, args.count + 1)
    ]
    submitted = client.submit_session(
        requests,
        session_id=args.session_id,
        display_name=args.session_name,
        timeout=args.timeout,
        scope=args.scope,
    )
    if args.json:
        print(json.dumps(to_json(submitted), indent=2))
    else:
        again = " (already submitted: nothing new)" if submitted.already_existed else ""
        print(f"session {submitted.session_id}: {len(submitted.task_ids)} tasks{again}")
        for task_id in submitted.task_ids:
            print(task_id)
    return EXIT_OK


def session_line(session: pb.Session) -> str:
    state = pb.SessionState.Name(session.state).removeprefix("SESSION_STATE_")
    counted = ", ".join(f"{c.count} {status_name(c.status)}" for c in session.counts)
    timed_out = ", timed out" if session.timed_out else ""
    return (
        f"session {session.session_id}: {state}{timed_out} ({session.task_count} tasks: {counted})"
    )


def show_session(session: pb.Session, json_out: bool) -> None:
    print(json.dumps(to_json(session), indent=2) if json_out else session_line(session))


def cmd_session_get(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    show_session(client.get_session(args.session_id), args.json)
    return EXIT_OK


def cmd_session_cancel(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    show_session(client.cancel_session(args.session_id, args.reason), args.json)
    return EXIT_OK


def cmd_session_wait(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    try:
        session = client.wait_session(args.session_id, timeout=args.timeout)
    except WaitTimeout as timeout:
        print(f"taskctl: {timeout}", file=sys.stderr)
        return EXIT_TIMEOUT
    show_session(session, args.json)
    return EXIT_OK if session.state == pb.SESSION_STATE_COMPLETED else EXIT_NOT_OK


def cmd_get(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    task = client.get_task(
        args.task_id, agent_view=args.agent_view, definition_version=args.definition_version
    )
    show_tasks([task], args.json)
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
    lines = [
        (
            str(entry.revision),
            str(entry.status_version),
            status_name(entry.status.status),
            clock_time(entry.time, "%Y-%m-%d %H:%M:%S"),
            principal_name(entry.author),
            summary(entry.status.progress),
            entry.status.task_error.message or entry.reason,
        )
        for entry in entries
    ]
    print(table(lines, HISTORY_COLUMNS))
    return EXIT_OK


def cmd_update(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    seen = args.definition_version
    if seen is None:  # no guard given: the definition as it is now
        seen = client.get_task(args.task_id).version.definition_version
    task = client.update_task(
        args.task_id,
        definition_version=seen,
        display_name=args.name,
        description=args.description,
        specification=args.spec,
    )
    show_tasks([task], args.json)
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


AGENT_COLUMNS: tuple[tuple[str, Callable[[pb.AgentPresence], str]], ...] = (
    ("ENTITY_ID", lambda agent: agent.entity_id),
    ("STATE", lambda agent: pb.AgentState.Name(agent.state).removeprefix("AGENT_STATE_")),
    ("STREAMS", lambda agent: str(agent.streams_open)),
    ("FIRST_SEEN", lambda agent: clock_time(agent.first_seen, "%Y-%m-%d %H:%M:%S")),
    ("LAST_SEEN", lambda agent: clock_time(agent.last_seen, "%Y-%m-%d %H:%M:%S")),
    ("IN_FLIGHT", lambda agent: str(agent.tasks_in_flight)),
    ("HELD_TASKS", lambda agent: held_tasks(agent)),
)
"""`taskctl agents`, one (header, cell) pair per column: a new field is one line here."""


def held_tasks(agent: pb.AgentPresence, shown: int = 3) -> str:
    """The ids of the tasks an agent holds, the first few: for a LOST agent, stuck work."""
    ids = list(agent.held_task_ids[:shown])
    more = agent.tasks_in_flight - len(ids)
    return ", ".join(ids + ([f"+{more} more"] if more > 0 else [])) or "-"


def cmd_agents(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    agents = client.list_agents(args.entity_id)
    if args.json:
        print(json.dumps([to_json(a) for a in agents], indent=2))
    else:
        header = [name for name, _ in AGENT_COLUMNS]
        print(table(([cell(a) for _, cell in AGENT_COLUMNS] for a in agents), header))
    return EXIT_OK


def cmd_watch(client: SyncOperatorClient, args: argparse.Namespace) -> int:
    events = client.watch(
        task_ids=args.task_id,
        assignee_entity_ids=args.assignee,
        statuses=args.status or [],
        parent_task_id=args.parent,
        start_revision=args.from_revision,
        include_preexisting=args.from_revision == 0,
    )
    if args.json:
        show = _json_lines
    elif sys.stdout.isatty() and os.environ.get("TERM") != "dumb" and not args.lines:
        show = _live_table
    else:
        show = _event_lines
    # closing(): the watch ends here, on Ctrl+C too, while the client is still open.
    with contextlib.closing(events):
        show(_first(events, args.max_events))
    return EXIT_OK


def _first(events: Iterator[pb.WatchTasksResponse], limit: int) -> Iterator[pb.WatchTasksResponse]:
    for seen, response in enumerate(events, start=1):
        yield response
        if limit and seen >= limit:
            return


def _json_lines(events: Iterable[pb.WatchTasksResponse]) -> None:
    # One object a line, flushed: a script reads each event as it comes.
    for response in events:
        print(json.dumps(to_json(response), separators=(",", ":")), flush=True)


def _event_lines(events: Iterable[pb.WatchTasksResponse]) -> None:
    print(table([], ("REVISION", *COLUMNS)).rstrip(), flush=True)
    for response in events:
        print(f"{response.revision}  " + "  ".join(row(response.event.task)).rstrip(), flush=True)


ALTERNATE_SCREEN, NORMAL_SCREEN = "\x1b[?1049h\x1b[?25l", "\x1b[?25h\x1b[?1049l"
HOME, CLEAR_LINE, CLEAR_BELOW = "\x1b[H", "\x1b[K", "\x1b[J"


def _live_table(events: Iterable[pb.WatchTasksResponse]) -> None:
    """The current state of every task seen, redrawn in place on the terminal's
    alternate screen (so the scrollback keeps what was there); on exit, Ctrl+C too, the
    screen is restored and the last table printed once."""
    latest: dict[str, pb.Task] = {}
    sys.stdout.write(ALTERNATE_SCREEN)
    try:
        _redraw(latest)
        for response in events:
            task = response.event.task
            latest[task.version.task_id] = task
            _redraw(latest)
    finally:
        sys.stdout.write(NORMAL_SCREEN)
        print(table(row(t) for t in latest.values()), flush=True)


def _redraw(latest: dict[str, pb.Task]) -> None:
    rows = [row(t) for t in latest.values()]
    room = max(shutil.get_terminal_size().lines - 2, 1)
    lines = table(rows[:room]).splitlines()
    if len(rows) > room:
        lines.append(f"... and {len(rows) - room} more (taskctl list shows them all)")
    sys.stdout.write(HOME + "".join(line + CLEAR_LINE + "\n" for line in lines) + CLEAR_BELOW)
    sys.stdout.flush()


class _PrintVersion(argparse.Action):
    """--version, looked up only when asked for: scanning the installed distributions
    costs every other command a noticeable pause."""

    def __init__(self, option_strings: Sequence[str], dest: str, **kwargs: object) -> None:
        super().__init__(option_strings, dest, nargs=0, help=str(kwargs.get("help", "")))

    def __call__(self, parser: argparse.ArgumentParser, *_: object) -> None:
        try:  # the distribution holding this package, whatever it is named
            (distribution, *_others) = metadata.packages_distributions()["agent_kit"]
            version = metadata.version(distribution)
        except (KeyError, ValueError, metadata.PackageNotFoundError):
            version = "unknown (not installed)"
        print(f"taskctl {version}")
        parser.exit()


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="taskctl",
        description="The Task Manager from the command line.",
        epilog=__doc__.split("\n\n", 2)[-1] if __doc__ else None,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--version", action=_PrintVersion, help="print taskctl's version")
    parser.add_argument(
        "--target",
        default=os.environ.get("TASK_MANAGER_TARGET", "127.0.0.1:50051"),
        help="HOST[:PORT] of the Task Manager, port 50051 if left out (env TASK_MANAGER_TARGET)",
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
        sub = commands.add_parser(name, help=help_text, description=help_text)
        sub.set_defaults(run=run)
        sub.add_argument("--json", action="store_true", help="print JSON")
        return sub

    _create_parser(command("create", cmd_create, "create a task (sent at once to its assignee)"))
    upload_command = command("upload", cmd_upload, "store a file as a payload: prints its sha256")
    upload_command.add_argument("path", type=Path)
    attach = command("attach", cmd_attach, "upload a file as a task's input that was to come")
    attach.add_argument("task_id")
    attach.add_argument("name", help="the input's name")
    attach.add_argument("path", type=Path)
    download = command(
        "download", cmd_download, "write a finished task's output files into a directory"
    )
    download.add_argument("task_id")
    download.add_argument("directory", type=Path)
    get = command("get", cmd_get, "show one task")
    get.add_argument("task_id")
    get.add_argument("--agent-view", action="store_true", help="as its agent last reported it")
    get.add_argument(
        "--definition-version",
        type=count,
        default=0,
        metavar="N",
        help="an earlier definition (see taskctl update); the status is the current one",
    )
    listing = command("list", cmd_list, "list tasks, oldest first")
    listing.add_argument("--parent", default="")
    filters = listing.add_mutually_exclusive_group()
    filters.add_argument("--status", type=parse_status, action="append", help="repeatable")
    filters.add_argument("--exclude-status", type=parse_status, action="append")
    history = command("history", cmd_history, "every accepted change of a task")
    history.add_argument("task_id")
    update = command("update", cmd_update, "give a task that has not ended a new definition")
    update.add_argument("task_id")
    update.add_argument("--name", help="new display name")
    update.add_argument("--description", help="new description")
    update.add_argument("--spec", type=specification, metavar="TYPE=JSON", help="new specification")
    update.add_argument(
        "--definition-version",
        type=count,
        metavar="N",
        help="the definition version you saw: refused (exit 6) if the task moved on "
        "(default: the current one)",
    )
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
        type=count,
        default=0,
        help="replay from this revision (default: current tasks, then live)",
    )
    watch.add_argument("--max-events", type=count, default=0, help="stop after this many")
    watch.add_argument("--lines", action="store_true", help="one line per event, even on a tty")
    wait = command("wait", cmd_wait, "wait until a task finishes (exit 0 DONE_OK, 1 NOT_OK)")
    wait.add_argument("task_id")
    wait.add_argument("--timeout", type=seconds, default=None, help="seconds")
    agents = command("agents", cmd_agents, "every agent that ever listened, connected or not")
    agents.add_argument("entity_id", nargs="*", help="only these")
    _session_parser(commands)
    return parser


def _session_parser(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    help_text = "sessions: many tasks submitted at once and followed as one"
    session = commands.add_parser("session", help=help_text, description=help_text)
    actions = session.add_subparsers(dest="session_command", required=True)

    def action(name: str, run: Callable[..., int], text: str) -> argparse.ArgumentParser:
        sub = actions.add_parser(name, help=text, description=text)
        sub.set_defaults(run=run)
        sub.add_argument("--json", action="store_true", help="print JSON")
        return sub

    submit = action(
        "submit",
        cmd_session_submit,
        "submit COUNT tasks alike (the options of create; {n} in --name is the task's"
        " number), all stored or none",
    )
    _create_parser(submit)
    submit.add_argument("--count", type=count, default=1, help="how many tasks (default 1)")
    submit.add_argument("--session-id", default="", help="your own id: a retry is then safe")
    submit.add_argument("--session-name", default="", help="the session's display name")
    submit.add_argument(
        "--timeout", type=seconds, default=None, help="seconds: unfinished tasks then cancelled"
    )
    for name, run, text in (
        ("get", cmd_session_get, "a session's state and its tasks counted by status"),
        ("cancel", cmd_session_cancel, "cancel a session's unfinished tasks"),
        ("wait", cmd_session_wait, "wait until a session ends (exit 0 COMPLETED, 1 otherwise)"),
    ):
        sub = action(name, run, text)
        sub.add_argument("session_id")
        if name == "cancel":
            sub.add_argument("--reason", default="")
        if name == "wait":
            sub.add_argument("--timeout", type=seconds, default=None, help="seconds")


def _create_parser(create: argparse.ArgumentParser) -> None:
    to = create.add_mutually_exclusive_group()
    to.add_argument("--assignee", help="the agent's entity id")
    to.add_argument("--pool", help="a pool's entity id: one member at a time gets the task")
    to.add_argument(
        "--unassigned",
        action="store_true",
        help="no assignee: the task is recorded but never sent to any agent",
    )
    create.add_argument("--name", default="", help="display name")
    create.add_argument("--description", default="")
    create.add_argument("--task-id", default="", help="your own id (default: a UUID)")
    create.add_argument("--parent", default="", help="parent task id")
    create.add_argument(
        "--scope",
        default="",
        help="your application's scope: the ids given are ids within it, and the task's id"
        " is SCOPE/ID",
    )
    create.add_argument(
        "--spec", type=specification, metavar="TYPE=JSON", help="specification, a known type"
    )
    create.add_argument(
        "--scheduled-time",
        type=moment,
        metavar="ISO8601",
        help="hold the task until then (no offset: local time)",
    )
    create.add_argument("--executed-elsewhere", action="store_true")
    create.add_argument(
        "--input",
        type=named_input,
        action="append",
        metavar="NAME=PATH",
        help="an input file, uploaded first (repeatable); NAME= declares one to come"
        " (taskctl attach), and the task waits for it",
    )
    policy = create.add_argument_group("policy (seconds; 0 = no timeout; default: the server's)")
    for name in ("receipt", "heartbeat", "execution"):
        policy.add_argument(f"--{name}-timeout", type=seconds, metavar="S")
    policy.add_argument("--max-attempts", type=count, metavar="N")
    policy.add_argument("--retry-backoff", type=seconds, metavar="S")
    policy.add_argument("--max-retry-backoff", type=seconds, metavar="S")


def main(argv: Sequence[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _check_usage(parser, args)
    # SIGTERM (`timeout 60 taskctl watch`, a service manager) unwinds like Ctrl+C: the
    # terminal is restored and the connection closed.
    signal.signal(signal.SIGTERM, _terminated)
    return execute(args)


def _terminated(signal_number: int, frame: object) -> None:
    raise SystemExit(EXIT_TERMINATED)


def execute(args: argparse.Namespace) -> int:
    """Runs a parsed command line; every way it can end is an exit code and at most a
    line on stderr, never a traceback."""
    try:
        auth = ClientAuth(
            token=args.token,
            tls=args.tls,
            tls_ca=args.tls_ca,
            tls_cert=args.tls_cert,
            tls_key=args.tls_key,
        )
        with SyncOperatorClient(target_with_port(args.target), auth=auth) as client:
            code: int = args.run(client, args)
            return code
    except DefinitionConflict as conflict:
        current = conflict.current_definition_version
        print(
            f"taskctl: ABORTED: task {conflict.task_id} is at definition_version "
            f"{current if current is not None else 'a newer one'}, "
            f"not {conflict.seen_definition_version}: read it again (taskctl get) and decide anew",
            file=sys.stderr,
        )
        return EXIT_REFUSED
    except grpc.RpcError as error:
        status = error.code()
        print(f"taskctl: {status.name}: {error.details()}", file=sys.stderr)
        return _EXIT_FOR_CODE.get(status, EXIT_REFUSED)
    except BrokenPipeError:  # `taskctl list | head`: the reader has all it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return EXIT_BROKEN_PIPE
    except KeyboardInterrupt:
        return EXIT_INTERRUPTED
    except Exception as error:
        print(f"taskctl: unexpected error: {type(error).__name__}: {error}", file=sys.stderr)
        return EXIT_UNEXPECTED


def _check_usage(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """What argparse cannot check alone; exits 2 with the reason."""
    try:
        target_with_port(args.target)
    except ValueError as error:
        parser.error(str(error))
    if (args.tls_cert is None) != (args.tls_key is None):
        parser.error("a client certificate needs both --tls-cert and --tls-key")
    for path in (args.tls_ca, args.tls_cert, args.tls_key):
        if path is not None and not os.access(path, os.R_OK):
            parser.error(f"cannot read {path}")
    if args.command == "create" or getattr(args, "session_command", None) == "submit":
        unassigned = not (args.assignee or args.pool or args.executed_elsewhere)
        if unassigned and not args.unassigned:
            parser.error(
                "no --assignee or --pool: such a task is never sent to any agent "
                "(--unassigned creates it anyway)"
            )
    if getattr(args, "session_command", None) == "submit":
        if args.count == 0:
            parser.error("--count must be at least 1")
        if args.task_id and args.count > 1 and "{n}" not in args.task_id:
            parser.error("--task-id names one task: put {n} in it for --count tasks")
    files = [path for _, path in getattr(args, "input", None) or () if path is not None]
    if args.command in ("upload", "attach"):
        files.append(args.path)
    for path in files:
        if not path.is_file() or not os.access(path, os.R_OK):
            parser.error(f"cannot read the file {path}")
    if args.command == "update" and (args.name, args.description, args.spec) == (None,) * 3:
        parser.error("update needs at least one of --name, --description, --spec")


if __name__ == "__main__":
    sys.exit(main())
