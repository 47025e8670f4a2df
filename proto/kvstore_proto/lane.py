"""The lane's framing: the daemon's local fast lane for the put/get calls (written by hand next
to the generated code: the daemon and the client both read it; docs/api.md, "The lane").

Why: over gRPC a 1-page put costs ~0.86 ms, most of it grpc's per-call machinery on both sides
(the sync client and grpc.aio), not the store. Beside the daemon's gRPC unix socket `S`
listens `S.lane` (same directory, mode 0600), a SOCK_STREAM unix socket carrying the SAME
protobuf messages as the gRPC methods, one frame each way a call:

    frame:   u32 length | body (length bytes; at most the daemon's gRPC max message size + 64)
    hello:   body = MAGIC | token (UTF-8; empty on a daemon without tokens). First frame on a
             connection; answered by a reply of status 0 whose payload is SERVER_HELLO.
    request: body = u8 name_len | method name (ASCII, e.g. b"Put") | serialized request
    reply:   body = u8 status (grpc.StatusCode value, 0 = OK) | payload: the serialized reply
             when status is 0, else the error message (UTF-8)

    follow-up: a request frame whose method is FOLLOW_UP (b"PutWritten") carrying a PutWritten:
             sent after a Put with bytes_follow, once its pages are copied; it is that Put's
             second frame, not a call (no reply of its own). The Put's one reply comes after it.

Integers little-endian. Requests on a connection are answered one at a time, in order. A frame
over the limit or a hello that is not one is answered with an error reply, and the daemon
closes the connection. The token is presented per call exactly as gRPC metadata
`authorization: Bearer <token>` would be: each call is checked for its scopes.
"""

from __future__ import annotations

import struct

MAGIC = b"KVLANE1\n"
SERVER_HELLO = b"kvstore lane 1"
SUFFIX = ".lane"  # the lane's path: the gRPC socket's plus this
LENGTH = struct.Struct("<I")
MAX_TOKEN_BYTES = 4096
FRAME_SLACK = 64  # header bytes a request frame may carry beyond the message itself
SERVICE = "kvstore.v1.KVStore"
# What the client's put/get/release path calls; every other method stays on gRPC only.
METHODS = ("Put", "Lookup", "Reserve", "Seal", "Release", "BatchLookup", "BatchReserve", "BatchSeal")
FOLLOW_UP = b"PutWritten"  # the frame that ends a Put with bytes_follow (its pages are written)


def frame(body: bytes) -> bytes:
    return LENGTH.pack(len(body)) + body


_HEAD = struct.Struct("<IB")  # a frame's length and its body's first byte


def request(method: bytes, payload: bytes) -> bytes:
    """A whole request frame for `method` (its name, ASCII) carrying `payload`."""
    return _HEAD.pack(len(method) + 1 + len(payload), len(method)) + method + payload


def reply(code: int, payload: bytes) -> bytes:
    return _HEAD.pack(len(payload) + 1, code) + payload


def hello(token: str) -> bytes:
    """The hello frame presenting `token` ("" on a daemon without tokens)."""
    return frame(MAGIC + token.encode())


def split(buf: bytearray) -> bytes | None:
    """The body of the first whole frame in `buf`, removed from it; None until one is whole.
    (No size limit here: the daemon checks its own before it buffers a frame.)"""
    if len(buf) < 4:
        return None
    (n,) = LENGTH.unpack_from(buf)
    if len(buf) < 4 + n:
        return None
    body = bytes(buf[4 : 4 + n])
    del buf[: 4 + n]
    return body
