"""The protobuf well-known types, imported so that the default descriptor pool holds them.

Specifications, results and progress are Anys that often hold one (a StringValue, a
Struct); server reflection and taskctl's JSON resolve their types from that pool, so
importing this module is all its users need.
"""

from google.protobuf import (  # noqa: F401
    any_pb2,
    api_pb2,
    duration_pb2,
    empty_pb2,
    field_mask_pb2,
    source_context_pb2,
    struct_pb2,
    timestamp_pb2,
    type_pb2,
    wrappers_pb2,
)
