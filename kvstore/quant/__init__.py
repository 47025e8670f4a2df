"""Quantized page records for the tiers below the pool (docs/quant.md): int8/int4 with
per-vector or per-channel scales, outliers kept aside, sink tokens kept raw, each layer within
an error bound or stored more precisely. numpy only; the torch reference and Triton kernels are
in kernels/kvstore_kernels."""

from .codec import Encoded, decode, decode_array, encode, encode_array, info
from .errors import CorruptRecord, QuantError, RecordMismatch, SchemeError
from .record import RecordInfo
from .scheme import PageShape, QuantScheme

__all__ = [
    "CorruptRecord",
    "Encoded",
    "PageShape",
    "QuantError",
    "QuantScheme",
    "RecordInfo",
    "RecordMismatch",
    "SchemeError",
    "decode",
    "decode_array",
    "encode",
    "encode_array",
    "info",
]
