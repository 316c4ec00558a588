"""The server as a process: durability across SIGKILL, graceful SIGTERM, startup errors."""

from __future__ import annotations

import asyncio
import collections
import itertools
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest

from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import REPO_ROOT, AsyncStub, ServerProcess, create_request, status_update

S = pb.Status


@pytest.mark.anyio
async def test_every_acknowledged_change_survives_sigkill(database: str) -> None:
    server = ServerProcess(database).start()
    acknowledged: dict[str, pb.Task] = {}  # task id -> latest task the server confirmed
    enough = asyncio.Event()

    async def writer(stub: AsyncStub, worker: int) -> None:
        n = 0
        while True:
            n += 1
            task = (await stub.CreateTask(create_request(task_id=f"w{worker}-t{n}"))).task
            acknowledged[task.version.task_id] = task
            for status in (S.STATUS_MACHINE_RECEIPT, S.STATUS_EXECUTING, S.STATUS_DONE_OK):
                task = (await stub.UpdateStatus(status_update(task, status))).task
                acknowledged[task.version.task_id] = task
            if len(acknowledged) >= 40:
                enough.set()

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = AsyncStub(channel)
        workers = [asyncio.create_task(writer(stub, w)) for w in range(8)]
        await asyncio.wait_for(enough.wait(), 60)
        server.kill()  # while the writers are still writing
        results = await asyncio.gather(*workers, return_exceptions=True)
    assert all(isinstance(r, grpc.aio.AioRpcError) for r in results), results
    confirmed = dict(acknowledged)  # only what was acknowledged before the kill counts

    restarted = ServerProcess(database).start()
    try:
        async with grpc.aio.insecure_channel(restarted.address) as channel:
            stub = AsyncStub(channel)
            for task_id, task in confirmed.items():
                stored = (await stub.GetTask(pb.GetTaskRequest(task_id=task_id))).task
                assert stored.version.status_version >= task.version.status_version
                history = await stub.GetTaskHistory(pb.GetTaskHistoryRequest(task_id=task_id))
                entry = history.entries[task.version.status_version - 1]
                assert entry.status_version == task.version.status_version
                assert entry.status == task.status
    finally:
        assert restarted.terminate() == 0


@pytest.mark.anyio
async def test_sigterm_ends_agent_streams_with_unavailable_and_exits_0(database: str) -> None:
    server = ServerProcess(database).start()
    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = AsyncStub(channel)
        stream = stub.ListenAsAgent(
            pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=["agent-1"]))
        )
        task = (await stub.CreateTask(create_request())).task
        message = await asyncio.wait_for(stream.read(), 20)
        assert isinstance(message, pb.ListenAsAgentResponse)
        assert message.execute_request.task == task
        code = await asyncio.to_thread(server.terminate)
        with pytest.raises(grpc.aio.AioRpcError) as caught:
            await asyncio.wait_for(stream.read(), 20)
        assert caught.value.code() == grpc.StatusCode.UNAVAILABLE
    assert code == 0


def _serve(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "task_manager", "serve", *args],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=REPO_ROOT,
    )


def test_port_in_use_is_a_one_line_error_and_nonzero_exit(tmp_path: Path) -> None:
    first = ServerProcess(str(tmp_path / "a.db")).start()
    try:
        result = _serve("--listen", first.address, "--db", str(tmp_path / "b.db"))
    finally:
        first.terminate()
    assert result.returncode == 2
    (line,) = result.stderr.splitlines()  # gRPC's own log line (E1201 ... add_port.cc) too, before
    assert line.startswith("task-manager: cannot listen on")


def test_database_path_that_cannot_be_a_file_is_a_one_line_error(tmp_path: Path) -> None:
    (tmp_path / "not-a-dir").write_text("a file where a directory should be")
    result = _serve("--listen", "127.0.0.1:0", "--db", str(tmp_path / "not-a-dir" / "tasks.db"))
    assert result.returncode != 0
    lines = [line for line in result.stderr.splitlines() if line.startswith("task-manager:")]
    assert len(lines) == 1, result.stderr
    assert "cannot open database" in lines[0]
    assert "Traceback" not in result.stderr


def test_settings_come_from_the_environment(tmp_path: Path) -> None:
    env = {
        **os.environ,
        "TASK_MANAGER_LISTEN": "127.0.0.1:0",
        "TASK_MANAGER_DB": str(tmp_path / "env.db"),
    }
    process = subprocess.Popen(
        [sys.executable, "-m", "task_manager", "serve"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=REPO_ROOT,
        env=env,
    )
    try:
        assert process.stdout is not None
        line = process.stdout.readline()
        assert line.startswith("task-manager: serving on 127.0.0.1:")
        assert (tmp_path / "env.db").exists()
    finally:
        process.terminate()
        code = process.wait(30)
        for pipe in (process.stdout, process.stderr):
            if pipe is not None:
                pipe.close()
    assert code == 0


def test_a_second_server_on_the_same_sqlite_file_refuses_to_start(tmp_path: Path) -> None:
    db = str(tmp_path / "tasks.db")
    first = ServerProcess(db).start()
    try:
        result = _serve("--listen", "127.0.0.1:0", "--db", db)
    finally:
        assert first.terminate() == 0
    assert result.returncode != 0
    assert "in use by another task manager" in result.stderr
    restarted = ServerProcess(db).start()  # the lock went with it
    assert restarted.terminate() == 0


def test_a_non_loopback_address_needs_insecure(tmp_path: Path) -> None:
    refused = _serve("--listen", "0.0.0.0:0", "--db", str(tmp_path / "tasks.db"))
    assert refused.returncode == 2
    assert "--insecure" in refused.stderr
    assert "without TLS (--tls-cert, --tls-key) and authentication" in refused.stderr
    process = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "task_manager",
            "serve",
            "--listen",
            "0.0.0.0:0",
            "--db",
            str(tmp_path / "tasks.db"),
            "--insecure",
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        cwd=REPO_ROOT,
    )
    try:
        assert process.stdout is not None
        assert process.stdout.readline().startswith("task-manager: serving on 0.0.0.0:")
    finally:
        process.terminate()
        code = process.wait(30)
        if process.stdout is not None:
            process.stdout.close()
    assert code == 0


@pytest.mark.skipif(sys.platform != "linux", reason="threads have priorities of their own on Linux")
def test_writer_niceness_sets_how_far_below_the_rest_the_writer_runs(tmp_path: Path) -> None:
    def lowered_threads(pid: int) -> list[int]:
        """How far below the main thread each thread runs that does not run level."""
        main = os.getpriority(os.PRIO_PROCESS, pid)
        below = (
            os.getpriority(os.PRIO_PROCESS, int(t)) - main for t in os.listdir(f"/proc/{pid}/task")
        )
        return [difference for difference in below if difference != 0]

    lowered = ServerProcess(str(tmp_path / "three.db"), options=("--writer-niceness", "3")).start()
    try:
        assert lowered.process is not None
        pid = lowered.process.pid
        # The writer lowers itself as its thread starts, which may trail the first answer.
        deadline = time.monotonic() + 30
        while lowered_threads(pid) != [3] and time.monotonic() < deadline:
            time.sleep(0.01)
        assert lowered_threads(pid) == [3]
    finally:
        assert lowered.terminate() == 0

    level = ServerProcess(str(tmp_path / "zero.db"), options=("--writer-niceness", "0")).start()
    try:
        assert level.process is not None
        assert lowered_threads(level.process.pid) == []
    finally:
        assert level.terminate() == 0

    refused = _serve("--writer-niceness", "20", "--db", str(tmp_path / "x.db"))
    assert refused.returncode == 2
    assert "--writer-niceness: must be from 0 to 19" in refused.stderr


CORE_LOG_LINE = re.compile(r"^[DIWEF]\d{4} \d\d:\d\d:\d\d\.\d+ +\d+ \S+:\d+\]", re.MULTILINE)
"""A line of gRPC C-core's own log (absl format: E1201 21:05:42.560929 9789 file.cc:83])."""


@pytest.mark.anyio
async def test_sigterm_answers_every_call_ok_or_unavailable_and_applies_exactly_the_ok_ones(
    database: str,
) -> None:
    server = ServerProcess(database).start()
    outcomes: dict[str, grpc.StatusCode] = {}
    enough = asyncio.Event()

    async def creator(stub: AsyncStub, worker: int) -> None:
        for n in itertools.count():
            task_id = f"w{worker}-t{n}"
            try:
                await stub.CreateTask(create_request(None, task_id=task_id), timeout=30)
            except grpc.aio.AioRpcError as error:
                outcomes[task_id] = error.code()
                if error.code() != grpc.StatusCode.OK:
                    return
            else:
                outcomes[task_id] = grpc.StatusCode.OK
            if len(outcomes) >= 200:
                enough.set()

    async with grpc.aio.insecure_channel(server.address) as channel:
        stub = AsyncStub(channel)
        creators = [asyncio.create_task(creator(stub, w)) for w in range(16)]
        await asyncio.wait_for(enough.wait(), 60)
        code = await asyncio.to_thread(server.terminate)  # while the creators create
        await asyncio.wait_for(asyncio.gather(*creators), 60)
    assert code == 0
    codes = collections.Counter(outcomes.values())
    assert set(codes) == {grpc.StatusCode.OK, grpc.StatusCode.UNAVAILABLE}, codes
    log = server.log_text()
    assert "exception was never retrieved" not in log
    assert not CORE_LOG_LINE.search(log), log

    restarted = ServerProcess(database).start()
    try:
        async with grpc.aio.insecure_channel(restarted.address) as channel:
            stub = AsyncStub(channel)
            stored: set[str] = set()
            request = pb.QueryTasksRequest(page_size=1000)
            while True:
                page = await stub.QueryTasks(request)
                stored |= {task.version.task_id for task in page.tasks}
                if not page.page_token:
                    break
                request.page_token = page.page_token
    finally:
        assert restarted.terminate() == 0
    ok = {task_id for task_id, code in outcomes.items() if code == grpc.StatusCode.OK}
    assert stored == ok
