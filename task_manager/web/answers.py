"""JSON answers of the HTTP routes, and the one mapping of a failed call to an HTTP status.

A refused request is refused by the same rule, with the same message, as over gRPC: the
service raises, service.status_for names the gRPC status (the one error table), and the
table below turns its code into HTTP's. The body is Google's JSON form of an RPC status,
`{"code": <gRPC code number>, "status": <its name>, "message": ...}`, with the detail a
client acts on beside it (currentStatusVersion on a stale update, retryAfterMs when
throttled).

Where the mapping departs from Google's (google.rpc.Code), it is for the Lattice SDK,
which retries 408, 409, 429 and 5xx twice, about three seconds in all:
- ABORTED (the statusVersion sent is not the task's) is 412 Precondition Failed, not 409:
  repeating the same update cannot succeed, so it must not be retried blindly.
- FAILED_PRECONDITION (a terminal task, a finished session) stays 400, as Google maps it.
"""

from __future__ import annotations

import json
from typing import Any

import grpc
from aiohttp import web

from task_manager.service import (
    COMPACT_REVISION_KEY,
    CURRENT_DEFINITION_VERSION_KEY,
    CURRENT_STATUS_VERSION_KEY,
    RETRY_AFTER_MS_KEY,
    status_for,
)

HTTP_STATUS: dict[grpc.StatusCode, int] = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.OUT_OF_RANGE: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
    grpc.StatusCode.NOT_FOUND: 404,
    grpc.StatusCode.ALREADY_EXISTS: 409,
    grpc.StatusCode.ABORTED: 412,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.CANCELLED: 499,
    grpc.StatusCode.UNIMPLEMENTED: 501,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.DEADLINE_EXCEEDED: 504,
}
"""gRPC code -> HTTP status; a code not here (INTERNAL, a bug) is 500."""

_ROUTING_CODES: dict[int, grpc.StatusCode] = {
    404: grpc.StatusCode.NOT_FOUND,
    405: grpc.StatusCode.UNIMPLEMENTED,  # as grpc-gateway says it; the HTTP status stays 405
}
"""HTTP status -> gRPC code of aiohttp's own refusals; another 4xx (a body over the
size limit: 413) is INVALID_ARGUMENT, a 5xx INTERNAL."""

_DETAILS = {
    CURRENT_STATUS_VERSION_KEY: "currentStatusVersion",
    CURRENT_DEFINITION_VERSION_KEY: "currentDefinitionVersion",
    COMPACT_REVISION_KEY: "compactRevision",
    RETRY_AFTER_MS_KEY: "retryAfterMs",
}


def json_response(body: object, status: int = 200) -> web.Response:
    return web.Response(
        status=status, body=json.dumps(body, separators=(",", ":")), content_type="application/json"
    )


def error_body(error: Exception) -> tuple[int, dict[str, Any]]:
    """The HTTP status and JSON body a request that failed with error answers."""
    status = status_for(error)
    body: dict[str, Any] = {
        "code": status.code.value[0],
        "status": status.code.name,
        "message": status.details,
    }
    for key, value in status.trailers:
        body[_DETAILS[key]] = int(value)
    return HTTP_STATUS.get(status.code, 500), body


def http_error_response(error: web.HTTPException, message: str = "") -> web.Response:
    """aiohttp's own refusal of a request (no such route, a method the route does not
    take, a body over the size limit) in the JSON form of every other error, with its
    HTTP status (and Allow, which a 405 must have)."""
    fallback = grpc.StatusCode.INVALID_ARGUMENT if error.status < 500 else grpc.StatusCode.INTERNAL
    code = _ROUTING_CODES.get(error.status, fallback)
    body = {
        "code": code.value[0],
        "status": code.name,
        "message": message or error.text or error.reason,
    }
    response = json_response(body, error.status)
    if "Allow" in error.headers:
        response.headers["Allow"] = error.headers["Allow"]
    return response


def error_response(error: Exception) -> web.Response:
    http_status, body = error_body(error)
    response = json_response(body, http_status)
    if "retryAfterMs" in body:  # whole seconds, rounded up, as Retry-After takes
        response.headers["Retry-After"] = str(-(-body["retryAfterMs"] // 1000))
    if http_status == 401:
        response.headers["WWW-Authenticate"] = 'Bearer realm="task-manager"'
    return response
