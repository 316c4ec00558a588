"""The HTTP front's JSON mapping: an Any of a type the gateway does not know travels as
its bytes, at any depth, both ways; nothing a client sent is dropped or altered."""

from __future__ import annotations

import base64

import pytest
from google.protobuf import struct_pb2, wrappers_pb2

from task_manager.errors import InvalidArgument
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.web.protojson import BYTES_KEY, from_json, to_json

SURVEY = "type.googleapis.com/acme.drones.v1.Survey"


def a_task() -> pb.Task:
    task = pb.Task(display_name="t")
    task.version.task_id = "t-1"
    task.specification.type_url, task.specification.value = SURVEY, b"\x0a\x03abc"
    task.status.progress.Pack(struct_pb2.Struct(fields={"leg": struct_pb2.Value(number_value=3)}))
    task.status.result.Pack(wrappers_pb2.StringValue(value="ok"))
    for number in (1, 2):
        attempt = task.attempts.add(number=number)
        attempt.error.message = f"try {number}"
        attempt.error.error_details.type_url = SURVEY
        attempt.error.error_details.value = bytes([number])
    return task


def test_unknown_anys_round_trip_at_any_depth() -> None:
    task = a_task()
    rendered = to_json(task)
    assert rendered["specification"] == {"@type": SURVEY, BYTES_KEY: "CgNhYmM="}
    assert rendered["status"]["progress"]["value"] == {"leg": 3.0}  # a known type: readable
    details = [attempt["error"]["errorDetails"] for attempt in rendered["attempts"]]
    assert details == [{"@type": SURVEY, BYTES_KEY: "AQ=="}, {"@type": SURVEY, BYTES_KEY: "Ag=="}]
    assert from_json(rendered, pb.Task, "task") == task


def test_a_known_type_whose_bytes_do_not_decode_is_shown_as_bytes() -> None:
    task = pb.Task()
    task.status.result.type_url = "type.googleapis.com/google.protobuf.StringValue"
    task.status.result.value = b"\xff\xff\xff"  # not a StringValue
    rendered = to_json(task)
    assert base64.b64decode(rendered["status"]["result"][BYTES_KEY]) == b"\xff\xff\xff"
    assert from_json(rendered, pb.Task, "task") == task


def test_bytes_anys_in_a_repeated_message_are_kept() -> None:
    body = {
        "sessions": [
            {
                "tasks": [
                    {"displayName": "a"},
                    {"specification": {"@type": SURVEY, BYTES_KEY: "AQ=="}},
                ]
            }
        ]
    }
    request = from_json(body, pb.SubmitSessionsRequest, "body")
    second = request.sessions[0].tasks[1]
    assert (second.specification.type_url, second.specification.value) == (SURVEY, b"\x01")
    assert request.sessions[0].tasks[0].display_name == "a"


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"status": {"status": "STATUS_SIDEWAYS"}}, "STATUS_SIDEWAYS"),
        ({"specification": {"@type": SURVEY, "area": 1}}, "does not know"),
        ({"specification": {"@type": SURVEY, BYTES_KEY: "%%"}}, "base64"),
        ({"attempts": [{"error": {"errorDetails": {"@type": SURVEY, "x": 1}}}]}, "attempts[0]"),
        ({"attempt": "many"}, "attempt"),
    ],
)
def test_what_cannot_be_mapped_is_refused_naming_it(body: dict[str, object], named: str) -> None:
    with pytest.raises(InvalidArgument) as refused:
        from_json(body, pb.Task, "task")
    assert named in str(refused.value)
