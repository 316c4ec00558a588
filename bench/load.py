"""Benchmark clients: each scenario runs in its own process and prints one JSON line.

    python -m bench.load SCENARIO --target HOST:PORT [options]

Scenarios: echo, update-status, lifecycle, dispatch, idle-streams, watch-fanout and
push-fanout (its baseline), create (one CreateTask a task, or sessions of
--session-size tasks), session-lifecycle, payloads (uploads then downloads; --raw: their
baseline, --sdk: through agent_kit), release (an input's attach to the agent's
ExecuteRequest), over HTTP rest-update-status and http-noop (its baseline), whose
--target is an HTTP root URL (http://HOST:PORT/), and sse-dispatch (dispatch to an agent
on the Lattice SSE stream against one on ListenAsAgent, one task at a time), whose
--target holds both. bench/run.py starts the servers and these processes; the numbers
are only meaningful side by side.

`--target` may name several replicas of one database, comma-separated: update-status
and rest-update-status spread their workers over them; lifecycle, session-lifecycle,
dispatch and watch-fanout create and update tasks on the first and listen (agents,
watchers) on the last, so every task crosses from one replica to another; payloads
uploads to the first and downloads from the last, release attaches on the first to
agents on the last; sse-dispatch creates on the first address and listens on the last
address and the last URL. The other scenarios use the first.
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import contextlib
import hashlib
import itertools
import json
import os
import resource
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import anyio
import anyio.abc
import grpc
from google.protobuf import json_format
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import OperatorClient
from agent_kit._agent import _ReportStream
from agent_kit._grpc import AsyncStub
from agent_kit._payloads import CHUNK_BYTES
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


def typical_update_json() -> Callable[[int], dict[str, Any]]:
    """typical_update as the Lattice REST API takes it (`PUT /api/v1/tasks/{taskId}/status`):
    the body for a status_version. Rendered from typical_update by the protobuf JSON
    mapping (the progress an Any: its `@type` and `value`), so it is the same update."""
    update = typical_update("", 0).status_update
    new_status = json_format.MessageToDict(update.status)
    author = json_format.MessageToDict(update.author)

    def body(status_version: int) -> dict[str, Any]:
        return {"statusVersion": status_version, "newStatus": new_status, "author": author}

    return body


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


LATTICE_API = "api/v1/"
"""The Lattice REST API's routes, under a server's HTTP root URL."""


async def put_status_updates(
    args: argparse.Namespace,
    session: aiohttp.ClientSession,
    urls: list[str],
    versions: list[int],
) -> dict[str, float]:
    """update_status over HTTP: worker n PUTs typical_update_json to urls[n] with
    versions[n], and keeps the statusVersion of each answer (a Task's JSON) for its next
    one. Shared by rest-update-status and its baseline http-noop, so they differ only in
    the server."""
    body = typical_update_json()

    async def step(worker: int) -> None:
        async with session.put(urls[worker], json=body(versions[worker])) as response:
            if response.status != 200:
                raise SystemExit(f"PUT {urls[worker]}: {response.status} {await response.text()}")
            task = await response.json()
        versions[worker] = int(task["version"]["statusVersion"])

    return await run_for(args.duration, args.concurrency, step)


def http_session(args: argparse.Namespace) -> aiohttp.ClientSession:
    """One session for every worker, as many connections as workers: each call in flight
    has a keep-alive connection, none waits for one or opens a new one."""
    return aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=args.concurrency))


async def rest_update_status(args: argparse.Namespace) -> dict[str, float]:
    """update-status over the Lattice REST API: `concurrency` workers, each updating a
    task of its own, created first (`POST /api/v1/tasks`); worker n calls replica n mod
    the number of targets (HTTP root URLs)."""
    roots = [root.rstrip("/") + "/" for root in targets(args)]
    async with http_session(args) as session:
        urls, versions = [], []
        for worker in range(args.concurrency):  # distinct tasks: no conflicts
            tasks = f"{roots[worker % len(roots)]}{LATTICE_API}tasks"
            async with session.post(tasks, json={"displayName": "bench"}) as response:
                if response.status != 200:
                    raise SystemExit(f"POST {tasks}: {response.status} {await response.text()}")
                version = (await response.json())["version"]
            urls.append(f"{tasks}/{version['taskId']}/status")
            versions.append(int(version["statusVersion"]))
        return await put_status_updates(args, session, urls, versions)


async def http_noop(args: argparse.Namespace) -> dict[str, float]:
    """The baseline of rest-update-status: the same client against bench.echo_server's
    `PUT /noop/{id}` (the body read, a Task-sized JSON answered), a made-up id per
    worker."""
    root = targets(args)[0].rstrip("/") + "/"
    async with http_session(args) as session:
        urls = [f"{root}noop/http-noop-task-{n}" for n in range(args.concurrency)]
        return await put_status_updates(args, session, urls, [1] * args.concurrency)


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


class Arrivals:
    """When each awaited task's ExecuteRequest reached its agent: the listeners report
    every task id they read, the loop awaits the one it created. A task not awaited (a
    redelivery, a task of the warm-up read late) is ignored."""

    def __init__(self) -> None:
        self._awaited: dict[str, asyncio.Future[float]] = {}

    def awaiting(self, task_id: str) -> asyncio.Future[float]:
        arrival: asyncio.Future[float] = asyncio.get_running_loop().create_future()
        self._awaited[task_id] = arrival
        return arrival

    def arrived(self, task_id: str) -> None:
        arrival = self._awaited.pop(task_id, None)
        if arrival is not None and not arrival.done():
            arrival.set_result(time.perf_counter())


async def listen_over_grpc(
    target: str, entity_id: str, arrivals: Arrivals, subscribed: asyncio.Event
) -> None:
    """An agent on its ListenAsAgent stream, on a connection of its own (an agent is not
    the operator's process): each ExecuteRequest read, decoded, is an arrival."""
    options = [("grpc.use_local_subchannel_pool", 1)]  # not the operator's connection
    async with grpc.aio.insecure_channel(target, options=options) as channel:
        request = pb.ListenAsAgentRequest(entity_ids=pb.EntityIds(entity_ids=[entity_id]))
        call = AsyncStub(channel).ListenAsAgent(request)
        await call.initial_metadata()  # sent once the server has subscribed the stream
        subscribed.set()
        async for message in call:
            if message.HasField("execute_request"):
                arrivals.arrived(message.execute_request.task.version.task_id)


async def listen_over_sse(
    root: str, entity_id: str, arrivals: Arrivals, subscribed: asyncio.Event
) -> None:
    """An agent on the Lattice SSE stream (`POST /api/v1/agent/stream`, as the SDK's
    stream_as_agent opens it): each `agent_request` event holding an executeRequest, its
    JSON parsed, is an arrival. Heartbeats at the longest interval the server allows."""
    body = {"agentSelector": {"entityIds": [entity_id]}, "heartbeatIntervalMs": 30_000}
    url = f"{root}{LATTICE_API}agent/stream"
    forever = aiohttp.ClientTimeout(total=None, sock_read=None)
    async with (
        aiohttp.ClientSession(timeout=forever) as session,
        session.post(url, json=body) as response,
    ):
        if response.status != 200:
            raise SystemExit(f"POST {url}: {response.status} {await response.text()}")
        subscribed.set()  # its headers: sent once the server has subscribed the stream
        async for event in sse_data(response):
            if event.get("event") == "agent_request" and "executeRequest" in event:
                arrivals.arrived(event["executeRequest"]["task"]["version"]["taskId"])


async def sse_data(response: aiohttp.ClientResponse) -> AsyncIterator[dict[str, Any]]:
    """The JSON data of each event of a Server-Sent Events answer, as it ends (its blank
    line read); comments, ids and event names left out (the type is in the JSON)."""
    data: list[str] = []
    async for raw_line in response.content:
        line = raw_line.decode().rstrip("\r\n")
        if line.startswith("data:"):
            data.append(line[5:].removeprefix(" "))
        elif not line and data:
            yield json.loads("\n".join(data))
            data = []


SSE_DISPATCH_WARMUP = 50
"""Pairs of tasks (one each way) created before sse-dispatch counts any."""


async def sse_dispatch(args: argparse.Namespace) -> dict[str, float]:
    """CreateTask call start -> ExecuteRequest read by the agent, one task at a time, for
    an agent on a gRPC ListenAsAgent stream and one on the Lattice SSE stream, in the
    same run: `samples` tasks to each, after SSE_DISPATCH_WARMUP pairs. Pair k creates a
    task for one agent, waits for it to arrive, then one for the other, gRPC first when
    k is even, SSE first when odd, so drift, and whatever a create leaves the server
    doing for the next, fall on both alike. After each arrival the task is finished
    (UpdateStatus DONE_OK, untimed), so no agent piles up tasks in flight.

    --target holds gRPC addresses and HTTP root URLs (http://...): tasks are created on
    the first address, the gRPC agent listens on the last address, the SSE agent on the
    last URL (with replicas, both on the replica the creates are not made on)."""
    found = targets(args)
    addresses = [target for target in found if not target.startswith("http")]
    roots = [target.rstrip("/") + "/" for target in found if target.startswith("http")]
    if not addresses or not roots:
        raise SystemExit("sse-dispatch needs a gRPC address and an HTTP root URL in --target")
    arrivals = Arrivals()
    agents = {"grpc": "bench-grpc-agent", "sse": "bench-sse-agent"}
    latencies_ms: dict[str, list[float]] = {way: [] for way in agents}
    numbers = itertools.count()
    async with (
        grpc.aio.insecure_channel(addresses[0]) as channel,
        anyio.create_task_group() as group,
    ):
        stub = AsyncStub(channel)
        subscribed = {way: asyncio.Event() for way in agents}
        group.start_soon(
            listen_over_grpc, addresses[-1], agents["grpc"], arrivals, subscribed["grpc"]
        )
        group.start_soon(listen_over_sse, roots[-1], agents["sse"], arrivals, subscribed["sse"])
        for ready in subscribed.values():
            await asyncio.wait_for(ready.wait(), 30)

        async def one_task(way: str) -> float:
            """A task to the agent listening over way: its latency, in ms."""
            request = task_for(agents[way], f"sse-dispatch-{next(numbers):08d}")
            arrival = arrivals.awaiting(request.task_id)
            started = time.perf_counter()  # the CreateTask call's start
            created = await stub.CreateTask(request)
            try:
                arrived = await asyncio.wait_for(arrival, 30)
            except TimeoutError:
                raise SystemExit(f"{request.task_id} never reached its {way} agent") from None
            done = pb.StatusUpdate(
                version=created.task.version, status=pb.TaskStatus(status=S.STATUS_DONE_OK)
            )
            await stub.UpdateStatus(pb.UpdateStatusRequest(status_update=done))
            return (arrived - started) * 1000

        for pair in range(SSE_DISPATCH_WARMUP + args.samples):
            order = ("grpc", "sse") if pair % 2 == 0 else ("sse", "grpc")
            for way in order:
                latency_ms = await one_task(way)
                if pair >= SSE_DISPATCH_WARMUP:
                    latencies_ms[way].append(latency_ms)
        group.cancel_scope.cancel()
    grpc_way, sse_way = percentiles(latencies_ms["grpc"]), percentiles(latencies_ms["sse"])
    return {
        "grpc_p50_ms": grpc_way["p50_ms"],
        "grpc_p99_ms": grpc_way["p99_ms"],
        "sse_p50_ms": sse_way["p50_ms"],
        "sse_p99_ms": sse_way["p99_ms"],
        "samples": args.samples,
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


MIB = 1024 * 1024
TASK_MANAGER = "/task_manager.v1.TaskManager/"
RAW_PAYLOADS = "/bench.Payloads/"
"""bench.echo_server's UploadPayload and DownloadPayload with nothing behind them."""


def cpu_s(pid: int | None = None) -> float:
    """CPU time (user and system, all threads) of this process, or of process pid."""
    if pid is None:
        used = resource.getrusage(resource.RUSAGE_SELF)
        return used.ru_utime + used.ru_stime
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class PayloadStreams:
    """UploadPayload and DownloadPayload as agent_kit sends and reads them (a header,
    then 1 MiB chunks; each chunk read checked to follow the last), on the Task Manager or
    on the raw server's bench.Payloads: one client for both, so the ratio is the
    servers'. No file and no hash on this side: those are the SDK's (--sdk)."""

    def __init__(self, upload_target: str, download_target: str, service: str) -> None:
        self._upload_channel = grpc.aio.insecure_channel(upload_target)
        self._download_channel = grpc.aio.insecure_channel(download_target)
        self._upload = self._upload_channel.stream_unary(
            service + "UploadPayload",
            request_serializer=pb.UploadPayloadRequest.SerializeToString,
            response_deserializer=pb.UploadPayloadResponse.FromString,
        )
        self._download = self._download_channel.unary_stream(
            service + "DownloadPayload",
            request_serializer=pb.DownloadPayloadRequest.SerializeToString,
            response_deserializer=pb.DownloadPayloadResponse.FromString,
        )

    async def close(self) -> None:
        for channel in (self._upload_channel, self._download_channel):
            await channel.close(None)

    async def upload(self, data: bytes, sha256: str) -> pb.PayloadRef:
        async def parts() -> AsyncIterator[pb.UploadPayloadRequest]:
            yield pb.UploadPayloadRequest(header=pb.PayloadRef(sha256=sha256, size=len(data)))
            for at in range(0, len(data), CHUNK_BYTES):
                yield pb.UploadPayloadRequest(chunk=data[at : at + CHUNK_BYTES])

        answer: pb.UploadPayloadResponse = await self._upload(parts())
        if answer.payload.size != len(data):
            raise SystemExit(f"stored {answer.payload.size} of {len(data)} bytes")
        return answer.payload

    async def download(self, ref: pb.PayloadRef) -> None:
        received = 0
        async for response in self._download(pb.DownloadPayloadRequest(sha256=ref.sha256)):
            if response.offset != received:
                raise SystemExit(f"a chunk at {response.offset} after {received} bytes")
            received += len(response.chunk)
        if received != ref.size:
            raise SystemExit(f"downloaded {received} of {ref.size} bytes")


class SdkTransfers:
    """OperatorClient.upload_payload and download_payload: hashed before the upload,
    hashed as a download comes and written to a file (removed after)."""

    def __init__(self, upload_target: str, download_target: str, workdir: Path) -> None:
        self._uploader = OperatorClient(upload_target)
        self._downloader = OperatorClient(download_target)
        self._workdir = workdir

    async def close(self) -> None:
        for client in (self._uploader, self._downloader):
            await client.close()

    async def upload(self, data: bytes, sha256: str) -> pb.PayloadRef:
        return await self._uploader.upload_payload(data)

    async def download(self, ref: pb.PayloadRef) -> None:
        destination = self._workdir / ref.sha256
        await self._downloader.download_payload(ref.sha256, destination)
        destination.unlink()


class Phase:
    """The wall time and CPU (this process's, the server's) of the transfers one way."""

    def __init__(self, server_pid: int | None) -> None:
        self._server_pid = server_pid
        self.wall_s = self.cpu_s = self.server_cpu_s = 0.0

    @contextlib.contextmanager
    def timed(self) -> Iterator[None]:
        server_before = 0.0 if self._server_pid is None else cpu_s(self._server_pid)
        cpu_before, started = cpu_s(), time.perf_counter()
        yield
        self.wall_s += time.perf_counter() - started
        self.cpu_s += cpu_s() - cpu_before
        if self._server_pid is not None:
            self.server_cpu_s += cpu_s(self._server_pid) - server_before

    def figures(self, way: str, moved_mib: float) -> dict[str, float]:
        found = {f"{way}_mib_per_s": moved_mib / self.wall_s}
        found[f"{way}_client_cpu_us_per_mib"] = self.cpu_s / moved_mib * 1e6
        if self._server_pid is not None:
            found[f"{way}_server_cpu_us_per_mib"] = self.server_cpu_s / moved_mib * 1e6
        return found


async def payloads(args: argparse.Namespace) -> dict[str, float]:
    """`count` uploads of `size` random bytes each (distinct payloads, one after another),
    then as many downloads of them, each timed from its call to its end: to the Task
    Manager, or with --raw to the raw server's bench.Payloads (same client, same
    messages), or with --sdk through agent_kit's OperatorClient. Uploads go to the first
    target, downloads come from the last. A payload is made and hashed before its upload
    is timed; only one is held at a time.

    `upload_mib_per_s`, `download_mib_per_s`: the bytes moved one way over the time those
    transfers took; `*_client_cpu_us_per_mib` this process's CPU and, given --server-pid,
    `*_server_cpu_us_per_mib` that server's; `calls`: MiB moved both ways."""
    found = targets(args)
    uploads, downloads = Phase(args.server_pid), Phase(args.server_pid)
    with tempfile.TemporaryDirectory(prefix="bench-downloads-") as workdir:
        transfers: PayloadStreams | SdkTransfers
        if args.sdk:
            transfers = SdkTransfers(found[0], found[-1], Path(workdir))
        else:
            service = RAW_PAYLOADS if args.raw else TASK_MANAGER
            transfers = PayloadStreams(found[0], found[-1], service)
        try:
            # Channels connected and the server's paths warm, before anything is timed.
            warm = os.urandom(1024)
            await transfers.download(await transfers.upload(warm, sha256_of(warm)))
            refs = []
            for _ in range(args.count):
                data = os.urandom(args.size)
                sha256 = sha256_of(data)
                with uploads.timed():
                    refs.append(await transfers.upload(data, sha256))
                del data
            for ref in refs:
                with downloads.timed():
                    await transfers.download(ref)
        finally:
            await transfers.close()
    moved_mib = args.size * args.count / MIB
    return {
        **uploads.figures("upload", moved_mib),
        **downloads.figures("download", moved_mib),
        "moved_mib_each_way": moved_mib,
        "calls": 2 * moved_mib,
    }


def sha256_of(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def percentiles(latencies_ms: list[float]) -> dict[str, float]:
    ordered = sorted(latencies_ms)
    return {
        "p50_ms": ordered[len(ordered) // 2],
        "p99_ms": ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))],
        "samples": len(ordered),
    }


async def release(args: argparse.Namespace) -> dict[str, float]:
    """rate x duration tasks, each declaring one input (held at CREATED until it has its
    payload), created and their inputs uploaded (a payload each, --input-bytes) before
    anything is timed, agents listening (walking what they get to DONE_OK, as in
    dispatch). Then, at `rate` a second, one task's input is attached (AttachInput,
    through agent_kit's OperatorClient), which releases it. Latency: from the AttachInput
    call's start to the ExecuteRequest read from the agent's stream; `attach_*`: to the
    call's answer."""
    found = targets(args)
    total = int(args.rate * args.duration)
    task_ids = [f"release-{n:08d}" for n in range(total)]
    sent_at: dict[str, float] = {}
    answered: dict[str, float] = {}  # how long each AttachInput took to answer
    async with (
        OperatorClient(found[0]) as operator,
        writer_and_listener_stubs(args) as (_, agents_stub),
        anyio.create_task_group() as group,
    ):
        walkers = Walkers(agents_stub, args.agents, group)
        walkers.start()
        await walkers.all_connected.wait()
        inputs: dict[int, pb.PayloadRef] = {}
        in_flight = asyncio.Semaphore(64)

        async def prepare(n: int) -> None:
            async with in_flight:
                agent = walkers.agents[n % len(walkers.agents)]
                await operator.create_task(
                    assignee_entity_id=agent, task_id=task_ids[n], inputs={"input": None}
                )
                inputs[n] = await operator.upload_payload(os.urandom(args.input_bytes))

        await asyncio.gather(*(prepare(n) for n in range(total)))

        async def attach(n: int) -> None:
            started = sent_at[task_ids[n]] = time.perf_counter()  # AttachInput's start
            await operator.attach_input(task_ids[n], "input", inputs[n])
            answered[task_ids[n]] = time.perf_counter() - started

        interval, start = 1.0 / args.rate, time.perf_counter()
        for n in range(total):
            delay = start + n * interval - time.perf_counter()
            if delay > 0:
                await asyncio.sleep(delay)
            group.start_soon(attach, n)
        walkers.expect(total)
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(walkers.all_received.wait(), 30)
        group.cancel_scope.cancel()
    warm = task_ids[total // 10 :]  # skip the warm-up
    latencies = [
        (walkers.received_at[t] - sent_at[t]) * 1000 for t in warm if t in walkers.received_at
    ]
    if len(latencies) < len(warm):
        raise SystemExit(f"{len(warm) - len(latencies)} tasks never reached their agent")
    attached = percentiles([answered[t] * 1000 for t in warm if t in answered])
    return {
        **percentiles(latencies),
        "attach_p50_ms": attached["p50_ms"],
        "attach_p99_ms": attached["p99_ms"],
        "rate_per_s": args.rate,
        "calls": total,
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
    "payloads": payloads,
    "release": release,
    "rest-update-status": rest_update_status,
    "http-noop": http_noop,
    "sse-dispatch": sse_dispatch,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("scenario", choices=sorted(SCENARIOS))
    parser.add_argument(
        "--target",
        required=True,
        help="HOST:PORT[,HOST:PORT...] (over HTTP: http://HOST:PORT/[,...])",
    )
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
    parser.add_argument("--size", type=int, default=256 * MIB, help="bytes per payload")
    parser.add_argument("--count", type=int, default=4, help="payloads each way")
    parser.add_argument("--raw", action="store_true", help="payloads: the raw server's")
    parser.add_argument("--sdk", action="store_true", help="payloads: through OperatorClient")
    parser.add_argument("--server-pid", type=int, help="payloads: the server's CPU, per way")
    parser.add_argument("--input-bytes", type=int, default=4096, help="release: input size")
    parser.add_argument("--samples", type=int, default=300, help="sse-dispatch: tasks each way")
    args = parser.parse_args()
    result = asyncio.run(SCENARIOS[args.scenario](args))
    print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
