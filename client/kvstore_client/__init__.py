"""Python client of the kvstore daemon: sessions, sequences and lookups over gRPC
(metadata only) and zero-copy torch views of the shared page pool.

Speaks protobuf only; never imports the daemon package `kvstore`.
"""

from . import aio, errors
from ._pcopy import copy_threads, set_copy_threads
from ._wire import namespace_spec
from .aio import AsyncClient, AsyncLookup, AsyncSequence
from .client import Client, Lookup, Sequence, connect
from .errors import KVStoreClientError, PinExpired
from .fastpath import GetResult, PutResult
from .namespace import Namespace
from .pool import PoolMapping, dtype_name, torch_dtype, wire_dtype
from .readiness import wait_until_serving
from .results import (
    AppendResult,
    BuildInfo,
    CloseResult,
    CommitResult,
    EvictResult,
    FlushResult,
    NamespaceStats,
    Page,
    PageState,
    PreemptResult,
    ReleaseResult,
    RpcCalls,
    SequenceOptions,
    Stats,
    TierStats,
)
from .target import default_socket_path, default_target

__all__ = [
    "AppendResult",
    "AsyncClient",
    "AsyncLookup",
    "AsyncSequence",
    "BuildInfo",
    "Client",
    "CloseResult",
    "CommitResult",
    "EvictResult",
    "FlushResult",
    "GetResult",
    "KVStoreClientError",
    "Lookup",
    "Namespace",
    "NamespaceStats",
    "Page",
    "PageState",
    "PinExpired",
    "PoolMapping",
    "PreemptResult",
    "PutResult",
    "ReleaseResult",
    "RpcCalls",
    "Sequence",
    "SequenceOptions",
    "Stats",
    "TierStats",
    "aio",
    "connect",
    "copy_threads",
    "default_socket_path",
    "default_target",
    "dtype_name",
    "errors",
    "namespace_spec",
    "set_copy_threads",
    "torch_dtype",
    "wait_until_serving",
    "wire_dtype",
]
