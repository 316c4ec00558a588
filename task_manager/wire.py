"""Messages that carry a task, put together around the task's stored encoding.

The store serialises a task once per change. Every answer, agent request and watch
event that carries that task embeds those bytes instead of serialising the task again:
an embedded message is its field's key, its length and its bytes, and protobuf parsers
accept a message's fields in any order.
"""

from __future__ import annotations

from google.protobuf.message import Message

from task_manager.v1.task_manager_pb2 import (
    CancelTaskResponse,
    CompleteTaskResponse,
    CreateTaskResponse,
    ExecuteRequest,
    ListenAsAgentResponse,
    StatusReportResult,
    TaskEvent,
    UpdateStatusResponse,
    UpdateTaskResponse,
    UploadPayloadRequest,
    WatchTasksResponse,
)

_LENGTH_DELIMITED = 2
"""The wire type of an embedded message."""


def varint(value: int) -> bytes:
    """value (>= 0) as a protobuf base-128 varint."""
    out = bytearray()
    while value > 0x7F:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


class Embedded:
    """The encoding of a message whose field `name` holds an already-encoded message."""

    __slots__ = ("_key",)

    def __init__(self, message_type: type[Message], name: str) -> None:
        number = message_type.DESCRIPTOR.fields_by_name[name].number
        self._key = varint(number << 3 | _LENGTH_DELIMITED)

    def encode(self, encoded_field: bytes, rest: Message | None = None) -> bytes:
        """rest's encoding (rest must leave the field unset) plus the field."""
        head = b"" if rest is None else rest.SerializeToString()
        return head + self._key + varint(len(encoded_field)) + encoded_field


CREATE_TASK_RESPONSE = Embedded(CreateTaskResponse, "task")
UPDATE_TASK_RESPONSE = Embedded(UpdateTaskResponse, "task")
UPDATE_STATUS_RESPONSE = Embedded(UpdateStatusResponse, "task")
CANCEL_TASK_RESPONSE = Embedded(CancelTaskResponse, "task")
COMPLETE_TASK_RESPONSE = Embedded(CompleteTaskResponse, "task")
STATUS_REPORT_RESULT = Embedded(StatusReportResult, "task")
TASK_EVENT = Embedded(TaskEvent, "task")
WATCH_EVENT = Embedded(WatchTasksResponse, "event")
EXECUTE_REQUEST = Embedded(ExecuteRequest, "task")
LISTEN_EXECUTE = Embedded(ListenAsAgentResponse, "execute_request")


_UPLOAD_CHUNK_KEY = UploadPayloadRequest.DESCRIPTOR.fields_by_name["chunk"].number << 3 | (
    _LENGTH_DELIMITED
)


def upload_part(data: bytes) -> UploadPayloadRequest | memoryview:
    """An UploadPayloadRequest that is a chunk and nothing else, as a view of its bytes;
    any other, parsed.

    Parsing would copy the chunk into the message, and each read of the field copies it
    again: a fifth of an upload's time on the event loop. A chunk-only message is the
    field's key, its length and the bytes to its end, so the view is exact.
    """
    if data[:1] == bytes((_UPLOAD_CHUNK_KEY,)):
        length, start = 0, 1
        for shift in range(0, 35, 7):  # a length below 2**35: more than a message holds
            if start == len(data):
                break
            byte = data[start]
            start += 1
            length |= (byte & 0x7F) << shift
            if byte < 0x80:
                if start + length == len(data):
                    return memoryview(data)[start:]
                break
    return UploadPayloadRequest.FromString(data)
