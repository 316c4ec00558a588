"""Messages to and from JSON by the protobuf JSON mapping, for the HTTP routes.

lowerCamelCase names, enums by name, timestamps in RFC 3339, an Any as its `@type` with
the message's own fields beside it. The mapping needs the message type of every Any it
renders, and this gateway cannot know every type its clients put in a specification or a
result (a Lattice agent's `anduril.tasks.v2.Investigate`, say). An Any of a type it does
not know is therefore carried as its bytes: `{"@type": URL, "@bytes": BASE64}`, both
ways. Nothing is lost, and a gRPC client reading the same task sees the very bytes it or
another client stored. A client that wants readable JSON for free-form data sends a
google.protobuf.Struct (`{"@type": "type.googleapis.com/google.protobuf.Struct",
"value": {...}}`).
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Iterator
from typing import Any, TypeVar

from google.protobuf import any_pb2, descriptor_pool, json_format
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

from task_manager.errors import InvalidArgument

BYTES_KEY = "@bytes"
"""Beside `@type`: the serialised message of an Any whose type this gateway does not know."""
_ANY = any_pb2.Any.DESCRIPTOR.full_name
_pool = descriptor_pool.Default()

M = TypeVar("M", bound=Message)


def to_json(message: Message) -> dict[str, Any]:
    """The message as a JSON object."""
    opaque = list(_opaque_anys(message))
    if not opaque:
        return json_format.MessageToDict(message)
    # Rendered without the Anys it cannot render, which are then put back as their bytes.
    copy = type(message)()
    copy.CopyFrom(message)
    for path, _ in opaque:
        _clear(copy, path)
    rendered = json_format.MessageToDict(copy)
    for path, value in opaque:
        _put(rendered, path, {"@type": value.type_url, BYTES_KEY: _b64(value.value)})
    return rendered


def from_json(value: object, message_type: type[M], field: str) -> M:
    """The JSON value (a parsed body, or part of one) as a message_type; keys of fields
    it does not have are ignored (for clients newer than this gateway), a value it cannot
    take (an unknown enum name, a string for a number) is InvalidArgument naming it."""
    message = message_type()
    if value is None:
        return message
    if not isinstance(value, dict):
        raise InvalidArgument(field, f"must be a JSON object, not {type(value).__name__}")
    opaque: list[tuple[tuple[str, ...], any_pb2.Any]] = []
    cleaned = _take_opaque(value, message.DESCRIPTOR, (), opaque, field)
    try:
        json_format.ParseDict(cleaned, message)
    except json_format.ParseError as bad:
        raise InvalidArgument(field, f"is not a valid {message_type.__name__}: {bad}") from None
    for path, any_value in opaque:
        _set_any(message, path, any_value)
    return message


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


def _known(type_url: str) -> bool:
    try:
        _pool.FindMessageTypeByName(type_url.rpartition("/")[2])
    except KeyError:
        return False
    return True


# -- walking the Any fields -----------------------------------------------------------------

Path = tuple[str, ...]
"""JSON names from the top message to a singular Any field (repeated Anys are not in the
Task API's messages; those are mapped by json_format, known types only)."""


def _opaque_anys(message: Message, path: Path = ()) -> Iterator[tuple[Path, any_pb2.Any]]:
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE or _is_repeated(field):
            continue
        here = (*path, field.json_name)
        if _is_any(field):
            if not _known(value.type_url):
                yield here, value
        else:
            yield from _opaque_anys(value, here)


def _is_repeated(field: FieldDescriptor) -> bool:
    return bool(field.is_repeated)


def _clear(message: Message, path: Path) -> None:
    for name in path[:-1]:
        message = getattr(message, _field_name(message.DESCRIPTOR, name))
    message.ClearField(_field_name(message.DESCRIPTOR, path[-1]))


def _set_any(message: Message, path: Path, value: any_pb2.Any) -> None:
    for name in path[:-1]:
        message = getattr(message, _field_name(message.DESCRIPTOR, name))
    getattr(message, _field_name(message.DESCRIPTOR, path[-1])).CopyFrom(value)


def _is_any(field: Any) -> bool:
    return bool(field.message_type.full_name == _ANY)


def _field_name(descriptor: Any, json_name: str) -> str:
    return str(next(f.name for f in descriptor.fields if f.json_name == json_name))


def _put(rendered: dict[str, Any], path: Path, value: dict[str, str]) -> None:
    for name in path[:-1]:
        rendered = rendered.setdefault(name, {})
    rendered[path[-1]] = value


def _take_opaque(
    value: dict[str, Any],
    descriptor: Any,
    path: Path,
    opaque: list[tuple[Path, any_pb2.Any]],
    where: str,
) -> dict[str, Any]:
    """value without its Anys in the @bytes form (collected into opaque, decoded), and
    without the keys of fields the message does not have and JSON nulls (which a client
    sends for fields it leaves unset)."""
    fields = {f.json_name: f for f in descriptor.fields} | {f.name: f for f in descriptor.fields}
    cleaned: dict[str, Any] = {}
    for key, item in value.items():
        field = fields.get(key)
        if item is None or field is None:
            continue
        if field.type != FieldDescriptor.TYPE_MESSAGE:
            cleaned[key] = item
            continue
        if _is_repeated(field):
            cleaned[key] = _each_cleaned(item, field, where)
            continue
        here, at = (*path, field.json_name), f"{where}.{field.json_name}"
        if not isinstance(item, dict):
            cleaned[key] = item  # json_format says what is wrong with it
        elif _is_any(field):
            if BYTES_KEY in item:
                opaque.append((here, _opaque_any(item, at)))
            elif "@type" in item and not _known(str(item["@type"])):
                raise InvalidArgument(
                    at,
                    f"has type {item['@type']!r}, which this gateway does not know: send the"
                    f" message as {{'@type': ..., '{BYTES_KEY}': <its bytes, base64>}}, or a"
                    " google.protobuf.Struct",
                )
            else:
                cleaned[key] = item
        else:
            cleaned[key] = _take_opaque(item, field.message_type, here, opaque, where)
    return cleaned


def _each_cleaned(items: object, field: Any, where: str) -> object:
    """A repeated message field's JSON, each message cleaned (not of its Anys: the
    Task API has none in a repeated field, and json_format maps known ones)."""
    if not isinstance(items, list) or _is_any(field):
        return items  # a map's entries, or what json_format will refuse
    return [
        _take_opaque(one, field.message_type, (), [], where) if isinstance(one, dict) else one
        for one in items
    ]


def _opaque_any(item: dict[str, Any], where: str) -> any_pb2.Any:
    type_url, data = item.get("@type"), item.get(BYTES_KEY)
    if not isinstance(type_url, str) or not type_url:
        raise InvalidArgument(where, f"needs '@type' beside '{BYTES_KEY}'")
    if not isinstance(data, str):
        raise InvalidArgument(f"{where}.{BYTES_KEY}", "must be a base64 string")
    try:
        decoded = base64.b64decode(data, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidArgument(f"{where}.{BYTES_KEY}", "is not valid base64") from None
    return any_pb2.Any(type_url=type_url, value=decoded)
