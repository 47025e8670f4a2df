"""Checks of client input. Each error names the field, the value and the limit."""

from __future__ import annotations

import re
from collections.abc import Sequence

import numpy as np
from kvstore_proto import dtypes

from kvstore.errors import InvalidArgument, QuotaExceeded
from kvstore.memory.make_pool import check_device
from kvstore.policy import policy_names
from kvstore.store import precision
from kvstore.store.types import (
    BUDGET_MODES,
    IMPORTANCE,
    SLIDING_WINDOW,
    STATIC,
    UNCONSTRAINED,
    NamespaceSpec,
    SequenceOptions,
    StoreLimits,
)

NAME_RE = re.compile(r"[A-Za-z0-9_.-]{1,64}")
MAX_TOKEN_ID = 2**31 - 1
MAX_PAGE_TOKENS = 65536
_INT32 = np.dtype(np.int32)
_LE_UINT32 = np.dtype("<u4")  # packed ids (token_ids_u32), read in place
_LE_INT32 = np.dtype("<i4")
_UNSIGNED = {4: np.uint32, 8: np.uint64}
_MAX = np.maximum.reduce
try:  # packed ids' range check in C (kvstore/_chainhash.c): numpy's reduction costs ~3 µs a call
    from kvstore._chainhash import first_over
except ImportError:  # a tree used without building it: numpy's alone
    first_over = None


class PackedIds:
    """A request's packed token ids (`token_ids_u32`: little-endian uint32, whole ids, checked by
    kvstore/server/tokens.py), handed to the store as they came: `token_bytes` range-checks
    them in C and hashes those very bytes, with no numpy call and no copy; `token_array`
    takes them too."""

    __slots__ = ("data",)

    def __init__(self, data: bytes) -> None:
        self.data = data

    def __len__(self) -> int:
        return len(self.data) // 4


def token_bytes(
    token_ids: Sequence[int] | PackedIds, *, field: str, vocab_size: int, limits: StoreLimits
) -> bytes:
    """The ids `token_array` returns, as the little-endian int32 bytes hashing takes."""
    if type(token_ids) is PackedIds and first_over is not None:
        data = token_ids.data
        _check_count(len(data) // 4, field, limits)
        if first_over(data, vocab_size - 1 if vocab_size else MAX_TOKEN_ID) < 0:
            return data  # (in range, a uint32 id is the same 4 bytes as an int32 one)
    return token_array(token_ids, field=field, vocab_size=vocab_size, limits=limits).tobytes()


def _check_count(n: int, field: str, limits: StoreLimits) -> None:
    if n > limits.max_request_tokens:  # a quota (docs/security.md): RESOURCE_EXHAUSTED
        raise QuotaExceeded(
            "max_request_tokens",
            f"{field} has {n} ids; the quota is max_request_tokens={limits.max_request_tokens}",
        )


def token_array(
    token_ids: Sequence[int] | PackedIds, *, field: str, vocab_size: int, limits: StoreLimits
) -> np.ndarray:
    """Token ids as little-endian int32, after checking count and range (`token_ids` itself
    when it is such an array already: read it, do not keep it)."""
    if type(token_ids) is PackedIds:
        token_ids = np.frombuffer(token_ids.data, dtype=_LE_UINT32)
    n = len(token_ids)
    _check_count(n, field, limits)
    try:
        arr = np.asarray(token_ids)  # a request's repeated int32 converts as int32, in C
        if arr.dtype != _INT32 and arr.dtype != _LE_UINT32:  # (an in-process caller's list: checked below)
            arr = np.asarray(token_ids, dtype=np.int64)
    except (OverflowError, ValueError, TypeError) as e:
        raise InvalidArgument(f"{field} must be a list of integers in [0, {MAX_TOKEN_ID}]: {e}") from None
    top = vocab_size - 1 if vocab_size else MAX_TOKEN_ID
    if arr.dtype == _LE_UINT32 and first_over is not None and arr.flags.c_contiguous:
        in_range = first_over(arr, top) < 0  # (a request's packed ids, the common case: in C)
    else:  # One reduction, no temporary: seen unsigned, a negative id is above every valid one.
        in_range = not n or _MAX(arr.view(_UNSIGNED[arr.dtype.itemsize]), axis=None) <= top
    if not in_range:
        bad = np.flatnonzero((arr < 0) | (arr > top))
        if bad.size:
            i = int(bad[0])
            upper = f"< vocab_size={vocab_size}" if vocab_size else f"<= {MAX_TOKEN_ID}"
            raise InvalidArgument(
                f"{field}[{i}]={int(arr[i])} is out of range: token ids must be >= 0 and {upper}"
                + (f" ({bad.size} bad ids in all)" if bad.size > 1 else "")
            )
    # In range, a uint32 id is the same 4 bytes as an int32 one: a view, not a copy.
    return arr.view(_LE_INT32) if arr.dtype == _LE_UINT32 else arr.astype(_LE_INT32, copy=False)


def extra_keys(value: bytes, limits: StoreLimits) -> bytes:
    if len(value) > limits.max_extra_keys_bytes:
        raise InvalidArgument(
            f"extra_keys has {len(value)} bytes; the limit is max_extra_keys_bytes={limits.max_extra_keys_bytes}"
        )
    return value


def non_negative(field: str, value: int, limit: int, limit_name: str) -> int:
    if value < 0:
        raise InvalidArgument(f"{field}={value} is negative; it must be >= 0")
    if value > limit:
        raise InvalidArgument(f"{field}={value} is over the limit {limit_name}={limit}")
    return value


def namespace_spec(spec: NamespaceSpec, limits: StoreLimits) -> None:
    where = f"namespace {spec.name!r}"
    if not NAME_RE.fullmatch(spec.name):
        raise InvalidArgument(f"name={spec.name!r} must match [A-Za-z0-9_.-]{{1,64}}")
    for field in ("num_layers", "num_kv_heads", "head_dim", "page_tokens", "num_pages"):
        value = getattr(spec, field)
        if value <= 0:
            raise InvalidArgument(f"{where}: {field}={value} must be > 0")
    if spec.page_tokens > MAX_PAGE_TOKENS:
        raise InvalidArgument(f"{where}: page_tokens={spec.page_tokens} is over the limit {MAX_PAGE_TOKENS}")
    if spec.dtype not in dtypes.BY_NAME:
        raise InvalidArgument(f"{where}: dtype={spec.dtype!r} must be one of {', '.join(dtypes.NAMES)}")
    if spec.vocab_size < 0 or spec.vocab_size > MAX_TOKEN_ID:
        raise InvalidArgument(f"{where}: vocab_size={spec.vocab_size} must be in [0, {MAX_TOKEN_ID}]")
    if spec.policy not in policy_names():
        raise InvalidArgument(
            f"{where}: policy={spec.policy!r} is unknown; known: {', '.join(policy_names())}"
        )
    bad_device = check_device(spec.device)
    if bad_device:
        raise InvalidArgument(f"{where}: {bad_device}")
    bad = precision.problem(
        spec.tier_dtype, spec.tier_schedule, spec.tier_error_bound, spec.num_layers, spec.dtype
    )
    if bad:
        raise InvalidArgument(f"{where}: {bad}")
    if spec.tier_quantized:
        try:
            precision.check_codec(*spec.tier_codec())
        except ValueError as e:
            raise InvalidArgument(f"{where}: the quantized tier cannot store these pages: {e}") from None
    if not 0.0 <= spec.tier_share <= 1.0:  # (NaN fails too)
        raise InvalidArgument(f"{where}: tier_share={spec.tier_share} must be in [0, 1] (0 = no share)")
    pool_bytes = spec.page_stride * spec.num_pages
    if pool_bytes > limits.max_pool_bytes:
        raise InvalidArgument(
            f"{where}: pool of {spec.num_pages} pages x {spec.page_stride} bytes = {pool_bytes} bytes "
            f"is over the limit max_pool_bytes={limits.max_pool_bytes}"
        )


def sequence_options(options: SequenceOptions, max_tokens: int, page_tokens: int) -> None:
    """A budget that makes sense for the namespace; errors name the field."""
    mode = options.mode
    if mode not in BUDGET_MODES:
        raise InvalidArgument(f"options.mode={mode!r} is unknown; known: {', '.join(BUDGET_MODES)}")
    for name in ("sink_tokens", "window_tokens", "budget_pages"):
        value = getattr(options, name)
        if value < 0:
            raise InvalidArgument(f"options.{name}={value} is negative; it must be >= 0")
        if value > MAX_TOKEN_ID:
            raise InvalidArgument(f"options.{name}={value} is over the limit {MAX_TOKEN_ID}")
    used = {
        UNCONSTRAINED: (),
        STATIC: (),
        SLIDING_WINDOW: ("sink_tokens", "window_tokens"),
        IMPORTANCE: ("sink_tokens", "budget_pages"),
    }[mode]
    for name in ("sink_tokens", "window_tokens", "budget_pages"):
        if name not in used and getattr(options, name):
            raise InvalidArgument(
                f"options.{name}={getattr(options, name)} has no meaning with options.mode={mode}; leave it 0"
            )
    if mode == STATIC and max_tokens <= 0:
        raise InvalidArgument(f"options.mode=static needs max_tokens > 0 (got max_tokens={max_tokens})")
    if mode in (SLIDING_WINDOW, IMPORTANCE) and max_tokens:
        raise InvalidArgument(
            f"max_tokens={max_tokens} with options.mode={mode}: a budgeted sequence preallocates nothing; "
            "leave max_tokens 0"
        )
    if mode == SLIDING_WINDOW and options.window_tokens <= 0:
        raise InvalidArgument(
            f"options.window_tokens={options.window_tokens} must be > 0 with options.mode=sliding_window"
        )
    if mode == IMPORTANCE:
        sinks = -(-options.sink_tokens // page_tokens)
        if options.budget_pages < sinks + 1:
            raise InvalidArgument(
                f"options.budget_pages={options.budget_pages} is smaller than the sink pages + 1 = {sinks + 1} "
                f"(sink_tokens={options.sink_tokens} fill {sinks} pages of page_tokens={page_tokens}; "
                "one more holds the last page)"
            )
