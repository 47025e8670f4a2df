"""The pool socket's framing: how a client trades a one-time ticket for its pool's descriptor
(written by hand next to the generated code: the daemon and the client both read it;
docs/api.md, "The pool socket").

gRPC cannot carry a file descriptor, so beside the daemon's gRPC unix socket `S` listens
`S.pool` (same directory, mode 0600), a SOCK_STREAM unix socket. One request a connection:

    request: b"KVPF" | u8 version (1) | u16 token_len | 32-byte ticket | token (UTF-8)
    reply:   b"KVPF" | u8 version (1) | u8 status | u8 access | u64 epoch | u64 nbytes
             | u16 text_len | text (UTF-8)

Integers little-endian. The ticket is `PoolDescriptor.pool_ticket` from the reply of
GetNamespace (or CreateNamespace); the token is the bearer token the ticket was asked with
(empty on a daemon without tokens). status 0 (GRANTED): exactly one descriptor rides with the
reply (SCM_RIGHTS), `access` says how it was opened (1 read-only, 2 read-write), `epoch` and
`nbytes` are its pool's. Any other status: refused, no descriptor, `text` says why. The daemon
then closes the connection.
"""

from __future__ import annotations

import struct

MAGIC = b"KVPF"
VERSION = 1
SUFFIX = ".pool"  # the pool socket's path: the gRPC socket's plus this
TICKET_BYTES = 32
MAX_TOKEN_BYTES = 4096
REQUEST = struct.Struct("<4sBH32s")  # then token_len bytes of token
REPLY = struct.Struct("<4sBBBQQH")  # then text_len bytes of text
MAX_REPLY = REPLY.size + 1024

GRANTED, REFUSED = 0, 1
READ_ONLY, READ_WRITE = 1, 2


def encode_request(ticket: bytes, token: str) -> bytes:
    raw = token.encode()
    if len(ticket) != TICKET_BYTES or len(raw) > MAX_TOKEN_BYTES:
        raise ValueError(f"a ticket is {TICKET_BYTES} bytes and a token at most {MAX_TOKEN_BYTES}")
    return REQUEST.pack(MAGIC, VERSION, len(raw), ticket) + raw


def encode_reply(status: int, access: int = 0, epoch: int = 0, nbytes: int = 0, text: str = "") -> bytes:
    raw = text.encode()[: MAX_REPLY - REPLY.size]
    return REPLY.pack(MAGIC, VERSION, status, access, epoch, nbytes, len(raw)) + raw


def decode_reply(data: bytes) -> tuple[int, int, int, int, str]:
    """(status, access, epoch, nbytes, text); ValueError if `data` is not a whole reply."""
    if len(data) < REPLY.size:
        raise ValueError(f"a reply of {len(data)} bytes (at least {REPLY.size} expected)")
    magic, version, status, access, epoch, nbytes, n = REPLY.unpack_from(data)
    if magic != MAGIC or version != VERSION or len(data) != REPLY.size + n:
        raise ValueError(f"not a version-{VERSION} pool socket reply ({data[:16]!r}...)")
    return status, access, epoch, nbytes, data[REPLY.size :].decode(errors="replace")
