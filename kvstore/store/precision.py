"""A namespace's precision in the tiers below the pool (docs/tiers.md, "Quantized tiers").

`tier_dtype` is how the host and disk tiers store a page: "fp" keeps the pool's own bytes
(byte-exact, as before), "int8"/"int4" store a quantized page record (kvstore/tiers/quant.py)
that a promotion dequantizes back into the pool. `tier_schedule` gives the first layers other
precisions (early layers are the sensitive ones: CacheGen's layer bins, SGLang's bf16 layer
0): comma-separated runs `<dtype>:<layers>` from layer 0, the remaining layers at
`tier_dtype`; e.g. "fp:1,int8:3" with tier_dtype "int4" stores layer 0 as is, layers 1-3 at
int8 and the rest at int4. `tier_error_bound` (> 0) bounds each layer's reconstruction
error; a layer over it is stored at the next higher precision (0 = no bound).
"""

from __future__ import annotations

import math
from dataclasses import replace

from kvstore.quant import PageShape, QuantScheme, encode

FP = "fp"
TIER_DTYPES = (FP, "int8", "int4")
# The config keys' help (docs/config.md is made from it).
DTYPE_HELP = (
    "how the host and disk tiers store its pages: `fp` = the pool's bytes (byte-exact); `int8`/`int4` = "
    "quantized records, dequantized on promotion (docs/tiers.md)"
)
SCHEDULE_HELP = (
    "other precisions for the first layers: runs `<dtype>:<layers>` from layer 0, the rest at "
    "`tier_dtype` (e.g. `fp:1,int8:3`); empty = every layer at `tier_dtype`"
)
BOUND_HELP = (
    "a quantized layer whose relative L2 error (of its K or V) is over this is stored at the next higher "
    "precision; 0 = no bound"
)
# The pool dtypes a quantizer reads (ints and fp8 stay "fp": nothing to gain or no scale to keep).
QUANTIZABLE_DTYPES = ("float16", "bfloat16", "float32")


def parse_schedule(schedule: str) -> list[tuple[str, int]]:
    """The runs of a `tier_schedule`, (dtype, layers) from layer 0; ValueError naming it."""
    runs = []
    for run in filter(None, (r.strip() for r in schedule.split(","))):
        dtype, sep, count = run.partition(":")
        dtype = dtype.strip()
        if not sep or dtype not in TIER_DTYPES or not count.strip().isdigit() or int(count) <= 0:
            raise ValueError(
                f"tier_schedule={schedule!r}: {run!r} must be <dtype>:<layers> with dtype one of "
                f"{', '.join(TIER_DTYPES)} and layers > 0 (e.g. 'fp:1,int8:3')"
            )
        runs.append((dtype, int(count)))
    return runs


def layer_dtypes(tier_dtype: str, schedule: str, num_layers: int) -> tuple[str, ...]:
    """Each layer's precision; ValueError (naming the field and value) if the two do not parse
    or the schedule names more layers than there are."""
    if tier_dtype not in TIER_DTYPES:
        raise ValueError(f"tier_dtype={tier_dtype!r} must be one of {', '.join(TIER_DTYPES)}")
    runs = parse_schedule(schedule)
    named = sum(n for _, n in runs)
    if named > num_layers:
        raise ValueError(f"tier_schedule={schedule!r} names {named} layers; the namespace has {num_layers}")
    out = [d for d, n in runs for _ in range(n)]
    return tuple(out + [tier_dtype] * (num_layers - named))


def check_error_bound(bound: float) -> None:
    if not math.isfinite(bound) or not 0 <= bound < 1:
        raise ValueError(
            f"tier_error_bound={bound} must be in [0, 1): a layer's relative L2 error (of its K or V) bound, 0 = none"
        )


def problem(tier_dtype: str, schedule: str, bound: float, num_layers: int, dtype: str) -> str | None:
    """What is wrong with a namespace's tier precision, naming the field; None if nothing."""
    try:
        layers = layer_dtypes(tier_dtype, schedule, num_layers)
        check_error_bound(bound)
    except ValueError as e:
        return str(e)
    if any(d != FP for d in layers) and dtype not in QUANTIZABLE_DTYPES:
        return (
            f"tier_dtype={tier_dtype!r} tier_schedule={schedule!r} quantizes pages of dtype={dtype!r}; "
            f"only {', '.join(QUANTIZABLE_DTYPES)} can be quantized (use tier_dtype='fp')"
        )
    return None


def schedule_problem(schedule: str) -> str | None:
    """A config key's check: the schedule's syntax (its length is checked with num_layers)."""
    try:
        parse_schedule(schedule)
    except ValueError as e:
        return str(e).partition(": ")[2] or str(e)
    return None


def bound_problem(bound: float) -> str | None:
    try:
        check_error_bound(bound)
    except ValueError:
        return "must be in [0, 1): a relative L2 error (of a layer's K or V), 0 = no bound"
    return None


SINK_TOKENS = 4  # the first tokens of a sequence, kept exact in its first page's record


def codec_scheme(
    num_layers: int,
    page_tokens: int,
    num_kv_heads: int,
    head_dim: int,
    dtype: str,
    layers: tuple[str, ...],
    bound: float,
) -> tuple[PageShape, QuantScheme]:
    """The codec's view of a namespace (kvstore/quant): keys, values and outliers as the
    codec's preset for the fewest bits in the schedule; a bound of 0 is none. QuantError
    (a ValueError) if the codec cannot take it."""
    shape = PageShape(num_layers, page_tokens, num_kv_heads, head_dim, dtype)
    lowest = max((d for d in layers if d != FP), key=TIER_DTYPES.index, default=FP)
    return shape, replace(QuantScheme.preset(lowest), precision=layers, bound=bound or None)


def check_codec(shape: PageShape, scheme: QuantScheme) -> None:
    """ValueError (a QuantError) if the codec refuses the scheme for this page (e.g. outliers
    with head_dim over 256): found when the namespace is made, not at its first demotion."""
    scheme.layer_precisions(shape.num_layers)
    # (one token a page: the codec's checks without the cost of a whole page on the loop)
    one = PageShape(shape.num_layers, 1, shape.num_kv_heads, shape.head_dim, shape.dtype)
    encode(bytes(one.page_bytes), one, scheme, sink_tokens=1)
