"""The daemon's configuration: one typed definition table, filled from (lowest to highest
precedence) defaults, a TOML file, `KVSTORE_*` environment variables and command-line flags,
and validated once at start. This is the only module that reads the environment or decides
which file to read; kvstore/config_parse.py turns the raw values into typed ones.

The dataclass fields below *are* the table: their metadata carries the help text and the
check, and the flags, the environment variables and docs/config.md are all derived from them,
so a key cannot exist in one place and not another.
"""

from __future__ import annotations

import argparse
import os
import typing
from collections.abc import Mapping
from dataclasses import MISSING, asdict, dataclass, field, fields
from typing import Any, Literal

from kvstore_proto import dtypes

from kvstore.config_checks import (
    U32_MAX,
    Check,
    check_grpc_experiments,
    check_host_port,
    check_ns_name,
    check_policy,
    check_salt,
    check_shm_prefix,
    check_socket_path,
    check_tls_file,
    check_tokens_file,
    in_range,
    listener_problems,
    positive,
)
from kvstore.config_parse import doc_default, expect, fill, format_size, read_toml
from kvstore.memory.make_pool import check_device
from kvstore.store import precision
from kvstore.store.types import NamespaceSpec, StoreLimits
from kvstore.store.validate import MAX_PAGE_TOKENS, MAX_TOKEN_ID

ENV_PREFIX = "KVSTORE_"
CONFIG_ENV = "KVSTORE_CONFIG"

LogLevel = Literal["debug", "info", "warning", "error", "critical"]
DType = Literal[dtypes.NAMES]  # (a tuple subscript: Literal takes its items as the choices)
TierDType = Literal[precision.TIER_DTYPES]


class ConfigError(ValueError):
    """One or more invalid settings; each line names the key, the value and what is allowed."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def _key(default: Any = MISSING, help: str = "", check: Check | None = None, **extra: Any) -> Any:
    """A field of the table: its default, the help text for flags and docs, and its check.
    `doc_default` replaces the default in the docs; `size=True` accepts "64GiB"."""
    return field(
        default=default, metadata={"help": help, "check": check, "doc_default": "", "size": False} | extra
    )


# ---------------------------------------------------------------- the table


@dataclass(frozen=True)
class ServerConfig:
    """`[server]` in the file; each key also has a `KVSTORE_<KEY>` variable and a `--<key>` flag."""

    # `socket` and `shm_prefix` depend on the user and the environment; load() fills them in.
    socket: str = _key(
        "",
        "unix socket the daemon serves on; its directory is created with mode 0700 (an existing one of ours is "
        "made 0700; one others can write and we cannot fix is refused)",
        check_socket_path,
        doc_default="`$XDG_RUNTIME_DIR/kvstore/kvstore.sock`, else `/tmp/kvstore-<uid>/kvstore.sock`",
    )
    tcp: str = _key(
        "",
        "also serve on HOST:PORT; needs `server.tokens_file` (or `server.tcp_insecure_no_auth`); TLS with "
        "`server.tls_cert`; empty = off",
        check_host_port,
    )
    tokens_file: str = _key(
        "",
        "TOML file of bearer tokens and the scopes each grants per namespace (docs/security.md); its mode "
        "must give group and others nothing. Set: every call (but health and reflection) needs a token, "
        "on every listener; empty = none needed (the unix socket's mode 0600 is the boundary)",
        check_tokens_file,
    )
    tcp_insecure_no_auth: bool = _key(
        False,
        "serve `server.tcp` without tokens: anyone who reaches the port may do anything (a warning at start)",
    )
    lane: bool = _key(
        True,
        "also serve the put/get calls (Put, Lookup, Reserve, Seal, Release, Batch*) on `<socket>.lane`, a plain "
        "unix socket beside the gRPC one (same messages, auth and errors; docs/api.md); false = gRPC only",
    )
    lane_follow_up_timeout_s: float = _key(
        30.0,
        "seconds a lane Put with bytes_follow waits for its PutWritten frame (the client copying its "
        "pages) before it fails DEADLINE_EXCEEDED, its credit released and the connection closed",
        in_range(0.01, 3600),
    )
    grpc_experiments: str = _key(
        "-event_engine_listener",
        "gRPC core experiments the daemon's gRPC runs with (GRPC_EXPERIMENTS syntax; empty = gRPC's "
        "own defaults). The default has the listener's connections do their socket I/O on the "
        "thread that polls for calls, not hand it to gRPC's event-engine threads: ~15-20 % less CPU "
        "a call (BENCHMARKS.md, rpc). GRPC_EXPERIMENTS in the daemon's environment wins over it",
        check_grpc_experiments,
    )
    tls_cert: str = _key("", "PEM certificate chain of the TCP listener: TLS on `server.tcp`", check_tls_file)
    tls_key: str = _key("", "PEM private key of `server.tls_cert`", check_tls_file)
    tls_client_ca: str = _key(
        "",
        "PEM CA bundle: TCP clients must present a certificate it signed; empty = not asked",
        check_tls_file,
    )
    metrics: str = _key(
        "",
        "serve Prometheus metrics on http://HOST:PORT/metrics (port 0 = any); empty = off; with "
        'tokens_file, only to a bearer token with read on "*" (docs/security.md)',
        check_host_port,
    )
    lease_ttl_s: float = _key(10.0, "lease of a session that asks for none (seconds)", in_range(0.5))
    lease_ttl_max_s: float = _key(300.0, "longest lease a session may ask for (seconds)", in_range(0.5))
    pin_ttl_max_s: float = _key(
        2.0,
        "longest life of a lookup's self-ending pin (LookupRequest.pin_ttl_ms; seconds): its pages cannot "
        "be evicted meanwhile",
        in_range(0.001, 60),
    )
    max_request_tokens: int = _key(1 << 20, "most token ids one request may carry", in_range(1, U32_MAX))
    max_pool_bytes: int = _key(64 << 30, "bytes all namespace pools together may take", positive, size=True)
    max_sessions: int = _key(4096, "most sessions open at once", positive)
    max_sessions_per_client: int = _key(
        1024,
        "most sessions one client may hold open (a client: its token; without tokens, its process); 0 = none",
        in_range(0),
    )
    quarantine_grace_s: float = _key(
        30.0,
        "device pools: how long the reserved pages of a session that ended without closing stay "
        "quarantined when its client's process cannot be watched (seconds; docs/gpu.md)",
        in_range(0, 3600),
    )
    device_staging_bytes: int = _key(
        256 << 20,
        "device pools: the pinned host memory each one allocates at its start for the tier copies "
        "(a quarter the ring copies down go through, the rest one slot a page being copied up; a page "
        "past it is staged in plain memory, a slower copy; docs/gpu.md)",
        in_range(1 << 16),
        size=True,
    )
    shutdown_grace_s: float = _key(
        5.0,
        "on SIGTERM, how long in-flight RPCs may finish (seconds); new ones and those still running after "
        'get UNAVAILABLE "daemon shutting down"',
        in_range(0, 3600),
    )
    dumpable: bool = _key(
        False,
        "leave the daemon dumpable (debugging: gdb, py-spy, core dumps); then other processes of "
        "its user can read its memory and open its pools through /proc (docs/security.md)",
    )
    log_level: LogLevel = _key("info", "log level (logs go to stderr)")  # noqa: RUF009 (ruff: Literal)
    max_extra_keys_bytes: int = _key(
        1024, "longest extra_keys a request may carry (bytes)", in_range(0, 1 << 20)
    )
    default_policy: str = _key("horizon", "eviction policy of a namespace that names none", check_policy)
    hash_memo_entries: int = _key(
        4096,
        "page hashes a lookup remembers, so a prefix looked up again is not hashed again (docs/hashing.md, "
        '"Remembered hashes"); 0 = off',
        in_range(0, 1 << 30),
    )
    hash_memo_bytes: int = _key(
        4 << 20, "most memory the remembered page hashes take (bytes)", in_range(0), size=True
    )
    host_tier_bytes: int = _key(
        0,
        "daemon DRAM below the pools: evicted pages are demoted here (0 = no host tier)",
        in_range(0),
        size=True,
    )
    disk_tier_dir: str = _key(
        "",
        "directory (mode 0700) of the LMDB disk tier below the host tier; kept across restarts; "
        "empty = no disk tier",
    )
    disk_tier_bytes: int = _key(
        8 << 30,
        "most bytes the disk tier's LMDB file may take (its map size); clamped, with a warning, "
        "to what its file system has free at start",
        in_range(2 << 20),
        size=True,
    )
    disk_queue_bytes: int = _key(
        128 << 20,
        "most bytes of pages queued for the disk tier's writer; a demotion past it is dropped "
        "(counted: the page is no longer cached), Admin.Flush waits for room",
        in_range(1 << 20),
        size=True,
    )
    disk_tier_policy: str = _key(
        "",
        "eviction policy of the disk tier (leaves first); empty = `server.default_policy`",
        lambda v: v and check_policy(v),
    )
    write_through: bool = _key(
        False, "queue every page for the disk tier as it is sealed, so a restart finds it"
    )
    page_checksums: bool = _key(
        True, "checksum pages at seal and scrub them, off the loop (docs/security.md)"
    )
    scrub_bytes_per_s: int = _key(
        64 << 20,
        "the scrubber's rate (a pass over a pool at most once a second); 0 = no scrubber",
        in_range(0),
        size=True,
    )
    zero_freed_pages: bool = _key(True, "zero freed pages, off the loop, before they are handed out again")
    zero_freed_after_s: float = _key(
        1.0,
        "seconds a freed page stays free before the background zeroing takes it (a put's credit "
        "takes it meanwhile as it is: its client writes it whole); 0 = at once (docs/security.md)",
        in_range(0, 3600),
    )
    unzeroed_credits: bool = _key(
        True,
        "a client that says it writes every byte of the pages it puts (the library) gets credits "
        "of freed pages not zeroed yet; false: zeroed ones only (docs/security.md)",
    )
    prefetch_pages: int = _key(
        4,
        "on a hit of a whole prompt, promote up to this many pages that followed it last time",
        in_range(0, 1024),
    )
    shm_prefix: str = _key(
        "",
        "name prefix of the pools' memfds (for operators: `/memfd:<prefix><epoch>.<namespace>` in the "
        "daemon's /proc maps); pools have no file in /dev/shm",
        check_shm_prefix,
        doc_default="`kvstore-<uid>-`",
    )


@dataclass(frozen=True)
class NamespaceConfig:
    """One `[[namespace]]` table; keys without a default are required."""

    name: str = _key(help="namespace name, unique", check=check_ns_name)
    num_layers: int = _key(help="transformer layers", check=in_range(1, U32_MAX))
    num_kv_heads: int = _key(help="KV heads per layer", check=in_range(1, U32_MAX))
    head_dim: int = _key(help="head dimension", check=in_range(1, U32_MAX))
    dtype: DType = _key(help="element type of K and V")  # noqa: RUF009 (ruff: Literal)
    page_tokens: int = _key(help="tokens per page", check=in_range(1, MAX_PAGE_TOKENS))
    num_pages: int = _key(help="pages in the pool", check=in_range(1, U32_MAX))
    vocab_size: int = _key(
        0, "token ids must be below this; 0 = any id in [0, 2^31)", in_range(0, MAX_TOKEN_ID)
    )
    policy: str = _key(
        "", "eviction policy; empty = `server.default_policy`", lambda v: v and check_policy(v)
    )
    salt: str = _key(
        "",
        "hash salt: `hex:<digits>` for raw bytes, else the string's UTF-8; empty = derived from the name",
        check_salt,
    )
    model_fingerprint: str = _key("", "model the KV belongs to; empty = any")
    device: str = _key(
        "cpu",
        "where the pool lives: `cpu` (shared memory), `cuda:N` or `cuda:GPU-<uuid>` (GPU memory shared "
        "over CUDA IPC; docs/gpu.md), `auto` (`cuda:0` when CuPy can use a GPU, else `cpu`; the log says "
        "why), `fake:<id>` (CI's fake device)",
        lambda v: check_device(v) or None,
    )
    tier_dtype: TierDType = _key("fp", precision.DTYPE_HELP)  # noqa: RUF009 (ruff: Literal)
    tier_schedule: str = _key("", precision.SCHEDULE_HELP, precision.schedule_problem)
    tier_error_bound: float = _key(0.0, precision.BOUND_HELP, precision.bound_problem)
    max_session_pages: int = _key(
        0, "pool pages one session may hold here at once (sequences and pins); 0 = none", in_range(0, U32_MAX)
    )
    tier_share: float = _key(
        0.0, "share of the host and disk tiers its pages may hold (docs/tiers.md); 0 = none", in_range(0, 1)
    )


# 8 layers x 2 (K,V) x 16 tokens x 4 heads x 64 dims x 2 bytes = 128 KiB a page, 256 MiB in all.
# `auto`: with no config, the daemon puts it on the GPU where CuPy can use one and in shared memory
# everywhere else (the log says which and why), so `make run` shows the GPU pool on a GPU machine.
DEFAULT_NAMESPACE = NamespaceConfig(
    name="default", num_layers=8, num_kv_heads=4, head_dim=64, dtype="float16", page_tokens=16,
    num_pages=2048, device="auto",
)  # fmt: skip


@dataclass(frozen=True)
class Config:
    server: ServerConfig
    namespaces: tuple[NamespaceConfig, ...]
    config_file: str = ""  # where the file layer came from; empty = none

    def store_limits(self) -> StoreLimits:
        s = self.server
        return StoreLimits(
            max_request_tokens=s.max_request_tokens,
            max_pool_bytes=s.max_pool_bytes,
            lease_ttl_default_s=s.lease_ttl_s,
            lease_ttl_max_s=s.lease_ttl_max_s,
            max_sessions=s.max_sessions,
            max_sessions_per_client=s.max_sessions_per_client,
            max_extra_keys_bytes=s.max_extra_keys_bytes,
            pin_ttl_max_s=s.pin_ttl_max_s,
            quarantine_grace_s=s.quarantine_grace_s,
            hash_memo_entries=s.hash_memo_entries,
            hash_memo_bytes=s.hash_memo_bytes,
            device_staging_bytes=s.device_staging_bytes,
        )

    def namespace_specs(self) -> list[NamespaceSpec]:
        return [_to_spec(ns, self.server.default_policy) for ns in self.namespaces]


def _to_spec(ns: NamespaceConfig, default_policy: str) -> NamespaceSpec:
    # The keys match NamespaceSpec's fields one for one; only policy and salt need resolving.
    salt = bytes.fromhex(ns.salt[4:]) if ns.salt.startswith("hex:") else ns.salt.encode()
    return NamespaceSpec(**asdict(ns) | {"policy": ns.policy or default_policy, "salt": salt})


# ---------------------------------------------------------------- loading


def env_name(key: str) -> str:
    return ENV_PREFIX + key.upper()


def flag_name(key: str) -> str:
    return "--" + key.replace("_", "-")


def runtime_defaults(environ: Mapping[str, str]) -> dict[str, str]:
    """The defaults that depend on who runs the daemon and where."""
    uid = os.getuid()
    xdg = environ.get("XDG_RUNTIME_DIR")
    sock_dir = os.path.join(xdg, "kvstore") if xdg else f"/tmp/kvstore-{uid}"
    return {"socket": os.path.join(sock_dir, "kvstore.sock"), "shm_prefix": f"kvstore-{uid}-"}


def add_flags(parser: argparse.ArgumentParser) -> None:
    """One flag per server key. Values stay strings so load() parses and reports them like env values."""
    parser.add_argument("--config", metavar="FILE", help=f"TOML config file (env {CONFIG_ENV})")
    hints = typing.get_type_hints(ServerConfig)
    for f in fields(ServerConfig):
        hint = hints[f.name]
        metavar = {int: "BYTES" if f.metadata["size"] else "N", float: "SECONDS"}.get(hint, f.name.upper())
        if typing.get_origin(hint) is Literal:
            metavar = "{" + ",".join(typing.get_args(hint)) + "}"
        if hint is bool:
            metavar = "{true,false}"
        more = f"env {env_name(f.name)}, default {doc_default(f)}".replace("`", "").replace("%", "%%")
        parser.add_argument(
            flag_name(f.name), dest=f.name, metavar=metavar, help=f"{f.metadata['help']} ({more})"
        )


def load(
    *,
    config_file: str | None = None,
    flags: Mapping[str, Any] | None = None,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Build the config; raises ConfigError listing every invalid setting."""
    environ = os.environ if environ is None else environ
    problems: list[str] = []
    path = config_file or environ.get(CONFIG_ENV, "")
    doc = read_toml(path, problems) if path else {}
    for key in doc.keys() - {"server", "namespace"}:
        problems.append(f"{key}: unknown top-level key in {path}; allowed: [server], [[namespace]]")

    file_server = expect(doc.get("server", {}), dict, "server: must be a table ([server])", problems)
    keys = [f.name for f in fields(ServerConfig)]
    # Lowest precedence first; each value carries where it came from, for the error message.
    layers = [
        {k: (v, f"from {path}") for k, v in file_server.items()},
        {k: (environ[env_name(k)], f"from {env_name(k)}") for k in keys if env_name(k) in environ},
        {k: (v, f"from {flag_name(k)}") for k, v in (flags or {}).items() if k in keys and v is not None},
    ]
    server_values = fill(ServerConfig, "server", layers, problems, **runtime_defaults(environ))
    if server_values:  # take `unix:/path` too, as clients do, and pin a relative path down now
        server_values["socket"] = os.path.abspath(server_values["socket"].removeprefix("unix:"))
    server = ServerConfig(**(server_values or runtime_defaults(environ)))
    problems += listener_problems(server)
    if server.lease_ttl_max_s < server.lease_ttl_s:
        problems.append(
            f"server.lease_ttl_max_s={server.lease_ttl_max_s:g}: "
            f"must be >= server.lease_ttl_s={server.lease_ttl_s:g}"
        )

    tables = expect(
        doc.get("namespace", []), list, "namespace: must be an array of tables ([[namespace]])", problems
    )
    namespaces = [DEFAULT_NAMESPACE] if not tables else []
    for i, table in enumerate(tables):
        table = expect(table, dict, f"namespace[{i}]: must be a table", problems)
        values = fill(NamespaceConfig, f"namespace[{i}]", [{k: (v, "") for k, v in table.items()}], problems)
        if values is not None:
            namespaces.append(NamespaceConfig(**values))
    _check_namespaces(namespaces, server, problems)

    if problems:
        raise ConfigError(problems)
    return Config(server=server, namespaces=tuple(namespaces), config_file=path)


def _check_namespaces(namespaces: list[NamespaceConfig], server: ServerConfig, problems: list[str]) -> None:
    seen: dict[str, int] = {}
    total = 0
    for i, ns in enumerate(namespaces):
        if ns.name in seen:
            problems.append(f"namespace[{i}].name={ns.name!r}: already used by namespace[{seen[ns.name]}]")
        seen.setdefault(ns.name, i)
        # The pool takes page_stride (page_bytes rounded up to 4 KiB) per page, so count that.
        spec = _to_spec(ns, server.default_policy)
        bad = precision.problem(ns.tier_dtype, ns.tier_schedule, ns.tier_error_bound, ns.num_layers, ns.dtype)
        if bad:
            problems.append(f"namespace[{i}] {ns.name!r}: {bad}")
        pool = spec.page_stride * spec.num_pages
        total += pool
        if total > server.max_pool_bytes:
            problems.append(
                f"namespace[{i}] {ns.name!r}: pool of {spec.num_pages} pages x {spec.page_stride} bytes = "
                f"{format_size(pool)} brings all pools to {format_size(total)}, over "
                f"server.max_pool_bytes={format_size(server.max_pool_bytes)}"
            )
