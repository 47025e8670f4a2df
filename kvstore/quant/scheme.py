"""What to store (a `QuantScheme`) and the page it applies to (a `PageShape`).

A page is the pool's bytes of one page: `[layer, kv, token, head, dim]` of `dtype`. A scheme
says, per layer, at which precision to store it ("int8", "int4" or "fp" = the raw bytes), how
keys and values get their scales, how many outliers per vector are kept aside, and the error
bound past which a layer is stored one step more precisely (docs/quant.md)."""

from __future__ import annotations

from dataclasses import dataclass

from kvstore_proto import dtypes

from .errors import SchemeError

PRECISIONS = ("fp", "int8", "int4")  # codes 0, 1, 2 in a record
FALLBACK = {"int4": "int8", "int8": "fp"}  # the next higher precision
KEY_SCALES = ("tensor", "vector", "channel")  # codes 0, 1, 2
VALUE_SCALES = ("tensor", "vector")
QUANTIZABLE = ("float16", "bfloat16", "float32")
MAX_OUTLIERS = 8
MAX_OUTLIER_DIM = 256  # an outlier's index in its vector is a uint8


@dataclass(frozen=True, slots=True)
class PageShape:
    num_layers: int
    page_tokens: int
    num_kv_heads: int
    head_dim: int
    dtype: str  # a name of kvstore_proto.dtypes

    def __post_init__(self) -> None:
        dims = (self.num_layers, self.page_tokens, self.num_kv_heads, self.head_dim)
        if not all(0 < d < 2**16 for d in dims):
            raise SchemeError(f"page dimensions must be in 1..65535, got {dims}")
        if self.dtype not in dtypes.BY_NAME:
            raise SchemeError(f"unknown dtype {self.dtype!r}; one of {', '.join(dtypes.NAMES)}")

    @property
    def itemsize(self) -> int:
        return dtypes.BY_NAME[self.dtype].itemsize

    @property
    def dims(self) -> tuple[int, int, int, int, int]:
        """The page's array shape: (layers, 2, tokens, heads, head_dim)."""
        return (self.num_layers, 2, self.page_tokens, self.num_kv_heads, self.head_dim)

    @property
    def page_bytes(self) -> int:
        return 2 * self.num_layers * self.page_tokens * self.num_kv_heads * self.head_dim * self.itemsize


@dataclass(frozen=True, slots=True)
class QuantScheme:
    """precision: one for every layer, or a tuple with one per layer (a layer schedule).
    keys: scales of the keys per "vector" (token x head, g = 1), per "channel" (head x dim over
    the page's tokens) or per "tensor" (one per layer); values: per "vector" or "tensor".
    outliers: the k largest |x| of every vector kept as fp16 value + uint8 index.
    bound: the largest relative L2 error a stored (layer, K or V) tensor may have; None = any."""

    precision: str | tuple[str, ...] = "int8"
    keys: str = "vector"
    values: str = "vector"
    outliers: int = 1
    bound: float | None = None

    def __post_init__(self) -> None:
        names = (self.precision,) if isinstance(self.precision, str) else self.precision
        if not names or any(p not in PRECISIONS for p in names):
            raise SchemeError(
                f"precision must be one of {PRECISIONS} (or a tuple of them), got {self.precision!r}"
            )
        if self.keys not in KEY_SCALES:
            raise SchemeError(f"keys must be one of {KEY_SCALES}, got {self.keys!r}")
        if self.values not in VALUE_SCALES:
            raise SchemeError(f"values must be one of {VALUE_SCALES}, got {self.values!r}")
        if not 0 <= self.outliers <= MAX_OUTLIERS:
            raise SchemeError(f"outliers must be in 0..{MAX_OUTLIERS}, got {self.outliers}")
        if self.bound is not None and not self.bound >= 0:
            raise SchemeError(f"bound must be >= 0 or None, got {self.bound}")

    def layer_precisions(self, num_layers: int) -> tuple[str, ...]:
        if isinstance(self.precision, str):
            return (self.precision,) * num_layers
        if len(self.precision) != num_layers:
            raise SchemeError(f"the schedule has {len(self.precision)} layers, the page {num_layers}")
        return self.precision

    @classmethod
    def preset(cls, name: str, bound: float | None = None) -> QuantScheme:
        """ "int8": vector-wise keys and values, 1 outlier; "int4": per-channel keys,
        vector-wise values, 2 outliers (KVQuant's recipe); "fp": the raw bytes."""
        if name == "int8":
            return cls("int8", "vector", "vector", 1, bound)
        if name == "int4":
            return cls("int4", "channel", "vector", 2, bound)
        if name == "fp":
            return cls("fp", "vector", "vector", 0, bound)
        raise SchemeError(f"unknown preset {name!r}; one of int8, int4, fp")

    @classmethod
    def layer_schedule(
        cls, num_layers: int, early: str, rest: str, early_layers: int, **fields: object
    ) -> QuantScheme:
        """More bits for the first `early_layers` layers (the seeds' layer-wise allocation)."""
        n = max(0, min(early_layers, num_layers))
        return cls(precision=(early,) * n + (rest,) * (num_layers - n), **fields)  # type: ignore[arg-type]
