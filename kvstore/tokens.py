"""The tokens file: bearer tokens and the scopes each grants, per namespace (docs/security.md).

    [[token]]
    name = "engine-a"                 # who it is, in logs and errors (never the secret)
    sha256 = "<64 hex digits>"        # SHA-256 of the secret; or `token = "<secret>"` in the clear
    scopes = { "llama3-8b" = ["read", "write"], "*" = ["read"] }

The file must be private to the daemon's user (no group or other permission bits): it holds
secrets, or digests an attacker could test guesses against offline. A presented token is
hashed and compared with every known digest in constant time (hmac.compare_digest), so the
time an answer takes does not say how much of a guess was right, nor which token matched.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import stat
import tomllib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from kvstore.config_parse import not_utf8

READ, WRITE, ADMIN = "read", "write", "admin"
SCOPES = (READ, WRITE, ADMIN)
ALL = "*"  # a grant on every namespace; also the namespace of calls that touch all of them
MIN_SECRET_CHARS = 16


class TokensFileError(ValueError):
    """The tokens file cannot be used; the message names the file and what is wrong."""


@dataclass(frozen=True, slots=True)
class Token:
    name: str
    digest: bytes  # SHA-256 of the secret
    grants: Mapping[str, frozenset[str]]  # namespace (or ALL) -> scopes

    def allows(self, scope: str, namespace: str) -> bool:
        """`scope` on `namespace`; on ALL only through a grant on ALL."""
        if scope in self.grants.get(ALL, ()):
            return True
        return namespace != ALL and scope in self.grants.get(namespace, ())

    def has_anywhere(self, scope: str) -> bool:
        return any(scope in scopes for scopes in self.grants.values())


class Tokens:
    def __init__(self, tokens: Iterable[Token]) -> None:
        self._tokens = tuple(tokens)

    def __len__(self) -> int:
        return len(self._tokens)

    def find(self, secret: str) -> Token | None:
        """The token whose secret this is, or None. Compares with every one (no early exit)."""
        digest = hashlib.sha256(secret.encode()).digest()
        found = None
        for token in self._tokens:
            if hmac.compare_digest(digest, token.digest):
                found = token
        return found


def digest_hex(secret: str) -> str:
    """What goes in a token's `sha256` key."""
    return hashlib.sha256(secret.encode()).hexdigest()


def load(path: str) -> Tokens:
    """Read and check the file; TokensFileError says what is wrong (never a secret)."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW)
    except OSError as e:
        raise TokensFileError(f"cannot open the tokens file {path}: {e.strerror}") from e
    with os.fdopen(fd, "rb") as fh:
        st = os.fstat(fh.fileno())  # the file we read, not whatever the path names later
        if not stat.S_ISREG(st.st_mode):
            raise TokensFileError(f"the tokens file {path} is not a regular file")
        if st.st_mode & 0o077:
            raise TokensFileError(
                f"the tokens file {path} has mode {stat.S_IMODE(st.st_mode):04o}: group or others may "
                f"read or change it; it must be private to its owner (chmod 600 {path})"
            )
        try:
            doc = tomllib.load(fh)
        except tomllib.TOMLDecodeError as e:
            raise TokensFileError(f"the tokens file {path}: invalid TOML: {e}") from e
        except UnicodeDecodeError as e:  # (tomllib decodes the bytes first: TOML is UTF-8)
            raise TokensFileError(f"the tokens file {path}: {not_utf8(e)}") from None
    tables = doc.get("token")
    if set(doc) - {"token"} or not isinstance(tables, list) or not tables:
        raise TokensFileError(f"the tokens file {path}: give one [[token]] table per token, and nothing else")
    tokens = [_token(path, i, t) for i, t in enumerate(tables)]
    for what, key in (("name", lambda t: t.name), ("secret", lambda t: t.digest)):
        seen: set[object] = set()
        for i, t in enumerate(tokens):
            if key(t) in seen:
                raise TokensFileError(
                    f"the tokens file {path}: token[{i}] ({t.name!r}) repeats another's {what}"
                )
            seen.add(key(t))
    return Tokens(tokens)


def _token(path: str, i: int, table: object) -> Token:
    where = f"the tokens file {path}: token[{i}]"
    if not isinstance(table, dict):
        raise TokensFileError(f"{where} must be a table")
    unknown = set(table) - {"name", "token", "sha256", "scopes"}
    if unknown:
        raise TokensFileError(
            f"{where}: unknown key(s) {', '.join(sorted(unknown))}; known: name, token, sha256, scopes"
        )
    name = table.get("name")
    if not isinstance(name, str) or not name:
        raise TokensFileError(f"{where}: `name` must be a non-empty string")
    where = f"{where} ({name!r})"
    secret, hexdigest = table.get("token"), table.get("sha256")
    if (secret is None) == (hexdigest is None):
        raise TokensFileError(f"{where}: give exactly one of `token` (the secret) and `sha256` (its digest)")
    if secret is not None:
        if not isinstance(secret, str) or len(secret) < MIN_SECRET_CHARS:
            raise TokensFileError(
                f"{where}: `token` must be a string of at least {MIN_SECRET_CHARS} characters"
            )
        digest = hashlib.sha256(secret.encode()).digest()
    else:
        try:
            digest = bytes.fromhex(hexdigest) if isinstance(hexdigest, str) else b""
        except ValueError:
            digest = b""
        if len(digest) != 32:
            raise TokensFileError(f"{where}: `sha256` must be 64 hex digits (the SHA-256 of the secret)")
    scopes = table.get("scopes", {})
    if not isinstance(scopes, dict):
        raise TokensFileError(f"{where}: `scopes` must be a table of namespace = [scopes]")
    grants: dict[str, frozenset[str]] = {}
    for namespace, granted in scopes.items():
        if not isinstance(granted, list) or any(s not in SCOPES for s in granted):
            raise TokensFileError(
                f"{where}: scopes.{namespace} must be a list of {', '.join(map(repr, SCOPES))}"
            )
        grants[namespace] = frozenset(granted)
    return Token(name, digest, grants)
