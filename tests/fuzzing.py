"""Hypothesis strategies that build any message of a protobuf type from its descriptor.

Every field may be set or not; strings mix free text with well-shaped ids; integers span
the field's whole range; enums include values the schema does not name. Nesting stops at
a fixed depth so examples stay small.
"""

from __future__ import annotations

from typing import Any

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
        return st.one_of(st.integers(-3, 1_100), st.integers(low, high)).filter(
            lambda value: low <= value <= high
        )
    if kind == FieldDescriptor.TYPE_ENUM:
        assert field.enum_type is not None
        named = [value.number for value in field.enum_type.values]
        return st.one_of(st.sampled_from(named), st.integers(-(2**31), 2**31 - 1))
    if kind == FieldDescriptor.TYPE_BOOL:
        return st.booleans()
    if kind in (FieldDescriptor.TYPE_DOUBLE, FieldDescriptor.TYPE_FLOAT):
        return st.floats(width=32) if kind == FieldDescriptor.TYPE_FLOAT else st.floats()
    if kind == FieldDescriptor.TYPE_STRING:
        return st.one_of(ids, st.text(max_size=60), st.text(min_size=300, max_size=2_000))
    if kind == FieldDescriptor.TYPE_BYTES:
        return st.binary(max_size=200)
    raise AssertionError(f"no strategy for field type {kind} ({field.full_name})")


def _build(message_class: type[Message], descriptor: Descriptor, values: dict[str, Any]) -> Message:
    message = message_class()
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
