"""agent_kit._json: every Any renders, decoded when its type is known, opaque otherwise."""

from __future__ import annotations

import base64

import pytest
from google.protobuf import any_pb2, duration_pb2, struct_pb2, wrappers_pb2

from agent_kit._json import parse_any, summary, to_json
from task_manager.v1 import task_manager_pb2 as pb

UNKNOWN = any_pb2.Any(type_url="type.googleapis.com/acme.v1.Waypoints", value=b"\x08\x01")
OPAQUE = {"@type": UNKNOWN.type_url, "value": base64.b64encode(UNKNOWN.value).decode()}


def packed(message: pb.Task | wrappers_pb2.StringValue | struct_pb2.Struct) -> any_pb2.Any:
    wrapped = any_pb2.Any()
    wrapped.Pack(message)
    return wrapped


def test_unknown_types_at_any_depth_are_type_and_base64_and_the_rest_decodes() -> None:
    task = pb.Task(specification=UNKNOWN)
    task.status.result.Pack(wrappers_pb2.StringValue(value="done"))
    task.attempts.add(number=1).error.error_details.CopyFrom(UNKNOWN)
    task.attempts.add(number=2)
    rendered = to_json(task)
    assert rendered["specification"] == OPAQUE
    assert rendered["attempts"] == [
        {"number": 1, "error": {"error_details": OPAQUE}},
        {"number": 2},
    ]
    assert rendered["status"]["result"]["value"] == "done"
    assert task.specification == UNKNOWN  # the caller's message is left as it was


def test_an_unknown_type_inside_a_known_one_makes_only_the_outer_any_opaque() -> None:
    inner = pb.Task(specification=UNKNOWN)
    outer = pb.Task(specification=packed(inner))
    rendered = to_json(outer)
    assert rendered["specification"]["@type"] == "type.googleapis.com/task_manager.v1.Task"
    assert "value" in rendered["specification"]


def test_summary_is_short_text_for_a_table_cell() -> None:
    struct = struct_pb2.Struct()
    struct.update({"done": 3, "of": 10})
    duration = any_pb2.Any()
    duration.Pack(duration_pb2.Duration(seconds=90))
    assert summary(packed(wrappers_pb2.StringValue(value="halfway"))) == "halfway"
    assert summary(packed(struct)) == '{"done":3,"of":10}'
    assert summary(duration) == "90s"
    assert summary(UNKNOWN) == "<acme.v1.Waypoints, 2 bytes>"
    assert summary(any_pb2.Any()) == ""
    long = summary(packed(wrappers_pb2.StringValue(value="x" * 100)))
    assert len(long) == 40
    assert long.endswith("…")


def test_parse_any_reads_json_of_a_known_type() -> None:
    parsed = parse_any("google.protobuf.Struct", '{"field": "north"}')
    struct = struct_pb2.Struct()
    assert parsed.Unpack(struct)
    assert struct["field"] == "north"


@pytest.mark.parametrize(
    ("type_name", "text", "message"),
    [
        ("acme.v1.Waypoints", "{}", "unknown message type 'acme.v1.Waypoints'"),
        ("google.protobuf.Struct", "[1, 2", "not a google.protobuf.Struct in JSON"),
        ("google.protobuf.StringValue", "3", "not a google.protobuf.StringValue in JSON"),
    ],
)
def test_parse_any_says_what_was_wrong(type_name: str, text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_any(type_name, text)
