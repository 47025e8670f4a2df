"""The element types of K and V a namespace may hold: the one table the daemon, its config, the
client and the transformers adapter read (written by hand, next to the generated code, because it
is part of the wire contract: `itemsize` fixes `page_bytes`).

Each row is one value of the wire enum `kvstore.v1.DType`; `name` is the name the config and the
daemon use, and torch's (`getattr(torch, name)`), so nothing here needs torch.
"""

from __future__ import annotations

from dataclasses import dataclass

from kvstore_proto.kvstore.v1 import kvstore_pb2 as pb


@dataclass(frozen=True)
class DType:
    name: str  # "bfloat16": config, daemon and torch
    wire: int  # the kvstore.v1.DType value
    itemsize: int  # bytes of one element

    @property
    def wire_name(self) -> str:
        """The enum value's name ("BFLOAT16")."""
        return pb.DType.Name(self.wire)


DTYPES: tuple[DType, ...] = (
    DType("float16", pb.FLOAT16, 2),
    DType("bfloat16", pb.BFLOAT16, 2),
    DType("float32", pb.FLOAT32, 4),
    DType("int8", pb.INT8, 1),
    DType("uint8", pb.UINT8, 1),
    DType("float8_e4m3fn", pb.FLOAT8_E4M3, 1),
)
BY_NAME: dict[str, DType] = {d.name: d for d in DTYPES}
BY_WIRE: dict[int, DType] = {d.wire: d for d in DTYPES}
NAMES: tuple[str, ...] = tuple(BY_NAME)
