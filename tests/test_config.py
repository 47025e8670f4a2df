"""kvstore.config: defaults, the precedence file < env < flags, and validation errors that
name the key, the value and what is allowed."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import typing
from pathlib import Path

import pytest
from kvstore_client.target import default_socket_path
from kvstore_proto import dtypes

from kvstore import config as cfg
from kvstore import config_docs
from kvstore.cli.serve import build_parser
from kvstore.store.types import NamespaceSpec, StoreLimits

REPO = Path(__file__).resolve().parents[1]
NS = """
[[namespace]]
name = "{name}"
num_layers = 2
num_kv_heads = 2
head_dim = 16
dtype = "float16"
page_tokens = 4
num_pages = 64
"""


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "kvstore.toml"
    path.write_text(text)
    return str(path)


def flags(*argv: str) -> dict[str, object]:
    """Parse `kvstore serve ARGV` the way the CLI does."""
    return vars(build_parser().parse_args(["serve", *argv]))


def problems(**kwargs: object) -> list[str]:
    with pytest.raises(cfg.ConfigError) as info:
        cfg.load(**{"environ": {}, **kwargs})  # type: ignore[arg-type]
    return info.value.problems


# ---------------------------------------------------------------- defaults


def test_defaults_without_xdg_runtime_dir() -> None:
    c = cfg.load(environ={})
    uid = os.getuid()
    assert c.server.socket == f"/tmp/kvstore-{uid}/kvstore.sock"
    assert c.server.shm_prefix == f"kvstore-{uid}-"
    assert c.server.tcp == ""
    assert (c.server.lease_ttl_s, c.server.lease_ttl_max_s, c.server.shutdown_grace_s) == (10, 300, 5)
    assert c.server.max_request_tokens == 1_048_576
    assert c.server.max_pool_bytes == 64 << 30
    assert c.server.default_policy == "horizon"
    assert c.config_file == ""


def test_socket_default_follows_xdg_runtime_dir() -> None:
    c = cfg.load(environ={"XDG_RUNTIME_DIR": "/run/user/1234"})
    assert c.server.socket == "/run/user/1234/kvstore/kvstore.sock"


@pytest.mark.parametrize("env", [{}, {"XDG_RUNTIME_DIR": "/run/user/1234"}])
def test_client_and_daemon_agree_on_the_default_socket(env: dict[str, str]) -> None:
    assert cfg.load(environ=env).server.socket == default_socket_path(env)


@pytest.mark.parametrize("socket_env", [None, "/run/env.sock"])
def test_client_and_daemon_agree_on_the_socket_of_kvstore_config(
    tmp_path: Path, socket_env: str | None
) -> None:
    """The socket set in the daemon's config file (via KVSTORE_CONFIG, or --config) is where the
    client looks too, and KVSTORE_SOCKET still wins over it: the daemon's own precedence."""
    config = tmp_path / "kvstore.toml"
    config.write_text('[server]\nsocket = "unix:rel/kv.sock"\n')
    env = {"KVSTORE_CONFIG": str(config), "XDG_RUNTIME_DIR": "/run/user/1234"}
    env |= {"KVSTORE_SOCKET": socket_env} if socket_env else {}
    daemon = cfg.load(environ=env).server.socket
    assert daemon == (socket_env or os.path.abspath("rel/kv.sock"))
    assert default_socket_path(env) == daemon
    del env["KVSTORE_CONFIG"]
    assert (
        default_socket_path(env, config_file=str(config))
        == cfg.load(config_file=str(config), environ=env).server.socket
    )


def test_default_namespace_is_256_mib() -> None:
    (spec,) = cfg.load(environ={}).namespace_specs()
    assert (spec.name, spec.num_layers, spec.num_kv_heads, spec.head_dim) == ("default", 8, 4, 64)
    assert (spec.dtype, spec.page_tokens, spec.num_pages, spec.policy) == ("float16", 16, 2048, "horizon")
    assert spec.page_stride * spec.num_pages == 256 << 20


def test_configured_namespaces_replace_the_default(tmp_path: Path) -> None:
    c = cfg.load(config_file=write(tmp_path, NS.format(name="a") + NS.format(name="b")), environ={})
    assert [s.name for s in c.namespace_specs()] == ["a", "b"]


# ---------------------------------------------------------------- precedence


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nlease_ttl_s = 3\nlog_level = 'warning'\n")
    env = {"KVSTORE_LEASE_TTL_S": "4", "KVSTORE_LOG_LEVEL": "ERROR"}

    assert cfg.load(environ={}).server.lease_ttl_s == 10
    assert cfg.load(config_file=path, environ={}).server.lease_ttl_s == 3
    from_env = cfg.load(config_file=path, environ=env).server
    assert (from_env.lease_ttl_s, from_env.log_level) == (4, "error")
    from_flags = cfg.load(config_file=path, environ=env, flags=flags("--lease-ttl-s", "5")).server
    # The flag wins for its key only; the env still wins over the file for the others.
    assert (from_flags.lease_ttl_s, from_flags.log_level) == (5, "error")


def test_config_file_from_env_and_flag(tmp_path: Path) -> None:
    env_file = write(tmp_path, "[server]\nmax_sessions = 7\n")
    flag_file = tmp_path / "other.toml"
    flag_file.write_text("[server]\nmax_sessions = 8\n")
    assert cfg.load(environ={"KVSTORE_CONFIG": env_file}).server.max_sessions == 7
    chosen = cfg.load(config_file=str(flag_file), environ={"KVSTORE_CONFIG": env_file})
    assert (chosen.server.max_sessions, chosen.config_file) == (8, str(flag_file))


def test_every_server_key_has_an_env_variable_and_a_flag(tmp_path: Path) -> None:
    pem = tmp_path / "x.pem"
    pem.write_text("not checked until the daemon starts")
    tokens = tmp_path / "tokens.toml"
    tokens.write_text('[[token]]\nname = "a"\ntoken = "0123456789abcdef"\n')
    tokens.chmod(0o600)
    values = {
        "socket": "/x/k.sock",
        "tcp": "127.0.0.1:0",
        "metrics": "127.0.0.1:0",
        "lease_ttl_s": "2",
        "lease_ttl_max_s": "30",
        "pin_ttl_max_s": "0.5",
        "max_request_tokens": "9",
        "max_pool_bytes": "1GiB",
        "max_sessions": "3",
        "max_sessions_per_client": "2",
        "shutdown_grace_s": "1",
        "quarantine_grace_s": "4",
        "device_staging_bytes": "32MiB",
        "log_level": "debug",
        "dumpable": "true",
        "max_extra_keys_bytes": "7",
        "default_policy": "lru",
        "hash_memo_entries": "1024",
        "hash_memo_bytes": "1MiB",
        "host_tier_bytes": "64MiB",
        "disk_tier_dir": "/x/disk",
        "disk_tier_bytes": "1GiB",
        "disk_tier_policy": "lfu",
        "disk_queue_bytes": "16MiB",
        "write_through": "true",
        "prefetch_pages": "2",
        "page_checksums": "false",
        "scrub_bytes_per_s": "1MiB",
        "zero_freed_pages": "false",
        "zero_freed_after_s": "0.25",
        "unzeroed_credits": "false",
        "shm_prefix": "p-",
        "tokens_file": str(tokens),
        "tcp_insecure_no_auth": "true",
        "lane": "false",
        "lane_follow_up_timeout_s": "2.5",
        "grpc_experiments": "",
        "tls_cert": str(pem),
        "tls_key": str(pem),
        "tls_client_ca": str(pem),
    }
    assert set(values) == {f.name for f in dataclasses.fields(cfg.ServerConfig)}
    # Keys that are valid only with others: those come from the environment, both ways.
    tls = {"KVSTORE_TCP": "127.0.0.1:0", "KVSTORE_TCP_INSECURE_NO_AUTH": "true"}
    tls |= {"KVSTORE_TLS_CERT": str(pem), "KVSTORE_TLS_KEY": str(pem)}
    companions = {"tcp": {"KVSTORE_TCP_INSECURE_NO_AUTH": "true"}, "tls_cert": tls, "tls_key": tls}
    companions["tls_client_ca"] = tls
    default = cfg.load(environ={}).server
    for key, value in values.items():
        env = companions.get(key, {})
        from_env = getattr(cfg.load(environ=env | {cfg.env_name(key): value}).server, key)
        from_flag = getattr(cfg.load(environ=env, flags=flags(cfg.flag_name(key), value)).server, key)
        assert from_env == from_flag, key
        assert from_env != getattr(default, key) or key == "default_policy", key


def test_sizes_salt_and_socket_forms(tmp_path: Path) -> None:
    text = "[server]\nmax_pool_bytes = '1GiB'\n" + NS.format(name="a") + "salt = 'hex:00ff'\n"
    text += NS.format(name="b") + "salt = 'tenant-b'\n"
    c = cfg.load(config_file=write(tmp_path, text), environ={"KVSTORE_SOCKET": "unix:/x/k.sock"})
    assert c.server.max_pool_bytes == 1 << 30
    assert [s.salt for s in c.namespace_specs()] == [b"\x00\xff", b"tenant-b"]
    assert c.server.socket == "/x/k.sock"
    assert cfg.load(environ={"KVSTORE_MAX_POOL_BYTES": "512M"}).server.max_pool_bytes == 512 << 20


def test_store_limits_carry_every_limit() -> None:
    env = {
        "KVSTORE_MAX_REQUEST_TOKENS": "11",
        "KVSTORE_MAX_POOL_BYTES": "1GiB",
        "KVSTORE_LEASE_TTL_S": "2",
        "KVSTORE_LEASE_TTL_MAX_S": "3",
        "KVSTORE_MAX_SESSIONS": "5",
        "KVSTORE_MAX_EXTRA_KEYS_BYTES": "7",
        "KVSTORE_PIN_TTL_MAX_S": "0.25",
        "KVSTORE_QUARANTINE_GRACE_S": "4",
        "KVSTORE_MAX_SESSIONS_PER_CLIENT": "6",
        "KVSTORE_HASH_MEMO_ENTRIES": "8",
        "KVSTORE_HASH_MEMO_BYTES": "9KiB",
        "KVSTORE_DEVICE_STAGING_BYTES": "10MiB",
    }
    limits = cfg.load(environ=env).store_limits()
    assert limits == StoreLimits(11, 1 << 30, 2.0, 3.0, 5, 7, 0.25, 4.0, 6, 8, 9 << 10, 10 << 20)
    # A limit the store gains later must get a key here too, or this stays at its default.
    defaults = StoreLimits()
    unset = [
        f.name
        for f in dataclasses.fields(StoreLimits)
        if getattr(limits, f.name) == getattr(defaults, f.name)
    ]
    assert unset == []


def test_the_table_matches_the_store_types() -> None:
    assert typing.get_args(cfg.DType) == dtypes.NAMES
    assert [f.name for f in dataclasses.fields(cfg.NamespaceConfig)] == [
        f.name for f in dataclasses.fields(NamespaceSpec)
    ]


# ---------------------------------------------------------------- validation


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"KVSTORE_LEASE_TTL_S": "-1"}, "server.lease_ttl_s=-1 (from KVSTORE_LEASE_TTL_S): must be >= 0.5"),
        (
            {"KVSTORE_LEASE_TTL_S": "soon"},
            "server.lease_ttl_s='soon' (from KVSTORE_LEASE_TTL_S): must be a number",
        ),
        (
            {"KVSTORE_LEASE_TTL_S": "nan"},
            "server.lease_ttl_s='nan' (from KVSTORE_LEASE_TTL_S): must be a number",
        ),
        (
            {"KVSTORE_MAX_SESSIONS": "1.5"},
            "server.max_sessions='1.5' (from KVSTORE_MAX_SESSIONS): must be an integer",
        ),
        ({"KVSTORE_MAX_POOL_BYTES": "lots"}, "must be an integer or a size like 64GiB"),
        (
            {"KVSTORE_LOG_LEVEL": "loud"},
            "server.log_level='loud' (from KVSTORE_LOG_LEVEL): must be one of debug,",
        ),
        ({"KVSTORE_TCP": "localhost"}, "server.tcp='localhost' (from KVSTORE_TCP): must be HOST:PORT"),
        (
            {"KVSTORE_TCP": "localhost:99999"},
            "server.tcp='localhost:99999' (from KVSTORE_TCP): must be HOST:PORT",
        ),
        (
            {"KVSTORE_SOCKET": "/" + "s" * 120},
            "must be at most 102 bytes long (the unix socket path limit, less the pool socket",
        ),
        ({"KVSTORE_SHM_PREFIX": "a/b"}, "server.shm_prefix='a/b' (from KVSTORE_SHM_PREFIX): must match"),
        (
            {"KVSTORE_GRPC_EXPERIMENTS": "-event_engine_listener,,x"},
            "server.grpc_experiments='-event_engine_listener,,x' (from KVSTORE_GRPC_EXPERIMENTS): must match",
        ),
        (
            {"KVSTORE_DEFAULT_POLICY": "nope"},
            "server.default_policy='nope' (from KVSTORE_DEFAULT_POLICY): must be one of arc, horizon, lfu, lru, s3fifo",
        ),
        ({"KVSTORE_LEASE_TTL_MAX_S": "5"}, "server.lease_ttl_max_s=5: must be >= server.lease_ttl_s=10"),
        (
            {"KVSTORE_SHUTDOWN_GRACE_S": "-0.5"},
            "server.shutdown_grace_s=-0.5 (from KVSTORE_SHUTDOWN_GRACE_S): must be in 0..3600",
        ),
    ],
)
def test_env_errors_name_key_value_and_source(env: dict[str, str], expected: str) -> None:
    (problem,) = problems(environ=env)
    assert expected in problem


def test_flag_errors_name_the_flag() -> None:
    (problem,) = problems(flags=flags("--lease-ttl-s", "-1"))
    assert problem == "server.lease_ttl_s=-1 (from --lease-ttl-s): must be >= 0.5"


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[server]\nlease_ttl_s = -1\n", "server.lease_ttl_s=-1 (from {path}): must be >= 0.5"),
        ("[server]\nlease_ttl_s = true\n", "server.lease_ttl_s=True (from {path}): must be a number"),
        ("[server]\nsokcet = 'x'\n", "server.sokcet: unknown key (from {path}); known: socket, tcp,"),
        ("[server]\ntcp = 5\n", "server.tcp=5 (from {path}): must be a string"),
        ("[sever]\n", "sever: unknown top-level key in {path}"),
        ("server = 1\n", "server: must be a table ([server])"),
        ("namespace = 1\n", "namespace: must be an array of tables ([[namespace]])"),
        ("[server\n", "config file {path}: invalid TOML:"),
        (
            NS.format(name="a").replace('"float16"', '"fp17"'),
            "namespace[0].dtype='fp17': must be one of float16, bfloat16,",
        ),
        (NS.format(name="a b"), "namespace[0].name='a b': must match [A-Za-z0-9_.-]{{1,64}}"),
        (
            NS.format(name="a").replace("head_dim = 16", "head_dim = 0"),
            "namespace[0].head_dim=0: must be in 1..",
        ),
        (NS.format(name="a").replace("head_dim = 16\n", ""), "namespace[0].head_dim: required"),
        (
            NS.format(name="a").replace("num_pages = 64", "num_pages = 6.5"),
            "namespace[0].num_pages=6.5: must be an integer",
        ),
        (
            NS.format(name="a").replace("page_tokens = 4", "page_tokens = 100000"),
            "namespace[0].page_tokens=100000: must be in 1..65536",
        ),
        (NS.format(name="a") + "colour = 'red'\n", "namespace[0].colour: unknown key; known: name,"),
        (
            NS.format(name="a") + "policy = 'fifo9'\n",
            "namespace[0].policy='fifo9': must be one of arc, horizon, lfu, lru, s3fifo",
        ),
        (
            NS.format(name="a") + "salt = 'hex:xyz'\n",
            "namespace[0].salt='hex:xyz': must be hex digits after 'hex:'",
        ),
        (NS.format(name="a") * 2, "namespace[1].name='a': already used by namespace[0]"),
        (
            "[server]\nmax_pool_bytes = '300KiB'\n" + NS.format(name="a") + NS.format(name="b"),
            "namespace[1] 'b': pool of 64 pages x 4096 bytes = 256 KiB brings all pools to 512 KiB, "
            "over server.max_pool_bytes=300 KiB",
        ),
    ],
)
def test_file_errors_name_the_key(tmp_path: Path, text: str, expected: str) -> None:
    path = write(tmp_path, text)
    found = problems(config_file=path)
    assert len(found) == 1, found
    assert expected.format(path=path) in found[0]


def test_a_config_file_that_is_not_utf8_is_refused_naming_the_byte(tmp_path: Path) -> None:
    path = tmp_path / "kvstore.toml"
    path.write_bytes(b"[server]\nsocket = '\xff'\n")  # (TOML is UTF-8; tomllib decodes first)
    assert problems(config_file=str(path)) == [f"config file {path}: not UTF-8 text (byte 0xff at offset 19)"]


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    path = write(tmp_path, "[server]\nlease_ttl_s = 0\n" + NS.format(name="a").replace('"float16"', '"fp17"'))
    found = problems(config_file=path, environ={"KVSTORE_MAX_SESSIONS": "x"})
    assert len(found) == 3
    assert str(cfg.ConfigError(found)).count("\n") == 2


def test_missing_config_file() -> None:
    (problem,) = problems(config_file="/nonexistent/kvstore.toml")
    assert problem == "config file /nonexistent/kvstore.toml: No such file or directory"


def test_cli_reports_config_errors_in_one_line_and_exits_2() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("KVSTORE_")}
    result = subprocess.run(
        [sys.executable, "-m", "kvstore", "serve", "--lease-ttl-s", "-1"],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
    )
    assert result.returncode == 2
    assert (
        result.stderr
        == "kvstore serve: config error: server.lease_ttl_s=-1 (from --lease-ttl-s): must be >= 0.5\n"
    )


# ---------------------------------------------------------------- docs


def test_docs_config_md_is_generated_from_the_table() -> None:
    # Regenerate with: python tools/gen_config_docs.py
    assert (REPO / "docs" / "config.md").read_text() == config_docs.markdown()


def test_the_example_in_the_docs_is_a_valid_config(tmp_path: Path) -> None:
    md = config_docs.markdown()
    example = md.split("```toml\n", 1)[1].split("```", 1)[0]
    c = cfg.load(config_file=write(tmp_path, example), environ={})
    assert [s.name for s in c.namespace_specs()] == ["llama3-8b"]
    assert c.namespace_specs()[0].salt == b"\x5e\xed"


def test_booleans_take_true_and_false_words(tmp_path: Path) -> None:
    assert cfg.load(environ={"KVSTORE_WRITE_THROUGH": "yes"}).server.write_through is True
    assert cfg.load(environ={"KVSTORE_WRITE_THROUGH": "off"}).server.write_through is False
    assert cfg.load(config_file=write(tmp_path, "[server]\nwrite_through = true\n")).server.write_through
    with pytest.raises(cfg.ConfigError, match=r"write_through='maybe'.*must be true or false"):
        cfg.load(environ={"KVSTORE_WRITE_THROUGH": "maybe"})
