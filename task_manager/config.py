"""Server settings: their defaults, and the checks the command line applies to them.

One dataclass carries them from the command line (flags, then environment) to the server.
"""

from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass, field
from pathlib import Path

from storage.feed import TAIL_POLL_S
from storage.group_commit import WRITER_NICENESS
from task_manager.liveness import duration
from task_manager.v1.task_manager_pb2 import TaskPolicy
from task_manager.validation import FieldLimits

DEFAULT_LISTEN = "127.0.0.1:50051"
DEFAULT_HTTP_LISTEN = "127.0.0.1:8080"
HTTP_OFF = "off"
DEFAULT_DB = "taskmanager.db"


HOST_NAME = re.compile(
    r"[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?(\.[A-Za-z0-9]([A-Za-z0-9-]*[A-Za-z0-9])?)*"
)
LISTEN_EXAMPLES = "127.0.0.1:50051 for this machine only, 0.0.0.0:50051 for every interface"


def check_listen(text: str) -> str:
    """`text` if it is HOST:PORT as the server listens on; else ValueError saying why."""
    host, colon, port = text.rpartition(":")
    if not colon:
        raise ValueError(f"{text!r} is not HOST:PORT ({LISTEN_EXAMPLES})")
    if not (port.isascii() and port.isdigit() and int(port) <= 65535):
        raise ValueError(
            f"{text!r}: the port {port!r} is not a number from 0 to 65535 (0: a free one)"
        )
    if not host:
        raise ValueError(f"{text!r}: the host is missing ({LISTEN_EXAMPLES})")
    if host.startswith("[") and host.endswith("]"):
        try:
            ipaddress.IPv6Address(host[1:-1])
        except ValueError:
            raise ValueError(f"{text!r}: {host} is not an IPv6 address") from None
    elif ":" in host:
        raise ValueError(f"{text!r}: an IPv6 host goes in brackets, as in [::1]:50051")
    elif not HOST_NAME.fullmatch(host):
        raise ValueError(f"{text!r}: {host!r} is not a host name or an IP address")
    return text


@dataclass(frozen=True)
class Settings:
    listen: str = DEFAULT_LISTEN
    http_listen: str = DEFAULT_HTTP_LISTEN
    """The HTTP front (health, /metrics): HOST:PORT, or HTTP_OFF."""
    db: str = DEFAULT_DB
    """The SQLite file, or a postgresql:// URL."""
    shutdown_grace_s: float = 5.0
    """How long in-flight calls may take to finish after SIGTERM."""
    drain_quiet_s: float = 0.1
    """At a stop, calls gRPC received but had not yet started are answered UNAVAILABLE
    until none has come for this long; gRPC would cancel them."""
    stream_buffer: int = 1_024
    """Requests queued for one agent stream before it counts as fallen behind."""
    keepalive_time_ms: int = 30_000
    """Ping idle connections this often, to notice dead agents."""
    keepalive_timeout_ms: int = 10_000
    watch_buffer: int = 10_000
    """Events queued for one watcher before it counts as fallen behind."""
    retention_revisions: int = 100_000
    """Compaction keeps at least this many of the newest revisions ..."""
    retention_age_s: float = 7 * 24 * 3600
    """... and every revision younger than this."""
    compaction_interval_s: float = 300.0
    tls_cert: Path | None = None
    """Serve TLS with this certificate chain (PEM) and tls_key."""
    tls_key: Path | None = None
    client_ca: Path | None = None
    """Require client certificates signed by this CA (mutual TLS)."""
    insecure: bool = False
    """Allow a non-loopback address without TLS and authentication."""
    credential_refresh_s: float = 1.0
    """How often stored credentials are re-read: a revocation takes effect within this."""
    max_request_bytes: int = 4 << 20
    """Bigger requests are refused by gRPC itself (RESOURCE_EXHAUSTED)."""
    requests_per_second: float = 10_000.0
    """Per principal: unary calls, stream opens and status reports."""
    max_streams_per_principal: int = 1_000
    limits: FieldLimits = field(default_factory=FieldLimits)
    receipt_timeout_s: float = 0.0
    """Defaults of a task's policy (0: no timeout); a CreateTaskRequest may set its own."""
    heartbeat_timeout_s: float = 0.0
    execution_timeout_s: float = 0.0
    max_attempts: int = 1
    retry_backoff_s: float = 0.0
    max_retry_backoff_s: float = 0.0
    restart_grace_s: float | None = None
    """After the gateway comes up, timeouts wait this long for agents to reconnect and
    report; None: each task's heartbeat_timeout. A replica joining running ones (that
    renewed within two cluster refreshes) starts no new grace (task_manager/cluster.py)."""
    agent_lost_after_s: float = 60.0
    """An agent without an open stream for this long is listed as LOST."""
    replica_lease_s: float = 10.0
    """A replica's agent streams count as open this long after it last renewed them:
    a dead replica's pool tasks move to another member within this plus
    cluster_refresh_s. After a start, a replica waits this long before it hands back a
    pool task whose member has no stream, so the member can reconnect."""
    cluster_refresh_s: float = 1.0
    """How often a replica renews its leases and learns the others' agent streams."""
    timekeeper_poll_s: float = 1.0
    """The timekeeper looks for due deadlines at least this often."""
    payload_grace_s: float = 3_600.0
    """A payload no task refers to is collected once idle this long (from its upload)."""
    payload_sweep_s: float = 60.0
    """How often the payload collector looks."""
    payload_quota_bytes: int = 100 << 30
    """Per principal: the bytes of the payloads it uploaded that are stored (0: no quota)."""
    upload_bytes_per_second: float = 0.0
    """Per principal, on each replica: uploads beyond it are slowed down (0: no limit)."""
    tail_poll_s: float = TAIL_POLL_S
    """PostgreSQL: a replica reads the others' commits at least this often, even when no
    NOTIFY woke it (storage/postgres/store.py)."""
    writer_niceness: int = WRITER_NICENESS
    """How far below the event loop the store's writer thread runs (Linux; 0: level)."""

    def task_policy(self) -> TaskPolicy:
        """The policy a task gets for every field its CreateTaskRequest leaves unset."""
        policy = TaskPolicy(max_attempts=self.max_attempts)
        # Zero durations stay unset: a smaller task, and no timeout to look at.
        for name, seconds in (
            ("receipt_timeout", self.receipt_timeout_s),
            ("heartbeat_timeout", self.heartbeat_timeout_s),
            ("execution_timeout", self.execution_timeout_s),
            ("retry_backoff", self.retry_backoff_s),
            ("max_retry_backoff", self.max_retry_backoff_s),
        ):
            if seconds > 0:
                getattr(policy, name).CopyFrom(duration(seconds))
        return policy
