"""Messages as JSON and as one-line text, whatever their Any fields hold.

Well-known types and this package's messages are decoded; any other type is shown as
{"@type": ..., "value": base64 of its bytes}, so output never fails on a type we lack.
"""

from __future__ import annotations

import base64
import json
from collections.abc import Iterator
from typing import Any

from google.protobuf import any_pb2, descriptor_pool, json_format, message_factory
from google.protobuf.message import Message

# Imported for their descriptors: json_format finds an Any's type in the default pool,
# which holds only the modules imported so far.
import task_manager.v1.task_manager_pb2
import task_manager.well_known_types  # noqa: F401

POOL = descriptor_pool.Default()
_ANY = any_pb2.Any.DESCRIPTOR.full_name
_SUMMARY_WIDTH = 40
JsonPath = tuple[str | int, ...]


def to_json(message: Message) -> dict[str, Any]:
    """The message as proto3 JSON (proto field names), undecodable Any fields included."""
    copy = type(message)()
    copy.CopyFrom(message)
    undecodable = []
    for path, packed in list(_undecodable_anys(copy, ())):
        undecodable.append((path, opaque(packed)))
        packed.Clear()  # json_format would raise on it; its rendering goes in below
    rendered: dict[str, Any] = json_format.MessageToDict(
        copy, preserving_proto_field_name=True, descriptor_pool=POOL
    )
    for path, replacement in undecodable:
        _put(rendered, path, replacement)
    return rendered


def opaque(packed: any_pb2.Any) -> dict[str, str]:
    """An Any whose type is unknown here: its type URL and its bytes in base64."""
    return {"@type": packed.type_url, "value": base64.b64encode(packed.value).decode("ascii")}


def summary(packed: any_pb2.Any) -> str:
    """A short one-line rendering for a table cell: a StringValue's text, a wrapper's
    value, other types as compact JSON; an unknown type by its name and size."""
    if not packed.type_url:
        return ""
    if _decodable(packed):
        as_dict = json_format.MessageToDict(packed, descriptor_pool=POOL)
        as_dict.pop("@type", None)
        value = as_dict.get("value", as_dict) if len(as_dict) == 1 else as_dict
        text = value if isinstance(value, str) else _compact(value)
    else:
        text = f"<{packed.TypeName()}, {len(packed.value)} bytes>"
    return text if len(text) <= _SUMMARY_WIDTH else text[: _SUMMARY_WIDTH - 1] + "…"


def _compact(value: object) -> str:
    # Struct numbers are doubles: 3.0 reads better as 3 in a table.
    def tidy(item: object) -> object:
        if isinstance(item, float) and item.is_integer():
            return int(item)
        if isinstance(item, dict):
            return {key: tidy(v) for key, v in item.items()}
        if isinstance(item, list):
            return [tidy(v) for v in item]
        return item

    return json.dumps(tidy(value), separators=(",", ":"), sort_keys=True, ensure_ascii=False)


def parse_any(type_name: str, json_text: str) -> any_pb2.Any:
    """A message of a type known here (say google.protobuf.Struct) from its JSON, packed.
    Raises ValueError naming what was wrong."""
    try:
        descriptor = POOL.FindMessageTypeByName(type_name)
    except KeyError:
        raise ValueError(
            f"unknown message type {type_name!r} (known: the google.protobuf well-known types "
            "and task_manager.v1's messages)"
        ) from None
    message_class = message_factory.GetMessageClass(descriptor)
    try:
        message = json_format.Parse(json_text, message_class(), descriptor_pool=POOL)
    except json_format.ParseError as error:
        raise ValueError(f"not a {type_name} in JSON: {error}") from None
    packed = any_pb2.Any()
    packed.Pack(message)
    return packed


def _decodable(packed: any_pb2.Any) -> bool:
    try:
        json_format.MessageToDict(packed, descriptor_pool=POOL)
    except (TypeError, KeyError, json_format.Error):
        return False
    return True


def _undecodable_anys(message: Message, path: JsonPath) -> Iterator[tuple[JsonPath, any_pb2.Any]]:
    """Every Any in message (at any depth) that json_format cannot render, with its path
    in the JSON. The payload of a decodable Any is json_format's to render."""
    if message.DESCRIPTOR.full_name == _ANY:
        assert isinstance(message, any_pb2.Any)
        if message.type_url and not _decodable(message):
            yield path, message
        return
    for field, value in message.ListFields():
        entry = field.message_type
        if entry is None:  # a scalar
            continue
        here = (*path, field.name)
        if entry.GetOptions().map_entry:
            if entry.fields_by_name["value"].message_type is not None:
                for key, item in value.items():
                    yield from _undecodable_anys(item, (*here, str(key)))
        elif field.is_repeated:
            for index, item in enumerate(value):
                yield from _undecodable_anys(item, (*here, index))
        else:
            yield from _undecodable_anys(value, here)


def _put(rendered: dict[str, Any], path: JsonPath, value: object) -> None:
    node: Any = rendered
    for step in path[:-1]:
        node = node.setdefault(step, {}) if isinstance(step, str) else node[step]
    node[path[-1]] = value
