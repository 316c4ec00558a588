"""Channels and stubs shared by the SDK clients.

Keepalive settings let a client notice a dead server (and the server a dead client).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import grpc

from task_manager.v1 import task_manager_pb2, task_manager_pb2_grpc

if TYPE_CHECKING:
    # The async stub type exists only in the generated .pyi; at run time
    # TaskManagerStub(aio_channel) is that stub.
    AsyncStub = task_manager_pb2_grpc.TaskManagerAsyncStub
else:
    AsyncStub = task_manager_pb2_grpc.TaskManagerStub

T = TypeVar("T")
DEFAULT_PORT = 50051
"""The Task Manager's port when a target names only the host."""

# Targets gRPC reads as URIs (dns:///host:port, unix:/path, ...): passed on as they are.
_URI_SCHEMES = ("dns:", "unix:", "unix-abstract:", "ipv4:", "ipv6:", "vsock:")
_BRACKETED = re.compile(r"\[(?P<host>[^\]]+)\](?::(?P<port>[^:]*))?")

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


@dataclass(frozen=True)
class ClientAuth:
    """How a client proves who it is (a bearer token, a client certificate) and checks the
    server (TLS). The default is neither, for a server on loopback without credentials."""

    token: str | None = None
    tls: bool = False
    """Use TLS, trusting the system's CAs unless tls_ca is given."""
    tls_ca: Path | None = None
    """Trust this CA for the server's certificate (implies TLS)."""
    tls_cert: Path | None = None
    """A client certificate for mutual TLS (implies TLS), with tls_key."""
    tls_key: Path | None = None

    @classmethod
    def from_env(cls) -> ClientAuth:
        """TASK_MANAGER_TOKEN, TASK_MANAGER_TLS_CA, TASK_MANAGER_TLS_CERT, TASK_MANAGER_TLS_KEY."""

        def path(name: str) -> Path | None:
            value = os.environ.get(name)
            return Path(value) if value else None

        return cls(
            token=os.environ.get("TASK_MANAGER_TOKEN") or None,
            tls_ca=path("TASK_MANAGER_TLS_CA"),
            tls_cert=path("TASK_MANAGER_TLS_CERT"),
            tls_key=path("TASK_MANAGER_TLS_KEY"),
        )

    @property
    def uses_tls(self) -> bool:
        return self.tls or self.tls_ca is not None or self.tls_cert is not None

    def channel_credentials(self) -> grpc.ChannelCredentials:
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("a client certificate needs both tls_cert and tls_key")
        return grpc.ssl_channel_credentials(
            root_certificates=self.tls_ca.read_bytes() if self.tls_ca else None,
            private_key=self.tls_key.read_bytes() if self.tls_key else None,
            certificate_chain=self.tls_cert.read_bytes() if self.tls_cert else None,
        )


def target_with_port(target: str) -> str:
    """HOST, HOST:PORT, [IPV6] or [IPV6]:PORT as gRPC wants it: DEFAULT_PORT when none is
    given. A bare IPv6 literal (::1) is bracketed. Raises ValueError for a malformed one."""
    if target.startswith(_URI_SCHEMES):
        return target
    malformed = f"malformed target {target!r}: expected HOST[:PORT] or [IPV6][:PORT]"
    bracketed = _BRACKETED.fullmatch(target)
    port: str | None
    if bracketed:
        host, port = f"[{bracketed['host']}]", bracketed["port"]
    elif "[" in target or "]" in target:
        raise ValueError(malformed)
    elif target.count(":") > 1:  # an IPv6 literal without brackets cannot carry a port
        host, port = f"[{target}]", None
    else:
        host, colon, port = target.partition(":")
        port = port if colon else None
    if not host:
        raise ValueError(malformed)
    if port is None:
        return f"{host}:{DEFAULT_PORT}"
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"malformed target {target!r}: the port must be 1-65535")
    return f"{host}:{int(port)}"


def open_channel(target: str, auth: ClientAuth) -> grpc.aio.Channel:
    """A channel to target (see target_with_port for the forms it may take)."""
    target = target_with_port(target)
    if auth.uses_tls:
        return grpc.aio.secure_channel(target, auth.channel_credentials(), options=CHANNEL_OPTIONS)
    return grpc.aio.insecure_channel(target, options=CHANNEL_OPTIONS)


def open_stub(channel: grpc.aio.Channel, auth: ClientAuth) -> AsyncStub:
    """A stub whose every call carries the bearer token, if there is one.

    Bound per method rather than by interceptor: aio interceptors wrap streaming calls in
    objects whose write() does not work, and call credentials are refused without TLS."""
    stub = AsyncStub(channel)
    if auth.token is not None:
        bearer = (("authorization", f"Bearer {auth.token}"),)
        for method in task_manager_pb2.DESCRIPTOR.services_by_name["TaskManager"].methods:
            setattr(stub, method.name, _with_metadata(getattr(stub, method.name), bearer))
    return stub


def _with_metadata(call: Callable[..., T], fixed: tuple[tuple[str, str], ...]) -> Callable[..., T]:
    """call, sending fixed before any metadata its caller gives."""

    def with_fixed(*args: Any, metadata: Sequence[tuple[str, str]] = (), **kwargs: Any) -> T:
        return call(*args, metadata=(*fixed, *metadata), **kwargs)

    return with_fixed
