"""Hypothesis strategies that build any message of a protobuf type from its descriptor,
or mutate a valid one.

Every field may be set or not; strings mix free text with well-shaped ids; integers span
the field's whole range; enums include values the schema does not name. Nesting stops at
a fixed depth so examples stay small.
"""

from __future__ import annotations

from typing import Any, cast

from google.protobuf import message_factory
from google.protobuf.descriptor import Descriptor, FieldDescriptor
from google.protobuf.message import Message
from hypothesis import strategies as st

MAX_DEPTH = 4
_INT_RANGES = {
    FieldDescriptor.TYPE_INT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SINT32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_SFIXED32: (-(2**31), 2**31 - 1),
    FieldDescriptor.TYPE_INT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SINT64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_SFIXED64: (-(2**63), 2**63 - 1),
    FieldDescriptor.TYPE_UINT32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_FIXED32: (0, 2**32 - 1),
    FieldDescriptor.TYPE_UINT64: (0, 2**64 - 1),
    FieldDescriptor.TYPE_FIXED64: (0, 2**64 - 1),
}


_EDGES = sorted(
    {
        *(
            sign * 2**bits + delta
            for bits in (31, 32, 53, 62, 63, 64)
            for sign in (1, -1)
            for delta in (-1, 0, 1)
        ),
        # Seconds at the ends of what fits in int64 nanoseconds, and of the Timestamp range,
        # and between the two (a time that is a valid Timestamp but overflows nanoseconds).
        *(2**bits for bits in range(33, 38)),
        10**11,
        9_223_372_036,
        -9_223_372_037,
        253_402_300_799,
        253_402_300_800,
        -62_135_596_800,
        10**10,
        10**12,
        10**15,
    }
)
"""Integers where arithmetic and storage tend to break: sizes, overflow points, limits."""


def messages(
    descriptor: Descriptor, ids: st.SearchStrategy[str], depth: int = 0
) -> st.SearchStrategy[Message]:
    """Any message of this type; string fields draw from ids half of the time."""
    message_class = message_factory.GetMessageClass(descriptor)
    fields = [field for field in descriptor.fields if depth < MAX_DEPTH or not _is_message(field)]
    optional = {field.name: _field_values(field, ids, depth) for field in fields}
    return st.fixed_dictionaries({}, optional=optional).map(
        lambda values: _build(message_class, descriptor, values)
    )


def _is_message(field: FieldDescriptor) -> bool:
    return field.type in (FieldDescriptor.TYPE_MESSAGE, FieldDescriptor.TYPE_GROUP)


def _field_values(
    field: FieldDescriptor, ids: st.SearchStrategy[str], depth: int
) -> st.SearchStrategy[Any]:
    single = _single_values(field, ids, depth)
    if field.is_repeated:
        return st.lists(single, max_size=3)
    return single


def _single_values(
    field: FieldDescriptor, ids: st.SearchStrategy[str], depth: int
) -> st.SearchStrategy[Any]:
    kind = field.type
    if _is_message(field):
        nested = field.message_type
        assert nested is not None
        return st.deferred(lambda: messages(nested, ids, depth + 1))
    if kind in _INT_RANGES:
        low, high = _INT_RANGES[kind]
        edges = st.sampled_from([value for value in _EDGES if low <= value <= high])
        small = st.integers(max(low, -3), 1_100)
        # Mostly plausible values, so a message often gets past its first check and
        # reaches deeper code with one bad value.
        return st.one_of(small, small, small, edges, edges, st.integers(low, high))
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        named = st.sampled_from([value.number for value in field.enum_type.values])
        if field.enum_type.is_closed:  # proto2's (descriptor.proto): unnamed values unsettable
            return named
        return st.one_of(named, named, named, st.integers(-(2**31), 2**31 - 1))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32) if kind == FieldDescriptor.TYPE_FLOAT else st.floats()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(ids, ids, st.text(max_size=60), st.text(min_size=300, max_size=2_000))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=200)
    raise AssertionError(f"no strategy for field type {kind} ({field.full_name})")


def _build(
    message_class: type[Message],
    descriptor: Descriptor,
    values: dict[str, Any],
    into: Message | None = None,
) -> Message:
    message = message_class() if into is None else into
    for name, value in values.items():
        field = descriptor.fields_by_name[name]
        target = getattr(message, name)
        if field.is_repeated:
            if _is_message(field):
                for item in value:
                    target.add().CopyFrom(item)
            else:
                target.extend(value)
        elif _is_message(field):
            target.CopyFrom(value)
        else:
            setattr(message, name, value)
    return message


def byte_strings() -> st.SearchStrategy[bytes]:
    """Random bytes, and valid-looking messages cut short or flipped."""
    return st.one_of(st.binary(max_size=300), st.binary(min_size=1, max_size=8).map(_varint_bomb))


def _varint_bomb(prefix: bytes) -> bytes:
    # A field header claiming a huge length-delimited payload that is not there.
    return b"\x0a\xff\xff\xff\xff\x0f" + prefix


def mutants(
    valid: Message, ids: st.SearchStrategy[str], mutations: int = 2
) -> st.SearchStrategy[Message]:
    """valid with one to `mutations` fields, anywhere in it, set to arbitrary values: the
    message gets past most checks and carries a bad value deep into the server."""

    @st.composite
    def mutate(draw: st.DrawFn) -> Message:
        message = type(valid)()
        message.CopyFrom(valid)
        for _ in range(draw(st.integers(1, mutations))):
            target: Message = message
            depth = 0
            while True:
                descriptor = cast(Descriptor, target.DESCRIPTOR)
                fields: list[FieldDescriptor] = list(descriptor.fields)
                if not fields:
                    break  # an empty message: nothing to change
                field = draw(st.sampled_from(fields))
                descend = _is_message(field) and not field.is_repeated and depth < MAX_DEPTH
                if descend and draw(st.booleans()):
                    target = getattr(target, field.name)
                    depth += 1
                    continue
                value = draw(_field_values(field, ids, depth))
                target.ClearField(field.name)
                _build(type(target), descriptor, {field.name: value}, into=target)
                break
        return message

    return mutate()
