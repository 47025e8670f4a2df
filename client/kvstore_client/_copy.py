"""Copies of whole pages between a caller's buffer and the pool, for the fast path.

Page i of the buffer is at bytes [i * page_bytes, (i+1) * page_bytes). Pages whose slots
follow each other move in one copy (the daemon hands out a put's credit in ascending slots,
so most runs are the whole request): one copy a run, not a few per page. Between host
memory, big copies are split over a few threads (_pcopy.py).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np

from ._pcopy import copy_pairs
from .errors import InvalidArgument

if TYPE_CHECKING:
    import torch

    from .namespace import Namespace


def flat_bytes(buf: Any, what: str) -> Any:
    """A 1-D uint8 view of `buf` (a torch tensor stays one; others become numpy)."""
    if hasattr(buf, "is_contiguous") and hasattr(buf, "untyped_storage"):  # a torch tensor
        if buf.device.type != "cpu" or not buf.is_contiguous():
            raise InvalidArgument(
                f"{what}: need a contiguous CPU tensor, got {buf.device} {tuple(buf.shape)}"
            )
        import torch

        return buf.reshape(-1).view(torch.uint8)
    try:
        return (
            np.frombuffer(memoryview(buf), dtype=np.uint8)
            if not isinstance(buf, np.ndarray)
            else (buf.reshape(-1).view(np.uint8))
        )
    except (TypeError, ValueError) as e:
        raise InvalidArgument(f"{what}: need a contiguous buffer (bytes, numpy array, tensor): {e}") from None


def runs(indices: Sequence[int], slots: Sequence[int]) -> list[list[int]]:
    """[index, slot, count] of each run of pages whose indices and slots both go up by one."""
    if isinstance(indices, range) and indices.step == 1 and len(slots) == len(indices) > 0:
        s0 = slots[0]  # the common case, one run (a credit's slots, a fresh prefix): checked in C
        if list(slots) == list(range(s0, s0 + len(slots))):
            return [[indices.start, s0, len(slots)]]
    out: list[list[int]] = []
    last = None
    for i, s in zip(indices, slots, strict=True):
        if last is not None and last[0] + last[2] == i and last[1] + last[2] == s:
            last[2] += 1
        else:
            last = [i, s, 1]
            out.append(last)
    return out


def _rows(ns: Namespace, slots: Sequence[int]) -> torch.Tensor:
    """The pool as `[num_pages, page_bytes]` uint8 rows, once `slots` are known to be in it."""
    pool = ns.pool
    if slots and max(slots) >= pool.num_pages:
        raise InvalidArgument(f"slot={max(slots)} is outside the pool (num_pages={pool.num_pages})")
    return pool.rows()


def _host(rows: torch.Tensor, buf: Any) -> tuple[Any, Any]:
    """(rows, buf) as numpy arrays when both are in host memory: numpy copies with one
    memmove (glibc's, with non-temporal stores for big runs), 5-20% faster than torch's copy
    here and without its per-call overhead; a device pool's rows stay torch tensors."""
    if rows.device.type == "cpu":
        return rows.numpy(), buf if isinstance(buf, np.ndarray) else buf.detach().numpy()
    if isinstance(buf, np.ndarray):  # torch copies to the device from a tensor only
        import torch

        buf = torch.from_numpy(buf if buf.flags.writeable else buf.copy())
    return rows, buf


def copy_in(
    ns: Namespace, src: Any, indices: Sequence[int], slots: Sequence[int], sums: bool = False
) -> bytes | None:
    """Page indices[k] of `src` (flat_bytes) into slot slots[k]. With `sums`, also each page's
    XXH3-64 taken as it was copied, 8 bytes little-endian a page in the order of `slots` (a
    Put's `page_sums`), where the copy could take them (host pages, _ntcopy built, AVX2):
    else None."""
    rows, src = _host(_rows(ns, slots), src)
    size = ns.pool.page_bytes
    pairs = [
        (rows[s : s + n], src[i * size : (i + n) * size].reshape(n, size)) for i, s, n in runs(indices, slots)
    ]
    if sums and pairs and isinstance(pairs[0][0], np.ndarray):
        out = np.empty(len(slots), dtype="<u8")
        return out.tobytes() if copy_pairs(pairs, out) else None
    _copy(pairs)
    return None


def copy_out(ns: Namespace, dst: torch.Tensor, slots: Sequence[int]) -> None:
    """Slot slots[i] into page i of the flat uint8 tensor `dst`."""
    rows, out = _host(_rows(ns, slots), dst)
    size = ns.pool.page_bytes
    pairs = [
        (out[i * size : (i + n) * size].reshape(n, size), rows[s : s + n])
        for i, s, n in runs(range(len(slots)), slots)
    ]
    _copy(pairs)


def _copy(pairs: list[tuple[Any, Any]]) -> None:
    if pairs and isinstance(pairs[0][0], np.ndarray):  # host to host: maybe over threads
        copy_pairs(pairs)
        return
    for dst, src in pairs:  # a device pool's rows: torch copies (and syncs) itself
        dst[:] = src
