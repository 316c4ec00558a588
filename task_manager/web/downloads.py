"""A payload's bytes as a plain HTTP download, for browsers and curl: GET /payloads/{sha256}.

The bytes as they are (application/octet-stream), where DownloadPayload over /rpc/ gives
Server-Sent Events of base64 chunks. The same service methods as gRPC's, behind the same
Gate: StatPayload for the size (Content-Length), then DownloadPayload for the bytes, each
chunk written as it comes. A single `Range: bytes=N-` resumes a cut download (206) from
DownloadPayload's offset; any other Range is ignored (RFC 9110 allows it): the whole
payload, 200. A payload never changes (its name is its digest), so its ETag is that, and
an If-None-Match that names it is answered 304 Not Modified.
"""

from __future__ import annotations

import contextlib
import logging
import re
from collections.abc import AsyncGenerator
from typing import cast

from aiohttp import web

from task_manager.errors import OutOfRange
from task_manager.service import Gate, TaskManagerService
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.web.answers import error_body
from task_manager.web.calls import RequestContext, admit, refusal

log = logging.getLogger(__name__)
PATH = "/payloads/{sha256}"
"""?task_id= (and ?scope=) name the task whose input it is: required of an agent, as in
DownloadPayloadRequest; ?access_token= for a browser's link, as the other GET routes."""
_RANGE = re.compile(r"bytes=(\d+)-")
HEADERS = {
    "Accept-Ranges": "bytes",
    # Bytes anyone may have uploaded, served from the console's origin: a browser must
    # save them, never render them as a page that could script the console.
    "Content-Disposition": "attachment",
    "X-Content-Type-Options": "nosniff",
    "Cache-Control": "private",  # a link may carry its token: no shared cache keeps it
}


class PayloadRoutes:
    def __init__(self, service: TaskManagerService, gate: Gate) -> None:
        self._service = service
        self._gate = gate

    def add_to(self, router: web.UrlDispatcher) -> None:
        router.add_get(PATH, self.download)  # and HEAD: the headers alone

    async def download(self, request: web.Request) -> web.StreamResponse:
        response: web.StreamResponse | None = None
        try:
            caller = admit(self._gate, request, "DownloadPayload")
            sha256 = request.match_info["sha256"]
            task_id, scope = request.query.get("task_id", ""), request.query.get("scope", "")
            context = RequestContext(request)
            stat = pb.StatPayloadRequest(sha256=sha256, task_id=task_id, scope=scope)
            size = (await self._service.StatPayload(stat, context, caller)).payload.size
            etag = f'"{sha256}"'
            if _held_already(request, etag):  # after the checks: a 304 says it exists
                return web.Response(status=304, headers={**HEADERS, "ETag": etag})
            offset = _range_start(request, etag)
            if offset is not None and offset >= size:
                return _unsatisfiable(request, offset, size)
            response = web.StreamResponse(
                status=200 if offset is None else 206,
                headers={**HEADERS, "Content-Type": "application/octet-stream", "ETag": etag},
            )
            response.content_length = size - (offset or 0)
            if offset is not None:
                response.headers["Content-Range"] = f"bytes {offset}-{size - 1}/{size}"
            if request.method == "HEAD":
                return response
            download = pb.DownloadPayloadRequest(
                sha256=sha256, offset=offset or 0, task_id=task_id, scope=scope
            )
            # An async generator (typed as an iterator), closed at once if the client goes.
            chunks = cast(
                AsyncGenerator[pb.DownloadPayloadResponse, None],
                self._service.DownloadPayload(download, context, caller),
            )
            with self._gate.stream_of(caller):
                async with contextlib.aclosing(chunks):
                    async for chunk in chunks:
                        # Opened at the first chunk: a refusal before it is still JSON.
                        if not response.prepared:
                            await response.prepare(request)
                        await response.write(chunk.chunk)  # waits while the client lags
        except Exception as failed:
            return _failed(request, response, failed)
        return response


def _held_already(request: web.Request, etag: str) -> bool:
    """Whether If-None-Match names etag (or is *): the client's copy is these bytes, as
    a payload's bytes never change under its digest. Weak tags compare as strong ones."""
    tags = request.headers.get("If-None-Match", "")
    return any(tag.strip().removeprefix("W/") in (etag, "*") for tag in tags.split(","))


def _range_start(request: web.Request, etag: str) -> int | None:
    """Where a `Range: bytes=N-` asks the bytes to start (None: no such Range, or an
    If-Range of another version, which asks for the whole payload)."""
    matched = _RANGE.fullmatch(request.headers.get("Range", "").strip())
    if matched is None or request.headers.get("If-Range", etag) != etag:
        return None
    return int(matched[1])


def _unsatisfiable(request: web.Request, offset: int, size: int) -> web.Response:
    """416, with the error table's JSON (OUT_OF_RANGE) and the size a client resumes by."""
    refused = refusal(
        request, OutOfRange(f"Range starts at {offset}: the payload has {size} bytes")
    )
    refused.set_status(416)
    refused.headers["Content-Range"] = f"bytes */{size}"
    return refused


def _failed(
    request: web.Request, response: web.StreamResponse | None, error: Exception
) -> web.StreamResponse:
    """The answer to a download that failed with error: the JSON error if no byte was
    sent, else the connection cut, so the client sees fewer bytes than Content-Length
    said (and may resume with a Range)."""
    if response is None or not response.prepared:
        return refusal(request, error)
    if not isinstance(error, ConnectionResetError):  # not the client going away
        _, body = error_body(error)
        log.warning("download of %s cut: %s: %s", request.path, body["status"], body["message"])
    if request.transport is not None:
        request.transport.close()
    return response
