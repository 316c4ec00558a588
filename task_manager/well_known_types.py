"""The protobuf well-known types, imported so that the default descriptor pool holds them.

Specifications, results and progress are Anys that often hold one (a StringValue, a
Struct); server reflection and taskctl's JSON resolve their types from that pool.
"""

from google.protobuf import (
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

MODULES = (
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
