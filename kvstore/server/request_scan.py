"""A request read from its wire bytes in one C pass (kvstore/_reqscan.c `scan_fields`)
instead of protobuf's parse, the edge's length checks and a Python read of each field: the
Lookup RPC's request (kvstore/server/edge.py SCANNED_REQUESTS), ~4 KiB of packed token ids
every call.

The scan answers a named tuple with the message's field names and the values the message
would have (repeated fields as tuples), which is all the Lookup handler and the token check
read; or None for any bytes it does not take as they are (an unknown field, a field twice,
another wire type, a string over the edge's limit or not UTF-8, the repeated `token_ids`),
and then protobuf parses them exactly as before: the same message, the same refusals.
`tests/test_request_scan.py` checks the two agree on generated and damaged bytes.
"""

from __future__ import annotations

from collections import namedtuple
from collections.abc import Callable
from typing import Any

from google.protobuf.descriptor import Descriptor, FieldDescriptor

try:  # (the daemon's C loops; absent where they are not built: protobuf parses every request)
    from kvstore._chainhash import scan_fields
except ImportError:
    scan_fields = None

# scan_fields' kinds (kvstore/_reqscan.c)
UINT64, INT64, BOOL, STRING, BYTES, BYTES_ANY, PACKED_UINT64, PROTOBUF = range(8)
_SCALAR = {
    FieldDescriptor.TYPE_UINT64: UINT64,
    FieldDescriptor.TYPE_INT64: INT64,
    FieldDescriptor.TYPE_BOOL: BOOL,
}


def _kind(f: FieldDescriptor, unbounded: frozenset[str]) -> int:
    if f.containing_oneof is not None or (f.has_presence and not f.is_repeated):
        return PROTOBUF  # (HasField / WhichOneof are the message's)
    if f.is_repeated:
        return PACKED_UINT64 if f.type == FieldDescriptor.TYPE_UINT64 else PROTOBUF
    if f.type == FieldDescriptor.TYPE_STRING:
        return STRING
    if f.type == FieldDescriptor.TYPE_BYTES:
        return BYTES_ANY if f.name in unbounded else BYTES
    return _SCALAR.get(f.type, PROTOBUF)


def scanner(descriptor: Descriptor, unbounded: frozenset[str], limit: int) -> Callable[[bytes], Any] | None:
    """A function of a `descriptor` message's wire bytes to its fields (a named tuple) or None
    (protobuf must parse them); strings and bytes but `unbounded` ones longer than `limit`
    bytes are left to protobuf too (the edge's check names them). None without the C module."""
    if scan_fields is None:
        return None
    fields = sorted(descriptor.fields, key=lambda f: f.number)
    layout = tuple((f.number, _kind(f, unbounded)) for f in fields)
    defaults = tuple(() if f.is_repeated else f.default_value for f in fields)
    cls = namedtuple(f"{descriptor.name}Fields", [f.name for f in fields])  # type: ignore[misc]
    new = tuple.__new__

    def scan(data: bytes) -> Any:
        values = scan_fields(data, layout, defaults, limit)
        return None if values is None else new(cls, values)

    return scan
