"""Benchmark clients: each scenario runs in its own process and prints one JSON line.

    python -m bench.load SCENARIO --target HOST:PORT [options]

Scenarios: echo, update-status, lifecycle, dispatch, idle-streams, watch-fanout and
push-fanout (its baseline), create (one CreateTask a task, or sessions of
--session-size tasks) and session-lifecycle. bench/run.py starts the servers and these
processes; the numbers are only meaningful side by side.

`--target` may name several replicas of one database, comma-separated: update-status
spreads its workers over them; lifecycle, session-lifecycle, dispatch and watch-fanout
create and update tasks on the first and listen (agents, watchers) on the last, so every
task crosses from one replica to another. The other scenarios use the first.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import itertools
import json
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import anyio
import anyio.abc
import grpc
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit._agent import _ReportStream
from agent_kit._grpc import AsyncStub
from agent_kit._supervisor import Supervisor
from task_manager.v1 import task_manager_pb2 as pb

S = pb.Status
WALK = (
    S.STATUS_MACHINE_RECEIPT,
    S.STATUS_ACK,
    S.STATUS_WILCO,
    S.STATUS_EXECUTING,
    S.STATUS_DONE_OK,
)
ECHO_METHOD = "/bench.Echo/Echo"


def typical_update(task_id: str, status_version: int) -> pb.UpdateStatusRequest:
    """An UpdateStatus as agents send it: a status with a little progress."""
    progress = pb.TaskStatus(status=S.STATUS_EXECUTING)
    progress.progress.Pack(StringValue(value="leg 3 of 7"))
    return pb.UpdateStatusRequest(
        status_update=pb.StatusUpdate(
            version=pb.TaskVersion(task_id=task_id, status_version=status_version),
            status=progress,
            author=pb.Principal(system=pb.System(entity_id="bench-agent")),
        )
    )


def task_for(agent: str, task_id: str = "") -> pb.CreateTaskRequest:
    """The task every create scenario submits: sent at once to the agent."""
    request = pb.CreateTaskRequest(display_name="bench", task_id=task_id)
    request.relations.assignee.system.entity_id = agent
    return request


def session_of(tasks: list[pb.CreateTaskRequest]) -> pb.SubmitSessionsRequest:
    """One session of the tasks in one SubmitSessions request (its id left to the
    server, as agent_kit's submit_session leaves it by default)."""
    return pb.SubmitSessionsRequest(
        sessions=[pb.SessionSubmission(tasks=tasks, display_name="bench")]
    )


async def run_for(
    duration: float, workers: int, step: Callable[[int], Awaitable[None]]
) -> dict[str, float]:
    """Runs `workers` loops of `step` for `duration` seconds after a short warm-up.

    Returns `rpc_per_s`, completed steps per second in the measured window, and `calls`,
    every step completed (warm-up included): what the server's CPU time is divided by."""
    counted = 0
    calls = 0
    measuring = False
    stop = False

    async def loop(worker: int) -> None:
        nonlocal counted, calls
        while not stop:
            await step(worker)
            calls += 1
            if measuring:
                counted += 1

    tasks = [asyncio.create_task(loop(w)) for w in range(workers)]
    await asyncio.sleep(min(1.0, duration / 4))  # warm-up: connections, caches
    measuring = True
    started = time.perf_counter()
    await asyncio.sleep(duration)
    measuring = False
    elapsed = time.perf_counter() - started
    stop = True
    await asyncio.gather(*tasks)
    return {"rpc_per_s": counted / elapsed, "calls": calls}


def targets(args: argparse.Namespace) -> list[str]:
    return [target.strip() for target in args.target.split(",")]


def writer_and_listener(args: argparse.Namespace) -> tuple[grpc.aio.Channel, grpc.aio.Channel]:
    """Channels to the first target (creates, updates) and to the last (listeners): one
    channel when they are the same, as with a single replica."""
    found = targets(args)
    first, last = found[0], found[-1]
    writer = grpc.aio.insecure_channel(first)
    return writer, writer if last == first else grpc.aio.insecure_channel(last)


@contextlib.asynccontextmanager
async def writer_and_listener_stubs(
    args: argparse.Namespace,
) -> AsyncIterator[tuple[AsyncStub, AsyncStub]]:
    writer, listener = writer_and_listener(args)
    try:
        yield AsyncStub(writer), AsyncStub(listener)
    finally:
        await writer.close(None)
        if listener is not writer:
            await listener.close(None)


async def echo(args: argparse.Namespace) -> dict[str, float]:
    async with grpc.aio.insecure_channel(targets(args)[0]) as channel:
        call = channel.unary_unary(
            ECHO_METHOD,
            request_serializer=pb.UpdateStatusRequest.SerializeToString,
            response_deserializer=pb.UpdateStatusResponse.FromString,
        )
        request = typical_update("echo-task-1", 2)

        async def step(worker: int) -> None:
            await call(request)

        return await run_for(args.duration, args.concurrency, step)


async def update_status(args: argparse.Namespace) -> dict[str, float]:
    """`concurrency` workers, each updating a task of its own; worker n calls replica
    n mod the number of targets."""
    channels = [grpc.aio.insecure_channel(target) for target in targets(args)]
    try:
        stubs = [AsyncStub(channels[n % len(channels)]) for n in range(args.concurrency)]
        versions: list[tuple[str, int]] = []
        for stub in stubs:  # distinct tasks: no conflicts between workers
            task = (await stub.CreateTask(pb.CreateTaskRequest(display_name="bench"))).task
            versions.append((task.version.task_id, task.version.status_version))

        async def step(worker: int) -> None:
            task_id, version = versions[worker]
            response = await stubs[worker].UpdateStatus(typical_update(task_id, version))
            versions[worker] = (task_id, response.task.version.status_version)

        return await run_for(args.duration, args.concurrency, step)
    finally:
        for channel in channels:
            await channel.close(None)


class Walkers:
    """Agents that walk every task they receive to DONE_OK, recording arrival times.

    Reports go over agent_kit's ReportStatus stream (what the SDK uses), or as unary
    UpdateStatus calls when `unary` is set. A task counts once DONE_OK is acknowledged,
    that is, stored."""

    def __init__(
        self, stub: AsyncStub, agents: int, group: anyio.abc.TaskGroup, unary: bool = False
    ) -> None:
        self.stub = stub
        self.group = group
        self.agents = [f"bench-agent-{i}" for i in range(agents)]
        self.reports = {
            agent: _ReportStream(stub, Supervisor(group, agent)) for agent in self.agents
        }
        self.unary = unary
        self.received_at: dict[str, float] = {}
        self.done = 0
        self.slots: asyncio.Semaphore | None = None
        self._connected = 0
        self.all_connected = asyncio.Event()
        self._expected: int | None = None
        self.all_received = asyncio.Event()

    def start(self) -> None:
        for agent in self.agents:
            self.group.start_soon(self.listen, agent)

    def expect(self, count: int) -> None:
        self._expected = count
        if len(self.received_at) >= count:
            self.all_received.set()

    async def listen(self, entity_id: str) -> None:
        request = pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=[entity_id]))
        call = self.stub.ListenAsAgent(request)
        await call.initial_metadata()
        self._connected += 1
        if self._connected == len(self.agents):
            self.all_connected.set()
        async for message in call:
            task = message.execute_request.task
            self.received_at[task.version.task_id] = time.perf_counter()
            if self._expected is not None and len(self.received_at) >= self._expected:
                self.all_received.set()
            self.group.start_soon(self.walk, entity_id, task)

    async def walk(self, entity_id: str, task: pb.Task) -> None:
        version = task.version.status_version
        for status in WALK:
            update = pb.StatusUpdate(
                version=pb.TaskVersion(task_id=task.version.task_id, status_version=version),
                status=pb.TaskStatus(status=status),
            )
            if self.unary:
                request = pb.UpdateStatusRequest(status_update=update)
                version = (await self.stub.UpdateStatus(request)).task.version.status_version
            else:
                version = (await self.reports[entity_id].send(update)).version.status_version
        self.done += 1
        if self.slots is not None:
            self.slots.release()


async def lifecycle(args: argparse.Namespace) -> dict[str, float]:
    """Operators keep `concurrency` tasks in flight; agents walk each to DONE_OK."""
    async with writer_and_listener_stubs(args) as (stub, agents_stub):
        async with anyio.create_task_group() as group:
            walkers = Walkers(agents_stub, args.agents, group, unary=args.unary)
            walkers.slots = asyncio.Semaphore(args.concurrency)
            walkers.start()
            await walkers.all_connected.wait()
            numbers = itertools.count()

            async def operator() -> None:
                assert walkers.slots is not None
                while True:
                    await walkers.slots.acquire()
                    agent = walkers.agents[next(numbers) % len(walkers.agents)]
                    await stub.CreateTask(task_for(agent))

            for _ in range(4):
                group.start_soon(operator)
            await asyncio.sleep(min(1.0, args.duration / 4))
            done_before, started = walkers.done, time.perf_counter()
            await asyncio.sleep(args.duration)
            rate = (walkers.done - done_before) / (time.perf_counter() - started)
            group.cancel_scope.cancel()
        # calls: every task finished, warm-up included (what server CPU is divided by)
        return {"tasks_per_s": rate, "calls": walkers.done}


async def dispatch(args: argparse.Namespace) -> dict[str, float]:
    """Creates tasks at a fixed rate (the lifecycle walked by agents as above) and
    measures CreateTask call start -> ExecuteRequest read from the agent's stream."""
    async with writer_and_listener_stubs(args) as (stub, agents_stub):
        async with anyio.create_task_group() as group:
            walkers = Walkers(agents_stub, args.agents, group, unary=args.unary)
            walkers.start()
            await walkers.all_connected.wait()
            sent_at: dict[str, float] = {}
            interval = 1.0 / args.rate
            total = int(args.rate * args.duration)

            async def create(request: pb.CreateTaskRequest) -> None:
                sent_at[request.task_id] = time.perf_counter()  # the call's start
                await stub.CreateTask(request)

            start = time.perf_counter()
            for n in range(total):
                delay = start + n * interval - time.perf_counter()
                if delay > 0:
                    await asyncio.sleep(delay)
                agent = walkers.agents[n % len(walkers.agents)]
                group.start_soon(create, task_for(agent, f"dispatch-{n:08d}"))
            walkers.expect(total)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(walkers.all_received.wait(), 30)
            group.cancel_scope.cancel()
        warm = [t for t in sent_at if int(t.split("-")[1]) >= total // 10]  # skip warm-up
        latencies = sorted(
            (walkers.received_at[t] - sent_at[t]) * 1000 for t in warm if t in walkers.received_at
        )
        if len(latencies) < len(warm):
            raise SystemExit(f"{len(warm) - len(latencies)} tasks never reached their agent")
        return {
            "p50_ms": latencies[len(latencies) // 2],
            "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
            "rate_per_s": args.rate,
            "samples": len(latencies),
        }


async def session_lifecycle(args: argparse.Namespace) -> dict[str, float]:
    """The lifecycle with its tasks submitted in sessions of `session_size` (SubmitSessions,
    spread over the agents): an operator submits the next session as soon as that many of
    the `concurrency` tasks in flight are done; agents walk each task to DONE_OK over
    their ReportStatus streams, as in the lifecycle."""
    if args.concurrency < args.session_size:
        raise SystemExit("--concurrency (tasks in flight) must hold one --session-size")
    async with writer_and_listener_stubs(args) as (stub, agents_stub):
        async with anyio.create_task_group() as group:
            walkers = Walkers(agents_stub, args.agents, group, unary=args.unary)
            walkers.slots = asyncio.Semaphore(args.concurrency)
            walkers.start()
            await walkers.all_connected.wait()
            numbers = itertools.count()
            taking = asyncio.Lock()  # one session's slots at a time: no operator starves

            async def operator() -> None:
                assert walkers.slots is not None
                while True:
                    async with taking:
                        for _ in range(args.session_size):
                            await walkers.slots.acquire()
                    tasks = [
                        task_for(walkers.agents[next(numbers) % len(walkers.agents)])
                        for _ in range(args.session_size)
                    ]
                    await stub.SubmitSessions(session_of(tasks))

            for _ in range(args.operators):
                group.start_soon(operator)
            await asyncio.sleep(min(1.0, args.duration / 4))
            done_before, started = walkers.done, time.perf_counter()
            await asyncio.sleep(args.duration)
            rate = (walkers.done - done_before) / (time.perf_counter() - started)
            group.cancel_scope.cancel()
        return {"tasks_per_s": rate, "calls": walkers.done}


async def create(args: argparse.Namespace) -> dict[str, float]:
    """`concurrency` callers storing tasks as fast as the server answers, nobody listening
    (each task is stored SENT to one of `agents` agents): one CreateTask per task, or with
    `session_size`, sessions of that many tasks, one per SubmitSessions request.

    `tasks_per_s`: each call's tasks count as stored evenly over the call, from its start
    to its answer, and the share of that inside the measured window is counted. A session
    answers its thousand tasks at once, and commits answer several sessions together:
    counting whole answers, a window of a few seconds would hold a few bursts, give or
    take one. `calls`: every task stored, warm-up included (what server CPU is divided
    by)."""
    agents = [f"bench-agent-{i}" for i in range(args.agents)]
    numbers = itertools.count()
    size = max(1, args.session_size)
    spans: list[tuple[float, float]] = []  # every call's start and answer
    stop = False

    def task() -> pb.CreateTaskRequest:
        return task_for(agents[next(numbers) % len(agents)])

    async with grpc.aio.insecure_channel(targets(args)[0]) as channel:
        stub = AsyncStub(channel)

        async def caller() -> None:
            while not stop:
                if args.session_size:
                    session = session_of([task() for _ in range(size)])
                    started = time.perf_counter()
                    await stub.SubmitSessions(session)
                else:
                    one = task()
                    started = time.perf_counter()
                    await stub.CreateTask(one)
                spans.append((started, time.perf_counter()))

        async with anyio.create_task_group() as group:
            for _ in range(args.concurrency):
                group.start_soon(caller)
            await asyncio.sleep(min(1.0, args.duration / 4))  # warm-up
            opened = time.perf_counter()
            await asyncio.sleep(args.duration)
            closed = time.perf_counter()
            stop = True  # the calls under way finish: their share of the window counts
    inside = sum(
        (min(end, closed) - max(start, opened)) / max(end - start, 1e-9)
        for start, end in spans
        if end > opened and start < closed
    )
    answered = sum(1 for _, end in spans if opened < end <= closed)
    return {
        "tasks_per_s": inside * size / (closed - opened),
        "calls": len(spans) * size,
        "answered_in_window": answered,
    }


async def idle_streams(args: argparse.Namespace) -> dict[str, float]:
    """Opens `streams` ListenAsAgent streams, says `ready` on stdout, and holds them
    until its standard input closes."""
    per_channel = 100
    target = targets(args)[0]
    channels = [
        grpc.aio.insecure_channel(target, options=[("grpc.use_local_subchannel_pool", 1)])
        for _ in range((args.streams + per_channel - 1) // per_channel)
    ]
    calls = []
    for n in range(args.streams):
        stub = AsyncStub(channels[n // per_channel])
        request = pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=[f"idle-{n}"]))
        calls.append(stub.ListenAsAgent(request))
    for chunk in range(0, len(calls), 500):
        await asyncio.gather(*(call.initial_metadata() for call in calls[chunk : chunk + 500]))
    print(json.dumps({"ready": len(calls)}), flush=True)
    await asyncio.to_thread(sys.stdin.read)  # hold until the orchestrator is done
    for call in calls:
        call.cancel()
    for channel in channels:
        await channel.close(None)
    return {"streams": len(calls)}


async def watch_fanout(args: argparse.Namespace) -> dict[str, float]:
    """One update -> delivered to each of `watchers` WatchTasks streams, one round at a
    time. Latency: from the UpdateStatus call's start to the event's bytes arriving on
    each stream (the last target's, the writer on the first)."""
    async with grpc.aio.insecure_channel(targets(args)[0]) as channel:
        stub = AsyncStub(channel)
        task = (await stub.CreateTask(pb.CreateTaskRequest(display_name="bench"))).task
        request = pb.WatchTasksRequest(
            filter=pb.WatchFilter(task_ids=[task.version.task_id]),
            heartbeat_interval_ms=3_600_000,  # undecoded bytes: only events may arrive
        )
        version = task.version.status_version

        async def update() -> None:
            nonlocal version
            answer = await stub.UpdateStatus(typical_update(task.version.task_id, version))
            version = answer.task.version.status_version

        watch = "/task_manager.v1.TaskManager/WatchTasks"
        return await fan_out(args, watch, request.SerializeToString(), update)


async def push_fanout(args: argparse.Namespace) -> dict[str, float]:
    """The baseline of watch-fanout: the same clients against bench.echo_server, whose
    Push answers like Echo and puts an event-sized message on every Listen stream."""
    async with grpc.aio.insecure_channel(targets(args)[0]) as channel:
        push = channel.unary_unary(
            "/bench.Echo/Push",
            request_serializer=pb.UpdateStatusRequest.SerializeToString,
            response_deserializer=pb.UpdateStatusResponse.FromString,
        )
        request = typical_update("x" * 36, 1)

        async def update() -> None:
            await push(request)

        return await fan_out(args, "/bench.Echo/Listen", b"", update)


async def fan_out(
    args: argparse.Namespace,
    listen: str,
    listen_request: bytes,
    update: Callable[[], Awaitable[None]],
) -> dict[str, float]:
    """Opens `watchers` streams of the method `listen`, then makes `rounds` updates, one
    at a time, each of which must reach every stream. Every stream gets the rounds in
    order, so its k-th message is round k; the bytes are not decoded, to measure delivery
    rather than this client's parsing. The streams are opened on the last target."""
    listener = targets(args)[-1]
    channels = [grpc.aio.insecure_channel(listener) for _ in range(args.watchers // 100 + 1)]
    arrivals: list[list[int]] = [[] for _ in range(args.watchers)]
    sent_at: list[int] = []
    all_arrived = asyncio.Event()
    complete = 0

    async def watcher(n: int, subscribed: asyncio.Event) -> None:
        nonlocal complete
        call = channels[n % len(channels)].unary_stream(
            listen,
            request_serializer=lambda data: data,
            response_deserializer=lambda data: data,
        )(listen_request)
        await call.initial_metadata()
        subscribed.set()
        async for _ in call:
            if len(arrivals[n]) == args.rounds:
                continue
            arrivals[n].append(time.perf_counter_ns())
            if len(arrivals[n]) == args.rounds:
                complete += 1
                if complete == args.watchers:
                    all_arrived.set()

    async with anyio.create_task_group() as group:
        ready = [asyncio.Event() for _ in range(args.watchers)]
        for n, subscribed in enumerate(ready):
            group.start_soon(watcher, n, subscribed)
        for subscribed in ready:
            await subscribed.wait()
        for _ in range(args.rounds):
            sent_at.append(time.perf_counter_ns())
            await update()
            await asyncio.sleep(0.2)  # one update at a time: fan-out, not throughput
        try:
            await asyncio.wait_for(all_arrived.wait(), 60)
        except TimeoutError:
            counts = collections.Counter(len(times) for times in arrivals)
            got = sorted(counts.items())
            raise SystemExit(f"not every watcher got every round: {got}") from None
        group.cancel_scope.cancel()
    for extra in channels:
        await extra.close(None)
    latencies = sorted(
        (arrived - sent_at[k]) / 1e6 for times in arrivals for k, arrived in enumerate(times)
    )
    return {
        "watchers": args.watchers,
        "p50_ms": latencies[len(latencies) // 2],
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "samples": len(latencies),
    }


SCENARIOS = {
    "echo": echo,
    "update-status": update_status,
    "lifecycle": lifecycle,
    "dispatch": dispatch,
    "idle-streams": idle_streams,
    "watch-fanout": watch_fanout,
    "push-fanout": push_fanout,
    "create": create,
    "session-lifecycle": session_lifecycle,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument("--target", required=True, help="HOST:PORT[,HOST:PORT...]")
    parser.add_argument("--duration", type=float, default=10.0)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--agents", type=int, default=16)
    parser.add_argument("--rate", type=float, default=200.0)
    parser.add_argument("--streams", type=int, default=10_000)
    parser.add_argument("--unary", action="store_true", help="agents report with UpdateStatus")
    parser.add_argument("--watchers", type=int, default=1_000)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument(
        "--session-size", type=int, default=0, help="tasks per SubmitSessions (0: CreateTask)"
    )
    parser.add_argument("--operators", type=int, default=2, help="session-lifecycle's submitters")
    args = parser.parse_args()
    result = asyncio.run(SCENARIOS[args.scenario](args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
