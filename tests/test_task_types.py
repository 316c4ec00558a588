"""Task types: registered, versioned kinds of task whose specification the server
decodes from the descriptors it was given and checks field by field."""

from __future__ import annotations

import math
from typing import Any

import anyio
import grpc
import pytest
from google.protobuf import any_pb2, descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.duration_pb2 import Duration
from google.protobuf.message import Message
from google.protobuf.wrappers_pb2 import StringValue

from agent_kit import Agent, OperatorClient, TaskContext, TaskPolicy
from task_manager.server import TaskManagerServer
from task_manager.v1 import task_manager_pb2 as pb
from tests.helpers import AsyncStub, create_request, running

pytestmark = pytest.mark.anyio
F = descriptor_pb2.FieldDescriptorProto
LEG = "survey.v1.SurveyLeg"


def survey_file() -> descriptor_pb2.FileDescriptorProto:
    """A message the server was never compiled with: survey.v1.SurveyLeg."""
    file = descriptor_pb2.FileDescriptorProto(
        name="survey/v1/leg.proto",
        package="survey.v1",
        syntax="proto3",
        dependency=["google/protobuf/duration.proto"],  # a well-known type, not given
    )
    area = file.message_type.add(name="Area")
    area.field.add(name="radius_m", number=1, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    leg = file.message_type.add(name="SurveyLeg")
    leg.field.add(name="site", number=1, type=F.TYPE_STRING, label=F.LABEL_OPTIONAL)
    leg.field.add(name="altitude_m", number=2, type=F.TYPE_DOUBLE, label=F.LABEL_OPTIONAL)
    leg.field.add(
        name="area",
        number=3,
        type=F.TYPE_MESSAGE,
        type_name=".survey.v1.Area",
        label=F.LABEL_OPTIONAL,
    )
    leg.field.add(name="tags", number=4, type=F.TYPE_STRING, label=F.LABEL_REPEATED)
    leg.field.add(
        name="dwell",
        number=5,
        type=F.TYPE_MESSAGE,
        type_name=".google.protobuf.Duration",
        label=F.LABEL_OPTIONAL,
    )
    return file


def _renamed_site(name: str) -> descriptor_pb2.FileDescriptorProto:
    file = survey_file()
    file.message_type[1].field[0].name = name
    return file


def leg_class() -> type[Message]:
    pool = descriptor_pool.DescriptorPool()
    pool.Add(_descriptor_file("google/protobuf/duration.proto"))
    pool.Add(survey_file())
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(LEG))


def _descriptor_file(name: str) -> descriptor_pb2.FileDescriptorProto:
    file = descriptor_pb2.FileDescriptorProto()
    descriptor_pool.Default().FindFileByName(name).CopyToProto(file)
    return file


LEG_CLASS = leg_class()


def leg(**fields: Any) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(LEG_CLASS(**fields))
    return packed


def constraint(path: str, **fields: Any) -> pb.FieldConstraint:
    return pb.FieldConstraint(path=path, **fields)


def survey_type(version: int = 1, **fields: Any) -> pb.TaskType:
    task_type = pb.TaskType(
        name="survey",
        version=version,
        description="fly a survey leg",
        message_type=LEG,
        descriptors=descriptor_pb2.FileDescriptorSet(file=[survey_file()]),
        constraints=[
            constraint("site", required=True, pattern=r"[a-z][a-z-]*"),
            constraint("altitude_m", minimum=20, maximum=500),
            constraint("area.radius_m", required=True, maximum=2000),
            constraint("tags", pattern=r"[a-z]+"),
        ],
        default_policy=pb.TaskPolicy(max_attempts=3, receipt_timeout=Duration(seconds=30)),
    )
    changed(task_type, fields)
    return task_type


def changed(task_type: pb.TaskType, fields: dict[str, Any]) -> None:
    for name, value in fields.items():
        if name == "constraints":
            del task_type.constraints[:]
            task_type.constraints.extend(value)
        elif isinstance(value, Message):
            getattr(task_type, name).CopyFrom(value)
        else:
            setattr(task_type, name, value)


async def register(stub: AsyncStub, task_type: pb.TaskType) -> pb.RegisterTaskTypeResponse:
    return await stub.RegisterTaskType(pb.RegisterTaskTypeRequest(task_type=task_type))


def typed(
    specification: any_pb2.Any | None, version: int = 0, **fields: Any
) -> pb.CreateTaskRequest:
    request = create_request(task_type=pb.TaskTypeRef(name="survey", version=version), **fields)
    if specification is not None:
        request.specification.CopyFrom(specification)
    return request


GOOD = {"site": "north-ridge", "altitude_m": 120.0, "area": {"radius_m": 500.0}, "tags": ["dawn"]}


async def refusal(call: object) -> tuple[grpc.StatusCode, str]:
    try:
        await call  # type: ignore[misc]
    except grpc.aio.AioRpcError as error:
        return error.code(), error.details() or ""
    raise AssertionError("the call was accepted")


async def test_a_type_is_registered_once_per_version_and_listed(stub: AsyncStub) -> None:
    first = await register(stub, survey_type())
    assert not first.already_existed and first.task_type.HasField("create_time")
    again = await register(stub, survey_type())
    assert again.already_existed and again.task_type == first.task_type
    code, message = await refusal(register(stub, survey_type(description="other")))
    assert code == grpc.StatusCode.ALREADY_EXISTS and "survey v1" in message
    await register(stub, survey_type(version=2, description="v2"))
    listed = await stub.ListTaskTypes(pb.ListTaskTypesRequest())
    assert [(t.name, t.version) for t in listed.task_types] == [("survey", 1), ("survey", 2)]
    latest = await stub.GetTaskType(pb.GetTaskTypeRequest(name="survey"))
    assert latest.task_type.description == "v2"
    code, _ = await refusal(stub.GetTaskType(pb.GetTaskTypeRequest(name="survey", version=9)))
    assert code == grpc.StatusCode.NOT_FOUND


async def test_a_typed_task_pins_its_version_and_takes_the_types_policy(stub: AsyncStub) -> None:
    await register(stub, survey_type())
    own_policy = pb.TaskPolicy(execution_timeout=Duration(seconds=600))
    task = (await stub.CreateTask(typed(leg(**GOOD), policy=own_policy))).task
    assert (task.task_type.name, task.task_type.version) == ("survey", 1)
    assert task.policy.max_attempts == 3  # the type's
    assert task.policy.receipt_timeout.seconds == 30  # the type's
    assert task.policy.execution_timeout.seconds == 600  # the request's own
    # A retry is the same request: the same answer.
    first = await stub.CreateTask(typed(leg(**GOOD), task_id="typed-0001"))
    again = await stub.CreateTask(typed(leg(**GOOD), task_id="typed-0001"))
    assert again.already_existed and again.task.version == first.task.version


@pytest.mark.parametrize(
    ("specification", "field", "says"),
    [
        (None, "specification", "is required: task type survey v1 takes a survey.v1.SurveyLeg"),
        ({"altitude_m": 100.0, "area": {"radius_m": 1.0}}, "specification.site", "is required"),
        ({**GOOD, "site": "North Ridge"}, "specification.site", "does not match"),
        ({**GOOD, "altitude_m": 12000.0}, "specification.altitude_m", "above the maximum 500"),
        ({**GOOD, "altitude_m": 5.0}, "specification.altitude_m", "below the minimum 20"),
        ({"site": "ridge"}, "specification.area.radius_m", "is required"),
        ({**GOOD, "area": {"radius_m": 9000.0}}, "specification.area.radius_m", "above the max"),
        ({**GOOD, "tags": ["dawn", "Dusk"]}, "specification.tags[1]", "does not match"),
        ("wrong type", "specification", "is a google.protobuf.Duration, but task type survey v1"),
        ("undecodable", "specification", "does not decode as a survey.v1.SurveyLeg"),
    ],
    ids=[
        "missing",
        "required",
        "pattern",
        "above",
        "below",
        "nested required",
        "nested range",
        "repeated",
        "other message",
        "undecodable",
    ],
)
async def test_a_specification_that_breaks_its_type_is_invalid_and_stores_nothing(
    stub: AsyncStub, specification: object, field: str, says: str
) -> None:
    await register(stub, survey_type())
    packed: any_pb2.Any | None
    if specification is None:
        packed = None
    elif specification == "wrong type":
        packed = any_pb2.Any()
        packed.Pack(Duration(seconds=1))
    elif specification == "undecodable":
        packed = any_pb2.Any(type_url=f"type.googleapis.com/{LEG}", value=b"\xff\xff\xff")
    else:
        assert isinstance(specification, dict)
        packed = leg(**specification)
    code, message = await refusal(stub.CreateTask(typed(packed)))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"{field}: ") and says in message, message
    # Also inside a session, by the task's path.
    session = pb.SessionSubmission(tasks=[typed(leg(**GOOD)), typed(packed)])
    code, message = await refusal(stub.SubmitSessions(pb.SubmitSessionsRequest(sessions=[session])))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"sessions[0].tasks[1].{field}: "), message
    assert not (await stub.QueryTasks(pb.QueryTasksRequest())).tasks


async def test_an_unknown_type_or_version_is_not_found(stub: AsyncStub) -> None:
    code, message = await refusal(stub.CreateTask(typed(leg(**GOOD))))
    assert code == grpc.StatusCode.NOT_FOUND and "task type survey is not registered" in message
    await register(stub, survey_type())
    code, message = await refusal(stub.CreateTask(typed(leg(**GOOD), version=2)))
    assert code == grpc.StatusCode.NOT_FOUND and "survey v2" in message
    assert not (await stub.QueryTasks(pb.QueryTasksRequest())).tasks


async def test_a_new_version_never_breaks_tasks_of_older_ones(stub: AsyncStub) -> None:
    await register(stub, survey_type())
    old = (await stub.CreateTask(typed(leg(**GOOD)))).task
    stricter = [constraint("altitude_m", minimum=200, maximum=500)]
    await register(stub, survey_type(version=2, constraints=stricter))
    # The latest is stricter; version 1 is still there to create against, unchanged.
    code, _ = await refusal(stub.CreateTask(typed(leg(**GOOD))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    pinned = (await stub.CreateTask(typed(leg(**GOOD), version=1))).task
    assert pinned.task_type.version == 1
    kept = (await stub.GetTask(pb.GetTaskRequest(task_id=old.version.task_id))).task
    assert kept.task_type.version == 1 and kept.status.status == pb.STATUS_SENT


C0 = "task_type.constraints[0]"
BAD_TYPES: dict[str, tuple[dict[str, Any], str, str]] = {
    "name": ({"name": "no spaces"}, "task_type.name", "is not a task type name: use 1 to 63"),
    "version": ({"version": 0}, "task_type.version", "is required"),
    "message": ({"message_type": "survey.v1.Missing"}, "task_type.message_type", "is not a"),
    "path": ({"constraints": [constraint("height")]}, f"{C0}.path", "no field"),
    "through": (
        {"constraints": [constraint("site.x", required=True)]},
        f"{C0}.path",
        "not a singular message",
    ),
    "min": ({"constraints": [constraint("site", minimum=1)]}, f"{C0}.minimum", "not a number"),
    "pattern": (
        {"constraints": [constraint("altitude_m", pattern="x")]},
        f"{C0}.pattern",
        "not a string",
    ),
    "regex": (
        {"constraints": [constraint("site", pattern="(")]},
        f"{C0}.pattern",
        "not an RE2 regular expression: missing )",
    ),
    "bounds": (
        {"constraints": [constraint("altitude_m", minimum=5, maximum=1)]},
        f"{C0}.maximum",
        "below the minimum",
    ),
    "empty": ({"constraints": [constraint("site")]}, C0, "says nothing"),
    "no files": (
        {"descriptors": descriptor_pb2.FileDescriptorSet()},
        "task_type.message_type",
        "is not a message",
    ),
    "policy": (
        {"default_policy": pb.TaskPolicy(max_attempts=1000)},
        "task_type.default_policy.max_attempts",
        "more than",
    ),
    "long pattern": (
        {"constraints": [constraint("site", pattern="a" * 1025)]},
        f"{C0}.pattern",
        "over 1024 characters",
    ),
    "NaN bound": (
        {"constraints": [constraint("altitude_m", minimum=math.nan)]},
        f"{C0}.minimum",
        "NaN is no bound",
    ),
    "too many files": (
        {"descriptors": descriptor_pb2.FileDescriptorSet(file=[survey_file()] * 257)},
        "task_type.descriptors",
        "at most 256 files",
    ),
    "method name": (
        {"descriptors": descriptor_pb2.FileDescriptorSet(file=[_renamed_site("HasField")])},
        "task_type.descriptors",
        "survey.v1.SurveyLeg.HasField is named like a protobuf message method",
    ),
}


@pytest.mark.parametrize(("changes", "field", "says"), BAD_TYPES.values(), ids=BAD_TYPES.keys())
async def test_a_type_that_cannot_be_used_is_refused(
    stub: AsyncStub, changes: dict[str, Any], field: str, says: str
) -> None:
    task_type = survey_type(**changes)
    code, message = await refusal(register(stub, task_type))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith(f"{field}: ") and says in message, message
    assert not (await stub.ListTaskTypes(pb.ListTaskTypesRequest())).task_types


async def test_a_file_importing_one_not_given_is_refused(stub: AsyncStub) -> None:
    file = survey_file()
    file.dependency.append("survey/v1/common.proto")
    task_type = survey_type(descriptors=descriptor_pb2.FileDescriptorSet(file=[file]))
    code, message = await refusal(register(stub, task_type))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "imports survey/v1/common.proto, which is not given" in message


def pool_task(pool: str, task_type: str, specification: any_pb2.Any) -> pb.CreateTaskRequest:
    request = create_request(None, task_type=pb.TaskTypeRef(name=task_type))
    request.relations.assignee.team.entity_id = pool
    request.specification.CopyFrom(specification)
    return request


async def member(
    stub: AsyncStub, entity_id: str, pool: str, *runs: tuple[str, int]
) -> grpc.aio.UnaryStreamCall[pb.ListenAsAgentRequest, pb.ListenAsAgentResponse]:
    request = pb.ListenAsAgentRequest(
        entity_ids=pb.EntityIds(entity_ids=[entity_id, pool]),
        task_types=[pb.TaskTypeRef(name=name, version=version) for name, version in runs],
    )
    call = stub.ListenAsAgent(request)
    await call.initial_metadata()
    return call


async def executed(
    call: grpc.aio.UnaryStreamCall[pb.ListenAsAgentRequest, pb.ListenAsAgentResponse],
) -> str:
    with anyio.fail_after(30):
        message = await call.read()
    assert isinstance(message, pb.ListenAsAgentResponse), message
    return message.execute_request.task.version.task_id


async def test_a_pool_sends_a_typed_task_only_to_a_member_that_runs_its_type(
    stub: AsyncStub,
) -> None:
    for name in ("survey", "mapping", "inspect"):
        await register(stub, survey_type(name=name))
    surveyor = await member(stub, "surveyor", "pool-x", ("survey", 0))
    mapper = await member(stub, "mapper", "pool-x", ("mapping", 1))
    # No member runs inspect: its task waits, and holds back none of those after it.
    waiting = (await stub.CreateTask(pool_task("pool-x", "inspect", leg(**GOOD)))).task
    surveys = [
        (await stub.CreateTask(pool_task("pool-x", "survey", leg(**GOOD)))).task.version.task_id
        for _ in range(3)
    ]
    mapping = (await stub.CreateTask(pool_task("pool-x", "mapping", leg(**GOOD)))).task
    assert [await executed(surveyor) for _ in surveys] == surveys
    assert await executed(mapper) == mapping.version.task_id
    held = (await stub.GetTask(pb.GetTaskRequest(task_id=waiting.version.task_id))).task
    assert held.status.status == pb.STATUS_SENT and not any(a.entity_id for a in held.attempts)
    # Visible: the pool's members run survey and mapping, not inspect.
    (pool,) = (await stub.ListAgents(pb.ListAgentsRequest(entity_ids=["pool-x"]))).agents
    assert [(t.name, t.version) for t in pool.task_types] == [("mapping", 1), ("survey", 0)]
    inspector = await member(stub, "inspector", "pool-x", ("inspect", 1))
    assert await executed(inspector) == waiting.version.task_id
    for call in (surveyor, mapper, inspector):
        call.cancel()


async def test_an_agent_kit_agent_declares_its_types_and_refuses_others(
    server: TaskManagerServer, stub: AsyncStub
) -> None:
    await register(stub, survey_type())
    await register(stub, survey_type(name="mapping"))
    agent = Agent(server.address, "drone-7")

    @agent.handler(LEG_CLASS, task_type="survey")
    async def fly(task: TaskContext) -> StringValue:
        assert task.specification is not None
        return StringValue(value=f"flew {task.specification.site}")  # type: ignore[attr-defined]

    async with running(agent), OperatorClient(server.address) as client:
        (listed,) = (await stub.ListAgents(pb.ListAgentsRequest(entity_ids=["drone-7"]))).agents
        assert [(t.name, t.version) for t in listed.task_types] == [("survey", 0)]
        flown = (await stub.CreateTask(typed(leg(**GOOD), entity_id="drone-7"))).task
        done = await client.wait(flown.version.task_id, timeout=30)
        assert done.status.status == pb.STATUS_DONE_OK
        result = StringValue()
        assert done.status.result.Unpack(result) and result.value == "flew north-ridge"
        request = typed(leg(**GOOD), entity_id="drone-7")
        request.task_type.name = "mapping"
        other = (await stub.CreateTask(request)).task
        refused = await client.wait(other.version.task_id, timeout=30)
    assert refused.status.status == pb.STATUS_DONE_NOT_OK
    assert refused.status.task_error.code == pb.ERROR_CODE_REJECTED
    assert "runs no handler for task type mapping v1" in refused.status.task_error.message


async def test_a_descriptor_missing_required_fields_is_invalid_not_internal(
    channel: grpc.aio.Channel,
) -> None:
    """proto2's required fields inside descriptor.proto: a client that sends them
    unset (serialised partially) gets INVALID_ARGUMENT."""
    file = survey_file()
    file.options.uninterpreted_option.add().name.add()  # a NamePart without its fields
    request = pb.RegisterTaskTypeRequest(
        task_type=survey_type(descriptors=descriptor_pb2.FileDescriptorSet(file=[file]))
    )
    register_partially = channel.unary_unary(
        "/task_manager.v1.TaskManager/RegisterTaskType",
        request_serializer=lambda message: message.SerializePartialToString(),
        response_deserializer=pb.RegisterTaskTypeResponse.FromString,
    )
    code, message = await refusal(register_partially(request))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert "missing its required fields" in message, message


async def test_a_pattern_is_matched_in_linear_time_and_nan_is_out_of_bounds(
    stub: AsyncStub,
) -> None:
    # (a+)+ backtracks for ever in Python's re on this value; RE2 answers at once. A
    # backtracking engine here would hold the event loop, and the test's timeout fails it.
    catastrophic = [constraint("site", pattern="(a+)+"), constraint("altitude_m", maximum=10)]
    await register(stub, survey_type(constraints=catastrophic))
    code, message = await refusal(stub.CreateTask(typed(leg(site="a" * 5_000 + "b"))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT and "does not match" in message
    code, message = await refusal(stub.CreateTask(typed(leg(site="aaa", altitude_m=math.nan))))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("specification.altitude_m: NaN is not within the bounds"), message


async def test_a_new_specification_of_a_typed_task_is_checked_against_its_version(
    stub: AsyncStub,
) -> None:
    await register(stub, survey_type())
    task = (await stub.CreateTask(typed(leg(**GOOD)))).task
    await register(stub, survey_type(version=2, constraints=[]))  # the latest checks nothing
    update = pb.UpdateTaskRequest(
        task_id=task.version.task_id,
        definition_version=1,
        specification=leg(**{**GOOD, "altitude_m": 12000.0}),
    )
    code, message = await refusal(stub.UpdateTask(update))
    assert code == grpc.StatusCode.INVALID_ARGUMENT
    assert message.startswith("specification.altitude_m: 12000 is above the maximum 500"), message
    update.specification.CopyFrom(leg(**{**GOOD, "altitude_m": 400.0}))
    updated = (await stub.UpdateTask(update)).task
    assert updated.version.definition_version == 2 and updated.task_type.version == 1


async def test_a_retry_asking_for_the_latest_is_the_same_after_a_newer_version(
    stub: AsyncStub,
) -> None:
    await register(stub, survey_type())
    first = await stub.CreateTask(typed(leg(**GOOD), task_id="typed-0002"))
    submission = pb.SessionSubmission(session_id="typed-session", tasks=[typed(leg(**GOOD))])
    request = pb.SubmitSessionsRequest(sessions=[submission])
    (submitted,) = (await stub.SubmitSessions(request)).sessions
    stricter = [constraint("altitude_m", minimum=200, maximum=500)]
    policy = pb.TaskPolicy(max_attempts=7)
    await register(stub, survey_type(version=2, constraints=stricter, default_policy=policy))
    again = await stub.CreateTask(typed(leg(**GOOD), task_id="typed-0002"))
    assert again.already_existed and again.task.task_type.version == 1
    assert again.task.version == first.task.version
    (resubmitted,) = (await stub.SubmitSessions(request)).sessions
    assert resubmitted.already_existed and resubmitted.task_ids == submitted.task_ids
    # A session naming one version, then the latest: the latest is the latest.
    pinned_then_latest = pb.SessionSubmission(
        tasks=[typed(leg(**GOOD), version=1), typed(leg(**{**GOOD, "altitude_m": 300.0}))]
    )
    (made,) = (
        await stub.SubmitSessions(pb.SubmitSessionsRequest(sessions=[pinned_then_latest]))
    ).sessions
    versions = [
        (await stub.GetTask(pb.GetTaskRequest(task_id=task_id))).task.task_type.version
        for task_id in made.task_ids
    ]
    assert versions == [1, 2]


async def test_a_member_stream_that_does_not_run_a_type_is_not_sent_it(stub: AsyncStub) -> None:
    """Two streams of one member, declaring different types: each gets only its own."""
    for name in ("survey", "mapping"):
        await register(stub, survey_type(name=name))
    surveying = await member(stub, "dual", "pool-y", ("survey", 0))
    mapping = await member(stub, "dual", "pool-y", ("mapping", 0))
    survey = (await stub.CreateTask(pool_task("pool-y", "survey", leg(**GOOD)))).task
    assert await executed(surveying) == survey.version.task_id
    mapped = (await stub.CreateTask(pool_task("pool-y", "mapping", leg(**GOOD)))).task
    assert await executed(mapping) == mapped.version.task_id  # and not the survey first
    for call in (surveying, mapping):
        call.cancel()


async def test_the_sdk_registers_a_generated_message_and_creates_typed_tasks(
    server: TaskManagerServer,
) -> None:
    note = [pb.FieldConstraint(path="value", required=True, pattern="[a-z ]+")]
    async with OperatorClient(server.address) as client:
        registered = await client.register_task_type(
            StringValue, "note", 1, constraints=note, default_policy=TaskPolicy(max_attempts=2)
        )
        assert registered.message_type == "google.protobuf.StringValue"
        again = await client.register_task_type(
            StringValue, "note", 1, constraints=note, default_policy=TaskPolicy(max_attempts=2)
        )
        assert again == registered  # the same registration: the type as registered
        task = await client.create_task(
            assignee_entity_id="drone-1",
            specification=StringValue(value="hello there"),
            task_type="note",
        )
        assert (task.task_type.name, task.task_type.version) == ("note", 1)
        assert task.policy.max_attempts == 2
        with pytest.raises(grpc.aio.AioRpcError) as refused:
            await client.create_task(
                assignee_entity_id="drone-1",
                specification=StringValue(value="Hello!"),
                task_type="note",
            )
    assert refused.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert (refused.value.details() or "").startswith(
        "specification.value: 'Hello!' does not match"
    )
