"""Values as google.protobuf.Any: what specifications, progress and results travel as.

Plain strings and dicts become well-known types, so any tool can show them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from google.protobuf import any_pb2, struct_pb2, wrappers_pb2
from google.protobuf.message import Message


def packed(value: Message | str | Mapping[str, Any]) -> any_pb2.Any:
    """A message as an Any (an Any as it is); a string as a StringValue, a mapping as a
    Struct, so that any tool that knows the well-known types can show it."""
    message: Message
    if isinstance(value, any_pb2.Any):
        return value
    if isinstance(value, str):
        message = wrappers_pb2.StringValue(value=value)
    elif isinstance(value, Message):
        message = value
    else:
        message = struct_pb2.Struct()
        message.update(value)
    wrapped = any_pb2.Any()
    wrapped.Pack(message)
    return wrapped
