"""The event loop every test runs on, and the one grpc.aio defect it has to absorb.

anyio gives each test a new event loop and closes it afterwards. grpc.aio, though, keeps
one completion queue per process and binds it to every loop it has seen; whichever live
loop reads the queue hands each completion to the loop its call was started on. A call
still pending when its test's loop closed (cancelled at teardown, or with a deadline)
completes later, and grpc then calls `call_soon_threadsafe` on the closed loop from inside
another test's loop: `RuntimeError('Event loop is closed')`, reported by anyio as an error
of that other, unrelated test (tests/test_event_loops.py shows it happen).

Nothing can be waiting for a completion addressed to a closed loop, so exactly that error,
raised by that grpc callback, is dropped. Every other exception is reported as before.
"""

from __future__ import annotations

import asyncio
from typing import Any

GRPC_EVENT_DISPATCH = "PollerCompletionQueue._handle_events"


def is_completion_for_a_closed_loop(context: dict[str, Any]) -> bool:
    """Whether an exception handler's `context` is grpc failing to reach a closed loop."""
    exception = context.get("exception")
    callback = getattr(context.get("handle"), "_callback", None)
    callback = getattr(callback, "func", callback)  # grpc registers a functools.partial
    return (
        isinstance(exception, RuntimeError)
        and str(exception) == "Event loop is closed"
        and getattr(callback, "__qualname__", "") == GRPC_EVENT_DISPATCH
    )


class SuiteEventLoop(asyncio.SelectorEventLoop):
    """The standard loop, minus grpc's reports of completions addressed to closed loops."""

    stray_completions = 0
    """How many such reports this loop dropped."""

    def call_exception_handler(self, context: dict[str, Any]) -> None:
        if is_completion_for_a_closed_loop(context):
            self.stray_completions += 1
            return
        super().call_exception_handler(context)
