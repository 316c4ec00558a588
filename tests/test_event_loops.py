"""The grpc.aio defect tests/event_loops.py absorbs: shown, and shown absorbed.

Each case runs in a process of its own, so that its deliberately stranded call cannot
reach this process's other tests.
"""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

# Loop A starts a call with a deadline and closes while it is pending; loop B then serves
# grpc until the call's deadline completion, addressed to loop A, has come through it.
STRANDED_CALL = textwrap.dedent(
    """
    import asyncio, sys, time
    import grpc
    from grpc import aio
    from tests.event_loops import SuiteEventLoop, is_completion_for_a_closed_loop

    async def never_answer(request, context):
        await asyncio.Event().wait()

    async def start_server():
        server = aio.server()
        port = server.add_insecure_port("127.0.0.1:0")
        handler = grpc.unary_unary_rpc_method_handler(never_answer)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler("t.T", {"Wait": handler}),)
        )
        await server.start()
        return server, port

    stranded = []

    async def strand_a_call():
        server, port = await start_server()
        channel = aio.insecure_channel(f"127.0.0.1:{port}")
        call = channel.unary_unary("/t.T/Wait")(b"", timeout=0.3)
        stranded.append((server, channel, call))
        await channel.channel_ready()

    loop_a = asyncio.new_event_loop()
    loop_a.run_until_complete(strand_a_call())
    loop_a.close()

    reported = []
    loop_b = SuiteEventLoop() if sys.argv[1] == "suite" else asyncio.SelectorEventLoop()
    loop_b.stray_completions = getattr(loop_b, "stray_completions", 0)

    async def serve_grpc_until_the_completion_came():
        loop = asyncio.get_running_loop()
        loop.set_exception_handler(lambda loop, context: reported.append(context))
        server, _ = await start_server()  # binds loop B to grpc's completion queue
        deadline = time.monotonic() + 30
        while not reported and not loop.stray_completions:
            assert time.monotonic() < deadline, "the stranded call never completed"
            await asyncio.sleep(0.01)
        await server.stop(None)

    loop_b.run_until_complete(serve_grpc_until_the_completion_came())
    stray = sum(map(is_completion_for_a_closed_loop, reported)) + loop_b.stray_completions
    print(stray, len(reported))
    """
)


def stranded_call_on(loop: str) -> tuple[int, int]:
    """(completions that failed to reach loop A, exceptions loop B's handler saw)."""
    finished = subprocess.run(
        [sys.executable, "-c", STRANDED_CALL, loop],
        cwd=Path(__file__).parent.parent,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert finished.returncode == 0, finished.stderr
    stray, reported = finished.stdout.split()
    return int(stray), int(reported)


def test_a_plain_loop_reports_a_completion_addressed_to_a_closed_loop() -> None:
    stray, reported = stranded_call_on("plain")
    assert stray >= 1
    assert reported == stray


def test_the_suite_loop_drops_it_and_reports_nothing() -> None:
    stray, reported = stranded_call_on("suite")
    assert stray >= 1
    assert reported == 0
