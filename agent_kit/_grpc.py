"""Channels and stubs shared by the SDK clients.

Keepalive settings let a client notice a dead server (and the server a dead client).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import grpc

from task_manager.v1 import task_manager_pb2_grpc

if TYPE_CHECKING:
    # The async stub type exists only in the generated .pyi; at run time
    # TaskManagerStub(aio_channel) is that stub.
    AsyncStub = task_manager_pb2_grpc.TaskManagerAsyncStub
else:
    AsyncStub = task_manager_pb2_grpc.TaskManagerStub

CHANNEL_OPTIONS: list[tuple[str, int]] = [
    ("grpc.keepalive_time_ms", 20_000),
    ("grpc.keepalive_timeout_ms", 10_000),
    ("grpc.keepalive_permit_without_calls", 1),
    ("grpc.http2.max_pings_without_data", 0),
    # Reconnect attempts of the channel itself; our own backoff sits on top.
    ("grpc.initial_reconnect_backoff_ms", 100),
    ("grpc.max_reconnect_backoff_ms", 5_000),
]

RETRYABLE_CODES = frozenset(
    {
        grpc.StatusCode.UNAVAILABLE,
        grpc.StatusCode.DEADLINE_EXCEEDED,
        grpc.StatusCode.CANCELLED,
        grpc.StatusCode.RESOURCE_EXHAUSTED,
        grpc.StatusCode.INTERNAL,  # e.g. a connection reset mid-call
        grpc.StatusCode.UNKNOWN,
    }
)
"""Codes after which the same call may succeed later (server restart, network)."""


def open_channel(target: str) -> grpc.aio.Channel:
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)
