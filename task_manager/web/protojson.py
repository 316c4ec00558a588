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

from google.protobuf import any_pb2, descriptor_pool, json_format, struct_pb2, wrappers_pb2
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError, Message

from task_manager.errors import InvalidArgument

BYTES_KEY = "@bytes"
"""Beside `@type`: the serialised message of an Any whose type this gateway does not know."""
_ANY = any_pb2.Any.DESCRIPTOR.full_name
_pool = descriptor_pool.Default()
WELL_KNOWN = (struct_pb2.Struct, wrappers_pb2.StringValue)
"""Imported for their descriptors: the free-form and scalar Anys clients send most."""

M = TypeVar("M", bound=Message)
Step = tuple[str, int]
"""A field's name (as in the proto) and, in a repeated field, the element's index (-1
for a singular field)."""
Path = tuple[Step, ...]
"""From a message to one of the Any fields inside it."""


def to_json(message: Message) -> dict[str, Any]:
    """The message as a JSON object."""
    opaque = list(_anys(message, (), unknown_only=True))
    if not opaque:
        try:
            return json_format.MessageToDict(message)
        except (TypeError, ValueError, DecodeError, json_format.Error):
            # An Any of a known type whose bytes do not decode as it: every Any as bytes.
            opaque = list(_anys(message, (), unknown_only=False))
    # Rendered without the Anys it cannot render, which are then put back as their bytes.
    copy = type(message)()
    copy.CopyFrom(message)
    for path, _ in opaque:
        _field_at(copy, path[:-1]).ClearField(path[-1][0])
    rendered = json_format.MessageToDict(copy)
    for path, value in opaque:
        _put(rendered, copy, path, {"@type": value.type_url, BYTES_KEY: _b64(value.value)})
    return rendered


def from_json(value: object, message_type: type[M], field: str, *, strict: bool = False) -> M:
    """The JSON value (a parsed body, or part of one) as a message_type; a value it
    cannot take (an unknown enum name, a string for a number) is InvalidArgument naming
    it. Keys of fields it does not have are ignored (for clients newer than this
    gateway: the Lattice SDK's), or with strict refused as InvalidArgument naming the
    key (this gateway's own API, where a misspelt field would otherwise be dropped
    without a word)."""
    message = message_type()
    if value is None:
        return message
    if not isinstance(value, dict):
        raise InvalidArgument(field, f"must be a JSON object, not {type(value).__name__}")
    opaque: list[tuple[Path, any_pb2.Any]] = []
    cleaned = _take_opaque(value, message.DESCRIPTOR, (), opaque, field, strict)
    try:
        json_format.ParseDict(cleaned, message)
    except (json_format.ParseError, RecursionError) as bad:
        raise InvalidArgument(field, f"is not a valid {message_type.__name__}: {bad}") from None
    for path, any_value in opaque:
        getattr(_field_at(message, path[:-1], create=True), path[-1][0]).CopyFrom(any_value)
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


def _anys(message: Message, path: Path, unknown_only: bool) -> Iterator[tuple[Path, any_pb2.Any]]:
    """The singular Any fields inside message, at any depth (repeated messages too; a
    repeated Any itself is json_format's to map)."""
    for field, value in message.ListFields():
        if field.type != FieldDescriptor.TYPE_MESSAGE or _is_map(field):
            continue
        if _is_any(field):
            if not field.is_repeated and not (unknown_only and _known(value.type_url)):
                yield (*path, (field.name, -1)), value
        elif field.is_repeated:
            for index, element in enumerate(value):
                yield from _anys(element, (*path, (field.name, index)), unknown_only)
        else:
            yield from _anys(value, (*path, (field.name, -1)), unknown_only)


def _is_any(field: Any) -> bool:
    return bool(field.message_type.full_name == _ANY)


def _is_map(field: Any) -> bool:
    return bool(field.message_type.GetOptions().map_entry)


def _field_at(message: Message, path: Path, create: bool = False) -> Any:
    """The message at path inside message (made, with create, where it is missing)."""
    for name, index in path:
        value = getattr(message, name)
        if index < 0:
            message = value
            continue
        while create and len(value) <= index:
            value.add()
        message = value[index]
    return message


def _put(rendered: dict[str, Any], message: Message, path: Path, value: dict[str, str]) -> None:
    """Puts value at path in rendered, message's JSON (its JSON names, from message)."""
    node: Any = rendered
    descriptor: Any = message.DESCRIPTOR
    for position, (name, index) in enumerate(path):
        field = descriptor.fields_by_name[name]
        if position == len(path) - 1:
            node[field.json_name] = value
            return
        child = node.setdefault(field.json_name, [] if index >= 0 else {})
        if index >= 0:
            while len(child) <= index:
                child.append({})
            child = child[index]
        node, descriptor = child, field.message_type


def _take_opaque(
    value: dict[str, Any],
    descriptor: Any,
    path: Path,
    opaque: list[tuple[Path, any_pb2.Any]],
    where: str,
    strict: bool,
) -> dict[str, Any]:
    """value without its Anys in the @bytes form (collected into opaque, decoded), and
    without JSON nulls (which a client sends for fields it leaves unset) and the keys of
    fields the message does not have (InvalidArgument instead, if strict)."""
    fields = {f.json_name: f for f in descriptor.fields} | {f.name: f for f in descriptor.fields}
    cleaned: dict[str, Any] = {}
    for key, item in value.items():
        field = fields.get(key)
        if field is None and strict:
            raise InvalidArgument(f"{where}.{key}", f"is not a field of {descriptor.full_name}")
        if item is None or field is None:
            continue
        at = f"{where}.{field.json_name}"
        if field.type != FieldDescriptor.TYPE_MESSAGE or _is_map(field):
            cleaned[key] = item
        elif field.is_repeated:
            if not isinstance(item, list) or _is_any(field):
                cleaned[key] = item  # json_format says what is wrong with it
                continue
            cleaned[key] = [
                _take_opaque(
                    one,
                    field.message_type,
                    (*path, (field.name, i)),
                    opaque,
                    f"{at}[{i}]",
                    strict,
                )
                if isinstance(one, dict)
                else one
                for i, one in enumerate(item)
            ]
        elif not isinstance(item, dict):
            cleaned[key] = item  # json_format says what is wrong with it
        elif _is_any(field):
            if BYTES_KEY in item:
                opaque.append(((*path, (field.name, -1)), _opaque_any(item, at)))
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
            cleaned[key] = _take_opaque(
                item, field.message_type, (*path, (field.name, -1)), opaque, at, strict
            )
    return cleaned


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
