"""Process wiring: the store, the dispatcher and the servicer behind one grpc.aio server.

Start with `await TaskManagerServer.start(settings)`; `stop()` ends agent streams with
UNAVAILABLE, lets in-flight calls finish, then closes the store.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import ssl
from pathlib import Path

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

# health.aio is the documented async servicer; grpc-stubs predates it.
from grpc_health.v1.health import aio as health_aio  # type: ignore[attr-defined]
from grpc_reflection.v1alpha import reflection

# Imported for reflection: it serves only what this process's descriptor pool holds.
import task_manager.well_known_types  # noqa: F401
from storage import open_blob_store, open_store
from storage.base import Store
from storage.stats import TailStats, WriterStats
from task_manager import lifecycle, logs
from task_manager.auth import Credentials, OpenStreams, RateLimiter
from task_manager.clock import Clock, SystemClock, sleep_until
from task_manager.cluster import Cluster
from task_manager.config import HTTP_OFF, Settings
from task_manager.dispatch import Dispatcher
from task_manager.metrics import Metrics
from task_manager.payload_collector import PayloadCollector
from task_manager.payloads import PayloadQuotas
from task_manager.presence import Presence
from task_manager.service import SERVICE_NAMES, Gate, TaskManagerService, generic_handlers
from task_manager.timekeeper import Timekeeper
from task_manager.v1.task_manager_pb2 import Status, Task
from task_manager.watch import WatchHub
from task_manager.web.server import Backing, HttpFront

log = logging.getLogger(__name__)


class ServerStartError(Exception):
    """The server could not start; the message says why, in one line."""


def _grpc_options(settings: Settings) -> list[tuple[str, int]]:
    return [
        # Without this, two servers may bind the same port and split the traffic.
        ("grpc.so_reuseport", 0),
        ("grpc.keepalive_time_ms", settings.keepalive_time_ms),
        ("grpc.keepalive_timeout_ms", settings.keepalive_timeout_ms),
        ("grpc.keepalive_permit_without_calls", 1),
        # Let agents ping as often as every 10 s so they notice a dead server too.
        ("grpc.http2.min_ping_interval_without_data_ms", 10_000),
        ("grpc.http2.max_pings_without_data", 0),
        ("grpc.max_receive_message_length", settings.max_request_bytes),
    ]


def is_loopback(listen: str) -> bool:
    host = listen.rsplit(":", 1)[0].strip("[]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a host name or a wildcard that may reach other machines


def _check_exposure(settings: Settings, credentials: Credentials) -> None:
    """Off loopback, the server needs TLS and credentials, unless told --insecure: on
    the gRPC address and the HTTP one alike."""
    for listen in (settings.listen, settings.http_listen):
        if listen != HTTP_OFF:
            _check_exposed(listen, settings, credentials)


def _check_exposed(listen: str, settings: Settings, credentials: Credentials) -> None:
    if settings.insecure or is_loopback(listen):
        return
    missing = [
        *([] if settings.tls_cert else ["TLS (--tls-cert, --tls-key)"]),
        *(
            []
            if credentials.required
            else ["authentication (task-manager tokens add, or --client-ca)"]
        ),
    ]
    if missing:
        raise ServerStartError(
            f"refusing to listen on {listen} without {' and '.join(missing)}: anyone"
            " who can reach it could read and command your agents. Listen on 127.0.0.1, set"
            " them up, or pass --insecure on a network you trust."
        )


def _server_credentials(settings: Settings) -> grpc.ServerCredentials | None:
    if settings.tls_cert is None and settings.tls_key is None:
        if settings.client_ca is not None:
            raise ServerStartError("--client-ca needs --tls-cert and --tls-key")
        return None
    if settings.tls_cert is None or settings.tls_key is None:
        raise ServerStartError("TLS needs both --tls-cert and --tls-key")
    cert = _pem(settings.tls_cert, "--tls-cert", b"CERTIFICATE-----")
    key = _pem(settings.tls_key, "--tls-key", b"PRIVATE KEY-----")
    client_ca = None
    if settings.client_ca is not None:
        client_ca = _pem(settings.client_ca, "--client-ca", b"CERTIFICATE-----")
    return grpc.ssl_server_credentials(
        [(key, cert)], root_certificates=client_ca, require_client_auth=client_ca is not None
    )


def _http_ssl_context(settings: Settings) -> ssl.SSLContext | None:
    """The gRPC side's TLS for the HTTP front (already checked by _server_credentials)."""
    if settings.tls_cert is None or settings.tls_key is None:
        return None
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(settings.tls_cert, settings.tls_key)
    if settings.client_ca is not None:
        context.load_verify_locations(settings.client_ca)
        context.verify_mode = ssl.CERT_REQUIRED
    return context


def _pem(path: Path, flag: str, marker: bytes) -> bytes:
    """The file's bytes, if it looks like the PEM it should be (gRPC's own error for a
    wrong file is only a log line and a failure to listen)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise ServerStartError(f"cannot read {flag} {path}: {exc.strerror}") from exc
    if b"-----BEGIN " not in data or marker not in data:
        raise ServerStartError(f"{flag} {path} is not a PEM file with a {marker[:-5].decode()}")
    return data


class _Held:
    """What /metrics reads of the running server at each scrape (metrics.Observed)."""

    def __init__(
        self, dispatcher: Dispatcher, watch_hub: WatchHub, store: Store, timekeeper: Timekeeper
    ) -> None:
        self._dispatcher = dispatcher
        self._watch_hub = watch_hub
        self._store = store
        self._timekeeper = timekeeper

    def open_agent_streams(self) -> int:
        return self._dispatcher.open_streams()

    def open_watches(self) -> int:
        return self._watch_hub.open_watches()

    def writer_stats(self) -> WriterStats:
        return self._store.writer_stats

    def tail_stats(self) -> TailStats | None:
        return self._store.tail_stats

    def revision(self) -> int:
        return self._store.feed.revision

    def deadlines_fired(self) -> int:
        return self._timekeeper.fired


class TaskManagerServer:
    """A running Task Manager: the gRPC server and what it owns."""

    def __init__(
        self,
        server: grpc.aio.Server,
        servicer: TaskManagerService,
        gate: Gate,
        store: Store,
        dispatcher: Dispatcher,
        health_servicer: health_aio.HealthServicer,
        address: str,
        settings: Settings,
    ) -> None:
        self._server = server
        self._servicer = servicer
        self._gate = gate
        self.store = store
        self.dispatcher = dispatcher
        self._health = health_servicer
        self.address = address
        self._settings = settings
        self._stopped = False
        self._background: list[asyncio.Task[None]] = []  # owned; cancelled in stop()
        self.timekeeper: Timekeeper | None = None
        self.payload_collector: PayloadCollector | None = None
        self.cluster: Cluster | None = None
        self.http: HttpFront | None = None
        self.compactions = 0

    @property
    def port(self) -> int:
        return int(self.address.rsplit(":", 1)[1])

    @property
    def http_url(self) -> str:
        """The HTTP front's root URL; empty if it is off."""
        if self.http is None:
            return ""
        scheme = "https" if self._settings.tls_cert else "http"
        return f"{scheme}://{self.http.address}/"

    async def not_ready_because(self) -> str:
        """Why this server should not be sent traffic now ("" when it should)."""
        if self._stopped:
            return "stopping"
        try:
            await self.store.current_revision()
        except Exception as exc:
            return f"the database does not answer: {exc}"
        return ""

    async def task_counts(self) -> dict[str, int]:
        counts = await self.store.task_counts()
        return {Status.Name(Status.ValueType(s)): n for s, n in counts.items()}

    @classmethod
    async def start(cls, settings: Settings, clock: Clock | None = None) -> TaskManagerServer:
        """Opens the database, binds the address and starts serving.

        Raises ServerStartError for a port in use or a database that cannot be opened.
        """
        clock = clock or SystemClock()
        try:
            store = await open_store(
                settings.db,
                writer_niceness=settings.writer_niceness,
                tail_poll_s=settings.tail_poll_s,
            )
        except Exception as exc:
            raise ServerStartError(str(exc)) from exc

        def hand_over(task: Task, old: str, new: str) -> asyncio.Future[Task | None]:
            return store.submit(lambda tx: lifecycle.hand_over(tx, task, old, new, clock.now_ns()))

        metrics = Metrics(clock)
        dispatcher = Dispatcher(hand_over, settings.stream_buffer, metrics.task_dispatched)
        watch_hub = WatchHub(store.feed.revision, buffer=settings.watch_buffer)
        presence = Presence(int(settings.agent_lost_after_s * 1e9))
        presence.load(await store.seen_agents())
        for subscriber in (dispatcher.publish, watch_hub.publish, logs.log_changes):
            store.feed.subscribe(subscriber)
        cluster = Cluster(
            store,
            presence,
            dispatcher,
            clock,
            int(settings.replica_lease_s * 1e9),
            int(settings.cluster_refresh_s * 1e9),
        )
        await cluster.join()
        grace = settings.restart_grace_s
        timekeeper = Timekeeper(
            store,
            clock,
            cluster.up_since_ns,
            None if grace is None else int(grace * 1e9),
            int(settings.timekeeper_poll_s * 1e9),
            presence,
        )
        # Subscribed only now, as it needs the join: a commit it missed meanwhile is no
        # loss, as its first round reads every deadline from the store.
        store.feed.subscribe(timekeeper.notice)
        server = grpc.aio.server(options=_grpc_options(settings))
        credentials = Credentials(client_certificates=settings.client_ca is not None)
        try:
            blobs = open_blob_store(settings.db)
            credentials.replace(await store.credentials())
            _check_exposure(settings, credentials)
            server_credentials = _server_credentials(settings)
        except (ServerStartError, OSError) as exc:
            await store.close()
            raise ServerStartError(str(exc)) from exc
        gate = Gate(
            credentials,
            RateLimiter(settings.requests_per_second, clock),
            OpenStreams(settings.max_streams_per_principal),
        )
        store.feed.subscribe(metrics.changes_committed)
        servicer = TaskManagerService(
            store,
            dispatcher,
            watch_hub,
            gate,
            settings.limits,
            settings.task_policy(),
            presence,
            cluster,
            clock,
            blobs,
            PayloadQuotas(
                store, clock, settings.payload_quota_bytes, settings.upload_bytes_per_second
            ),
            metrics,
        )
        server.add_generic_rpc_handlers(generic_handlers(servicer))
        health_servicer = health_aio.HealthServicer()
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server
        )
        try:
            if server_credentials is None:
                port = server.add_insecure_port(settings.listen)
            else:
                port = server.add_secure_port(settings.listen, server_credentials)
        except RuntimeError as exc:
            await store.close()
            why = "the address is in use or not available"
            if server_credentials is not None:
                why += ", or the TLS certificate and key do not match"
            raise ServerStartError(f"cannot listen on {settings.listen}: {why}") from exc
        await server.start()
        await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
        for name in SERVICE_NAMES:
            await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
        host = settings.listen.rsplit(":", 1)[0]
        address = f"{host}:{port}"
        log.info(
            "serving on %s (database %s, commits fsynced: %s, TLS: %s, authentication: %s)",
            address,
            settings.db,
            store.durable,
            "mutual" if settings.client_ca else "on" if server_credentials else "off",
            "on" if credentials.required else "off (no credentials stored)",
        )
        running = cls(server, servicer, gate, store, dispatcher, health_servicer, address, settings)
        running.timekeeper = timekeeper
        metrics.observe(_Held(dispatcher, watch_hub, store, timekeeper))
        if settings.http_listen != HTTP_OFF:
            backing = Backing(
                metrics,
                credentials,
                running.not_ready_because,
                running.task_counts,
                servicer,
                gate,
                settings.max_request_bytes,
                settings.shutdown_grace_s,
            )
            try:
                running.http = await HttpFront.start(
                    settings.http_listen, backing, _http_ssl_context(settings)
                )
            except OSError as exc:
                await running.stop()
                raise ServerStartError(
                    f"cannot listen on {settings.http_listen} (--http-listen): {exc.strerror}"
                ) from exc
        running.payload_collector = PayloadCollector(
            store, blobs, settings.payload_grace_s, settings.payload_sweep_s
        )
        running._background = [
            asyncio.create_task(running.payload_collector.run()),
            asyncio.create_task(timekeeper.run()),
            asyncio.create_task(running._compact_forever(clock, cluster.replica_id)),
            asyncio.create_task(running._refresh_credentials_forever(gate, clock)),
            asyncio.create_task(cluster.run()),
        ]
        running.cluster = cluster
        return running

    async def stop(self) -> None:
        """Graceful stop: agent streams end with UNAVAILABLE (agents reconnect elsewhere),
        new calls are refused with UNAVAILABLE, in-flight calls and queued writes finish."""
        if self._stopped:
            return
        self._stopped = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._settings.shutdown_grace_s
        await self._health.enter_graceful_shutdown()
        for task in self._background:
            task.cancel()
        self._gate.close()
        self._servicer.shut_down()
        await self._drain(deadline)
        await self._server.stop(max(0.0, deadline - loop.time()))
        if self.http is not None:
            await self.http.stop()
        await self._leave_cluster()
        await self.store.close()
        log.info("stopped after %d writes in %d commits", self.store.writes, self.store.commits)

    async def _leave_cluster(self) -> None:
        """Ends this replica's part in the gateway (its refresh was cancelled above, so
        nothing renews it after): the last to leave leaves the gateway down."""
        if self.cluster is None:
            return
        try:
            await self.cluster.leave()
        except Exception:
            # Then it counts as up for two more refreshes: a restart that soon gets no
            # new restart grace.
            log.exception("recording that this replica stopped failed")

    async def _drain(self, deadline: float) -> None:
        """Lets gRPC hand over the calls it has received but not yet started, until none
        has come for drain_quiet_s (or the grace is over).

        gRPC's own stop cancels such calls (clients see CANCELLED, which they do not
        retry); handed over now, the closed gate answers them UNAVAILABLE, unapplied."""
        loop = asyncio.get_running_loop()
        while loop.time() < deadline:
            seen = self._gate.arrivals
            await asyncio.sleep(min(self._settings.drain_quiet_s, deadline - loop.time()))
            if self._gate.arrivals == seen:
                return

    async def compact(self, clock: Clock | None = None) -> int:
        """Applies the retention policy now; returns the compacted revision."""
        now_ns = (clock or SystemClock()).now_ns()
        older_than_ns = now_ns - int(self._settings.retention_age_s * 1e9)
        return await self.store.compact(self._settings.retention_revisions, older_than_ns)

    async def _compact_forever(self, clock: Clock, replica_id: str) -> None:
        """Compacts every interval, while this replica holds the compaction lease (one
        replica of several at a time; it passes on if the holder stops renewing it)."""
        interval_ns = int(self._settings.compaction_interval_s * 1e9)
        lease_ns = 2 * interval_ns
        compacted_before = 0
        while True:
            try:
                if await self.store.write(
                    lambda tx: tx.take_lease("compaction", replica_id, lease_ns)
                ):
                    compacted = await self.compact(clock)
                    self.compactions += 1
                    if compacted > compacted_before:  # quiet when nothing was removed
                        log.info("history compacted up to revision %d", compacted)
                        compacted_before = compacted
            except Exception:
                log.exception("compaction failed; trying again next interval")
            await sleep_until(clock, clock.now_ns() + interval_ns)

    async def _refresh_credentials_forever(self, gate: Gate, clock: Clock) -> None:
        """Re-reads the credentials `task-manager tokens` manages; ends the open streams
        of any that were revoked."""
        interval_ns = int(self._settings.credential_refresh_s * 1e9)
        while True:
            await sleep_until(clock, clock.now_ns() + interval_ns)
            try:
                gate.reload(await self.store.credentials())
            except Exception:
                log.exception("reading credentials failed; keeping the ones in force")

    async def wait_for_termination(self) -> None:
        await self._server.wait_for_termination()
