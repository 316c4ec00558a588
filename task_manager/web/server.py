"""The HTTP server: the Lattice REST API (lattice.py), this gateway's own API as JSON
(rpc.py), payload downloads (downloads.py), its OpenAPI document, health, readiness and
/metrics.

An aiohttp server on the gateway's own event loop, beside grpc.aio: no thread, no second
process. It takes the gRPC side's TLS settings and the same rule off loopback
(server.py's _check_exposure). With authentication on, /metrics wants a bearer token of
any role, as gRPC calls do: it tells what the gateway holds. /healthz and /readyz answer
anyone, for load balancers and orchestrators.
"""

from __future__ import annotations

import logging
import ssl
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from aiohttp import web

from task_manager import logs
from task_manager.auth import Credentials
from task_manager.errors import Unauthenticated
from task_manager.metrics import CONTENT_TYPE, Metrics
from task_manager.service import Gate, TaskManagerService
from task_manager.web import openapi
from task_manager.web.answers import http_error_response, json_response
from task_manager.web.calls import authorization, refusal
from task_manager.web.downloads import PayloadRoutes
from task_manager.web.lattice import LatticeRoutes
from task_manager.web.rpc import RpcRoutes

log = logging.getLogger(__name__)
CONSOLE = Path(__file__).with_name("console")
"""The web console's files, served as they are (no build step; console/console.js)."""
CONSOLE_HEADERS = {
    # Its own scripts and styles only, never inside another site's frame.
    "Content-Security-Policy": "default-src 'self'; frame-ancestors 'none'",
    "X-Content-Type-Options": "nosniff",
}
CONSOLE_FILES = frozenset(path.name for path in CONSOLE.iterdir() if path.is_file())
LOOPBACK_NAMES = frozenset({"127.0.0.1", "localhost", "::1"})


@dataclass(frozen=True)
class Backing:
    """What the routes read, from the rest of the gateway."""

    metrics: Metrics
    credentials: Credentials
    ready: Callable[[], Awaitable[str]]
    """Why the gateway is not ready ("" when it is): stopping, or its store not answering."""
    task_counts: Callable[[], Awaitable[Mapping[str, int]]]
    service: TaskManagerService
    gate: Gate
    max_request_bytes: int
    shutdown_grace_s: float
    """How long a stop waits for requests still being answered."""


class HttpFront:
    """A running HTTP server; stop() ends it."""

    def __init__(self, runner: web.AppRunner, address: str) -> None:
        self._runner = runner
        self.address = address
        """HOST:PORT as bound (a port 0 asked for is the one given)."""

    @classmethod
    async def start(
        cls, listen: str, backing: Backing, ssl_context: ssl.SSLContext | None
    ) -> HttpFront:
        """Binds listen and serves; OSError if the address is taken or unavailable."""
        host = listen.rpartition(":")[0].strip("[]")
        app = web.Application(
            middlewares=[
                _measured(backing.metrics),
                _addressed_to(host, backing.credentials),
                _json_errors,
            ],
            client_max_size=backing.max_request_bytes,
        )
        LatticeRoutes(backing.service, backing.gate).add_to(app.router)
        RpcRoutes(backing.service, backing.gate).add_to(app.router)
        PayloadRoutes(backing.service, backing.gate).add_to(app.router)
        routes = _Routes(backing)
        app.router.add_get("/healthz", routes.healthz)
        app.router.add_get("/readyz", routes.readyz)
        app.router.add_get("/metrics", routes.metrics)
        app.router.add_get("/openapi.json", routes.openapi)
        app.router.add_get("/", routes.console)
        app.router.add_get("/console/{name}", routes.console_file)
        # No access log: a request per line would drown the server's own. Handlers are
        # cancelled when their client goes away, so a stream ends (and its agent counts as
        # gone) at once, not at its next heartbeat.
        runner = web.AppRunner(
            app,
            access_log=None,
            handle_signals=False,
            handler_cancellation=True,
            shutdown_timeout=backing.shutdown_grace_s,
        )
        await runner.setup()
        host, _, port = listen.rpartition(":")
        site = web.TCPSite(
            runner, host.strip("[]"), int(port), ssl_context=ssl_context, reuse_port=False
        )
        try:
            await site.start()
        except OSError:
            await runner.cleanup()
            raise
        bound_port = _bound_port(runner)
        scheme = "https" if ssl_context is not None else "http"
        address = f"{host}:{bound_port}"
        log.info("HTTP on %s://%s", scheme, address)
        return cls(runner, address)

    def routes(self) -> list[web.AbstractRoute]:
        """What it serves."""
        return list(self._runner.app.router.routes())

    async def stop(self) -> None:
        await self._runner.cleanup()


def _bound_port(runner: web.AppRunner) -> int:
    for address in runner.addresses:
        return int(address[1])
    raise OSError("the HTTP server bound no address")


class _Routes:
    def __init__(self, backing: Backing) -> None:
        self._backing = backing
        self._openapi = openapi.document()

    async def openapi(self, request: web.Request) -> web.Response:
        return json_response(self._openapi)

    async def console(self, request: web.Request) -> web.FileResponse:
        return web.FileResponse(CONSOLE / "index.html", headers=CONSOLE_HEADERS)

    async def console_file(self, request: web.Request) -> web.FileResponse:
        """One of the console's own files (a static route would answer a missing one
        itself, as text, not as the JSON every other refusal is)."""
        name = request.match_info["name"]
        if name not in CONSOLE_FILES:
            raise web.HTTPNotFound()
        return web.FileResponse(CONSOLE / name, headers=CONSOLE_HEADERS)

    async def healthz(self, request: web.Request) -> web.Response:
        return web.Response(text="ok\n")

    async def readyz(self, request: web.Request) -> web.Response:
        why = await self._backing.ready()
        if why:
            return web.Response(status=503, text=f"not ready: {why}\n")
        return web.Response(text="ready\n")

    async def metrics(self, request: web.Request) -> web.Response:
        try:
            # Any role's token: it calls no method, so no role check and no rate limit.
            self._backing.gate.http_caller(authorization(request))
        except Unauthenticated as refused:
            return refusal(request, refused)
        body = self._backing.metrics.render(await self._backing.task_counts())
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE})


@web.middleware
async def _json_errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """aiohttp's own refusals (no route: 404, a method the route does not take: 405, a
    body over the size limit) in the JSON form of every other error, not its text."""
    try:
        return await handler(request)
    except web.HTTPMethodNotAllowed as refused:
        allowed = ", ".join(sorted(refused.allowed_methods))
        why = f"{request.path} does not take {request.method}, only {allowed}"
        return http_error_response(refused, why)
    except web.HTTPNotFound as refused:
        return http_error_response(refused, f"nothing is served at {request.path}")
    except web.HTTPException as refused:
        if refused.status < 400:
            raise
        return http_error_response(refused)


def _addressed_to(
    host: str, credentials: Credentials
) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Without authentication, the front listens on loopback only (server.py), and then
    answers only requests addressed to a loopback name. A page of another site whose
    name it has pointed at 127.0.0.1 (DNS rebinding) would otherwise be same-origin to
    the browser, and could read and change every task."""

    @web.middleware
    async def check(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        if not credentials.required and host in LOOPBACK_NAMES:
            named = _hostname(request.host or "")
            if named not in LOOPBACK_NAMES and named != host:
                return json_response(
                    {
                        "code": 7,
                        "status": "PERMISSION_DENIED",
                        "message": f"this gateway has no authentication and answers only"
                        f" requests addressed to {host}, not to {request.host!r}",
                    },
                    403,
                )
        response = await handler(request)
        if request.path.startswith("/console/"):
            response.headers.update(CONSOLE_HEADERS)
        return response

    return check


def _hostname(host: str) -> str:
    """The name in a Host header: without its port, and an IPv6 address without [ ]."""
    if host.startswith("["):
        return host[1 : host.find("]")] if "]" in host else host
    return host.rpartition(":")[0] if ":" in host else host


def _measured(metrics: Metrics) -> Callable[..., Awaitable[web.StreamResponse]]:
    """Counts and times each request by its route (the pattern, not the path: one series
    per route however many task ids pass through it)."""

    @web.middleware
    async def measure(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        started = time.perf_counter()
        logs.serving(request.headers.get(logs.REQUEST_ID_KEY))
        resource = request.match_info.route.resource
        route = resource.canonical if resource is not None else "unmatched"
        try:
            response = await handler(request)
        except web.HTTPException as answered:
            metrics.http_answered(route, answered.status, time.perf_counter() - started)
            raise
        metrics.http_answered(route, response.status, time.perf_counter() - started)
        return response

    return measure
