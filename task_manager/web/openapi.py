"""The OpenAPI 3.1 document of the HTTP surface, made from the same descriptors the
routes decode with, so it cannot drift from them: GET /openapi.json."""

from __future__ import annotations

from typing import Any

from google.protobuf.descriptor import FieldDescriptor

from task_manager import __version__
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.web import downloads, lattice, rpc

_SCALARS: dict[int, dict[str, Any]] = {
    FieldDescriptor.TYPE_BOOL: {"type": "boolean"},
    FieldDescriptor.TYPE_STRING: {"type": "string"},
    FieldDescriptor.TYPE_BYTES: {"type": "string", "contentEncoding": "base64"},
    FieldDescriptor.TYPE_DOUBLE: {"type": "number"},
    FieldDescriptor.TYPE_FLOAT: {"type": "number"},
    FieldDescriptor.TYPE_INT32: {"type": "integer"},
    FieldDescriptor.TYPE_UINT32: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_SINT32: {"type": "integer"},
    FieldDescriptor.TYPE_FIXED32: {"type": "integer", "minimum": 0},
    FieldDescriptor.TYPE_SFIXED32: {"type": "integer"},
    # 64-bit integers are strings in the JSON mapping (numbers are accepted too).
    FieldDescriptor.TYPE_INT64: {"type": ["string", "integer"]},
    FieldDescriptor.TYPE_UINT64: {"type": ["string", "integer"]},
    FieldDescriptor.TYPE_SINT64: {"type": ["string", "integer"]},
    FieldDescriptor.TYPE_FIXED64: {"type": ["string", "integer"]},
    FieldDescriptor.TYPE_SFIXED64: {"type": ["string", "integer"]},
}
_WELL_KNOWN: dict[str, dict[str, Any]] = {
    "google.protobuf.Timestamp": {"type": "string", "format": "date-time"},
    "google.protobuf.Duration": {"type": "string", "pattern": "^-?[0-9]+(\\.[0-9]+)?s$"},
    "google.protobuf.Any": {
        "type": "object",
        "description": "'@type', and the message's fields beside it; a type this gateway"
        " does not know: '@type' and '@bytes' (the message, base64)",
        "properties": {"@type": {"type": "string"}, "@bytes": {"type": "string"}},
        "required": ["@type"],
    },
    "google.protobuf.Struct": {"type": "object"},
    "google.protobuf.Value": {},
}
_ERROR = {
    "description": "refused: the gRPC status, as JSON",
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "properties": {
                    "code": {"type": "integer"},
                    "status": {"type": "string"},
                    "message": {"type": "string"},
                    "currentStatusVersion": {"type": "integer"},
                    "retryAfterMs": {"type": "integer"},
                },
            }
        }
    },
}
_SSE = {"text/event-stream": {"schema": {"type": "string"}}}


def document() -> dict[str, Any]:
    """The whole document: this gateway's own methods under /rpc/, then the Lattice SDK's."""
    schemas: dict[str, Any] = {}
    paths: dict[str, Any] = {}
    for method in rpc.SERVICE.methods:
        if method.client_streaming:
            continue
        body = _ref(method.input_type, schemas)
        answer = (
            {
                "description": "a stream of the response message, as Server-Sent Events",
                "content": _SSE,
            }
            if method.server_streaming
            else {
                "description": "the response",
                "content": _json(_ref(method.output_type, schemas)),
            }
        )
        paths[rpc.PREFIX + method.name] = {
            "post": {
                "operationId": method.name,
                "requestBody": {"content": _json(body)},
                "responses": {"200": answer, "default": _ERROR},
            }
        }
    task = _ref(pb.Task.DESCRIPTOR, schemas)
    for path, verb, operation, request in (
        ("tasks", "post", "createTask", _ref(pb.CreateTaskRequest.DESCRIPTOR, schemas)),
        ("tasks/{taskId}", "get", "getTask", None),
        ("tasks/{taskId}/status", "put", "updateTaskStatus", _status_body(schemas)),
        ("tasks/{taskId}/cancel", "put", "cancelTask", {"type": "object"}),
        ("tasks/query", "post", "queryTasks", {"type": "object"}),
        ("tasks/stream", "post", "streamTasks", {"type": "object"}),
        ("agent/listen", "post", "listenAsAgent", {"type": "object"}),
        ("agent/stream", "post", "streamAsAgent", {"type": "object"}),
    ):
        streamed = path.endswith("stream")
        operation_doc: dict[str, Any] = {
            "operationId": operation,
            "tags": ["Lattice"],
            "responses": {
                "200": {
                    "description": "as the Lattice SDK parses it",
                    "content": _SSE if streamed else _json(task),
                },
                "default": _ERROR,
            },
        }
        if "{taskId}" in path:
            operation_doc["parameters"] = [
                {"name": "taskId", "in": "path", "required": True, "schema": {"type": "string"}}
            ]
        if request is not None:
            operation_doc["requestBody"] = {"content": _json(request)}
        paths.setdefault(lattice.API + path, {})[verb] = operation_doc
    paths[downloads.PATH] = {"get": _download()}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Task Manager", "version": __version__},
        "paths": paths,
        "components": {
            "schemas": schemas,
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
    }


def _download() -> dict[str, Any]:
    def query(name: str, description: str) -> dict[str, Any]:
        schema = {"type": "string"}
        return {"name": name, "in": "query", "description": description, "schema": schema}

    octets = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
    return {
        "operationId": "downloadPayloadBytes",
        "summary": "a payload's bytes as they are (DownloadPayload, for browsers and curl)",
        "parameters": [
            {
                "name": "sha256",
                "in": "path",
                "required": True,
                "schema": {"type": "string", "pattern": "^[0-9a-f]{64}$"},
            },
            query("task_id", "the task whose input it is: required of an agent"),
            query("scope", "the task's scope, as in DownloadPayloadRequest"),
            query("access_token", "the bearer token, for a link (no Authorization header)"),
            {
                "name": "Range",
                "in": "header",
                "description": "bytes=N- resumes from byte N; any other Range is ignored",
                "schema": {"type": "string"},
            },
        ],
        "responses": {
            "200": {"description": "the bytes; ETag: the sha256", "content": octets},
            "206": {"description": "the bytes from the Range's start", "content": octets},
            "416": {**_ERROR, "description": "the Range starts at or past the end"},
            "default": _ERROR,
        },
    }


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"application/json": {"schema": schema}}


def _status_body(schemas: dict[str, Any]) -> dict[str, Any]:
    return {
        "type": "object",
        "properties": {
            "statusVersion": {"type": "integer"},
            "newStatus": _ref(pb.TaskStatus.DESCRIPTOR, schemas),
            "author": _ref(pb.Principal.DESCRIPTOR, schemas),
        },
    }


def _ref(descriptor: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    """A reference to the message's schema, adding it (and those it uses) to schemas."""
    name = descriptor.full_name
    if name in _WELL_KNOWN:
        return _WELL_KNOWN[name]
    if name not in schemas:
        schemas[name] = {}  # placed first: a message may contain itself
        schemas[name] = {
            "type": "object",
            "properties": {field.json_name: _field(field, schemas) for field in descriptor.fields},
        }
    return {"$ref": f"#/components/schemas/{name}"}


def _field(field: Any, schemas: dict[str, Any]) -> dict[str, Any]:
    if field.type == FieldDescriptor.TYPE_MESSAGE:
        if field.message_type.GetOptions().map_entry:
            value = field.message_type.fields_by_name["value"]
            return {"type": "object", "additionalProperties": _field(value, schemas)}
        one = _ref(field.message_type, schemas)
    elif field.type == FieldDescriptor.TYPE_ENUM:
        one = {"type": "string", "enum": [value.name for value in field.enum_type.values]}
    else:
        one = _SCALARS[field.type]
    return {"type": "array", "items": one} if field.is_repeated else one
