"""A task is serialised once per change: the store's bytes are embedded, never re-encoded.

The embedded encodings must parse to exactly the message that setting the field would
give, and every message that carries a changed task must be built from the bytes the
store wrote (checked by handing over bytes of a *different* task: a message that
re-serialised the task would not carry them).
"""

from __future__ import annotations

import pytest
from google.protobuf.any_pb2 import Any as AnyMessage
from hypothesis import given
from hypothesis import strategies as st

from storage import open_store
from storage.base import Change, WriteTransaction
from task_manager import lifecycle, wire
from task_manager.clock import SystemClock, timestamp
from task_manager.config import Settings
from task_manager.dispatch import agent_request
from task_manager.v1 import task_manager_pb2 as pb
from task_manager.watch import Announced

pytestmark = pytest.mark.anyio


def test_varint_matches_protobuf() -> None:
    assert wire.varint(0) == b"\x00"
    for value in (1, 127, 128, 300, 16_383, 16_384, 2**21, 2**64 - 1):
        # A uint64 field 1 is its key (0x08) followed by the value as a varint.
        assert wire.varint(value) == pb.StatusReportResult(report_id=value).SerializeToString()[1:]


def a_task(display_name: str, spec_size: int, status: pb.Status.ValueType) -> pb.Task:
    task = pb.Task(
        version=pb.TaskVersion(task_id="t-1", definition_version=2, status_version=5),
        display_name=display_name,
        status=pb.TaskStatus(status=status),
        last_update_time=timestamp(1_700_000_000_123_456_789),
    )
    if spec_size:
        task.specification.CopyFrom(AnyMessage(type_url="x/y", value=b"s" * spec_size))
    return task


tasks = st.builds(
    a_task,
    display_name=st.text(max_size=40),
    # Up to 70 KB: lengths whose varint takes one, two and three bytes.
    spec_size=st.sampled_from([0, 1, 100, 200, 20_000, 70_000]),
    status=st.sampled_from([pb.STATUS_SENT, pb.STATUS_EXECUTING, pb.STATUS_DONE_OK]),
)


@given(task=tasks, report_id=st.integers(min_value=0, max_value=2**64 - 1))
def test_embedded_parses_as_if_the_field_were_set(task: pb.Task, report_id: int) -> None:
    encoded_task = task.SerializeToString()

    answer = pb.UpdateStatusResponse.FromString(wire.UPDATE_STATUS_RESPONSE.encode(encoded_task))
    assert answer == pb.UpdateStatusResponse(task=task)

    rest = pb.StatusReportResult(report_id=report_id)
    result = pb.StatusReportResult.FromString(wire.STATUS_REPORT_RESULT.encode(encoded_task, rest))
    assert result == pb.StatusReportResult(report_id=report_id, task=task)

    request = pb.ListenAsAgentResponse.FromString(
        wire.LISTEN_EXECUTE.encode(wire.EXECUTE_REQUEST.encode(encoded_task))
    )
    assert request == pb.ListenAsAgentResponse(execute_request=pb.ExecuteRequest(task=task))


def test_every_answer_embeds_its_task() -> None:
    task = a_task("answer", 10, pb.STATUS_SENT)
    encoded = task.SerializeToString()
    assert pb.CreateTaskResponse.FromString(wire.CREATE_TASK_RESPONSE.encode(encoded)).task == task
    assert pb.UpdateTaskResponse.FromString(wire.UPDATE_TASK_RESPONSE.encode(encoded)).task == task
    assert pb.CancelTaskResponse.FromString(wire.CANCEL_TASK_RESPONSE.encode(encoded)).task == task
    completed = pb.CompleteTaskResponse.FromString(wire.COMPLETE_TASK_RESPONSE.encode(encoded))
    assert completed.task == task


def test_an_execute_request_carries_the_stored_bytes() -> None:
    sent = a_task("as held in memory", 0, pb.STATUS_SENT)
    stored = a_task("as stored", 0, pb.STATUS_SENT)
    request = agent_request(sent, stored.SerializeToString())
    assert request is not None
    assert pb.ListenAsAgentResponse.FromString(request).execute_request.task == stored


def test_a_cancel_request_carries_no_task() -> None:
    task = a_task("cancel me", 0, pb.STATUS_CANCEL_REQUESTED)
    request = agent_request(task, b"not read")
    assert request is not None
    cancel = pb.ListenAsAgentResponse.FromString(request).cancel_request
    assert cancel.task_id == "t-1"
    assert agent_request(a_task("running", 0, pb.STATUS_EXECUTING), b"not read") is None


def test_a_watch_event_carries_the_stored_bytes() -> None:
    held = a_task("as held in memory", 0, pb.STATUS_EXECUTING)
    stored = a_task("as stored", 0, pb.STATUS_EXECUTING)
    entry = pb.TaskHistoryEntry(revision=7, task_id="t-1", status_version=5)
    entry.time.CopyFrom(held.last_update_time)
    event = pb.WatchTasksResponse.FromString(
        Announced(Change(entry, held, stored.SerializeToString())).encoded
    )
    assert event.revision == 7
    assert event.event.event_type == pb.EVENT_TYPE_UPDATE
    assert event.event.task_view == pb.TASK_VIEW_MANAGER
    assert event.event.time == held.last_update_time
    assert event.event.task == stored


async def test_the_store_hands_out_the_bytes_it_wrote(database: str) -> None:
    published: list[Change] = []
    store = await open_store(database)
    store.feed.subscribe(published.extend)
    try:
        request = pb.CreateTaskRequest(
            display_name="once",
            relations=pb.Relations(assignee=pb.Principal(system=pb.System(entity_id="a-1"))),
        )

        def create(tx: WriteTransaction) -> tuple[pb.Task, bytes, bytes]:
            task = lifecycle.create_task(
                tx, request, "once-1", Settings().task_policy(), SystemClock().now_ns()
            ).task
            loaded = tx.load("once-1")
            assert loaded is not None
            return task, tx.encoded(task), tx.encoded(loaded.task)

        task, encoded, reloaded = await store.write(create)
        # CREATED, then SENT: the answer is the bytes of the last change, not a copy.
        assert [change.task.status.status for change in published] == [
            pb.STATUS_CREATED,
            pb.STATUS_SENT,
        ]
        assert encoded is published[-1].encoded_task
        assert pb.Task.FromString(encoded) == task
        # A task the transaction did not store is serialised on demand.
        assert reloaded is not encoded
        assert pb.Task.FromString(reloaded) == task

        backlog = await store.agent_backlog({"a-1"}, {pb.STATUS_SENT})
        assert backlog.tasks == [(task, encoded)]
    finally:
        await store.close()


def _parsed_or_error(data: bytes) -> pb.UploadPayloadRequest | str:
    try:
        return pb.UploadPayloadRequest.FromString(data)
    except Exception as exc:  # whatever protobuf raises, upload_part must raise too
        return type(exc).__name__


def _check_upload_part(data: bytes) -> None:
    expected = _parsed_or_error(data)
    try:
        got: pb.UploadPayloadRequest | memoryview | str = wire.upload_part(data)
    except Exception as exc:
        got = type(exc).__name__
    if isinstance(got, memoryview):
        # A view only of a message that is a chunk and nothing else, and of all of it.
        assert isinstance(expected, pb.UploadPayloadRequest)
        assert expected.WhichOneof("part") == "chunk"
        assert bytes(got) == expected.chunk
        assert pb.UploadPayloadRequest(chunk=bytes(got)).SerializeToString() == data
    else:
        assert got == expected


@given(st.binary(max_size=300))
def test_upload_part_reads_a_chunk_as_protobuf_would(chunk: bytes) -> None:
    data = pb.UploadPayloadRequest(chunk=chunk).SerializeToString()
    view = wire.upload_part(data)
    assert isinstance(view, memoryview) and bytes(view) == chunk
    _check_upload_part(data)


@given(st.binary(max_size=64))
def test_upload_part_parses_anything_else_as_protobuf_would(data: bytes) -> None:
    _check_upload_part(data)
    _check_upload_part(b"\x12" + data)  # a chunk's key, then whatever


@pytest.mark.parametrize(
    "message",
    [
        pb.UploadPayloadRequest(),
        pb.UploadPayloadRequest(header=pb.PayloadRef(sha256="ab" * 32, size=5)),
        pb.UploadPayloadRequest(chunk=b"x" * 70_000),  # a two-byte length
    ],
)
def test_upload_part_of_every_kind_of_part(message: pb.UploadPayloadRequest) -> None:
    data = message.SerializeToString()
    _check_upload_part(data)
    # Two chunk fields (the last wins) or a chunk with more after it: parsed, not viewed.
    _check_upload_part(data + pb.UploadPayloadRequest(chunk=b"late").SerializeToString())
    _check_upload_part(pb.UploadPayloadRequest(chunk=b"first").SerializeToString() + data)
