"""taskctl end to end: the real command against a real server."""

from __future__ import annotations

import base64
import hashlib
import json
import os
import pty
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path

import grpc
import pytest
from google.protobuf import any_pb2

from agent_kit import taskctl as taskctl_module
from storage import add_credential
from task_manager.auth import Role, new_token
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.v1 import task_manager_pb2_grpc
from tests.helpers import REPO_ROOT, Databases, ServerProcess, status_update, wait_until


@pytest.fixture(scope="module")
def server(backend: str, databases: Databases) -> Iterator[ServerProcess]:
    running = ServerProcess(databases.new(backend)).start()
    yield running
    assert running.terminate() == 0


@pytest.fixture(scope="module")
def walker(server: ServerProcess) -> Iterator[str]:
    """An agent_kit agent in its own process, as in the walkthrough: it reports progress
    StringValue("halfway") and finishes with result StringValue("done by walker")."""
    yield from _agent_process(server, "walker")


@pytest.fixture(scope="module")
def stuck_walker(server: ServerProcess) -> Iterator[str]:
    """The same agent, except that its handler never returns after reporting progress."""
    yield from _agent_process(server, "stuck-walker", "--hang")


def _agent_process(server: ServerProcess, entity_id: str, *flags: str) -> Iterator[str]:
    module = ("-m", "tests.agent_process", "--target", server.address)
    agent = subprocess.Popen(
        [sys.executable, *module, "--entity-id", entity_id, *flags],
        cwd=REPO_ROOT,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        yield entity_id
    finally:
        agent.terminate()
        agent.wait(30)


def taskctl(
    server: ServerProcess, *args: str, timeout: float = 60, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    environment = {**os.environ, "TASK_MANAGER_TARGET": server.address, **(env or {})}
    return subprocess.run(
        [sys.executable, "-m", "agent_kit.taskctl", *args],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        env=environment,
        timeout=timeout,
    )


def as_tasks(result: subprocess.CompletedProcess[str]) -> list[dict[str, object]]:
    assert result.returncode == 0, result.stderr
    parsed: list[dict[str, object]] = json.loads(result.stdout)
    return parsed


def finish(server: ServerProcess, task_id: str, status: pb.Status.ValueType) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = task_manager_pb2_grpc.TaskManagerStub(channel)
        task = stub.GetTask(pb.GetTaskRequest(task_id=task_id)).task
        stub.UpdateStatus(status_update(task, status))


def done_by_walker(server: ServerProcess, walker: str, task_id: str) -> None:
    """Creates task_id for the walker agent and waits until it is DONE_OK."""
    created = taskctl(server, "create", "--assignee", walker, "--task-id", task_id)
    assert created.returncode == 0, created.stderr
    assert taskctl(server, "wait", task_id, "--timeout", "60").returncode == 0


STRING_RESULT = {
    "@type": "type.googleapis.com/google.protobuf.StringValue",
    "value": "done by walker",
}


def test_json_of_a_task_whose_result_is_a_string_value(server: ServerProcess, walker: str) -> None:
    done_by_walker(server, walker, "ctl-json-1")
    header, line = taskctl(server, "get", "ctl-json-1").stdout.splitlines()
    assert line[header.index("RESULT") :].startswith("done by walker")
    (got,) = as_tasks(taskctl(server, "get", "ctl-json-1", "--json"))
    assert got["status"]["result"] == STRING_RESULT  # type: ignore[index]
    listed = as_tasks(taskctl(server, "list", "--json"))
    (mine,) = [t for t in listed if t["version"]["task_id"] == "ctl-json-1"]  # type: ignore[index]
    assert mine["status"]["result"] == STRING_RESULT  # type: ignore[index]
    history = as_tasks(taskctl(server, "history", "ctl-json-1", "--json"))
    assert history[-1]["status"]["result"] == STRING_RESULT  # type: ignore[index]
    table = taskctl(server, "history", "ctl-json-1").stdout
    assert "halfway" in table  # the progress report, in its own entry
    progress = {"@type": STRING_RESULT["@type"], "value": "halfway"}
    assert progress in [entry["status"].get("progress") for entry in history]  # type: ignore[attr-defined]


def test_watch_json_prints_one_object_per_event(server: ServerProcess, walker: str) -> None:
    done_by_walker(server, walker, "ctl-json-2")
    history = as_tasks(taskctl(server, "history", "ctl-json-2", "--json"))
    watched = taskctl(
        server,
        "watch",
        "--task-id",
        "ctl-json-2",
        "--from-revision",
        "1",
        "--max-events",
        str(len(history)),
        "--json",
    )
    assert watched.returncode == 0, watched.stderr
    events = [json.loads(line) for line in watched.stdout.splitlines()]
    assert [e["revision"] for e in events] == [entry["revision"] for entry in history]
    assert [e["event"]["task"]["status"]["status"] for e in events] == [
        entry["status"]["status"]  # type: ignore[index]
        for entry in history
    ]
    assert events[-1]["event"]["task"]["status"]["result"] == STRING_RESULT


def test_json_shows_a_type_it_does_not_know_as_type_and_base64(server: ServerProcess) -> None:
    unknown = any_pb2.Any(type_url="type.googleapis.com/acme.v1.Waypoints", value=b"\x08\x01")
    with grpc.insecure_channel(server.address) as channel:
        stub = task_manager_pb2_grpc.TaskManagerStub(channel)
        request = pb.CreateTaskRequest(task_id="ctl-json-3", specification=unknown)
        request.relations.assignee.system.entity_id = "nobody-listens"
        stub.CreateTask(request)
    opaque = {"@type": unknown.type_url, "value": base64.b64encode(unknown.value).decode()}
    (got,) = as_tasks(taskctl(server, "get", "ctl-json-3", "--json"))
    assert got["specification"] == opaque
    listed = as_tasks(taskctl(server, "list", "--json"))
    assert opaque in [task.get("specification") for task in listed]
    table = taskctl(server, "get", "ctl-json-3")
    assert table.returncode == 0, table.stderr


def test_create_get_list_history_cancel_complete(server: ServerProcess) -> None:
    (created,) = as_tasks(
        taskctl(
            server,
            "create",
            "--assignee",
            "drone-9",
            "--name",
            "survey",
            "--task-id",
            "ctl-task-1",
            "--json",
        )
    )
    assert created["status"] == {"status": "STATUS_SENT"}
    (got,) = as_tasks(taskctl(server, "get", "ctl-task-1", "--json"))
    assert got == created
    table = taskctl(server, "list", "--status", "sent")
    assert table.returncode == 0
    assert "ctl-task-1" in table.stdout
    assert "SENT" in table.stdout.splitlines()[1]
    excluded = taskctl(server, "list", "--exclude-status", "SENT")
    assert "ctl-task-1" not in excluded.stdout
    taskctl(server, "create", "--assignee", "drone-9", "--task-id", "ctl-task-2")
    cancelled = taskctl(server, "cancel", "ctl-task-1", "--reason", "weather")
    assert "CANCEL_REQUESTED" in cancelled.stdout
    completed = taskctl(server, "complete", "ctl-task-2")
    assert "COMPLETE_REQUESTED" in completed.stdout
    history = taskctl(server, "history", "ctl-task-1")
    lines = history.stdout.splitlines()
    assert [line.split()[2] for line in lines[1:]] == ["CREATED", "SENT", "CANCEL_REQUESTED"]
    assert lines[-1].endswith("weather")


@pytest.mark.parametrize(
    ("args", "exit_code", "message"),
    [
        (("get", "no-such-task"), 3, "NOT_FOUND"),
        (("create", "--assignee", "d1", "--task-id", "bad id!"), 6, "INVALID_ARGUMENT"),
        (("list", "--status", "flying"), 2, "unknown status"),
    ],
)
def test_errors_are_readable_with_exit_codes_scripts_can_test(
    server: ServerProcess, args: tuple[str, ...], exit_code: int, message: str
) -> None:
    result = taskctl(server, *args)
    assert result.returncode == exit_code
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_unreachable_server_is_exit_5(server: ServerProcess) -> None:
    result = taskctl(server, "--target", "127.0.0.1:1", "get", "some-task")
    assert result.returncode == 5
    assert "UNAVAILABLE" in result.stderr


def test_wait_exit_codes(server: ServerProcess) -> None:
    taskctl(server, "create", "--assignee", "drone-9", "--task-id", "ctl-wait-1")
    timed_out = taskctl(server, "wait", "ctl-wait-1", "--timeout", "0.3")
    assert timed_out.returncode == 4
    assert "did not finish" in timed_out.stderr
    finish(server, "ctl-wait-1", pb.STATUS_DONE_OK)
    assert taskctl(server, "wait", "ctl-wait-1").returncode == 0
    taskctl(server, "create", "--assignee", "drone-9", "--task-id", "ctl-wait-2")
    finish(server, "ctl-wait-2", pb.STATUS_DONE_NOT_OK)
    assert taskctl(server, "wait", "ctl-wait-2").returncode == 1


def test_watch_follows_changes_live(server: ServerProcess) -> None:
    taskctl(server, "create", "--assignee", "drone-w", "--task-id", "ctl-watch-0")
    env = {**os.environ, "TASK_MANAGER_TARGET": server.address}
    watcher = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "agent_kit.taskctl",
            "watch",
            "--assignee",
            "drone-w",
            "--max-events",
            "3",
            "--lines",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    try:
        assert watcher.stdout is not None
        assert watcher.stdout.readline().split()[:3] == ["REVISION", "TASK_ID", "STATUS"]
        snapshot = watcher.stdout.readline()  # the task as it is now: subscribed
        assert "ctl-watch-0" in snapshot
        assert "SENT" in snapshot
        finish(server, "ctl-watch-0", pb.STATUS_EXECUTING)
        finish(server, "ctl-watch-0", pb.STATUS_DONE_NOT_OK)
        rest = watcher.communicate(timeout=60)[0].splitlines()
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert watcher.returncode == 0
    assert ["EXECUTING" in rest[0], "DONE_NOT_OK" in rest[1]] == [True, True]
    assert all("ctl-watch-0" in line for line in rest)


def test_a_token_from_the_flag_or_the_environment(database: str) -> None:
    db = database
    credential, token = new_token("olivia", Role.OPERATOR, (), time.time_ns())
    add_credential(db, credential)
    secured = ServerProcess(db).start()
    try:
        refused = taskctl(secured, "list")
        assert refused.returncode == 7
        assert "UNAUTHENTICATED" in refused.stderr
        assert taskctl(secured, "--token", token, "create", "--assignee", "d1").returncode == 0
        env = {"TASK_MANAGER_TOKEN": token}
        listed = as_tasks(taskctl(secured, "list", "--json", env=env))
        assert [task["created_by"] for task in listed] == [{"user": {"user_id": "olivia"}}]
    finally:
        assert secured.terminate() == 0


def taskctl_process(
    server: ServerProcess,
    *args: str,
    stdout: int = subprocess.PIPE,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """taskctl running in the background; stdout a pipe unless given a file descriptor."""
    return subprocess.Popen(
        [sys.executable, "-m", "agent_kit.taskctl", *args],
        stdout=stdout,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env={**os.environ, "TASK_MANAGER_TARGET": server.address, **(env or {})},
    )


def test_ctrl_c_on_watch_exits_130_without_a_traceback(server: ServerProcess) -> None:
    taskctl(server, "create", "--assignee", "drone-int", "--task-id", "ctl-int-1")
    watcher = taskctl_process(server, "watch", "--assignee", "drone-int", "--lines")
    try:
        assert watcher.stdout is not None
        watcher.stdout.readline()  # the header
        assert "ctl-int-1" in watcher.stdout.readline()  # subscribed, blocked on the stream
        watcher.send_signal(signal.SIGINT)
        _, stderr = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
    assert "Traceback" not in stderr
    assert stderr == ""
    assert watcher.returncode == 130


def read_terminal(master: int, until: Callable[[bytes], bool], timeout: float = 60) -> bytes:
    """What a process wrote to the terminal, read until the condition holds."""
    seen = b""
    deadline = time.monotonic() + timeout
    while not until(seen):
        left = deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"timed out waiting on the terminal; it showed {seen!r}")
        if select.select([master], [], [], left)[0]:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # the other end closed
                chunk = b""
            if not chunk:
                break
            seen += chunk
    return seen


@pytest.mark.parametrize(("stop", "exit_code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143)])
def test_the_live_table_redraws_on_the_alternate_screen_and_restores_it(
    server: ServerProcess, stop: signal.Signals, exit_code: int
) -> None:
    assignee = f"nobody-{stop.name}"  # no task yet: the watch starts empty
    master, terminal = pty.openpty()
    watcher = taskctl_process(
        server, "watch", "--assignee", assignee, stdout=terminal, env={"TERM": "xterm"}
    )
    os.close(terminal)
    try:
        shown = read_terminal(master, lambda seen: b"TASK_ID" in seen)
        # An empty watch shows its header, on the alternate screen: no scrollback filled.
        assert shown.startswith(taskctl_module.ALTERNATE_SCREEN.encode())
        assert b"STATUS" in shown
        task_id = f"ctl-live-{stop.name}"
        taskctl(server, "create", "--assignee", assignee, "--task-id", task_id)
        shown += read_terminal(master, lambda seen: task_id.encode() in seen)
        redraw = shown.rsplit(taskctl_module.HOME.encode(), 1)[1]
        assert redraw.endswith(taskctl_module.CLEAR_BELOW.encode())  # drawn in place
        watcher.send_signal(stop)
        shown += read_terminal(master, lambda seen: False)  # until it exits
        _, stderr = watcher.communicate(timeout=60)
    finally:
        if watcher.poll() is None:
            watcher.kill()
            watcher.communicate()
        os.close(master)
    restored = shown.rsplit(taskctl_module.NORMAL_SCREEN.encode(), 1)
    assert len(restored) == 2, shown
    assert task_id.encode() in restored[1]  # the last table stays on the normal screen
    assert (watcher.returncode, stderr) == (exit_code, "")


def test_progress_shows_in_get_and_watch(server: ServerProcess, stuck_walker: str) -> None:
    taskctl(server, "create", "--assignee", stuck_walker, "--task-id", "ctl-progress-1")

    def progress_shown() -> str | None:
        shown = taskctl(server, "get", "ctl-progress-1").stdout
        return shown if "halfway" in shown else None

    shown = wait_until(progress_shown, 60, "the agent's progress in taskctl get")
    header, line = shown.splitlines()
    assert line[header.index("PROGRESS") :].startswith("halfway")
    watched = taskctl(server, "watch", "--task-id", "ctl-progress-1", "--max-events", "1")
    assert "halfway" in watched.stdout.splitlines()[1]


def test_create_sends_policy_pool_parent_schedule_and_specification(
    server: ServerProcess,
) -> None:
    (parent,) = as_tasks(taskctl(server, "create", "--pool", "pool-x", "--json"))
    later = (datetime.now(UTC) + timedelta(hours=2)).replace(microsecond=0)
    created = taskctl(
        server,
        "create",
        "--assignee",
        "drone-p",
        "--parent",
        parent["version"]["task_id"],  # type: ignore[index]
        "--scheduled-time",
        later.isoformat(),
        "--spec",
        'google.protobuf.Struct={"field": "north"}',
        "--receipt-timeout",
        "1.5",
        "--heartbeat-timeout",
        "30",
        "--execution-timeout",
        "0",
        "--max-attempts",
        "3",
        "--retry-backoff",
        "2",
        "--max-retry-backoff",
        "60",
        "--json",
    )
    (task,) = as_tasks(created)
    assert parent["relations"] == {"assignee": {"team": {"entity_id": "pool-x"}}}
    assert task["relations"]["parent_task_id"] == parent["version"]["task_id"]  # type: ignore[index]
    assert task["status"] == {"status": "STATUS_SCHEDULED_IN_MANAGER"}
    assert task["scheduled_time"] == later.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert task["specification"] == {
        "@type": "type.googleapis.com/google.protobuf.Struct",
        "value": {"field": "north"},
    }
    assert task["policy"] == {
        "receipt_timeout": "1.500s",
        "heartbeat_timeout": "30s",
        "execution_timeout": "0s",
        "max_attempts": 3,
        "retry_backoff": "2s",
        "max_retry_backoff": "60s",
    }


def test_create_without_an_assignee_is_refused_unless_asked_for(server: ServerProcess) -> None:
    refused = taskctl(server, "create", "--task-id", "ctl-lonely-1")
    assert refused.returncode == 2
    assert "never sent to any agent" in refused.stderr
    assert taskctl(server, "get", "ctl-lonely-1").returncode == 3  # nothing was created
    (task,) = as_tasks(
        taskctl(server, "create", "--task-id", "ctl-lonely-1", "--unassigned", "--json")
    )
    assert task["status"] == {"status": "STATUS_CREATED"}


def test_update_gives_a_new_definition_and_a_stale_version_is_refused(
    server: ServerProcess,
) -> None:
    taskctl(server, "create", "--assignee", "drone-u", "--task-id", "ctl-update-1", "--name", "a")
    (updated,) = as_tasks(
        taskctl(
            server, "update", "ctl-update-1", "--name", "b", "--definition-version", "1", "--json"
        )
    )
    assert (updated["display_name"], updated["version"]["definition_version"]) == ("b", 2)  # type: ignore[index]
    stale = taskctl(server, "update", "ctl-update-1", "--name", "c", "--definition-version", "1")
    assert stale.returncode == 6
    assert "ABORTED" in stale.stderr
    assert "definition_version 2, not 1" in stale.stderr
    (latest,) = as_tasks(
        taskctl(
            server,
            "update",
            "ctl-update-1",
            "--description",
            "d",
            "--spec",
            'google.protobuf.StringValue="north"',
            "--json",
        )
    )
    assert (latest["display_name"], latest["description"]) == ("b", "d")
    assert latest["specification"]["value"] == "north"  # type: ignore[index]
    (first,) = as_tasks(
        taskctl(server, "get", "ctl-update-1", "--definition-version", "1", "--json")
    )
    assert (first["display_name"], first["version"]["definition_version"]) == ("a", 1)  # type: ignore[index]
    nothing = taskctl(server, "update", "ctl-update-1")
    assert nothing.returncode == 2
    assert "at least one of" in nothing.stderr


def test_agents_lists_every_agent_with_its_state(server: ServerProcess, walker: str) -> None:
    done_by_walker(server, walker, "ctl-agents-1")
    table = taskctl(server, "agents")
    assert table.returncode == 0, table.stderr
    header, *lines = table.stdout.splitlines()
    assert header.split() == [
        "ENTITY_ID",
        "STATE",
        "STREAMS",
        "FIRST_SEEN",
        "LAST_SEEN",
        "IN_FLIGHT",
        "HELD_TASKS",
    ]
    (line,) = [line for line in lines if line.split()[0] == walker]
    assert line.split()[1:3] == ["CONNECTED", "1"]
    (agent,) = as_tasks(taskctl(server, "agents", walker, "--json"))
    assert (agent["entity_id"], agent["state"]) == (walker, "AGENT_STATE_CONNECTED")


def test_agents_shows_the_tasks_a_disconnected_agent_still_holds(server: ServerProcess) -> None:
    with grpc.insecure_channel(server.address) as channel:
        stub = task_manager_pb2_grpc.TaskManagerStub(channel)
        request = pb.CreateTaskRequest(
            task_id="ctl-held-1",
            relations=pb.Relations(assignee=pb.Principal(system=pb.System(entity_id="gone-1"))),
        )
        task = stub.CreateTask(request).task
        stream = stub.ListenAsAgent(
            pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["gone-1"]))
        )
        # grpc-stubs types a server stream as neither iterator nor call.
        next(stream)  # type: ignore[call-overload]  # the ExecuteRequest: the agent has it
        stub.UpdateStatus(status_update(task, pb.STATUS_EXECUTING))
        stream.cancel()  # type: ignore[no-untyped-call]  # and goes away with it
        wait_until(
            lambda: (
                not stub.ListAgents(pb.ListAgentsRequest(entity_ids=["gone-1"]))
                .agents[0]
                .streams_open
            ),
            what="gone-1's stream to close",
        )
    table = taskctl(server, "agents", "gone-1")
    assert table.returncode == 0, table.stderr
    _header, line = table.stdout.splitlines()
    assert line.split()[1] == "DISCONNECTED"
    assert line.split()[-1] == "ctl-held-1"
    (agent,) = as_tasks(taskctl(server, "agents", "gone-1", "--json"))
    assert agent["held_task_ids"] == ["ctl-held-1"]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("watch", "--from-revision", "-5"), "not a whole number >= 0"),
        (("watch", "--max-events", "-1"), "not a whole number >= 0"),
        (("wait", "some-task", "--timeout", "-1"), "not a number of seconds >= 0"),
        (("create", "--assignee", "d1", "--heartbeat-timeout", "nan"), "not a number of seconds"),
        (("create", "--assignee", "d1", "--scheduled-time", "tomorrow"), "not an ISO 8601 time"),
        (("create", "--assignee", "d1", "--spec", "acme.Plan={}"), "unknown message type"),
        (("create", "--assignee", "d1", "--pool", "p1"), "not allowed with argument"),
        (("--target", "host:http", "list"), "malformed target"),
        (("--tls-cert", "/nonexistent.pem", "list"), "needs both --tls-cert and --tls-key"),
    ],
)
def test_a_bad_command_line_is_exit_2_with_the_reason(
    server: ServerProcess, args: tuple[str, ...], message: str
) -> None:
    result = taskctl(server, *args)
    assert (result.returncode, result.stdout) == (2, "")
    assert message in result.stderr
    assert "Traceback" not in result.stderr


def test_version() -> None:
    result = subprocess.run(
        [sys.executable, "-m", "agent_kit.taskctl", "--version"],
        capture_output=True,
        text=True,
        cwd=REPO_ROOT,
        timeout=60,
    )
    assert result.returncode == 0
    # The installed distribution's version, whatever the distribution is called.
    (distribution, *_) = metadata.packages_distributions()["agent_kit"]
    assert result.stdout.strip() == f"taskctl {metadata.version(distribution)}"
    assert re.fullmatch(r"taskctl \d+\.\d+.*", result.stdout.strip())


def test_a_crash_inside_taskctl_is_its_own_exit_code_never_1(server: ServerProcess) -> None:
    def broken(client: object, args: object) -> int:
        raise RuntimeError("a bug")

    args = taskctl_module._parser().parse_args(["--target", server.address, "list"])
    args.run = broken
    assert taskctl_module.execute(args) == taskctl_module.EXIT_UNEXPECTED != 1


def test_a_reader_that_stops_early_is_no_error(server: ServerProcess) -> None:
    reader = taskctl_process(server, "list")
    assert reader.stdout is not None
    reader.stdout.close()  # as `taskctl list | head -0` does
    _, stderr = reader.communicate(timeout=60)
    assert "Traceback" not in stderr
    assert reader.returncode == 141  # as if ended by SIGPIPE, the shells' convention


def test_a_session_submitted_waited_for_and_cancelled(server: ServerProcess, walker: str) -> None:
    submit = ("session", "submit", "--count", "3", "--assignee", walker, "--name", "leg {n}")
    submitted = taskctl(server, *submit, "--session-id", "ctl-session-1", "--json")
    assert submitted.returncode == 0, submitted.stderr
    task_ids = json.loads(submitted.stdout)["task_ids"]
    assert len(task_ids) == 3
    waited = taskctl(server, "session", "wait", "ctl-session-1", "--timeout", "60")
    assert waited.returncode == 0, waited.stderr
    assert waited.stdout.strip() == "session ctl-session-1: COMPLETED (3 tasks: 3 DONE_OK)"
    names = [as_tasks(taskctl(server, "get", task_id, "--json"))[0] for task_id in task_ids]
    assert [task["display_name"] for task in names] == ["leg 1", "leg 2", "leg 3"]
    again = taskctl(server, *submit, "--session-id", "ctl-session-1")
    assert again.returncode == 0, again.stderr
    assert "already submitted: nothing new" in again.stdout

    unheard = ("session", "submit", "--count", "2", "--assignee", "drone-none")
    taskctl(server, *unheard, "--session-id", "ctl-session-2")
    cancelled = taskctl(server, "session", "cancel", "ctl-session-2", "--reason", "not today")
    assert cancelled.returncode == 0, cancelled.stderr
    assert cancelled.stdout.startswith("session ctl-session-2: CANCELLED (2 tasks:")
    assert taskctl(server, "session", "wait", "ctl-session-2").returncode == 1
    missing = taskctl(server, "session", "get", "ctl-session-9")
    assert missing.returncode == 3
    assert "session ctl-session-9 does not exist" in missing.stderr
    for bad in (("--count", "0"), ("--count", "2", "--task-id", "same-id-1")):
        refused = taskctl(server, "session", "submit", "--assignee", "drone-1", *bad)
        assert refused.returncode == 2, refused.stderr
    no_assignee = taskctl(server, "session", "submit", "--count", "2")
    assert no_assignee.returncode == 2
    assert "no --assignee or --pool" in no_assignee.stderr


def test_a_scope_makes_ids_of_create_and_session_submit_ids_within_it(
    server: ServerProcess,
) -> None:
    scoped = ("--assignee", "drone-9", "--scope", "survey-app")
    for scope_flags in (scoped, ("--assignee", "drone-9", "--scope", "mapping-app")):
        (created,) = as_tasks(
            taskctl(server, "create", *scope_flags, "--task-id", "ctl-task-7", "--json")
        )
        scope = scope_flags[-1]
        assert created["version"]["task_id"] == f"{scope}/ctl-task-7"  # type: ignore[index]
        assert created["scope"] == scope
    (got,) = as_tasks(taskctl(server, "get", "survey-app/ctl-task-7", "--json"))
    assert got["scope"] == "survey-app"
    submitted = taskctl(
        server, "session", "submit", *scoped, "--count", "2", "--task-id", "leg-{n}-01",
        "--session-id", "ctl-session-7", "--json",
    )  # fmt: skip
    assert submitted.returncode == 0, submitted.stderr
    answer = json.loads(submitted.stdout)
    assert answer["session_id"] == "survey-app/ctl-session-7"
    assert answer["task_ids"] == ["survey-app/leg-1-01", "survey-app/leg-2-01"]
    shown = taskctl(server, "session", "get", "survey-app/ctl-session-7")
    assert shown.returncode == 0 and "survey-app/ctl-session-7" in shown.stdout, shown.stderr
    refused = taskctl(server, "create", "--assignee", "drone-9", "--scope", "no scope")
    assert refused.returncode == 6 and "is not a scope" in refused.stderr, refused.stderr


def test_inputs_uploaded_attached_and_the_results_downloaded(
    server: ServerProcess, walker: str, tmp_path: Path
) -> None:
    mesh, notes = tmp_path / "mesh.bin", tmp_path / "notes.txt"
    mesh.write_bytes(os.urandom(3 * 2**20 + 5))  # several upload chunks
    notes.write_text("windy")
    uploaded = taskctl(server, "upload", str(notes))
    assert uploaded.returncode == 0, uploaded.stderr
    assert uploaded.stdout.split() == [hashlib.sha256(b"windy").hexdigest(), "5"]

    create = ("create", "--assignee", walker, "--input", f"mesh={mesh}", "--input", "notes=")
    (task,) = as_tasks(taskctl(server, *create, "--json"))
    task_id = str(task["version"]["task_id"])  # type: ignore[index]
    assert task["status"] == {"status": "STATUS_CREATED"}
    assert task["pending_inputs"] == ["notes"]
    not_yet = taskctl(server, "download", task_id, str(tmp_path / "early"))
    assert (not_yet.returncode, "no successful attempt" in not_yet.stderr) == (6, True)

    (attached,) = as_tasks(taskctl(server, "attach", task_id, "notes", str(notes), "--json"))
    assert attached["status"]["status"] == "STATUS_SENT"  # type: ignore[index]
    assert taskctl(server, "wait", task_id, "--timeout", "60").returncode == 0
    results = tmp_path / "results"
    downloaded = taskctl(server, "download", task_id, str(results))
    assert downloaded.returncode == 0, downloaded.stderr
    assert sorted(downloaded.stdout.split()) == [str(results / "mesh"), str(results / "notes")]
    assert (results / "mesh").read_bytes() == mesh.read_bytes()
    assert (results / "notes").read_text() == "windy"

    missing = taskctl(server, "upload", str(tmp_path / "nowhere"))
    assert (missing.returncode, "cannot read the file" in missing.stderr) == (2, True)


def test_the_progress_line() -> None:
    assert taskctl_module.progress_line("up", 3 * 2**19, 2**21) == "up  75% 1.5/2.0 MiB"
    assert taskctl_module.progress_line("up", 0, 0) == "up 100% 0.0/0.0 MiB"
