"""The README walkthrough: examples/agent.py and examples/operator.py against a server;
and a task with files, from examples/files_operator.py and from taskctl, run by
examples/files_agent.py."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import sys
from pathlib import Path

import grpc

from task_manager.v1 import task_manager_pb2, task_manager_pb2_grpc
from tests.helpers import REPO_ROOT, ServerProcess, wait_until


def test_example_operator_sees_the_example_agent_finish_a_task(database: str) -> None:
    server = ServerProcess(database).start()
    agent = start_example_agent(server.address)
    try:
        assert agent.stdout is not None
        operator = subprocess.run(
            [sys.executable, "examples/operator.py", "--target", server.address],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
    finally:
        agent.terminate()
        agent.wait(30)
        if agent.stdout is not None:
            agent.stdout.close()
        assert server.terminate() == 0
    assert operator.returncode == 0, operator.stdout + operator.stderr
    lines = operator.stdout.splitlines()
    history_rows = [line.split() for line in lines if line.startswith("  ") and "STATUS_" in line]
    walked = [row[-1] for row in history_rows]
    assert [int(row[1]) for row in history_rows] == list(range(1, 8))  # status versions
    assert walked == [
        "STATUS_CREATED",
        "STATUS_SENT",
        "STATUS_MACHINE_RECEIPT",
        "STATUS_ACK",
        "STATUS_WILCO",
        "STATUS_EXECUTING",
        "STATUS_DONE_OK",
    ]
    assert "operator: result: surveyed: the north field" in lines


def test_ctrl_c_stops_the_example_agent_cleanly(database: str) -> None:
    server = ServerProcess(database).start()
    agent = start_example_agent(server.address)
    try:
        assert agent.stdout is not None
        wait_until(lambda: "drone-1" in agent_ids(server.address), what="the agent to be connected")
        assert server.terminate() == 0  # the agent's stream ends: it logs, and reconnects
        seen: list[str] = []
        while not seen or "reconnecting" not in seen[-1]:
            seen.append(agent.stdout.readline())
            assert seen[-1], f"the agent ended: {seen}"
        agent.send_signal(signal.SIGINT)
        rest, _ = agent.communicate(timeout=60)
    finally:
        if agent.poll() is None:
            agent.kill()
            agent.wait(30)
    output = "".join(seen) + rest
    assert agent.returncode == 0, output
    assert "Traceback" not in output, output
    assert output.splitlines()[-1] == "agent: stopped", output
    # gRPC's own C-core log lines (I1201 12:00:00.000 ... chttp2_transport.cc] ...) stay out.
    assert not re.search(r"^[IWE]\d{4} ", output, re.MULTILINE), output


def test_a_task_with_an_input_file_and_an_output_file_from_python_and_taskctl(
    database: str, tmp_path: Path
) -> None:
    mesh = tmp_path / "mesh.obj"
    mesh.write_bytes(b"v 0 0 0\nv 1 0 0\nv 0 1 0\nf 1 2 3\n" * 1000)
    expected = (
        f"{mesh.stat().st_size} bytes, 4000 lines,"
        f" sha256 {hashlib.sha256(mesh.read_bytes()).hexdigest()}\n"
    )
    server = ServerProcess(database).start()
    agent = start_example_agent(server.address, "examples/files_agent.py", "scanner-1")
    try:
        results = tmp_path / "python"
        operator = run(
            "examples/files_operator.py", str(mesh), str(results), "--target", server.address
        )
        assert operator.returncode == 0, operator.stdout + operator.stderr
        assert (results / "report").read_text() == expected
        assert f"operator: output report -> {results / 'report'}" in operator.stdout

        def taskctl(*args: str) -> subprocess.CompletedProcess[str]:
            done = run("-m", "agent_kit.taskctl", "--target", server.address, *args)
            assert done.returncode == 0, done.stdout + done.stderr
            return done

        created = taskctl("create", "--assignee", "scanner-1", "--input", f"mesh={mesh}", "--json")
        (task,) = json.loads(created.stdout)
        task_id = task["version"]["task_id"]
        taskctl("wait", task_id, "--timeout", "60")
        taskctl("download", task_id, str(tmp_path / "taskctl"))
        assert (tmp_path / "taskctl" / "report").read_text() == expected
    finally:
        agent.terminate()
        agent.wait(30)
        if agent.stdout is not None:
            agent.stdout.close()
        assert server.terminate() == 0


def run(*args: str) -> subprocess.CompletedProcess[str]:
    """This Python with args, in the repository, to its end."""
    return subprocess.run(
        [sys.executable, *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=120
    )


def start_example_agent(
    address: str, example: str = "examples/agent.py", entity_id: str = "drone-1"
) -> subprocess.Popen[str]:
    """An example agent, once it says it listens; its stderr goes to its stdout."""
    agent = subprocess.Popen(
        [sys.executable, example, "--target", address],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert agent.stdout is not None
    assert agent.stdout.readline().startswith(f"agent: listening as {entity_id}")
    return agent


def agent_ids(address: str) -> list[str]:
    """The entity ids with an open ListenAsAgent stream."""
    with grpc.insecure_channel(address) as channel:
        stub = task_manager_pb2_grpc.TaskManagerStub(channel)
        agents = stub.ListAgents(task_manager_pb2.ListAgentsRequest()).agents
    return [agent.entity_id for agent in agents if agent.streams_open]
