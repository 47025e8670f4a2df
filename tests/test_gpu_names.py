"""The daemon and a client name a GPU the same way, whatever CuPy gives (no GPU needed):
both sides turn CUDA's 16 uuid bytes into `GPU-<uuid>`, and fall back to the PCI bus id
when the bytes are not all there. A stand-in replaces CuPy's two runtime calls."""

from __future__ import annotations

from contextlib import nullcontext
from types import SimpleNamespace

import pytest
from kvstore_client._cuda_pool import visible_uuids

from kvstore.memory.cuda_pool import device_uuids, resolve


def fake_cupy(uuids: list[object]) -> SimpleNamespace:
    runtime = SimpleNamespace(
        getDeviceCount=lambda: len(uuids),
        getDeviceProperties=lambda i: {"uuid": uuids[i]} if uuids[i] is not None else {},
        deviceGetPCIBusId=lambda i: f"0000:{i:02X}:00.0",
    )
    return SimpleNamespace(cuda=SimpleNamespace(runtime=runtime))


def test_both_sides_agree_on_every_device_name() -> None:
    cupy = fake_cupy([bytes(range(16)), b"\x01\x02", None, bytes(16)])
    names = device_uuids(cupy)
    assert names == [
        "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f",
        "PCI-0000:01:00.0",  # cut short: never guessed
        "PCI-0000:02:00.0",  # no uuid at all
        "GPU-00000000-0000-0000-0000-000000000000",
    ]
    assert visible_uuids(cupy) == names


def test_a_namespace_device_resolves_to_this_process_ordinal() -> None:
    cupy = fake_cupy([bytes([9] * 16), bytes(range(16))])
    assert resolve("cuda:1", cupy) == (1, "GPU-00010203-0405-0607-0809-0a0b0c0d0e0f")
    assert resolve("cuda:GPU-00010203-0405-0607-0809-0a0b0c0d0e0f", cupy)[0] == 1
    for bad in ("cuda:2", "cuda:GPU-ffffffff-0000-0000-0000-000000000000"):
        with pytest.raises(ValueError, match="device="):
            resolve(bad, cupy)


def test_a_handle_is_opened_once_per_process_and_closed_by_its_last_mapping() -> None:
    from kvstore_client._cuda_pool import _opened, close_handle, open_handle

    calls: list[tuple[str, object]] = []
    runtime = SimpleNamespace(
        ipcOpenMemHandle=lambda h: calls.append(("open", h)) or 0xBEEF,
        ipcCloseMemHandle=lambda p: calls.append(("close", p)),
    )
    cupy = SimpleNamespace(cuda=SimpleNamespace(runtime=runtime, Device=lambda i: nullcontext()))
    key = ("cuda:GPU-x", b"h" * 64)
    assert open_handle(cupy, 0, key) == open_handle(cupy, 0, key) == 0xBEEF
    assert calls == [("open", b"h" * 64)]  # the second mapping shares the first one's pointer
    close_handle(cupy, 0, key)
    assert calls == [("open", b"h" * 64)] and key in _opened
    close_handle(cupy, 0, key)
    assert calls == [("open", b"h" * 64), ("close", 0xBEEF)] and key not in _opened
